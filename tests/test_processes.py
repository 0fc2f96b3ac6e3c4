"""The hub's real processes: `serve` (Daphne + supervisor in one process) and `run_upstream` beside the tests."""

import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from comfyhub.harness import database_url, free_port, start_manage, stop
from servers.models import Server
from tasks.models import Task, TaskStatus
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent


def serving(hub, base, log_path):
    """Wait until a `serve` answers on `base` (or has ended: the assertion then shows its log)."""

    def up():
        try:
            return httpx.get(f"{base}/api/v1/tasks", timeout=1).status_code == 401
        except httpx.HTTPError:
            return hub.poll() is not None

    wait_for(up, timeout=60, message="serve to listen")
    assert hub.poll() is None, log_path.read_text()


def test_serve_runs_a_task_end_to_end(tmp_path):
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")},
        "DATABASE_URL": f"sqlite:///{tmp_path / 'hub.sqlite3'}",
        "MEDIA_ROOT": str(tmp_path / "media"),
        "COMFYHUB_VAR_DIR": str(tmp_path / "var"),  # not the checkout's var/, which a hub of yours may be using
    }
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115
    hub = start_manage("serve", "--demo", "--port", str(port), "--time-scale", "0.01", env=env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        serving(hub, base, tmp_path / "serve.log")
        token = subprocess.run(
            [sys.executable, "manage.py", "create_token", "demo"], cwd=ROOT, env=env, capture_output=True, text=True
        ).stdout.strip()
        api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        reply = api.post("/api/v1/tasks", json={"workflow": "txt2img", "inputs": {"prompt": "a fox", "steps": 5}})
        assert reply.status_code == 201, reply.text
        task_id = reply.json()["id"]

        def done():
            body = api.get(f"/api/v1/tasks/{task_id}").json()
            return body if body["status"] in ("succeeded", "failed", "cancelled") else None

        body = wait_for(done, timeout=60, message="the task to finish")
        assert body["status"] == "succeeded", body
        assert body["server"] in ("sim-1", "sim-2")
        [output] = body["outputs"]
        image = api.get(output["url"])
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
        assert len(image.content) == output["size"]
        assert "127.0.0.1" not in reply.text + image.headers.get("content-disposition", "")
    finally:
        stop(hub)
        log.close()


def demo_servers(var):
    with closing(sqlite3.connect(var / "comfyhub.sqlite3")) as db:
        return sorted(db.execute("SELECT name, base_url, client_id FROM servers_server"))


def test_a_second_serve_on_the_same_var_folder_refuses_before_changing_anything(tmp_path):
    var = tmp_path / "var"
    unset = ("DATABASE_URL", "REDIS_URL", "MEDIA_ROOT", "STATIC_ROOT", "COMFYHUB_VAR_DIR")
    env = {**{k: v for k, v in os.environ.items() if k not in unset}, "COMFYHUB_VAR_DIR": str(var)}
    port = free_port()
    log_path = tmp_path / "first.log"
    log = open(log_path, "w+")  # noqa: SIM115
    first = start_manage("serve", "--demo", "--port", str(port), env=env, stdout=log, stderr=log)
    third = None
    try:
        serving(first, f"http://127.0.0.1:{port}", log_path)
        before = demo_servers(var)
        assert [name for name, _, _ in before] == ["sim-1", "sim-2"]
        second = subprocess.run(
            [sys.executable, "manage.py", "serve", "--demo", "--port", str(free_port())],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )
        assert second.returncode == 1, second.stdout + second.stderr
        assert (
            f"Another comfyhub is already serving from {var.resolve()} (pid {first.pid}); stop it first"
        ) in second.stderr
        assert "Created the demo user" not in second.stdout
        assert demo_servers(var) == before  # its simulators' URLs are still the first one's
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).text == "ok"

        first.kill()  # a crash: no clean shutdown, the lock file stays behind
        first.wait()
        third_port = free_port()
        third_log = open(tmp_path / "third.log", "w+")  # noqa: SIM115
        third = start_manage("serve", "--demo", "--port", str(third_port), env=env, stdout=third_log, stderr=third_log)
        serving(third, f"http://127.0.0.1:{third_port}", tmp_path / "third.log")
        assert demo_servers(var) != before  # the new one took the folder over with its own simulators
    finally:
        stop(first)
        log.close()
        if third is not None:
            stop(third)
            third_log.close()


@pytest.mark.django_db(transaction=True)
def test_run_upstream_process_takes_the_work(alice_api, workflows, simulator, tmp_path, media_root):
    Server.objects.create(name="gpu-a", base_url=simulator.url)
    env = {**os.environ, "DATABASE_URL": database_url(), "MEDIA_ROOT": str(media_root)}
    log = open(tmp_path / "upstream.log", "w+")  # noqa: SIM115
    worker = start_manage("run_upstream", "--tick", "0.2", env=env, stdout=log, stderr=log)
    try:
        task_id = alice_api.submit("invert", {"color": 99}).json()["id"]
        task = wait_for(
            lambda: Task.objects.filter(pk=task_id, status__in=["succeeded", "failed"]).first(),
            timeout=60,
            message="the worker to finish the task",
        )
        assert task.status == TaskStatus.SUCCEEDED, task.error
        [output] = alice_api.task(task_id)["outputs"]
        assert alice_api.get(output["url"]).status_code == 200
    finally:
        stop(worker)
        log.close()
    assert "stopped" in (tmp_path / "upstream.log").read_text()
