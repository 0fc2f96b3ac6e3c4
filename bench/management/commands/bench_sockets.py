import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connection
from websockets.asyncio.client import connect

from comfyhub.harness import database_url, free_port, healthy, percentile, start_manage, stop, wait_until
from comfysim import SimulatorThread

ROOT = Path(settings.BASE_DIR)
INPUTS = {"prompt": "load", "steps": 40, "width": 64, "height": 64}  # about 1 s on a simulator at scale 0.5
UPSTREAM_AT = re.compile(r'id="task-([0-9a-f-]+)"[^>]*data-upstream-at="([0-9.]+)"')

SETUP = """
import json
from django.contrib.auth import get_user_model
from django.contrib.sessions.backends.db import SessionStore
from django.core.management import call_command
from tasks.models import ApiToken
for name, url in {servers!r}:
    call_command("add_server", name, url, verbosity=0)
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

STATS = """
import json, statistics
from tasks.models import Task
rows = list(Task.objects.filter(accepted_at__isnull=False).values_list("created_at", "accepted_at", "finished_at"))
waits = sorted((a - c).total_seconds() * 1000 for c, a, f in rows)
ends = [f for c, a, f in rows if f]
print(json.dumps({"accepted": waits, "first": min(c for c, a, f in rows).timestamp(),
                  "last": max(ends).timestamp() if ends else None, "done": len(ends)}))
