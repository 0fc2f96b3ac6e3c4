"""The task engine end to end against the built-in ComfyUI simulator: no mocks inside the client."""

import asyncio
import contextlib
import hashlib
import uuid
from pathlib import Path

import httpx
import pytest

from servers.comfy import ComfyClient
from servers.models import Server, ServerState
from tasks.models import Task, TaskEvent, TaskStatus
from tests.conftest import wait_for
from tests.tasks.test_api import png_bytes, upload

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(params=["0.26.0", "0.3.64"], ids=lambda version: f"comfyui-{version}")
def simulator(request):
    """The engine's tests run against both ComfyUI versions the hub speaks (their differences: comfysim/README.md)."""
    from comfysim import SimulatorThread

    with SimulatorThread(time_scale=0.01, comfyui_version=request.param) as sim:
        yield sim


def finished(task_id, timeout=20):
    def done():
        task = Task.objects.get(pk=task_id)
        return task if task.is_terminal else None

    return wait_for(done, timeout=timeout, message=f"task {task_id} to finish")


def status_of(task_id):
    return Task.objects.get(pk=task_id).status


def run_and_hold(api, simulator, color):
    """Submit a slow task, wait until it runs, then freeze the simulator's worker so that it stays running."""
    simulator.set_time_scale(1.0)
    task_id = api.submit("blur-sharpen", {"color": color}).json()["id"]
    wait_for(lambda: status_of(task_id) == "running", message="the task to run")
    simulator.stall()
    simulator.set_time_scale(0.01)
    return task_id


def server_file(simulator, filename, subfolder="", kind="output"):
    reply = httpx.get(
        f"{simulator.url}/view",
        params={"filename": filename, "subfolder": subfolder, "type": kind},
        timeout=5,
    )
    reply.raise_for_status()
    return reply.content


def test_a_task_runs_to_completion_with_its_outputs_stored(alice_api, workflows, server, simulator, hub):
    reply = alice_api.submit("invert", {"color": 4321})
    task = finished(reply.json()["id"])
    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert task.progress == 1.0
    assert task.server == server
    assert task.prompt_id and task.attempts == 1
    assert task.submitted_at <= task.started_at <= task.finished_at
    body = alice_api.task(task.pk)
    assert body["status"] == "succeeded" and body["server"] == "gpu-a"
    [output] = body["outputs"]
    # The file name on the server starts with the task's own unguessable prefix, then the author's; its owner
    # sees and downloads it without the hub's part.
    stored = task.outputs.get().filename
    assert stored.startswith(task.graph["3"]["inputs"]["filename_prefix"] + "_")
    assert stored.startswith("ch-") and "-invert_" in stored
    assert output["filename"] == stored.split("-", 2)[2] and output["filename"].startswith("invert_")
    assert output["content_type"] == "image/png"
    download = alice_api.get(output["url"])
    content = b"".join(download.streaming_content)
    # Byte-identical to what the task's own server produced.
    assert content == server_file(simulator, stored)
    # It downloads named after its workflow (invert has no seed) and its place in the task.
    assert download["Content-Disposition"] == 'inline; filename="invert-1.png"'
    assert hashlib.sha256(content).hexdigest() == output["sha256"] and len(content) == output["size"]
    kinds = list(task.events.values_list("kind", flat=True))
    assert kinds[:2] == ["created", "submitted"]
    # The POST reply ("accepted") and the websocket's start ("running") race; running implies accepted.
    assert kinds[2] in ("accepted", "running") and "running" in kinds
    assert kinds[-1] == "succeeded"
    assert simulator.sim.executed_prompt_ids.count(task.prompt_id) == 1


def test_a_rerun_from_comfyuis_cache_still_succeeds_with_its_own_outputs(alice_api, workflows, server, simulator,
                                                                         hub):
    first = finished(alice_api.submit("invert", {"color": 77}).json()["id"])
    second = finished(alice_api.submit("invert", {"color": 77}).json()["id"])
    assert second.status == TaskStatus.SUCCEEDED, second.error
    assert second.progress == 1.0
    assert second.graph_hash == first.graph_hash and second.server == first.server
    # Only the save node runs again (its prefix is the task's own); the nodes before it come from the cache.
    [a], [b] = first.outputs.all(), second.outputs.all()
    assert a.filename != b.filename and b.filename.startswith(second.graph["3"]["inputs"]["filename_prefix"])


