import os
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

ROOT = Path(settings.BASE_DIR)
CONFIGS = {
    "SQLite + in-memory layer": {"DATABASE_URL": None, "REDIS_URL": None},
    "PostgreSQL + Redis": {
        "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/test",
        "REDIS_URL": "redis://127.0.0.1:6379/0",
    },
}


class Command(BaseCommand):
    help = (
        "Every benchmark in one run, for SQLite + the in-memory layer and for PostgreSQL + Redis: the engine "
        "(submit latency, throughput), the live path (20 tasks running, 1,000 browser sockets; progress and preview "
        "latency, frame sizes, event-loop lag, per-task counts) "
        "the heterogeneous pool against a naive policy, tiny jobs through the hub against straight to a server, and "
        "the hub with a large queue (2,000 tasks here; bench_queue alone defaults to 10,000). "
        "Each starts its own simulators and hub on a throw-away "
        "database. --quick runs smaller sizes."
    )

    def add_arguments(self, parser):
        parser.add_argument("--quick", action="store_true", help="Smaller runs, for a look in a few minutes")
        parser.add_argument("--postgres", default=CONFIGS["PostgreSQL + Redis"]["DATABASE_URL"])
        parser.add_argument("--redis", default=CONFIGS["PostgreSQL + Redis"]["REDIS_URL"])

    def handle(self, quick, postgres, redis, **options):
        CONFIGS["PostgreSQL + Redis"] = {"DATABASE_URL": postgres, "REDIS_URL": redis}
        quick_queue = ["--idle", "5"] if quick else []
        runs = [
            ("engine", ["bench_engine", *(["--samples", "20", "--tasks", "100"] if quick else [])]),
            ("live", ["bench_sockets", *(["--quick"] if quick else [])]),
            ("pool", ["bench_pool", *(["--tasks", "80", "--batch", "40", "--unit", "0.5"] if quick else [])]),
            ("burst", ["bench_burst", *(["--jobs", "20", "--singles", "5"] if quick else [])]),
            # A small queue here, to keep the whole run short: about 40 s for each configuration.
            ("queue", ["bench_queue", "--queued", "2000", "--users", "20", "--servers", "10", "--samples", "5",
                       "--accept-timeout", "5", *quick_queue]),
        ]
        started = time.monotonic()
        failed = 0
        for config, overrides in CONFIGS.items():
            env = {**os.environ}
            for key, value in overrides.items():
                if value is None:
                    env.pop(key, None)
                else:
                    env[key] = value
            env["LOG_LEVEL"] = "WARNING"
            for name, args in runs:
                self.stdout.write(f"== {config}: {name}")
                self.stdout.flush()
                reply = subprocess.run(  # noqa: S603
                    [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True
                )
                lines = [line for line in reply.stdout.splitlines() if line.strip()]
                self.stdout.write("\n".join(lines) or "(no output)")
                if reply.returncode:
                    failed += 1
                    self.stderr.write(f"{name} failed ({reply.returncode}): {reply.stderr[-1500:]}")
        self.stdout.write(f"all benchmarks done in {time.monotonic() - started:.0f} s")
        if failed:
            sys.exit(1)
