"""
The browser UI as a user sees it, in headless Chromium against a real `serve --demo` process (see conftest.py):
log in, submit, watch the progress bar move without reloading, see and open the result, several windows, a
second user who must see nothing of the first one's work, cancelling, and reloading in the middle of a task.
"""

import re

from playwright.sync_api import expect

from tests.browser.conftest import ACTIVE, TIMEOUT_MS, UUID
from tests.conftest import wait_for

LIVE = "#live[data-connected='true']"
RUNNING_TITLE = re.compile(r"^\(\d+ running\)")


def open_live(context, url):
    """A page at `url` whose websocket is open (updates pushed from now on reach it)."""
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector(LIVE, state="attached")
    # A reload would wipe this: its presence at the end proves the page only ever changed live.
    page.evaluate("window.__sameDocument = true")
    return page


def same_document(page):
    return page.evaluate("window.__sameDocument === true")


def history(page, task_id):
    """What the recorder saw of the row: [{value, status, live, aria, title}, ...]."""
    return page.evaluate("(id) => window.__rows[id] || []", f"task-{task_id}")


def row(page, task_id):
    return page.locator(f"#task-{task_id}")


def expect_succeeded(page, task_id):
    expect(row(page, task_id)).to_have_attribute("data-status", "succeeded", timeout=TIMEOUT_MS)
    bar = row(page, task_id).locator("progress")
    expect(bar).to_have_attribute("value", "100")
    expect(bar).to_have_attribute("aria-valuenow", "100")
    expect(bar).to_have_attribute("max", "100")


def shown_runs(page):
    return page.eval_on_selector_all(".workspace-runs > .task", "(rows) => rows.map((row) => row.id)")


def submitted_on(page, before):
    """The id of the task a workspace page just submitted: a row that `before` (shown_runs) did not have."""
    found = page.wait_for_function(
        "(before) => [...document.querySelectorAll('.workspace-runs > .task')].map((r) => r.id)"
        ".find((id) => !before.includes(id)) || null",
        arg=before,
        timeout=TIMEOUT_MS,
    )
    task_id = found.json_value().removeprefix("task-")
    assert re.fullmatch(UUID, task_id), task_id
    return task_id


def screenshot_both(page, screenshots, name):
    """The page at a laptop's size and at a phone's, as `<name>-1280.png` and `<name>-390.png`."""
    size = page.viewport_size
    for width, height in ((1280, 800), (390, 844)):
        page.set_viewport_size({"width": width, "height": height})
        page.screenshot(path=screenshots / f"{name}-{width}.png", full_page=True)
    page.set_viewport_size(size)


def check_progress_values(records):
    """Every bar value rendered is a whole number 0..100 (same in aria-valuenow), and 100 only once succeeded."""
    for record in records:
        assert record["value"] is not None and re.fullmatch(r"\d{1,3}", record["value"]), record
        assert 0 <= int(record["value"]) <= 100, record
        assert record["aria"] == record["value"], record
        if record["value"] == "100":
            assert record["status"] == "succeeded", records


def wait_loaded(page, selector):
    """Every image matching `selector` has been fetched and decoded."""
    page.wait_for_function(
        """(sel) => {
            const imgs = [...document.querySelectorAll(sel)];
            return imgs.length > 0 && imgs.every((img) => img.complete && img.naturalWidth > 0);
        }""",
        arg=selector,
        timeout=TIMEOUT_MS,
    )


