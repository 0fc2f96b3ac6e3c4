"""
The upstream supervisor: one websocket per enabled ComfyUI server, dispatch of queued tasks, and reconciliation
of every task on a server against that server's /queue and /history.

It runs inside Daphne in the embedded default (the in-memory channel layer cannot cross processes) and as
`manage.py run_upstream` in production, where ownership leases (Lock rows) make sure that only one process
holds the socket of a given server and submits its tasks.
"""

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import socket
import threading
import time
import uuid

from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import close_old_connections, connections
from django.utils import timezone

from servers import pool
from servers.comfy import Binary, ComfyClient, ComfyError, ComfyRejected, ComfyUnavailable
from servers.dispatch import summarize_object_info
from servers.guard import contained, plain, step_guard
from servers.models import Lock, LockPurpose, Server, ServerState, StalePrompt, upstream_key
from tasks import outputs
from tasks.models import ON_SERVER_STATUSES, Task, TaskStatus, Upload
from tasks.progress import aemit_task_update

logger = logging.getLogger(__name__)

# How long a socket must have waited in recv, hearing nothing, before its silence means anything; and how long
# after the reconciliation timer found a result the socket has to show it is still heard (see watch_socket).
QUIET_SECONDS = 3.0
# Bound on the per-prompt memory of what the socket heard.
HEARD_LIMIT = 10_000

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


async def cancel_and_wait(tasks):
    """
    Cancel the tasks and wait until every one has ended. One cancel is not always enough: cancelled while its sync
    function runs, asgiref's sync_to_async waits for the function and then returns normally, so the task goes on
    (a connection's socket loop would go on reading its socket, and whoever waits for it would wait until the
    server closes that socket).
    """
    tasks = [task for task in tasks if task is not None]
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: each task logs its own failures


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


