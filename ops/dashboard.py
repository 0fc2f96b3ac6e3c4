"""
The staff dashboard's snapshot of the pool, read from the database in a fixed number of queries whatever the
number of servers, so any process (a Daphne behind the load balancer or a run_upstream worker) shows the same.
"""

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta

from django.db.models import Count, F, Min, Q, Window
from django.db.models.functions import RowNumber
from django.utils import timezone

from servers.models import Server, ServerEvent, ServerState
from tasks.models import Task, TaskStatus

ERROR_STATES = (ServerState.OFFLINE, ServerState.DEGRADED)
RECENT_ERRORS = 5
UTILISATION_WINDOW = timedelta(hours=1)
UTILISATION_BARS = 12


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