def test_submit_watch_progress_and_open_the_result(alice, hub, alice_api, screenshots):
    page = alice.new_page()
    page.goto(hub.url("/"))
    expect(page).to_have_title(re.compile(r"comfyhub$"))
    page.click("a[href='/workflows/txt2img/']")
    page.wait_for_url(hub.url("/workflows/txt2img/"))
    form = page.locator("form#submit-form")
    expect(form.locator("input[name=seed_random]")).to_be_checked()
    form.locator("textarea[name=prompt]").fill("a red fox in the snow, watercolour")
    form.locator("input[name=steps]").fill("20")
    run = form.locator("button[type=submit]")
    expect(run).to_have_text(re.compile(r"^\s*Run\s*$"))
    page.wait_for_selector(LIVE, state="attached")
    page.evaluate("window.__sameDocument = true")
    before = shown_runs(page)
    run.click()

    # The workspace: the page stays, the new task appears beside the form and runs there.
    task_id = submitted_on(page, before)
    expect(page).to_have_url(hub.url("/workflows/txt2img/"))
    expect(row(page, task_id)).to_be_visible()
    # While it runs: the sampler's step in the row's line of text, and the picture forming beside it.
    expect(row(page, task_id).locator(".task__step")).to_contain_text(re.compile(r"step \d+/20"))
    expect(row(page, task_id).locator(".task__step .node")).to_have_text("KSampler")
    preview = row(page, task_id).locator("img.task__preview[src^='data:image/webp;base64,']")
    expect(preview).to_be_visible()
    # A picture the browser can draw, at most 256 px wide (polled: each new preview replaces the element).
    page.wait_for_function(
        """(id) => { const img = document.querySelector(`#task-${id} img.task__preview`);
                     return img && img.complete && img.naturalWidth > 0 && img.naturalWidth <= 256; }""",
        arg=task_id,
    )
    screenshot_both(page, screenshots, "workspace-running")
    expect_succeeded(page, task_id)
    assert same_document(page), "the workspace reloaded"
    expect(row(page, task_id).locator("img.task__preview")).to_have_count(0)  # a finished row shows its result
    wait_loaded(page, f"#task-{task_id} img.output-thumb")
    screenshot_both(page, screenshots, "workspace-done")

    records = history(page, task_id)
    check_progress_values(records)
    moving = [r for r in records if r["live"] and 0 < int(r["value"]) < 100]
    assert moving, f"the bar never showed a value strictly between 0 and 100 live: {records}"
    values = [int(r["value"]) for r in records]
    assert values == sorted(values), f"the bar went backwards: {values}"
    assert alice_api.task(task_id)["status"] == "succeeded"
    expect(row(page, task_id).locator(".status")).to_contain_text(re.compile("succeeded", re.I))

    # The result, once, on the task's page: the full picture that really loads, linking to the file (the row's
    # thumbnail is for the task list; this page hides it).
    page.locator(f"#task-{task_id} a.task__name").click()
    page.wait_for_url(hub.url(f"/tasks/{task_id}/"))
    expect(row(page, task_id).locator("img.output-thumb").first).to_be_hidden()
    expect(page.locator("section#outputs img")).to_have_count(1)
    expect(page.locator("section#outputs img").first).to_be_visible()
    wait_loaded(page, "section#outputs img")
    expect(page.locator("ol#timeline")).to_be_visible()
    expect(page.get_by_role("button", name=re.compile(r"^\s*Run again\s*$"))).to_be_visible()
    expect(page.get_by_role("button", name=re.compile(r"Run again with a new seed"))).to_be_visible()
    page.screenshot(path=screenshots / "task-detail.png", full_page=True)

    link = page.locator("section#outputs a:has(img.output-full)").first
    href = link.get_attribute("href")
    [output] = alice_api.task(task_id)["outputs"]
    assert href == f"/outputs/{output['id']}/", href
    with alice.expect_event("response", lambda r: r.url == hub.url(href)) as served:
        link.click()
    response = served.value
    assert response.status == 200
    assert response.headers["content-type"] == "image/png"
    assert response.body().startswith(b"\x89PNG")

    # The gallery shows it too.
    gallery = alice.new_page()
    gallery.goto(hub.url("/gallery/"))
    expect(gallery).to_have_title(re.compile(r"comfyhub$"))
    # Its picture: a thumbnail whose source, or the link around it, names this output.
    mine = f"img.output-thumb[src*='{output['id']}'], a[href*='{output['id']}'] img.output-thumb"
    expect(gallery.locator(mine).first).to_be_visible()
    wait_loaded(gallery, "img.output-thumb")
    gallery.screenshot(path=screenshots / "gallery.png", full_page=True)


