import asyncio
import json
import os
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connection

from bench.hubs import (
    COUNTS,
    GC_PAUSES,
    TreeCommands,
    drop_database,
    hub_environment,
    read_counts,
    rss,
    source_trees,
)
from bench.simulators import SimulatorProcesses
from comfyhub.harness import free_port, healthy, percentile, stop, wait_until

ROOT = Path(settings.BASE_DIR)
TERMINAL = ("succeeded", "failed", "cancelled")

SETUP = """
import json
from django.contrib.auth import get_user_model
from django.core.management import call_command
from servers.models import Server
from tasks.models import ApiToken
for n, url in enumerate({urls!r}):
    call_command("add_server", f"bench-{{n + 1}}", url, verbosity=0)
Server.objects.exclude(name="bench-1").update(enabled=False)
call_command("load_workflow", demo=True, verbosity=0)
user = get_user_model().objects.create_user("bench")
print(json.dumps(ApiToken.issue(user)[1]))
"""


class Database:
    """The throw-away database of one run, read directly by the benchmark (never through the hub)."""

    def __init__(self, url):
        self.url = url
        if url.startswith("sqlite:///"):
            self.conn = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30, isolation_level=None)
            self.mark = "?"
        else:
            import psycopg

            self.conn = psycopg.connect(url, autocommit=True)
            self.mark = "%s"

    def all(self, sql, *params):
        cursor = self.conn.execute(sql.replace("?", self.mark), params)
        return list(cursor.fetchall()) if cursor.description else []

    def one(self, sql, *params):
        rows = self.all(sql, *params)
        return rows[0] if rows else None

    def commits(self):
        if self.mark == "?":
            return None
        return self.one("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")[0]

    def close(self):
        self.conn.close()


