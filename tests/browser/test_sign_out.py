"""
Logging out in one window of a browser ends the live socket of its other windows: they go to the login page
instead of showing the user's tasks or retrying the socket in a loop.
"""

from playwright.sync_api import expect

from tests.browser.conftest import TIMEOUT_MS, USERS

LIVE = "#live[data-connected='true']"


def test_logging_out_in_one_window_sends_the_others_to_the_login_page(browser, hub):
    # A session of its own: the other tests share one per user, and this one ends it.
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    try:
        page = context.new_page()
        page.goto(hub.url("/accounts/login/"))
        page.fill("input[name=username]", "bob")
        page.fill("input[name=password]", USERS["bob"])
        page.click("button[type=submit]")
        page.wait_for_url(hub.url("/"))
        other = context.new_page()
        sockets = []
        other.on("websocket", lambda socket: sockets.append(socket.url))
        other.goto(hub.url("/tasks/"))
        other.wait_for_selector(LIVE, state="attached")
        page.locator("form[action='/accounts/logout/'] input[type=submit]").click()
        page.wait_for_url(hub.url("/accounts/login/"))  # LOGOUT_REDIRECT_URL
        # The other window was told its sign-in ended, found it so, and reloaded into the login page.
        other.wait_for_url(lambda url: "/accounts/login/" in url)
        expect(other.locator("input[name=username]")).to_be_visible()
        opened = len(sockets)
        other.wait_for_timeout(3000)
        assert len(sockets) == opened, sockets  # no socket retried from the login page
    finally:
        context.close()
