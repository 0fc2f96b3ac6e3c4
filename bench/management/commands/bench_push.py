import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from bench.simulators import SimulatorProcesses
from comfyhub.harness import free_port, percentile, stop, wait_until

USERNAME, PASSWORD = "bench", "bench-pass-123"
TERMINAL = ("succeeded", "failed", "cancelled")

# Runs in the page before its own scripts: for every element of a task (its progress part `task-<id>-live`, its
# preview image `task-<id>-preview`, or a whole row `task-<id>`) that the DOM shows with a data-upstream-at it had
# not shown before (swapped in, or the attribute changed), note [kind, now - data-upstream-at in seconds].
RECORDER = """
(() => {
  window.__latencies = [];
  const seen = new Set();
  const note = (el) => {
    if (!(el instanceof Element)) return;
    const rows = el.matches('[id^="task-"][data-upstream-at]') ? [el] : [];
    rows.push(...el.querySelectorAll('[id^="task-"][data-upstream-at]'));
    for (const row of rows) {
      const at = parseFloat(row.getAttribute('data-upstream-at'));
      const key = row.id + ' ' + row.getAttribute('data-upstream-at');
      if (!Number.isFinite(at) || seen.has(key)) continue;
      seen.add(key);
      const kind = row.id.endsWith('-preview') ? 'preview' : row.id.endsWith('-live') ? 'progress' : 'row';
      window.__latencies.push([kind, Date.now() / 1000 - at]);
    }
  };
  const start = () => {
    const list = document.body;
    for (const row of list.querySelectorAll('[id^="task-"][data-upstream-at]')) {
      seen.add(row.id + ' ' + row.getAttribute('data-upstream-at'));
    }
    new MutationObserver((mutations) => {
      for (const m of mutations) {
        if (m.type === 'attributes') note(m.target);
        for (const node of m.addedNodes) note(node);
      }
    }).observe(list, {subtree: true, childList: true, attributes: true, attributeFilter: ['data-upstream-at']});
  };
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
"""

SETUP = """
from django.contrib.auth.models import User
from django.core.management import call_command
for name, url in {servers!r}:
    call_command("add_server", name, url, max_in_flight=1, verbosity=0)
call_command("load_workflow", demo=True, verbosity=0)
User.objects.create_user({username!r}, password={password!r})
"""

WAIT_ONLINE = """
import sys, time
from servers.models import Server
deadline = time.monotonic() + {timeout}
while Server.objects.filter(state="online").count() < {count}:
    if time.monotonic() > deadline:
        sys.exit("only %d of {count} servers came online" % Server.objects.filter(state="online").count())
    time.sleep(0.2)
"""


