"""The one helper every producer uses to push task facts to the browsers of the task's owner."""

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

logger = logging.getLogger(__name__)


OPS_GROUP = "ops"  # staff dashboards: told that something changed, they re-read the pool themselves


def user_group(user_id):
    return f"user.{user_id}"


def task_event(task, *, created=False):
    """
    A status change of a task, small enough for any channel layer: the user's feed re-reads the task and renders
    its row. Progress and previews travel as facts of their own (tasks/live.py).
    """
    return {
        "type": "task.update",
        "task": str(task.pk),
        "status": task.status,
        "progress": round(task.progress, 4),
        "created": created,
    }


async def aemit_task_update(task, *, created=False):
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        await layer.group_send(
            user_group(task.owner_id), task_event(task, created=created)
        )
        await layer.group_send(OPS_GROUP, {"type": "ops.update", "what": "task"})
    except Exception:
        # A push is a hint: the page re-reads the database on load, so a failed push loses nothing.
        logger.exception("could not push the update of task %s", task.pk)


def emit_task_update(task, *, created=False):
    async_to_sync(aemit_task_update)(task, created=created)


async def aemit_ops_update(what="server"):
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        await layer.group_send(OPS_GROUP, {"type": "ops.update", "what": what})
    except Exception:
        logger.exception("could not push a pool update")


def emit_ops_update(what="server"):
    async_to_sync(aemit_ops_update)(what)