def test_a_fully_cached_rerun_still_succeeds_with_outputs(admin_api, server, simulator, hub):
    # A graph without a save node is the same graph each time: ComfyUI answers it from its cache alone.
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 77}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    first = finished(admin_api.post("/api/v1/tasks", {"prompt": graph}).json()["id"])
    second = finished(admin_api.post("/api/v1/tasks", {"prompt": graph}).json()["id"])
    assert second.status == TaskStatus.SUCCEEDED, second.error
    assert second.progress == 1.0
    [a], [b] = first.outputs.all(), second.outputs.all()
    assert a.filename == b.filename and a.sha256 == b.sha256


def test_a_validation_error_fails_the_task_with_comfyuis_message(admin_api, server, simulator, hub):
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": -5, "height": 8, "batch_size": 1, "color": 3}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    task = finished(admin_api.post("/api/v1/tasks", {"prompt": graph}).json()["id"])
    assert task.status == TaskStatus.FAILED
    assert task.error_kind == "rejected"
    assert "Value -5 smaller than min of 1" in task.error
    assert task.error_details["node_errors"]["1"]["class_type"] == "EmptyImage"
    running, pending = simulator.call(simulator.sim.queue_snapshot)
    assert running == [] and pending == []


def test_a_runtime_node_error_is_stored_with_the_node(admin_api, server, simulator, hub):
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 3}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }
    simulator.fail_node("2", "GPU on fire")
    task = finished(admin_api.post("/api/v1/tasks", {"prompt": graph}).json()["id"])
    assert task.status == TaskStatus.FAILED
    assert task.error_kind == "node_error"
    assert task.error_details["node_id"] == "2"
    assert task.error_details["node_type"] == "ImageInvert"
    assert "GPU on fire" in task.error
    assert task.outputs.count() == 0


def test_cancel_while_queued_on_the_server(alice_api, workflows, server, simulator, hub):
    running_id = run_and_hold(alice_api, simulator, 1)
    waiting_id = alice_api.submit("fast", {"color": 2}).json()["id"]
    wait_for(lambda: Task.objects.get(pk=waiting_id).accepted_at, message="second task in the server queue")
    reply = alice_api.post(f"/api/v1/tasks/{waiting_id}/cancel")
    assert reply.status_code == 200
    task = finished(waiting_id)
    assert task.status == TaskStatus.CANCELLED
    _, pending = simulator.call(simulator.sim.queue_snapshot)
    assert all(item[1] != task.prompt_id for item in pending)
    simulator.unstall()
    assert finished(running_id).status == TaskStatus.SUCCEEDED


def test_cancel_while_running_interrupts_it(alice_api, workflows, server, simulator, hub):
    simulator.set_time_scale(1.0)
    task_id = alice_api.submit("txt2img", {"steps": 60}).json()["id"]
    wait_for(lambda: Task.objects.get(pk=task_id).progress > 0.3, message="the sampler to make progress")
    alice_api.post(f"/api/v1/tasks/{task_id}/cancel")
    task = finished(task_id)
    assert task.status == TaskStatus.CANCELLED
    assert task.progress < 1.0
    assert task.outputs.count() == 0


def test_progress_moves_and_reaches_one_only_at_completion(alice_api, workflows, server, simulator, hub):
    simulator.set_time_scale(0.3)
    task_id = alice_api.submit("txt2img", {"steps": 30}).json()["id"]
    seen = []

    def sample():
        task = Task.objects.get(pk=task_id)
        seen.append(task.progress)
        return task.is_terminal

    wait_for(sample, timeout=30, interval=0.01, message="the task to finish")
    during = [p for p in seen[:-1] if 0 < p < 1]
    assert len(set(during)) >= 3, seen
    assert during == sorted(during)
    assert max(seen[:-1]) < 1.0
    assert seen[-1] == 1.0


def test_a_dropped_socket_mid_task_still_completes(alice_api, workflows, server, simulator, hub):
    simulator.set_time_scale(0.5)
    task_id = alice_api.submit("txt2img", {"steps": 20}).json()["id"]
    wait_for(lambda: status_of(task_id) == "running", message="the task to run")
    simulator.drop_sockets()
    task = finished(task_id, timeout=30)
    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert task.outputs.count() == 1
    assert task.events.filter(kind="succeeded").count() == 1


def test_completion_is_found_by_reconciliation_when_the_socket_was_down(
    alice_api, workflows, server, simulator, hub
):
    task_id = run_and_hold(alice_api, simulator, 9)
    # The job ends while the hub is reconnecting: its end messages are never replayed.
    simulator.drop_sockets()
    simulator.unstall()
    task = finished(task_id, timeout=30)
    assert task.status == TaskStatus.SUCCEEDED
    assert task.outputs.count() == 1


