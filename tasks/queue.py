"""Where queued tasks stand: their positions in the hub's queue, for the pages that show them."""

import bisect
import statistics
from collections import defaultdict
from datetime import timedelta

from django.db.models import Count, Min
from django.utils import timezone

from servers.models import ACCEPTING_STATES, Server
from tasks.models import ON_SERVER_STATUSES, Task, TaskStatus

TYPICAL_OF = 20  # recent successful runs of a workflow its typical wait and run time are taken from


def queue_positions(tasks):
    """
    {task id: position} of the queued ones among `tasks`, 1 for the next the dispatcher will take, in two queries
    however many tasks are shown; and of the submitted ones, their place among the hub's tasks waiting in their
    server's queue (1: the next it runs), in one more. Dispatch takes turns between users (servers/dispatch.py),
    so ahead of a queued task are: every queued task of a higher priority, its owner's own earlier tasks (k - 1
    of them), and up to k tasks of each other user at its priority (k - 1 for users who have waited less). An
    estimate: tasks on servers and new arrivals change the turns.
    """
    positions = server_positions([task for task in tasks if task.status == TaskStatus.SUBMITTED])
    queued = [task for task in tasks if task.status == TaskStatus.QUEUED]
    if not queued:
        return positions
    groups = list(
        Task.objects.queued().values("priority", "owner_id").annotate(n=Count("pk"), oldest=Min("created_at"))
    )
    own = defaultdict(list)  # (owner, priority) -> creation times of that owner's queued tasks, oldest first
    rows = (
        Task.objects.queued()
        .filter(owner_id__in={task.owner_id for task in queued})
        .order_by("created_at")
        .values_list("owner_id", "priority", "created_at")
    )
    for owner_id, priority, created_at in rows:
        own[(owner_id, priority)].append(created_at)
    for task in queued:
        mine = own.get((task.owner_id, task.priority))
        if not mine or task.created_at not in mine:
            continue  # it left the queue since this object was loaded
        rank = bisect.bisect_left(mine, task.created_at) + 1
        higher = sum(row["n"] for row in groups if row["priority"] > task.priority)
        # In each round the user waiting longest goes first.
        ahead = sum(
            min(row["n"], rank if row["oldest"] < mine[0] else rank - 1)
            for row in groups
            if row["priority"] == task.priority and row["owner_id"] != task.owner_id
        )
        positions[task.pk] = higher + (rank - 1) + ahead + 1
    return positions


def server_positions(submitted):
    """{task id: place in its server's queue} of submitted tasks, counted among the hub's tasks sent there."""
    servers = {task.server_id for task in submitted if task.server_id}
    if not servers:
        return {}
    waiting = defaultdict(list)
    rows = (
        Task.objects.filter(status=TaskStatus.SUBMITTED, server_id__in=servers)
        .order_by("submitted_at", "created_at")
        .values_list("server_id", "pk")
    )
    for server_id, pk in rows:
        waiting[server_id].append(pk)
    places = {server_id: {pk: index + 1 for index, pk in enumerate(pks)} for server_id, pks in waiting.items()}
    return {task.pk: places[task.server_id][task.pk] for task in submitted if task.pk in places.get(task.server_id, {})}


def pool_state(user, workflow=None):
    """
    How busy the pool is, for a user about to submit: servers taking tasks, and what a new task of this user
    would wait behind; with a workflow, its typical wait and run time over its last successful runs.
    """
    servers = list(Server.objects.enabled().values_list("state", "draining"))
    taking = sum(1 for state, draining in servers if not draining and state in ACCEPTING_STATES)
    draining = sum(1 for _, is_draining in servers if is_draining)
    queued = dict(Task.objects.queued().values_list("owner_id").annotate(n=Count("pk")).values_list("owner_id", "n"))
    mine = queued.get(user.pk, 0)
    # Users take turns (servers/dispatch.py): ahead of a new task are the user's own queued tasks and, of each
    # other user, at most as many as the user has queued, plus one.
    ahead = mine + sum(min(n, mine + 1) for owner, n in queued.items() if owner != user.pk)
    state = {
        "servers": len(servers),
        "online": taking,
        "draining": draining,
        "ahead": ahead,
        "on_servers": Task.objects.filter(status__in=ON_SERVER_STATUSES).count(),
    }
    if workflow is not None:
        state.update(typical_times(workflow))
    return state


def typical_times(workflow):
    """Median wait (submit to start) and run time (start to end) of the workflow's recent successful runs."""
    since = timezone.now() - timedelta(days=7)
    runs = list(
        workflow.tasks.filter(status=TaskStatus.SUCCEEDED, finished_at__gte=since, started_at__isnull=False)
        .order_by("-finished_at")
        .values_list("created_at", "started_at", "finished_at")[:TYPICAL_OF]
    )
    if not runs:
        return {"typical_wait": None, "typical_run": None}
    return {
        "typical_wait": statistics.median((started - created).total_seconds() for created, started, _ in runs),
        "typical_run": statistics.median((finished - started).total_seconds() for _, started, finished in runs),
    }
