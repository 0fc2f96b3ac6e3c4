"""The production layout of deploy/ as processes on this machine: its hosts, their disks, and the helpers of
tests/test_deployment.py that start and read them."""

import io
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
import redis
from PIL import Image

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
# The PostgreSQL server and Redis used when the environment names none (they always run beside CI).
DEFAULT_POSTGRES = "postgres://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
REDIS_DB = 6  # the key prefix is this run's own anyway
TIME_SCALE = 0.05  # the invert workflow takes a fraction of a second
# What nginx adds to every request it passes on (deploy/nginx/comfyhub.conf); Daphne runs with --proxy-headers.
PROXIED = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "192.0.2.10"}
SUBMISSIONS = [("alice", 1), ("alice", 1), ("bob", 1), ("alice", 2), ("bob", 2), ("bob", 2)]  # (user, Daphne #)
HOSTS = ("admin", "web-1", "web-2", "upstream-1", "upstream-2")  # one disk each; "admin" runs manage.py commands


def postgres_url(database):
    """The URL of `database` on the PostgreSQL server of DATABASE_URL when it names one, else on the default."""
    configured = os.environ.get("DATABASE_URL", "")
    base = urlsplit(configured if configured.startswith(("postgres://", "postgresql://")) else DEFAULT_POSTGRES)
    return urlunsplit(base._replace(path=f"/{database}", query=""))


def redis_url():
    base = urlsplit(os.environ.get("REDIS_URL") or DEFAULT_REDIS)
    return urlunsplit(base._replace(path=f"/{REDIS_DB}"))


def host_disk(tmp_path, host):
    """The variables that give one host's processes a disk of their own: nothing on it is shared with another."""
    root = tmp_path / "hosts" / host
    return {
        "MEDIA_ROOT": str(root / "media"),
        "STATIC_ROOT": str(root / "static"),
        "COMFYHUB_VAR_DIR": str(root / "var"),
    }


def files_under(folder):
    return sorted(str(path.relative_to(folder)) for path in Path(folder).rglob("*") if path.is_file())


def png(color):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, "PNG")
    return buffer.getvalue()


def query(url, sql, params=()):
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else None


def forget_keys(url, prefix):
    """Delete this run's keys (channel layer groups live for a day, the throttle's counters for minutes)."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def procfile():
    """{process type: argv} from deploy/Procfile, run with the executables of the interpreter running the tests."""
    commands = {}
    for line in (ROOT / "deploy" / "Procfile").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            kind, _, command = line.partition(":")
            argv = shlex.split(command)
            argv[0] = str(Path(sys.executable).parent / Path(argv[0]).name)
            commands[kind.strip()] = argv
    return commands


class Process:
    """One long-running process of the layout, its output in a log file."""

    def __init__(self, name, argv, env, tmp_path):
        self.name = name
        self.log_path = tmp_path / f"{name}.log"
        self.log = open(self.log_path, "w+")  # noqa: SIM115  (closed by stop())
        self.process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.process.pid
        self.interrupted = False

    def text(self):
        return self.log_path.read_text(errors="replace")

    def tail(self, lines=25):
        return "\n".join([f"--- {self.name} (pid {self.pid}), last {lines} lines:", *self.text().splitlines()[-lines:]])

    def interrupt(self):
        """SIGINT, once: a second one after the event loop has closed would end the process with SIGINT's status."""
        if self.process.poll() is None and not self.interrupted:
            self.process.send_signal(signal.SIGINT)
            self.interrupted = True

    def stop(self, timeout=10):
        """SIGINT, then SIGKILL if it has not exited within `timeout` seconds; returns the exit code."""
        try:
            self.interrupt()
            try:
                return self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait(timeout=15)
        finally:
            self.log.close()


class Layout:
    """The processes started so far, for waiting on conditions and for failure messages."""

    def __init__(self, env, tmp_path):
        self.env = env
        self.tmp_path = tmp_path
        self.processes = []

    def start(self, name, argv, **extra_env):
        process = Process(name, argv, {**self.env, **extra_env}, self.tmp_path)
        self.processes.append(process)
        return process

    def describe(self):
        return "\n".join(process.tail() for process in self.processes)

    def wait(self, predicate, what, timeout=20.0, interval=0.1):
        deadline = time.monotonic() + timeout
        while True:
            for process in self.processes:
                if process.process.poll() is not None:
                    pytest.fail(f"{process.name} exited with {process.process.returncode}\n{self.describe()}")
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout}s waiting for {what}\n{self.describe()}")
            time.sleep(interval)

    def stop_all(self):
        for process in self.processes:
            process.interrupt()  # all at once: they stop in parallel
        for process in self.processes:
            process.stop()


def manage(env, *commands):
    """Run short `manage.py` commands at once (each a tuple of arguments); return their outputs, in order."""
    return manage_on(*((env, args) for args in commands))


def manage_on(*runs):
    """Like manage(), each command with an environment of its own: runs are (env, arguments) pairs."""
    running = [
        subprocess.Popen(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for env, args in runs
    ]
    outputs = []
    for (_, args), process in zip(runs, running, strict=True):
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, f"manage.py {' '.join(args)} failed:\n{output}"
        outputs.append(output)
    return outputs


def get(url, **kwargs):
    try:
        return httpx.get(url, timeout=2, **kwargs)
    except httpx.HTTPError:
        return None


def log_in(base, username, password):
    """
    A browser logging in through the proxy; returns its session cookie. Outside it is HTTPS, so the cookies are
    Secure (COMFYHUB_PRODUCTION), which an HTTP client's cookie jar keeps from plain http://: they go by hand.
    """
    headers = {**PROXIED, "Origin": base.replace("http://", "https://")}
    page = httpx.get(f"{base}/accounts/login/", headers=headers, timeout=10)
    assert page.status_code == 200, page.text
    csrf = page.cookies["csrftoken"]
    reply = httpx.post(
        f"{base}/accounts/login/",
        headers={**headers, "Cookie": f"csrftoken={csrf}"},
        data={"username": username, "password": password, "csrfmiddlewaretoken": csrf},
        timeout=10,
    )
    assert reply.status_code == 302, reply.text
    return reply.cookies["sessionid"]


def leases(db_url):
    """{server pk: owner} of the unexpired upstream leases."""
    rows = query(db_url, "SELECT key, owner FROM servers_lock WHERE purpose = 'upstream' AND expires_at > now()")
    return {int(key.removeprefix("server:")): owner for key, owner in rows}


def transitions(process, task_id):
    """The `comfyhub.tasks` log lines a process wrote about a task, as {field: value} dicts."""
    return [
        dict(re.findall(r"(\w+)=(\S+)", line.split("comfyhub.tasks: ", 1)[1]))
        for line in process.text().splitlines()
        if "comfyhub.tasks: " in line and f"task={task_id} " in line
    ]


USERS_SCRIPT = """
from django.contrib.auth import get_user_model
for name in ("alice", "bob"):
    get_user_model().objects.create_user(name, password=f"{name}-pass-123")
"""