def test_a_restarted_server_loses_the_task_and_it_is_requeued(alice_api, workflows, server, simulator, hub):
    task_id = run_and_hold(alice_api, simulator, 11)
    old_prompt = Task.objects.get(pk=task_id).prompt_id
    simulator.unstall()
    simulator.restart(down_for=0.3)
    task = finished(task_id, timeout=30)
    assert task.status == TaskStatus.SUCCEEDED, task.error
    assert task.attempts == 2
    assert task.prompt_id != old_prompt
    requeued = task.events.get(kind="requeued")
    assert "lost" in requeued.message and requeued.prompt_id == old_prompt


def test_a_task_lost_too_often_fails_with_a_reason(alice_api, workflows, server, simulator, hub, settings):
    settings.COMFYHUB = {**settings.COMFYHUB, "MAX_ATTEMPTS": 1}
    task_id = run_and_hold(alice_api, simulator, 12)
    simulator.restart(down_for=0.2)
    task = finished(task_id, timeout=30)
    assert task.status == TaskStatus.FAILED
    assert task.error_kind == "lost"
    assert "gave up after 1 attempts" in task.error


def test_a_lost_post_reply_is_resolved_without_a_second_run(
    alice, workflows, server, simulator, fast_settings
):
    # The hub bound the task and sent the prompt, then died before recording the reply.
    task = Task.objects.create(owner=alice, workflow=workflows["fast"], graph=workflows["fast"].graph)
    prompt_id = str(uuid.uuid4())
    assert task.bind(server, prompt_id)

    async def post():
        async with ComfyClient(server.url) as client:
            await client.submit(task.graph, prompt_id, server.client_id)

    asyncio.run(post())

    async def in_history():
        async with ComfyClient(server.url) as client:
            return await client.history(prompt_id)

    wait_for(lambda: asyncio.run(in_history()), message="the job to finish on the server")
    from tests.conftest import Hub

    hub = Hub().start()
    try:
        task = finished(task.pk)
    finally:
        hub.stop()
    assert task.status == TaskStatus.SUCCEEDED
    assert task.prompt_id == prompt_id and task.attempts == 1
    assert simulator.sim.executed_prompt_ids.count(prompt_id) == 1
    assert "history" in task.events.get(kind="succeeded").message


def test_a_bound_task_that_never_reached_the_server_is_sent_once(
    alice, workflows, server, simulator, fast_settings
):
    # The hub died between recording the binding and sending the POST.
    task = Task.objects.create(owner=alice, workflow=workflows["fast"], graph=workflows["fast"].graph)
    prompt_id = str(uuid.uuid4())
    assert task.bind(server, prompt_id)
    from tests.conftest import Hub

    hub = Hub().start()
    try:
        task = finished(task.pk)
    finally:
        hub.stop()
    assert task.status == TaskStatus.SUCCEEDED
    assert task.prompt_id == prompt_id
    assert simulator.sim.executed_prompt_ids.count(prompt_id) == 1
    assert task.events.filter(kind="resubmitted").count() == 1


def test_reconciliation_passes_at_once_send_a_missing_prompt_once(alice, workflows, server, simulator, hub):
    # Passes overlap in production (the timer, a reconnect, a restart, adopted prompts): each starts from its own
    # snapshot of the tasks and of /queue, taken before another pass's POST landed.
    conn = wait_for(lambda: (c := hub.connection(server)) is not None and c.online and c, message="the socket")
    simulator.stall()  # keep the prompt in the queue, where a second POST would sit beside it
    task = Task.objects.create(owner=alice, workflow=workflows["fast"], graph=workflows["fast"].graph)
    prompt_id = str(uuid.uuid4())
    assert task.bind(server, prompt_id)

    async def passes():
        await asyncio.gather(*(conn.reconcile("overlap") for _ in range(4)))

    hub.call(passes())
    # The hub's own timer pass may be the one that sends it: wait for the server's reply to be recorded.
    wait_for(lambda: Task.objects.get(pk=task.pk).accepted_at, message="the prompt to be accepted")
    running, pending = simulator.call(simulator.sim.queue_snapshot)
    simulator.unstall()
    assert [item[1] for item in running + pending].count(prompt_id) == 1
    assert finished(task.pk).status == TaskStatus.SUCCEEDED
    assert simulator.sim.executed_prompt_ids.count(prompt_id) == 1
    assert Task.objects.get(pk=task.pk).events.filter(kind="resubmitted").count() == 1


