import json
import os
import re
import time
from pathlib import Path

import httpx
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connection

from bench.hubs import (
    COUNTS,
    DISPATCH,
    TreeCommands,
    drop_database,
    hub_environment,
    read_counts,
    read_shim_file,
    rss,
    source_trees,
)
from bench.management.commands.bench_engine import Database, cpu_seconds, row_id, stamp
from bench.simulators import SimulatorProcesses
from comfyhub.harness import free_port, healthy, percentile, stop, wait_until

ROOT = Path(settings.BASE_DIR)
TERMINAL = ("succeeded", "failed", "cancelled")
ON_SERVER = "SELECT count(*) FROM tasks_task WHERE status IN ('submitted', 'running')"

# ARGS (a dict) is put in front. Only what both this tree and an older checkout have: the models' fields id, owner,
# workflow, inputs, graph, status, priority, created_at, last_event_at, graph_hash, and tasks.params.bind.
SETUP = """
import copy, json
from datetime import timedelta
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.utils import timezone
from tasks.models import ApiToken, Task, Workflow
from tasks.params import bind
try:
    from tasks.submission import private_output_names  # the task's own output prefix, and the affinity hash
except ImportError:
    def private_output_names(graph):
        return graph, ""
for n, url in enumerate(ARGS["urls"]):
    call_command("add_server", f"bench-{n + 1}", url, verbosity=0)
call_command("load_workflow", demo=True, verbosity=0)
users = [get_user_model().objects.create_user(f"queue-{n}") for n in range(ARGS["users"])]
newcomers = [get_user_model().objects.create_user(f"newcomer-{n}") for n in range(ARGS["newcomers"])]
tokens = [ApiToken.issue(user)[1] for user in newcomers]
workflow = Workflow.objects.get(slug="txt2img")
seed = next(param for param in workflow.parameters if param["type"] == "seed")
graph, inputs, _ = bind(workflow.graph, workflow.parameters, {seed["name"]: 1}, lambda pk: None)
first = timezone.now() - timedelta(milliseconds=ARGS["queued"] + 60_000)
tasks = []
for n in range(ARGS["queued"]):
    one = copy.deepcopy(graph)
    one[str(seed["node"])]["inputs"][seed["input"]] = n + 1
    sent, digest = private_output_names(one)
    at = first + timedelta(milliseconds=n)
    tasks.append(Task(
        owner=users[n % len(users)], workflow=workflow, inputs={**inputs, seed["name"]: n + 1}, graph=sent,
        graph_hash=digest, status="queued", priority=0, created_at=at, last_event_at=at,
    ))
Task.objects.bulk_create(tasks, batch_size=2000)
print(json.dumps(tokens))
"""


