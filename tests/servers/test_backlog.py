"""The queue a supervisor keeps in memory: up to date after each pass, and a pass whose work follows the changes."""

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from servers.backlog import Backlog
from servers.models import Server, ServerState
from servers.pool import make_plan
from tasks.models import Task, TaskStatus
from tests.conftest import make_user

pytestmark = pytest.mark.django_db

GRAPH = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
    "2": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 1}},
}
CAPABILITIES = {"classes": {"CheckpointLoaderSimple": {"ckpt_name": ["sd15.safetensors"]}, "EmptyImage": {}}}


def queued(owner, n, **fields):
    start = timezone.now() - timedelta(minutes=10)
    tasks = [
        Task(owner=owner, graph={**GRAPH, "2": {**GRAPH["2"], "inputs": {**GRAPH["2"]["inputs"], "color": k}}},
             created_at=start + timedelta(milliseconds=k), last_event_at=start, **fields)
        for k in range(n)
    ]  # fmt: skip
    return Task.objects.bulk_create(tasks)


def graph_reads(queries):
    return [q["sql"] for q in queries if '"graph"' in q["sql"].split("FROM")[0]]


def test_a_pass_reads_only_what_changed_since_the_last_one():
    alice, bob = make_user("alice"), make_user("bob")
    queued(alice, 30)
    backlog = Backlog()
    backlog.refresh()
    assert len(backlog) == 30
    with CaptureQueriesContext(connection) as quiet:
        backlog.refresh()
    assert graph_reads(quiet) == []  # nothing new: no graph is read again

    fresh = Task.objects.create(owner=bob, graph=GRAPH)  # a submission: last event now
    with CaptureQueriesContext(connection) as one_new:
        backlog.refresh()
    assert len(backlog) == 31
    assert len(graph_reads(one_new)) == 1
    assert [c.task_id for c in backlog.heads(1) if c.owner_id == bob.pk] == [fresh.pk]


def test_a_task_claimed_elsewhere_leaves_after_its_claim_failed_and_one_put_back_returns():
    alice = make_user("alice")
    first, second = queued(alice, 2)
    backlog = Backlog()
    backlog.refresh()
    Task.objects.filter(pk=first.pk).update(status=TaskStatus.CANCELLED)  # another process did it
    backlog.refresh()
    assert first.pk in backlog.entries  # not known here until a claim of it fails, or the next rebuild
    backlog.doubt(first.pk)
    backlog.refresh()
    assert first.pk not in backlog.entries
    assert [c.task_id for c in backlog.heads(5)] == [second.pk]

    backlog.discard(second.pk)  # claimed here
    Task.objects.filter(pk=second.pk).update(last_event_at=timezone.now())  # ...and put back in the queue
    backlog.refresh()
    assert [c.task_id for c in backlog.heads(5)] == [second.pk]


def test_a_rebuild_brings_in_what_changed_without_an_event():
    alice = make_user("alice")
    low, high = queued(alice, 2)
    backlog = Backlog(rebuild_seconds=0)
    backlog.refresh()
    Task.objects.filter(pk=high.pk).update(priority=5)  # edited in the admin
    backlog.refresh()
    assert [(c.task_id, c.priority) for c in backlog.heads(5) if c.priority == 5] == [(high.pk, 5)]


def test_tasks_needing_the_same_share_one_requirements_and_one_verdict_per_server():
    alice = make_user("alice")
    queued(alice, 20)
    backlog = Backlog()
    backlog.refresh()
    shapes = {id(c.graph) for c in backlog.heads(50)}
    assert len(shapes) == 1  # twenty graphs that differ only in a colour need the same of a server
    assert backlog.problems(backlog.heads(1)[0].graph, CAPABILITIES) == []
    lacking = {"classes": {"EmptyImage": {}}}
    assert backlog.problems(backlog.heads(1)[0].graph, lacking) == ["node types CheckpointLoaderSimple"]


def test_a_wake_up_with_busy_servers_looks_only_at_each_users_first_task():
    server = Server.objects.create(
        name="gpu", base_url="http://gpu.invalid:8188", state=ServerState.ONLINE, capabilities=CAPABILITIES,
        capabilities_at=timezone.now(), pipeline_depth=2, max_in_flight=3,
    )  # fmt: skip
    users = [make_user(f"user{n}") for n in range(5)]
    for user in users:
        queued(user, 40)
    running = queued(make_user("busy"), 2)
    Task.objects.filter(pk__in=[t.pk for t in running]).update(status=TaskStatus.RUNNING, server=server)
    backlog = Backlog()
    make_plan({}, 50, backlog=backlog)  # the first pass looks at 50 of each user's tasks, as every full pass
    backlog.next_full = float("inf")
    sizes = []
    original = backlog.heads
    backlog.heads = lambda depth: sizes.append(depth) or original(depth)
    make_plan({}, 50, backlog=backlog)
    assert sizes == [1]  # the server is full to its depth: one task of each user could be sent, no more
    Task.objects.filter(pk=running[0].pk).update(status=TaskStatus.SUCCEEDED)
    make_plan({}, 50, backlog=backlog)
    assert sizes == [1, 2]


def test_a_pass_looks_deeper_when_a_server_keeps_room_while_tasks_wait_for_a_faster_one():
    def server(name, weight):
        return Server.objects.create(
            name=name, base_url=f"http://{name}.invalid:8188", state=ServerState.ONLINE, capabilities=CAPABILITIES,
            capabilities_at=timezone.now(), weight=weight, pipeline_depth=2, max_in_flight=3,
        )  # fmt: skip

    fast, slow = server("fast", 4.0), server("slow", 1.0)
    busy = make_user("busy")
    for where, count in ((fast, 2), (slow, 1)):
        tasks = queued(busy, count)
        Task.objects.filter(pk__in=[t.pk for t in tasks]).update(status=TaskStatus.RUNNING, server=where)
    alice = make_user("alice")
    queued(alice, 20)
    backlog = Backlog()
    backlog.refresh()
    backlog.next_full = float("inf")  # a pass between full ones: it starts two tasks deep (one slot of room)
    result, _ = make_plan({fast.pk: fast, slow.pk: slow}, 50, backlog=backlog)
    # Alice's first task goes to the front of the 4x server (she has nothing running). Her next ones would finish
    # sooner behind it too, but it has no room: the 1x server's slot is filled by a later one of hers (the fifth
    # or so) rather than left empty until the next pass, which a pass two tasks deep cannot see.
    assert [slot.name for _, slot, _ in result.sends] == ["fast", "slow"]
