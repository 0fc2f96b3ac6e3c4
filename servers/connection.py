"""
Everything the hub does with one server, as a coordinator of pieces that never know each other: the link (its
websocket), tracking (messages into task facts), sending, reconciliation, health and completion. Each piece gets
what it needs when it is made: the ComfyUI client, the server row, the shared prompt ledger and a few callbacks.
This is the only module that knows them all.
"""

import asyncio
import hashlib

from django.conf import settings

from servers.aio import Background, cancel_and_wait, db
from servers.comfy import ComfyClient
from servers.comfy_replies import ComfyError
from servers.completion import Completion
from servers.guard import step_guard
from servers.health import Health
from servers.link import Link
from servers.models import Lock, LockPurpose, upstream_key
from servers.pace import Pace
from servers.previews import Previews
from servers.prompts import Prompts
from servers.reconcile import Reconciler
from servers.sending import Sending
from servers.tracking import Tracking


class Connection:
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
        self.prompts = Prompts()
        self.pace = Pace()
        self.background = Background(server.name)
        self._runner = None
        spawn = self.background.spawn
        # Callbacks are this object's methods, looked up when called, so that a piece never holds another one.
        self.link = Link(
            self.client, self.client_id, server.name,
            opened=self.opened, online=self.connected, message=self.handle, offline=self.went_offline,
            record=self.record,
        )  # fmt: skip
        self.tracking = Tracking(
            server, self.prompts, guard=self.guard, finish_soon=self.finish_soon, preview=self.preview,
            push_interval=settings.COMFYHUB["PUSH_INTERVAL"], write_interval=supervisor.progress_interval,
        )  # fmt: skip
        self.previews = Previews(server, self.prompts, fps=lambda: settings.COMFYHUB["PREVIEW_FPS"])
        self.completion = Completion(self.client, server, self.prompts, guard=self.guard, spawn=spawn, wake=self.wake)
        self.reconciler = Reconciler(
            self.client, server, self.prompts, guard=self.guard, holds_lease=self.holds_lease, link=self.link,
            resend=self.resend, finish=self.finish, interval=lambda: supervisor.reconcile_interval, spawn=spawn,
        )  # fmt: skip
        self.sending = Sending(
            self.client, server, self.prompts, client_id=self.client_id, guard=self.guard,
            holds_lease=self.holds_lease, lease_margin=getattr(supervisor, "lease_seconds", 0) / 3, link=self.link,
            spawn=spawn, reconcile=self.reconcile, reconcile_soon=self.reconcile_soon,
        )  # fmt: skip
        self.health = Health(
            self.client, server, self.prompts, link=self.link, probe_interval=lambda: supervisor.probe_interval,
            failover_seconds=lambda: supervisor.failover_seconds, reconcile=self.reconcile, wake=self.wake,
        )  # fmt: skip

    def __repr__(self):
        return f"<Connection {self.server.name}>"

    @property
    def online(self):
        return self.link.online

    @online.setter
    def online(self, value):
        self.link.online = value

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self):
        self._runner = asyncio.create_task(self.link.run(), name=f"upstream-{self.server.name}")
        self.background.spawn(self.reconciler.loop())
        self.background.spawn(self.health.probe_loop())

    async def stop(self):
        self.link.stopping = True
        await cancel_and_wait([self._runner, *self.background.tasks])
        self.prompts.close()
        await self.client.close()

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

    def guard(self, task, step):
        """`async with conn.guard(task, step):` one task's step on this server (see servers/guard.py)."""
        return step_guard(task, step, server=self.server, on_give_up=self.gave_up)

    async def gave_up(self, prompt_id):
        """The task failed for good in a step of ours: stop following it, and take it off the server."""
        self.forget(prompt_id)
        self.wake()
        await self.sending.take_off(prompt_id)

    def wake(self):
        self.supervisor.wake.set()

    async def record(self, kind, message):
        await db(self.server.record)(kind, message)

    # --- what the link tells ---------------------------------------------------------------------------

    async def opened(self):
        await self.health.opened()

    async def connected(self):
        await self.health.online()
        await self.health.clear_stale()
        await self.reconcile("connected")
        if self.prompts.adopted:
            self.background.spawn(self.reconciler.follow_adopted())
        self.wake()

    async def went_offline(self, reason, was_online):
        await self.health.offline(reason, was_online)

    async def handle(self, message):
        await self.tracking.handle(message)

    def preview(self, task, node_id, frame):
        self.previews.offer(task, node_id, frame)

    # --- what the supervisor, recovery and the consistency check ask -----------------------------------

    async def send_claimed(self, task, front=False):
        await self.sending.send_claimed(task, front=front)
        if task.accepted_at is not None:
            self.pace.refilled()

    def depth(self):
        """The pipeline depth this server needs now (servers/pace.py)."""
        return self.pace.depth(self.server)

    async def resend(self, task, message):
        return await self.sending.resend(task, message)

    async def cancel(self, task):
        await self.sending.cancel(task)

    async def reconcile(self, reason, only=None):
        return await self.reconciler.reconcile(reason, only=only)

    def reconcile_soon(self, delay, reason):
        self.reconciler.soon(delay, reason)

    def finish_soon(self, task, source):
        started = task.started_at.timestamp() if task.started_at else None
        self.pace.ended(started, waiting=bool(len(getattr(self.supervisor, "backlog", ()))))
        self.completion.finish_soon(task, source)

    async def finish(self, task, source, entry=None):
        await self.completion.finish(task, source, entry)

    async def probe(self, connecting=False):
        await self.health.probe(connecting=connecting)

    def forget(self, prompt_id):
        self.prompts.forget(prompt_id)


class Standalone:
    """Enough of a supervisor for a connection used by a command or an admin action (no lease: the operator's word)."""

    def __init__(self):
        self.http_timeout = 30.0
        self.wake = asyncio.Event()
        conf = settings.COMFYHUB
        self.reconcile_interval, self.progress_interval = conf["RECONCILE_INTERVAL"], conf["PROGRESS_INTERVAL"]
        self.probe_interval, self.failover_seconds = conf["PROBE_INTERVAL"], conf["FAILOVER_SECONDS"]


def standalone(server):
    """A connection to `server` for one command or admin action; close its client when done."""
    return Connection(Standalone(), server)


async def probe_once(server):
    """
    Probe `server` once, as its connection does every few seconds (/system_stats, /queue, /object_info when its
    node types are unknown or it restarted), for an operator: (True, what it found) or (False, why it did not
    answer). The state it records is the one it had: a one-off probe has no websocket to judge.
    """
    conn = standalone(server)
    conn.online = server.state in ("online", "degraded", "draining")
    try:
        await conn.probe()
    except ComfyError as exc:
        return False, f"Server {server.name}: no answer: {exc.message}"
    finally:
        await conn.client.close()
    await db(server.refresh_from_db)()
    return True, (
        f"Server {server.name} answers; {server.foreign_queue} prompt(s) of other clients queued; "
        f"{len((server.capabilities or {}).get('classes', {}))} node types."
    )
