"""
The upstream supervisor: the connections of this process (one per enabled server whose lease it holds), dispatch
of queued tasks to them, cancel requests, and the stuck-task watchdog.

It runs inside Daphne in the embedded default (the in-memory channel layer cannot cross processes) and as
`manage.py run_upstream` in production, where ownership leases (Lock rows) make sure that only one process holds
the socket of a given server and submits its tasks. Request handlers wake it through servers/wake.py.
"""

import asyncio
import contextlib
import logging
import math
import os
import socket
import threading
import time
import uuid
from datetime import timedelta

from channels.layers import get_channel_layer
from django.conf import settings
from django.db import close_old_connections, connections
from django.utils import timezone

from servers import pool, wake
from servers.aio import cancel_and_wait, db
from servers.backlog import Backlog
from servers.connection import Connection
from servers.guard import contained
from servers.models import Lock, LockPurpose, Server, ServerState, upstream_key
from servers.recovery import recover
from servers.webhooks import WebhookSender
from tasks.models import ON_SERVER_STATUSES, Task

logger = logging.getLogger(__name__)


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
        self.backlog = Backlog()  # the queue in memory (servers/backlog.py)
        self.next_watchdog = 0.0
        self.next_manage = 0.0
        self.next_cancels = 0.0
        self.cancel_news = False  # a cancel was requested since cancels were last looked for
        self.policy = policy  # "fair" (servers/dispatch.py) or "naive", for comparison in bench_pool
        self.turn = 0
        self.http_timeout = 30.0
        self.connections = {}
        self.wake = None
        self.loop = None
        self._stopped = None
        self._listener = None
        self._webhooks = None
        self.stopping = False

    def wake_threadsafe(self, cancel=False):
        if self.loop is not None and self.wake is not None:
            with contextlib.suppress(RuntimeError):  # its loop has ended and closed: there is nothing to wake
                self.loop.call_soon_threadsafe(self.woken, cancel)

    def woken(self, cancel=False):
        self.cancel_news = self.cancel_news or cancel
        self.wake.set()

    async def run(self):
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self._stopped = asyncio.Event()
        if self.stopping:
            self._stopped.set()
        wake.subscribe(self.wake_threadsafe)
        if settings.REDIS_URL:
            self._listener = asyncio.create_task(self.listen())
        # Its own task: a slow or broken webhook receiver never holds up dispatch or the live path.
        self._webhooks = asyncio.create_task(WebhookSender().run(), name="webhooks")
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
            wake.unsubscribe(self.wake_threadsafe)
            if self._listener is not None:
                self._listener.cancel()
            await cancel_and_wait([self._webhooks])
            await self.shutdown()

    def stop(self):
        self.stopping = True
        if self._stopped is not None:
            # One callback for both: once _stopped is set the loop may end, and close, before a second one came.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._stop_now)

    def _stop_now(self):
        self._stopped.set()
        self.wake.set()

    async def shutdown(self):
        connections, self.connections = list(self.connections.values()), {}
        await asyncio.gather(*(conn.stop() for conn in connections), return_exceptions=True)
        # Its leases and its presence (affinity locks belong to users, never to a worker).
        await db(lambda: Lock.objects.filter(owner=self.owner).delete())()
        logger.info("upstream supervisor %s stopped", self.owner)

    async def listen(self):
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(wake.SUPERVISOR_GROUP, channel)
        while True:
            try:
                message = await layer.receive(channel)
                self.woken(bool(message.get("cancel")))
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("supervisor wake-up listener failed")
                await asyncio.sleep(1)

    async def step(self):
        # Each part on its own: one failing (for whatever task or server) must not skip the others.
        # The leases and the wanted connections once a tick, not on every wake-up: a submission's wake-up waits
        # only for the plan and the claim.
        if time.monotonic() >= self.next_manage:
            self.next_manage = time.monotonic() + self.tick
            async with contained("managing the connections"):
                await self.manage_connections()
        async with contained("dispatch"):
            await self.dispatch()
        # Cancel requests when one was announced, and once a tick (one whose announcement was lost, or came
        # before this process started): not on every wake-up.
        if self.cancel_news or time.monotonic() >= self.next_cancels:
            self.cancel_news, self.next_cancels = False, time.monotonic() + self.tick
            async with contained("processing cancel requests"):
                await self.process_cancels()
        if time.monotonic() >= self.next_watchdog:
            self.next_watchdog = time.monotonic() + settings.COMFYHUB["WATCHDOG_INTERVAL"]
            async with contained("the watchdog"):
                await self.watchdog()

    async def watchdog(self):
        """Stuck-task recovery for this process's servers (see servers/recovery.py)."""
        online = {pk: conn for pk, conn in self.connections.items() if conn.online}
        if online:
            for action in await recover(connections=online):
                logger.warning("watchdog: %s", action)

    async def manage_connections(self):
        """
        Renew the leases of this process's servers and take free ones, up to its share of the pool: the enabled
        servers divided by the workers running. Over its share (a worker joined), it hands one server a tick
        back, one with nothing being sent, so that the newcomer takes it (and adopts its tasks) at once rather
        than when a lease expires. A worker that leaves deletes its leases (shutdown), so the others take them.
        """
        servers, share, held = await db(self.lease_servers)(set(self.connections))
        wanted = {server.pk: server for server in servers if server.pk in held}
        handed = self.hand_back(wanted, share)
        for pk in list(self.connections):
            conn = self.connections[pk]
            fresh = wanted.get(pk)
            if fresh is None or fresh.url != conn.server.url:
                del self.connections[pk]
                await conn.stop()
            else:
                for name in ("max_in_flight", "pipeline_depth", "weight", "draining", "name"):
                    setattr(conn.server, name, getattr(fresh, name))
        if handed is not None:
            await db(Lock.release)(LockPurpose.UPSTREAM, upstream_key(handed), self.owner)
            logger.info("%s: handed server %s to another worker (share %d)", self.owner, handed, share)
        for pk, server in wanted.items():
            if pk not in self.connections:
                server = await db(Server.objects.get)(pk=pk)  # with its capabilities, which the tick does not read
                conn = Connection(self, server)
                self.connections[pk] = conn
                conn.start()
        disabled = await db(
            lambda: list(Server.objects.filter(enabled=False).exclude(state=ServerState.DISABLED))
        )()
        for server in disabled:
            await db(server.set_state)(ServerState.DISABLED)

    def lease_servers(self, mine):
        """
        (the enabled servers, read without their capabilities; this worker's share of them; the pks whose lease it
        holds now). The leases of `mine`, the servers it follows, are renewed in one statement; free servers are
        taken while it holds less than its share.
        """
        servers = list(Server.objects.enabled().defer("capabilities"))
        share = self.fair_share(len(servers))
        keys = {upstream_key(server.pk): server.pk for server in servers if server.pk in mine}
        held = set()
        if keys:
            # Its own lease, expired or not, as Lock.acquire renews it; one taken over is not renewed.
            renewed = Lock.objects.filter(purpose=LockPurpose.UPSTREAM, key__in=keys, owner=self.owner).update(
                expires_at=timezone.now() + timedelta(seconds=self.lease_seconds)
            )
            if renewed == len(keys):
                held = set(keys.values())
            else:
                still = Lock.objects.filter(purpose=LockPurpose.UPSTREAM, key__in=keys, owner=self.owner)
                held = {keys[key] for key in still.values_list("key", flat=True)}
        for server in servers:
            if len(held) >= share:
                break
            if server.pk not in held and server.pk not in mine:
                key = upstream_key(server.pk)
                if Lock.acquire(LockPurpose.UPSTREAM, key, self.owner, self.lease_seconds, server=server):
                    held.add(server.pk)
        return servers, share, held

    def fair_share(self, servers):
        """Renew this worker's presence; the number of servers it may hold: its share of `servers`."""
        Lock.acquire(LockPurpose.WORKER, f"worker:{self.owner}", self.owner, self.lease_seconds)
        workers = Lock.objects.filter(purpose=LockPurpose.WORKER, expires_at__gt=timezone.now()).count()
        return math.ceil(servers / max(workers, 1))

    def hand_back(self, wanted, share):
        """Over its share, take one server out of `wanted` (the one with least in flight, nothing being sent)."""
        if len(wanted) <= share:
            return None
        idle = [pk for pk in wanted if pk in self.connections and not self.connections[pk].prompts.sending]
        if not idle:
            return None
        pk = min(idle, key=lambda pk: len(self.connections[pk].prompts.tasks))
        del wanted[pk]
        return pk

    async def dispatch(self):
        """Plan over the whole pool (see servers/dispatch.py) and send what falls to this process's servers."""
        online = {pk: conn for pk, conn in self.connections.items() if conn.online}
        local = {pk: conn.server for pk, conn in online.items()}
        depths = {pk: conn.depth() for pk, conn in online.items()}
        result, self.turn = await db(pool.make_plan)(
            local, self.horizon, self.policy, self.turn, self.backlog, depths=depths
        )
        sent = 0
        for candidate, slot, front in result.sends:
            conn = self.connections.get(slot.server_id)
            if conn is None or not conn.online:
                continue
            async with conn.guard(candidate.task_id, "dispatch"):
                task = await db(pool.claim)(candidate.task_id, conn.server, self.owner, self.lease_seconds / 3)
                if task is None:
                    # Another worker, or a cancel, got there first, or the lease lapsed: the backlog looks the
                    # task up on the next pass, which comes soon, to give its place to the next task (not at once:
                    # a lapsed lease fails every claim until the connection goes).
                    self.backlog.doubt(candidate.task_id)
                    self.loop.call_later(0.02, self.wake.set)
                    continue
                self.backlog.discard(candidate.task_id)
                # Claimed before the send starts, so that no reconciliation pass sends it too.
                conn.prompts.sending.add(task.prompt_id)
                conn.background.spawn(conn.send_claimed(task, front=front))
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
