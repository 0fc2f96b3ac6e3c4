"""
Fault isolation in the supervisor, and no false alarms about the upstream socket.

Whatever one task does (a step that raises, a graph that cannot even be encoded), the loops go on for every other
task, the server stays online, and the task ends with a reason. Against the real simulator and supervisor; the
failures are injected for one task only with monkeypatch.
"""

import asyncio
import json
import uuid
from datetime import timedelta

import httpx
import pytest
import websockets
from asgiref.sync import async_to_sync
from django.utils import timezone

from servers import pool, recovery
from servers.comfy import ComfyClient
from servers.comfy_replies import ComfyRejected
from servers.connection import standalone
from servers.models import ServerEvent, ServerState
from servers.reconcile import Reconciler
from servers.sending import Sending
from servers.supervisor import Supervisor
from servers.tracking import Tracking
from tasks import outputs
from tasks.models import TERMINAL_STATUSES, Task, TaskEvent, TaskStatus
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

POISON = 666  # the colour of the one task that misbehaves


class Poison:
    """Which task is the bad one (by its colour input), and the prompt_ids it was sent under."""

    def __init__(self, monkeypatch):
        self.prompts = set()
        real_send = Sending.send

        async def send(conn, task, front=False):
            if is_poisoned(task):
                self.prompts.add(task.prompt_id)
            return await real_send(conn, task, front=front)

        monkeypatch.setattr(Sending, "send", send)


def is_poisoned(task):
    inputs = task.inputs or {}
    return POISON in (inputs.get("color"), inputs.get("seed"))


def raise_for(poisoned, real):
    """A replacement for `real` that raises for the poisoned task (poisoned(*args) is true) and is `real` otherwise."""
    if asyncio.iscoroutinefunction(real):

        async def wrapper(*args, **kwargs):
            if poisoned(*args, **kwargs):
                raise RuntimeError("injected failure")
            return await real(*args, **kwargs)

    else:

        def wrapper(*args, **kwargs):
            if poisoned(*args, **kwargs):
                raise RuntimeError("injected failure")
            return real(*args, **kwargs)

    return wrapper


def submit(api, colors, workflow="fast", key="color", **inputs):
    """One task per colour (or seed): distinct graphs, so that none is a cached rerun of another."""
    ids = {}
    for color in colors:
        reply = api.submit(workflow, {key: color, **inputs})
        assert reply.status_code == 201, reply.content
        ids[color] = reply.json()["id"]
    return ids


def all_finished(task_ids, timeout=30):
    def done():
        tasks = list(Task.objects.filter(pk__in=task_ids))
        return tasks if all(task.status in TERMINAL_STATUSES for task in tasks) else None

    return wait_for(done, timeout=timeout, message="every task to finish")


def timelines(task_ids):
    lines = []
    for task in Task.objects.filter(pk__in=task_ids):
        lines.append(f"{task.pk} {task.status} {task.error_kind} {task.error}")
        lines += [f"    {e.kind} {e.from_status}->{e.to_status} {e.message}" for e in task.events.all()]
    return "\n".join(lines)


def went_offline(server):
    return list(
        ServerEvent.objects.filter(server=server, kind="state")
        .exclude(to_state=ServerState.ONLINE)
        .values_list("to_state", "message")
    )


def check_isolated(server, ids, poisoned_id, step=None):
    """The others succeeded, the server never left `online`, and the poisoned task failed as an internal error."""
    all_finished(list(ids.values()))
    diagnosis = timelines(list(ids.values()))
    for task_id in ids.values():
        task = Task.objects.get(pk=task_id)
        if task_id != poisoned_id:
            assert task.status == TaskStatus.SUCCEEDED, diagnosis
    server.refresh_from_db()
    assert server.state == ServerState.ONLINE, diagnosis
    assert went_offline(server) == [], diagnosis
    failures = TaskEvent.objects.filter(task_id=poisoned_id, kind="step_failed")
    assert failures.exists(), diagnosis
    if step is not None:
        assert failures.filter(detail__step=step).exists(), diagnosis
    assert failures.first().detail["error"] == "RuntimeError", diagnosis
    poisoned = Task.objects.get(pk=poisoned_id)
    assert poisoned.status == TaskStatus.FAILED, diagnosis
    assert poisoned.error_kind == "internal_error", diagnosis
    assert "RuntimeError" in poisoned.error and "3 times" in poisoned.error, diagnosis
    assert server.base_url not in poisoned.error and "Traceback" not in poisoned.error
    return poisoned


