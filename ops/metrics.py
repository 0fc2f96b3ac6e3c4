"""
The Prometheus exposition of /metrics: a prometheus_client collector over database aggregates.

Every number is an aggregate query or a read bounded by a time window, so any process (a Daphne behind the load
balancer or a run_upstream worker) answers with the same figures, and a scrape costs a fixed handful of queries.
"""

from collections import defaultdict
from datetime import timedelta

from django.db.models import Count, DurationField, ExpressionWrapper, F, Min, Q, Sum
from django.utils import timezone
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from comfyhub import collector, looplag  # noqa: F401  (collector: its pause histogram is on looplag's registry)
from ops.dashboard import ERROR_STATES
from ops.metrics_storage import storage_families
from servers.models import Lock, LockPurpose, Server, ServerEvent, ServerState, upstream_key
from tasks.models import ACTIVE_STATUSES, DeliveryStatus, Task, TaskEvent, TaskStatus, WebhookDelivery

HISTOGRAM_WINDOW = timedelta(hours=24)
# Seconds. Queue waits run from "next in line" to "behind a long batch"; run times from a cached 1 s graph to
# a long video job.
QUEUE_WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)
RUN_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
# TaskEvent kinds written by reconciliation and failover (servers/reconcile.py, servers/health.py, Task.requeue/move).
RECONCILIATION_KINDS = (
    "requeued",
    "resubmitted",
    "moved",
    "late_result_ignored",
    "stale_deleted",
    "stale_interrupted",
    "reply_lost",
)
RECOVERY_PREFIX = "recover"
# A webhook delivery counts as recent while its last attempt is younger than this: what an alert reads, as the
# failed rows themselves stay until an operator sends them again.
RECENT_WEBHOOKS = timedelta(hours=1)


