"""The pool against real simulators: capability, fair share, draining, restarts, failover, affinity."""

import io

import pytest

from comfysim import SimulatorThread
from servers.models import Lock, LockPurpose, Server, ServerEvent, ServerState, StalePrompt
from tasks.models import Task, TaskEvent, TaskStatus
from tests.conftest import Hub, wait_for
from tests.tasks.test_api import png_bytes

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def pool_settings(fast_settings):
    fast_settings.COMFYHUB = {**fast_settings.COMFYHUB, "PROBE_INTERVAL": 0.2, "FAILOVER_SECONDS": 1}
    return fast_settings


@pytest.fixture
def sims():
    with SimulatorThread(time_scale=0.01, name="one") as one, SimulatorThread(time_scale=0.01, name="two") as two:
        yield one, two


@pytest.fixture
def hub(pool_settings):
    running = Hub().start()
    yield running
    running.stop()


def add(name, sim, **fields):
    return Server.objects.create(name=name, base_url=sim.url, **fields)


def task(task_id):
    return Task.objects.select_related("server").get(pk=task_id)


def done(task_id, timeout=30):
    return wait_for(
        lambda: task(task_id) if task(task_id).is_terminal else None, timeout=timeout, message=f"task {task_id}"
    )


def when(task_id, predicate, message, timeout=20):
    return wait_for(lambda: predicate(task(task_id)), timeout=timeout, message=message)


def test_a_task_only_goes_to_servers_with_its_node_types(alice_api, workflows, sims, hub):
    one, two = sims
    one.sim.limit_capabilities(missing_nodes={"ImageInvert"})
    add("lacks-invert", one)
    add("full", two)
    ids = [alice_api.submit("invert", {"color": n}).json()["id"] for n in range(4)]
    for task_id in ids:
        finished = done(task_id)
        assert finished.status == TaskStatus.SUCCEEDED, finished.error
        assert finished.server.name == "full"


def test_a_task_no_server_can_run_says_why_and_runs_when_one_can(alice_api, workflows, sims, hub):
    one, two = sims
    one.sim.limit_capabilities(missing_nodes={"ImageInvert"})
    add("lacks-invert", one)
    # Not reached yet, so what it can run is unknown: the task may wait for it (were every server known to lack
    # ImageInvert, the submit would be refused).
    full = Server.objects.create(name="full", base_url="http://127.0.0.1:9")
    task_id = alice_api.submit("invert", {"color": 5}).json()["id"]
    body = wait_for(
        lambda: "can run it" in ((reply := alice_api.task(task_id))["waiting_reason"] or "") and reply,
        message="the reason it waits",
    )
    assert body["status"] == "queued"
    assert body["waiting_reason"].startswith("waiting: no online server can run it")
    assert "lacks-invert lacks node types ImageInvert" in body["waiting_reason"]
    Server.objects.filter(pk=full.pk).update(base_url=two.url)
    finished = done(task_id)
    assert finished.status == TaskStatus.SUCCEEDED and finished.server.name == "full"
    assert alice_api.task(task_id)["waiting_reason"] is None


def test_one_users_batch_does_not_starve_another_users_task(alice_api, bob_api, workflows, sims, hub):
    one, _ = sims
    one.set_time_scale(0.05)
    add("only", one)
    batch = [alice_api.submit("blur-sharpen", {"color": n}).json()["id"] for n in range(8)]
    wait_for(lambda: task(batch[0]).status == TaskStatus.RUNNING, message="alice's first task to run")
    single = bob_api.submit("blur-sharpen", {"color": 999}).json()["id"]
    bobs = done(single, timeout=60)
    assert bobs.status == TaskStatus.SUCCEEDED
    alices = [done(task_id, timeout=60) for task_id in batch]
    ahead = [t for t in alices if t.started_at < bobs.started_at]
    # At most what was already on the server when Bob submitted: the running task and the next one.
    assert len(ahead) <= 2, [t.started_at for t in alices]
    assert TaskEvent.objects.filter(task_id=single, kind="submitted").exists()


