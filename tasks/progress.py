"""The one helper every producer uses to push task facts to the browsers of the task's owner."""

import logging
import time

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.core.cache import cache

logger = logging.getLogger(__name__)


OPS_GROUP = "ops"  # staff dashboards: told that something changed, they re-read the pool themselves
# Open dashboards say so in the cache (shared by every process with Redis), renewed while they stay open.
DASHBOARDS_KEY, DASHBOARDS_SECONDS = "comfyhub:ops-dashboards-open", 10
# At most one ops.update a second from each process: a dashboard renders at most once a second, and reads the
# pool again every 2 s by itself, so a change left unannounced still shows within 2 s.
OPS_UPDATE_SECONDS = 1.0
_ops_news = {"sent_at": float("-inf"), "checked_at": float("-inf"), "watched": False}


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
    except Exception:
        # A push is a hint: the page re-reads the database on load, so a failed push loses nothing.
        logger.exception("could not push the update of task %s", task.pk)
    await aemit_ops_update("task")


def emit_task_update(task, *, created=False):
    async_to_sync(aemit_task_update)(task, created=created)


async def aemit_ops_update(what="server"):
    """Tell open staff dashboards that the pool changed: at most once a second, and only while one is open."""
    now = time.monotonic()
    if now - _ops_news["sent_at"] < OPS_UPDATE_SECONDS:
        return
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        if now - _ops_news["checked_at"] >= OPS_UPDATE_SECONDS:
            _ops_news.update(checked_at=now, watched=bool(await cache.aget(DASHBOARDS_KEY)))
        if not _ops_news["watched"]:
            return
        _ops_news["sent_at"] = now
        await layer.group_send(OPS_GROUP, {"type": "ops.update", "what": what})
    except Exception:
        logger.exception("could not push a pool update")


async def dashboard_open():
    """An open dashboard says so every few seconds (ops/consumers.py)."""
    await cache.aset(DASHBOARDS_KEY, True, DASHBOARDS_SECONDS)
    _ops_news.update(checked_at=time.monotonic(), watched=True)  # this process knows at once


def emit_ops_update(what="server"):
    async_to_sync(aemit_ops_update)(what)
