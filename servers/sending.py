"""
Sending a bound task's prompt to its server, sending it again only when the server surely lacks it, copying its
uploads there first, and taking a prompt off the server again (cancel, give up).
"""

import logging
import time

from servers import previews
from servers.aio import db
from servers.comfy_replies import ComfyError, ComfyRejected, ComfyUnavailable, speaks_jobs_api
from tasks.models import Task, TaskStatus, Upload

logger = logging.getLogger(__name__)
LEASE_SEEN_SECONDS = 0.5  # a lease seen held for a third of its length this recently is still held


class Sending:
    """
    The POSTs of one connection. Made with the ComfyUI client, the server row, the prompt ledger, the connection's
    clientId and guard, `holds_lease(margin)`, the link (its socket, watched after each POST), `spawn(coro)`, and
    `reconcile(reason)` / `reconcile_soon(delay, reason)` for when the server's answer leaves a doubt.
    """

    def __init__(
        self, client, server, prompts, *, client_id, guard, holds_lease, lease_margin, link, spawn, reconcile,
        reconcile_soon,
    ):
        self.client = client
        self.server = server
        self.prompts = prompts
        self.client_id = client_id
        self.guard = guard
        self.holds_lease = holds_lease
        self.lease_margin = lease_margin
        self.link = link
        self.spawn = spawn
        self.reconcile = reconcile
        self.reconcile_soon = reconcile_soon
        self.last_number = None  # the last queue number /prompt answered: it goes down when the server restarts

    async def send_claimed(self, task, front=False):
        """send() for the dispatcher, which has claimed the prompt in `sending` already."""
        try:
            async with self.guard(task, "send"):
                await self.send(task, front=front)
        finally:
            self.prompts.sending.discard(task.prompt_id)

    async def send(self, task, front=False):
        """POST the prompt of a task already bound to this server. Never sends a prompt_id the server has."""
        prompt_id, prompts = task.prompt_id, self.prompts
        prompts.tasks[prompt_id] = task
        prompts.strangers.discard(prompt_id)
        prompts.sending.add(prompt_id)
        prompts.own.add(prompt_id)
        prompts.adopted.discard(prompt_id)
        try:
            await self.copy_uploads(task)
            # The last moment to find out that the lease lapsed: the new holder sends the task (it is bound to this
            # server) unless the POST below reaches the server before that holder's first reconciliation, which
            # the margin (a third of the lease) leaves ample time for.
            # The claim saw the lease with the same margin a moment ago: asking again would only repeat it.
            seen = getattr(task, "lease_seen", None)
            fresh = seen is not None and time.monotonic() - seen < LEASE_SEEN_SECONDS
            if not fresh and not await self.holds_lease(margin=self.lease_margin):
                logger.warning("%s: lease lapsed; leaving task %s to the new holder", self.server.name, task.pk)
                await db(task.record)("handed_over", f"not sent: this worker's lease on {self.server.name} lapsed")
                prompts.forget(prompt_id)
                return
            stream, posted_at = self.link.stream, time.monotonic()
            extra = await db(previews.extra_data)(self.server, task) if previews.asks(self.server) else None
            reply = await self.client.submit(task.graph, prompt_id, self.client_id, extra, front=front)
        except ComfyRejected as exc:
            await db(task.mark_failed)("rejected", rejection_message(exc), rejection_details(exc))
            prompts.forget(prompt_id)
        except ComfyUnavailable as exc:
            if not exc.sent:
                await db(task.unbind)(f"{self.server.name} unreachable: {exc.message}")
                prompts.forget(prompt_id)
            else:
                # The reply was lost: the prompt may or may not be queued. Reconciliation asks /queue and
                # /history before anything is sent again.
                await db(task.record)("reply_lost", exc.message)
                self.reconcile_soon(1.0, "lost reply")
        else:
            await db(task.mark_accepted)(reply.number)
            await self.check_number(reply.number)
            self.link.posted(stream, posted_at, prompt_id, self.spawn)
            if reply.node_errors:
                await db(task.record)("partial", "some outputs were refused by the server", reply.node_errors)
        finally:
            prompts.sending.discard(prompt_id)

    async def resend(self, task, message):
        """
        Send a bound task again under its prompt_id, only if the server surely does not have it: ComfyUI does not
        deduplicate, so a second POST of a prompt it holds runs it twice. The caller's view is a snapshot: since it
        was taken, a POST of this worker may have landed (another reconciliation pass, the dispatcher), so the row
        and the server are asked again, and the prompt is claimed in `sending` right after the last look.
        """
        prompt_id = task.prompt_id
        if prompt_id in self.prompts.sending:
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
        if prompt_id in self.prompts.sending:
            return False
        self.prompts.sending.add(prompt_id)  # taken: every other path now leaves it alone
        try:
            await db(fresh.record)("resubmitted", message)
            await self.send(fresh)
        finally:
            self.prompts.sending.discard(prompt_id)  # send() clears it too, unless it failed before its first line
        return True

    async def check_number(self, number):
        # ComfyUI numbers every POST from a counter that starts again at 0 when the process restarts.
        if not isinstance(number, int | float) or number < 0:
            return  # front prompts get negative numbers
        previous, self.last_number = self.last_number, number
        if previous is not None and number < previous:
            await db(self.server.record)("restarted", f"its queue numbers went back from {previous} to {number}")
            self.reconcile_soon(0, "restart")

    async def copy_uploads(self, task):
        changed = False
        for binding in task.image_inputs:
            upload = await db(Upload.objects.get)(pk=binding["upload"])
            data = await db(read_file)(upload.file)
            # Not overwrite: ComfyUI answers the same name for the same bytes without writing, while an overwrite
            # rewrites the file in place under a running task of the same user that is reading it.
            name = await self.client.upload_image(data, upload.remote_name, overwrite=False)
            node = task.graph[binding["node"]]["inputs"]
            if node.get(binding["input"]) != name:
                node[binding["input"]] = name
                changed = True
        if changed:
            await db(lambda: Task.objects.filter(pk=task.pk).update(graph=task.graph))()

    # --- taking prompts off the server ------------------------------------------------------------------

    async def cancel(self, task):
        prompt_id = task.prompt_id
        if prompt_id in self.prompts.cancel_sent or self.prompts.busy(prompt_id):
            return
        self.prompts.cancel_sent.add(prompt_id)
        self.prompts.tasks[prompt_id] = task
        try:
            if speaks_jobs_api(self.server.comfyui_version):
                await self.cancel_job(task)
                return
            queue = await self.client.queue()
            where = queue.where(prompt_id)
            if where == "pending":
                await self.client.delete_from_queue([prompt_id])
                # It may have started in between: look again on the next step.
                self.prompts.cancel_sent.discard(prompt_id)
            elif where == "running":
                await self.client.interrupt(prompt_id)
            await db(task.record)("cancel_sent", f"{where or 'not queued'} on {self.server.name}")
            if where != "running":
                await self.reconcile("cancel")
        except ComfyError as exc:
            self.prompts.cancel_sent.discard(prompt_id)
            logger.info("cancel of %s on %s failed: %s", prompt_id, self.server.name, exc.message)
        except BaseException:
            self.prompts.cancel_sent.discard(prompt_id)  # the next step tries again (the caller's guard counts it)
            raise

    async def cancel_job(self, task):
        """
        Cancel on ComfyUI 0.26 and later: one atomic call, where /queue then /interrupt could miss a prompt that
        started in between. A pending prompt cancelled there vanishes without a trace (its /api/jobs is a 404, it
        never reaches /history), so the hub records that cancel itself; a running one ends interrupted and is
        finished from its history like any other.
        """
        prompt_id, name = task.prompt_id, self.server.name
        if not await self.client.cancel_job(prompt_id):
            await db(task.record)("cancel_sent", f"not queued on {name}")
            await self.reconcile("cancel")
            return
        job = await self.client.job(prompt_id)
        if job is None:
            await db(task.record)("cancel_sent", f"pending on {name}")
            await db(task.mark_cancelled)(f"removed from {name}'s queue")
            self.prompts.forget(prompt_id)
        elif job["status"] in ("pending", "in_progress"):
            await db(task.record)("cancel_sent", f"running on {name}")
        else:
            await db(task.record)("cancel_sent", f"running on {name}")
            await self.reconcile("cancel")  # interrupted already: its history is there

    async def take_off(self, prompt_id):
        """Delete the prompt from the server's queue, or interrupt it if it runs; a failure is only logged."""
        try:
            if speaks_jobs_api(self.server.comfyui_version):
                await self.client.cancel_job(prompt_id)
                return
            where = (await self.client.queue()).where(prompt_id)
            if where == "pending":
                await self.client.delete_from_queue([prompt_id])
            elif where == "running":
                await self.client.interrupt(prompt_id)
        except ComfyError as exc:
            logger.info("%s: could not take %s off the server: %s", self.server.name, prompt_id, exc.message)


def read_file(field):
    with field.open("rb") as handle:
        return handle.read()


def rejection_message(exc):
    error = exc.error
    if error.get("type") == "missing_node_type":
        # ComfyUI 0.26 names the node; say what the task needs in the words of the hub.
        info = error.get("extra_info") if isinstance(error.get("extra_info"), dict) else {}
        class_type, node_id = info.get("class_type"), info.get("node_id")
        if class_type:
            return f"the server has no node type {class_type} (node {node_id}); the custom node may not be installed"
        return f"node {node_id} of the graph has no class_type: {error.get('message') or exc.message}"
    message = error.get("message") or exc.message
    if error.get("details"):
        message = f"{message}: {error['details']}"
    for node_id, node in exc.node_errors.items():
        for item in (node or {}).get("errors", []):
            detail = f"{item.get('message')} {item.get('details', '')}".rstrip()
            message += f"; node {node_id} ({node.get('class_type')}): {detail}"
    return message


def rejection_details(exc):
    return {"error": exc.error, "node_errors": exc.node_errors, "status": exc.status}