def test_draining_stops_new_work_and_lets_current_work_finish(alice_api, workflows, sims, hub):
    one, two = sims
    one.set_time_scale(0.5)
    first = add("first", one)
    running = alice_api.submit("blur-sharpen", {"color": 1}).json()["id"]
    when(running, lambda t: t.status == TaskStatus.RUNNING, "the first task to run")
    add("second", two)
    Server.objects.filter(pk=first.pk).update(draining=True)
    later = [alice_api.submit("invert", {"color": n}).json()["id"] for n in range(3)]
    for task_id in later:
        assert done(task_id).server.name == "second"
    finished = done(running, timeout=60)
    assert finished.status == TaskStatus.SUCCEEDED and finished.server == first
    wait_for(lambda: Server.objects.get(pk=first.pk).state == ServerState.DRAINING, message="state draining")


def test_a_restart_is_detected_recorded_and_its_tasks_retried(alice_api, workflows, sims, hub):
    one, _ = sims
    server = add("gpu", one)
    one.set_time_scale(1.0)
    task_id = alice_api.submit("blur-sharpen", {"color": 3}).json()["id"]
    when(task_id, lambda t: t.status == TaskStatus.RUNNING, "the task to run")
    one.restart()
    one.set_time_scale(0.01)
    finished = done(task_id)
    assert finished.status == TaskStatus.SUCCEEDED and finished.attempts == 2
    assert TaskEvent.objects.filter(task_id=task_id, kind="requeued").exists()
    wait_for(
        lambda: ServerEvent.objects.filter(server=server, kind="restarted").exists(),
        message="the restart in the server's trail",
    )


def hold_two_on(api, sim):
    """Two tasks on `sim`: the first running and frozen there, the second waiting in its queue."""
    sim.set_time_scale(1.0)
    running = api.submit("blur-sharpen", {"color": 1}).json()["id"]
    waiting = api.submit("blur-sharpen", {"color": 2}).json()["id"]
    when(running, lambda t: t.status == TaskStatus.RUNNING, "the first task to run")
    sim.stall()
    sim.set_time_scale(0.01)
    when(waiting, lambda t: t.accepted_at is not None, "the second task to be queued there")
    return running, waiting


def test_failover_moves_waiting_tasks_and_cleans_up_when_the_server_returns(alice_api, workflows, sims, hub):
    one, two = sims
    lost = add("lost", one)
    running, waiting = hold_two_on(alice_api, one)
    old = {task_id: task(task_id).prompt_id for task_id in (running, waiting)}
    add("spare", two)
    one.unplug()
    for task_id in (running, waiting):
        finished = done(task_id)
        assert finished.status == TaskStatus.SUCCEEDED, finished.error
        assert finished.server.name == "spare"
    assert task(waiting).attempts == 1  # moved before it started: not an attempt
    assert task(running).attempts == 2  # it had started there: retried
    assert TaskEvent.objects.filter(task_id=waiting, kind="moved").exists()
    assert Server.objects.get(pk=lost.pk).state == ServerState.OFFLINE
    assert ServerEvent.objects.filter(server=lost, kind="failover").exists()
    one.plug()
    wait_for(lambda: not StalePrompt.objects.exists(), message="the old copies to be dealt with")
    assert TaskEvent.objects.filter(task_id=waiting, kind="stale_deleted").exists()
    assert TaskEvent.objects.filter(task_id=running, kind="stale_interrupted").exists()
    one.unstall()
    running_there, pending_there = one.call(one.sim.queue_snapshot)
    assert old[waiting] not in [item[1] for item in pending_there]
    assert old[waiting] not in one.sim.executed_prompt_ids


def test_a_late_result_from_the_old_server_is_ignored_and_recorded(alice_api, workflows, sims, hub):
    one, two = sims
    add("lost", one)
    one.set_time_scale(1.0)
    task_id = alice_api.submit("blur-sharpen", {"color": 8}).json()["id"]
    when(task_id, lambda t: t.status == TaskStatus.RUNNING, "the task to run")
    one.stall()
    old_prompt = task(task_id).prompt_id
    add("spare", two)
    one.unplug()
    finished = done(task_id)
    assert finished.status == TaskStatus.SUCCEEDED and finished.server.name == "spare"
    outputs = list(finished.outputs.values_list("sha256", flat=True))
    one.set_time_scale(0.01)
    one.unstall()  # the old copy finishes on the unreachable server
    wait_for(lambda: any(entry[0] == old_prompt for entry in one.sim.job_log), message="the old copy to end")
    one.plug()
    wait_for(
        lambda: TaskEvent.objects.filter(task_id=task_id, kind="late_result_ignored").exists(),
        message="the late result to be recorded",
    )
    finished = task(task_id)
    assert finished.status == TaskStatus.SUCCEEDED and finished.server.name == "spare"
    assert list(finished.outputs.values_list("sha256", flat=True)) == outputs


