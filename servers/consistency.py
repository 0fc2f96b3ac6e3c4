"""
The consistency check: compare what the hub believes with what each server and hub storage hold, report each
difference by kind, and (with fix) apply the safe repair for it. The command `check_consistency` and the admin
action run this same code. Without fix nothing changes.
"""

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from servers.aio import db
from servers.comfy import ComfyError
from servers.models import Lock, Server
from tasks.models import Task, TaskOutput

logger = logging.getLogger(__name__)

KINDS = {
    "unreachable": "server could not be asked",
    "unknown_to_server": "hub task the server does not know",
    "orphan": "server prompt from this hub that the hub does not know",
    "finished_not_recorded": "finished on the server but not in the hub",
    "output_missing": "output recorded but its file is missing",
    "output_corrupt": "output file does not match its size or sha256",
    "expired_lock": "expired lock still held",
}
# A task sent this recently may be in the middle of its POST: judging it would be a false alarm.
GRACE = timedelta(seconds=30)


@dataclass
class Finding:
    kind: str
    message: str
    server: str = ""
    task_id: object = None
    prompt_id: str = ""
    action: str = ""  # what --fix did, or why it could not

    def __str__(self):
        where = " ".join(
            part
            for part in (
                f"server={self.server}" if self.server else "",
                f"task={self.task_id}" if self.task_id else "",
                f"prompt_id={self.prompt_id}" if self.prompt_id else "",
            )
            if part
        )
        line = f"[{self.kind}] {where}: {self.message}" if where else f"[{self.kind}] {self.message}"
        return f"{line} -> {self.action}" if self.action else line


@dataclass
class Report:
    """What one run of the check looked at, and what it found (and did, with fix)."""

    fix: bool = False
    servers: int = 0
    tasks: int = 0
    outputs: int = 0
    findings: list = field(default_factory=list)

    @property
    def repaired(self):
        return sum(1 for finding in self.findings if finding.action and not finding.action.startswith("cannot"))

    def summary(self):
        """One line an operator reads: what was checked, then what was found (or that nothing was)."""
        checked = (
            f"Checked {plural(self.servers, 'server')}, {plural(self.tasks, 'task')}, "
            f"{plural(self.outputs, 'output')}"
        )
        if not self.findings:
            return f"{checked}: nothing to repair."
        counts = Counter(finding.kind for finding in self.findings)
        found = ", ".join(f"{count} {KINDS[kind]}" for kind, count in sorted(counts.items()))
        outcome = f"Repaired {self.repaired}." if self.fix else "Nothing changed."
        return f"{checked}: found {len(self.findings)}: {found}. {outcome}"


def plural(count, noun):
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


async def check(connect, server_name=None, fix=False):
    """
    Run every check (for one server, or all enabled servers) through connections made by `connect(server)`
    (servers.connection.standalone); returns the Report.
    """
    servers = await db(lambda: list(_servers(server_name)))()
    report = Report(fix=fix, servers=len(servers))
    for server in servers:
        report.findings += await check_server(connect(server), fix, report)
    report.findings += await check_outputs(connect, servers if server_name else None, fix, report)
    if server_name is None:
        report.findings += await db(check_locks)(fix)
    return report


def _servers(name):
    if name is None:
        return Server.objects.enabled()
    return Server.objects.filter(name=name)