class Connection:
    """Everything the hub does with one server: its socket, its submissions, its reconciliation."""

    def __init__(self, supervisor, server):
        self.supervisor = supervisor
        self.server = server
        self.client = ComfyClient(server.url, timeout=supervisor.http_timeout)
        # One clientId per server and holder process. ComfyUI unregisters a clientId's new socket when an older
        # socket with the same id closes (protocol §2.6): with a lease taken over from a worker that was frozen,
        # not dead, that worker's late close would silence this one. The holder's own prompts keep their
        # messages across reconnects; prompts of a previous holder are followed through /queue and /history.
        owner = getattr(supervisor, "owner", "standalone")
        self.client_id = f"{server.client_id}.{hashlib.sha256(owner.encode()).hexdigest()[:8]}"
        self.online = False
        self.tasks = {}  # prompt_id -> Task, for the tasks of this server that are on it now
        self.trackers = {}  # prompt_id -> ProgressTracker
        self.ws_images = {}  # prompt_id -> [(node_id, content_type, bytes)] from SaveImageWebsocket
        self.sending = set()  # prompt_ids whose POST /prompt is in flight
        self.finishing = set()  # prompt_ids being finished: other terminal signals are no-ops
        self.cancel_sent = set()
        self.strangers = set()  # prompt_ids that are not ours: skip the database for their progress
        self.running_prompt = None
        self.background = set()
        self.stopping = False
        self._runner = None
        self.offline_since = None  # monotonic time since when the server has not answered at all
        self.failed_over = False
        self.last_number = None  # the last queue number /prompt answered: it goes down when the server restarts
        self.stream = None
        self.last_frame_at = 0.0
        # Since when the socket loop waits in recv with nothing unread; None while it handles a frame. Only a loop
        # that waits can tell silence: a busy one (handle() waiting for the database) has frames not read yet.
        self.idle_since = None
        self.heard_start = {}  # prompt_id -> monotonic time the socket brought a message of its run
        self.heard_end = {}  # prompt_id -> monotonic time the socket brought its end
        self.watching = None  # the stream a watch_socket() follows, so that one at a time does
        self.orphaned = False
        self.reconnecting = False  # closed on purpose to register again: the server is fine
        self.own_prompts = set()  # sent under this connection's clientId: their messages come to this socket
        self.adopted = set()  # on the server under another holder's clientId: followed by polling

    def __repr__(self):
        return f"<Connection {self.server.name}>"

    async def holds_lease(self, margin=0.0):
        """
        Whether this process still follows the server. A worker frozen past its lease (a paused VM, a host deep
        in swap) wakes up still believing it does; before it sends or settles anything it asks the database.
        Connections of a command or an admin action (no lease owner) act on the operator's word.
        """
        owner = getattr(self.supervisor, "owner", None)
        if owner is None:
            return True
        lease = Lock.held(LockPurpose.UPSTREAM, upstream_key(self.server.pk), owner, margin)
        return await db(lease.exists)()

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self):
        self._runner = asyncio.create_task(self.run(), name=f"upstream-{self.server.name}")
        self.spawn(self.flush_progress_loop())
        self.spawn(self.reconcile_loop())
        self.spawn(self.probe_loop())

    async def stop(self):
        self.stopping = True
        await cancel_and_wait([self._runner, *self.background])
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

    def guard(self, task, step):
        """`async with conn.guard(task, step):` one task's step on this server (see servers/guard.py)."""
        return step_guard(task, step, server=self.server, on_give_up=self.gave_up)

    async def send_claimed(self, task, front=False):
        """send() for the dispatcher, which has claimed the prompt in `sending` already."""
        try:
            async with self.guard(task, "send"):
                await self.send(task, front=front)
        finally:
            self.sending.discard(task.prompt_id)

    async def gave_up(self, prompt_id):
        """The task failed for good in a step of ours: stop following it, and take it off the server."""
        self.forget(prompt_id)
        self.supervisor.wake.set()
        try:
            where = (await self.client.queue()).where(prompt_id)
            if where == "pending":
                await self.client.delete_from_queue([prompt_id])
            elif where == "running":
                await self.client.interrupt(prompt_id)
        except ComfyError as exc:
            logger.info("%s: could not take %s off the server: %s", self.server.name, prompt_id, exc.message)

    async def run(self):
        backoff = 0.2
        while not self.stopping:
            try:
                # The block closes the old socket and waits for the close before we ever reconnect (§2.6).
                async with self.client.events(self.client_id) as stream:
                    backoff = 0.2
                    self.orphaned = False
                    self.offline_since, self.failed_over = None, False
                    await self.probe(connecting=True)
                    self.online, self.reconnecting = True, False
                    await db(self.server.set_state)(ServerState.ONLINE, "")
                    logger.info("connected to %s", self.server.name)
                    self.stream = stream
                    await self.clear_stale()
                    await self.reconcile("connected")
                    if self.adopted:
                        self.spawn(self.follow_adopted())
                    self.supervisor.wake.set()
                    await self.read(stream)
                if not self.orphaned:
                    raise ComfyUnavailable("the server closed the websocket")
            except asyncio.CancelledError:
                raise
            except ComfyError as exc:
                if not self.orphaned:
                    await self.went_offline(exc.message)
            except Exception as exc:
                logger.exception("upstream loop of %s failed", self.server.name)
                self.orphaned = False
                await self.went_offline(f"{exc.__class__.__name__}: {exc}")
            if self.orphaned:
                # Closed on purpose (reconnect_quietly): connecting again registers it again. The server answers
                # all along, so its state stays; if this connect fails, that is news and goes through went_offline.
                self.orphaned = False
                logger.info("%s: connecting the websocket again", self.server.name)
                continue
            # Jittered exponential backoff, so that a pool of hubs does not hammer a server that restarts.
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))  # noqa: S311
            backoff = min(backoff * 2, 15.0)

    async def read(self, stream):
        """The socket loop. One task's message must never take the connection down for every other task."""
        try:
            self.idle_since = time.monotonic()
            async for message in stream:
                self.idle_since, self.last_frame_at = None, time.monotonic()
                try:
                    await self.handle(message)
                except Exception:
                    logger.exception("%s: could not handle a %s message", self.server.name, message.type)
                self.idle_since = time.monotonic()
        finally:
            self.idle_since = None

    async def went_offline(self, reason):
        was_online, self.online, self.reconnecting = self.online, False, False
        self.running_prompt = None
        if was_online:
            logger.warning("lost %s: %s", self.server.name, reason)
        if self.offline_since is None:
            self.offline_since = time.monotonic()
        await db(self.server.set_state)(ServerState.OFFLINE, reason)

    # --- health ---------------------------------------------------------------------------------------

    async def probe_loop(self):
        while True:
            await asyncio.sleep(self.supervisor.probe_interval)
            try:
                await self.probe()
            except ComfyError as exc:
                await self.probe_failed(exc.message)

    async def probe(self, connecting=False):
        """Ask /system_stats and /queue: liveness, other clients' queued work, and whether it restarted."""
        started = time.monotonic()
        stats = await self.client.system_stats()
        queue = await self.client.queue()
        elapsed = time.monotonic() - started
        self.offline_since = None
        fingerprint = _fingerprint(stats)
        restarted = bool(self.server.fingerprint) and fingerprint != self.server.fingerprint
        if restarted:
            await db(self.server.record)("restarted", "its /system_stats changed: it restarted", {"took": elapsed})
        if restarted or connecting or not self.server.capabilities:
            await self.refresh_capabilities()
        await db(_save_probe)(self.server, fingerprint, queue.foreign(self.server.client_id))  # any holder's are ours
        if connecting:
            return
        if not self.online and not self.reconnecting:
            await db(self.server.set_state)(ServerState.DEGRADED, "its HTTP API answers but the websocket is down")
        elif elapsed > settings.COMFYHUB["SLOW_PROBE_SECONDS"]:
            await db(self.server.set_state)(ServerState.DEGRADED, f"slow: a probe took {elapsed:.1f} s")
        else:
            await db(self.server.set_state)(ServerState.ONLINE, "")
        if restarted and self.online:
            await self.reconcile("restart")

    async def probe_failed(self, reason):
        if self.online:
            await db(self.server.set_state)(ServerState.DEGRADED, f"a probe failed: {reason}")
            return
        if self.offline_since is None:
            self.offline_since = time.monotonic()
        await db(self.server.set_state)(ServerState.OFFLINE, reason)
        if not self.failed_over and time.monotonic() - self.offline_since >= self.supervisor.failover_seconds:
            await self.failover(f"{self.server.name} unreachable for {self.supervisor.failover_seconds} s")

    async def refresh_capabilities(self):
        info = await self.client.object_info()
        summary = summarize_object_info(info if isinstance(info, dict) else {})
        self.server.capabilities = summary
        await db(lambda: Server.objects.filter(pk=self.server.pk).update(
            capabilities=summary, capabilities_at=timezone.now()
        ))()

    async def failover(self, reason):
        """Move the tasks waiting on an unreachable server to others; retry the one that was running there."""
        self.failed_over = True
        tasks = await db(lambda: list(Task.objects.select_related("server").on_server(self.server)))()
        moved = retried = 0
        for task in tasks:
            if task.status == TaskStatus.SUBMITTED and task.started_at is None:
                moved += await db(task.move)(reason)
            else:
                retried += await db(task.requeue)(reason, stale=True)
            self.forget(task.prompt_id)
        if tasks:
            logger.warning("%s: failover moved %d waiting tasks and retried %d", self.server.name, moved, retried)
            await db(self.server.record)(
                "failover", f"{reason}: moved {moved} waiting tasks, retried {retried}",
                {"moved": moved, "retried": retried},
            )
        self.supervisor.wake.set()

    async def clear_stale(self):
        """Delete what this hub left on the server before a failover; ignore (and record) what ran anyway."""
        stale = await db(lambda: list(StalePrompt.objects.filter(server=self.server).select_related("task")))()
        if not stale:
            return
        queue = await self.client.queue()
        for item in stale:
            try:
                await self.clear_stale_prompt(item, queue.where(item.prompt_id))
            except (asyncio.CancelledError, ComfyUnavailable):
                raise
            except Exception:
                # Not counted against the task: it lives on elsewhere now. The next connect tries again.
                logger.exception("%s: could not clear the stale prompt %s", self.server.name, item.prompt_id)

    async def clear_stale_prompt(self, item, where):
        detail = {"server": self.server.name, "prompt_id": item.prompt_id}
        if where == "pending":
            await self.client.delete_from_queue([item.prompt_id])
            await db(item.task.record)(
                "stale_deleted", f"its old copy was deleted from {self.server.name}", detail,
                server=self.server, prompt_id=item.prompt_id, touch=False,
            )
        elif where == "running":
            await self.client.interrupt(item.prompt_id)
            await db(item.task.record)(
                "stale_interrupted", f"its old copy ran on {self.server.name}", detail,
                server=self.server, prompt_id=item.prompt_id, touch=False,
            )
        elif await self.client.history(item.prompt_id) is not None:
            await db(item.task.record)(
                "late_result_ignored", f"{self.server.name} finished its old copy; the result is ignored", detail,
                server=self.server, prompt_id=item.prompt_id, touch=False,
            )
        await db(item.delete)()

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
        self.heard(prompt_id, kind, data)
        task = await self.task_for(prompt_id)
        if task is None:
            return  # another client's job, or one this hub already finished
        async with self.guard(task, "message"):
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
            elif kind in ("execution_success", "execution_error", "execution_interrupted"):
                self.finish_soon(task, kind)

    def heard(self, prompt_id, kind, data):
        """What the socket brought about a prompt: the reconciliation timer asks before it calls anything missed."""
        ended = kind in ("execution_success", "execution_error", "execution_interrupted") or (
            kind == "executing" and data.get("node") is None
        )
        seen = self.heard_end if ended else self.heard_start
        if len(seen) > HEARD_LIMIT:
            seen.clear()
        seen[prompt_id] = time.monotonic()

    async def task_for(self, prompt_id):
        task = self.tasks.get(prompt_id)
        if task is None and prompt_id not in self.strangers:
            task = await db(
                lambda: (
                    Task.objects.select_related("server")
                    .filter(server=self.server, prompt_id=prompt_id, status__in=ON_SERVER_STATUSES)
                    .first()
                )
            )()
            if task is not None:
                self.tasks[prompt_id] = task
            else:
                if len(self.strangers) > 10_000:
                    self.strangers.clear()
                self.strangers.add(prompt_id)
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
        node_id = str(
            frame.metadata.get("node_id") or self.trackers.get(prompt_id, ProgressTracker({})).running
        )
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
                async with self.guard(task, "progress"):
                    since, tracker.dirty = tracker.since, False
                    if await db(task.set_progress)(tracker.value):
                        await aemit_task_update(task, upstream_at=since)

    # --- submission -----------------------------------------------------------------------------------

    async def send(self, task, front=False):
        """POST the prompt of a task already bound to this server. Never sends a prompt_id the server has."""
        prompt_id = task.prompt_id
        self.tasks[prompt_id] = task
        self.strangers.discard(prompt_id)
        self.sending.add(prompt_id)
        self.own_prompts.add(prompt_id)
        self.adopted.discard(prompt_id)
        try:
            await self.copy_uploads(task)
            # The last moment to find out that the lease lapsed: the new holder sends the task (it is bound to this
            # server) unless the POST below reaches the server before that holder's first reconciliation, which
            # the margin (a third of the lease) leaves ample time for.
            if not await self.holds_lease(margin=getattr(self.supervisor, "lease_seconds", 0) / 3):
                logger.warning("%s: lease lapsed; leaving task %s to the new holder", self.server.name, task.pk)
                await db(task.record)("handed_over", f"not sent: this worker's lease on {self.server.name} lapsed")
                self.forget(prompt_id)
                return
            stream, posted_at = self.stream, time.monotonic()
            reply = await self.client.submit(task.graph, prompt_id, self.client_id, front=front)
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
                self.spawn(self.reconcile_after(1.0, "lost reply"))
        else:
            await db(task.mark_accepted)(reply.number)
            await self.check_number(reply.number)
            if stream is not None and self.watching is not stream:
                self.watching = stream
                self.spawn(self.watch_socket(stream, posted_at, prompt_id))
            if reply.node_errors:
                await db(task.record)("partial", "some outputs were refused by the server", reply.node_errors)
        finally:
            self.sending.discard(prompt_id)

    async def resend(self, task, message):
        """
        Send a bound task again under its prompt_id, only if the server surely does not have it: ComfyUI does not
        deduplicate, so a second POST of a prompt it holds runs it twice. The caller's view is a snapshot: since it
        was taken, a POST of this worker may have landed (another reconciliation pass, the dispatcher), so the row
        and the server are asked again, and the prompt is claimed in `sending` right after the last look.
        """
        prompt_id = task.prompt_id
        if prompt_id in self.sending:
            return False
        fresh = await db(
            lambda: Task.objects.select_related("server").filter(
                pk=task.pk, server=self.server, prompt_id=prompt_id, status=TaskStatus.SUBMITTED,
                accepted_at__isnull=True, started_at__isnull=True,
            ).first()
        )()
        if fresh is None:
            return False  # accepted, started, moved or ended since the snapshot
        if (await self.client.queue()).where(prompt_id) or await self.client.history(prompt_id) is not None:
            return False  # it is there after all; the next pass follows it
        if prompt_id in self.sending:
            return False
        self.sending.add(prompt_id)  # taken: every other path now leaves it alone; send() clears it at its end
        try:
            await db(fresh.record)("resubmitted", message)
            await self.send(fresh)
        finally:
            self.sending.discard(prompt_id)  # send() clears it too, unless it failed before its first line
        return True

    async def watch_socket(self, stream, since, prompt_id, patience=900.0):
        """
        Whether the socket still hears the server after a prompt was sent at `since`. ComfyUI sends `status` to
        every registered socket when a prompt is queued, and execution messages when it starts and ends; a socket
        it has unregistered (another socket with our clientId connected, then closed: protocol §2.6) hears nothing
        at all, ever. Silence is only evidence while the socket loop waits in recv: a busy hub (handle() waiting
        for the database) has frames it has not read yet. And it must be confirmed over HTTP: the prompt started
        or finished (/queue, /history) while the socket heard nothing since it was sent. A prompt that waits
        behind other work is quiet by nature, so the watch goes on until it moves.
        """
        pause, deadline = QUIET_SECONDS, time.monotonic() + patience
        try:
            while time.monotonic() < deadline:
                await asyncio.sleep(pause)
                if self.heard_since(stream, since):
                    return
                if not self.quiet_for(QUIET_SECONDS):
                    continue  # frames read before `since` are still being handled
                moved = await self.prompt_moved(prompt_id)
                if moved is None:
                    return  # gone, or the server does not answer: reconciliation and the probe take over
                if not moved:
                    pause = min(pause * 2, 30.0)
                    continue
                await asyncio.sleep(0.5)  # its start or end may be on the wire right now
                if self.heard_since(stream, since) or not self.quiet_for(QUIET_SECONDS):
                    continue
                await self.reconnect_quietly(
                    stream, "the server sent nothing to the hub's websocket while a task started or finished"
                )
                return
        finally:
            if self.watching is stream:
                self.watching = None

    def heard_since(self, stream, since):
        """True when there is nothing to watch any more: another socket now, offline, or a frame since `since`."""
        return stream is not self.stream or not self.online or self.stopping or self.last_frame_at >= since

    def quiet_for(self, seconds):
        return self.idle_since is not None and time.monotonic() - self.idle_since >= seconds

    async def prompt_moved(self, prompt_id):
        """True when the server started or finished the prompt, False while it waits, None if it is gone."""
        try:
            where = (await self.client.queue()).where(prompt_id)
            if where is not None:
                return where == "running"
            return True if await self.client.history(prompt_id) is not None else None
        except ComfyError as exc:
            logger.info("%s: could not look for %s: %s", self.server.name, prompt_id, exc.message)
            return None

    async def reconnect_quietly(self, stream, reason):
        """
        Close the socket so that the socket loop connects again (which registers it again), without a state
        change: the server answers, it only stopped talking to this socket.
        """
        if stream is not self.stream or not self.online or self.stopping:
            return
        logger.warning("%s: %s; connecting the websocket again", self.server.name, reason)
        self.orphaned, self.reconnecting, self.online = True, True, False
        try:
            await db(self.server.record)("socket_orphaned", f"{reason}; connected it again")
        finally:
            await stream.socket.close()

    async def check_number(self, number):
        # ComfyUI numbers every POST from a counter that starts again at 0 when the process restarts.
        if not isinstance(number, int | float) or number < 0:
            return  # front prompts get negative numbers
        previous, self.last_number = self.last_number, number
        if previous is not None and number < previous:
            await db(self.server.record)("restarted", f"its queue numbers went back from {previous} to {number}")
            self.spawn(self.reconcile_after(0, "restart"))

    async def copy_uploads(self, task):
        changed = False
        for binding in task.image_inputs:
            upload = await db(Upload.objects.get)(pk=binding["upload"])
            data = await db(_read_file)(upload.file)
            # Not overwrite: ComfyUI answers the same name for the same bytes without writing, while an overwrite
            # rewrites the file in place under a running task of the same user that is reading it.
            name = await self.client.upload_image(data, upload.remote_name, overwrite=False)
            node = task.graph[binding["node"]]["inputs"]
            if node.get(binding["input"]) != name:
                node[binding["input"]] = name
                changed = True
        if changed:
            await db(lambda: Task.objects.filter(pk=task.pk).update(graph=task.graph))()

    # --- reconciliation -------------------------------------------------------------------------------

    async def reconcile_loop(self):
        while True:
            await self.reconcile_after(self.supervisor.reconcile_interval, "timer")

    async def reconcile_after(self, delay, reason):
        await asyncio.sleep(delay)
        if self.online:
            try:
                await self.reconcile(reason)
            except ComfyError as exc:
                logger.info("reconciling %s failed: %s", self.server.name, exc.message)

    async def follow_adopted(self):
        """Prompts a previous holder sent report to its clientId, not ours: look them up every second instead."""
        while self.adopted and not self.stopping:
            await asyncio.sleep(1.0)
            if self.online:
                try:
                    await self.reconcile("adopted", only=set(self.adopted))
                except ComfyError as exc:
                    logger.info("following adopted prompts on %s failed: %s", self.server.name, exc.message)

    async def reconcile(self, reason, only=None):
        """Compare every task this hub has on the server (or those of `only`) with its /queue and /history."""
        if not await self.holds_lease():
            return 0  # another worker follows this server now; this connection is about to be stopped
        tasks = await db(lambda: list(Task.objects.select_related("server").on_server(self.server)))()
        if only is not None:
            self.adopted &= {task.prompt_id for task in tasks}
            tasks = [task for task in tasks if task.prompt_id in only]
        if not tasks:
            return 0
        queue = await self.client.queue()
        settled, missed, found_at = 0, {}, time.monotonic()
        for task in tasks:
            prompt_id = task.prompt_id
            if prompt_id in self.sending or prompt_id in self.finishing:
                continue
            async with self.guard(task, "reconcile"):
                # Followed by this socket since before this pass: its start or end should have come over the socket.
                followed = reason == "timer" and prompt_id in self.own_prompts
                if prompt_id not in self.own_prompts:
                    self.adopted.add(prompt_id)
                self.tasks[prompt_id] = task
                where = queue.where(prompt_id)
                if where == "running":
                    self.running_prompt = prompt_id
                    if task.status == TaskStatus.SUBMITTED and await db(task.mark_running)("queue") and followed:
                        missed[prompt_id] = self.heard_start
                    continue
                if where == "pending":
                    if task.accepted_at is None:
                        await db(task.mark_accepted)()
                    continue
                # In neither queue list: it has finished (history), or the server never got it or lost it.
                entry = await self.client.history(prompt_id)
                if entry is not None:
                    if followed:
                        missed[prompt_id] = self.heard_end
                    await self.finish(task, f"history ({reason})", entry)
                elif task.accepted_at is None and task.started_at is None:
                    await self.resend(task, f"not on {self.server.name} after {reason}; sending it")
                elif task.cancel_requested_at is not None:
                    await db(task.mark_cancelled)("removed from the server's queue")
                    self.forget(prompt_id)
                else:
                    await db(task.requeue)(f"{self.server.name} lost it (found in neither queue nor history)")
                    self.forget(prompt_id)
                settled += 1
        if missed and self.online and not self.stopping:
            self.spawn(self.check_missed(self.stream, missed, found_at))
        return settled

    async def check_missed(self, stream, missed, found_at, patience=60.0):
        """
        The timer found tasks started or finished that the socket did not report: its messages may simply not
        be handled yet (a busy socket loop, a server slow to send what it wrote to history). They are missed only
        if, a while later and with the socket loop waiting in recv, the socket still has not brought them and has
        heard nothing at all since: ComfyUI sends nothing at all to a socket it has unregistered (protocol §2.6),
        e.g. when the worker that held this server's lease before us closes its socket with our clientId.
        """
        deadline = time.monotonic() + patience
        await asyncio.sleep(QUIET_SECONDS)
        while not self.quiet_for(QUIET_SECONDS):
            if self.heard_since(stream, found_at) or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.5)
        if self.heard_since(stream, found_at):
            return
        unheard = [prompt_id for prompt_id, heard in missed.items() if prompt_id not in heard]
        if unheard:
            await self.reconnect_quietly(
                stream, f"the websocket did not report the start or end of {len(unheard)} tasks"
            )

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
            async with self.guard(task, "finish"):
                if await self.settle(task, source, entry):
                    self.forget(prompt_id)
                    self.supervisor.wake.set()  # a slot is free: the next task can go
        except ComfyUnavailable as exc:
            logger.info("%s: could not finish %s yet: %s", self.server.name, prompt_id, exc.message)
        finally:
            self.finishing.discard(prompt_id)

    async def settle(self, task, source, entry):
        """Mark the task from its history entry (read now if not given); False when it is not settled yet."""
        prompt_id = task.prompt_id
        for delay in (0, 0.05, 0.2, 0.5):
            if entry is not None:
                break
            await asyncio.sleep(delay)
            entry = await self.client.history(prompt_id)
        if entry is None:
            # History is written before `executing null`; reconciliation will look again.
            logger.info("%s: no history yet for %s after %s", self.server.name, prompt_id, source)
            return False
        if entry.succeeded and not entry.interrupted:
            return await self.store_outputs(task, entry, source)
        elif entry.interrupted:
            if task.cancel_requested_at is not None or await db(_cancel_requested)(task):
                await db(task.mark_cancelled)("interrupted on request")
            else:
                await db(task.mark_failed)(
                    "interrupted", "interrupted on the server", entry.last("execution_interrupted")
                )
        else:
            error = entry.error or {}
            details = {
                "node_id": error.get("node_id"),
                "node_type": error.get("node_type"),
                "exception_type": error.get("exception_type"),
                "exception_message": error.get("exception_message"),
            }
            message = (
                f"{details['node_type'] or 'a node'} (node {details['node_id']}) failed: "
                + str(details["exception_message"] or "no message").strip()
            )
            if task.cancel_requested_at is not None:
                await db(task.mark_cancelled)("stopped on request")
            else:
                await db(task.mark_failed)("node_error", message, details)
        return True

    async def store_outputs(self, task, entry, source):
        """Copy the outputs into hub storage and mark the task; False when that failed (it is tried again)."""
        async with self.guard(task, "store_outputs") as outcome:
            limit = settings.COMFYHUB["MAX_OUTPUT_BYTES"]
            files = []
            for output in entry.files():
                try:
                    data, content_type = await self.client.view(output, max_bytes=limit)
                except ComfyRejected as exc:
                    await db(task.mark_failed)(
                        "output_missing", f"could not copy {plain(output.filename)}: {exc.message}"
                    )
                    return True
                files.append((output.node_id, output.filename, content_type, data))
            for index, (node_id, content_type, data) in enumerate(self.ws_images.get(task.prompt_id, [])):
                files.append((node_id, f"websocket_{node_id}_{index + 1:05}.png", content_type, data))
            await db(outputs.complete)(task, files, source)
        return not outcome.failed

    def forget(self, prompt_id):
        self.own_prompts.discard(prompt_id)
        self.adopted.discard(prompt_id)
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
                # It may have started in between: look again on the next step.
                self.cancel_sent.discard(prompt_id)
            elif where == "running":
                await self.client.interrupt(prompt_id)
            await db(task.record)("cancel_sent", f"{where or 'not queued'} on {self.server.name}")
            if where != "running":
                await self.reconcile("cancel")
        except ComfyError as exc:
            self.cancel_sent.discard(prompt_id)
            logger.info("cancel of %s on %s failed: %s", prompt_id, self.server.name, exc.message)
        except BaseException:
            self.cancel_sent.discard(prompt_id)  # the next step tries again (the caller's guard counts it)
            raise


