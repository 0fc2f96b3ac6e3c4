import asyncio
import gc
import json
import os
import secrets
import time
from pathlib import Path

import httpx
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connection

from bench import live_load
from bench.hubs import GC_PAUSES, TreeCommands, create_database, drop_database, read_shim_file, rss, source_trees
from bench.live_report import report, table
from bench.simulators import SimulatorProcesses
from comfyhub.harness import free_port, healthy, stop, wait_until

ROOT = Path(settings.BASE_DIR)
TERMINAL = ("succeeded", "failed", "cancelled")

SETUP = """
import json
from django.contrib.auth import get_user_model
from django.contrib.sessions.backends.db import SessionStore
from django.core.management import call_command
from tasks.models import ApiToken
for name, url in {servers!r}:
    call_command("add_server", name, url, max_in_flight=1, verbosity=0)
call_command("load_workflow", demo=True, verbosity=0)
users = []
for n in range({users}):
    user = get_user_model().objects.create_user(f"load{{n}}")
    session = SessionStore()
    session.update({{"_auth_user_id": str(user.pk), "_auth_user_hash": user.get_session_auth_hash(),
                    "_auth_user_backend": "django.contrib.auth.backends.ModelBackend"}})
    session.create()
    users.append([session.session_key, ApiToken.issue(user)[1]])
print(json.dumps(users))
"""

WAIT_ONLINE = """
import sys, time
from servers.models import Server
deadline = time.monotonic() + 60
while Server.objects.filter(state="online").count() < {count}:
    if time.monotonic() > deadline:
        sys.exit("only %d of {count} servers came online" % Server.objects.filter(state="online").count())
    time.sleep(0.2)
"""

STATS = """
import json
from tasks.models import Task
def at(value):
    return value.timestamp() if value else None
print(json.dumps([[at(t.created_at), at(t.accepted_at), at(t.started_at), at(t.finished_at), t.status]
                  for t in Task.objects.all()]))
"""

# The loop lag of a process that has no /metrics of its own (run_upstream, or Daphne of another checkout, which
# has no monitor): started on the first loop run in its main thread, written to BENCH_LOOPLAG_FILE-<command>
# twice a second. Loaded from this checkout's comfyhub/looplag.py by path.
SHIM = """
import asyncio, importlib.util, os, sys, threading, time
_spec = importlib.util.spec_from_file_location("bench_looplag", os.environ["BENCH_LOOPLAG_MODULE"])
_lag = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_lag)
_run_forever = asyncio.BaseEventLoop.run_forever

_where = os.environ["BENCH_LOOPLAG_FILE"] + "-" + (sys.argv[1] if sys.argv[1:2] else "")

def _watching(self):
    if threading.current_thread() is threading.main_thread():
        asyncio.BaseEventLoop.run_forever = _run_forever
        _lag.watch(self)
        from prometheus_client import generate_latest

        def dump():
            while True:
                time.sleep(0.5)
                with open(_where + ".tmp", "wb") as out:
                    out.write(generate_latest(_lag.REGISTRY))
                os.replace(_where + ".tmp", _where)

        threading.Thread(target=dump, daemon=True).start()
    return _run_forever(self)

if sys.argv[1:2] and sys.argv[1] in os.environ["BENCH_LOOPLAG_FOR"].split(","):
    asyncio.BaseEventLoop.run_forever = _watching
"""


# Layer "core+specific": channels_redis' core layer reads all of a process's own channels through one BZPOPMIN
# behind one lock, on the list of the channel name's prefix: a channel made with another prefix than the
# consumers' "specific" (UserFeed's "feed") waits behind their reads and never receives. This gives every
# channel the "specific" prefix (and the feed's capacity), to measure what core would do once that is fixed.
CORE_SPECIFIC = """
import fnmatch, os, re
if os.environ.get("BENCH_CORE_SPECIFIC"):
    import channels_redis.core as _core
    _new_channel = _core.RedisChannelLayer.new_channel

    async def _specific_channel(self, prefix="specific"):
        if not getattr(self, "_bench_capacity", False):
            self._bench_capacity = True
            self.channel_capacity.insert(0, (re.compile(fnmatch.translate("specific*")), 10_000))
        return await _new_channel(self, "specific")

    _core.RedisChannelLayer.new_channel = _specific_channel
"""

