"""
What the pool is doing, read from the database: the staff dashboard's snapshot and the Prometheus exposition.

Every number is an aggregate query or a read bounded by a time window, so any process (a Daphne behind the load
balancer or a run_upstream worker) answers with the same figures, and a scrape costs a fixed handful of queries.
"""

import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta

from django.db.models import Count, DurationField, ExpressionWrapper, F, Min, Q, Sum, Window
from django.db.models.functions import RowNumber
from django.utils import timezone

from servers.models import Server, ServerEvent, ServerState
from tasks.models import ACTIVE_STATUSES, Task, TaskEvent, TaskStatus

ERROR_STATES = (ServerState.OFFLINE, ServerState.DEGRADED)
RECENT_ERRORS = 5
UTILISATION_WINDOW = timedelta(hours=1)
UTILISATION_BARS = 12
HISTOGRAM_WINDOW = timedelta(hours=24)
# Seconds. Queue waits run from "next in line" to "behind a long batch"; run times from a cached 1 s graph to
# a long video job.
QUEUE_WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)
RUN_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
# TaskEvent kinds written by reconciliation and failover (see servers/upstream.py and Task.requeue/move).
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
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# --- dashboard ---------------------------------------------------------------------------------------------


@dataclass
class Bar:
    """One slice of a server's utilisation chart, with its SVG geometry."""

    start: object
    end: object
    fraction: float
    x: int
    y: float
    height: float

    @property
    def percent(self):
        return round(self.fraction * 100)


@dataclass
class ServerRow:
    server: Server
    running: list = field(default_factory=list)
    submitted: int = 0
    bars: list = field(default_factory=list)
    errors: list = field(default_factory=list)

    @property
    def busy_percent(self):
        if not self.bars:
            return 0
        return round(sum(bar.fraction for bar in self.bars) / len(self.bars) * 100)

    @property
    def in_trouble(self):
        return self.server.state in ERROR_STATES


CHART_HEIGHT = 28
BAR_WIDTH = 6
BAR_STEP = 8


def dashboard(now=None):
    """Everything the staff dashboard shows, in a fixed number of queries whatever the number of servers."""
    now = now or timezone.now()
    servers = list(Server.objects.all())
    running = defaultdict(list)
    for task in (
        Task.objects.filter(status=TaskStatus.RUNNING, server__isnull=False)
        .select_related("workflow", "owner")
        .order_by("started_at")
    ):
        running[task.server_id].append(task)
    submitted = dict(
        Task.objects.filter(status=TaskStatus.SUBMITTED, server__isnull=False)
        .order_by()
        .values_list("server_id")
        .annotate(Count("pk"))
    )
    busy = utilisation(now)
    errors = recent_errors()
    rows = [
        ServerRow(
            server=server,
            running=running.get(server.pk, []),
            submitted=submitted.get(server.pk, 0),
            bars=chart(busy.get(server.pk), now),
            errors=errors.get(server.pk, []),
        )
        for server in servers
    ]
    return {"servers": rows, "totals": totals(now), "waiting": waiting_reasons(), "now": now}


def totals(now):
    counts = dict(Task.objects.active().order_by().values_list("status").annotate(Count("pk")))
    finished = Task.objects.filter(finished_at__gte=now - timedelta(hours=1)).aggregate(
        failed=Count("pk", filter=Q(status=TaskStatus.FAILED)),
        succeeded=Count("pk", filter=Q(status=TaskStatus.SUCCEEDED)),
    )
    oldest = Task.objects.queued().aggregate(oldest=Min("created_at"))["oldest"]
    return {
        "queued": counts.get(TaskStatus.QUEUED, 0),
        "submitted": counts.get(TaskStatus.SUBMITTED, 0),
        "running": counts.get(TaskStatus.RUNNING, 0),
        "failed_last_hour": finished["failed"],
        "succeeded_last_hour": finished["succeeded"],
        "oldest_queued": now - oldest if oldest else None,
    }


def waiting_reasons(limit=5):
    """Why queued tasks are not being sent anywhere, the commonest reasons first."""
    return list(
        Task.objects.queued()
        .exclude(waiting_reason="")
        .order_by()
        .values("waiting_reason")
        .annotate(count=Count("pk"))
        .order_by("-count", "waiting_reason")[:limit]
    )