"""

QUEUE_MANY = """
from django.contrib.auth import get_user_model
from servers.models import Server
from tasks.models import Task, Workflow
Server.objects.update(enabled=False)
workflow = Workflow.objects.get(slug="txt2img")
owners = list(get_user_model().objects.all()[:100])
Task.objects.bulk_create(
    [Task(owner=owners[n % len(owners)], workflow=workflow, graph=workflow.graph) for n in range({count})],
    batch_size=1000,
)
"""


class Command(BaseCommand):
    help = (
        "Load figures on a throw-away hub (Daphne and the supervisor as in production for the configured "
        "database): hub throughput and submit-to-queue latency with 8 simulators, upstream progress to browser "
        "websocket frame latency with 1,000 sockets across 100 users, and hub memory with 10,000 queued tasks. "
        "Uses PostgreSQL + Redis when DATABASE_URL and REDIS_URL say so, else SQLite + the in-memory layer."
    )

    def add_arguments(self, parser):
        parser.add_argument("--simulators", type=int, default=8)
        parser.add_argument("--users", type=int, default=100)
        parser.add_argument("--sockets-per-user", type=int, default=10)
        parser.add_argument("--tasks", type=int, default=200, help="Tasks for the throughput and latency run")
        parser.add_argument("--queued", type=int, default=10_000, help="Queued tasks for the memory figure")

    def handle(self, simulators, users, sockets_per_user, tasks, queued, **options):
        self.processes = []
        postgres = connection.vendor == "postgresql" and bool(settings.REDIS_URL)
        old_name = None
        if postgres:
            old_name = connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
        try:
            with tempfile.TemporaryDirectory() as scratch:
                self.measure(Path(scratch), postgres, simulators, users, sockets_per_user, tasks, queued)
        finally:
            for process in self.processes:
                stop(process)
            if old_name is not None:
                connection.close()
                connection.creation.destroy_test_db(old_name, verbosity=0)

    def env(self, scratch, postgres):
        env = {**os.environ, "MEDIA_ROOT": str(scratch / "media"), "LOG_LEVEL": "WARNING",
               "COMFYHUB_TASK_LOG_LEVEL": "WARNING", "COMFYHUB_USER_MAX_QUEUED": "100000"}
        if postgres:
            env["DATABASE_URL"] = database_url()
            env["REDIS_PREFIX"] = f"bench{os.getpid()}"
        else:
            env.pop("REDIS_URL", None)
            env["DATABASE_URL"] = f"sqlite:///{scratch / 'hub.sqlite3'}"
        return env

    def manage(self, *args):
        reply = subprocess.run(  # noqa: S603
            [sys.executable, "manage.py", *args], cwd=ROOT, env=self.environ, capture_output=True, text=True
        )
        if reply.returncode:
            raise CommandError(f"manage.py {args[0]} failed: {reply.stderr[-2000:]}")
        return reply.stdout

    def start(self, *args):
        log = open(self.scratch / f"{args[0]}-{len(self.processes)}.log", "w")  # noqa: SIM115
        process = start_manage(*args, env=self.environ, stdout=log, stderr=log)
        self.processes.append(process)
        return process

    def measure(self, scratch, postgres, simulator_count, user_count, per_user, count, queued):
        self.scratch, self.environ = scratch, self.env(scratch, postgres)
        layer = "PostgreSQL + Redis" if postgres else "SQLite + in-memory layer"
        self.stdout.write(f"{layer}: {simulator_count} simulators, {user_count} users x {per_user} sockets")
        sims = [SimulatorThread(time_scale=0.5, name=f"sim-{n}").start() for n in range(simulator_count)]
        try:
            self.manage("migrate", "--verbosity", "0")
            servers = [(f"gpu-{n}", sim.url) for n, sim in enumerate(sims)]
            output = self.manage("shell", "-c", SETUP.format(servers=servers, users=user_count))
            users = json.loads(output.strip().splitlines()[-1])
            port = free_port()
            if postgres:
                hub = self.start("serve", "--port", str(port), "--no-supervisor")
                self.start("run_upstream", "--tick", "0.2")
            else:
                hub = self.start("serve", "--port", str(port))
            wait_until(lambda: healthy(f"http://127.0.0.1:{port}"), 60, "the hub to start", error=CommandError)
            base_rss = rss(hub.pid)
            results = asyncio.run(self.sockets_and_tasks(port, users, per_user, count))
            socket_rss = rss(hub.pid)
            stats = json.loads(self.manage("shell", "-c", STATS).strip().splitlines()[-1])
            self.report(results, stats, count, base_rss, socket_rss, user_count * per_user)
            self.manage("shell", "-c", QUEUE_MANY.format(count=queued))
            time.sleep(5)  # a few supervisor and dispatch rounds over the queue
            self.stdout.write(
                f"hub process memory (Daphne{'' if postgres else ' + supervisor'}): {base_rss / 1024:.0f} MiB "
                f"at rest, {socket_rss / 1024:.0f} MiB with {user_count * per_user} sockets, "
                f"{rss(hub.pid) / 1024:.0f} MiB with {queued} more tasks queued"
            )
        finally:
            for sim in sims:
                sim.stop()

    async def sockets_and_tasks(self, port, users, per_user, count):
        latencies, frames, seen = [], [0], set()
        ready_at = time.time()

        # Browsers reconnect with jittered backoff, not all in the same millisecond: at most 50 handshakes at once.
        handshakes = asyncio.Semaphore(50)

        async def listen(session):
            async with handshakes:
                ws = await connect(
                    f"ws://127.0.0.1:{port}/ws/tasks/",
                    additional_headers={"Cookie": f"sessionid={session}", "Origin": f"http://127.0.0.1:{port}"},
                    max_size=None, open_timeout=60,
                )
            async with ws:
                opened.append(time.monotonic())
                async for frame in ws:
                    now = time.time()
                    frames[0] += 1
                    for task_id, at in UPSTREAM_AT.findall(frame):
                        key = (id(ws), task_id, at)
                        if key not in seen and float(at) > ready_at:
                            seen.add(key)
                            latencies.append((now - float(at)) * 1000)

        opened = []
        listeners = [
            asyncio.create_task(listen(session)) for session, _token in users for _ in range(per_user)
        ]
        opening = time.monotonic()
        deadline = opening + 120
        while len(opened) < len(listeners) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        open_time = (max(opened) - opening) if opened else float("nan")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            started = time.monotonic()
            ids = []
            for n in range(count):
                _session, token = users[n % len(users)]
                reply = await client.post(
                    "/api/v1/tasks",
                    json={"workflow": "txt2img", "inputs": {**INPUTS, "seed": n}},
                    headers={"Authorization": f"Bearer {token}"},
                )
                reply.raise_for_status()
                ids.append((reply.json()["id"], token))
            submitted = time.monotonic() - started
            for task_id, token in ids:
                while True:
                    body = (await client.get(f"/api/v1/tasks/{task_id}",
                                             headers={"Authorization": f"Bearer {token}"})).json()
                    if body["status"] in ("succeeded", "failed", "cancelled"):
                        break
                    await asyncio.sleep(0.2)
        await asyncio.sleep(1)
        for listener in listeners:
            listener.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
        return {
            "latencies": latencies, "frames": frames[0], "opened": len(opened), "submitted": submitted,
            "open_time": open_time,
        }

    def report(self, results, stats, count, base_rss, socket_rss, sockets):
        accepted = stats["accepted"]
        span = (stats["last"] - stats["first"]) if stats["last"] else float("nan")
        self.stdout.write(
            f"throughput: {stats['done']} tasks in {span:.1f} s = {stats['done'] / span:.1f} tasks/s "
            f"(submitting took {results['submitted']:.1f} s)"
        )
        self.stdout.write(
            "submit -> prompt in a server's queue, under load (most tasks wait their turn in the hub): "
            f"p50 {percentile(accepted, 50):.0f} ms, "
            f"p99 {percentile(accepted, 99):.0f} ms ({len(accepted)} tasks)"
        )
        self.stdout.write(f"browser sockets: {results['opened']} of {sockets} open in {results['open_time']:.1f} s")
        latencies = sorted(results["latencies"])
        if latencies:
            self.stdout.write(
                f"upstream progress -> browser websocket frame, {results['opened']} of {sockets} sockets open: "
                f"p50 {percentile(latencies, 50):.0f} ms, p99 {percentile(latencies, 99):.0f} ms "
                f"({len(latencies)} samples, {results['frames']} frames)"
            )
        else:
            self.stdout.write(f"no progress frames arrived ({results['opened']} of {sockets} sockets open)")


def rss(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])  # KiB
    return 0
