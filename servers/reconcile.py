"""
Reconciliation: every task the hub has on a server compared with the server's /queue and /history, on connect, on
a timer, after a restart or a lost reply, and every second for prompts a previous holder sent. The first terminal
fact wins; a task the server lost is requeued, a task it never got is sent again.
"""

import asyncio
import logging
import time

from servers.aio import db, jittered, phase
from servers.comfy_replies import ComfyError, speaks_jobs_api
from tasks.models import Task, TaskStatus

logger = logging.getLogger(__name__)


class Reconciler:
    """
    Made with the ComfyUI client, the server row, the prompt ledger, the connection's guard and `holds_lease()`,
    the link (whether it is online; whether it heard what the timer found), `resend(task, message)`,
    `finish(task, source, entry)` and `interval()`, the timer's period (read at each turn).
    """

    def __init__(self, client, server, prompts, *, guard, holds_lease, link, resend, finish, interval, spawn):
        self.client = client
        self.server = server
        self.prompts = prompts
        self.guard = guard
        self.holds_lease = holds_lease
        self.link = link
        self.resend = resend
        self.finish = finish
        self.interval = interval
        self.spawn = spawn

    async def loop(self):
        await self.after(phase(self.interval()), "timer")
        while True:
            await self.after(jittered(self.interval()), "timer")

    async def after(self, delay, reason):
        await asyncio.sleep(delay)
        if self.link.online:
            try:
                await self.reconcile(reason)
            except ComfyError as exc:
                logger.info("reconciling %s failed: %s", self.server.name, exc.message)

    def soon(self, delay, reason):
        self.spawn(self.after(delay, reason))

    async def follow_adopted(self):
        """Prompts a previous holder sent report to its clientId, not ours: look them up every second instead."""
        while self.prompts.adopted and not self.link.stopping:
            await asyncio.sleep(1.0)
            if self.link.online:
                try:
                    await self.reconcile("adopted", only=set(self.prompts.adopted))
                except ComfyError as exc:
                    logger.info("following adopted prompts on %s failed: %s", self.server.name, exc.message)

    async def reconcile(self, reason, only=None):
        """Compare every task this hub has on the server (or those of `only`) with its /queue and /history."""
        if not await self.holds_lease():
            return 0  # another worker follows this server now; this connection is about to be stopped
        prompts = self.prompts
        tasks = await db(lambda: list(Task.objects.select_related("server").on_server(self.server)))()
        if only is not None:
            prompts.adopted &= {task.prompt_id for task in tasks}
            tasks = [task for task in tasks if task.prompt_id in only]
        if not tasks:
            return 0
        # One prompt on 0.26 and later: GET /api/jobs/{id} answers where it is, and its history, in one call.
        single = len(tasks) == 1 and speaks_jobs_api(self.server.comfyui_version)
        queue = None if single else await self.client.queue()
        settled, missed, found_at = 0, {}, time.monotonic()
        for task in tasks:
            prompt_id = task.prompt_id
            if prompts.busy(prompt_id):
                continue
            async with self.guard(task, "reconcile"):
                # Followed by this socket since before this pass: its start or end should have come over the socket.
                followed = reason == "timer" and prompt_id in prompts.own
                if prompt_id not in prompts.own:
                    prompts.adopted.add(prompt_id)
                prompts.tasks[prompt_id] = task
                where, entry = await self.client.locate(prompt_id) if single else (queue.where(prompt_id), None)
                if where == "running":
                    prompts.running = prompt_id
                    if task.status == TaskStatus.SUBMITTED and await db(task.mark_running)("queue") and followed:
                        missed[prompt_id] = prompts.heard_start
                    continue
                if where == "pending":
                    if task.accepted_at is None:
                        await db(task.mark_accepted)()
                    continue
                # In neither queue list: it has finished (history), or the server never got it or lost it.
                if not single:
                    entry = await self.client.history(prompt_id)
                if entry is not None:
                    if followed:
                        missed[prompt_id] = prompts.heard_end
                    await self.finish(task, f"history ({reason})", entry)
                elif task.accepted_at is None and task.started_at is None:
                    await self.resend(task, f"not on {self.server.name} after {reason}; sending it")
                elif task.cancel_requested_at is not None:
                    await db(task.mark_cancelled)(f"removed from {self.server.name}'s queue")
                    prompts.forget(prompt_id)
                else:
                    await db(task.requeue)(f"{self.server.name} lost it (found in neither queue nor history)")
                    prompts.forget(prompt_id)
                settled += 1
        if missed and self.link.online and not self.link.stopping:
            # Started or finished while this socket followed them: unless the socket brings them (or anything) in
            # a while, ComfyUI has stopped talking to it (protocol §2.6) and it is connected again.
            def unheard():
                return sum(1 for prompt_id, heard in missed.items() if prompt_id not in heard)

            self.spawn(self.link.confirm_unheard(self.link.stream, found_at, unheard))
        return settled