async def check_server(conn, fix, report):
    server = conn.server
    findings = []
    try:
        try:
            queue = await conn.client.queue()
        except ComfyError as exc:
            return [Finding("unreachable", f"could not read its queue: {exc.message}", server.name)]
        tasks = await db(lambda: list(Task.objects.select_related("server").on_server(server)))()
        report.tasks += len(tasks)
        known = {task.prompt_id for task in tasks}
        recent = timezone.now() - GRACE
        for task in tasks:
            if queue.where(task.prompt_id) or (task.submitted_at and task.submitted_at > recent):
                continue
            try:
                entry = await conn.client.history(task.prompt_id)
            except ComfyError as exc:
                findings.append(Finding("unreachable", f"could not read its history: {exc.message}", server.name))
                break
            # One task that raises must not stop the check of the others.
            async with conn.guard(task, "consistency"):
                if entry is not None:
                    finding = Finding(
                        "finished_not_recorded", f"the server finished it; the hub still says {task.status}",
                        server.name, task.pk, task.prompt_id,
                    )
                    if fix:
                        await conn.finish(task, "consistency check", entry)
                        status = await db(lambda task=task: Task.objects.get(pk=task.pk).status)()
                        finding.action = f"completed from the server's history: now {status}"
                else:
                    finding = Finding(
                        "unknown_to_server",
                        f"the hub says {task.status} there; it is in neither its queue nor history",
                        server.name, task.pk, task.prompt_id,
                    )
                    if fix:
                        done = await db(task.requeue)(f"{server.name} does not know it (consistency check)")
                        finding.action = "requeued (or failed at the attempt limit)" if done else "it changed meanwhile"
                findings.append(finding)
        ours = [
            pid
            for pid in [*queue.running, *queue.pending]
            if queue.ours(pid, server.client_id) and pid not in known
        ]
        for prompt_id in ours:
            owner = await db(lambda pid=prompt_id: Task.objects.filter(prompt_id=pid).first())()
            where = queue.where(prompt_id)
            finding = Finding(
                "orphan",
                f"{where} on the server under this hub's client id, but no active hub task is bound to it",
                server.name, owner.pk if owner else None, prompt_id,
            )
            if fix:
                # Adopting would need an owner and inputs we cannot trust; deleting is the safe repair.
                if where == "pending":
                    await conn.client.delete_from_queue([prompt_id])
                    finding.action = "deleted from the server's queue"
                else:
                    await conn.client.interrupt(prompt_id)
                    finding.action = "interrupted on the server"
            findings.append(finding)
    finally:
        await conn.client.close()
    return findings


async def check_outputs(connect, servers, fix, report):
    rows = TaskOutput.objects.select_related("task", "task__server")
    if servers is not None:
        rows = rows.filter(task__server__in=servers)
    outputs = await db(lambda: list(rows))()
    report.outputs += len(outputs)
    findings = []
    for output in outputs:
        problem = await db(_verify)(output)
        if problem is None:
            continue
        kind, message = problem
        finding = Finding(
            kind, f"{output.filename}: {message}", output.task.server.name if output.task.server else "",
            output.task_id, output.task.prompt_id or "",
        )
        if fix:
            finding.action = await refetch(connect, output)
        findings.append(finding)
    return findings


def _verify(output):
    try:
        with output.file.open("rb") as handle:
            data = handle.read()
    except (FileNotFoundError, ValueError):
        return "output_missing", "no file in hub storage"
    if len(data) != output.size or hashlib.sha256(data).hexdigest() != output.sha256:
        return "output_corrupt", f"{len(data)} bytes with another sha256 than the {output.size} recorded"
    return None


async def refetch(connect, output):
    """Copy an output again from the task's own server, if it still has exactly those bytes."""
    task = output.task
    if task.server is None or not task.prompt_id:
        return "cannot fix: the task has no server to copy from"
    conn = connect(task.server)
    try:
        entry = await conn.client.history(task.prompt_id)
        match = next((f for f in (entry.files() if entry else []) if f.filename == output.filename), None)
        if match is None:
            return f"cannot fix: {task.server.name} no longer has it"
        data, _ = await conn.client.view(match, max_bytes=settings.COMFYHUB["MAX_OUTPUT_BYTES"])
    except ComfyError as exc:
        return f"cannot fix: {exc.message}"
    finally:
        await conn.client.close()
    if hashlib.sha256(data).hexdigest() != output.sha256:
        return f"cannot fix: {task.server.name} now has different bytes under that name"
    await db(_rewrite)(output, data)
    return f"copied again from {task.server.name}"


def _rewrite(output, data):
    from django.core.files.base import ContentFile
    from django.core.files.storage import default_storage

    if default_storage.exists(output.file.name):
        default_storage.delete(output.file.name)
    saved = default_storage.save(output.file.name, ContentFile(data))
    if saved != output.file.name:
        TaskOutput.objects.filter(pk=output.pk).update(file=saved)


def check_locks(fix):
    now = timezone.now()
    findings = []
    for lock in Lock.objects.filter(expires_at__lt=now).select_related("server"):
        finding = Finding(
            "expired_lock",
            f"{lock.purpose} lock {lock.key} held by {lock.owner} expired at {lock.expires_at:%Y-%m-%d %H:%M:%S}",
            lock.server.name if lock.server else "",
        )
        if fix:
            # Only if still expired: a worker may have renewed it since.
            gone = Lock.objects.filter(pk=lock.pk, expires_at__lt=timezone.now()).delete()[0]
            finding.action = "released" if gone else "renewed meanwhile: left alone"
        findings.append(finding)
    return findings
