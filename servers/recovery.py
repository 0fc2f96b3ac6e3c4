"""
Stuck-task recovery, in grades. A task that has been quiet too long for its state gets the next grade; each
grade writes a TaskEvent (which makes the task "heard from" again), so a task that stays stuck climbs one grade
per quiet period, across attempts (stuck again after a requeue means it fails):

1. recover_resync: look again at the server's /queue and /history (finishes it if the server has);
2. recover_refetch: fetch /history again and copy its outputs (a completion that failed half-way);
3. recover_requeue: interrupt or delete it on the server and send it again (counts an attempt);
4. recover_fail: fail it with the reason.

The supervisor's watchdog, `manage.py recover_tasks` and the admin action run this same code.
"""

import logging
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from servers.aio import db
from servers.comfy_replies import ComfyError
from servers.guard import step_guard
from tasks.models import Task, TaskStatus
from tasks.templatetags.comfyhub import duration

logger = logging.getLogger(__name__)

GRADES = ["recover_resync", "recover_refetch", "recover_requeue", "recover_fail"]


@dataclass
class Action:
    task_id: object
    grade: str
    message: str
    server: str = ""

    def __str__(self):
        return f"task={self.task_id} server={self.server or '-'} {self.grade}: {self.message}"


def stuck(older_than=None, server_name=None, task_ids=None, server_ids=None):
    """Tasks on a server that have been quiet longer than their state allows (or than `older_than` seconds)."""
    conf = settings.COMFYHUB
    now = timezone.now()
    rows = Task.objects.select_related("server", "workflow", "owner").filter(
        status__in=[TaskStatus.SUBMITTED, TaskStatus.RUNNING]
    )
    if task_ids is not None:
        rows = rows.filter(pk__in=task_ids)
    elif older_than is not None:
        rows = rows.filter(last_event_at__lt=now - timedelta(seconds=older_than))
    else:
        rows = rows.filter(
            Q(status=TaskStatus.SUBMITTED, last_event_at__lt=now - timedelta(seconds=conf["STUCK_SUBMITTED"]))
            | Q(status=TaskStatus.RUNNING, last_event_at__lt=now - timedelta(seconds=conf["STUCK_RUNNING"]))
        )
    if server_name is not None:
        rows = rows.filter(server__name=server_name)
    if server_ids is not None:
        rows = rows.filter(server_id__in=server_ids)
    return list(rows.order_by("last_event_at"))


def next_grade(task):
    """How far recovery of this task has gone already: a task requeued for being stuck and stuck again fails."""
    done = task.events.filter(kind__in=GRADES).count()
    return GRADES[min(done, len(GRADES) - 1)]


async def recover(older_than=None, server_name=None, dry_run=False, task_ids=None, connections=None, connect=None):
    """
    Apply the next grade to each stuck task; returns the Actions (planned only, with dry_run). With
    `connections` (a supervisor's), only the tasks of those servers, through those connections; otherwise through
    `connect(server)`, which makes a connection for one run (servers.connection.standalone for commands and admin
    actions) whose client is closed at the end.
    """
    if connections is None and connect is None and not dry_run:
        raise TypeError("recover() needs a supervisor's connections or connect(server)")
    server_ids = list(connections) if connections is not None else None
    tasks = await db(stuck)(older_than, server_name, task_ids, server_ids)
    actions = []
    own = {}
    try:
        for task in tasks:
            conn = None
            if not dry_run:
                conn = (connections or {}).get(task.server_id)
                if conn is None:
                    conn = own.get(task.server_id) or connect(task.server)
                    own[task.server_id] = conn
            # One task that raises must not stop the recovery of the others.
            guard = conn.guard(task, "recovery") if conn else step_guard(task, "recovery", server=task.server)
            async with guard as outcome:
                grade = await db(next_grade)(task)
                if dry_run:
                    actions.append(Action(task.pk, grade, f"would apply: {describe(task)}", task.server.name))
                    continue
                actions.append(await apply(conn, task, grade))
            if outcome.failed:
                error = type(outcome.error).__name__
                actions.append(Action(task.pk, "recovery", f"could not recover it: {error}", task.server.name))
    finally:
        for conn in own.values():
            await conn.client.close()
    return actions


def describe(task, now=None):
    """How long a task has been quiet, what it runs and for whom: what an operator weighs before acting on it."""
    quiet = (now or timezone.now()) - task.last_event_at
    since = timezone.localtime(task.last_event_at)
    workflow = task.workflow.slug if task.workflow else "raw graph"
    return (
        f"{task.status}, quiet for {duration(quiet)} (since {since:%Y-%m-%d %H:%M:%S}), "
        f"workflow {workflow}, owner {task.owner.get_username()}"
    )


async def apply(conn, task, grade):
    name = conn.server.name
    try:
        if grade in ("recover_resync", "recover_refetch"):
            queue = await conn.client.queue()
            where = queue.where(task.prompt_id)
            if where:
                message = f"still {where} on {name}"
                if grade == "recover_refetch" and where == "running":
                    message += "; it may simply be long"
            else:
                entry = await conn.client.history(task.prompt_id)
                if entry is not None:
                    await conn.finish(task, grade, entry)
                    status = await db(lambda: Task.objects.get(pk=task.pk).status)()
                    message = f"found in {name}'s history: now {status}"
                elif task.accepted_at is None and task.started_at is None:
                    if await conn.resend(task, f"{name} never got it: sending it again ({grade})"):
                        message = f"{name} never got it: sent it again"
                    else:
                        message = f"{name} has it after all, or it changed meanwhile: left alone"
                    await db(task.record)(grade, message)
                    return Action(task.pk, grade, message, name)
                else:
                    await db(task.requeue)(f"{name} lost it (found by recovery)")
                    message = f"{name} lost it: requeued"
        elif grade == "recover_requeue":
            queue = await conn.client.queue()
            where = queue.where(task.prompt_id)
            if where == "running":
                await conn.client.interrupt(task.prompt_id)
            elif where == "pending":
                await conn.client.delete_from_queue([task.prompt_id])
            await db(task.record)(grade, f"stuck: {'interrupted' if where else 'not'} on {name}, sending it again")
            await db(task.requeue)(f"stuck on {name}: sent again", stale=True)
            conn.forget(task.prompt_id)
            return Action(task.pk, grade, f"{where or 'gone'} on {name}: requeued", name)
        else:
            await db(task.record)(grade, "stuck after every other recovery")
            await db(task.mark_failed)("stuck", f"stuck on {name}: no progress after every recovery step")
            conn.forget(task.prompt_id)
            return Action(task.pk, grade, "failed: stuck after every recovery step", name)
    except ComfyError as exc:
        message = f"could not ask {name}: {exc.message}"
    await db(task.record)(grade, message)
    logger.info("recovery of task %s on %s: %s: %s", task.pk, name, grade, message)
    return Action(task.pk, grade, message, name)
