"""
A server's health: probes of /system_stats and /queue, its state (online, degraded, offline) with the reason,
restart detection, its capabilities (/object_info), failover of its tasks when it stays unreachable, and clearing
what it still holds of tasks that moved away.
"""

import asyncio
import hashlib
import json
import logging
import time

from django.conf import settings
from django.utils import timezone

from servers.aio import db, jittered, phase
from servers.comfy_replies import ComfyError, ComfyUnavailable
from servers.dispatch import summarize_object_info
from servers.models import Server, ServerState, StalePrompt
from tasks.models import Task, TaskStatus

logger = logging.getLogger(__name__)


class Health:
    """
    Made with the ComfyUI client, the server row, the prompt ledger, the link (whether its socket is up),
    `reconcile(reason)` for after a restart, `wake()` for when tasks move elsewhere, and `probe_interval()` and
    `failover_seconds()` (read each time: an operator's new setting applies at once).
    """

    def __init__(self, client, server, prompts, *, link, probe_interval, failover_seconds, reconcile, wake):
        self.client = client
        self.server = server
        self.prompts = prompts
        self.link = link
        self.probe_interval = probe_interval
        self.failover_seconds = failover_seconds
        self.reconcile = reconcile
        self.wake = wake
        self.offline_since = None  # monotonic time since when the server has not answered at all
        self.failed_over = False

    async def opened(self):
        """The socket is up: the server answers again."""
        self.offline_since, self.failed_over = None, False
        await self.probe(connecting=True)

    async def online(self):
        await db(self.server.set_state)(ServerState.ONLINE, "")
        logger.info("connected to %s", self.server.name)

    async def offline(self, reason, was_online):
        self.prompts.running = None
        if was_online:
            logger.warning("lost %s: %s", self.server.name, reason)
        if self.offline_since is None:
            self.offline_since = time.monotonic()
        await db(self.server.set_state)(ServerState.OFFLINE, reason)

    async def probe_loop(self):
        await asyncio.sleep(phase(self.probe_interval()))
        while True:
            try:
                await self.probe()
            except ComfyError as exc:
                await self.probe_failed(exc.message)
            await asyncio.sleep(jittered(self.probe_interval()))

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
        found = _probe_fields(fingerprint, queue.foreign(self.server.client_id), _version(stats))  # any holder's
        if connecting:
            await db(_save_probe)(self.server, found)
            return
        if not self.link.online and not self.link.reconnecting:
            state, reason = ServerState.DEGRADED, "its HTTP API answers but the websocket is down"
        elif elapsed > settings.COMFYHUB["SLOW_PROBE_SECONDS"]:
            state, reason = ServerState.DEGRADED, f"slow: a probe took {elapsed:.1f} s"
        else:
            state, reason = ServerState.ONLINE, ""
        await db(self.server.set_state)(state, reason, **found)
        if restarted and self.link.online:
            await self.reconcile("restart")

    async def probe_failed(self, reason):
        if self.link.online:
            await db(self.server.set_state)(ServerState.DEGRADED, f"a probe failed: {reason}")
            return
        if self.offline_since is None:
            self.offline_since = time.monotonic()
        await db(self.server.set_state)(ServerState.OFFLINE, reason)
        limit = self.failover_seconds()
        if not self.failed_over and time.monotonic() - self.offline_since >= limit:
            await self.failover(f"{self.server.name} unreachable for {limit} s")

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
            self.prompts.forget(task.prompt_id)
        if tasks:
            logger.warning("%s: failover moved %d waiting tasks and retried %d", self.server.name, moved, retried)
            await db(self.server.record)(
                "failover", f"{reason}: moved {moved} waiting tasks, retried {retried}",
                {"moved": moved, "retried": retried},
            )
        self.wake()

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


def _version(stats):
    system = stats.get("system") if isinstance(stats, dict) else None
    version = system.get("comfyui_version") if isinstance(system, dict) else None
    return str(version)[:40] if isinstance(version, str | int | float) else ""


def _probe_fields(fingerprint, foreign_queue, version):
    now = timezone.now()
    return {
        "fingerprint": fingerprint, "foreign_queue": foreign_queue, "comfyui_version": version,
        "last_probe_at": now, "last_seen": now,
    }  # fmt: skip


def _save_probe(server, fields):
    for key, value in fields.items():
        setattr(server, key, value)
    Server.objects.filter(pk=server.pk).update(**fields)
