"""
The pool dashboard in headless Chromium against a real `serve --demo` (the harness of tests/browser): it opens one
/ws/ops/ socket and follows a task from start to end without reloading.
"""

from playwright.sync_api import expect

from tests.browser.conftest import (  # noqa: F401  (fixtures)
    TIMEOUT_MS,
    browser,
    hub,
    playwright_instance,
    screenshots,
)

STAFF, PASSWORD = "olga", "olga-pass-123"
CREATE_STAFF = (
    "from django.contrib.auth.models import User; "
    f"User.objects.create_user({STAFF!r}, password={PASSWORD!r}, is_staff=True)"
)


def test_the_dashboard_follows_the_pool_live_on_one_socket(browser, hub, screenshots):  # noqa: F811
    hub.manage("shell", "-c", CREATE_STAFF)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    try:
        page = context.new_page()
        errors, sockets = [], []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("websocket", lambda socket: sockets.append(socket.url))
        page.goto(hub.url("/accounts/login/"))
        page.fill("input[name=username]", STAFF)
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(hub.url("/"))
        page.click("nav >> text=Ops")
        page.wait_for_url(hub.url("/ops/"))
        expect(page.locator(".ops-server[data-state='online']")).to_have_count(2)
        page.evaluate("window.__sameDocument = true")

        api = hub.api("alice")
        task_id = api.submit("txt2img", {"prompt": "a lighthouse at dusk", "steps": 20})
        current = page.locator(f"a[href='/admin/tasks/task/{task_id}/change/']")
        expect(current).to_be_visible()
        page.screenshot(path=screenshots / "ops-dashboard.png", full_page=True)
        api.wait(task_id)
        expect(current).to_have_count(0)
        expect(page.locator(".ops-total", has_text="succeeded")).to_contain_text("1")

        assert page.evaluate("window.__sameDocument === true"), "the dashboard reloaded instead of updating"
        assert [url for url in sockets if url.endswith("/ws/ops/")] == [hub.url("/ws/ops/").replace("http", "ws")]
        assert not errors, errors
    finally:
        context.close()
