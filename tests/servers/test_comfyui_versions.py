"""The engine speaks both measured ComfyUI releases (comfyui-protocol.md §7): it learns the version from
/system_stats, cancels atomically through /api/jobs on 0.26 (recording itself the cancel of a pending job, which
0.26 forgets), names a missing node type, and always sends a client_id. Each test runs against a simulator of
each version."""

import httpx
import pytest

from comfysim import SimulatorThread
from servers.comfy import ComfyClient
from servers.models import Server, ServerState
from tasks.models import Task, TaskStatus
from tests.conftest import wait_for
from tests.tasks.test_engine import finished, run_and_hold

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(params=["0.3.64", "0.26.0"])
def simulator(request):
    with SimulatorThread(time_scale=0.01, comfyui_version=request.param) as sim:
        yield sim


@pytest.fixture
def server(transactional_db, simulator, hub):
    server = Server.objects.create(name="gpu-a", base_url=simulator.url, max_in_flight=2)
    wait_for(
        lambda: Server.objects.filter(
            pk=server.pk, state=ServerState.ONLINE, comfyui_version=simulator.sim.comfyui_version
        ).exists(),
        message="the server to be online with its version known",
    )
    return server


def messages(task, kind):
    return list(task.events.filter(kind=kind).values_list("message", flat=True))


def test_a_task_runs_with_a_client_id_and_a_uuid_prompt_id(alice_api, workflows, server, simulator):
    task = finished(alice_api.submit("invert", {"color": 12}).json()["id"])
    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert task.outputs.count() == 1
    [entry] = httpx.get(f"{simulator.url}/history/{task.prompt_id}").json().values()
    assert entry["prompt"][3]["client_id"].startswith(server.client_id)  # always sent: the end comes to our socket


def test_a_cancel_while_queued_on_the_server_is_recorded_by_the_hub(alice_api, workflows, server, simulator):
    running_id = run_and_hold(alice_api, simulator, 1)
    waiting_id = alice_api.submit("fast", {"color": 2}).json()["id"]
    wait_for(lambda: Task.objects.get(pk=waiting_id).accepted_at, message="second task in the server queue")
    assert alice_api.post(f"/api/v1/tasks/{waiting_id}/cancel").status_code == 200
    task = finished(waiting_id)
    assert task.status == TaskStatus.CANCELLED
    _, pending = simulator.call(simulator.sim.queue_snapshot)
    assert all(item[1] != task.prompt_id for item in pending)
    assert messages(task, "cancel_sent") == ["pending on gpu-a"]
    # The cancel's own answer or a reconciliation that runs meanwhile records it, in the same words.
    assert messages(task, "cancelled") == ["removed from gpu-a's queue"]
    if simulator.sim.modern:
        # Gone from 0.26 without a trace: only the hub knows it was cancelled.
        assert httpx.get(f"{simulator.url}/api/jobs/{task.prompt_id}").status_code == 404
    simulator.unstall()
    assert finished(running_id).status == TaskStatus.SUCCEEDED
    assert task.prompt_id not in simulator.sim.executed_prompt_ids


def test_a_cancel_while_running_interrupts_it(alice_api, workflows, server, simulator):
    simulator.set_time_scale(1.0)
    task_id = alice_api.submit("txt2img", {"steps": 60}).json()["id"]
    wait_for(lambda: Task.objects.get(pk=task_id).progress > 0.2, message="the sampler to make progress")
    alice_api.post(f"/api/v1/tasks/{task_id}/cancel")
    task = finished(task_id)
    assert task.status == TaskStatus.CANCELLED
    assert task.outputs.count() == 0
    assert messages(task, "cancel_sent") == ["running on gpu-a"]
    [entry] = httpx.get(f"{simulator.url}/history/{task.prompt_id}").json().values()
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"


def test_a_node_type_the_server_lacks_fails_the_task_naming_it(admin_api, server, simulator):
    simulator.call(simulator.sim.limit_capabilities, missing_nodes={"ImageInvert"})
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 3}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }
    task = finished(admin_api.post("/api/v1/tasks", {"prompt": graph}).json()["id"])
    assert task.status == TaskStatus.FAILED and task.error_kind == "rejected"
    assert "ImageInvert" in task.error
    if simulator.sim.modern:
        assert task.error == "the server has no node type ImageInvert (node 2); the custom node may not be installed"
        assert task.error_details["error"]["type"] == "missing_node_type"
    else:
        assert task.error_details["error"]["type"] == "invalid_prompt"


def test_reconciliation_finds_a_task_whose_end_the_socket_missed(
    alice_api, workflows, server, simulator, monkeypatch
):
    located = []
    real_locate = ComfyClient.locate

    async def locate(client, prompt_id):
        located.append(prompt_id)
        return await real_locate(client, prompt_id)

    monkeypatch.setattr(ComfyClient, "locate", locate)
    task_id = run_and_hold(alice_api, simulator, 9)
    prompt_id = Task.objects.get(pk=task_id).prompt_id
    simulator.unplug()  # it ends while nobody hears: its end messages are never replayed
    simulator.unstall()
    wait_for(lambda: [job for job in simulator.sim.job_log if job[0] == prompt_id], message="the job to end")
    simulator.plug()
    task = finished(task_id, timeout=30)
    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert task.outputs.count() == 1
    assert messages(task, "succeeded")[0].startswith("finished (history")
    # One task on the server: 0.26 answers where it is and its outputs in one GET /api/jobs/{id}.
    assert (prompt_id in located) is simulator.sim.modern