class Command(TreeCommands, BaseCommand):
    help = (
        "The task engine on throw-away hubs in processes of their own (Daphne, and --workers run_upstream on "
        "PostgreSQL + Redis), simulators in processes of their own, this process the API client: the time from POST "
        "/api/v1/tasks to the prompt in an idle server's queue, then tasks per second through the whole lifecycle "
        "(submit, dispatch, run, outputs copied) over --simulators servers with zero-length nodes, with the counts "
        "behind it per task: SQL statements and channel-layer messages of each hub process, HTTP requests to the "
        "servers, commits (PostgreSQL), CPU time. --old-checkout runs the same against another source tree."
    )

    def add_arguments(self, parser):
        parser.add_argument("--samples", type=int, default=50, help="Tasks timed one at a time for the latency")
        parser.add_argument("--tasks", type=int, default=400, help="Tasks pushed through the simulators at once")
        parser.add_argument("--simulators", type=int, default=8, help="Simulators for the throughput run")
        parser.add_argument("--sim-processes", type=int, default=2, help="Processes the simulators run in")
        parser.add_argument("--workers", type=int, default=1, help="run_upstream processes (PostgreSQL + Redis)")
        parser.add_argument("--concurrency", type=int, default=8, help="Submissions in flight at once")
        parser.add_argument("--old-checkout", help="Source tree of the old hub (git worktree add PATH COMMIT)")

    def handle(self, **options):
        if options["samples"] < 1 or options["tasks"] < 1 or options["simulators"] < 1 or options["workers"] < 1:
            raise CommandError("--samples, --tasks, --simulators and --workers must be at least 1.")
        self.options = options
        postgres = connection.vendor == "postgresql" and bool(settings.REDIS_URL)
        trees = source_trees(ROOT, options["old_checkout"])
        layout = "PostgreSQL + Redis" if postgres else "SQLite + in-memory layer"
        workers = f", {options['workers']} run_upstream" if postgres else " (supervisor inside Daphne)"
        self.stdout.write(
            f"{layout}{workers}: {options['samples']} tasks one at a time, then {options['tasks']} tasks over "
            f"{options['simulators']} simulators (zero-length nodes)"
        )
        self.run_all([(label, tree, postgres) for label, tree in trees], "comfyhub-bench-engine-", report, table)

    def run_variant(self, scratch, n, tree, postgres):
        scratch.mkdir(parents=True)
        self.tree, self.scratch, self.processes = tree, scratch, []
        env, db_url = hub_environment(
            scratch, tree, f"bench_engine_{os.getpid()}_{n}", postgres, COMFYHUB_USER_MAX_QUEUED="100000",
            COMFYHUB_USER_MAX_IN_FLIGHT="0", BENCH_GC_FILE=str(scratch / "gc"),
            BENCH_COUNTS_FILE=str(scratch / "counts"),
        )  # fmt: skip
        (scratch / "shim").mkdir()
        (scratch / "shim" / "sitecustomize.py").write_text(GC_PAUSES + COUNTS)
        env["PYTHONPATH"] = f"{tree}{os.pathsep}{scratch / 'shim'}"
        self.env = env
        opts = self.options
        sims = SimulatorProcesses(opts["simulators"], opts["sim_processes"], time_scale=0, cwd=ROOT)
        database = None
        try:
            self.manage("migrate", "--verbosity", "0")
            token = json.loads(self.manage("shell", "-c", SETUP.format(urls=sims.urls)).strip().splitlines()[-1])
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            if postgres:
                hubs = [self.start("serve", "--port", str(port), "--no-supervisor")]
                hubs += [self.start("run_upstream") for _ in range(opts["workers"])]
            else:
                hubs = [self.start("serve", "--port", str(port))]
            wait_until(lambda: healthy(base), 60, "the hub to start", error=CommandError)
            database = Database(db_url)
            online = "SELECT count(*) FROM servers_server WHERE enabled AND state = 'online'"
            wait_until(lambda: database.one(online)[0] >= 1, 60, "the first server online", error=CommandError)
            figures = asyncio.run(self.load(base, token, database, hubs, postgres, len(sims.urls)))
            figures["postgres"], figures["workers"] = postgres, opts["workers"] if postgres else 0
            return figures
        finally:
            for process in self.processes:
                stop(process)
            sims.stop()
            if database is not None:
                database.close()
            if postgres:
                drop_database(db_url)

    async def load(self, base, token, database, hubs, postgres, servers):
        opts = self.options
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as client:

            async def submit(color):
                reply = await client.post("/api/v1/tasks", json={"workflow": "fast", "inputs": {"color": color}})
                if reply.status_code != 201:
                    raise CommandError(f"a submission was refused: {reply.status_code} {reply.text[:300]}")
                return reply.json()["id"]

            async def until(sql, *params, interval=0.002, timeout=60.0):
                deadline = time.monotonic() + timeout
                while True:
                    row = database.one(sql, *params)
                    if row and row[0]:
                        return row[0]
                    if time.monotonic() > deadline:
                        raise CommandError(f"timed out waiting for {sql}")
                    await asyncio.sleep(interval)

            latencies, requests = [], {"submit": [], "status": []}
            # One task first, not timed: the first request of each process imports, compiles and connects.
            await until("SELECT finished_at FROM tasks_task WHERE id = ?", row_id(await submit(0), postgres))
            for n in range(opts["samples"]):
                started = time.time()
                api_id = await submit(n)
                requests["submit"].append((time.time() - started) * 1000)
                task_id = row_id(api_id, postgres)
                accepted = await until("SELECT accepted_at FROM tasks_task WHERE id = ?", task_id)
                latencies.append((stamp(accepted) - started) * 1000)
                await until("SELECT finished_at FROM tasks_task WHERE id = ?", task_id)
                asked = time.time()
                (await client.get(f"/api/v1/tasks/{api_id}")).raise_for_status()  # an idle hub's answer
                requests["status"].append((time.time() - asked) * 1000)

            database.all("UPDATE servers_server SET enabled = ?", True)
            online = "SELECT count(*) = ? FROM servers_server WHERE enabled AND state = 'online'"
            await until(online, servers, interval=0.05)
            before = self.snapshot(database, hubs)
            gate = asyncio.Semaphore(opts["concurrency"])

            async def one(color):
                async with gate:
                    return await submit(color)

            # The tasks of the latency part have all ended: the throughput part's are the ones created after.
            after_latency = database.one("SELECT max(created_at) FROM tasks_task")[0]
            started = time.time()
            await asyncio.gather(*(one(10_000 + n) for n in range(opts["tasks"])))
            submitted = time.time() - started
            ended = "SELECT count(*) >= ? FROM tasks_task WHERE status IN (?, ?, ?) AND created_at > ?"
            await until(ended, opts["tasks"], *TERMINAL, after_latency, interval=0.05, timeout=600)
            after = self.snapshot(database, hubs)
            last = database.one("SELECT max(finished_at) FROM tasks_task")[0]
            statuses = dict(database.all(
                "SELECT status, count(*) FROM tasks_task WHERE created_at > ? GROUP BY status", after_latency
            ))
        return {"latencies": latencies, "requests": requests, "elapsed": stamp(last) - started, "submitted": submitted,
                "statuses": statuses, "tasks": opts["tasks"], "servers": servers, "before": before, "after": after,
                "rss": {process.label: rss(process.pid) for process in hubs}}

    def snapshot(self, database, hubs):
        time.sleep(0.6)  # the shims write twice a second
        return {"counts": read_counts(self.scratch / "counts"), "commits": database.commits(),
                "cpu": [cpu_seconds(process.pid) for process in hubs]}


def row_id(task_id, postgres):
    """A task id as its table holds it: Django keeps UUIDs as 32 hex digits on SQLite."""
    return task_id if postgres else task_id.replace("-", "")


def stamp(value):
    """Epoch seconds of a timestamp as the database gave it (datetime from PostgreSQL, UTC text from SQLite)."""
    if isinstance(value, str):
        return datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp()
    return value.timestamp()


