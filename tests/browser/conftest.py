"""
The browser tests' harness: one real hub (`manage.py serve --demo`, as a user starts it) for the module,
headless Chromium driven by Playwright, and logged-in browser contexts for alice and bob.

The hub runs on its own SQLite file and media folder in a temporary directory with the in-memory channel layer,
whatever DATABASE_URL/REDIS_URL the rest of the suite runs with.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent.parent
SCREENSHOTS = ROOT / "test-output" / "screenshots"
# Simulator time scale: a 20-step txt2img takes about 4 s, long enough to watch a progress bar move.
TIME_SCALE = "1"
TIMEOUT_MS = 30_000
USERS = {"alice": "alice-pass-123", "bob": "bob-pass-123"}
STAFF = {"oscar": "oscar-pass-123"}  # staff, not a superuser: what an on-call operator has
ACTIVE = ("queued", "submitted", "running")
TERMINAL = ("succeeded", "failed", "cancelled")
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"

# Installed in every page before its scripts run: after each DOM mutation, note every task row whose status or
# progress changed (`live` is false for what the page was loaded with). A reload starts a fresh record, which
# is why the tests also plant a marker in `window` and check it is still there (no reload happened).
RECORDER = """
(() => {
  window.__rows = {};
  const snap = (live) => {
    document.querySelectorAll('[id^="task-"][data-status]').forEach((row) => {
      const bar = row.querySelector('progress');
      const value = bar ? bar.getAttribute('value') : null;
      const status = row.getAttribute('data-status');
      const list = (window.__rows[row.id] ||= []);
      const last = list[list.length - 1];
      if (!last || last.value !== value || last.status !== status) {
        list.push({value, status, live, aria: bar ? bar.getAttribute('aria-valuenow') : null,
                   title: document.title});
      }
    });
  };
  const start = () => {
    snap(false);
    new MutationObserver(() => snap(true)).observe(document.documentElement,
      {subtree: true, childList: true, attributes: true, characterData: true});
  };
  if (document.readyState === 'loading') {
    document.addEventListener('DOMContentLoaded', start);
  } else {
    start();
  }
})();
"""


SETUP = """
import io
from django.contrib.auth.models import User
from django.core.management import call_command
call_command("migrate", verbosity=0)
for name, password in {users!r}.items():
    User.objects.create_user(name, password=password)
    out = io.StringIO()
    call_command("create_token", name, stdout=out)
    print("token", name, out.getvalue().strip())
for name, password in {staff!r}.items():
    User.objects.create_user(name, password=password, is_staff=True)