def utilisation(now, window=UTILISATION_WINDOW, bars=UTILISATION_BARS):
    """
    {server id: [fraction of each of `bars` equal slices of the last `window` during which it ran a task]}, from
    the tasks' started_at/finished_at clipped to each slice; a running task counts until now, and overlapping
    tasks count once.
    """
    since = now - window
    rows = (
        Task.objects.filter(server__isnull=False, started_at__isnull=False, started_at__lt=now)
        .filter(Q(finished_at__gt=since) | Q(finished_at__isnull=True, status=TaskStatus.RUNNING))
        .order_by()
        .values_list("server_id", "started_at", "finished_at")
    )
    intervals = defaultdict(list)
    for server_id, started, finished in rows:
        start, end = max(started, since), min(finished or now, now)
        if end > start:
            intervals[server_id].append((start, end))
    step = window / bars
    result = {}
    for server_id, spans in intervals.items():
        merged = merge(spans)
        fractions = []
        for index in range(bars):
            low = since + step * index
            high = low + step
            busy = sum(
                (min(end, high) - max(start, low) for start, end in merged if start < high and end > low), timedelta()
            )
            fractions.append(min(busy / step, 1.0))
        result[server_id] = fractions
    return result


def merge(spans):
    merged = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def chart(fractions, now, window=UTILISATION_WINDOW, bars=UTILISATION_BARS):
    fractions = fractions or [0.0] * bars
    step = window / bars
    since = now - window
    result = []
    for index, fraction in enumerate(fractions):
        height = round(fraction * CHART_HEIGHT, 1)
        if 0 < height < 1:
            height = 1.0  # a little work stays visible
        result.append(
            Bar(
                start=since + step * index,
                end=since + step * (index + 1),
                fraction=fraction,
                x=index * BAR_STEP,
                y=CHART_HEIGHT - height,
                height=height,
            )
        )
    return result


def recent_errors(limit=RECENT_ERRORS):
    """{server id: its last `limit` events in an error state (offline, degraded), newest first}, in one query."""
    events = (
        ServerEvent.objects.filter(to_state__in=ERROR_STATES)
        .annotate(rank=Window(RowNumber(), partition_by=[F("server_id")], order_by=[F("at").desc(), F("pk").desc()]))
        .filter(rank__lte=limit)
        .order_by("server_id", "-at", "-pk")
    )
    result = defaultdict(list)
    for event in events:
        result[event.server_id].append(event)
    return result


# --- Prometheus exposition ---------------------------------------------------------------------------------


def escape_label(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value):
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def format_labels(labels):
    if not labels:
        return ""
    return "{" + ",".join(f'{name}="{escape_label(value)}"' for name, value in labels.items()) + "}"


def family(name, kind, help_text, samples):
    """The lines of one metric family; `samples` are (suffix, {label: value}, value)."""
    yield f"# HELP {name} {escape_help(help_text)}"
    yield f"# TYPE {name} {kind}"
    for suffix, labels, value in samples:
        yield f"{name}{suffix}{format_labels(labels)} {format_value(value)}"


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


def histogram_samples(data, buckets):
    for server in sorted(data):
        counts, seconds, count = data[server]
        for bound, cumulative in zip(buckets, counts, strict=True):
            yield "_bucket", {"server": server, "le": format_value(float(bound))}, cumulative
        yield "_bucket", {"server": server, "le": "+Inf"}, count
        yield "_sum", {"server": server}, seconds
        yield "_count", {"server": server}, count