# --clean-expired-every: the in-memory layer scans every channel and group membership for expired entries on each
# send, group_send and receive; this runs that scan at most once in the given seconds, to measure what it costs.
CLEAN_EXPIRED = """
import os, time
if os.environ.get("BENCH_CLEAN_EVERY"):
    import channels.layers as _layers
    _clean, _every = _layers.InMemoryChannelLayer._clean_expired, float(os.environ["BENCH_CLEAN_EVERY"])

    def _clean_now_and_then(self):
        if time.monotonic() - getattr(self, "_bench_cleaned", 0.0) >= _every:
            self._bench_cleaned = time.monotonic()
            _clean(self)

    _layers.InMemoryChannelLayer._clean_expired = _clean_now_and_then
"""

# --profile: cProfile over the hub processes' main thread (Daphne's event loop), written when they exit.
PROFILE = """
import atexit, cProfile, os, sys
if os.environ.get("BENCH_PROFILE") and sys.argv[1:2] and sys.argv[1] in ("serve", "run_upstream"):
    _profile = cProfile.Profile()
    _profile.enable()
    _where = os.path.join(os.environ["BENCH_PROFILE"], sys.argv[1] + ".prof")
    atexit.register(lambda: (_profile.disable(), _profile.dump_stats(_where)))
"""


