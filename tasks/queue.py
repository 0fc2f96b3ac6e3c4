"""Where queued tasks stand: their positions in the hub's queue, for the pages that show them."""

import bisect
from collections import defaultdict

from django.db.models import Count, Min

from tasks.models import Task, TaskStatus


def queue_positions(tasks):
    """
    {task id: position} of the queued ones among `tasks`, 1 for the next the dispatcher will take, in two queries
    however many tasks are shown. Dispatch takes turns between users (servers/dispatch.py), so ahead of a task
    are: every queued task of a higher priority, its owner's own earlier tasks (k - 1 of them), and up to k tasks
    of each other user at its priority (k - 1 for users who have waited less). An estimate: tasks on servers and
    new arrivals change the turns.
    """
    queued = [task for task in tasks if task.status == TaskStatus.QUEUED]
    if not queued:
        return {}
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
    positions = {}
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