class Command(TreeCommands, BaseCommand):
    help = (
        "The hub with a large queue: --queued tasks of --users users waiting (created straight in a throw-away "
        "database) while every one of --servers simulators is busy with a long txt2img, the hub in processes of its "
        "own (Daphne, and run_upstream on PostgreSQL + Redis). Measures each hub process's idle CPU and SQL "
        "statements, the wall time of the supervisor's dispatch passes, the time from a newcomer's POST "
        "/api/v1/tasks to its prompt in a busy server's queue (each cancelled before the next), and memory. "
        "--old-checkout runs the same against another source tree."
    )

    def add_arguments(self, parser):
        parser.add_argument("--queued", type=int, default=10_000, help="Tasks waiting in the hub's queue")
        parser.add_argument("--users", type=int, default=100, help="Owners of the queued tasks (round-robin)")
        parser.add_argument(
            "--servers", type=int, default=50,
            help="Simulated servers, all kept busy (at least --users / 2, so that every queue user has a task on one "
            "and a newcomer finds a slot above the pipeline depth)",
        )
        parser.add_argument("--samples", type=int, default=30, help="Newcomers, each submitting one task")
        parser.add_argument("--idle", type=float, default=10.0, help="Seconds of the idle window")
        parser.add_argument(
            "--accept-timeout", type=float, default=20.0, help="Seconds a newcomer's task may take to reach a server"
        )
        parser.add_argument("--old-checkout", help="Source tree of the old hub (git worktree add PATH COMMIT)")

    def handle(self, **options):
        if min(options["queued"], options["users"], options["servers"], options["samples"]) < 1:
            raise CommandError("--queued, --users, --servers and --samples must be at least 1.")
        if options["idle"] <= 0 or options["accept_timeout"] <= 0:
            raise CommandError("--idle and --accept-timeout must be more than 0 seconds.")
        self.options = options
        postgres = connection.vendor == "postgresql" and bool(settings.REDIS_URL)
        trees = source_trees(ROOT, options["old_checkout"])
        layout = "PostgreSQL + Redis, 1 run_upstream" if postgres else "SQLite + in-memory layer (supervisor in Daphne)"
        self.stdout.write(
            f"{layout}: {options['queued']} tasks of {options['users']} users queued, {options['servers']} busy "
            f"servers; {options['idle']:.0f} s idle, then {options['samples']} newcomers one at a time (after one "
            "untimed)"
        )
        self.run_all([(label, tree, postgres) for label, tree in trees], "comfyhub-bench-queue-", report, table)

    def run_variant(self, scratch, n, tree, postgres):
        scratch.mkdir(parents=True)
        self.tree, self.scratch, self.processes = tree, scratch, []
        opts = self.options
        env, db_url = hub_environment(
            scratch, tree, f"bench_queue_{os.getpid()}_{n}", postgres, COMFYHUB_USER_MAX_QUEUED="1000000",
            BENCH_COUNTS_FILE=str(scratch / "counts"), BENCH_DISPATCH_FILE=str(scratch / "dispatch"),
        )  # fmt: skip
        (scratch / "shim").mkdir()
        (scratch / "shim" / "sitecustomize.py").write_text(COUNTS + DISPATCH)
        env["PYTHONPATH"] = f"{tree}{os.pathsep}{scratch / 'shim'}"
        self.env = env
        sims = database = None
        try:
            # txt2img lasts ~4 s at time scale 1, ~400 s here: no server finishes anything during the run.
            sims = SimulatorProcesses(opts["servers"], 2, time_scale=100, cwd=ROOT)
            self.manage("migrate", "--verbosity", "0")
            newcomers = opts["samples"] + 1  # the first one is not timed
            args = {"urls": sims.urls, "users": opts["users"], "newcomers": newcomers, "queued": opts["queued"]}
            began = time.monotonic()
            tokens = json.loads(self.manage("shell", "-c", f"ARGS = {args!r}\n{SETUP}").strip().splitlines()[-1])
            setup = time.monotonic() - began
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            if postgres:
                hubs = [self.start("serve", "--port", str(port), "--no-supervisor"), self.start("run_upstream")]
            else:
                hubs = [self.start("serve", "--port", str(port))]
            wait_until(lambda: self.alive(hubs) and healthy(base), 90, "the hub to start", error=CommandError)
            database = Database(db_url)
            online = "SELECT count(*) >= ? FROM servers_server WHERE enabled AND state = 'online'"
            wait_until(lambda: database.one(online, opts["servers"])[0], 90, "every server online", error=CommandError)
            filled, fill_seconds = self.wait_filled(database, hubs)
            figures = self.measure(base, tokens, database, hubs, postgres)
            figures.update(
                postgres=postgres, queued=opts["queued"], users=opts["users"], servers=opts["servers"],
                samples=opts["samples"], setup=setup, filled=filled, fill_seconds=fill_seconds,
                rss={process.label: rss(process.pid) for process in hubs},
            )  # fmt: skip
            return figures
        except CommandError as exc:  # with the end of each hub process's log, which goes with the scratch folder
            logs = "".join(f"\n{log.name}: ...{log.read_text()[-1500:]}" for log in sorted(scratch.glob("*.log")))
            raise CommandError(f"{exc}{logs}") from None
        finally:
            for process in self.processes:
                stop(process)
            if sims is not None:
                sims.stop()
            if database is not None:
                database.close()
            if postgres:
                drop_database(db_url)

    def alive(self, hubs):
        if exited := [f"{process.label} ({process.returncode})" for process in hubs if process.poll() is not None]:
            raise CommandError(f"a hub process exited: {', '.join(exited)}")
        return True

    def wait_filled(self, database, hubs, settle=3.0, timeout=180.0):
        """(tasks on servers, seconds it took) once that count, at least one a server, stopped growing for `settle`."""
        began = time.monotonic()
        best, grew = 0, began
        while self.alive(hubs):
            now, count = time.monotonic(), database.one(ON_SERVER)[0]
            if count > best:
                best, grew = count, now
            elif best >= self.options["servers"] and now - grew >= settle:
                return best, grew - began
            if now - began > timeout:
                raise CommandError(
                    f"timed out after {timeout:.0f} s waiting for the hub to fill the servers ({best} tasks on "
                    f"{self.options['servers']} servers)"
                )
            time.sleep(0.2)

    def snapshot(self, hubs):
        time.sleep(0.6)  # the shims write twice a second
        return {"at": time.time(), "counts": read_counts(self.scratch / "counts"),
                "cpu": [cpu_seconds(process.pid) for process in hubs]}  # fmt: skip

    def measure(self, base, tokens, database, hubs, postgres):
        idle = [self.snapshot(hubs)]
        time.sleep(self.options["idle"])
        idle.append(self.snapshot(hubs))
        latencies, ends, saturated = [], {}, False
        slots = database.one("SELECT sum(max_in_flight) FROM servers_server WHERE enabled")[0]
        newcomers = [self.snapshot(hubs)]
        with httpx.Client(base_url=base, timeout=60) as client:
            for n, token in enumerate(tokens):
                headers = {"Authorization": f"Bearer {token}"}
                started = time.time()
                reply = client.post("/api/v1/tasks", json={"workflow": "fast", "inputs": {"color": n}}, headers=headers)
                if reply.status_code != 201:
                    raise CommandError(f"newcomer {n + 1}'s submission was refused: {reply.status_code} {reply.text}")
                api_id = reply.json()["id"]
                task_id = row_id(api_id, postgres)
                # The queue's users holding every slot (nothing else in flight, they are newcomers too), none frees
                # before a running task ends: later newcomers wait 2 s, for the dispatch passes they wake.
                wait = 2.0 if saturated else self.options["accept_timeout"]
                accepted = until(database, "SELECT accepted_at FROM tasks_task WHERE id = ?", task_id, timeout=wait)
                if accepted is not None:
                    if n:  # the first is not timed: the first request of each process imports, compiles, connects
                        latencies.append((stamp(accepted) - started) * 1000)
                else:
                    saturated = saturated or database.one(ON_SERVER)[0] >= slots
                # Cancelled, so that the slot above the pipeline depth is free again for the next newcomer.
                reply = client.post(f"/api/v1/tasks/{api_id}/cancel", headers=headers)
                if reply.status_code not in (200, 409):
                    raise CommandError(f"newcomer {n + 1}'s cancel failed: {reply.status_code} {reply.text[:300]}")
                ended = until(
                    database, "SELECT status FROM tasks_task WHERE id = ? AND status IN (?, ?, ?)", task_id, *TERMINAL
                )
                if ended is None:
                    raise CommandError(f"timed out after 60 s waiting for newcomer {n + 1}'s cancelled task to end")
                ends[ended] = ends.get(ended, 0) + 1
        newcomers.append(self.snapshot(hubs))
        time.sleep(0.6)  # the passes up to the last snapshot written out
        passes = []
        for command in ("serve", "run_upstream"):
            text = read_shim_file(self.scratch / f"dispatch-{command}")
            passes += json.loads(text)["passes"] if text else []
        return {"idle": idle, "newcomers": newcomers, "latencies": latencies, "ends": ends, "passes": passes,
                "on_server_after": database.one(ON_SERVER)[0], "slots": slots, "saturated": saturated,
                "queued_after": database.one("SELECT count(*) FROM tasks_task WHERE status = 'queued'")[0]}  # fmt: skip


