"""A graph no server of the pool can run is refused at submit, or failed once waiting cannot help."""

from datetime import timedelta

import pytest
from django.utils import timezone

from comfysim import SimulatorThread
from servers import pool
from servers.dispatch import summarize_object_info
from servers.models import Server, ServerState
from tasks.models import Task, TaskStatus
from tests.conftest import Hub, wait_for

NO_SUCH_NODE = {
    "1": {"class_type": "NoSuchNode", "inputs": {}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
}


def capabilities(*classes, checkpoints=()):
    info = {name: {"input": {"required": {}}} for name in classes}
    if checkpoints:
        info["CheckpointLoaderSimple"] = {"input": {"required": {"ckpt_name": [list(checkpoints)]}}}
    return summarize_object_info(info)


def known(name, *classes, **fields):
    return Server.objects.create(
        name=name, base_url=f"http://{name}.invalid:8188", capabilities=capabilities(*classes), **fields
    )


@pytest.mark.django_db
def test_a_graph_with_a_node_type_no_server_has_is_refused_at_submit(admin_api):
    known("gpu-a", "SaveImage", "EmptyImage")
    known("gpu-b", "SaveImage")
    reply = admin_api.post("/api/v1/tasks", {"prompt": NO_SUCH_NODE})
    assert reply.status_code == 400, reply.content
    body = reply.json()["error"]
    assert body["code"] == "no_capable_server"
    assert "gpu-a and gpu-b lack node types NoSuchNode" in body["message"]
    assert "NoSuchNode" in body["details"]["prompt"]
    assert not Task.objects.exists()


@pytest.mark.django_db
def test_a_graph_naming_a_model_file_no_server_has_is_refused_and_says_where_it_looked(admin_api):
    Server.objects.create(
        name="gpu-a", base_url="http://a.invalid:8188",
        capabilities=capabilities("SaveImage", checkpoints=["sdxl.safetensors"]),
    )
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux-dev.safetensors"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    reply = admin_api.post("/api/v1/tasks", {"prompt": graph})
    assert reply.status_code == 400
    assert "gpu-a lacks model files flux-dev.safetensors" in reply.json()["error"]["message"]
    graph["1"]["inputs"]["ckpt_name"] = "sdxl.safetensors"
    assert admin_api.post("/api/v1/tasks", {"prompt": graph}).status_code == 201


@pytest.mark.django_db
def test_a_workflow_whose_graph_no_server_can_run_is_refused_on_the_form_too(client, alice, workflows):
    known("gpu-a", "SaveImage")  # no EmptyImage, no ImageInvert
    client.force_login(alice)
    reply = client.post("/workflows/invert/", {"color": "#000005", "width": "64", "height": "64"})
    assert reply.status_code == 400
    assert "no server in the pool can run it" in reply.content.decode()
    assert not Task.objects.exists()


@pytest.mark.django_db
def test_a_graph_may_wait_while_some_server_was_never_reached(admin_api):
    known("gpu-a", "SaveImage")
    Server.objects.create(name="gpu-new", base_url="http://new.invalid:8188")  # capabilities not known yet
    reply = admin_api.post("/api/v1/tasks", {"prompt": NO_SUCH_NODE})
    assert reply.status_code == 201, reply.content
    task = Task.objects.get(pk=reply.json()["id"])
    assert task.status == TaskStatus.QUEUED
    pool.make_plan({}, 50)
    task.refresh_from_db()
    assert task.status == TaskStatus.QUEUED  # not yet past COMFYHUB_UNRUNNABLE_SECONDS


@pytest.mark.django_db
def test_a_queued_task_fails_once_every_server_is_known_and_none_can_run_it(admin_api):
    late = Server.objects.create(name="gpu-late", base_url="http://late.invalid:8188")
    task_id = admin_api.post("/api/v1/tasks", {"prompt": NO_SUCH_NODE}).json()["id"]
    Server.objects.filter(pk=late.pk).update(capabilities=capabilities("SaveImage"), state=ServerState.ONLINE)
    pool.make_plan({}, 50)
    task = Task.objects.get(pk=task_id)
    assert task.status == TaskStatus.FAILED
    assert task.error_kind == "no_capable_server"
    assert "gpu-late lacks node types NoSuchNode" in task.error


@pytest.mark.django_db
def test_a_task_waits_for_a_capable_server_that_is_offline(admin_api):
    known("gpu-a", "SaveImage", state=ServerState.ONLINE)
    known("gpu-b", "SaveImage", "NoSuchNode", state=ServerState.OFFLINE)
    task_id = admin_api.post("/api/v1/tasks", {"prompt": NO_SUCH_NODE}).json()["id"]
    Task.objects.filter(pk=task_id).update(created_at=timezone.now() - timedelta(days=1))
    pool.make_plan({}, 50)
    task = Task.objects.get(pk=task_id)
    assert task.status == TaskStatus.QUEUED
    assert "can run it" in task.waiting_reason


@pytest.mark.django_db(transaction=True)
def test_a_task_waiting_on_a_server_never_reached_fails_after_the_deadline(admin_api, fast_settings):
    fast_settings.COMFYHUB = {**fast_settings.COMFYHUB, "UNRUNNABLE_SECONDS": 1, "PROBE_INTERVAL": 0.2}
    with SimulatorThread(time_scale=0.01) as sim:
        Server.objects.create(name="gpu-a", base_url=sim.url)
        Server.objects.create(name="gpu-gone", base_url="http://127.0.0.1:9")  # refuses every connection
        hub = Hub().start()
        try:
            task_id = admin_api.post("/api/v1/tasks", {"prompt": NO_SUCH_NODE}).json()["id"]
            task = wait_for(
                lambda: (t := Task.objects.get(pk=task_id)).is_terminal and t, timeout=20, message="the task to fail"
            )
            runnable = admin_api.post(
                "/api/v1/tasks",
                {"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                                           "color": 0}},
                            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                                          "filename_prefix": "ok"}}}},
            ).json()["id"]
            other = wait_for(
                lambda: (t := Task.objects.get(pk=runnable)).is_terminal and t, timeout=20, message="the other task"
            )
        finally:
            hub.stop()
    assert task.status == TaskStatus.FAILED
    assert task.error_kind == "no_capable_server"
    assert "gpu-a lacks node types NoSuchNode" in task.error
    assert "gpu-gone" in task.error and "gave up after waiting 1 s" in task.error
    assert other.status == TaskStatus.SUCCEEDED, other.error