def exposition(now=None):
    """The whole /metrics page in Prometheus' text format (version 0.0.4)."""
    now = now or timezone.now()
    servers = list(Server.objects.order_by("name"))
    lines = []

    by_status = dict(Task.objects.order_by().values_list("status").annotate(Count("pk")))
    lines += family(
        "comfyhub_tasks",
        "gauge",
        "Tasks by status.",
        [("", {"status": status}, by_status.get(status, 0)) for status in TaskStatus.values],
    )
    oldest = Task.objects.queued().aggregate(oldest=Min("created_at"))["oldest"]
    lines += family(
        "comfyhub_oldest_queued_task_age_seconds",
        "gauge",
        "How long the oldest queued task has waited in the hub (0: none waits).",
        [("", {}, max((now - oldest).total_seconds(), 0.0) if oldest else 0)],
    )

    by_state = defaultdict(int)
    for server in servers:
        by_state[server.state] += 1
    lines += family(
        "comfyhub_servers",
        "gauge",
        "Servers by state.",
        [("", {"state": state}, by_state.get(state, 0)) for state in ServerState.values],
    )
    lines += family(
        "comfyhub_server_state",
        "gauge",
        "1 for the state each server is in, 0 for the others.",
        [
            ("", {"server": server.name, "state": state}, int(server.state == state))
            for server in servers
            for state in ServerState.values
        ],
    )
    on_server = defaultdict(int)
    for server_id, status, count in (
        Task.objects.filter(status__in=ACTIVE_STATUSES, server__isnull=False)
        .order_by()
        .values_list("server_id", "status")
        .annotate(Count("pk"))
    ):
        on_server[server_id, status] += count
    lines += family(
        "comfyhub_server_tasks",
        "gauge",
        "The hub's tasks on each server: submitted (waiting in its queue) and running.",
        [
            ("", {"server": server.name, "status": status}, on_server.get((server.pk, status), 0))
            for server in servers
            for status in (TaskStatus.SUBMITTED, TaskStatus.RUNNING)
        ],
    )
    lines += family(
        "comfyhub_server_foreign_queue",
        "gauge",
        "Prompts of other clients in each server's queue, as its last probe saw them.",
        [("", {"server": server.name}, server.foreign_queue) for server in servers],
    )

    since = now - HISTOGRAM_WINDOW
    waits = histogram(Task.objects.filter(started_at__gte=since), "created_at", "started_at", QUEUE_WAIT_BUCKETS)
    lines += family(
        "comfyhub_task_queue_wait_seconds",
        "histogram",
        "Seconds from a task's creation to its start, for tasks started in the last 24 hours (a sliding window: "
        "read the buckets directly, not with rate()).",
        histogram_samples(waits, QUEUE_WAIT_BUCKETS),
    )
    runs = histogram(
        Task.objects.filter(status=TaskStatus.SUCCEEDED, finished_at__gte=since),
        "started_at",
        "finished_at",
        RUN_BUCKETS,
    )
    lines += family(
        "comfyhub_task_run_seconds",
        "histogram",
        "Seconds from a task's start to its end, for tasks that succeeded in the last 24 hours (a sliding window: "
        "read the buckets directly, not with rate()).",
        histogram_samples(runs, RUN_BUCKETS),
    )

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
    lines += family(
        "comfyhub_server_connects_total",
        "counter",
        "Times each server's state became online (connects and reconnects).",
        [("", {"server": server.name}, server_events.get(server.pk, {}).get("connects", 0)) for server in servers],
    )
    lines += family(
        "comfyhub_upstream_errors_total",
        "counter",
        "Times each server's state became offline or degraded (unreachable, websocket down, failed or slow probes).",
        [("", {"server": server.name}, server_events.get(server.pk, {}).get("errors", 0)) for server in servers],
    )

    task_events = dict(
        TaskEvent.objects.filter(Q(kind__in=RECONCILIATION_KINDS) | Q(kind__startswith=RECOVERY_PREFIX))
        .order_by()
        .values_list("kind")
        .annotate(Count("pk"))
    )
    lines += family(
        "comfyhub_task_events_total",
        "counter",
        "Reconciliation and failover outcomes, by kind of task event.",
        [("", {"kind": kind}, task_events.get(kind, 0)) for kind in RECONCILIATION_KINDS],
    )
    lines += family(
        "comfyhub_stuck_recoveries_total",
        "counter",
        "Stuck tasks recovered, by kind of recovery.",
        [
            ("", {"kind": kind}, count)
            for kind, count in sorted(task_events.items())
            if kind not in RECONCILIATION_KINDS
        ],
    )
    return "\n".join(lines) + "\n"
