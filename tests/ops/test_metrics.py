"""/metrics: Prometheus' text format, exact figures for known tasks, and who may read it."""

import re
import secrets
from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from servers.models import ServerEvent, ServerState
from tasks.models import TaskEvent, TaskStatus
from tests.conftest import ApiClient
from tests.ops.conftest import browser, make_server, make_task

pytestmark = pytest.mark.django_db

SAMPLE = re.compile(r'^([a-z_]+)(\{([a-z_]+="([^"\\]|\\.)*")(,[a-z_]+="([^"\\]|\\.)*")*\})? (-?[0-9.e+]+|\+Inf|NaN)$')


@pytest.fixture
def token(settings):
    settings.COMFYHUB = {**settings.COMFYHUB, "METRICS_TOKEN": "scrape-me-please"}
    return "scrape-me-please"


def scrape(token):
    reply = Client(HTTP_AUTHORIZATION=f"Bearer {token}").get("/metrics")
    assert reply.status_code == 200, reply.status_code
    return reply


def samples(text):
    """
    Every sample of the page as one line, `name{label="value",...} number`, read back with prometheus_client's own
    parser (so the page must be text it accepts) and with whole numbers written without a fraction.
    """
    lines = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            ordered = sorted(sample.labels.items(), key=lambda item: item[0] == "le")  # a bucket's bound last
            labels = ",".join(f'{name}="{escape(value)}"' for name, value in ordered)
            value = int(sample.value) if float(sample.value).is_integer() else sample.value
            lines.append(f"{sample.name}{{{labels}}} {value}" if labels else f"{sample.name} {value}")
    return lines


def escape(value):
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@pytest.fixture
def history(alice, workflows):
    """Tasks with known waits and run times on gpu-a and gpu-b, server trails and reconciliation events."""
    now = timezone.now()
    fast = workflows["fast"]
    gpu_a = make_server("gpu-a")
    gpu_b = make_server("gpu-b", state=ServerState.OFFLINE)
    make_server("gpu-c", state=ServerState.DEGRADED)

    def task(server, status, created, started=None, finished=None):
        return make_task(
            alice, fast, server, now=now, created=created, started=started, finished=finished, status=status
        )

    # gpu-a waits: 0.5, 5 (on a bucket's bound: counted in it), 400, 30 s; runs (succeeded only): 2 (a bound), 45 s.
    first = task(gpu_a, TaskStatus.SUCCEEDED, 100, 99.5, 97.5)
    task(gpu_a, TaskStatus.SUCCEEDED, 300, 295, 250)
    task(gpu_a, TaskStatus.FAILED, 1000, 600, 500)
    task(gpu_a, TaskStatus.RUNNING, 50, 20)
    # gpu-b: waited 10 s, ran 10 s.
    task(gpu_b, TaskStatus.SUCCEEDED, 200, 190, 180)
    # Outside the 24-hour window.
    task(gpu_a, TaskStatus.SUCCEEDED, 26 * 3600, 25 * 3600 + 60, 25 * 3600)
    task(None, TaskStatus.QUEUED, 70)
    task(None, TaskStatus.CANCELLED, 80, None, 75)

    for to_state in ["online", "degraded", "online", "offline"]:
        ServerEvent.objects.create(server=gpu_a, kind="state", from_state="unknown", to_state=to_state)
    ServerEvent.objects.create(server=gpu_a, kind="failover", from_state="offline", to_state="offline")
    for kind in [
        "requeued",
        "requeued",
        "moved",
        "late_result_ignored",
        "submitted",
        "recover_stuck",
        "recover_stuck",
        "recover_lost",
        'recover"odd\\kind\nhere',
    ]:
        TaskEvent.objects.create(task=first, kind=kind)
    return now


def test_it_counts_tasks_by_status_and_servers_by_state(token, history):
    lines = samples(scrape(token).content.decode())
    for line in [
        'comfyhub_tasks{status="queued"} 1',
        'comfyhub_tasks{status="submitted"} 0',
        'comfyhub_tasks{status="running"} 1',
        'comfyhub_tasks{status="succeeded"} 4',
        'comfyhub_tasks{status="failed"} 1',
        'comfyhub_tasks{status="cancelled"} 1',
        'comfyhub_servers{state="online"} 1',
        'comfyhub_servers{state="offline"} 1',
        'comfyhub_servers{state="degraded"} 1',
        'comfyhub_servers{state="draining"} 0',
        'comfyhub_server_state{server="gpu-b",state="offline"} 1',
        'comfyhub_server_state{server="gpu-b",state="online"} 0',
        'comfyhub_server_tasks{server="gpu-a",status="running"} 1',
        'comfyhub_server_tasks{server="gpu-a",status="submitted"} 0',
    ]:
        assert line in lines, line
    [oldest] = [line for line in lines if line.startswith("comfyhub_oldest_queued_task_age_seconds ")]
    assert 70 <= float(oldest.split()[1]) < 80