def _fingerprint(stats):
    """What identifies one run of a server process in /system_stats (the simulator adds its start time to argv)."""
    system = (stats or {}).get("system") or {} if isinstance(stats, dict) else {}
    devices = (stats or {}).get("devices") or [] if isinstance(stats, dict) else []
    keys = {
        "argv": system.get("argv"),
        "versions": [system.get(k) for k in ("comfyui_version", "python_version", "pytorch_version")],
        "ram_total": system.get("ram_total"),
        "devices": [(d.get("name"), d.get("vram_total")) for d in devices if isinstance(d, dict)],
    }
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()


def _save_probe(server, fingerprint, foreign_queue):
    now = timezone.now()
    server.fingerprint, server.foreign_queue, server.last_probe_at = fingerprint, foreign_queue, now
    Server.objects.filter(pk=server.pk).update(
        fingerprint=fingerprint, foreign_queue=foreign_queue, last_probe_at=now, last_seen=now
    )


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
            detail = f"{item.get('message')} {item.get('details', '')}".rstrip()
            message += f"; node {node_id} ({node.get('class_type')}): {detail}"
    return message


def _rejection_details(exc):
    return {"error": exc.error, "node_errors": exc.node_errors, "status": exc.status}


class Supervisor:
    """Owns the connections of this process and feeds them work."""

    def __init__(self, *, owner=None, tick=1.0, policy="fair"):
        conf = settings.COMFYHUB
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.tick = tick
        self.lease_seconds = conf["LEASE_SECONDS"]
        self.reconcile_interval = conf["RECONCILE_INTERVAL"]
        self.progress_interval = conf["PROGRESS_INTERVAL"]
        self.probe_interval = conf["PROBE_INTERVAL"]
        self.failover_seconds = conf["FAILOVER_SECONDS"]
        self.horizon = 50  # queued tasks per user the planner looks at
        self.next_watchdog = 0.0
        self.policy = policy  # "fair" (servers/dispatch.py) or "naive", for comparison in bench_pool
        self.turn = 0
        self.http_timeout = 30.0
        self.connections = {}
        self.wake = None
        self.loop = None
        self._stopped = None
        self._listener = None
        self.stopping = False

    def wake_threadsafe(self):
        if self.loop is not None and self.wake is not None:
            self.loop.call_soon_threadsafe(self.wake.set)

    async def run(self):
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self._stopped = asyncio.Event()
        if self.stopping:
            self._stopped.set()
        _local_supervisors.append(self)
        if settings.REDIS_URL:
            self._listener = asyncio.create_task(self.listen())
        logger.info("upstream supervisor %s started", self.owner)
        try:
            while not self._stopped.is_set():
                # Cleared before the step, so that a wake-up arriving during the step is not lost.
                self.wake.clear()
                try:
                    await self.step()
                except Exception:
                    logger.exception("supervisor step failed")
                    await db(close_old_connections)()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=self.tick)
        finally:
            _local_supervisors.remove(self)
            if self._listener is not None:
                self._listener.cancel()
            await self.shutdown()

    def stop(self):
        self.stopping = True
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
        # Each part on its own: one failing (for whatever task or server) must not skip the others.
        async with contained("managing the connections"):
            await self.manage_connections()
        async with contained("dispatch"):
            await self.dispatch()
        async with contained("processing cancel requests"):
            await self.process_cancels()
        if time.monotonic() >= self.next_watchdog:
            self.next_watchdog = time.monotonic() + settings.COMFYHUB["WATCHDOG_INTERVAL"]
            async with contained("the watchdog"):
                await self.watchdog()

    async def watchdog(self):
        """Stuck-task recovery for this process's servers (see servers/recovery.py)."""
        from servers.recovery import recover

        online = {pk: conn for pk, conn in self.connections.items() if conn.online}
        if online:
            for action in await recover(connections=online):
                logger.warning("watchdog: %s", action)

    async def manage_connections(self):
        servers = await db(lambda: list(Server.objects.enabled()))()
        wanted = {}
        for server in servers:
            held = await db(Lock.acquire)(
                LockPurpose.UPSTREAM, upstream_key(server.pk), self.owner, self.lease_seconds, server=server
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
                for name in ("max_in_flight", "pipeline_depth", "weight", "draining", "name"):
                    setattr(conn.server, name, getattr(fresh, name))
        for pk, server in wanted.items():
            if pk not in self.connections:
                conn = Connection(self, server)
                self.connections[pk] = conn
                conn.start()
        disabled = await db(
            lambda: list(Server.objects.filter(enabled=False).exclude(state=ServerState.DISABLED))
        )()
        for server in disabled:
            await db(server.set_state)(ServerState.DISABLED)

    async def dispatch(self):
        """Plan over the whole pool (see servers/dispatch.py) and send what falls to this process's servers."""
        local = {pk: conn.server for pk, conn in self.connections.items() if conn.online}
        result, self.turn = await db(pool.make_plan)(local, self.horizon, self.policy, self.turn)
        sent = 0
        for candidate, slot, front in result.sends:
            conn = self.connections.get(slot.server_id)
            if conn is None or not conn.online:
                continue
            async with conn.guard(candidate.task_id, "dispatch"):
                task = await db(pool.claim)(candidate.task_id, conn.server, self.owner)
                if task is None:
                    continue  # another worker, or a cancel, got there first
                conn.sending.add(task.prompt_id)  # before the send starts, so no reconciliation pass sends it too
                conn.spawn(conn.send_claimed(task, front=front))
                sent += 1
        return sent

    async def process_cancels(self):
        if not self.connections:
            return
        tasks = await db(
            lambda: list(
                Task.objects.select_related("server").filter(
                    server__in=list(self.connections),
                    status__in=ON_SERVER_STATUSES,
                    cancel_requested_at__isnull=False,
                )
            )
        )()
        for task in tasks:
            conn = self.connections.get(task.server_id)
            if conn is not None and conn.online:
                async with conn.guard(task, "cancel"):
                    await conn.cancel(task)


class SupervisorThread:
    """A supervisor in a background thread with its own event loop (benchmarks, tests, sync callers)."""

    def __init__(self, **kwargs):
        self.supervisor = Supervisor(**kwargs)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self.started = threading.Event()
        self.failure = None

    def _run(self):
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:  # re-raised by stop()
            self.failure = exc
        finally:
            self.loop.close()

    async def _main(self):
        task = asyncio.create_task(self.supervisor.run())
        await asyncio.sleep(0)
        self.started.set()
        try:
            await task
        finally:
            # The ORM ran in asgiref's worker thread: close its connections so that nothing holds the database.
            await db(connections.close_all)()

    def start(self):
        self.thread.start()
        self.started.wait(timeout=15)
        return self

    def stop(self):
        self.supervisor.stop()
        self.thread.join(timeout=30)
        if self.thread.is_alive():
            raise RuntimeError(f"the supervisor did not stop within 30 s; where its tasks wait:\n{self.where()}")
        if self.failure is not None:
            raise self.failure

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def where(self):
        """The innermost frames of each of the loop's tasks: what a supervisor that will not stop waits for."""
        lines = []
        for task in list(asyncio.all_tasks(self.loop)):  # read from another thread: good enough for a report
            places, coro = [], task.get_coro()
            while coro is not None:  # follow the await chain down to what the task waits on
                frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
                if frame is not None:
                    code = frame.f_code
                    places.append(f"{code.co_name} ({os.path.basename(code.co_filename)}:{frame.f_lineno})")
                coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
            lines.append(f"  {task.get_name()}: {' > '.join(places[-4:]) or 'not started'}")
        return "\n".join(lines)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
