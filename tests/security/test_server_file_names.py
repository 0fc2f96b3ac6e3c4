"""
A ComfyUI server's input and output folders are shared by all its users, and output names are sequential
(ComfyUI_00003_.png): every save node gets a prefix made for its task, and no typed text may name a file there.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.models import Task, TaskOutput, TaskStatus, Workflow
from tasks.workflows import WorkflowFileError, load_workflow
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent.parent
PREFIX = re.compile(r"ch-[0-9a-f]{24}")


def prefix_of(task, node="3"):
    return task.graph[node]["inputs"]["filename_prefix"]


@pytest.mark.django_db
def test_every_task_gets_its_own_unguessable_prefix(alice_api, workflows):
    first, second = (Task.objects.get(pk=alice_api.submit("invert", {"color": 5}).json()["id"]) for _ in range(2))
    assert PREFIX.fullmatch(prefix_of(first).removesuffix("-invert"))
    assert prefix_of(first).endswith("-invert") and prefix_of(first) != prefix_of(second)
    # The same graph for affinity: identical graphs of one user still meet ComfyUI's cache on one server.
    assert first.graph_hash == second.graph_hash
    # The workflow keeps the author's prefix; only the task's copy changes.
    assert Workflow.objects.get(slug="invert").graph["3"]["inputs"]["filename_prefix"] == "invert"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("given", "kept"),
    [("../../escape", "escape"), ("/abs/dir/out", "out"), ("a b%date:yyyy%", "abdateyyyy"), (["9", 0], ""),
     ("", ""), ("ch-0123456789abcdef01234567-again", "again")],
    ids=["dotdot", "absolute", "odd-characters", "linked", "empty", "hub-prefix-again"],
)
def test_a_raw_graph_keeps_a_plain_name_of_its_prefix_and_never_a_path(admin_api, given, kept):
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 3}},
        "3": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["1", 0], "filename_prefix": given}},
    }
    reply = admin_api.post("/api/v1/tasks", {"prompt": graph})
    assert reply.status_code == 201, reply.content
    prefix = prefix_of(Task.objects.get())
    assert PREFIX.fullmatch(prefix[:27]) and prefix[27:] == (f"-{kept}" if kept else "")


@pytest.mark.django_db(transaction=True)
def test_the_stored_output_is_named_after_the_tasks_prefix(alice_api, workflows, server, simulator, hub):
    ids = [alice_api.submit("invert", {"color": color}).json()["id"] for color in (11, 12)]

    def finished():
        tasks = list(Task.objects.filter(pk__in=ids, status=TaskStatus.SUCCEEDED))
        return tasks if len(tasks) == 2 else None

    tasks = wait_for(finished, timeout=20, message="both tasks to succeed")
    names = set()
    for task in tasks:
        [output] = task.outputs.all()
        assert output.filename.startswith(prefix_of(task) + "_"), (output.filename, prefix_of(task))
        names.add(output.filename)
    # Nothing on the server is named in a sequence another user could walk.
    on_server = set(os.listdir(simulator.sim.folders.output))
    assert names <= on_server and all(PREFIX.match(name) for name in on_server)


# --- file-naming inputs come only from uploads ----------------------------------------------------------------


def workflow_file(tmp_path, parameter):
    path = tmp_path / "peek.json"
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "peek"}},
    }
    path.write_text(json.dumps({"slug": "peek", "name": "Peek", "graph": graph, "parameters": [parameter]}))
    return path


TYPED_NAME = {"name": "picture", "type": "text", "node": "1", "input": "image"}
SENTENCE = "parameter 'picture' lets users type the image of LoadImage (node 1), a file name on the server"


@pytest.mark.django_db
def test_a_workflow_whose_text_names_a_server_file_is_refused_by_load_workflow(tmp_path):
    with pytest.raises(WorkflowFileError, match=re.escape(SENTENCE)):
        load_workflow(workflow_file(tmp_path, TYPED_NAME))
    choice = {"name": "picture", "type": "choice", "choices": ["a.png"], "node": "1", "input": "image"}
    with pytest.raises(WorkflowFileError, match="declare it with type image"):
        load_workflow(workflow_file(tmp_path, choice))
    assert not Workflow.objects.exists()
    # Declared as an image, only the user's own uploads go there: that loads.
    load_workflow(workflow_file(tmp_path, {**TYPED_NAME, "type": "image"}))


def test_the_load_workflow_command_exits_with_the_sentence(tmp_path):
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'unused.sqlite3'}"}
    done = subprocess.run(
        [sys.executable, "manage.py", "load_workflow", str(workflow_file(tmp_path, TYPED_NAME))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1 and SENTENCE in done.stderr, done.stderr


@pytest.mark.django_db
def test_a_stored_workflow_whose_text_names_a_server_file_is_refused_at_submit(alice_api, tmp_path):
    # Stored before load_workflow refused it (or edited in the admin).
    data = json.loads(workflow_file(tmp_path, TYPED_NAME).read_text())
    Workflow.objects.create(slug="peek", name="Peek", graph=data["graph"], parameters=data["parameters"])
    reply = alice_api.submit("peek", {"picture": "ComfyUI_00001_.png [output]"})
    assert reply.status_code == 400
    assert "names a file on the server" in reply.json()["error"]["details"]["picture"]
    assert not Task.objects.exists()


def test_owners_see_output_names_without_the_hub_prefix():
    token = "ch-" + "0a" * 12
    assert TaskOutput(filename=f"{token}-invert_00001_.png").display_name == "invert_00001_.png"
    assert TaskOutput(filename=f"{token}_00001_.png").display_name == "output_00001_.png"  # no prefix of its own
    assert TaskOutput(filename="ComfyUI_00001_.png").display_name == "ComfyUI_00001_.png"
    assert TaskOutput(filename="ch-not-hex-at-all.png").display_name == "ch-not-hex-at-all.png"
