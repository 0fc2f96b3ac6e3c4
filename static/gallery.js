// The gallery's lightbox: a click on a picture opens it large in a <dialog> with what made it and what to do with
// it (run again, use these settings, download). Esc closes it (the dialog's own), ← and → move through the page.
// Without this file each picture links to its task's page, which shows the same.
(function () {
  "use strict";

  var dialog = document.getElementById("lightbox");
  if (!dialog || typeof dialog.showModal !== "function") return;
  var image = dialog.querySelector(".lightbox__image");
  var info = dialog.querySelector(".lightbox__info");
  var count = dialog.querySelector(".lightbox__count");
  var prev = dialog.querySelector(".lightbox__prev");
  var next = dialog.querySelector(".lightbox__next");
  var current = -1;

  function shots() {
    return Array.prototype.slice.call(document.querySelectorAll("#gallery .shot"));
  }

  function show(index) {
    var all = shots();
    if (index < 0 || index >= all.length) return;
    current = index;
    var shot = all[index];
    var link = shot.querySelector(".shot__open");
    var details = shot.querySelector(".shot__info");
    image.removeAttribute("src");  // no stale picture while the next one loads
    if (link.dataset.width) {
      image.width = Number(link.dataset.width);
      image.height = Number(link.dataset.height);
    } else {
      image.removeAttribute("width");
      image.removeAttribute("height");
    }
    image.src = link.dataset.full;
    image.alt = shot.querySelector("img").alt;
    info.replaceChildren.apply(info, Array.prototype.map.call(details.childNodes, function (node) {
      return node.cloneNode(true);
    }));
    dialog.dataset.output = shot.dataset.output;
    count.textContent = (index + 1) + " of " + all.length;
    prev.disabled = index === 0;
    next.disabled = index === all.length - 1;
    if (!dialog.open) dialog.showModal();
  }

  document.addEventListener("click", function (event) {
    var link = event.target.closest && event.target.closest("#gallery .shot__open");
    // A click with a modifier (new tab, new window) keeps the link's own meaning.
    if (!link || event.button !== 0 || event.ctrlKey || event.metaKey || event.shiftKey || event.altKey) return;
    event.preventDefault();
    show(shots().indexOf(link.closest(".shot")));
  });

  prev.addEventListener("click", function () { show(current - 1); });
  next.addEventListener("click", function () { show(current + 1); });

  // On the document: a click on ← or → may leave the focus on nothing inside the dialog.
  document.addEventListener("keydown", function (event) {
    if (!dialog.open || event.altKey || event.ctrlKey || event.metaKey) return;
    if (event.key === "ArrowLeft") {
      event.preventDefault();
      show(current - 1);
    } else if (event.key === "ArrowRight") {
      event.preventDefault();
      show(current + 1);
    }
  });

  // A click on the backdrop (outside the frame) closes it, as Esc does.
  dialog.addEventListener("click", function (event) {
    if (event.target === dialog) dialog.close();
  });

  dialog.addEventListener("close", function () {
    image.removeAttribute("src");
    var all = shots();
    var link = all[current] && all[current].querySelector(".shot__open");
    if (link) link.focus();
    current = -1;
  });
})();
