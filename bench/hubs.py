"""
Throw-away hubs for the benchmarks, in processes of their own: a database of their own, and small
`sitecustomize` shims loaded into each hub process (Daphne by `manage.py serve`, `manage.py run_upstream`) that
measure it from the inside the same way whichever source tree it runs, the old one of a comparison included:

- GC_PAUSES: each garbage collection's pause, by generation;
- COUNTS: SQL statements, channel-layer messages sent and HTTP requests to ComfyUI servers, per process;
- DISPATCH: each dispatch pass (`servers.supervisor.Supervisor.dispatch`): when it began and its wall time.

Each shim writes what it measured to `<file>-<command>` twice a second; `read_shim_file()` reads it back.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from django.conf import settings
from django.core.management.base import CommandError

from comfyhub.harness import database_url

HUB_COMMANDS = ("serve", "run_upstream")

GC_PAUSES = """
import gc, os, sys, threading, time
if sys.argv[1:2] and sys.argv[1] in ("serve", "run_upstream") and os.environ.get("BENCH_GC_FILE"):
    from prometheus_client import CollectorRegistry, Histogram, generate_latest
    _gc_registry = CollectorRegistry()
    _gc_pause = Histogram("bench_gc_pause_seconds", "", ["generation"], registry=_gc_registry,
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0))
    _gc_began = [None]

    def _gc_timed(phase, info):
        if phase == "start":
            _gc_began[0] = time.perf_counter()
        elif _gc_began[0] is not None:
            _gc_pause.labels(str(info["generation"])).observe(time.perf_counter() - _gc_began[0])

    gc.callbacks.insert(0, _gc_timed)
    _gc_where = os.environ["BENCH_GC_FILE"] + "-" + sys.argv[1]

    def _gc_dump():
        while True:
            time.sleep(0.5)
            with open(_gc_where + ".tmp", "wb") as out:
                out.write(generate_latest(_gc_registry))
            os.replace(_gc_where + ".tmp", _gc_where)

    threading.Thread(target=_gc_dump, daemon=True).start()
"""

COUNTS = """
import json, os, sys, threading, time
if sys.argv[1:2] and sys.argv[1] in ("serve", "run_upstream") and os.environ.get("BENCH_COUNTS_FILE"):
    _counts = {"sql": 0, "layer": 0, "http": 0}

    def _count_sql(execute, sql, params, many, context):
        _counts["sql"] += 1
        return execute(sql, params, many, context)

    def _watch_connection(sender, connection, **kwargs):
        if _count_sql not in connection.execute_wrappers:
            connection.execute_wrappers.append(_count_sql)

    from django.db.backends.signals import connection_created
    connection_created.connect(_watch_connection, weak=False)

    import channels.layers as _layers
    _get_layer = _layers.get_channel_layer

    def _counting_layer(*args, **kwargs):
        layer = _get_layer(*args, **kwargs)
        if layer is not None and not getattr(layer, "_bench_counted", False):
            for name in ("send", "group_send"):
                def counted(*a, _real=getattr(layer, name), **k):
                    _counts["layer"] += 1
                    return _real(*a, **k)
                setattr(layer, name, counted)
            layer._bench_counted = True
        return layer

    _layers.get_channel_layer = _counting_layer

    import httpx
    _send = httpx.AsyncClient.send

    async def _counted_send(self, *args, **kwargs):
        _counts["http"] += 1
        return await _send(self, *args, **kwargs)

    httpx.AsyncClient.send = _counted_send
    _counts_where = f"{os.environ['BENCH_COUNTS_FILE']}-{sys.argv[1]}-{os.getpid()}"  # several workers: a file each

    def _counts_dump():
        while True:
            time.sleep(0.5)
            with open(_counts_where + ".tmp", "w") as out:
                json.dump(_counts, out)
            os.replace(_counts_where + ".tmp", _counts_where)

    threading.Thread(target=_counts_dump, daemon=True).start()
"""

DISPATCH = """
import importlib.machinery, json, os, sys, threading, time
from collections import deque
if sys.argv[1:2] and sys.argv[1] in ("serve", "run_upstream") and os.environ.get("BENCH_DISPATCH_FILE"):
    _dispatch_passes = deque(maxlen=10_000)  # (epoch seconds it began, seconds it took) of the newest passes
    _dispatch_total = [0]

    def _time_dispatch(supervisor):
        real = getattr(supervisor, "dispatch", None)
        if real is None or getattr(real, "_bench_timed", False):
            return

        async def timed(self, *args, **kwargs):
            began, clock = time.time(), time.perf_counter()
            try:
                return await real(self, *args, **kwargs)
            finally:
                _dispatch_passes.append((began, time.perf_counter() - clock))
                _dispatch_total[0] += 1

        timed._bench_timed = True
        supervisor.dispatch = timed

    class _DispatchFinder:
        # Wraps the method as servers.supervisor is first imported, importing nothing (Django included) sooner.
        def find_spec(self, fullname, path=None, target=None):
            if fullname != "servers.supervisor":
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is None or spec.loader is None:
                return spec
            real_exec = spec.loader.exec_module

            def exec_module(module):
                real_exec(module)
                if hasattr(module, "Supervisor"):
                    _time_dispatch(module.Supervisor)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _DispatchFinder())
    _dispatch_where = os.environ["BENCH_DISPATCH_FILE"] + "-" + sys.argv[1]

    def _dispatch_dump():
        written = None
        while True:
            time.sleep(0.5)
            if written != _dispatch_total[0]:  # only when a pass ended since the last write
                written = _dispatch_total[0]
                with open(_dispatch_where + ".tmp", "w") as out:
                    json.dump({"count": written, "passes": list(_dispatch_passes)}, out)
                os.replace(_dispatch_where + ".tmp", _dispatch_where)

    threading.Thread(target=_dispatch_dump, daemon=True).start()
