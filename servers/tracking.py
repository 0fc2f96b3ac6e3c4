"""
Upstream websocket messages turned into task facts: started, progress (nodes done, cached, the running node and its
step), sampler previews and images sent over the socket, and the end, which hands the task to completion.

Progress goes two ways from here: to the owner's windows as a small fact over the channel layer (tasks/live.py),
leading-edge throttled to one per `push_interval` per task, and to the database at most once per
`write_interval` per task (page loads and the API read it there), the newest value landing before the task ends.
"""

import logging
import math
import statistics
import time

from servers.aio import Throttle, db
from servers.frames import TERMINAL_TYPES, Binary
from tasks.live import apush, progress_detail, progress_fact
from tasks.models import ON_SERVER_STATUSES, Task, TaskStatus

# How many recent runs of a workflow on a server its ETA is taken from, and how long that figure is reused.
SPEED_SAMPLES, SPEED_SECONDS = 20, 30.0
MAX_STEPS = 1_000_000  # larger step counts (or values past them) are not progress but junk

logger = logging.getLogger(__name__)


class ProgressTracker:
    """
    Progress as an honest hint: nodes done (cached count as done) plus the running node's fraction, over the
    nodes of the graph. It never reaches 1.0 by itself: only completion does that.
    """

    def __init__(self, graph):
        self.graph = graph if isinstance(graph, dict) else {}
        self.nodes = set(self.graph)
        self.done = set()
        self.running = None
        self.fraction = 0.0
        self.steps = None  # [value, max] of the running node, when it reports steps
        self.started = None  # epoch seconds the task started running
        self.eta_at = None  # epoch seconds it should end, from the server's recent runs of the workflow
        self.since = None  # when the oldest change not yet pushed arrived: the start of the push latency
        self.push = self.write = None  # Throttles, set by Tracking
        self.shown = None  # what the last change showed: a message that changes nothing visible pushes nothing

    def changed(self):
        # ComfyUI says most things twice (progress_state, then progress, for each step): only news is pushed.
        steps = tuple(self.steps) if self.steps else None
        shown = (self.running, self.fraction, steps, len(self.done), self.started, self.eta_at)
        if shown == self.shown:
            return
        self.shown = shown
        if self.since is None:
            self.since = time.time()
        for throttle in (self.push, self.write):
            if throttle is not None:
                throttle.poke()

    def close(self):
        for throttle in (self.push, self.write):
            if throttle is not None:
                throttle.close()

    def cached(self, nodes):
        self.done.update(str(node) for node in nodes)
        self.changed()

    def executing(self, node):
        if self.running is not None and self.running != node:
            self.done.add(self.running)
        if self.running != node:
            self.steps = None
        self.running, self.fraction = node, 0.0
        self.changed()

    def step(self, node, value, maximum):
        if node is not None and node != self.running:
            self.executing(node)
        if not (isinstance(value, int | float) and isinstance(maximum, int | float)):
            return
        if not (math.isfinite(value) and math.isfinite(maximum) and 0 <= value <= maximum <= MAX_STEPS and maximum > 0):
            return  # not a step count any sampler reports: ignored rather than shown
        self.fraction = value / maximum
        # A node that counts 0/1 has no steps worth showing.
        self.steps = [int(value), int(maximum)] if maximum > 1 else None
        self.changed()

    def state(self, nodes):
        for node_id, info in nodes.items():
            if not isinstance(info, dict):
                continue
            if info.get("state") == "finished":
                self.done.add(str(node_id))
            elif info.get("state") == "running":
                self.step(str(node_id), info.get("value"), info.get("max"))
        self.changed()

    def finished(self, node):
        self.done.add(str(node))
        self.changed()

    @property
    def value(self):
        done = self.done & self.nodes
        partial = self.fraction if self.running in self.nodes and self.running not in done else 0.0
        return (len(done) + partial) / max(len(self.nodes), 1)

    def title(self, node):
        info = self.graph.get(node) if node is not None else None
        if not isinstance(info, dict):
            return ""
        meta = info.get("_meta") if isinstance(info.get("_meta"), dict) else {}
        return str(meta.get("title") or info.get("class_type") or "")

    def detail(self):
        running = self.running if self.running in self.nodes and self.running not in self.done else None
        return progress_detail(
            value=self.value, node=running, title=self.title(running), step=self.steps if running else None,
            done=len(self.done & self.nodes), total=len(self.nodes), started=self.started, eta_at=self.eta_at,
        )  # fmt: skip


