"""Helpers for commands and tests that start hub processes on this machine and measure them (benchmarks, chaos run)."""

import signal
import socket
import subprocess
import sys
import time

import httpx
from django.conf import settings
from django.db import connection


def free_port():
    """A TCP port on the loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_manage(*args, env, **popen):
    """Start `manage.py <args>` of this project as a child process."""
    return subprocess.Popen(  # noqa: S603
        [sys.executable, "manage.py", *args], cwd=settings.BASE_DIR, env=env, **popen
    )


def stop(process, timeout=15):
    """Ask a child to stop as Ctrl-C would; kill it if it has not stopped after `timeout` seconds."""
    if process.poll() is not None:
        return process.returncode
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def healthy(base_url):
    """Whether a hub answers its liveness probe."""
    try:
        return httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(predicate, timeout, what, interval=0.2, error=TimeoutError):
    """Poll `predicate` until it returns something true (returned) or `timeout` seconds pass (`error` raised)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise error(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def database_url():
    """The URL of the database this process uses, for a child process that must use the same one."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    host, port = db["HOST"] or "127.0.0.1", db["PORT"] or 5432
    credentials = f"{db['USER']}:{db['PASSWORD']}" if db.get("PASSWORD") else db["USER"]
    return f"postgres://{credentials}@{host}:{port}/{db['NAME']}"


def percentile(values, p):
    """Nearest-rank percentile (p in 0..100) of a list of numbers; NaN for an empty list."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[min(int(rank), len(ordered)) - 1]