class Command(TreeCommands, BaseCommand):
    help = (
        "The live path under load, on throw-away hubs: --tasks txt2img tasks running at once on as many simulated "
        "servers (one task each, in processes of their own) while --users x --sockets-per-user browser sockets "
        "are open (this process is the load client). Prints upstream progress -> websocket frame latency, preview "
        "-> frame latency and previews per second per task, frame sizes by kind, Daphne's event-loop lag (from "
        "/metrics), the hub's memory and the per-task counts behind them (facts and frames, and on PostgreSQL "
        "task-row updates and commits, on Redis its commands). PostgreSQL + Redis when DATABASE_URL and REDIS_URL "
        "say so (then each of --layers), else SQLite + the in-memory layer; --old-checkout runs the same load "
        "against a hub from another source tree right after, and prints both side by side."
    )

    def add_arguments(self, parser):
        parser.add_argument("--users", type=int, default=100)
        parser.add_argument("--sockets-per-user", type=int, default=10)
        parser.add_argument("--tasks", type=int, default=20, help="Tasks running at once, one per simulator")
        parser.add_argument("--steps", type=int, default=100, help="Sampling steps a task (0.15 s each)")
        parser.add_argument("--preview-method", default="taesd", help="The simulators' --preview-method")
        parser.add_argument("--sim-processes", type=int, default=2, help="Processes the simulators run in")
        parser.add_argument(
            "--layers", default="core,core+specific,pubsub",
            help="COMFYHUB_REDIS_LAYER values to run, on Redis (core+specific: core with one channel prefix)",
        )
        parser.add_argument("--old-checkout", help="Source tree of the old hub (git worktree add PATH COMMIT)")
        parser.add_argument(
            "--clean-expired-every", type=float, default=None,
            help="Also run the new hub with the in-memory layer's expiry scan at most once in this many seconds",
        )
        parser.add_argument("--profile", action="store_true", help="Profile the hub's processes (cProfile), print")
        parser.add_argument("--quick", action="store_true", help="10 users x 2 sockets, 4 tasks of 40 steps")

    def handle(self, **options):
        if options["quick"]:
            options.update(users=10, sockets_per_user=2, tasks=4, steps=40)
        if options["users"] < 1 or options["tasks"] < 1:
            raise CommandError("--users and --tasks must be at least 1.")
        self.options = options
        postgres = connection.vendor == "postgresql" and bool(settings.REDIS_URL)
        trees = source_trees(ROOT, options["old_checkout"])
        variants = []
        for label, tree in trees:
            layers = options["layers"].split(",") if postgres and label == "new" else [None]
            variants += [(f"{label}, {layer} layer" if layer else label, tree, layer) for layer in layers]
            if label == "new" and not postgres and options["clean_expired_every"]:
                variants.append((f"new, scan every {options['clean_expired_every']:g} s", tree, "clean"))
        layout = "PostgreSQL + Redis" if postgres else "SQLite + in-memory layer"
        self.stdout.write(
            f"{layout}: {options['tasks']} tasks x {options['steps']} steps on {options['tasks']} simulators "
            f"(previews: {options['preview_method']}), {options['users']} users x {options['sockets_per_user']} "
            f"sockets; {', '.join(v[0] for v in variants)}"
        )
        variants = [(label, tree, layer, postgres) for label, tree, layer in variants]
        self.run_all(variants, "comfyhub-bench-sockets-", report, table)

    # --- one hub, one load ------------------------------------------------------------------------------------

    def run_variant(self, scratch, n, tree, layer, postgres):
        scratch.mkdir(parents=True)
        self.tree, self.processes = tree, []
        env = {**os.environ, "MEDIA_ROOT": str(scratch / "media"), "COMFYHUB_VAR_DIR": str(scratch / "var"),
               "LOG_LEVEL": "WARNING",
               "COMFYHUB_TASK_LOG_LEVEL": "WARNING", "COMFYHUB_USER_MAX_QUEUED": "100000",
               "COMFYHUB_METRICS_TOKEN": secrets.token_urlsafe(32), "PYTHONPATH": str(tree)}
        env.pop("COMFYHUB_EMBEDDED_SUPERVISOR", None)
        db_url = None
        if postgres:
            db_url = create_database(f"bench_{os.getpid()}_{n}")
            env.update(DATABASE_URL=db_url, REDIS_URL=settings.REDIS_URL, REDIS_PREFIX=f"bench{os.getpid()}v{n}")
            if layer:
                env["COMFYHUB_REDIS_LAYER"] = layer
        else:
            env.pop("REDIS_URL", None)
            env["DATABASE_URL"] = f"sqlite:///{scratch / 'hub.sqlite3'}"
        shim, watched = "", []
        if layer == "core+specific":
            env.update(COMFYHUB_REDIS_LAYER="core", BENCH_CORE_SPECIFIC="1")
            shim += CORE_SPECIFIC
        has_monitor = (tree / "comfyhub" / "looplag.py").exists()
        watched = ([] if has_monitor else ["serve"]) + (["run_upstream"] if postgres else [])
        if watched:
            shim += SHIM
            env.update(BENCH_LOOPLAG_FILE=str(scratch / "looplag"), BENCH_LOOPLAG_FOR=",".join(watched),
                       BENCH_LOOPLAG_MODULE=str(ROOT / "comfyhub" / "looplag.py"))
        if layer == "clean":
            env["BENCH_CLEAN_EVERY"] = str(self.options["clean_expired_every"])
            shim += CLEAN_EXPIRED
        shim += GC_PAUSES
        env["BENCH_GC_FILE"] = str(scratch / "gc")
        if self.options["profile"]:
            shim += PROFILE
            env["BENCH_PROFILE"] = str(scratch)
        if shim:
            (scratch / "shim").mkdir()
            (scratch / "shim" / "sitecustomize.py").write_text(shim)
            env["PYTHONPATH"] = f"{tree}{os.pathsep}{scratch / 'shim'}"
        self.env, self.scratch = env, scratch
        opts = self.options
        sims = SimulatorProcesses(opts["tasks"], opts["sim_processes"], preview_method=opts["preview_method"],
                                  cwd=ROOT)
        try:
            self.manage("migrate", "--verbosity", "0")
            servers = [(f"gpu-{k}", url) for k, url in enumerate(sims.urls)]
            users = json.loads(self.manage("shell", "-c", SETUP.format(servers=servers, users=opts["users"]))
                               .strip().splitlines()[-1])
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            if postgres:
                hub = self.start("serve", "--port", str(port), "--no-supervisor")
                self.start("run_upstream", "--tick", "0.2")
            else:
                hub = self.start("serve", "--port", str(port))
            wait_until(lambda: healthy(base), 60, "the hub to start", error=CommandError)
            self.manage("shell", "-c", WAIT_ONLINE.format(count=len(servers)))

            def from_file(command):
                path = scratch / f"looplag-{command}"
                return live_load.lag_buckets(read_shim_file(path))

            def lag():
                if has_monitor:
                    bearer = {"Authorization": f"Bearer {env['COMFYHUB_METRICS_TOKEN']}"}
                    reply = httpx.get(f"{base}/metrics", headers=bearer)
                    reply.raise_for_status()
                    daphne = live_load.lag_buckets(reply.text)
                else:
                    daphne = from_file("serve")
                gc_text = {command: (scratch / f"gc-{command}") for command in ("serve", "run_upstream")}
                return {"daphne": daphne, "upstream": from_file("run_upstream") if postgres else None,
                        "gc": {command: live_load.gc_pauses(read_shim_file(path))
                               for command, path in gc_text.items()}}

            figures = {"rss_rest": rss(hub.pid)}
            counts = lambda: {  # noqa: E731
                "pg": live_load.postgres_counts(db_url) if db_url else None,
                "redis": live_load.redis_counts(settings.REDIS_URL) if postgres else None,
            }
            figures.update(asyncio.run(self.load(port, users, lag, counts, hub)))
            for process in self.processes:
                stop(process)
            figures["after"] = counts()  # the hub's processes have exited: PostgreSQL has their statistics
            figures["tasks"] = json.loads(self.manage("shell", "-c", STATS).strip().splitlines()[-1])
            figures["sockets"] = opts["users"] * opts["sockets_per_user"]
            figures["postgres"] = postgres
            for profile in sorted(scratch.glob("*.prof")):
                self.print_profile(profile)
            if not figures["recorder"].latencies:
                for log in sorted(scratch.glob("*.log")):  # something is wrong: show what the hub said
                    self.stderr.write(f"{log.name}:\n{log.read_text(errors='replace')[-3000:]}")
            return figures
        finally:
            for process in self.processes:
                stop(process)
            sims.stop()
            if db_url:
                drop_database(db_url)

    async def load(self, port, users, lag, counts, hub):
        opts = self.options
        recorder = live_load.Recorder()
        listeners = await live_load.open_sockets(port, [s for s, _t in users], opts["sockets_per_user"], recorder)
        opening = time.monotonic()
        while len(recorder.opened) < len(listeners) and time.monotonic() < opening + 120:
            await asyncio.sleep(0.2)
        open_time = (max(recorder.opened) - opening) if recorder.opened else float("nan")
        await asyncio.sleep(1)
        # This process stands for a thousand browsers, each with a heap of its own: a pause of its collector,
        # walking the objects of all their sockets at once, is not the hub's, and is kept out of the run.
        gc.collect()
        gc.freeze()
        gc.disable()
        before, lag_before = counts(), lag()
        probe = live_load.LoopLagProbe()
        recorder.ready_at = time.time()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            ids = []
            for n in range(opts["tasks"]):
                token = users[n % len(users)][1]
                reply = await client.post(
                    "/api/v1/tasks", headers={"Authorization": f"Bearer {token}"},
                    json={"workflow": "txt2img", "inputs": {"prompt": f"load {n}", "steps": opts["steps"], "seed": n}},
                )
                reply.raise_for_status()
                ids.append((reply.json()["id"], token))
            deadline = time.monotonic() + 120 + opts["steps"] * 0.5
            for task_id, token in ids:
                while time.monotonic() < deadline:
                    body = (await client.get(f"/api/v1/tasks/{task_id}",
                                             headers={"Authorization": f"Bearer {token}"})).json()
                    if body["status"] in TERMINAL:
                        break
                    await asyncio.sleep(0.5)
        await asyncio.sleep(1)  # the last pushes
        gc.enable()
        gc.unfreeze()
        lag_after, client_lag = lag(), probe.stop()
        socket_rss = rss(hub.pid)
        for listener in listeners:
            listener.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
        upstream = lag_after["upstream"] and live_load.lag_delta(lag_before["upstream"], lag_after["upstream"])
        gc_pauses = {command: live_load.gc_delta(lag_before["gc"][command], pauses)
                     for command, pauses in lag_after["gc"].items() if pauses}
        return {"recorder": recorder, "opened": len(recorder.opened), "open_time": open_time, "before": before,
                "gc": gc_pauses,
                "lag": live_load.lag_delta(lag_before["daphne"], lag_after["daphne"]), "upstream_lag": upstream,
                "client_lag": client_lag, "rss_sockets": socket_rss}

    def print_profile(self, path):
        import io
        import pstats

        out = io.StringIO()
        stats = pstats.Stats(str(path), stream=out)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(40)
        self.stdout.write(f"profile of {path.stem} (main thread):\n{out.getvalue()}")