class Command(BaseCommand):
    help = (
        "Measure live push latency in the browser, on a throw-away hub: starts --servers simulated ComfyUI "
        "servers in processes of their own, a fresh SQLite database and media folder in a temporary directory, and "
        "`manage.py serve` (Daphne with the supervisor inside, in-memory channel layer) as a subprocess; opens "
        "/tasks/ in headless Chromium (Playwright, /usr/bin/chromium or $CHROMIUM) as a fresh user, then submits "
        "--tasks txt2img tasks through the API, each long enough that they all run at once, one per simulator. "
        "A MutationObserver in the page records, for every progress part, preview image or row that carries "
        "data-upstream-at (when the hub received the upstream message behind that push), the time until the browser "
        "showed it. Prints the number of samples, median/p90/p99/max latency in ms, websocket frames received and "
        "frames per second, the largest number of tasks the API reported running at once and how the tasks were "
        "spread over the servers (each server takes one task at a time; the hub's per-user in-flight cap is raised "
        "to at least --tasks). It measures; it "
        "asserts nothing about the figures. Your own database and media folder are not touched."
    )

    def add_arguments(self, parser):
        parser.add_argument("--tasks", type=int, default=20, help="txt2img tasks submitted at once (default 20)")
        parser.add_argument("--servers", type=int, default=20, help="Simulated ComfyUI servers (default 20)")
        parser.add_argument(
            "--steps", type=int, default=100, help="Sampling steps per task (default 100: about 16 s each)"
        )
        parser.add_argument("--time-scale", type=float, default=1.0, help="Simulator node duration factor (default 1)")
        parser.add_argument(
            "--preview-method", default="taesd", help="The simulators' --preview-method (default taesd: full size)"
        )
        parser.add_argument(
            "--keep-log", action="store_true", help="Print the hub's log at the end (for debugging the bench)"
        )

    def handle(self, tasks, servers, steps, time_scale, preview_method, keep_log, **options):
        if tasks < 1 or servers < 1:
            raise CommandError("--tasks and --servers must be at least 1.")
        if not 1 <= steps <= 100:
            raise CommandError("--steps must be between 1 and 100 (the txt2img workflow's limit).")
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            raise CommandError("Playwright is not installed: pip install -e '.[test]'") from None
        with tempfile.TemporaryDirectory(prefix="comfyhub-bench-push-") as tmp:
            self.tmp = Path(tmp)
            self.env = {
                **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")},
                "DATABASE_URL": f"sqlite:///{self.tmp / 'hub.sqlite3'}",
                "MEDIA_ROOT": str(self.tmp / "media"),
                "COMFYHUB_VAR_DIR": str(self.tmp / "var"),  # serve refuses a var folder another hub uses
                # One user submits everything: lift the per-user in-flight cap so that all tasks run at once.
                "COMFYHUB_USER_MAX_IN_FLIGHT": str(max(tasks, 16)),
            }
            simulators, hub, log = None, None, None
            try:
                self.stdout.write(
                    f"starting {servers} simulators in processes of their own (time scale {time_scale}, "
                    f"previews {preview_method})"
                )
                simulators = SimulatorProcesses(
                    servers, time_scale=time_scale, preview_method=preview_method, cwd=settings.BASE_DIR
                )
                self.manage("migrate", "--verbosity", "0")
                pool = [(f"bench-{n}", url) for n, url in enumerate(simulators.urls, 1)]
                self.manage("shell", "-c", SETUP.format(servers=pool, username=USERNAME, password=PASSWORD))
                token = self.manage("create_token", USERNAME).strip()
                port = free_port()
                base = f"http://127.0.0.1:{port}"
                log = open(self.tmp / "serve.log", "w+")  # noqa: SIM115
                hub = subprocess.Popen(  # noqa: S603
                    [sys.executable, "manage.py", "serve", "--port", str(port)],
                    cwd=settings.BASE_DIR,
                    env=self.env,
                    stdout=log,
                    stderr=log,
                )
                wait_until(
                    lambda: listening(base) or hub.poll() is not None, 60, "serve to listen", error=CommandError
                )
                if hub.poll() is not None:
                    raise CommandError(f"serve exited: {(self.tmp / 'serve.log').read_text()}")
                self.manage("shell", "-c", WAIT_ONLINE.format(count=servers, timeout=60))
                self.stdout.write(f"hub on {base} with {servers} servers online")
                with sync_playwright() as playwright:
                    self.measure(playwright, base, token, tasks, steps)
            finally:
                if hub is not None:
                    stop(hub)
                if simulators is not None:
                    simulators.stop()
                if log is not None:
                    log.close()
                    if keep_log:
                        self.stdout.write((self.tmp / "serve.log").read_text(errors="replace"))

    def manage(self, *args):
        done = subprocess.run(  # noqa: S603
            [sys.executable, "manage.py", *args],
            cwd=settings.BASE_DIR,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise CommandError(f"manage.py {args[0]} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def measure(self, playwright, base, token, count, steps):
        executable = os.environ.get("CHROMIUM") or "/usr/bin/chromium"
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.set_default_timeout(30_000)
            context.add_init_script(RECORDER)
            page = context.new_page()
            page.goto(f"{base}/accounts/login/")
            page.fill("input[name=username]", USERNAME)
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(f"{base}/")
            frames = []
            page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: frames.append(len(payload))))
            page.goto(f"{base}/tasks/")
            page.wait_for_selector("#live[data-connected='true']", state="attached")

            api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)
            frames_before = len(frames)
            started = time.monotonic()
            ids = []
            for n in range(count):
                reply = api.post(
                    "/api/v1/tasks",
                    json={"workflow": "txt2img", "inputs": {"prompt": f"bench {n}", "steps": steps, "seed": n}},
                )
                if reply.status_code != 201:
                    raise CommandError(f"submitting failed: {reply.status_code} {reply.text}")
                ids.append(reply.json()["id"])
            submitted = time.monotonic() - started
            max_running, statuses, placed = 0, {}, {}
            deadline = time.monotonic() + 60 + 2 * steps
            while time.monotonic() < deadline:
                listing = api.get("/api/v1/tasks", params={"limit": max(count, 50)}).json()["tasks"]
                mine = [task for task in listing if task["id"] in ids]
                statuses = {task["id"]: task["status"] for task in mine}
                placed = {task["id"]: task["server"] for task in mine if task["server"]}
                max_running = max(max_running, sum(1 for s in statuses.values() if s == "running"))
                if len(statuses) == count and all(s in TERMINAL for s in statuses.values()):
                    break
                page.wait_for_timeout(200)  # lets Playwright deliver the websocket events meanwhile
            else:
                raise CommandError(f"the tasks did not finish in time: {statuses}")
            elapsed = time.monotonic() - started
            page.wait_for_timeout(1000)  # the last pushes
            recorded = page.evaluate("window.__latencies")
        finally:
            browser.close()

        done = sum(1 for s in statuses.values() if s == "succeeded")
        self.stdout.write(
            f"{count} txt2img tasks x {steps} steps: succeeded {done}/{count} in {elapsed:.1f} s "
            f"(submitting took {submitted:.2f} s); at most {max_running} running at once (API)"
        )
        per_server = Counter(placed.values())
        self.stdout.write(
            f"placement: {len(per_server)} servers used, at most {max(per_server.values(), default=0)} tasks on one"
        )
        for kind, what in (("progress", "upstream progress -> progress bar in the DOM"),
                           ("preview", "preview from the server -> image in the DOM"),
                           ("row", "upstream progress -> whole row in the DOM")):
            latencies = sorted(seconds * 1000 for k, seconds in recorded if k == kind)
            if latencies:
                self.stdout.write(
                    f"{what}, {len(latencies)} samples: "
                    f"median {statistics.median(latencies):.1f} ms, p90 {percentile(latencies, 90):.1f} ms, "
                    f"p99 {percentile(latencies, 99):.1f} ms, max {latencies[-1]:.1f} ms"
                    + (f", {len(latencies) / count / elapsed:.2f} a second a task" if kind == "preview" else "")
                )
        if not recorded:
            self.stdout.write("no samples: nothing with data-upstream-at was ever rendered in the page")
        received = frames[frames_before:]
        self.stdout.write(
            f"websocket frames received from the first submission to the last task's end: {len(received)} "
            f"({len(received) / elapsed:.1f} frames/s, {sum(received) / 1024:.0f} KiB, "
            f"mean {statistics.mean(received) if received else 0:.0f} characters a frame)"
        )


def listening(base):
    try:
        return httpx.get(f"{base}/api/v1/tasks", timeout=1).status_code == 401
    except httpx.HTTPError:
        return False