# --- the client ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "graph",
    [{"1": {"inputs": {"text": "\ud800"}}}, {"1": {"inputs": {"x": float("nan")}}}, {"1": {"inputs": {"x": object()}}}],
    ids=["lone-surrogate", "nan", "not-json"],
)
def test_a_request_that_cannot_be_encoded_is_a_permanent_rejection_never_sent(graph):
    sent = []

    async def attempt():
        transport = httpx.MockTransport(lambda request: sent.append(request) or httpx.Response(200, json={}))
        async with ComfyClient("http://gpu.invalid:8188", transport=transport) as client:
            with pytest.raises(ComfyRejected) as caught:
                await client.submit(graph, "p-1", "c-1")
        return caught.value

    error = asyncio.run(attempt())
    assert sent == []
    assert error.permanent and not error.sent
    assert error.message.startswith("the request could not be encoded: ")
    error.message.encode("utf-8")  # storable and showable as it is


# --- the supervisor: one task's failure stays that task's -----------------------------------------------------


def test_a_graph_with_a_lone_surrogate_fails_as_rejected_and_the_others_finish(
    alice_api, workflows, server, simulator, hub, monkeypatch
):
    real_send = Sending.send

    async def send(conn, task, front=False):
        if is_poisoned(task):
            # JSON allows "\ud800" and SQLite stores it; PostgreSQL does not, so it is put in the graph here.
            task.graph["2"]["inputs"]["filename_prefix"] = "bad\ud800"
        return await real_send(conn, task, front=front)

    monkeypatch.setattr(Sending, "send", send)
    ids = submit(alice_api, [1, 2, POISON, 3, 4])
    all_finished(list(ids.values()))
    diagnosis = timelines(list(ids.values()))
    poisoned = Task.objects.get(pk=ids[POISON])
    assert poisoned.status == TaskStatus.FAILED, diagnosis
    assert poisoned.error_kind == "rejected", diagnosis
    assert poisoned.error.startswith("the request could not be encoded: "), diagnosis
    assert "surrogates not allowed" in poisoned.error
    poisoned.error.encode("utf-8")
    assert alice_api.task(poisoned.pk)["status"] == "failed"
    for color in (1, 2, 3, 4):
        assert Task.objects.get(pk=ids[color]).status == TaskStatus.SUCCEEDED, diagnosis
    server.refresh_from_db()
    assert server.state == ServerState.ONLINE and went_offline(server) == [], diagnosis
    # It never reached the server.
    assert all(p not in simulator.sim.executed_prompt_ids for p in [poisoned.prompt_id])


def inject(step, monkeypatch, poison):
    """Make `step` raise for the poisoned task only; returns the supervisor step name the guard records."""
    if step == "dispatch":

        def claimed(task_id, *args, **kwargs):
            return Task.objects.filter(pk=task_id, inputs__color=POISON).exists()

        monkeypatch.setattr(pool, "claim", raise_for(claimed, pool.claim))
    elif step == "send":
        monkeypatch.setattr(Sending, "send", raise_for(lambda sending, task, **kw: is_poisoned(task), Sending.send))
    elif step == "message":
        poisoned = lambda tracking, task, *_: is_poisoned(task)  # noqa: E731
        monkeypatch.setattr(Tracking, "started", raise_for(poisoned, Tracking.started))
    elif step == "progress":
        monkeypatch.setattr(Task, "set_progress", raise_for(lambda task, *_: is_poisoned(task), Task.set_progress))
    elif step == "reconcile":
        poisoned = lambda client, prompt_id: prompt_id in poison.prompts  # noqa: E731
        monkeypatch.setattr(ComfyClient, "history", raise_for(poisoned, ComfyClient.history))
        # ComfyUI 0.26 and later are asked about a lone prompt with one GET /api/jobs/{id}.
        monkeypatch.setattr(ComfyClient, "locate", raise_for(poisoned, ComfyClient.locate))
    elif step == "store_outputs":
        monkeypatch.setattr(outputs, "complete", raise_for(lambda task, *args: is_poisoned(task), outputs.complete))
    else:
        raise AssertionError(step)


