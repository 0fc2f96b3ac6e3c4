"""
The pages around the tasks, in Chromium against a real `serve --demo` (see conftest.py): no page logs an error to
the console while a task pushes its updates to every window; a window whose live socket is down says so in
words until it is back, and logs nothing of its own meanwhile; the account page makes, shows once and revokes an
API token.
"""

import re

import httpx
from playwright.sync_api import expect

from tests.browser.conftest import TIMEOUT_MS

LIVE = "#live[data-connected='true']"
SECRET = re.compile(r"^ch_[A-Za-z0-9_-]{20,}$")


def watch(page):
    """What a developer would see in the page's console as breakage: console errors and uncaught script errors."""
    problems = []

    def on_console(message):
        if message.type == "error":
            problems.append(f"console error: {message.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: problems.append(f"script error: {exc}"))
    return problems


def frames_of(page):
    """Every text frame the page's live socket receives."""
    frames = []
    page.on("websocket", lambda socket: socket.on("framereceived", lambda payload: frames.append(payload)))
    return frames


def wait_until(page, predicate, message, timeout_ms=TIMEOUT_MS):
    """Poll `predicate` while the page's events are delivered (a sync Playwright page only hears them in a call)."""
    for _ in range(timeout_ms // 100):
        if predicate():
            return
        page.wait_for_timeout(100)
    raise AssertionError(f"timed out waiting for {message}")


def test_no_page_logs_an_error_while_a_task_pushes_updates(alice, hub, alice_api):
    finished = alice_api.submit("txt2img", {"prompt": "a finished one, for its page", "steps": 4})
    alice_api.wait(finished)
    paths = ["/", "/workflows/txt2img/", "/tasks/", "/tasks/?status=succeeded", "/gallery/", f"/tasks/{finished}/",
             "/account/"]  # fmt: skip
    windows = []
    for path in paths:
        page = alice.new_page()
        problems, frames = watch(page), frames_of(page)
        page.goto(hub.url(path))
        page.wait_for_selector(LIVE, state="attached")
        windows.append((path, page, problems, frames))

    running = alice_api.submit("txt2img", {"prompt": "pushed to every window", "steps": 20})
    alice_api.wait(running)
    for path, page, _, frames in windows:
        # Every window got the task's pushes, including the finished row, whether or not it shows that row.
        wait_until(
            page,
            lambda frames=frames: any(f'id="task-{running}"' in f and 'data-status="succeeded"' in f for f in frames),
            f"the finished row pushed to {path}",
        )
        assert any(f"task-{running}-live" in frame for frame in frames), path  # progress ticks too
    list_page = windows[2][1]
    expect(list_page.locator(f"#task-{running}")).to_have_attribute("data-status", "succeeded")
    for path, page, problems, _ in windows:
        page.wait_for_timeout(200)  # the last frame's swap, and anything it logs
        assert problems == [], f"{path}: {problems}"


def test_a_frame_with_a_new_row_and_its_progress_draws_both_and_a_page_without_them_logs_nothing(alice, hub):
    # The hub sends a new task's row and the facts after it in one frame when they come together: the progress
    # targets the row the same frame inserts. A page without a task list has no place for either.
    task = "00000000-0000-4000-8000-000000000000"
    frame = (
        f'<div hx-swap-oob="afterbegin:#task-list"><article class="task task--running" id="task-{task}" '
        f'data-status="running"><div class="task__live" id="task-{task}-live"><progress max="100" value="0">'
        f'</progress></div></article></div>'
        f'<div class="task__live" id="task-{task}-live" hx-swap-oob="true"><progress max="100" value="42">'
        f"</progress></div>"
    )
    for path, drawn in (("/tasks/", 1), ("/gallery/", 0)):
        page = alice.new_page()
        problems = watch(page)
        sockets = []

        def route(socket, sockets=sockets):
            socket.connect_to_server()
            sockets.append(socket)

        page.route_web_socket(re.compile(r"/ws/tasks/$"), route)
        page.goto(hub.url(path))
        page.wait_for_selector(LIVE, state="attached")
        page.wait_for_load_state("networkidle")  # the page's catch-up read after the socket opened
        sockets[-1].send(frame)
        progress = page.locator(f"#task-{task}-live progress")
        if drawn:
            expect(progress).to_have_attribute("value", "42")
        page.wait_for_timeout(300)
        expect(progress).to_have_count(drawn)
        assert problems == [], f"{path}: {problems}"
        page.close()


def test_a_window_whose_live_socket_is_down_says_so_until_it_is_back(alice, hub):
    page = alice.new_page()
    problems = watch(page)
    hub_down = False
    connected = []  # (page side, hub side) of each socket that reached the hub

    def route(socket):
        if hub_down:
            socket.close(code=1013, reason="try again later")  # as a hub that is restarting answers
            return
        connected.append((socket, socket.connect_to_server()))

    page.route_web_socket(re.compile(r"/ws/tasks/$"), route)
    page.goto(hub.url("/tasks/"))
    page.wait_for_selector(LIVE, state="attached")
    note = page.locator("#live-note")
    expect(note).to_be_hidden()

    hub_down = True
    browser_side, hub_side = connected[-1]
    browser_side.close(code=1012, reason="service restart")
    hub_side.close()
    expect(note).to_be_visible()
    expect(note).to_have_text("Live updates paused — reconnecting…")
    expect(page.locator("#live")).to_have_attribute("data-connected", "false")
    page.wait_for_timeout(1500)  # htmx retries meanwhile, and is refused
    expect(note).to_be_visible()

    hub_down = False
    wait_until(page, lambda: len(connected) == 2, "the socket to reconnect")
    expect(page.locator(LIVE)).to_be_attached()
    expect(note).to_be_hidden()
    assert problems == [], problems


def test_an_unreachable_hub_logs_no_event_objects(alice, hub):
    page = alice.new_page()
    logged = []
    page.on("console", lambda message: logged.append((message.type, message.text)))
    page.goto(hub.url("/tasks/"))
    page.wait_for_selector(LIVE, state="attached")
    note = page.locator("#live-note")

    # Offline, an open socket stays open: open a new one as htmx does after a drop (its wrapper's reconnect, which
    # htmx keeps on the element), and it fails at once as it would against a hub that is down.
    alice.set_offline(True)
    try:
        page.evaluate("document.body['htmx-internal-data'].webSocket.publicInterface.reconnect()")
        expect(note).to_be_visible()
        page.wait_for_timeout(1000)  # a retry or two, refused the same way
    finally:
        alice.set_offline(False)
    expect(page.locator(LIVE)).to_be_attached()  # htmx's next retry, after its growing random delay
    expect(note).to_be_hidden()

    errors = [text for kind, text in logged if kind == "error"]
    assert any(text.startswith("WebSocket connection to") for text in errors), logged  # it did fail
    # Chromium's own lines about the failed connections stay; the page's scripts add nothing, least of all an
    # error Event logged as "[object Event]".
    ours = [text for text in errors if not text.startswith(("WebSocket connection to", "Failed to load resource"))]
    assert ours == [], logged


def test_an_api_token_from_the_account_page(alice, hub, screenshots):
    page = alice.new_page()
    problems = watch(page)
    page.goto(hub.url("/"))
    page.locator(".who a", has_text="alice").click()
    page.wait_for_url(hub.url("/account/"))
    page.fill("input[name=name]", "render farm script")
    page.click("form.token-form button[type=submit]")

    secret_box = page.locator("#new-token")
    expect(secret_box).to_be_visible()
    expect(secret_box).to_be_focused()  # selected, ready to copy
    secret = secret_box.input_value()
    assert SECRET.match(secret), secret
    expect(page.locator("#new-token-card")).to_contain_text("shown this once")
    row = page.locator("table.tokens tbody tr", has_text="render farm script")
    expect(row).to_contain_text(secret[:10] + "…")
    page.screenshot(path=str(screenshots / "account-1280.png"), full_page=True)
    api = httpx.Client(base_url=hub.base, headers={"Authorization": f"Bearer {secret}"}, timeout=15)
    try:
        assert api.get("/api/v1/tasks").status_code == 200

        page.goto(hub.url("/account/"))
        assert secret not in page.content()  # shown once: never again
        expect(row.locator("td").nth(3)).to_have_text(re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d$"))  # last used
        row.get_by_role("button", name="Revoke").click()
        page.wait_for_url(hub.url("/account/"))
        expect(page.locator(".messages")).to_contain_text("render farm script")
        expect(page.locator("table.tokens tbody tr", has_text="render farm script")).to_have_count(0)
        assert api.get("/api/v1/tasks").status_code == 401
    finally:
        api.close()
    assert problems == [], problems