class Tracking:
    """
    What the socket says about this server's tasks. Made with the server row, the connection's prompt ledger,
    its guard, `finish_soon(task, source)`, which completion answers, and `preview(task, node_id, frame)`, which
    takes a sampler preview frame already attributed to one of this server's tasks.
    """

    def __init__(self, server, prompts, *, guard, finish_soon, preview, push_interval, write_interval):
        self.server = server
        self.prompts = prompts
        self.guard = guard
        self.finish_soon = finish_soon
        self.preview = preview
        self.push_interval = push_interval
        self.write_interval = write_interval
        self.speeds = {}  # (workflow id or graph hash) -> (monotonic time measured, typical run seconds or None)

    async def handle(self, message):
        if isinstance(message, Binary):
            self.binary(message)
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
            if kind in ("execution_start", "executing", "progress", "progress_state") and self.prompts.running:
                self.prompts.running = None  # the server runs another client's job: its type 1 previews are not ours
            return  # another client's job, or one this hub already finished
        async with self.guard(task, "message"):
            tracker = self.tracker(prompt_id, task)
            if kind == "execution_start":
                self.prompts.running = prompt_id
                await self.started(task, tracker)
            elif kind == "execution_cached":
                tracker.cached(data.get("nodes") or [])
                await self.started(task, tracker)
            elif kind == "executing":
                node = data.get("node")
                if node is None:
                    await self.ended(task, tracker, "executing node null")
                else:
                    self.prompts.running = prompt_id
                    tracker.executing(str(node))
                    await self.started(task, tracker)
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
                await self.ended(task, tracker, kind)

    def tracker(self, prompt_id, task):
        tracker = self.prompts.trackers.get(prompt_id)
        if tracker is None:
            tracker = self.prompts.trackers[prompt_id] = ProgressTracker(task.graph)
            tracker.push = Throttle(self.push_interval, lambda: self.push(prompt_id))
            tracker.write = Throttle(self.write_interval, lambda: self.write(prompt_id))
        return tracker

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

    async def started(self, task, tracker):
        if task.status == TaskStatus.SUBMITTED:
            await db(task.mark_running)()
        if tracker.started is None and task.status == TaskStatus.RUNNING:
            tracker.started = task.started_at.timestamp() if task.started_at else time.time()
            typical = await self.typical_run(task)
            tracker.eta_at = tracker.started + typical if typical else None
            tracker.changed()

    async def ended(self, task, tracker, source):
        # The newest progress lands before completion takes over (a failed task keeps where it stopped); nothing
        # is pushed after this point, so the finished row is the last thing its windows get.
        tracker.push.close()
        if source in ("execution_success", "executing node null"):
            tracker.write.close()  # it succeeded: completion writes 1.0, and a finished row shows no step
        elif task.prompt_id not in self.prompts.finishing:
            await tracker.write.flush()
        self.finish_soon(task, source)

    async def push(self, prompt_id):
        task, tracker = self.prompts.tasks.get(prompt_id), self.prompts.trackers.get(prompt_id)
        if task is None or tracker is None or prompt_id in self.prompts.finishing:
            return
        async with self.guard(task, "progress"):
            since, tracker.since = tracker.since, None
            await apush(task.owner_id, progress_fact(task.pk, task.owner_id, tracker.detail(), upstream_at=since))

    async def write(self, prompt_id):
        task, tracker = self.prompts.tasks.get(prompt_id), self.prompts.trackers.get(prompt_id)
        if task is None or tracker is None or prompt_id in self.prompts.finishing:
            return
        async with self.guard(task, "progress"):
            await db(task.set_progress)(tracker.value, tracker.detail())

    async def typical_run(self, task):
        """Median seconds of this server's recent successful runs of the task's workflow (or graph); None: unknown."""
        key = ("workflow", task.workflow_id) if task.workflow_id else ("graph", task.graph_hash)
        measured = self.speeds.get(key)
        if measured is None or time.monotonic() - measured[0] > SPEED_SECONDS:
            filters = {"workflow_id": task.workflow_id} if task.workflow_id else {"graph_hash": task.graph_hash}
            runs = await db(lambda: list(
                Task.objects.filter(
                    server=self.server, status=TaskStatus.SUCCEEDED, started_at__isnull=False, **filters
                ).order_by("-finished_at").values_list("started_at", "finished_at")[:SPEED_SAMPLES]
            ))()  # fmt: skip
            durations = [(end - start).total_seconds() for start, end in runs if end is not None and end >= start]
            measured = self.speeds[key] = (time.monotonic(), statistics.median(durations) if durations else None)
        return measured[1]

    def binary(self, frame):
        """A binary frame: a SaveImageWebsocket image (an output, kept) or a sampler preview (pushed, never kept)."""
        # Type 4 names its prompt; type 1 belongs to the prompt the server runs now (it runs one at a time).
        prompt_id = frame.prompt_id or self.prompts.running
        task = self.prompts.tasks.get(prompt_id)
        if task is None or prompt_id in self.prompts.finishing:
            return
        tracker = self.prompts.trackers.get(prompt_id)
        node_id = str(frame.metadata.get("node_id") or (tracker.running if tracker else "") or "")
        node = task.graph.get(node_id) or {}
        if node.get("class_type") == "SaveImageWebsocket":
            self.prompts.ws_images.setdefault(prompt_id, []).append((node_id, frame.image_type, frame.image))
        else:
            self.preview(task, node_id, frame)
