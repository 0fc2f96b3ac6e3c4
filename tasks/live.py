"""
The live path: small facts about a running task (its progress, its sampler preview) that travel from the task's
upstream connection over the channel layer to its owner's windows, and the fragments a window patches in from
them. Nothing here reads the database: a fact carries everything its fragment shows. Status changes travel as
`task.update` (tasks/progress.py) and re-render the whole row.
"""

import base64
import logging
import time

from channels.layers import get_channel_layer
from django.template.loader import get_template

from tasks.progress import user_group

logger = logging.getLogger(__name__)

PROGRESS, PREVIEW = "task.live", "task.preview"


def progress_fact(task_id, owner_id, detail, *, upstream_at=None):
    """`detail` is what `progress_detail()` returns; `upstream_at` when the oldest message folded into it arrived."""
    return {"type": PROGRESS, "task": str(task_id), "owner": owner_id, "upstream_at": upstream_at, **detail}


def progress_detail(*, value, node=None, title="", step=None, done=0, total=0, started=None, eta_at=None):
    """
    What a progress bar and its line of text show: `value` (0..1, below 1 until the task succeeds), the running
    node's id and `title`, its `step` as [value, max] when it reports steps, `done` of `total` nodes (cached count
    as done), when it `started` running (epoch seconds) and when it should end, `eta_at`, or None: unknown.
    """
    return {
        "value": round(min(max(float(value), 0.0), 0.99), 4),
        "node": str(node)[:64] if node is not None else None,
        "title": str(title)[:80],
        "step": list(step) if step else None,
        "done": int(done),
        "total": int(total),
        "started": started,
        "eta_at": eta_at,
    }


def preview_fact(task_id, owner_id, image, mime, size, *, upstream_at=None):
    """A sampler preview, already made small (servers/previews.py): never stored, only pushed to its owner."""
    return {
        "type": PREVIEW,
        "task": str(task_id),
        "owner": owner_id,
        "upstream_at": upstream_at,
        "mime": mime,
        "width": size[0],
        "height": size[1],
        "data": base64.b64encode(image).decode("ascii"),
    }


async def apush(owner_id, fact):
    """Send a fact to its owner's group. A push is a hint: on a failure the page still shows the truth on load."""
    layer = get_channel_layer()
    if layer is None:
        return False
    try:
        await layer.group_send(user_group(owner_id), fact)
    except Exception:
        logger.exception("could not push a live update of task %s", fact.get("task"))
        return False
    return True


def render_fact(fact, oob=True):
    """The out-of-band fragment for one fact: the live part of the row, or the preview image."""
    if fact.get("type") == PREVIEW:
        context = {"preview": fact, "task_id": fact["task"], "oob": oob}
        return get_template("tasks/live.html#preview").render(context)
    context = {"live": live_context(fact), "task_id": fact["task"], "oob": oob}
    return get_template("tasks/live.html#live").render(context)


def redraw_live(row, fact):
    """A rendered row with its live part drawn again from a newer progress fact (the part holds no nested div)."""
    start = row.find(f'<div class="task__live" id="task-{fact["task"]}-live"')
    end = row.find("</div>", start)
    if start < 0 or end < 0:
        return row
    return row[:start] + render_fact(fact, oob=False).strip() + row[end + len("</div>") :]


def live_context(detail, upstream_at=None, now=None):
    """What the `live` fragment shows, from a fact or from the detail a task row stored."""
    now = time.time() if now is None else now
    value = detail.get("value") or 0.0
    step = detail.get("step")
    eta_at = detail.get("eta_at")
    return {
        "percent": min(int(value * 100), 99) if detail.get("final") is None else detail["final"],
        "title": detail.get("title") or "",
        "step": f"{step[0]}/{step[1]}" if step and step[1] else "",
        "done": detail.get("done") or 0,
        "total": detail.get("total") or 0,
        "started": detail.get("started"),
        "elapsed": max(0.0, now - detail["started"]) if detail.get("started") else None,
        "eta_at": eta_at,
        "eta": max(0.0, eta_at - now) if eta_at else None,
        "upstream_at": detail.get("upstream_at", upstream_at),
        "running": bool(detail.get("started")),
    }



def stored_live(task):
    """The live part of a row as the database has it: progress written at most once a second, with its detail."""
    if not task.is_active:
        return live_context({"final": task.percent})
    fact = getattr(task, "live_fact", None)  # set by a feed that has newer progress than the row
    if fact is not None and task.status == "running":
        return live_context(fact)
    detail = {**(task.progress_detail or {}), "value": task.progress}
    if task.status != "running":
        detail = {"value": task.progress}  # queued or waiting in a server's queue: nothing runs yet
    elif not detail.get("started") and task.started_at:
        detail["started"] = task.started_at.timestamp()
    return live_context(detail)
