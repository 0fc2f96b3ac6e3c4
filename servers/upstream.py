"""
The upstream supervisor: one websocket per enabled ComfyUI server, dispatch of queued tasks, and reconciliation
of every task on a server against that server's /queue and /history.

It runs inside Daphne in the embedded default (the in-memory channel layer cannot cross processes) and as
`manage.py run_upstream` in production, where ownership leases (Lock rows) make sure that only one process
holds the socket of a given server and submits its tasks.
"""

import asyncio
import logging
import os
import random
import socket
import uuid

from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import close_old_connections, connection, transaction

from servers.comfy import Binary, ComfyClient, ComfyError, ComfyRejected, ComfyUnavailable
from servers.models import Lock, LockPurpose, Server, ServerState
from tasks import outputs
from tasks.models import ON_SERVER_STATUSES, Task, TaskStatus, Upload
from tasks.progress import aemit_task_update

logger = logging.getLogger(__name__)

SUPERVISOR_GROUP = "comfyhub.supervisors"
# Supervisors running in this process, so that a request handler can wake them without the channel layer.
_local_supervisors = []


def wake_supervisors():
    """Tell every supervisor that there is new work (a queued task, a cancel request)."""
    for supervisor in list(_local_supervisors):
        supervisor.wake_threadsafe()
    if not _local_supervisors and settings.REDIS_URL:
        try:
            async_to_sync(get_channel_layer().group_send)(SUPERVISOR_GROUP, {"type": "supervisor.wake"})
        except Exception:
            # Supervisors also look for work every second; a lost wake-up only adds latency.
            logger.exception("could not wake the supervisors")


def db(fn):
    """Run a sync ORM function from the supervisor's event loop."""
    return sync_to_async(fn, thread_sensitive=True)


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
        self.dirty = False

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


