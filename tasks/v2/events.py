"""
GET /api/v2/jobs/{id}/events: the job's live state as Server-Sent Events, fed by the live path (tasks/live.py).

Each stream joins its owner's channel-layer group with a channel of its own (no cap on streams), keeps what is
about its job, and sends the contract's `status`, `progress`, `preview` and `output` events: first the job as
the database has it, then what happens, and a last `status` when the job ends, after which the stream closes.
Live push only: the authoritative state is GET /api/v2/jobs/{id}, so a quiet stream reads the row again.
"""

import asyncio
import json
import logging
import uuid

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.http import StreamingHttpResponse

from tasks.live import PREVIEW, PROGRESS
from tasks.progress import user_group
from tasks.queue import queue_positions
from tasks.submission import user_tasks
from tasks.v2.jobs import own_task, router
from tasks.v2.shapes import TERMINAL_NAMES, output_json, progress_snapshot, status_name, task_progress

logger = logging.getLogger(__name__)

# Seconds of quiet after which the stream sends a comment (proxies close idle connections) and reads the row
# again (a fact lost on the way must not leave the stream waiting for an end that already happened).
QUIET_SECONDS = 10.0


def frame(event, data):
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@database_sync_to_async
def read(request, pk):
    task = user_tasks(request.auth).get(pk=pk)
    positions = queue_positions([task]) if task.is_active else {}
    return task, positions, [output_json(output, request) for output in task.outputs.all()]


class JobStream:
    def __init__(self, request, task):
        self.request = request
        self.task_id = str(task.pk)
        self.owner_id = task.owner_id
        self.status = self.position = None
        self.outputs = set()

    async def frames(self):
        layer = get_channel_layer()
        channel = await layer.new_channel() if layer is not None else None
        group = user_group(self.owner_id)
        try:
            if channel is not None:
                # Joined before the first read: a change between the read and the join cannot fall between them.
                await layer.group_add(group, channel)
            changes = await self.changes(initial=True)
            for part in changes:
                yield part
            while self.status not in TERMINAL_NAMES:
                message = await self.next_message(layer, channel)
                if message is not None and message.get("task") != self.task_id:
                    continue
                kind = message.get("type") if message else None
                if kind == PROGRESS:
                    yield frame("progress", progress_snapshot(message, message.get("value")))
                elif kind == PREVIEW:
                    yield frame(
                        "preview",
                        {
                            "node_id": str(message.get("node") or ""),
                            "content_type": message.get("mime") or "image/jpeg",
                            "data_base64": message.get("data") or "",
                        },
                    )
                else:  # a status change, or a quiet spell: the row says what is true
                    if message is None:
                        yield ": keep-alive\n\n"
                    for part in await self.changes():
                        yield part
        finally:
            if channel is not None:
                try:
                    await layer.group_discard(group, channel)
                except Exception:
                    logger.exception("an event stream of task %s could not leave its group", self.task_id)

    async def next_message(self, layer, channel):
        if channel is None:
            await asyncio.sleep(1.0)  # no channel layer: the row is read every second instead
            return None
        try:
            return await asyncio.wait_for(layer.receive(channel), QUIET_SECONDS)
        except TimeoutError:
            return None

    async def changes(self, initial=False):
        """The frames for what changed since the last read of the row: new outputs, then a new status."""
        task, positions, outputs = await read(self.request, self.task_id)
        parts = []
        status, position = status_name(task), positions.get(task.pk)
        if initial or status != self.status or position != self.position:
            parts.append(frame("status", {"status": status, "queue_position": position}))
        if initial and status not in TERMINAL_NAMES and task_progress(task) is not None:
            parts.append(frame("progress", task_progress(task)))
        for output in outputs:
            if output["id"] not in self.outputs:
                self.outputs.add(output["id"])
                parts.append(frame("output", output))
        if status in TERMINAL_NAMES and parts and parts[0].startswith("event: status"):
            parts.append(parts.pop(0))  # the terminal status goes last: a client stops reading at it
        self.status, self.position = status, position
        return parts


@router.get("/{uuid:job_id}/events", url_name="job_events", summary="Live event stream (Server-Sent Events)")
async def events(request, job_id: uuid.UUID):
    task = await sync_to_async(own_task)(request, job_id)
    response = StreamingHttpResponse(JobStream(request, task).frames(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    return response