"""


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(process):
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def chromium_executable():
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


class Hub:
    """The running hub: its base URL, the environment its commands need, API clients per user."""

    def __init__(self, base, env, log_path, process):
        self.base = base
        self.env = env
        self.log_path = log_path
        self.process = process
        self.tokens = {}
        self.sessions = {}  # username -> Playwright storage state of a logged-in browser
        self.apis = {}

    def url(self, path):
        return self.base + path

    def manage(self, *args):
        done = subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def api(self, username):
        if username not in self.apis:
            self.apis[username] = Api(self.base, self.tokens[username])
        return self.apis[username]

    def log(self):
        return self.log_path.read_text(errors="replace")


class Api:
    def __init__(self, base, token):
        self.client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=15)

    def submit(self, workflow, inputs):
        reply = self.client.post("/api/v1/tasks", json={"workflow": workflow, "inputs": inputs})
        assert reply.status_code == 201, reply.text
        return reply.json()["id"]

    def task(self, task_id):
        reply = self.client.get(f"/api/v1/tasks/{task_id}")
        assert reply.status_code == 200, reply.text
        return reply.json()

    def wait(self, task_id, statuses=TERMINAL, timeout=60):
        def reached():
            body = self.task(task_id)
            return body if body["status"] in statuses else None

        return wait_for(reached, timeout=timeout, interval=0.1, message=f"task {task_id} to be {'/'.join(statuses)}")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE")},
        "DATABASE_URL": f"sqlite:///{tmp / 'hub.sqlite3'}",
        "MEDIA_ROOT": str(tmp / "media"),
        # Its own var folder: `serve` refuses to share one, and the checkout's may be in use by your own hub.
        "COMFYHUB_VAR_DIR": str(tmp / "var"),
    }
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp / "serve.log"
    running = Hub(base, env, log_path, None)
    # migrate, then the users and their API tokens (create_token), in one process to save start-up time.
    printed = running.manage("shell", "-c", SETUP.format(users=USERS, staff=STAFF))
    running.tokens = dict(line.split()[1:] for line in printed.splitlines() if line.startswith("token "))
    assert set(running.tokens) == set(USERS), printed
    log = open(log_path, "w+")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--demo", "--port", str(port), "--time-scale", TIME_SCALE],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=log,
    )
    running.process = process
    try:

        def up():
            if process.poll() is not None:
                return True
            try:
                return httpx.get(f"{base}/accounts/login/", timeout=1).status_code < 500
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=60, interval=0.1, message="serve to listen")
        assert process.poll() is None, running.log()
        yield running
    finally:
        for api in running.apis.values():
            api.client.close()
        stop(process)
        log.close()


@pytest.fixture(scope="module")
def playwright_instance():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        yield playwright


@pytest.fixture(scope="module")
def browser(playwright_instance):
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    executable = chromium_executable()
    assert Path(executable).exists(), f"no Chromium at {executable} (install the Debian package `chromium`)"
    browser = playwright_instance.chromium.launch(executable_path=executable, headless=True)
    yield browser
    browser.close()


def log_in(browser, hub, username):
    """Log in through the login form, once per user and session: later contexts reuse the session cookie."""
    if username not in hub.sessions:
        context = browser.new_context()
        page = context.new_page()
        page.goto(hub.url("/accounts/login/"))
        page.fill("input[name=username]", username)
        page.fill("input[name=password]", {**USERS, **STAFF}[username])
        page.click("button[type=submit]")
        page.wait_for_url(hub.url("/"))
        hub.sessions[username] = context.storage_state()
        context.close()
    return hub.sessions[username]


def new_context(browser, hub, username):
    """A logged-in browser context that notes what a user would see as breakage: script errors in its pages and
    sub-resources (stylesheets, scripts, images, fetches) answered with an error status."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, storage_state=log_in(browser, hub, username))
    context.set_default_timeout(TIMEOUT_MS)
    context.add_init_script(RECORDER)
    context.broken = []

    def on_response(response):
        # 422 is a form answered with its errors (htmx swaps it in beside the fields), not breakage.
        if response.status >= 400 and response.status != 422 and response.request.resource_type != "document":
            context.broken.append(f"{response.status} {response.request.resource_type} {response.url}")

    context.on("response", on_response)
    context.on("page", lambda page: page.on("pageerror", lambda exc: context.broken.append(f"script error: {exc}")))
    return context


@contextmanager
def browsing(browser, hub, username):
    context = new_context(browser, hub, username)
    try:
        yield context
        assert not context.broken, context.broken
    finally:
        context.close()


@pytest.fixture
def alice(browser, hub):
    with browsing(browser, hub, "alice") as context:
        yield context


@pytest.fixture
def bob(browser, hub):
    with browsing(browser, hub, "bob") as context:
        yield context


@pytest.fixture
def oscar(browser, hub):
    """A logged-in staff member's browser."""
    with browsing(browser, hub, "oscar") as context:
        yield context


@pytest.fixture
def alice_api(hub):
    return hub.api("alice")


@pytest.fixture
def bob_api(hub):
    return hub.api("bob")


@pytest.fixture(scope="module")
def screenshots():
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


def task_id_from_url(url):
    match = re.search(rf"/tasks/({UUID})/$", url)
    assert match, f"not a task detail URL: {url}"
    return match.group(1)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed browser test shows the end of the hub's log beside the failure."""
    report = yield
    hub = getattr(item, "funcargs", {}).get("hub")
    if report.failed and isinstance(hub, Hub):
        report.sections.append(("hub log (last 80 lines)", "\n".join(hub.log().splitlines()[-80:])))
    return report