def test_a_task_submitted_in_one_window_appears_live_in_another(alice, hub, alice_api, screenshots):
    watcher = open_live(alice, hub.url("/tasks/"))
    submitter = alice.new_page()
    submitter.goto(hub.url("/workflows/txt2img/"))
    submitter.locator("form#submit-form textarea[name=prompt]").fill("two windows, one hub")
    submitter.locator("form#submit-form input[name=steps]").fill("10")
    before = shown_runs(submitter)
    submitter.locator("form#submit-form button[type=submit]").click()
    from_form = submitted_on(submitter, before)

    expect(row(watcher, from_form)).to_be_visible()
    from_api = alice_api.submit("txt2img", {"prompt": "and one through the API", "steps": 10})
    expect(row(watcher, from_api)).to_be_visible()
    # Newest first.
    rows = watcher.locator("#task-list [id^='task-'][data-status]")
    expect(rows.nth(0)).to_have_id(f"task-{from_api}")
    expect(rows.nth(1)).to_have_id(f"task-{from_form}")

    expect_succeeded(watcher, from_form)
    expect_succeeded(watcher, from_api)
    expect_succeeded(submitter, from_form)
    assert same_document(watcher), "the task list reloaded"
    check_progress_values(history(watcher, from_api))
    check_progress_values(history(watcher, from_form))
    expect(row(watcher, from_api).locator("button.cancel")).to_have_count(0)
    wait_loaded(watcher, f"#task-{from_api} img.output-thumb, #task-{from_form} img.output-thumb")
    watcher.screenshot(path=screenshots / "tasks.png", full_page=True)

    succeeded = alice.new_page()
    succeeded.goto(hub.url("/tasks/?status=succeeded"))
    expect(row(succeeded, from_api)).to_be_visible()
    expect(row(succeeded, from_form)).to_be_visible()
    expect(succeeded.locator("#task-list [data-status]:not([data-status='succeeded'])")).to_have_count(0)


def test_another_user_sees_nothing_of_alices_tasks(alice, bob, hub, alice_api, bob_api):
    frames = []

    def record(ws):
        ws.on("framereceived", lambda payload: frames.append(payload if isinstance(payload, str) else repr(payload)))

    bob_pages = []
    for path in ("/tasks/", "/gallery/"):
        page = bob.new_page()
        page.on("websocket", record)
        page.goto(hub.url(path))
        page.wait_for_selector(LIVE, state="attached")
        bob_pages.append(page)
    bob_tasks, bob_gallery = bob_pages
    alice_page = open_live(alice, hub.url("/tasks/"))

    alices = alice_api.submit("txt2img", {"prompt": "alice's secret", "steps": 10})
    bobs = bob_api.submit("txt2img", {"prompt": "bob's own", "steps": 10})
    # Control: pushes do reach bob's pages (his own task), and alice's reach alice.
    expect_succeeded(bob_tasks, bobs)
    expect_succeeded(alice_page, alices)
    alice_api.wait(alices)
    [output] = alice_api.task(alices)["outputs"]
    assert any(bobs in frame for frame in frames), "bob's pages received no push about his own task"

    for page in bob_pages:
        html = page.content()
        assert alices not in html
        assert output["id"] not in html
    expect(row(bob_tasks, alices)).to_have_count(0)
    leaked = [frame for frame in frames if alices in frame or output["id"] in frame]
    assert not leaked, leaked
    assert bob_gallery.locator(f"img.output-thumb[src*='{output['id']}']").count() == 0

    probe = bob.new_page()
    assert probe.goto(hub.url(f"/tasks/{alices}/")).status == 404
    assert probe.goto(hub.url(f"/outputs/{output['id']}/")).status == 404
    assert bob.request.get(hub.url(f"/outputs/{output['id']}/")).status == 404
    # ... while alice gets them.
    assert alice.request.get(hub.url(f"/tasks/{alices}/")).status == 200
    assert alice.request.get(hub.url(f"/outputs/{output['id']}/")).status == 200


