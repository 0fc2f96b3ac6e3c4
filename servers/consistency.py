"""
The consistency check: compare what the hub believes with what each server and hub storage hold, report each
difference by kind, and (with fix) apply the safe repair for it. The command `check_consistency` and the admin
action run this same code. Without fix nothing changes.
"""

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta

from django.utils import timezone

from servers.aio import db
from servers.comfy_replies import ComfyError
from servers.consistency_files import Finding, check_files, check_outputs
from servers.models import Lock, Server
from tasks.models import Task

logger = logging.getLogger(__name__)

KINDS = {
    "unreachable": "server could not be asked",
    "unknown_to_server": "hub task the server does not know",
    "orphan": "server prompt from this hub that the hub does not know",
    "finished_not_recorded": "finished on the server but not in the hub",
    "output_missing": "output recorded but its file is missing",
    "output_wrong_size": "output file of another size than recorded",
    "output_corrupt": "output file of the recorded size with another sha256",
    "file_missing": "upload or asset recorded but its file is missing",
    "file_wrong_size": "upload or asset file of another size than recorded",
    "file_corrupt": "upload or asset file of the recorded size with another sha256",
    "storage_error": "file the store did not give back",
    "expired_lock": "expired lock still held",
}
# A task sent this recently may be in the middle of its POST: judging it would be a false alarm.
GRACE = timedelta(seconds=30)


@dataclass
class Report:
    """What one run of the check looked at, and what it found (and did, with fix)."""

    fix: bool = False
    servers: int = 0
    tasks: int = 0
    outputs: int = 0
    files: int = 0  # uploads and uploaded assets
    findings: list = field(default_factory=list)

    @property
    def repaired(self):
        return sum(1 for finding in self.findings if finding.action and not finding.action.startswith("cannot"))

    def summary(self):
        """One line an operator reads: what was checked, then what was found (or that nothing was)."""
        checked = (
            f"Checked {plural(self.servers, 'server')}, {plural(self.tasks, 'task')}, "
            f"{plural(self.outputs, 'output')}, {plural(self.files, 'uploaded file')}"
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
        report.findings += await db(check_files)(report)
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
