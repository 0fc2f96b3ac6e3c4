"""The one helper every producer uses to push task facts to the browsers of the task's owner."""

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

logger = logging.getLogger(__name__)


def user_group(user_id):
    return f"user.{user_id}"


def task_event(task):
    return {
        "type": "task.update",
        "task": str(task.pk),
        "status": task.status,
        "progress": round(task.progress, 4),
    }


async def aemit_task_update(task):
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        await layer.group_send(user_group(task.owner_id), task_event(task))
    except Exception:
        # A push is a hint: the page re-reads the database on load, so a failed push loses nothing.
        logger.exception("could not push the update of task %s", task.pk)


def emit_task_update(task):
    async_to_sync(aemit_task_update)(task)
