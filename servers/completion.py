"""
Finishing a task from its server's /history entry: the first terminal fact wins (a websocket end signal, a
reconciliation, recovery, the consistency check), outputs are copied into hub storage before the task is marked
succeeded, and every later signal for the same task is a no-op.
"""

import asyncio
import logging

from django.conf import settings

from servers.aio import db
from servers.comfy_replies import ComfyRejected, ComfyUnavailable
from servers.guard import plain
from tasks import outputs
from tasks.models import Task
from tasks.storage import Spool

logger = logging.getLogger(__name__)


class Completion:
    """Made with the ComfyUI client, the server row, the prompt ledger, the guard, `spawn(coro)` and `wake()`."""

    def __init__(self, client, server, prompts, *, guard, spawn, wake):
        self.client = client
        self.server = server
        self.prompts = prompts
        self.guard = guard
        self.spawn = spawn
        self.wake = wake

    def finish_soon(self, task, source):
        if task.prompt_id not in self.prompts.finishing:
            self.spawn(self.finish(task, source))

    async def finish(self, task, source, entry=None):
        """The first terminal fact wins: read /history, store outputs, then mark the task. Later calls are no-ops."""
        prompt_id = task.prompt_id
        if prompt_id in self.prompts.finishing:
            return
        self.prompts.finishing.add(prompt_id)
        try:
            async with self.guard(task, "finish"):
                if await self.settle(task, source, entry):
                    self.prompts.forget(prompt_id)
                    self.wake()  # a slot is free: the next task can go
        except ComfyUnavailable as exc:
            logger.info("%s: could not finish %s yet: %s", self.server.name, prompt_id, exc.message)
        finally:
            self.prompts.finishing.discard(prompt_id)

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
        """
        Copy the outputs into hub storage and mark the task; False when that failed (it is tried again). Each file
        is streamed off the server into a spool, counted and hashed on the way, then saved and checked in the store.
        """
        async with self.guard(task, "store_outputs") as outcome:
            limit = settings.COMFYHUB["MAX_OUTPUT_BYTES"]
            files = []
            try:
                for output in entry.files():
                    try:
                        spool, content_type = await self.client.view(output, max_bytes=limit)
                    except ComfyRejected as exc:
                        await db(task.mark_failed)(
                            "output_missing", f"could not copy {plain(output.filename)}: {exc.message}"
                        )
                        return True
                    files.append((output.node_id, output.filename, content_type, spool))
                images = self.prompts.ws_images.get(task.prompt_id, [])
                for index, (node_id, content_type, data) in enumerate(images):
                    files.append((node_id, f"websocket_{node_id}_{index + 1:05}.png", content_type, data))
                await db(outputs.complete)(task, files, source)
            finally:
                for file in files:
                    if isinstance(file[3], Spool):
                        file[3].close()
        return not outcome.failed


def _cancel_requested(task):
    return Task.objects.filter(pk=task.pk, cancel_requested_at__isnull=False).exists()
