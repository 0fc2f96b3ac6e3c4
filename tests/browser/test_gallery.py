"""
The gallery's lightbox and the task page as a user sees them, in headless Chromium against `serve --demo`: two
finished pictures, the lightbox opened by a click with the prompt and seed, moved with the arrow keys, closed with
Esc, at desktop and phone widths, then "Use these settings" onto the form filled from that task.
"""

import re

from playwright.sync_api import expect

from tests.browser.conftest import UUID

NAME = "Text to image"


def visible_text_count(page, text):
    """How many elements in <main> the user sees whose own text is exactly `text` (display:none ones do not count)."""
    return page.evaluate(
        """(text) => [...document.querySelectorAll('main *')].filter((el) =>
            el.children.length === 0 && el.textContent.trim() === text && el.getClientRects().length > 0).length""",
        text,
    )


def lightbox_loaded(page):
    page.wait_for_function(
        """() => { const img = document.querySelector('#lightbox[open] .lightbox__image');
                   return img && img.complete && img.naturalWidth > 0; }"""
    )


def test_the_lightbox_shows_each_picture_with_its_settings_and_leads_back_to_the_form(
    alice, hub, alice_api, screenshots
):
    # One after the other, so that the fox's picture is certainly the newer one.
    first = alice_api.submit("txt2img", {"prompt": "a lighthouse in a storm", "seed": 1111, "steps": 8})
    assert alice_api.wait(first)["status"] == "succeeded"
    second = alice_api.submit("txt2img", {"prompt": "a fox asleep in the snow", "seed": 2222, "steps": 8})
    assert alice_api.wait(second)["status"] == "succeeded"

    page = alice.new_page()
    page.set_viewport_size({"width": 1280, "height": 800})
    page.goto(hub.url("/gallery/"))
    dialog = page.locator("dialog#lightbox")
    expect(dialog).to_be_hidden()
    # Newest first: the fox. A click opens it large, over the page, with what made it.
    page.locator(".shot__open").first.click()
    expect(dialog).to_be_visible()
    expect(dialog.locator(".shot__prompt")).to_have_text("a fox asleep in the snow")
    expect(dialog.locator(".shot__seed")).to_have_text("2222")
    expect(dialog.get_by_role("button", name="Run again")).to_be_visible()
    expect(dialog.get_by_role("link", name="Download")).to_have_attribute("href", re.compile(r"\?download=1$"))
    lightbox_loaded(page)
    assert page.url == hub.url("/gallery/")  # no navigation: an overlay
    page.screenshot(path=screenshots / "gallery-lightbox-1280.png")

    page.keyboard.press("ArrowRight")
    expect(dialog.locator(".shot__prompt")).to_have_text("a lighthouse in a storm")
    expect(dialog.locator(".shot__seed")).to_have_text("1111")
    lightbox_loaded(page)
    page.keyboard.press("ArrowLeft")
    expect(dialog.locator(".shot__seed")).to_have_text("2222")
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()

    # A phone: the lightbox fits the screen's width and its buttons are there to tap.
    page.set_viewport_size({"width": 390, "height": 844})
    page.locator(".shot__open").nth(1).click()
    expect(dialog).to_be_visible()
    expect(dialog.locator(".shot__seed")).to_have_text("1111")
    lightbox_loaded(page)
    box = dialog.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390, box
    picture = dialog.locator(".lightbox__image").bounding_box()
    assert picture["width"] <= 390, picture
    expect(dialog.get_by_role("button", name="Close")).to_be_visible()
    page.screenshot(path=screenshots / "gallery-lightbox-390.png")

    settings = dialog.get_by_role("link", name="Use these settings")
    settings.scroll_into_view_if_needed()
    settings.click()
    page.wait_for_url(re.compile(rf"/workflows/txt2img/\?from={UUID}$"))
    assert page.url.endswith(f"?from={first}")
    form = page.locator("form#submit-form")
    expect(form.locator("textarea[name=prompt]")).to_have_value("a lighthouse in a storm")
    expect(form.locator("input[name=seed]")).to_have_value("1111")


def test_the_task_page_shows_each_thing_once(alice, hub, alice_api, screenshots):
    task_id = alice_api.submit("txt2img", {"prompt": "one picture, once", "seed": 3333, "steps": 8})
    assert alice_api.wait(task_id)["status"] == "succeeded"
    [output] = alice_api.task(task_id)["outputs"]
    page = alice.new_page()
    page.set_viewport_size({"width": 1280, "height": 800})
    page.goto(hub.url(f"/tasks/{task_id}/"))
    expect(page.locator("h1")).to_have_text(NAME)
    assert visible_text_count(page, NAME) == 1
    pictures = page.locator("main img:visible")
    expect(pictures).to_have_count(1)
    expect(pictures).to_have_attribute("src", f"/outputs/{output['id']}/")
    page.wait_for_function("() => { const img = document.querySelector('#outputs img'); "
                           "return img && img.complete && img.naturalWidth > 0; }")
    # The simulator's 512×512 picture at its own size, not stretched to the column.
    size = page.evaluate("() => { const img = document.querySelector('#outputs img'); "
                         "return [img.naturalWidth, img.naturalHeight, img.clientWidth, img.clientHeight]; }")
    assert size[2] == size[0] and size[3] == size[1], size
    caption = page.locator("#outputs figcaption")
    expect(caption).to_contain_text(f"txt2img-3333-1.png · {size[0]}×{size[1]} · ")
    expect(caption).to_contain_text(re.compile(r"\d+(\.\d)?\s(KB|MB|bytes)"))
    timeline = page.locator("ol#timeline")
    expect(timeline).to_contain_text(re.compile(r"\d{1,2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} — Sent to \S+"))
    expect(timeline).to_contain_text("Finished")
    expect(timeline.locator("code")).to_have_count(0)
    page.screenshot(path=screenshots / "task-detail-1280.png", full_page=True)
