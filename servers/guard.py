"""
Fault isolation for the supervisor: whatever one task does, the loops go on for every other task.

Every per-task step (send, reconcile, a websocket message, progress, finish, store outputs, cancel, dispatch,
recovery) runs inside `step_guard(task, step)`. An error there is logged with its traceback, written on the task
as a `step_failed` TaskEvent, and the caller moves on to the next task. The same step failing on the same task
with the same error class STEP_FAILURES times (counted from those events, so across reconnects, processes and
the recovery command) fails the task with error_kind "internal_error" and a reason its owner can read.

What is not the task's fault goes through untouched or is only logged:
- asyncio.CancelledError (a stop, a reconnect);
- ComfyUnavailable: the server did not answer, the caller retries later as it always has;
- the database being unreachable or locked (OperationalError, InterfaceError), or the file store (disk or bucket)
  not taking or giving a file (StorageUnavailable): every task would fail alike, so it is logged (at most every
  30 s per step) and never counted against a task.
"""

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections

from servers.aio import db
from servers.comfy_replies import ComfyUnavailable
from tasks.models import ACTIVE_STATUSES, Task, TaskEvent
from tasks.storage import StorageUnavailable

logger = logging.getLogger(__name__)

ENVIRONMENT_ERRORS = (OperationalError, InterfaceError, StorageUnavailable)

# What the hub was trying to do, in the owner's words: "The hub could not <words> ...".
STEP_WORDS = {
    "dispatch": "hand it to a server",
    "send": "send it to its server",
    "reconcile": "compare it with its server's queue and history",
    "message": "follow the messages of its server",
    "progress": "update its progress",
    "finish": "finish it",
    "store_outputs": "store its outputs",
    "cancel": "cancel it on its server",
    "recovery": "recover it",
    "consistency": "check it against its server",
}

_last_logged = {}  # (step, error class) -> monotonic time, for environment errors


@dataclass
class Outcome:
    """What a guarded step left behind: `error` is the exception it raised, if any."""

    error: BaseException | None = None

    @property
    def failed(self):
        return self.error is not None


@asynccontextmanager
async def step_guard(task, step, *, server=None, on_give_up=None):
    """
    Run one step for one task (a Task, or its pk); an error that is the task's own is recorded and swallowed.
    `on_give_up(prompt_id)` is awaited when this failure made the task fail (the connection forgets it).
    """
    outcome = Outcome()
    try:
        yield outcome
    except (asyncio.CancelledError, ComfyUnavailable):
        raise
    except Exception as exc:
        outcome.error = exc
        await step_failed(task, step, exc, server=server, on_give_up=on_give_up)


@asynccontextmanager
async def contained(what):
    """For a step that is not one task's (a supervisor sub-step): log its failure and go on with the others."""
    try:
        yield
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("%s failed", what)
        await _close_connections()


async def step_failed(task, step, exc, *, server=None, on_give_up=None):
    task_id = getattr(task, "pk", task)
    where = server.name if server is not None else "-"
    error = type(exc).__name__
    if isinstance(exc, ENVIRONMENT_ERRORS):
        key = (step, error)
        now = time.monotonic()
        if now - _last_logged.get(key, -1e9) >= 30:
            _last_logged[key] = now
            logger.error(
                "%s: the %s step of task %s hit a %s", where, step, task_id,
                "storage error" if isinstance(exc, StorageUnavailable) else "database error", exc_info=exc,
            )
        await _close_connections()
        return
    logger.error("%s: the %s step of task %s failed", where, step, task_id, exc_info=exc)
    try:
        failed, prompt_id = await db(record_failure)(task_id, step, exc)
    except Exception:
        # The database may be down: the failure is in the log, and the next pass tries again.
        logger.exception("%s: could not record the failed %s step of task %s", where, step, task_id)
        await _close_connections()
        return
    if failed:
        logger.warning("%s: task %s failed: its %s step failed %s times", where, task_id, step, error)
        if on_give_up is not None and prompt_id:
            try:
                await on_give_up(prompt_id)
            except Exception:
                logger.exception("%s: could not let go of task %s", where, task_id)


def record_failure(task_id, step, exc):
    """
    Write the step_failed event; fail the task when this step has now failed STEP_FAILURES times with this error
    class (since an operator last retried it). Returns (whether this call failed the task, its prompt_id).
    """
    task = Task.objects.filter(pk=task_id).first()
    if task is None:
        return False, None
    error = type(exc).__name__
    message = plain(str(exc))[:500]
    task.record(
        "step_failed",
        f"the {step} step failed: {error}: {message}"[:1000],
        {"step": step, "error": error, "message": message},
        touch=False,  # a failure is not news from the task: a stuck task must still look stuck to recovery
    )
    if task.status not in ACTIVE_STATUSES:
        return False, None
    events = TaskEvent.objects.filter(task=task)
    retried = events.filter(kind="retried").order_by("-pk").values_list("pk", flat=True).first()
    if retried is not None:
        events = events.filter(pk__gt=retried)
    count = events.filter(kind="step_failed", detail__step=step, detail__error=error).count()
    limit = settings.COMFYHUB["STEP_FAILURES"]
    if count < limit:
        return False, None
    prompt_id = task.prompt_id
    reason = (
        f"The hub could not {STEP_WORDS.get(step, step)}: the same error ({error}) happened {count} times, "
        "so it stopped trying. The details are in the task's history for an operator."
    )
    # Not bound to the prompt: whatever attempt it is on, this task keeps failing the same way.
    failed = task.mark_failed(
        "internal_error", reason, {"step": step, "error": error, "failures": count}, match_prompt=False
    )
    return failed, prompt_id


def plain(text):
    """Text that can be stored and shown anywhere: a lone surrogate becomes its escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


async def _close_connections():
    try:
        await db(close_old_connections)()
    except Exception:
        logger.exception("could not close the database connections")
