"""
Upstream websocket messages turned into task facts: started, progress (nodes done, cached, the running node's
fraction), images sent over the socket, and the end, which hands the task to completion.
"""

import asyncio
import logging
import time

from servers.aio import db
from servers.frames import TERMINAL_TYPES, Binary
from tasks.models import ON_SERVER_STATUSES, Task, TaskStatus
from tasks.progress import aemit_task_update

logger = logging.getLogger(__name__)


class ProgressTracker:
    """
    Progress as an honest hint: nodes done (cached count as done) plus the running node's fraction, over the
    nodes of the graph. It never reaches 1.0 by itself: only completion does that.
    """

    def __init__(self, graph):
        self.nodes = set(graph)
        self.done = set()
        self.running = None
        self.fraction = 0.0
        self._dirty = False
        # When the first message not yet pushed arrived: the start of the upstream-to-browser latency.
        self.since = None

    @property
    def dirty(self):
        return self._dirty

    @dirty.setter
    def dirty(self, value):
        if value and not self._dirty:
            self.since = time.time()
        self._dirty = value

    def cached(self, nodes):
        self.done.update(str(node) for node in nodes)
        self.dirty = True

    def executing(self, node):
        if self.running is not None and self.running != node:
            self.done.add(self.running)
        self.running, self.fraction, self.dirty = node, 0.0, True

    def step(self, node, value, maximum):
        if node is not None and node != self.running:
            self.executing(node)
        if isinstance(value, int | float) and isinstance(maximum, int | float) and maximum > 0:
            self.fraction = min(max(value / maximum, 0.0), 1.0)
            self.dirty = True

    def state(self, nodes):
        for node_id, info in nodes.items():
            if not isinstance(info, dict):
                continue
            if info.get("state") == "finished":
                self.done.add(str(node_id))
            elif info.get("state") == "running":
                self.step(str(node_id), info.get("value"), info.get("max"))
        self.dirty = True

    def finished(self, node):
        self.done.add(str(node))
        self.dirty = True

    @property
    def value(self):
        done = self.done & self.nodes
        partial = self.fraction if self.running in self.nodes and self.running not in done else 0.0
        return (len(done) + partial) / max(len(self.nodes), 1)


class Tracking:
    """
    What the socket says about this server's tasks. Made with the server row, the connection's prompt ledger,
    its guard, and `finish_soon(task, source)`, which completion answers.
    """

    def __init__(self, server, prompts, *, guard, finish_soon, progress_interval):
        self.server = server
        self.prompts = prompts
        self.guard = guard
        self.finish_soon = finish_soon
        self.progress_interval = progress_interval

    async def handle(self, message):
        if isinstance(message, Binary):
            self.keep_ws_image(message)
            return
        kind, data = message.type, message.data
        prompt_id = message.prompt_id
        if kind in ("status", "feature_flags", "malformed") or prompt_id is None:
            if kind == "malformed":
                logger.warning("%s sent a frame we cannot read: %s", self.server.name, data.get("reason"))
            return
        self.prompts.heard(prompt_id, kind in TERMINAL_TYPES or (kind == "executing" and data.get("node") is None))
        task = await self.task_for(prompt_id)
        if task is None:
            return  # another client's job, or one this hub already finished
        async with self.guard(task, "message"):
            tracker = self.prompts.trackers.setdefault(prompt_id, ProgressTracker(task.graph))
            if kind == "execution_start":
                self.prompts.running = prompt_id
                await self.started(task)
            elif kind == "execution_cached":
                tracker.cached(data.get("nodes") or [])
                await self.started(task)
            elif kind == "executing":
                node = data.get("node")
                if node is None:
                    self.finish_soon(task, "executing node null")
                else:
                    self.prompts.running = prompt_id
                    tracker.executing(str(node))
                    await self.started(task)
            elif kind == "progress":
                tracker.step(
                    str(data.get("node")) if data.get("node") is not None else None,
                    data.get("value"),
                    data.get("max"),
                )
            elif kind == "progress_state":
                if isinstance(data.get("nodes"), dict):
                    tracker.state(data["nodes"])
            elif kind == "executed":
                tracker.finished(data.get("node"))
            elif kind in TERMINAL_TYPES:
                self.finish_soon(task, kind)

    async def task_for(self, prompt_id):
        task = self.prompts.tasks.get(prompt_id)
        if task is None and prompt_id not in self.prompts.strangers:
            task = await db(
                lambda: (
                    Task.objects.select_related("server")
                    .filter(server=self.server, prompt_id=prompt_id, status__in=ON_SERVER_STATUSES)
                    .first()
                )
            )()
            if task is not None:
                self.prompts.tasks[prompt_id] = task
            else:
                self.prompts.stranger(prompt_id)
        return task

    async def started(self, task):
        if task.status == TaskStatus.SUBMITTED:
            await db(task.mark_running)()

    def keep_ws_image(self, frame):
        # Only SaveImageWebsocket frames are outputs; sampler previews are not kept.
        prompt_id = frame.prompt_id or self.prompts.running
        task = self.prompts.tasks.get(prompt_id)
        if task is None:
            return
        node_id = str(
            frame.metadata.get("node_id") or self.prompts.trackers.get(prompt_id, ProgressTracker({})).running
        )
        node = task.graph.get(node_id) or {}
        if node.get("class_type") == "SaveImageWebsocket":
            self.prompts.ws_images.setdefault(prompt_id, []).append((node_id, frame.image_type, frame.image))

    async def flush_progress_loop(self):
        while True:
            await asyncio.sleep(self.progress_interval)
            for prompt_id, tracker in list(self.prompts.trackers.items()):
                task = self.prompts.tasks.get(prompt_id)
                if not tracker.dirty or task is None or prompt_id in self.prompts.finishing:
                    continue
                async with self.guard(task, "progress"):
                    since, tracker.dirty = tracker.since, False
                    if await db(task.set_progress)(tracker.value):
                        await aemit_task_update(task, upstream_at=since)