class Connection:
    """Everything the hub does with one server: its socket, its submissions, its reconciliation."""

    def __init__(self, supervisor, server):
        self.supervisor = supervisor
        self.server = server
        self.client = ComfyClient(server.url, timeout=supervisor.http_timeout)
        self.online = False
        self.tasks = {}  # prompt_id -> Task, for the tasks of this server that are on it now
        self.trackers = {}  # prompt_id -> ProgressTracker
        self.ws_images = {}  # prompt_id -> [(node_id, content_type, bytes)] from SaveImageWebsocket
        self.sending = set()  # prompt_ids whose POST /prompt is in flight
        self.finishing = set()  # prompt_ids being finished: other terminal signals are no-ops
        self.cancel_sent = set()
        self.running_prompt = None
        self.background = set()
        self.stopping = False
        self._runner = None

    def __repr__(self):
        return f"<Connection {self.server.name}>"

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self):
        self._runner = asyncio.create_task(self.run(), name=f"upstream-{self.server.name}")
        self.spawn(self.flush_progress_loop())
        self.spawn(self.reconcile_loop())

    async def stop(self):
        self.stopping = True
        tasks = [t for t in [self._runner, *self.background] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.client.close()

    def spawn(self, coro):
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task):
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background work for %s failed", self.server.name, exc_info=task.exception())

    async def run(self):
        backoff = 0.2
        while not self.stopping:
            try:
                # The block closes the old socket and waits for the close before we ever reconnect (§2.6).
                async with self.client.events(self.server.client_id) as stream:
                    self.online = True
                    backoff = 0.2
                    await db(self.server.set_state)(ServerState.ONLINE, "")
                    logger.info("connected to %s", self.server.name)
                    await self.reconcile("connected")
                    self.supervisor.wake.set()
                    async for message in stream:
                        await self.handle(message)
                raise ComfyUnavailable("the server closed the websocket")
            except asyncio.CancelledError:
                raise
            except ComfyError as exc:
                await self.went_offline(exc.message)
            except Exception as exc:
                logger.exception("upstream loop of %s failed", self.server.name)
                await self.went_offline(f"{exc.__class__.__name__}: {exc}")
            # Jittered exponential backoff, so that a pool of hubs does not hammer a server that restarts.
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))  # noqa: S311
            backoff = min(backoff * 2, 15.0)

    async def went_offline(self, reason):
        was_online, self.online = self.online, False
        self.running_prompt = None
        if was_online:
            logger.warning("lost %s: %s", self.server.name, reason)
        await db(self.server.set_state)(ServerState.OFFLINE, reason)

    # --- websocket messages ---------------------------------------------------------------------------

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
        task = await self.task_for(prompt_id)
        if task is None:
            return  # another client's job, or one this hub already finished
        tracker = self.trackers.setdefault(prompt_id, ProgressTracker(task.graph))
        if kind == "execution_start":
            self.running_prompt = prompt_id
            await self.started(task)
        elif kind == "execution_cached":
            tracker.cached(data.get("nodes") or [])
            await self.started(task)
        elif kind == "executing":
            node = data.get("node")
            if node is None:
                self.finish_soon(task, "executing node null")
            else:
                self.running_prompt = prompt_id
                tracker.executing(str(node))
                await self.started(task)
        elif kind == "progress":
            tracker.step(str(data.get("node")) if data.get("node") is not None else None, data.get("value"), data.get("max"))
        elif kind == "progress_state":
            if isinstance(data.get("nodes"), dict):
                tracker.state(data["nodes"])
        elif kind == "executed":
            tracker.finished(data.get("node"))
        elif kind in ("execution_success", "execution_error", "execution_interrupted"):
            self.finish_soon(task, kind)

    async def task_for(self, prompt_id):
        task = self.tasks.get(prompt_id)
        if task is None:
            task = await db(
                lambda: Task.objects.select_related("server")
                .filter(server=self.server, prompt_id=prompt_id, status__in=ON_SERVER_STATUSES)
                .first()
            )()
            if task is not None:
                self.tasks[prompt_id] = task
        return task

    async def started(self, task):
        if task.status == TaskStatus.SUBMITTED:
            await db(task.mark_running)()

    def keep_ws_image(self, frame):
        # Only SaveImageWebsocket frames are outputs; sampler previews are not kept.
        prompt_id = frame.prompt_id or self.running_prompt
        task = self.tasks.get(prompt_id)
        if task is None:
            return
        node_id = str(frame.metadata.get("node_id") or self.trackers.get(prompt_id, ProgressTracker({})).running)
        node = task.graph.get(node_id) or {}
        if node.get("class_type") == "SaveImageWebsocket":
            self.ws_images.setdefault(prompt_id, []).append((node_id, frame.image_type, frame.image))

    async def flush_progress_loop(self):
        interval = self.supervisor.progress_interval
        while True:
            await asyncio.sleep(interval)
            for prompt_id, tracker in list(self.trackers.items()):
                task = self.tasks.get(prompt_id)
                if not tracker.dirty or task is None or prompt_id in self.finishing:
                    continue
                tracker.dirty = False
                if await db(task.set_progress)(tracker.value):
                    await aemit_task_update(task)

    # --- submission -----------------------------------------------------------------------------------

    async def send(self, task):
        """POST the prompt of a task already bound to this server. Never sends a prompt_id the server has."""
        prompt_id = task.prompt_id
        self.tasks[prompt_id] = task
        self.sending.add(prompt_id)
        try:
            await self.copy_uploads(task)
            reply = await self.client.submit(task.graph, prompt_id, self.server.client_id)
        except ComfyRejected as exc:
            await db(task.mark_failed)("rejected", _rejection_message(exc), _rejection_details(exc))
            self.forget(prompt_id)
        except ComfyUnavailable as exc:
            if not exc.sent:
                await db(task.unbind)(f"{self.server.name} unreachable: {exc.message}")
                self.forget(prompt_id)
            else:
                # The reply was lost: the prompt may or may not be queued. Reconciliation asks /queue and
                # /history before anything is sent again.
                await db(task.record)("reply_lost", exc.message)
        else:
            await db(task.mark_accepted)(reply.number)
            if reply.node_errors:
                await db(task.record)("partial", "some outputs were refused by the server", reply.node_errors)
        finally:
            self.sending.discard(prompt_id)

    async def copy_uploads(self, task):
        changed = False
        for binding in task.image_inputs:
            upload = await db(Upload.objects.get)(pk=binding["upload"])
            data = await db(_read_file)(upload.file)
            name = await self.client.upload_image(data, upload.remote_name, overwrite=True)
            node = task.graph[binding["node"]]["inputs"]
            if node.get(binding["input"]) != name:
                node[binding["input"]] = name
                changed = True
        if changed:
            await db(lambda: Task.objects.filter(pk=task.pk).update(graph=task.graph))()

    # --- reconciliation -------------------------------------------------------------------------------

    async def reconcile_loop(self):
        while True:
            await asyncio.sleep(self.supervisor.reconcile_interval)
            if self.online:
                try:
                    await self.reconcile("timer")
                except ComfyError as exc:
                    logger.info("reconciling %s failed: %s", self.server.name, exc.message)

    async def reconcile(self, reason):
        """Compare every task this hub has on the server with the server's /queue and /history."""
        tasks = await db(lambda: list(Task.objects.select_related("server").on_server(self.server)))()
        if not tasks:
            return 0
        queue = await self.client.queue()
        settled = 0
        for task in tasks:
            prompt_id = task.prompt_id
            if prompt_id in self.sending or prompt_id in self.finishing:
                continue
            self.tasks[prompt_id] = task
            where = queue.where(prompt_id)
            if where == "running":
                self.running_prompt = prompt_id
                if task.status == TaskStatus.SUBMITTED:
                    await db(task.mark_running)("queue")
                continue
            if where == "pending":
                if task.accepted_at is None:
                    await db(task.mark_accepted)()
                continue
            # In neither queue list: it has finished (history), or the server never got it or lost it.
            entry = await self.client.history(prompt_id)
            if entry is not None:
                await self.finish(task, f"history ({reason})", entry)
            elif task.accepted_at is None and task.started_at is None:
                await db(task.record)("resubmitted", f"not on {self.server.name} after {reason}; sending it")
                await self.send(task)
            elif task.cancel_requested_at is not None:
                await db(task.mark_cancelled)("removed from the server's queue")
                self.forget(prompt_id)
            else:
                await db(task.requeue)(f"{self.server.name} lost it (found in neither queue nor history)")
                self.forget(prompt_id)
            settled += 1
        return settled

    # --- completion -----------------------------------------------------------------------------------

    def finish_soon(self, task, source):
        if task.prompt_id not in self.finishing:
            self.spawn(self.finish(task, source))

    async def finish(self, task, source, entry=None):
        """The first terminal fact wins: read /history, store outputs, then mark the task. Later calls are no-ops."""
        prompt_id = task.prompt_id
        if prompt_id in self.finishing:
            return
        self.finishing.add(prompt_id)
        try:
            for delay in (0, 0.05, 0.2, 0.5):
                if entry is not None:
                    break
                await asyncio.sleep(delay)
                entry = await self.client.history(prompt_id)
            if entry is None:
                # History is written before `executing null`; reconciliation will look again.
                logger.info("%s: no history yet for %s after %s", self.server.name, prompt_id, source)
                return
            if entry.succeeded and not entry.interrupted:
                await self.store_outputs(task, entry, source)
            elif entry.interrupted:
                if task.cancel_requested_at is not None or await db(_cancel_requested)(task):
                    await db(task.mark_cancelled)("interrupted on request")
                else:
                    await db(task.mark_failed)("interrupted", "interrupted on the server", entry.last("execution_interrupted"))
            else:
                error = entry.error or {}
                details = {
                    "node_id": error.get("node_id"),
                    "node_type": error.get("node_type"),
                    "exception_type": error.get("exception_type"),
                    "exception_message": error.get("exception_message"),
                }
                message = f"{details['node_type'] or 'a node'} (node {details['node_id']}) failed: " + str(
                    details["exception_message"] or "no message"
                ).strip()
                if task.cancel_requested_at is not None:
                    await db(task.mark_cancelled)("stopped on request")
                else:
                    await db(task.mark_failed)("node_error", message, details)
            self.forget(prompt_id)
        except ComfyUnavailable as exc:
            logger.info("%s: could not finish %s yet: %s", self.server.name, prompt_id, exc.message)
        finally:
            self.finishing.discard(prompt_id)

    async def store_outputs(self, task, entry, source):
        limit = settings.COMFYHUB["MAX_OUTPUT_BYTES"]
        files = []
        for output in entry.files():
            try:
                data, content_type = await self.client.view(output, max_bytes=limit)
            except ComfyRejected as exc:
                await db(task.mark_failed)("output_missing", f"could not copy {output.filename}: {exc.message}")
                return
            files.append((output.node_id, output.filename, content_type, data))
        for index, (node_id, content_type, data) in enumerate(self.ws_images.get(task.prompt_id, [])):
            files.append((node_id, f"websocket_{node_id}_{index + 1:05}.png", content_type, data))
        await db(outputs.complete)(task, files, source)

    def forget(self, prompt_id):
        self.tasks.pop(prompt_id, None)
        self.trackers.pop(prompt_id, None)
        self.ws_images.pop(prompt_id, None)
        self.cancel_sent.discard(prompt_id)
        if self.running_prompt == prompt_id:
            self.running_prompt = None

    # --- cancellation ---------------------------------------------------------------------------------

    async def cancel(self, task):
        prompt_id = task.prompt_id
        if prompt_id in self.cancel_sent or prompt_id in self.sending or prompt_id in self.finishing:
            return
        self.cancel_sent.add(prompt_id)
        self.tasks[prompt_id] = task
        try:
            queue = await self.client.queue()
            where = queue.where(prompt_id)
            if where == "pending":
                await self.client.delete_from_queue([prompt_id])
            elif where == "running":
                await self.client.interrupt(prompt_id)
            await db(task.record)("cancel_sent", f"{where or 'not queued'} on {self.server.name}")
            if where != "running":
                await self.reconcile("cancel")
        except ComfyError as exc:
            self.cancel_sent.discard(prompt_id)
            logger.info("cancel of %s on %s failed: %s", prompt_id, self.server.name, exc.message)


