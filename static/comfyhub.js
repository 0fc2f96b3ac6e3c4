// Small progressive enhancements on top of htmx: live-socket state, the page title, elapsed clocks,
// image previews. Every page works without this file.
(function () {
  "use strict";

  var TERMINAL = ["succeeded", "failed", "cancelled"];

  function setLive(connected) {
    var live = document.getElementById("live");
    if (!live) return;
    live.dataset.connected = connected ? "true" : "false";
    live.title = connected ? "Live updates: on" : "Live updates: reconnecting…";
  }

  function updateTitle() {
    var counter = document.getElementById("running-count");
    if (!counter) return;
    counter.hidden = !parseInt(counter.dataset.count || "0", 10);
    var count = parseInt(counter.dataset.running || "0", 10);
    var base = document.title.replace(/^\(\d+ running\) /, "");
    document.title = count ? "(" + count + " running) " + base : base;
  }

  function dedupeRows() {
    // A window may already show a task whose "created" push arrives late: keep one row per id.
    var seen = {};
    document.querySelectorAll(".task[id^='task-']").forEach(function (row) {
      if (seen[row.id]) row.remove();
      else seen[row.id] = true;
    });
  }

  function refreshDetail() {
    var body = document.getElementById("task-detail-body");
    if (!body) return;
    var row = document.getElementById("task-" + body.dataset.task);
    if (!row || row.dataset.status === body.dataset.status) return;
    if (TERMINAL.indexOf(row.dataset.status) >= 0) {
      body.dataset.status = row.dataset.status;
      htmx.ajax("GET", window.location.pathname, {target: "#task-detail-body", select: "#task-detail-body", swap: "outerHTML"});
    }
  }

  function formatDuration(seconds) {
    seconds = Math.max(0, Math.floor(seconds));
    var h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
    var pad = function (n) { return (n < 10 ? "0" : "") + n; };
    if (h) return h + "h " + pad(m) + "m";
    if (m) return m + "m " + pad(s) + "s";
    return s + "s";
  }

  function tick() {
    var now = Date.now() / 1000;
    document.querySelectorAll("time.elapsed[data-start]:not([data-end])").forEach(function (el) {
      el.textContent = formatDuration(now - parseFloat(el.dataset.start));
    });
    // The ETA of a running task counts down between two pushes; past it, the task is late, not "0s left".
    document.querySelectorAll("time.countdown[data-end]").forEach(function (el) {
      var left = parseFloat(el.dataset.end) - now;
      if (left >= 1) {
        el.textContent = formatDuration(left);
      } else if (el.parentNode) {
        el.parentNode.textContent = "taking longer than usual";
      }
    });
  }

  // A push that arrives while the page is being read again may be older than what the read brings (then the
  // read wins) or newer (a task created meanwhile would vanish with the list it was inserted in): read again
  // until no push came in between.
  var catchingUp = false;
  var pushedMeanwhile = false;

  function catchUp() {
    // Pushes sent before this socket was open (or while it was down) are not replayed: read the live parts
    // of the page again from the database. Forms are left alone so that nothing typed is lost.
    if (catchingUp) {
      pushedMeanwhile = true;
      return;
    }
    catchingUp = true;
    pushedMeanwhile = false;
    var reads = [];
    var list = document.getElementById("task-list");
    if (list) {
      reads.push(htmx.ajax("GET", window.location.href, {target: "#task-list", select: "#task-list", swap: "outerHTML"}));
    }
    document.querySelectorAll(".task[id^='task-']").forEach(function (row) {
      if (list && list.contains(row)) return;
      reads.push(htmx.ajax("GET", "/tasks/" + row.id.slice(5) + "/row", {target: "#" + row.id, swap: "outerHTML"}));
    });
    Promise.all(reads).catch(function () {}).then(function () {
      catchingUp = false;
      if (pushedMeanwhile) catchUp();
    });
  }

  // The hub closes a socket with 4001 when its sign-in ended (logout, password change); htmx does not reconnect
  // after that code. A socket refused at the handshake (signed out while it was down) closes with 1006, after
  // which htmx retries with a growing random delay, forever. Either way ask the hub whether this window is still
  // signed in: if so open the socket again (the session that changed the password is), if not reload the page,
  // which leads to the login page and stops the retries.
  var SIGNED_OUT = 4001;
  var failedInARow = 0;
  var lastCheck = 0;
  var leaving = false;

  function whenSignedIn(then) {
    lastCheck = Date.now();
    // The home page needs a sign-in: a redirect (to the login page) means this window has none any more.
    fetch("/", {redirect: "manual", credentials: "same-origin", cache: "no-store"})
      .then(function (response) {
        if (leaving) return;
        if (response.type === "opaqueredirect" || response.status === 401 || response.status === 403) {
          window.location.reload();
        } else if (response.ok && then) {
          then();
        }
      })
      .catch(function () {
        // The hub does not answer: htmx's own retries (or the next close) will ask again.
      });
  }

  window.addEventListener("beforeunload", function () { leaving = true; });

  document.addEventListener("htmx:wsOpen", function () {
    failedInARow = 0;
    catchUp();
    setLive(true);
  });
  document.addEventListener("htmx:wsClose", function (event) {
    if (leaving) return;
    failedInARow += 1;
    var code = event.detail && event.detail.event ? event.detail.event.code : 0;
    var wrapper = event.detail ? event.detail.socketWrapper : null;
    if (code === SIGNED_OUT) {
      whenSignedIn(function () {
        if (wrapper) setTimeout(wrapper.reconnect, 500 + Math.random() * 1000);
      });
    } else if (failedInARow >= 2 && Date.now() - lastCheck > 10000) {
      whenSignedIn(null);
    }
  });
  function barValue(live) {
    var bar = live.querySelector("progress");
    return bar ? Number(bar.getAttribute("value")) || 0 : 0;
  }

  // A running task's bar never goes back. A page read from the database (progress is written there once a
  // second) can be older than the live part the socket has drawn already: keep the one that is further on.
  document.addEventListener("htmx:beforeSwap", function (event) {
    var text = event.detail.serverResponse;
    if (typeof text !== "string" || text.indexOf("task__live") < 0) return;
    var doc = new DOMParser().parseFromString(text, "text/html");
    var changed = false;
    doc.querySelectorAll(".task__live[id]").forEach(function (fresh) {
      var shown = document.getElementById(fresh.id);
      var row = fresh.closest(".task");
      if (!shown || !row || row.getAttribute("data-status") !== "running") return;
      if (barValue(fresh) >= barValue(shown)) return;
      var kept = shown.cloneNode(true);
      kept.removeAttribute("hx-swap-oob");
      fresh.replaceWith(doc.importNode(kept, true));
      changed = true;
    });
    if (changed) {
      event.detail.serverResponse = /<html/i.test(text) ? "<!doctype html>" + doc.documentElement.outerHTML : doc.body.innerHTML;
    }
  });

  document.addEventListener("htmx:afterSettle", function () {
    dedupeRows();
    refreshDetail();
  });
  document.addEventListener("htmx:wsClose", function () { setLive(false); });
  document.addEventListener("htmx:wsAfterMessage", function () {
    if (catchingUp) pushedMeanwhile = true;
    dedupeRows();
    sortRunOrder();
    updateTitle();
    refreshDetail();
  });

  // --- The submit form: images checked before they travel, dropped files, seeds typed by hand. ---------------

  function describeBytes(bytes) {
    return bytes >= 1048576 ? Math.round(bytes / 1048576) + " MiB" : Math.round(bytes / 1024) + " KiB";
  }

  function showProblem(input, text) {
    var problem = document.querySelector("[data-problem-for='" + input.id + "']");
    if (problem) {
      problem.textContent = text || "";
      problem.hidden = !text;
    }
  }

  function chooseImage(input) {
    var preview = document.getElementById(input.dataset.preview);
    var file = input.files && input.files[0];
    var limit = parseInt(input.dataset.maxBytes || "0", 10);
    if (file && limit && file.size > limit) {
      // Refused here, before its bytes go anywhere; the hub would refuse it too.
      showProblem(input, "This file is " + describeBytes(file.size) + "; the most an image may be is " + describeBytes(limit) + ".");
      input.value = "";
      return;
    }
    showProblem(input, "");
    if (!preview) return;
    if (file) {
      preview.src = URL.createObjectURL(file);
      preview.hidden = false;
      // A new pick replaces the image kept from before.
      var kept = input.form && input.dataset.kept ? input.form.elements[input.dataset.kept] : null;
      if (kept) kept.value = "";
      var note = input.closest("[data-dropzone]") && input.closest("[data-dropzone]").querySelector(".kept");
      if (note) note.hidden = true;
    } else if (!preview.getAttribute("src") || preview.src.indexOf("blob:") === 0) {
      preview.hidden = true;
    }
  }

  document.addEventListener("change", function (event) {
    var input = event.target;
    if (input.matches && input.matches("input[type=file][data-preview]")) chooseImage(input);
  });

  ["dragenter", "dragover"].forEach(function (type) {
    document.addEventListener(type, function (event) {
      var zone = event.target.closest && event.target.closest("[data-dropzone]");
      if (!zone) return;
      event.preventDefault();
      zone.classList.add("dropzone--over");
    });
  });
  document.addEventListener("dragleave", function (event) {
    var zone = event.target.closest && event.target.closest("[data-dropzone]");
    if (zone && !zone.contains(event.relatedTarget)) zone.classList.remove("dropzone--over");
  });
  document.addEventListener("drop", function (event) {
    var zone = event.target.closest && event.target.closest("[data-dropzone]");
    if (!zone) return;
    event.preventDefault();
    zone.classList.remove("dropzone--over");
    var input = zone.querySelector("input[type=file]");
    if (!input || !event.dataTransfer || !event.dataTransfer.files.length) return;
    var files = new DataTransfer();
    files.items.add(event.dataTransfer.files[0]);
    input.files = files.files;
    chooseImage(input);
  });

  // A seed typed by hand is the seed wanted: "random" beside it unticks itself.
  document.addEventListener("input", function (event) {
    var input = event.target;
    if (!input.closest || !input.closest(".seed") || input.type !== "number") return;
    var random = input.closest(".seed").querySelector("input[type=checkbox]");
    if (random && input.value !== "") random.checked = false;
  });

  // Lists shown in the order tasks will run keep that order as rows change state or arrive.
  function sortRunOrder() {
    var list = document.querySelector("#task-list[data-order='run']");
    if (!list) return;
    var stage = {running: 0, submitted: 1, queued: 2};
    var rows = Array.prototype.slice.call(list.querySelectorAll(":scope > .task"));
    var key = function (row) {
      return [stage[row.dataset.status] === undefined ? 3 : stage[row.dataset.status], parseInt(row.dataset.position || "0", 10)];
    };
    var sorted = rows.slice().sort(function (a, b) {
      var x = key(a), y = key(b);
      return x[0] - y[0] || x[1] - y[1];
    });
    if (sorted.some(function (row, index) { return row !== rows[index]; })) {
      sorted.forEach(function (row) { list.appendChild(row); });
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    updateTitle();
    tick();
    setInterval(tick, 1000);
  });

  // A push goes to every window of its user, whatever page it shows: the gallery gets a task's row, a filtered
  // list the fragment meant for "#task-list". Fragments whose target is not on this page are dropped before htmx
  // swaps them, since htmx logs htmx:oobErrorNoTarget as a console error before any listener can stop it. Only
  // socket frames are filtered: the ws extension passes no xhr, and a page's own requests keep htmx's checks.
  function oobSelector(fragment) {
    var spec = fragment.getAttribute("hx-swap-oob") || fragment.getAttribute("data-hx-swap-oob") || "true";
    var colon = spec.indexOf(":");
    if (colon > 0) return spec.slice(colon + 1);
    return fragment.id ? "#" + CSS.escape(fragment.id) : null;
  }

  function dropUntargeted(text) {
    var holder = document.createElement("template");
    holder.innerHTML = text;
    // Fragments are swapped in order: a row inserted by one may be the target of the next (its progress).
    var arriving = {};
    var dropped = false;
    Array.prototype.slice.call(holder.content.children).forEach(function (fragment) {
      var selector = oobSelector(fragment);
      var found;
      try {
        found = !selector || arriving[selector] || document.querySelector(selector);
      } catch (error) {
        found = true; // not plain CSS (htmx's extended selectors): left for htmx to resolve
      }
      if (!found) {
        fragment.remove();
        dropped = true;
        return;
      }
      if (fragment.id) arriving["#" + CSS.escape(fragment.id)] = true;
      fragment.querySelectorAll("[id]").forEach(function (element) {
        arriving["#" + CSS.escape(element.id)] = true;
      });
    });
    return dropped ? holder.innerHTML : text;
  }

  htmx.defineExtension("live-oob", {
    transformResponse: function (text, xhr) {
      return xhr ? text : dropUntargeted(text);
    },
  });

  // The ws extension reports a failed socket by logging the error Event itself ("[object Event]") as a console
  // error, again before any listener runs. The close that always follows says as much (htmx retries on it and the
  // page shows its note), so sockets are made without the extension's error handler.
  htmx.createWebSocket = function (url) {
    var socket = new WebSocket(url, []);
    socket.binaryType = htmx.config.wsBinaryType;
    Object.defineProperty(socket, "onerror", {configurable: true, get: function () { return null; }, set: function () {}});
    return socket;
  };

  // The green dot is easy to miss: while the live socket is down, say so in words.
  function showReconnecting(shown) {
    var note = document.getElementById("live-note");
    if (note) note.hidden = !shown;
  }
  document.addEventListener("htmx:wsOpen", function () { showReconnecting(false); });
  document.addEventListener("htmx:wsClose", function () { if (!leaving) showReconnecting(true); });

  // The account page shows a new API token once: select it for copying, and offer a copy button where the
  // clipboard can be written (a secure context).
  document.addEventListener("DOMContentLoaded", function () {
    var secret = document.getElementById("new-token");
    if (secret) {
      secret.focus();
      secret.select();
    }
    document.querySelectorAll("button[data-copy]").forEach(function (button) {
      var source = document.querySelector(button.dataset.copy);
      if (!source || !navigator.clipboard || !window.isSecureContext) return;
      button.hidden = false;
      button.addEventListener("click", function () {
        navigator.clipboard.writeText(source.value).then(function () {
          button.textContent = "Copied";
        }, function () {
          button.textContent = "Copy it by hand";
        });
      });
    });
  });
})();