"""


def read_shim_file(path):
    """What a shim last wrote at `path` ('' when it has not written yet)."""
    path = Path(path)
    return path.read_text() if path.exists() else ""


def read_counts(prefix):
    """
    {command: {"sql", "layer", "http"}} of the hub processes whose COUNTS shim wrote under `prefix`, summed over
    the processes of a command (several run_upstream workers).
    """
    prefix = Path(prefix)
    found = {}
    for command in HUB_COMMANDS:
        for path in sorted(prefix.parent.glob(f"{prefix.name}-{command}-*")):
            text = read_shim_file(path)
            if text and not path.name.endswith(".tmp"):
                total = found.setdefault(command, {"sql": 0, "layer": 0, "http": 0})
                for key, value in json.loads(text).items():
                    total[key] = total.get(key, 0) + value
    return found


def source_trees(root, old_checkout):
    """[("new", root)], and ("old", path) for --old-checkout: the trees a benchmark runs, in that order."""
    trees = [("new", root)]
    if old_checkout:
        old = Path(old_checkout).resolve()
        if not (old / "manage.py").exists():
            raise CommandError(f"{old} has no manage.py")
        trees.append(("old", old))
    return trees


def hub_environment(scratch, tree, name, postgres, **extra):
    """
    (environment, database URL) of a throw-away hub of `tree`: files in `scratch`, quiet logs, on PostgreSQL + Redis
    a database `name` of its own (drop it with drop_database) and a Redis prefix of its own, else SQLite.
    """
    env = {**os.environ, "MEDIA_ROOT": str(scratch / "media"), "COMFYHUB_VAR_DIR": str(scratch / "var"),
           "LOG_LEVEL": "WARNING", "COMFYHUB_TASK_LOG_LEVEL": "WARNING", "PYTHONPATH": str(tree), **extra}
    env.pop("COMFYHUB_EMBEDDED_SUPERVISOR", None)
    if postgres:
        db_url = create_database(name)
        env.update(DATABASE_URL=db_url, REDIS_URL=settings.REDIS_URL, REDIS_PREFIX=name.replace("_", ""))
    else:
        env.pop("REDIS_URL", None)
        db_url = env["DATABASE_URL"] = f"sqlite:///{scratch / 'hub.sqlite3'}"
    return env, db_url


def create_database(name):
    import psycopg

    server = database_url().rsplit("/", 1)[0]
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"


def drop_database(url):
    import psycopg

    server, name = url.rsplit("/", 1)
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def rss(pid):
    """Resident memory of a process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class TreeCommands:
    """
    For a benchmark command: `manage.py` commands of the source tree `self.tree`, with `self.env`, run to the end
    (`manage`) or started in the background (`start`, logged in `self.scratch`, kept in `self.processes`).
    """

    def manage(self, *args):
        reply = subprocess.run(  # noqa: S603
            [sys.executable, "manage.py", *args], cwd=self.tree, env=self.env, capture_output=True, text=True,
            timeout=300,
        )
        if reply.returncode:
            raise CommandError(f"manage.py {args[0]} failed: {reply.stderr[-2000:]}")
        return reply.stdout

    def run_all(self, variants, prefix, report, table):
        """
        Each (label, tree, *more) of `variants` through `self.run_variant(scratch, n, tree, *more)`, its report
        printed as it ends, then the side-by-side table when there were several. Returns the figures.
        """
        results = []
        with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
            for n, (label, tree, *more) in enumerate(variants):
                self.stdout.write(f"-- {label} ({tree})")
                self.stdout.flush()
                figures = self.run_variant(Path(scratch) / f"v{n}", n, tree, *more)
                figures["label"] = label
                results.append(figures)
                for line in report(figures):
                    self.stdout.write(f"  {line}")
                self.stdout.flush()
        if len(results) > 1:
            self.stdout.write(table(results))
        return results

    def start(self, *args):
        log = open(self.scratch / f"{args[0]}-{len(self.processes)}.log", "w")  # noqa: SIM115
        process = subprocess.Popen(  # noqa: S603
            [sys.executable, "manage.py", *args], cwd=self.tree, env=self.env, stdout=log, stderr=log
        )
        self.processes.append(process)
        process.label = f"{args[0]}-{len(self.processes)}"
        return process