@pytest.mark.parametrize("step", ["dispatch", "send", "message", "progress", "reconcile", "store_outputs"])
def test_a_task_that_raises_in_a_step_fails_alone_and_the_server_stays_online(
    step, alice_api, workflows, server, simulator, hub, monkeypatch
):
    poison = Poison(monkeypatch)
    inject(step, monkeypatch, poison)
    if step == "progress":
        simulator.set_time_scale(0.3)  # long enough for several progress flushes of the poisoned task
        ids = submit(alice_api, [1, POISON, 2], workflow="txt2img", key="seed", steps=12)
    else:
        ids = submit(alice_api, [1, 2, POISON, 3, 4, 5])
    # The server's step names: a send that fails again is retried by reconciliation.
    check_isolated(server, ids, ids[POISON], step={"send": None, "reconcile": None}.get(step, step))
    # Something was sent again and ran after the failures: the dispatcher and the loops go on.
    later = submit(alice_api, [7])
    assert all_finished(list(later.values()))[0].status == TaskStatus.SUCCEEDED


def test_the_reconciliation_timer_survives_a_task_that_raises(
    alice_api, workflows, server, simulator, hub, monkeypatch
):
    poison = Poison(monkeypatch)
    inject("reconcile", monkeypatch, poison)
    passes = []
    real = Reconciler.reconcile

    async def reconcile(reconciler, reason, only=None):
        if reason == "timer":
            passes.append(reason)
        return await real(reconciler, reason, only=only)

    monkeypatch.setattr(Reconciler, "reconcile", reconcile)
    ids = submit(alice_api, [1, POISON, 2])
    check_isolated(server, ids, ids[POISON])
    seen = len(passes)
    wait_for(lambda: len(passes) >= seen + 2, timeout=5, message="two more timer passes")


def test_a_task_whose_cancel_raises_fails_alone(alice_api, workflows, server, simulator, hub, monkeypatch):
    poison = Poison(monkeypatch)
    monkeypatch.setattr(
        ComfyClient,
        "delete_from_queue",
        raise_for(lambda client, prompt_ids: set(prompt_ids) & poison.prompts, ComfyClient.delete_from_queue),
    )
    monkeypatch.setattr(  # how ComfyUI 0.26 and later are asked
        ComfyClient,
        "cancel_job",
        raise_for(lambda client, prompt_id: prompt_id in poison.prompts, ComfyClient.cancel_job),
    )
    simulator.set_time_scale(1.0)
    first = submit(alice_api, [1], workflow="blur-sharpen")
    wait_for(lambda: Task.objects.get(pk=first[1]).status == "running", message="the first task to run")
    simulator.stall()
    simulator.set_time_scale(0.01)
    waiting = submit(alice_api, [POISON, 2])  # the second waits in the hub: two tasks at most on the server
    wait_for(lambda: Task.objects.get(pk=waiting[POISON]).accepted_at, message="the task in the server's queue")
    assert alice_api.post(f"/api/v1/tasks/{waiting[POISON]}/cancel").status_code == 200
    wait_for(lambda: Task.objects.get(pk=waiting[POISON]).is_terminal, message="the poisoned task to end")
    simulator.unstall()
    check_isolated(server, {**first, **waiting}, waiting[POISON], step="cancel")


def test_a_task_that_raises_in_a_step_can_still_be_cancelled(
    alice_api, workflows, server, simulator, hub, monkeypatch, settings
):
    settings.COMFYHUB = {**settings.COMFYHUB, "STEP_FAILURES": 10_000}
    monkeypatch.setattr(Task, "set_progress", raise_for(lambda task, *_: is_poisoned(task), Task.set_progress))
    simulator.set_time_scale(1.0)
    ids = submit(alice_api, [POISON], workflow="txt2img", key="seed", steps=60)
    wait_for(
        lambda: TaskEvent.objects.filter(task_id=ids[POISON], kind="step_failed").count() >= 2,
        message="the progress step to fail",
    )
    assert alice_api.post(f"/api/v1/tasks/{ids[POISON]}/cancel").status_code == 200
    [task] = all_finished(list(ids.values()))
    assert task.status == TaskStatus.CANCELLED, timelines(list(ids.values()))
    server.refresh_from_db()
    assert server.state == ServerState.ONLINE


