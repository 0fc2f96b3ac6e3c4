"""
An operator on /ops/ in Chromium against a real `serve --demo`: drains a server and takes it back with the buttons,
without a reload, while the page keeps following the pool over /ws/ops/.
"""

from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import expect


def press(page, button, action):
    """
    Click an action button and wait for its POST. A push that replaces the dashboard at the instant of the click
    takes the button away before its request starts (the new body has the same button): then click it again.
    """
    for _ in range(3):
        try:
            with page.expect_request(lambda r: r.method == "POST" and action in r.url, timeout=5_000):
                button.click()
            return
        except PlaywrightTimeout:
            continue
    raise AssertionError(f"the {action} button never sent its request")


def test_staff_drain_and_undrain_a_server_from_the_dashboard(oscar, hub, screenshots):
    page = oscar.new_page()
    page.set_viewport_size({"width": 1280, "height": 800})
    page.goto(hub.url("/ops/"))
    expect(page.locator(".ops-server[data-state='online']")).to_have_count(2)
    page.evaluate("window.__sameDocument = true")
    sim1 = page.locator(".ops-server", has=page.get_by_role("heading", name="sim-1"))
    sim2 = page.locator(".ops-server", has=page.get_by_role("heading", name="sim-2"))
    expect(sim1).to_contain_text("pipeline depth 2, at most 3 on the server")

    press(page, sim1.get_by_role("button", name="Drain sim-1"), "/drain")
    expect(page.locator("#ops-notes")).to_contain_text("sim-1 is draining: no new work goes to it")
    expect(sim1).to_have_attribute("data-draining", "true")
    expect(sim1).to_contain_text("yes: no new work goes to it")
    expect(sim1.get_by_role("button", name="Undrain sim-1")).to_be_visible()
    expect(sim2).to_have_attribute("data-draining", "false")
    # The server's own probe follows within seconds, and the push shows it: its state becomes draining.
    expect(sim1).to_have_attribute("data-state", "draining")
    page.screenshot(path=screenshots / "ops-1280.png")
    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=screenshots / "ops-390.png")
    page.set_viewport_size({"width": 1280, "height": 800})

    press(page, sim1.get_by_role("button", name="Undrain sim-1"), "/undrain")
    expect(page.locator("#ops-notes")).to_contain_text("sim-1 takes new work again.")
    expect(sim1).to_have_attribute("data-draining", "false")
    expect(sim1.get_by_role("button", name="Drain sim-1")).to_be_visible()
    expect(sim1).to_have_attribute("data-state", "online")

    press(page, page.get_by_role("button", name="Check consistency"), "/check")
    expect(page.locator("#ops-notes")).to_contain_text("Checked 2 servers,")
    expect(page.locator("#ops-notes")).to_contain_text("nothing to repair.")
    assert page.evaluate("window.__sameDocument === true"), "the dashboard reloaded instead of swapping in place"