def test_queue_waits_and_run_times_are_histograms_per_server(token, history):
    lines = samples(scrape(token).content.decode())
    waits = [line for line in lines if line.startswith("comfyhub_task_queue_wait_seconds")]
    assert waits == [
        'comfyhub_task_queue_wait_seconds_bucket{server="gpu-a",le="1"} 1',
        'comfyhub_task_queue_wait_seconds_bucket{server="gpu-a",le="5"} 2',
        'comfyhub_task_queue_wait_seconds_bucket{server="gpu-a",le="15"} 2',
        'comfyhub_task_queue_wait_seconds_bucket{server="gpu-a",le="30"} 3',
        'comfyhub_task_queue_wait_seconds_bucket{server="gpu-a",le="60"} 3',
        'comfyhub_task_queue_wait_seconds_bucket{server="gpu-a",le="120"} 3',
        'comfyhub_task_queue_wait_seconds_bucket{server="gpu-a",le="300"} 3',
        'comfyhub_task_queue_wait_seconds_bucket{server="gpu-a",le="600"} 4',
        'comfyhub_task_queue_wait_seconds_bucket{server="gpu-a",le="1800"} 4',
        'comfyhub_task_queue_wait_seconds_bucket{server="gpu-a",le="3600"} 4',
        'comfyhub_task_queue_wait_seconds_bucket{server="gpu-a",le="7200"} 4',
        'comfyhub_task_queue_wait_seconds_bucket{server="gpu-a",le="+Inf"} 4',
        'comfyhub_task_queue_wait_seconds_count{server="gpu-a"} 4',
        'comfyhub_task_queue_wait_seconds_sum{server="gpu-a"} 435.5',
        'comfyhub_task_queue_wait_seconds_bucket{server="gpu-b",le="1"} 0',
        'comfyhub_task_queue_wait_seconds_bucket{server="gpu-b",le="5"} 0',
        'comfyhub_task_queue_wait_seconds_bucket{server="gpu-b",le="15"} 1',
        'comfyhub_task_queue_wait_seconds_bucket{server="gpu-b",le="30"} 1',
        'comfyhub_task_queue_wait_seconds_bucket{server="gpu-b",le="60"} 1',
        'comfyhub_task_queue_wait_seconds_bucket{server="gpu-b",le="120"} 1',
        'comfyhub_task_queue_wait_seconds_bucket{server="gpu-b",le="300"} 1',
        'comfyhub_task_queue_wait_seconds_bucket{server="gpu-b",le="600"} 1',
        'comfyhub_task_queue_wait_seconds_bucket{server="gpu-b",le="1800"} 1',
        'comfyhub_task_queue_wait_seconds_bucket{server="gpu-b",le="3600"} 1',
        'comfyhub_task_queue_wait_seconds_bucket{server="gpu-b",le="7200"} 1',
        'comfyhub_task_queue_wait_seconds_bucket{server="gpu-b",le="+Inf"} 1',
        'comfyhub_task_queue_wait_seconds_count{server="gpu-b"} 1',
        'comfyhub_task_queue_wait_seconds_sum{server="gpu-b"} 10',
    ]
    runs = [line for line in lines if line.startswith("comfyhub_task_run_seconds") and 'server="gpu-a"' in line]
    assert runs == [
        'comfyhub_task_run_seconds_bucket{server="gpu-a",le="1"} 0',
        'comfyhub_task_run_seconds_bucket{server="gpu-a",le="2"} 1',
        'comfyhub_task_run_seconds_bucket{server="gpu-a",le="5"} 1',
        'comfyhub_task_run_seconds_bucket{server="gpu-a",le="10"} 1',
        'comfyhub_task_run_seconds_bucket{server="gpu-a",le="20"} 1',
        'comfyhub_task_run_seconds_bucket{server="gpu-a",le="30"} 1',
        'comfyhub_task_run_seconds_bucket{server="gpu-a",le="60"} 2',
        'comfyhub_task_run_seconds_bucket{server="gpu-a",le="120"} 2',
        'comfyhub_task_run_seconds_bucket{server="gpu-a",le="300"} 2',
        'comfyhub_task_run_seconds_bucket{server="gpu-a",le="600"} 2',
        'comfyhub_task_run_seconds_bucket{server="gpu-a",le="1800"} 2',
        'comfyhub_task_run_seconds_bucket{server="gpu-a",le="+Inf"} 2',
        'comfyhub_task_run_seconds_count{server="gpu-a"} 2',
        'comfyhub_task_run_seconds_sum{server="gpu-a"} 47',
    ]
    assert 'comfyhub_task_run_seconds_bucket{server="gpu-b",le="10"} 1' in lines
    assert 'comfyhub_task_run_seconds_bucket{server="gpu-b",le="5"} 0' in lines


