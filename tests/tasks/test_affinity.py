"""Affinity locks released by key: what another active task still needs stays, and the cost is not the queue's."""

import pytest

from servers.models import Lock, LockPurpose
from servers.pool import pin_affinity
from tasks.models import Task, TaskStatus, affinity_keys, release_affinity
from tests.conftest import make_user

pytestmark = pytest.mark.django_db

GRAPH = {"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}}


@pytest.fixture
def server():
    from servers.models import Server

    return Server.objects.create(name="gpu-a", base_url="http://127.0.0.1:9")


def task(owner, *, uploads=(), graph_hash="g1", status=TaskStatus.RUNNING):
    return Task.objects.create(
        owner=owner, graph=GRAPH, graph_hash=graph_hash, status=status,
        image_inputs=[{"upload": upload, "node": "1", "input": "image"} for upload in uploads],
    )  # fmt: skip


def pinned():
    return set(Lock.objects.filter(purpose=LockPurpose.AFFINITY).values_list("key", flat=True))


def end(done):
    Task.objects.filter(pk=done.pk).update(status=TaskStatus.SUCCEEDED)
    done.status = TaskStatus.SUCCEEDED
    return release_affinity(done)


def test_a_lock_stays_while_another_active_task_of_its_owner_needs_it(server):
    alice = make_user("alice")
    first, second = task(alice, uploads=["u1", "u2"]), task(alice, uploads=["u2"], graph_hash="g2")
    pin_affinity(first, server)
    pin_affinity(second, server)
    assert pinned() == {"upload:u1", "upload:u2", f"graph:{alice.pk}:g1", f"graph:{alice.pk}:g2"}
    end(first)
    assert pinned() == {"upload:u2", f"graph:{alice.pk}:g2"}  # u2 and the second graph are still needed
    end(second)
    assert pinned() == set()


def test_the_same_graph_running_again_keeps_its_pin(server):
    alice = make_user("alice")
    first, again = task(alice), task(alice)
    pin_affinity(first, server)
    end(first)
    assert pinned() == {f"graph:{alice.pk}:g1"}
    end(again)
    assert pinned() == set()


def test_another_user_s_task_does_not_keep_a_lock(server):
    alice, bob = make_user("alice"), make_user("bob")
    mine = task(alice, uploads=["u1"])
    task(bob, uploads=["u1"])  # cannot use alice's upload; even if its binding named it, it is not hers
    pin_affinity(mine, server)
    end(mine)
    assert pinned() == set()


def test_releasing_costs_the_same_with_a_long_queue(server, django_assert_max_num_queries):
    alice = make_user("alice")
    done = task(alice, uploads=["u1"])
    pin_affinity(done, server)
    Task.objects.bulk_create([
        Task(owner=alice, graph=GRAPH, graph_hash=f"other{n}", status=TaskStatus.QUEUED) for n in range(300)
    ])  # fmt: skip
    Task.objects.filter(pk=done.pk).update(status=TaskStatus.SUCCEEDED)
    done.status = TaskStatus.SUCCEEDED
    with django_assert_max_num_queries(3):
        assert release_affinity(done) == 2
    assert affinity_keys(done) and pinned() == set()


def test_pinning_again_moves_the_pin_in_one_statement(server, django_assert_num_queries):
    from servers.models import Server

    alice = make_user("alice")
    other = Server.objects.create(name="gpu-b", base_url="http://127.0.0.1:10")
    first = task(alice, uploads=["u1"])
    pin_affinity(first, server)
    with django_assert_num_queries(1):
        pin_affinity(first, other)
    assert set(Lock.objects.filter(purpose=LockPurpose.AFFINITY).values_list("server__name", flat=True)) == {"gpu-b"}