def stuck_task(owner, server, color):
    long_ago = timezone.now() - timedelta(hours=1)
    return Task.objects.create(
        owner=owner, inputs={"color": color}, status=TaskStatus.SUBMITTED, server=server,
        graph={"1": {"class_type": "EmptyImage", "inputs": {}}}, prompt_id=str(uuid.uuid4()),
        client_id=server.client_id, submitted_at=long_ago, accepted_at=long_ago, attempts=1,
        last_event_at=long_ago - timedelta(minutes=color),
    )


def test_recovery_goes_on_past_a_task_that_raises(alice, server, simulator, monkeypatch):
    monkeypatch.setattr(recovery, "apply", raise_for(lambda conn, task, grade: is_poisoned(task), recovery.apply))
    poisoned = stuck_task(alice, server, POISON)  # the quietest: recovered first
    other = stuck_task(alice, server, 1)
    actions = {action.task_id: action for action in async_to_sync(recovery.recover)(older_than=60, connect=standalone)}
    assert "could not recover it: RuntimeError" in actions[poisoned.pk].message
    # The next one was recovered all the same: the server does not know it, so it went back to the queue.
    assert actions[other.pk].grade == "recover_resync", actions
    assert Task.objects.get(pk=other.pk).status == TaskStatus.QUEUED
    for _ in range(2):
        async_to_sync(recovery.recover)(older_than=60, connect=standalone)
    poisoned.refresh_from_db()
    assert poisoned.status == TaskStatus.FAILED and poisoned.error_kind == "internal_error"
    assert poisoned.events.filter(kind="step_failed", detail__step="recovery").count() == 3


def test_a_failing_supervisor_part_does_not_skip_the_watchdog(monkeypatch, settings):
    ran = []

    async def fails(self):
        ran.append("failed")
        raise RuntimeError("injected failure")

    async def watchdog(self):
        ran.append("watchdog")

    for name in ("manage_connections", "dispatch", "process_cancels"):
        monkeypatch.setattr(Supervisor, name, fails)
    monkeypatch.setattr(Supervisor, "watchdog", watchdog)
    asyncio.run(Supervisor(owner="test").step())
    assert ran == ["failed", "failed", "failed", "watchdog"]


def test_a_failure_that_cannot_be_recorded_does_not_escape(server, monkeypatch):
    from servers import guard

    def broken(*args):
        raise guard.OperationalError("the database is down")

    async def step():
        async with guard.step_guard(uuid.uuid4(), "reconcile", server=server) as outcome:
            raise ValueError("boom")
        return outcome

    monkeypatch.setattr(guard, "record_failure", broken)
    outcome = asyncio.run(step())
    assert isinstance(outcome.error, ValueError)


# --- point 8: no false alarms about the socket --------------------------------------------------------------


def socket_events(server):
    return list(ServerEvent.objects.filter(server=server, kind="socket_orphaned").values_list("message", flat=True))


def test_a_quiet_socket_with_a_waiting_prompt_changes_nothing(alice_api, workflows, server, simulator, hub):
    """A prompt waits behind a long job that sends nothing: the socket is quiet by nature, not orphaned."""
    simulator.set_time_scale(1.0)
    first = submit(alice_api, [1], workflow="blur-sharpen")
    wait_for(lambda: Task.objects.get(pk=first[1]).status == "running", message="the first task to run")
    simulator.stall()
    waiting = submit(alice_api, [2])
    wait_for(lambda: Task.objects.get(pk=waiting[2]).accepted_at, message="the second task in the queue")
    asyncio.run(asyncio.sleep(5))  # past the 3 s after which a silent socket is looked at
    simulator.set_time_scale(0.01)
    simulator.unstall()
    all_finished([first[1], waiting[2]])
    assert socket_events(server) == [] and went_offline(server) == []
    server.refresh_from_db()
    assert server.state == ServerState.ONLINE