class PoolCollector:
    """
    A prometheus_client custom collector: each scrape reads the aggregates from the database (a fixed handful of
    queries), so every process answers with the same figures and nothing is kept in process memory.
    """

    def __init__(self, now=None):
        self.now = now

    def collect(self):
        now = self.now or timezone.now()
        servers = list(Server.objects.order_by("name"))

        by_status = dict(Task.objects.order_by().values_list("status").annotate(Count("pk")))
        tasks = GaugeMetricFamily("comfyhub_tasks", "Tasks by status.", labels=["status"])
        for status in TaskStatus.values:
            tasks.add_metric([status], by_status.get(status, 0))
        yield tasks
        oldest = Task.objects.queued().aggregate(oldest=Min("created_at"))["oldest"]
        yield GaugeMetricFamily(
            "comfyhub_oldest_queued_task_age_seconds",
            "How long the oldest queued task has waited in the hub (0: none waits).",
            value=max((now - oldest).total_seconds(), 0.0) if oldest else 0,
        )

        by_state = defaultdict(int)
        for server in servers:
            by_state[server.state] += 1
        states = GaugeMetricFamily("comfyhub_servers", "Servers by state.", labels=["state"])
        for state in ServerState.values:
            states.add_metric([state], by_state.get(state, 0))
        yield states
        each_state = GaugeMetricFamily(
            "comfyhub_server_state", "1 for the state each server is in, 0 for the others.", labels=["server", "state"]
        )
        for server in servers:
            for state in ServerState.values:
                each_state.add_metric([server.name, state], int(server.state == state))
        yield each_state
        yield from self.server_load(servers)
        yield from self.leases(servers, now)
        yield from self.webhooks(now)
        yield from self.histograms(now)
        yield from self.event_counters(servers)
        yield from storage_families()

    def server_load(self, servers):
        on_server = defaultdict(int)
        for server_id, status, count in (
            Task.objects.filter(status__in=ACTIVE_STATUSES, server__isnull=False)
            .order_by()
            .values_list("server_id", "status")
            .annotate(Count("pk"))
        ):
            on_server[server_id, status] += count
        load = GaugeMetricFamily(
            "comfyhub_server_tasks",
            "The hub's tasks on each server: submitted (waiting in its queue) and running.",
            labels=["server", "status"],
        )
        for server in servers:
            for status in (TaskStatus.SUBMITTED, TaskStatus.RUNNING):
                load.add_metric([server.name, status], on_server.get((server.pk, status), 0))
        yield load
        foreign = GaugeMetricFamily(
            "comfyhub_server_foreign_queue",
            "Prompts of other clients in each server's queue, as its last probe saw them.",
            labels=["server"],
        )
        for server in servers:
            foreign.add_metric([server.name], server.foreign_queue)
        yield foreign

    def leases(self, servers, now):
        """Workers alive and which enabled servers one of them follows, from the unexpired Lock rows (one query)."""
        workers, leased = 0, set()
        for purpose, key in Lock.objects.filter(
            purpose__in=(LockPurpose.WORKER, LockPurpose.UPSTREAM), expires_at__gt=now
        ).values_list("purpose", "key"):
            if purpose == LockPurpose.WORKER:
                workers += 1
            else:
                leased.add(key)
        yield GaugeMetricFamily(
            "comfyhub_workers",
            "Upstream supervisors alive (run_upstream workers, or serve's embedded one): unexpired presence rows.",
            value=workers,
        )
        family = GaugeMetricFamily(
            "comfyhub_server_leased",
            "1 when a worker holds an unexpired lease on an enabled server (it follows that server), else 0.",
            labels=["server"],
        )
        for server in servers:
            if server.enabled:
                family.add_metric([server.name], int(upstream_key(server.pk) in leased))
        yield family

    def webhooks(self, now):
        due = Q(status=DeliveryStatus.PENDING, next_attempt_at__lte=now)
        recent = Q(last_attempt_at__gte=now - RECENT_WEBHOOKS)
        figures = WebhookDelivery.objects.order_by().aggregate(
            **{status: Count("pk", filter=Q(status=status)) for status in DeliveryStatus.values},
            failed_recent=Count("pk", filter=recent & Q(status=DeliveryStatus.FAILED)),
            delivered_recent=Count("pk", filter=recent & Q(status=DeliveryStatus.DELIVERED)),
            oldest_due=Min("next_attempt_at", filter=due),
        )
        family = GaugeMetricFamily("comfyhub_webhook_deliveries", "Webhook deliveries by status.", labels=["status"])
        for status in DeliveryStatus.values:
            family.add_metric([status], figures[status])
        yield family
        yield GaugeMetricFamily(
            "comfyhub_webhook_deliveries_failed_recent",
            "Webhook deliveries given up on (failed) whose last attempt was in the last hour.",
            value=figures["failed_recent"],
        )
        yield GaugeMetricFamily(
            "comfyhub_webhook_deliveries_delivered_recent",
            "Webhook deliveries delivered by an attempt in the last hour (with the failed ones: a failure ratio).",
            value=figures["delivered_recent"],
        )
        oldest = figures["oldest_due"]
        yield GaugeMetricFamily(
            "comfyhub_webhook_oldest_due_seconds",
            "How long the pending delivery due the longest has waited for a worker to send it (0: none is due).",
            value=max((now - oldest).total_seconds(), 0.0) if oldest else 0,
        )

    def histograms(self, now):
        since = now - HISTOGRAM_WINDOW
        window = "(a sliding window: read the buckets directly, not with rate())"
        waits = histogram(Task.objects.filter(started_at__gte=since), "created_at", "started_at", QUEUE_WAIT_BUCKETS)
        yield histogram_family(
            "comfyhub_task_queue_wait_seconds",
            f"Seconds from a task's creation to its start, for tasks started in the last 24 hours {window}.",
            waits,
            QUEUE_WAIT_BUCKETS,
        )
        runs = histogram(
            Task.objects.filter(status=TaskStatus.SUCCEEDED, finished_at__gte=since),
            "started_at",
            "finished_at",
            RUN_BUCKETS,
        )
        yield histogram_family(
            "comfyhub_task_run_seconds",
            f"Seconds from a task's start to its end, for tasks that succeeded in the last 24 hours {window}.",
            runs,
            RUN_BUCKETS,
        )

    def event_counters(self, servers):
        server_events = {
            row["server_id"]: row
            for row in ServerEvent.objects.filter(kind="state")
            .order_by()
            .values("server_id")
            .annotate(
                connects=Count("pk", filter=Q(to_state=ServerState.ONLINE)),
                errors=Count("pk", filter=Q(to_state__in=ERROR_STATES)),
            )
        }
        connects = CounterMetricFamily(
            "comfyhub_server_connects", "Times each server's state became online (connects and reconnects).",
            labels=["server"],
        )
        errors = CounterMetricFamily(
            "comfyhub_upstream_errors",
            "Times each server's state became offline or degraded (unreachable, websocket down, failed or slow "
            "probes).",
            labels=["server"],
        )
        for server in servers:
            connects.add_metric([server.name], server_events.get(server.pk, {}).get("connects", 0))
            errors.add_metric([server.name], server_events.get(server.pk, {}).get("errors", 0))
        yield connects
        yield errors

        task_events = dict(
            TaskEvent.objects.filter(Q(kind__in=RECONCILIATION_KINDS) | Q(kind__startswith=RECOVERY_PREFIX))
            .order_by()
            .values_list("kind")
            .annotate(Count("pk"))
        )
        outcomes = CounterMetricFamily(
            "comfyhub_task_events", "Reconciliation and failover outcomes, by kind of task event.", labels=["kind"]
        )
        for kind in RECONCILIATION_KINDS:
            outcomes.add_metric([kind], task_events.get(kind, 0))
        yield outcomes
        recoveries = CounterMetricFamily(
            "comfyhub_stuck_recoveries", "Stuck tasks recovered, by kind of recovery.", labels=["kind"]
        )
        for kind, count in sorted(task_events.items()):
            if kind not in RECONCILIATION_KINDS:
                recoveries.add_metric([kind], count)
        yield recoveries