def test_it_counts_connects_upstream_errors_reconciliations_and_recoveries(token, history):
    lines = samples(scrape(token).content.decode())
    for line in [
        'comfyhub_server_connects_total{server="gpu-a"} 2',
        'comfyhub_server_connects_total{server="gpu-b"} 0',
        'comfyhub_upstream_errors_total{server="gpu-a"} 2',  # the failover record is not another error
        'comfyhub_upstream_errors_total{server="gpu-c"} 0',
        'comfyhub_task_events_total{kind="requeued"} 2',
        'comfyhub_task_events_total{kind="moved"} 1',
        'comfyhub_task_events_total{kind="late_result_ignored"} 1',
        'comfyhub_task_events_total{kind="resubmitted"} 0',
        'comfyhub_task_events_total{kind="stale_interrupted"} 0',
        'comfyhub_stuck_recoveries_total{kind="recover_lost"} 1',
        'comfyhub_stuck_recoveries_total{kind="recover_stuck"} 2',
        'comfyhub_stuck_recoveries_total{kind="recover\\"odd\\\\kind\\nhere"} 1',
    ]:
        assert line in lines, line
    assert not any('kind="submitted"' in line for line in lines)


def test_the_page_is_valid_exposition_text(token, history):
    reply = scrape(token)
    assert reply["Content-Type"] == CONTENT_TYPE_LATEST
    text = reply.content.decode()
    assert text.endswith("\n")
    declared = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in declared, f"{name} declared twice"
            declared[name] = kind
        elif not line.startswith("# HELP "):
            match = SAMPLE.match(line)
            assert match, line
            name = match.group(1)
            family = re.sub(r"_(bucket|sum|count|total)$", "", name) if name not in declared else name
            assert family in declared, line
            if name.endswith("_total"):
                assert declared[family] == "counter", line


def test_a_scrape_costs_the_same_queries_however_big_the_pool(token, alice, workflows):
    make_server("gpu-a")
    with CaptureQueriesContext(connection) as small:
        scrape(token)
    now = timezone.now()
    for index in range(8):
        server = make_server(f"gpu-{index}x")
        ServerEvent.objects.create(server=server, kind="state", from_state="unknown", to_state="online")
        for status in [TaskStatus.SUCCEEDED, TaskStatus.RUNNING, TaskStatus.SUBMITTED]:
            make_task(
                alice,
                workflows["fast"],
                server,
                now=now,
                created=60,
                started=30,
                finished=10 if status == TaskStatus.SUCCEEDED else None,
                status=status,
            )
    with CaptureQueriesContext(connection) as big:
        scrape(token)
    assert len(big) == len(small)


def test_a_scraper_needs_the_configured_token(token, history):
    assert Client(HTTP_AUTHORIZATION="Bearer scrape-me-please").get("/metrics").status_code == 200
    assert Client(HTTP_AUTHORIZATION="Bearer wrong").get("/metrics").status_code == 404
    assert Client(HTTP_AUTHORIZATION="Basic scrape-me-please").get("/metrics").status_code == 404
    assert Client().get("/metrics").status_code == 404


def test_without_a_token_setting_no_bearer_opens_it(settings, alice):
    settings.COMFYHUB = {**settings.COMFYHUB, "METRICS_TOKEN": ""}
    assert Client(HTTP_AUTHORIZATION="Bearer ").get("/metrics").status_code == 404
    assert Client(HTTP_AUTHORIZATION="Bearer anything").get("/metrics").status_code == 404
    # An API token is for the API only.
    assert ApiClient(alice).get("/metrics").status_code == 404


def test_staff_sessions_may_read_it_and_other_users_get_a_404(operator, alice):
    reply = browser(operator).get("/metrics")
    assert reply.status_code == 200 and b"# TYPE comfyhub_tasks gauge" in reply.content
    assert browser(alice).get("/metrics").status_code == 404
    assert browser().get("/metrics").status_code == 404


def test_old_histogram_data_leaves_the_window(token, alice, workflows):
    gpu = make_server("gpu-old")
    make_task(
        alice,
        workflows["fast"],
        gpu,
        created=timedelta(days=3).total_seconds(),
        started=2 * 86400,
        finished=2 * 86400 - 5,
        status=TaskStatus.SUCCEEDED,
    )
    text = scrape(token).content.decode()
    assert 'server="gpu-old",le=' not in text
    assert 'comfyhub_server_state{server="gpu-old",state="online"} 1' in samples(text)


def test_guessing_the_metrics_token_does_not_lock_the_scraper_out(token, settings):
    settings.COMFYHUB = {**settings.COMFYHUB, "TOKEN_FAILURES_PER_ADDRESS": 3}
    # Addresses of their own in every run: with Redis the counters outlive the test database.
    guesser, other = (f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{n}" for n in (1, 2))
    for _ in range(10):
        reply = Client(HTTP_AUTHORIZATION="Bearer wrong-guess", REMOTE_ADDR=guesser).get("/metrics")
        assert reply.status_code == 404
    # The right token is never locked out (in production it has 32 characters or more: it cannot be guessed).
    assert Client(HTTP_AUTHORIZATION=f"Bearer {token}", REMOTE_ADDR=guesser).get("/metrics").status_code == 200
    # Another address is not affected.
    assert Client(HTTP_AUTHORIZATION=f"Bearer {token}", REMOTE_ADDR=other).get("/metrics").status_code == 200