def _read_file(field):
    with field.open("rb") as handle:
        return handle.read()


def _cancel_requested(task):
    return Task.objects.filter(pk=task.pk, cancel_requested_at__isnull=False).exists()


def _rejection_message(exc):
    error = exc.error
    message = error.get("message") or exc.message
    if error.get("details"):
        message = f"{message}: {error['details']}"
    for node_id, node in exc.node_errors.items():
        for item in (node or {}).get("errors", []):
            message += f"; node {node_id} ({node.get('class_type')}): {item.get('message')} {item.get('details', '')}".rstrip()
    return message


def _rejection_details(exc):
    return {"error": exc.error, "node_errors": exc.node_errors, "status": exc.status}


class Supervisor:
    """Owns the connections of this process and feeds them work."""

    def __init__(self, *, owner=None, tick=1.0):
        conf = settings.COMFYHUB
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.tick = tick
        self.lease_seconds = conf["LEASE_SECONDS"]
        self.reconcile_interval = conf["RECONCILE_INTERVAL"]
        self.progress_interval = conf["PROGRESS_INTERVAL"]
        self.http_timeout = 30.0
        self.connections = {}
        self.wake = None
        self.loop = None
        self._stopped = None
        self._listener = None

    def wake_threadsafe(self):
        if self.loop is not None and self.wake is not None:
            self.loop.call_soon_threadsafe(self.wake.set)

    async def run(self):
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self._stopped = asyncio.Event()
        _local_supervisors.append(self)
        if settings.REDIS_URL:
            self._listener = asyncio.create_task(self.listen())
        logger.info("upstream supervisor %s started", self.owner)
        try:
            while not self._stopped.is_set():
                try:
                    await self.step()
                except Exception:
                    logger.exception("supervisor step failed")
                    await db(close_old_connections)()
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout=self.tick)
                except TimeoutError:
                    pass
        finally:
            _local_supervisors.remove(self)
            if self._listener is not None:
                self._listener.cancel()
            await self.shutdown()

    def stop(self):
        if self._stopped is not None:
            self.loop.call_soon_threadsafe(self._stopped.set)
            self.wake_threadsafe()

    async def shutdown(self):
        connections, self.connections = list(self.connections.values()), {}
        await asyncio.gather(*(conn.stop() for conn in connections), return_exceptions=True)
        await db(lambda: Lock.objects.filter(purpose=LockPurpose.UPSTREAM, owner=self.owner).delete())()
        logger.info("upstream supervisor %s stopped", self.owner)

    async def listen(self):
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(SUPERVISOR_GROUP, channel)
        while True:
            try:
                await layer.receive(channel)
                self.wake.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("supervisor wake-up listener failed")
                await asyncio.sleep(1)

    async def step(self):
        await self.manage_connections()
        await self.dispatch()
        await self.process_cancels()

    async def manage_connections(self):
        servers = await db(lambda: list(Server.objects.enabled()))()
        wanted = {}
        for server in servers:
            held = await db(Lock.acquire)(
                LockPurpose.UPSTREAM, f"server:{server.pk}", self.owner, self.lease_seconds, server=server
            )
            if held:
                wanted[server.pk] = server
        for pk in list(self.connections):
            conn = self.connections[pk]
            fresh = wanted.get(pk)
            if fresh is None or fresh.url != conn.server.url:
                del self.connections[pk]
                await conn.stop()
            else:
                conn.server.max_in_flight = fresh.max_in_flight
        for pk, server in wanted.items():
            if pk not in self.connections:
                conn = Connection(self, server)
                self.connections[pk] = conn
                conn.start()
        disabled = await db(lambda: list(Server.objects.filter(enabled=False).exclude(state=ServerState.DISABLED)))()
        for server in disabled:
            await db(server.set_state)(ServerState.DISABLED)

    async def dispatch(self):
        """Give queued tasks to the least-loaded connected servers, one task at a time."""
        ready = [conn for conn in self.connections.values() if conn.online]
        if not ready:
            return 0
        loads = await db(_loads)([conn.server.pk for conn in ready])
        sent = 0
        while True:
            candidates = [c for c in ready if loads.get(c.server.pk, 0) < c.server.max_in_flight]
            if not candidates:
                break
            conn = min(candidates, key=lambda c: (loads.get(c.server.pk, 0) / c.server.max_in_flight, c.server.pk))
            task = await db(_claim_next)(conn.server)
            if task is None:
                break
            loads[conn.server.pk] = loads.get(conn.server.pk, 0) + 1
            conn.spawn(conn.send(task))
            sent += 1
        return sent

    async def process_cancels(self):
        if not self.connections:
            return
        tasks = await db(
            lambda: list(
                Task.objects.select_related("server").filter(
                    server__in=list(self.connections), status__in=ON_SERVER_STATUSES, cancel_requested_at__isnull=False
                )
            )
        )()
        for task in tasks:
            conn = self.connections.get(task.server_id)
            if conn is not None and conn.online:
                await conn.cancel(task)


def _loads(server_ids):
    from django.db.models import Count

    rows = (
        Task.objects.filter(server_id__in=server_ids, status__in=ON_SERVER_STATUSES)
        .values("server_id")
        .annotate(n=Count("pk"))
    )
    return {row["server_id"]: row["n"] for row in rows}


def _claim_next(server):
    """Bind the next queued task to `server`. The conditional UPDATE in bind() is the real guard."""
    for _ in range(5):
        with transaction.atomic():
            queued = Task.objects.queued().order_by("-priority", "created_at")
            if connection.vendor == "postgresql":
                queued = queued.select_for_update(skip_locked=True)
            task = queued.select_related("server").first()
            if task is None:
                return None
            if task.bind(server, str(uuid.uuid4())):
                return task
        # Another worker bound it first; take the next one.
    return None