def histogram(queryset, start, end, buckets):
    """
    {server name: ([cumulative count per bucket], sum of seconds, count)} of `end - start` over `queryset`, in
    one grouped query: each bucket is a conditional COUNT, never a loop over the rows.
    """
    duration = ExpressionWrapper(F(end) - F(start), output_field=DurationField())
    per_bucket = {
        f"le_{index}": Count("pk", filter=Q(duration__lte=timedelta(seconds=bound)))
        for index, bound in enumerate(buckets)
    }
    rows = (
        queryset.filter(server__isnull=False, **{f"{start}__isnull": False, f"{end}__isnull": False})
        .alias(duration=duration)
        .order_by()
        .values("server__name")
        .annotate(count=Count("pk"), seconds=Sum("duration"), **per_bucket)
    )
    result = {}
    for row in rows:
        seconds = row["seconds"]
        if isinstance(seconds, timedelta):
            seconds = seconds.total_seconds()
        elif seconds is not None:
            seconds = seconds / 1_000_000  # a backend without a duration type sums microseconds
        counts = [row[f"le_{index}"] for index in range(len(buckets))]
        result[row["server__name"]] = (counts, float(seconds or 0.0), row["count"])
    return result


def histogram_family(name, documentation, data, buckets):
    family = HistogramMetricFamily(name, documentation, labels=["server"])
    for server in sorted(data):
        counts, seconds, count = data[server]
        cumulative = [(str(bound), value) for bound, value in zip(buckets, counts, strict=True)]
        family.add_metric([server], [*cumulative, ("+Inf", count)], seconds)
    return family


def exposition(now=None):
    """
    The whole /metrics page in Prometheus' text format: the pool's aggregates, then this process's loop lag and
    garbage-collector pauses.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(now))
    return generate_latest(registry) + generate_latest(looplag.REGISTRY)