def until(database, sql, *params, interval=0.002, timeout=60.0):
    """The first column of `sql`'s first row once it is something true, polled; None after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = database.one(sql, *params)
        if row and row[0]:
            return row[0]
        time.sleep(interval)
    return None


def window(snapshots, passes, labels):
    """Figures of the window between two snapshots: CPU %, SQL statements per process, the dispatch passes in it."""
    before, after = snapshots
    seconds = after["at"] - before["at"]
    w = {"seconds": seconds}
    for label, start, end in zip(labels, before["cpu"], after["cpu"], strict=True):
        w[f"cpu_{label}"] = (end - start) * 100 / seconds
    for command, label in (("serve", "daphne"), ("run_upstream", "upstream")):
        now, then = after["counts"].get(command), before["counts"].get(command)
        w[f"sql_{label}"] = now["sql"] - then["sql"] if now and then else float("nan")
    inside = [took * 1000 for began, took in passes if before["at"] <= began < after["at"]]
    w.update(passes=len(inside), pass_p50=percentile(inside, 50), pass_p99=percentile(inside, 99),
             pass_max=max(inside, default=float("nan")))  # fmt: skip
    return w


def summarize(f):
    labels = ["daphne", "upstream"] if f["postgres"] else ["daphne"]
    idle, new = window(f["idle"], f["passes"], labels), window(f["newcomers"], f["passes"], labels)
    lat = f["latencies"]
    s = {"queued": f["queued"], "users": f["users"], "servers": f["servers"], "filled": f["filled"],
         "fill_seconds": f["fill_seconds"], "setup": f["setup"], "samples": f["samples"], "accepted": len(lat),
         "lat_p50": percentile(lat, 50), "lat_p99": percentile(lat, 99), "lat_max": max(lat, default=float("nan")),
         "ends": ", ".join(f"{n} {status}" for status, n in sorted(f["ends"].items())),
         "idle_seconds": idle["seconds"], "on_server_after": f["on_server_after"], "slots": f["slots"],
         "queued_after": f["queued_after"], "cpu_upstream": float("nan")}  # fmt: skip
    for label in labels:
        s[f"cpu_{label}"] = idle[f"cpu_{label}"]
    for label in ("daphne", "upstream"):
        s[f"sql_s_{label}"] = idle[f"sql_{label}"] / idle["seconds"]
        tasks = f["samples"] + 1  # the untimed first one too
        s[f"sql_task_{label}"] = new[f"sql_{label}"] / tasks
        s[f"sql_net_{label}"] = (new[f"sql_{label}"] - s[f"sql_s_{label}"] * new["seconds"]) / tasks
    s.update({f"{name}_{key}": w[key] for name, w in (("idle", idle), ("new", new)) for key in w if "pass" in key})
    s["rss"] = ", ".join(f"{name} {kib / 1024:.0f} MiB" for name, kib in f["rss"].items())
    return s


def report(f):
    s = summarize(f)
    where = "Daphne / run_upstream" if f["postgres"] else "Daphne (supervisor inside)"
    labels = ["daphne", "upstream"] if f["postgres"] else ["daphne"]

    def pair(prefix):
        return " / ".join(f"{s[prefix + label]:.1f}" for label in labels)

    lines = [
        f"queue: {s['queued']} tasks of {s['users']} users (created in {s['setup']:.1f} s); {s['filled']} on the "
        f"{s['servers']} servers' {s['slots']} slots {s['fill_seconds']:.1f} s after they were online, "
        f"{s['on_server_after']} at the end ({s['queued_after']} still queued)",
        f"idle ({s['idle_seconds']:.1f} s), {where}: CPU {pair('cpu_')} % of a core; SQL statements "
        f"{pair('sql_s_')} a second",
        f"dispatch passes idle: {s['idle_passes']}, p50 {s['idle_pass_p50']:.1f} ms, p99 {s['idle_pass_p99']:.1f} "
        f"ms, max {s['idle_pass_max']:.1f} ms; during the newcomers: {s['new_passes']}, p50 {s['new_pass_p50']:.1f} "
        f"ms, p99 {s['new_pass_p99']:.1f} ms, max {s['new_pass_max']:.1f} ms",
        f"newcomer's POST -> prompt in a busy server's queue: p50 {s['lat_p50']:.1f} ms, p99 {s['lat_p99']:.1f} ms, "
        f"max {s['lat_max']:.1f} ms ({s['accepted']} of {s['samples']} accepted; ended {s['ends']})",
    ]
    if f["saturated"]:
        lines.append(
            "  no slot was free: the queue's own users, with nothing else in flight, held every one (those above "
            "the pipeline depth too); after the first, each newcomer waited 2 s"
        )
    lines += [
        f"a newcomer's task, {where}: {pair('sql_task_')} SQL statements, {pair('sql_net_')} above the idle rate",
        f"memory after the run: {s['rss']}",
    ]
    return [re.sub(r"\bnan\b", "–", line) for line in lines]


ROWS = [
    ("tasks on servers once filled", "{filled}"),
    ("idle CPU % of a core: Daphne / upstream", "{cpu_daphne:.1f} / {cpu_upstream:.1f}"),
    ("idle SQL statements a second: Daphne / upstream", "{sql_s_daphne:.1f} / {sql_s_upstream:.1f}"),
    ("dispatch passes idle: count, p50 / p99 (ms)", "{idle_passes}, {idle_pass_p50:.1f} / {idle_pass_p99:.1f}"),
    ("dispatch passes, newcomers: count, p50 / p99 (ms)", "{new_passes}, {new_pass_p50:.1f} / {new_pass_p99:.1f}"),
    ("newcomer -> server queue p50 / p99 / max (ms)", "{lat_p50:.1f} / {lat_p99:.1f} / {lat_max:.1f}"),
    ("newcomers accepted", "{accepted}/{samples}"),
    ("tasks on servers / queued at the end", "{on_server_after} / {queued_after}"),
    ("SQL statements a newcomer: Daphne / upstream", "{sql_task_daphne:.1f} / {sql_task_upstream:.1f}"),
    ("memory after the run", "{rss}"),
]


def table(results):
    summaries = [summarize(f) for f in results]
    lines = ["| figure | " + " | ".join(f["label"] for f in results) + " |", "|---" * (len(results) + 1) + "|"]
    for name, fmt in ROWS:
        cells = [fmt.format(**s).replace("nan", "–") for s in summaries]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