def test_cancel_from_the_task_list(alice, hub, alice_api):
    page = open_live(alice, hub.url("/tasks/"))
    task_id = alice_api.submit("txt2img", {"prompt": "a very long one", "steps": 100})
    the_row = row(page, task_id)
    expect(the_row).to_be_visible()
    status = the_row.get_attribute("data-status")
    assert status in ACTIVE, status
    the_row.locator("button.cancel").click()

    expect(page.locator(f"#task-{task_id}")).to_have_attribute("data-status", "cancelled", timeout=TIMEOUT_MS)
    expect(page.locator(f"#task-{task_id} .status")).to_contain_text(re.compile("cancelled", re.I))
    expect(page.locator(f"#task-{task_id} button.cancel")).to_have_count(0)
    body = alice_api.wait(task_id, timeout=30)
    assert body["status"] == "cancelled", body
    assert body["outputs"] == []

    cancelled = alice.new_page()
    cancelled.goto(hub.url("/tasks/?status=cancelled"))
    expect(row(cancelled, task_id)).to_have_attribute("data-status", "cancelled")


def test_reloading_reattaches_to_a_running_task(alice, hub, alice_api):
    page = open_live(alice, hub.url("/tasks/"))
    task_id = alice_api.submit("txt2img", {"prompt": "reload me", "steps": 30})
    alice_api.wait(task_id, statuses=("running",), timeout=30)

    moving = page.wait_for_function(
        """(id) => {
            const bar = document.querySelector(`#task-${id}[data-status="running"] progress`);
            const value = bar && Number(bar.getAttribute('value'));
            return value > 0 && value < 100 ? value : null;
        }""",
        arg=task_id,
        timeout=TIMEOUT_MS,
    )
    moving.json_value()
    # The database has the progress a second behind the live bar at most: wait until it has some, then reload.
    stored = wait_for(lambda: alice_api.task(task_id)["progress"], timeout=30, message="progress in the database")
    before = int(stored * 100)
    page.reload()

    rendered = history(page, task_id)
    assert rendered and not rendered[0]["live"], rendered
    first = rendered[0]
    # What the reloaded page was rendered with: the task's progress as the database has it, not a fresh 0.
    assert first["status"] == "running", rendered
    assert before <= int(first["value"]) <= 99, (before, rendered)
    assert RUNNING_TITLE.match(first["title"]), first["title"]
    assert first["title"].endswith("comfyhub"), first["title"]
    expect(row(page, task_id).locator("button.cancel")).to_be_visible()

    page.wait_for_selector(LIVE, state="attached")
    page.evaluate("window.__sameDocument = true")
    expect_succeeded(page, task_id)
    assert same_document(page), "the page reloaded again"
    records = history(page, task_id)
    check_progress_values(records)
    assert any(r["live"] for r in records), records
    expect(page).not_to_have_title(RUNNING_TITLE)
    later = alice.new_page()
    later.goto(hub.url("/tasks/"))
    expect(later).not_to_have_title(RUNNING_TITLE)
    expect(later).to_have_title(re.compile(r"comfyhub$"))


def test_invalid_input_is_reported_next_to_the_field(alice, hub, alice_api):
    before = alice_api.client.get("/api/v1/tasks").json()["count"]
    page = alice.new_page()
    page.goto(hub.url("/workflows/txt2img/"))
    form = page.locator("form#submit-form")
    form.locator("textarea[name=prompt]").fill("too many steps")
    steps = form.locator("input[name=steps]")
    # The browser's own checks would stop this before the server sees it: take them away, as a script could.
    page.evaluate("document.getElementById('submit-form').noValidate = true")
    steps.evaluate("(el) => { el.removeAttribute('max'); el.removeAttribute('min'); }")
    steps.fill("1000")
    with page.expect_response(lambda r: r.request.method == "POST"):
        form.locator("button[type=submit]").click()
    expect(page).to_have_url(hub.url("/workflows/txt2img/"))
    # The nearest element around the steps input that holds an error list is that field's own box.
    box = steps.locator("xpath=ancestor::*[.//*[contains(concat(' ', @class, ' '), ' errorlist ')]][1]")
    expect(box.locator(".errorlist li").first).to_be_visible()
    expect(box.locator("input[name], textarea[name], select[name]")).to_have_count(1)
    assert alice_api.client.get("/api/v1/tasks").json()["count"] == before
