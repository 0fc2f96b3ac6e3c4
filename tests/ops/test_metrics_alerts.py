"""/metrics: the figures the alert rules of deploy/prometheus/alerts.yml read (workers, leases, webhooks)."""

import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from servers.models import Lock, LockPurpose, ServerState, upstream_key
from tasks.models import DeliveryStatus, WebhookDelivery
from tests.ops.conftest import make_server, make_task
from tests.ops.test_metrics import samples, scrape

pytestmark = pytest.mark.django_db


@pytest.fixture
def token(settings):
    settings.COMFYHUB = {**settings.COMFYHUB, "METRICS_TOKEN": "scrape-me-please"}
    return "scrape-me-please"


def lock(purpose, key, expires_in, server=None):
    now = timezone.now()
    return Lock.objects.create(
        purpose=purpose, key=key, owner=f"owner-of-{key}", server=server, expires_at=now + timedelta(seconds=expires_in)
    )


def delivery(task, status, *, last_attempt=None, due=0):
    """A delivery due `due` seconds ago (negative: in the future), last tried `last_attempt` seconds ago."""
    now = timezone.now()
    return WebhookDelivery.objects.create(
        task=task,
        event="task.succeeded",
        message_id=f"msg_{uuid.uuid4().hex}",
        url="https://hooks.example/in",
        status=status,
        next_attempt_at=now - timedelta(seconds=due),
        last_attempt_at=None if last_attempt is None else now - timedelta(seconds=last_attempt),
    )


def test_it_counts_live_workers_and_which_enabled_servers_have_a_lease(token):
    gpu_a = make_server("gpu-a")
    gpu_b = make_server("gpu-b", state=ServerState.OFFLINE)
    gpu_c = make_server("gpu-c")
    off = make_server("gpu-off", state=ServerState.DISABLED, enabled=False)
    make_server("gpu-draining", state=ServerState.DRAINING, draining=True)
    lock(LockPurpose.WORKER, "worker:one", 10)
    lock(LockPurpose.WORKER, "worker:two", 10)
    lock(LockPurpose.WORKER, "worker:gone", -1)  # a killed worker: its row outlives it, expired
    lock(LockPurpose.UPSTREAM, upstream_key(gpu_a.pk), 10, gpu_a)
    lock(LockPurpose.UPSTREAM, upstream_key(gpu_b.pk), 10, gpu_b)  # offline, but a worker still follows it
    lock(LockPurpose.UPSTREAM, upstream_key(gpu_c.pk), -1, gpu_c)  # its worker stopped renewing
    lock(LockPurpose.UPSTREAM, upstream_key(off.pk), 10, off)
    lock(LockPurpose.AFFINITY, "affinity:alice", 600)  # neither a worker nor a lease

    lines = samples(scrape(token).content.decode())
    assert "comfyhub_workers 2" in lines
    leased = [line for line in lines if line.startswith("comfyhub_server_leased")]
    assert leased == [
        'comfyhub_server_leased{server="gpu-a"} 1',
        'comfyhub_server_leased{server="gpu-b"} 1',
        'comfyhub_server_leased{server="gpu-c"} 0',
        'comfyhub_server_leased{server="gpu-draining"} 0',  # draining is still enabled: it must be followed
    ]  # gpu-off is disabled: nobody should follow it, so it has no series


def test_without_any_worker_it_says_zero(token):
    make_server("gpu-a")
    lines = samples(scrape(token).content.decode())
    assert "comfyhub_workers 0" in lines
    assert 'comfyhub_server_leased{server="gpu-a"} 0' in lines


def test_it_counts_webhook_deliveries_by_status_and_the_last_hours_outcomes(token, alice, workflows):
    task = make_task(alice, workflows["fast"])
    delivery(task, DeliveryStatus.DELIVERED, last_attempt=30)
    delivery(task, DeliveryStatus.DELIVERED, last_attempt=30)
    delivery(task, DeliveryStatus.DELIVERED, last_attempt=3 * 3600)
    delivery(task, DeliveryStatus.FAILED, last_attempt=120)
    delivery(task, DeliveryStatus.FAILED, last_attempt=59 * 60)
    delivery(task, DeliveryStatus.FAILED, last_attempt=2 * 3600)  # given up on long ago: not recent
    delivery(task, DeliveryStatus.PENDING, due=-60)  # backing off: due in a minute
    lines = samples(scrape(token).content.decode())
    for line in [
        'comfyhub_webhook_deliveries{status="pending"} 1',
        'comfyhub_webhook_deliveries{status="delivered"} 3',
        'comfyhub_webhook_deliveries{status="failed"} 3',
        "comfyhub_webhook_deliveries_failed_recent 2",
        "comfyhub_webhook_deliveries_delivered_recent 2",
        "comfyhub_webhook_oldest_due_seconds 0",  # nothing is due yet
    ]:
        assert line in lines, line


def test_the_oldest_due_delivery_says_how_long_it_has_waited_for_a_sender(token, alice, workflows):
    task = make_task(alice, workflows["fast"])
    delivery(task, DeliveryStatus.PENDING, due=5)
    delivery(task, DeliveryStatus.PENDING, due=700)
    delivery(task, DeliveryStatus.FAILED, due=5000, last_attempt=4000)  # not pending: not waiting for a sender
    [line] = [line for line in samples(scrape(token).content.decode()) if "oldest_due" in line]
    assert 700 <= float(line.split()[1]) < 760


def test_no_delivery_at_all_is_zeros(token):
    lines = samples(scrape(token).content.decode())
    for line in [
        'comfyhub_webhook_deliveries{status="pending"} 0',
        'comfyhub_webhook_deliveries{status="failed"} 0',
        "comfyhub_webhook_deliveries_failed_recent 0",
        "comfyhub_webhook_deliveries_delivered_recent 0",
        "comfyhub_webhook_oldest_due_seconds 0",
    ]:
        assert line in lines, line


def test_leases_and_deliveries_cost_the_same_queries_however_many(token, alice, workflows):
    task = make_task(alice, workflows["fast"])
    make_server("gpu-a")
    with CaptureQueriesContext(connection) as small:
        scrape(token)
    for index in range(6):
        server = make_server(f"gpu-{index}x")
        lock(LockPurpose.UPSTREAM, upstream_key(server.pk), 10, server)
        lock(LockPurpose.WORKER, f"worker:{index}", 10)
        delivery(task, DeliveryStatus.FAILED, last_attempt=10)
        delivery(task, DeliveryStatus.PENDING, due=10)
    with CaptureQueriesContext(connection) as big:
        scrape(token)
    assert len(big) == len(small)