def test_stopping_a_connection_ends_a_loop_that_lost_a_cancel():
    # A cancel can be lost (asyncio.wait_for's race on Python 3.11, asgiref's sync_to_async when its function is
    # running): the socket loop then goes on reading until the server closes the socket, and a supervisor that
    # waited for it once hung in a test's teardown until the simulator stopped.
    from servers.aio import cancel_and_wait

    async def socket_loop():
        with contextlib.suppress(asyncio.CancelledError):  # the lost cancel
            await asyncio.sleep(3600)
        while True:
            await asyncio.sleep(3600)

    async def scenario():
        loop = asyncio.create_task(socket_loop())
        await asyncio.sleep(0)
        await asyncio.wait_for(cancel_and_wait([loop]), timeout=5)
        return loop

    assert asyncio.run(scenario()).cancelled()


def test_uploaded_images_go_to_the_tasks_server(alice_api, workflows, server, simulator, hub):
    upload_id = upload(alice_api, png_bytes((40, 20))).json()["id"]
    task = finished(alice_api.submit("upload-scale", {"image": upload_id, "scale_by": 0.5}).json()["id"])
    assert task.status == TaskStatus.SUCCEEDED, task.error
    [output] = task.outputs.all()
    from PIL import Image

    with output.file.open("rb") as handle, Image.open(handle) as image:
        assert image.size == (20, 10)


def test_an_upload_already_on_the_server_is_not_written_again(alice_api, workflows, server, simulator, hub):
    # A task of the same user may be reading it right now: rewriting it in place gave LoadImage half a file.
    upload_id = upload(alice_api, png_bytes((40, 20))).json()["id"]
    first = finished(alice_api.submit("upload-scale", {"image": upload_id, "scale_by": 0.5}).json()["id"])
    [copy] = Path(simulator.sim.folders.input).glob("comfyhub-*")
    written = copy.stat().st_mtime_ns
    second = finished(alice_api.submit("upload-scale", {"image": upload_id, "scale_by": 0.25}).json()["id"])
    assert (first.status, second.status) == (TaskStatus.SUCCEEDED, TaskStatus.SUCCEEDED), second.error
    assert list(Path(simulator.sim.folders.input).glob("comfyhub-*")) == [copy]
    assert copy.stat().st_mtime_ns == written


def test_two_users_see_only_their_own_tasks_and_files(alice_api, bob_api, workflows, server, hub):
    mine = finished(alice_api.submit("fast", {"color": 5}).json()["id"])
    theirs = finished(bob_api.submit("fast", {"color": 6}).json()["id"])
    [output] = theirs.outputs.all()
    assert alice_api.get(f"/api/v1/outputs/{output.pk}").status_code == 404
    assert bob_api.get(f"/api/v1/outputs/{output.pk}").status_code == 200
    assert alice_api.get(f"/api/v1/tasks/{theirs.pk}").status_code == 404
    assert [t["id"] for t in alice_api.get("/api/v1/tasks").json()["tasks"]] == [str(mine.pk)]


def test_tasks_spread_over_two_servers_and_stay_bound(alice_api, workflows, transactional_db, fast_settings):
    from comfysim import SimulatorThread
    from tests.conftest import Hub

    with SimulatorThread(time_scale=0.05) as one, SimulatorThread(time_scale=0.05) as two:
        Server.objects.create(name="one", base_url=one.url)
        Server.objects.create(name="two", base_url=two.url)
        hub = Hub().start()
        try:
            ids = [alice_api.submit("invert", {"color": n}).json()["id"] for n in range(8)]
            tasks = [finished(task_id) for task_id in ids]
        finally:
            hub.stop()
    assert all(task.status == TaskStatus.SUCCEEDED for task in tasks)
    used = {task.server.name for task in tasks}
    assert used == {"one", "two"}
    for task in tasks:
        sim = one if task.server.name == "one" else two
        assert task.prompt_id in sim.sim.executed_prompt_ids
        assert (
            not TaskEvent.objects.filter(task=task).exclude(server=task.server).exclude(server=None).exists()
        )


def test_an_unreachable_server_is_marked_offline(alice_api, workflows, transactional_db, hub):
    dead = Server.objects.create(name="dead", base_url="http://127.0.0.1:9")
    task_id = alice_api.submit("fast", {}).json()["id"]
    wait_for(
        lambda: Server.objects.get(pk=dead.pk).state == ServerState.OFFLINE, message="the server offline"
    )
    assert Server.objects.get(pk=dead.pk).last_error
    assert status_of(task_id) == "queued"
