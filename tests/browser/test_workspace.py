"""
The workspace and the task list as a user works with them in Chromium: a form that keeps a chosen image when
another field is wrong, a seed typed by hand, images dropped or too large, batches, and cancelling several
tasks at once. Screenshots of each state land in test-output/screenshots/.
"""

import io
import re

from PIL import Image
from playwright.sync_api import expect

from tests.browser.conftest import ACTIVE, TIMEOUT_MS
from tests.browser.test_ui import LIVE, open_live, row, screenshot_both, shown_runs, submitted_on


def png(size=(48, 32), color=(200, 40, 40)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_chosen_image_survives_a_wrong_field_and_runs(alice, hub, alice_api, screenshots):
    page = alice.new_page()
    page.goto(hub.url("/workflows/upload-scale/"))
    form = page.locator("form#submit-form")
    preview = form.locator("img.preview")
    expect(preview).to_be_hidden()  # no broken image before a file is chosen
    form.locator("input[type=file][name=image]").set_input_files(
        {"name": "red.png", "mimeType": "image/png", "buffer": png()}
    )
    expect(preview).to_be_visible()
    scale = form.locator("input[name=scale_by]")
    page.evaluate("document.getElementById('submit-form').noValidate = true")
    scale.evaluate("(el) => { el.removeAttribute('max'); el.removeAttribute('step'); }")
    scale.fill("99")
    before = alice_api.client.get("/api/v1/tasks").json()["count"]
    with page.expect_response(lambda r: r.request.method == "POST") as answered:
        form.locator("button[type=submit]").click()
    assert answered.value.status == 422
    # The error beside its field, and the image still there: shown, and held as an upload for the next try.
    form = page.locator("form#submit-form")
    expect(form.locator(".field--error .errorlist")).to_contain_text("less than or equal to 4.0")
    expect(form.locator("img.preview")).to_be_visible()
    expect(form.locator(".kept")).to_contain_text("red.png")
    kept = form.locator("input[name=image_upload]").input_value()
    assert re.fullmatch(r"[0-9a-f-]{36}", kept), kept
    screenshot_both(page, screenshots, "form-error")

    before_runs = shown_runs(page)
    form.locator("input[name=scale_by]").fill("0.5")
    form.locator("button[type=submit]").click()
    task_id = submitted_on(page, before_runs)
    assert alice_api.client.get("/api/v1/tasks").json()["count"] == before + 1
    body = alice_api.wait(task_id)
    assert body["status"] == "succeeded", body
    assert body["inputs"]["image"] == kept  # the image chosen once, before the error


def test_typing_a_seed_unticks_random_and_a_batch_runs_consecutive_seeds(alice, hub, alice_api):
    page = open_live(alice, hub.url("/workflows/txt2img/"))
    form = page.locator("form#submit-form")
    random = form.locator("input[name=seed_random]")
    expect(random).to_be_checked()
    form.locator("input[name=seed]").fill("500")
    expect(random).not_to_be_checked()
    form.locator("textarea[name=prompt]").fill("three of a kind")
    form.locator("input[name=steps]").fill("4")
    form.locator("input[name=batch]").fill("3")
    before = shown_runs(page)
    form.locator("button[type=submit]").click()
    submitted_on(page, before)
    page.wait_for_function(
        "(n) => document.querySelectorAll('.workspace-runs > .task').length >= n", arg=len(before) + 3
    )
    new = [i for i in shown_runs(page) if i not in before]
    assert len(new) == 3, new
    seeds = sorted(alice_api.task(i.removeprefix("task-"))["inputs"]["seed"] for i in new)
    assert seeds == [500, 501, 502]
    for task_id in new:
        expect(page.locator(f"#{task_id}")).to_have_attribute("data-status", "succeeded", timeout=TIMEOUT_MS)


def test_images_are_dropped_in_and_too_large_ones_refused_in_the_page(alice, hub):
    page = alice.new_page()
    page.goto(hub.url("/workflows/upload-scale/"))
    file_input = page.locator("input[type=file][name=image]")
    limit = int(file_input.get_attribute("data-max-bytes"))
    file_input.set_input_files({"name": "huge.png", "mimeType": "image/png", "buffer": b"\0" * (limit + 1)})
    problem = page.locator("[data-problem-for='id_image']")
    expect(problem).to_be_visible()
    expect(problem).to_contain_text("the most an image may be is")
    assert file_input.evaluate("(el) => el.files.length") == 0  # nothing left to upload
    # Dropped on the zone, a picture is chosen as if picked.
    page.evaluate(
        """(bytes) => {
            const file = new File([new Uint8Array(bytes)], 'dropped.png', {type: 'image/png'});
            const data = new DataTransfer();
            data.items.add(file);
            const zone = document.querySelector('[data-dropzone]');
            zone.dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));
        }""",
        list(png()),
    )
    expect(problem).to_be_hidden()
    assert file_input.evaluate("(el) => el.files[0] && el.files[0].name") == "dropped.png"
    expect(page.locator("img.preview")).to_be_visible()


def test_the_task_list_reads_well_and_cancels_several_at_once(alice, hub, alice_api, screenshots):
    page = open_live(alice, hub.url("/tasks/"))
    ids = [alice_api.submit("txt2img", {"prompt": f"a long one, number {n}", "steps": 100}) for n in range(3)]
    for task_id in ids:
        expect(row(page, task_id)).to_be_visible()
        expect(row(page, task_id).locator(".task__prompt")).to_contain_text("a long one, number")
    badge = page.locator("#running-count")
    expect(badge).to_be_visible()
    assert int(badge.inner_text()) >= 3
    expect(row(page, ids[0]).locator(".status")).to_have_text(re.compile(r"waiting in|running on"))
    screenshot_both(page, screenshots, "task-list")
    for task_id in ids[:2]:
        row(page, task_id).locator("input.task__pick").check()
    page.locator("#bulk-cancel button[type=submit]").click()
    page.wait_for_selector(LIVE, state="attached")
    expect(page.locator(".message--success")).to_contain_text("Cancelling 2 tasks.")
    for task_id in ids[:2]:
        assert alice_api.wait(task_id, timeout=30)["status"] == "cancelled"
    assert alice_api.task(ids[2])["status"] in ACTIVE
    row(page, ids[2]).locator("button.cancel").click()
    assert alice_api.wait(ids[2], timeout=30)["status"] == "cancelled"


def test_a_task_of_this_workflow_sent_from_elsewhere_appears_in_the_workspace(alice, hub, alice_api):
    page = open_live(alice, hub.url("/workflows/fast/"))
    other = alice_api.submit("invert", {"color": 5, "width": 32, "height": 32})
    mine = alice_api.submit("fast", {"color": 7})
    expect(row(page, mine)).to_have_attribute("data-status", "succeeded", timeout=TIMEOUT_MS)
    expect(page.locator(".workspace-runs > .task").first).to_have_id(f"task-{mine}")
    alice_api.wait(other)
    expect(row(page, other)).to_have_count(0)
    expect(page.locator(f".workspace-runs #task-{mine}")).to_have_count(1)