def test_tasks_using_one_upload_are_pinned_to_one_server_until_they_end(alice_api, workflows, sims, hub):
    one, two = sims
    add("a", one)
    add("b", two)
    handle = io.BytesIO(png_bytes())
    handle.name = "photo.png"
    upload_id = alice_api.client.post("/api/v1/uploads", {"image": handle}).json()["id"]
    ids = [
        alice_api.submit("upload-scale", {"image": upload_id, "scale_by": 0.5 + n / 10}).json()["id"]
        for n in range(4)
    ]
    wait_for(
        lambda: Lock.objects.filter(purpose=LockPurpose.AFFINITY, key=f"upload:{upload_id}").exists(),
        message="the affinity lock",
    )
    finished = [done(task_id) for task_id in ids]
    assert all(t.status == TaskStatus.SUCCEEDED for t in finished), [t.error for t in finished]
    assert len({t.server_id for t in finished}) == 1
    wait_for(
        lambda: not Lock.objects.filter(purpose=LockPurpose.AFFINITY, key=f"upload:{upload_id}").exists(),
        message="the lock to be released when its tasks ended",
    )


def test_a_user_over_the_queued_limit_gets_429(alice_api, workflows, settings):
    settings.COMFYHUB = {**settings.COMFYHUB, "USER_MAX_QUEUED": 2}
    assert alice_api.submit("fast", {"color": 1}).status_code == 201
    assert alice_api.submit("fast", {"color": 2}).status_code == 201
    refused = alice_api.submit("fast", {"color": 3})
    assert refused.status_code == 429
    assert "tasks waiting" in refused.json()["error"]["message"]
    assert Task.objects.count() == 2


def test_health_states_carry_their_reason_and_leave_a_trail(alice_api, workflows, sims, hub, pool_settings):
    one, _ = sims
    server = add("gpu", one)
    wait_for(lambda: Server.objects.get(pk=server.pk).state == ServerState.ONLINE, message="online")
    pool_settings.COMFYHUB = {**pool_settings.COMFYHUB, "SLOW_PROBE_SECONDS": 0.0}
    slow = wait_for(
        lambda: (s := Server.objects.get(pk=server.pk)).state == ServerState.DEGRADED and s, message="degraded"
    )
    assert slow.state_reason.startswith("slow: a probe took")
    pool_settings.COMFYHUB = {**pool_settings.COMFYHUB, "SLOW_PROBE_SECONDS": 3.0}
    wait_for(lambda: Server.objects.get(pk=server.pk).state == ServerState.ONLINE, message="online again")
    one.unplug()
    gone = wait_for(
        lambda: (s := Server.objects.get(pk=server.pk)).state == ServerState.OFFLINE and s, message="offline"
    )
    assert gone.state_reason and gone.state_changed_at
    trail = list(ServerEvent.objects.filter(server=server, kind="state").order_by("at", "pk"))
    assert [(e.from_state, e.to_state) for e in trail][-3:] == [
        ("online", "degraded"), ("degraded", "online"), ("online", "offline"),
    ]
    one.plug()
    wait_for(lambda: Server.objects.get(pk=server.pk).state == ServerState.ONLINE, message="back online")


def test_a_faster_server_gets_more_of_the_work(alice_api, workflows, sims, hub):
    slow, fast = sims
    slow.set_time_scale(0.2)
    fast.set_time_scale(0.05)
    add("slow", slow, weight=1.0)
    add("fast", fast, weight=4.0)
    ids = [alice_api.submit("blur-sharpen", {"color": n}).json()["id"] for n in range(12)]
    finished = [done(task_id, timeout=90) for task_id in ids]
    assert all(t.status == TaskStatus.SUCCEEDED for t in finished)
    per_server = {name: sum(t.server.name == name for t in finished) for name in ("slow", "fast")}
    assert per_server["fast"] > 2 * per_server["slow"], per_server
