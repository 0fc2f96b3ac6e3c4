import json
import subprocess
import sys
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.test import Client

from servers.models import Server
from tasks.models import Workflow

pytestmark = pytest.mark.django_db


def run(*args):
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_add_server_is_idempotent():
    assert "Added server gpu-1" in run("add_server", "gpu-1", "http://10.0.0.5:8188/", "--max-in-flight", "3")
    assert "Updated server gpu-1" in run("add_server", "gpu-1", "http://10.0.0.6:8188")
    server = Server.objects.get()
    assert server.base_url == "http://10.0.0.6:8188" and server.max_in_flight == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["gpu-1", "ftp://x"], "is not an http:// or https:// URL"),
        (["gpu 1", "http://x:1"], "name"),
        (["gpu-1", "http://x:1", "--max-in-flight", "0"], "at least 1"),
    ],
)
def test_add_server_refuses_bad_input(args, message):
    with pytest.raises(CommandError, match=message):
        run("add_server", *args)
    assert not Server.objects.exists()


def test_create_token_prints_a_working_token(alice):
    token = run("create_token", "alice").strip()
    assert Client(HTTP_AUTHORIZATION=f"Bearer {token}").get("/api/v1/tasks").status_code == 200
    with pytest.raises(CommandError, match="no user 'nobody'"):
        run("create_token", "nobody")


def test_load_workflow_creates_then_updates(tmp_path):
    path = tmp_path / "wf.json"
    graph = {"1": {"class_type": "EmptyImage", "inputs": {"color": 1}}}
    data = {"slug": "mine", "name": "Mine", "graph": graph, "parameters": []}
    path.write_text(json.dumps(data))
    assert "Created workflow mine" in run("load_workflow", str(path))
    path.write_text(json.dumps({**data, "name": "Mine, renamed"}))
    assert "Updated workflow mine" in run("load_workflow", str(path))
    assert Workflow.objects.get().name == "Mine, renamed"


def test_load_workflow_refuses_a_broken_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps(
            {
                "slug": "bad",
                "name": "Bad",
                "graph": {"1": {"class_type": "X", "inputs": {}}},
                "parameters": [{"name": "p", "type": "int", "node": "7", "input": "x"}],
            }
        )
    )
    with pytest.raises(CommandError, match="points at node '7'"):
        run("load_workflow", str(path))
    with pytest.raises(CommandError, match="does not exist"):
        run("load_workflow", str(tmp_path / "missing.json"))
    assert not Workflow.objects.exists()


def test_the_demo_workflows_load():
    out = run("load_workflow", "--demo")
    assert "txt2img" in out and "upload-scale" in out
    assert Workflow.objects.count() == 5


def test_serve_help_says_what_host_and_port_are():
    done = subprocess.run(
        [sys.executable, "manage.py", "serve", "--help"], cwd=settings.BASE_DIR, capture_output=True, text=True,
        timeout=60,
    )
    text = " ".join(done.stdout.split())  # argparse wraps to the terminal's width
    assert done.returncode == 0, done.stderr
    assert "--host ADDRESS Address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0:" in text
    assert "--port PORT TCP port to listen on (default: 8000)" in text
    assert "another serve on the same folder refuses to start" in text