def test_a_busy_socket_loop_is_not_taken_for_an_orphaned_socket(
    alice_api, workflows, server, simulator, hub, monkeypatch
):
    """The socket loop is stuck in one message (the database is slow) while a prompt is sent: frames wait unread."""
    real = Tracking.handle
    blocked = []

    async def handle(conn, message):
        if getattr(message, "type", None) == "execution_start" and not blocked:
            blocked.append(message)
            await asyncio.sleep(5)
        return await real(conn, message)

    monkeypatch.setattr(Tracking, "handle", handle)
    simulator.set_time_scale(0.5)
    ids = submit(alice_api, [1, 2], workflow="blur-sharpen")
    all_finished(list(ids.values()))
    assert blocked
    assert all(Task.objects.get(pk=pk).status == TaskStatus.SUCCEEDED for pk in ids.values())
    assert socket_events(server) == [] and went_offline(server) == []


def test_a_result_the_timer_finds_while_its_message_is_handled_is_not_missed(
    alice_api, workflows, server, simulator, hub, monkeypatch
):
    real = Tracking.handle
    held = []

    async def handle(conn, message):
        if getattr(message, "type", None) == "execution_success" and not held:
            held.append(message)
            await asyncio.sleep(3)  # the 1 s reconciliation timer finds the result meanwhile
        return await real(conn, message)

    monkeypatch.setattr(Tracking, "handle", handle)
    ids = submit(alice_api, [1])
    all_finished(list(ids.values()))
    # The timer starts at a random point of its interval: it may find the result before the message even comes.
    wait_for(lambda: held, timeout=5, message="the execution_success message")
    found = TaskEvent.objects.filter(task_id=ids[1], kind="succeeded").values_list("message", flat=True)
    assert list(found) == ["finished (history (timer))"], "the timer should have been first"
    asyncio.run(asyncio.sleep(4))
    assert socket_events(server) == [] and went_offline(server) == []
    assert Task.objects.get(pk=ids[1]).status == TaskStatus.SUCCEEDED


def orphan(simulator, conn):
    """Connect and close a second socket with the hub's clientId: ComfyUI then forgets the hub's socket (§2.6)."""

    async def connect_and_close():
        url = simulator.url.replace("http", "ws", 1) + f"/ws?clientId={conn.client_id}"
        async with websockets.connect(url) as other:
            json.loads(await other.recv())

    asyncio.run(connect_and_close())
    wait_for(lambda: conn.client_id not in simulator.call(simulator.sim.connected_clients), message="the orphaning")


def test_a_really_orphaned_socket_is_connected_again_quietly(alice_api, workflows, server, simulator, hub):
    wait_for(lambda: getattr(hub.connection(server), "online", False), message="the hub to connect")
    conn = hub.connection(server)
    # Found by watching the socket after a prompt, not by the reconciliation timer.
    hub.supervisor.reconcile_interval = 60
    asyncio.run(asyncio.sleep(1.2))  # the timer's current wait (1 s) ends
    orphan(simulator, conn)
    ids = submit(alice_api, [1, 2])
    all_finished(list(ids.values()))
    assert all(Task.objects.get(pk=pk).status == TaskStatus.SUCCEEDED for pk in ids.values())
    wait_for(lambda: socket_events(server), timeout=10, message="the orphaned socket to be noticed")
    wait_for(
        lambda: conn.client_id in simulator.call(simulator.sim.connected_clients), message="the socket registered again"
    )
    [message] = socket_events(server)[:1]
    assert "§" not in message
    server.refresh_from_db()
    assert server.state == ServerState.ONLINE and went_offline(server) == []
    # Live again: the next task is followed over the socket (it is seen running, not only found finished).
    later = submit(alice_api, [3])
    all_finished(list(later.values()))
    kinds = list(TaskEvent.objects.filter(task_id=later[3]).values_list("kind", "message"))
    assert ("running", "started (websocket)") in kinds, kinds


def test_a_probe_before_the_first_connection_is_made_does_not_call_the_websocket_down(server):
    """A connection's probe timer starts at a random point of its interval, so it may fire before the socket is up."""

    async def probe_first():
        conn = standalone(server)
        try:
            await conn.probe()  # the link has not connected yet: its first connection is under way
        finally:
            await conn.client.close()

    async_to_sync(probe_first)()
    server.refresh_from_db()
    assert server.state == ServerState.ONLINE
    assert went_offline(server) == []