def cpu_seconds(pid):
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarize(f):
    tasks = f["tasks"]
    before, after = f["before"], f["after"]
    s = {
        "latency_p50": percentile(f["latencies"], 50), "latency_p99": percentile(f["latencies"], 99),
        "submit_p50": percentile(f["requests"]["submit"], 50), "status_p50": percentile(f["requests"]["status"], 50),
        "latency_n": len(f["latencies"]), "throughput": tasks / f["elapsed"], "elapsed": f["elapsed"],
        "submitted": f["submitted"], "succeeded": f["statuses"].get("succeeded", 0), "tasks": tasks,
        "servers": f["servers"],
    }
    for command, label in (("serve", "daphne"), ("run_upstream", "upstream")):
        now, then = after["counts"].get(command), before["counts"].get(command)
        if now and then:
            for key in ("sql", "layer", "http"):
                s[f"{label}_{key}"] = (now[key] - then[key]) / tasks
    if before["commits"] is not None:
        s["commits"] = (after["commits"] - before["commits"]) / tasks
    cpu = [(end - start) for start, end in zip(before["cpu"], after["cpu"], strict=True)]
    s["cpu_daphne"] = cpu[0] * 1000 / tasks
    s["cpu_workers"] = sum(cpu[1:]) * 1000 / tasks if len(cpu) > 1 else None
    s["http"] = s.get("upstream_http", s.get("daphne_http", float("nan")))
    s.setdefault("upstream_sql", float("nan"))
    s.setdefault("upstream_layer", float("nan"))
    s["cpu_workers"] = float("nan") if s["cpu_workers"] is None else s["cpu_workers"]
    s["rss"] = ", ".join(f"{name} {kib / 1024:.0f} MiB" for name, kib in f["rss"].items())
    return s


def report(f):
    s = summarize(f)
    embedded = not f["postgres"]
    nan = float("nan")
    lines = [
        f"submit -> prompt in an idle server's queue: p50 {s['latency_p50']:.1f} ms, p99 {s['latency_p99']:.1f} ms "
        f"({s['latency_n']} tasks one at a time); the submission's own request p50 {s['submit_p50']:.1f} ms, a "
        f"finished task's status GET p50 {s['status_p50']:.1f} ms",
        f"throughput: {s['throughput']:.1f} tasks/s ({s['succeeded']} of {s['tasks']} succeeded over {s['servers']} "
        f"servers in {s['elapsed']:.2f} s; the submissions took {s['submitted']:.2f} s)",
    ]
    if embedded:
        lines.append(
            f"a task, Daphne with the supervisor inside: {s.get('daphne_sql', nan):.1f} SQL statements, "
            f"{s.get('daphne_layer', nan):.1f} channel-layer messages, {s.get('daphne_http', nan):.1f} "
            f"HTTP requests to the servers, {s['cpu_daphne']:.1f} ms of CPU"
        )
    else:
        lines += [
            f"a task, API (Daphne): {s.get('daphne_sql', nan):.1f} SQL statements, "
            f"{s.get('daphne_layer', nan):.1f} channel-layer messages, {s['cpu_daphne']:.1f} ms of CPU",
            f"a task, supervisor ({f['workers']} run_upstream): {s.get('upstream_sql', nan):.1f} SQL "
            f"statements, {s.get('upstream_layer', nan):.1f} channel-layer messages, "
            f"{s.get('upstream_http', nan):.1f} HTTP requests to the servers, {s['cpu_workers']:.1f} ms of "
            f"CPU; {s['commits']:.1f} commits (PostgreSQL, every process)",
        ]
    lines.append(f"memory after the run: {s['rss']}")
    return lines


ROWS = [
    ("submit -> server queue p50 / p99 (ms)", "{latency_p50:.1f} / {latency_p99:.1f}"),
    ("POST /api/v1/tasks / GET of a task p50 (ms)", "{submit_p50:.1f} / {status_p50:.1f}"),
    ("throughput (tasks/s)", "{throughput:.1f}"),
    ("succeeded", "{succeeded}/{tasks}"),
    ("SQL statements a task: Daphne / workers", "{daphne_sql:.1f} / {upstream_sql:.1f}"),
    ("commits a task", "{commits:.1f}"),
    ("HTTP requests to servers a task", "{http:.1f}"),
    ("layer messages a task: Daphne / workers", "{daphne_layer:.1f} / {upstream_layer:.1f}"),
    ("CPU ms a task: Daphne / workers", "{cpu_daphne:.1f} / {cpu_workers:.1f}"),
]


def table(results):
    summaries = [summarize(f) for f in results]
    lines = ["| figure | " + " | ".join(f["label"] for f in results) + " |", "|---" * (len(results) + 1) + "|"]
    for name, fmt in ROWS:
        cells = []
        for s in summaries:
            try:
                cells.append(fmt.format(**s).replace("nan", "–"))
            except (KeyError, TypeError, ValueError):
                cells.append("–")
        if any(cell != "–" for cell in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
