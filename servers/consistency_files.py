"""
The consistency check's side of hub storage (a disk or a bucket): every recorded file is read back through the
storage API and compared with its recorded size and sha256. An output found missing, short or altered is copied again
from its task's server when that server still has exactly those bytes; uploads and assets exist only in hub storage,
so they are reported for an operator.
"""

import logging
from dataclasses import dataclass

from django.conf import settings

from servers.aio import db
from servers.comfy_replies import ComfyError
from tasks.models import Asset, TaskOutput, Upload
from tasks.storage import StorageUnavailable, delete_quietly, digest, save_verified

logger = logging.getLogger(__name__)


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


def compare(name, size, sha256, prefix):
    """(kind, message) of what is wrong with the stored file `name`, or None when it holds what was recorded."""
    try:
        found_size, found_sha256 = digest(name)
    except FileNotFoundError:
        return f"{prefix}_missing", "no file in hub storage"
    except (StorageUnavailable, OSError) as exc:
        return "storage_error", f"the store did not give it back: {exc}"
    if found_size != size:
        return f"{prefix}_wrong_size", f"{found_size} bytes stored, {size} recorded"
    if found_sha256 != sha256:
        return f"{prefix}_corrupt", f"{size} bytes as recorded, but another sha256 ({found_sha256[:12]}…)"
    return None


async def check_outputs(connect, servers, fix, report):
    rows = TaskOutput.objects.select_related("task", "task__server")
    if servers is not None:
        rows = rows.filter(task__server__in=servers)
    outputs = await db(lambda: list(rows))()
    report.outputs += len(outputs)
    findings = []
    for output in outputs:
        problem = await db(compare)(output.file.name, output.size, output.sha256, "output")
        if problem is None:
            continue
        kind, message = problem
        finding = Finding(
            kind, f"{output.filename}: {message}", output.task.server.name if output.task.server else "",
            output.task_id, output.task.prompt_id or "",
        )
        if fix and kind != "storage_error":
            finding.action = await refetch(connect, output)
        findings.append(finding)
    return findings


def check_files(report):
    """Uploads and the assets users uploaded: reported only (no server holds a copy)."""
    findings = []
    rows = [*Upload.objects.order_by("created_at"), *Asset.objects.uploaded().order_by("created_at")]
    report.files += len(rows)
    for row in rows:
        problem = compare(row.file.name, row.size, row.sha256, "file")
        if problem is not None:
            kind, message = problem
            what = "upload" if isinstance(row, Upload) else "asset"
            finding = Finding(kind, f"{what} {row.pk} of user {row.owner_id} ({row.file.name}): {message}")
            if report.fix:
                finding.action = "cannot fix: only hub storage had it; the user must upload it again"
            findings.append(finding)
    return findings


async def refetch(connect, output):
    """Copy an output again from the task's own server, if it still has exactly those bytes."""
    task = output.task
    if task.server is None or not task.prompt_id:
        return "cannot fix: the task has no server to copy from"
    conn = connect(task.server)
    spool = None
    try:
        entry = await conn.client.history(task.prompt_id)
        match = next((f for f in (entry.files() if entry else []) if f.filename == output.filename), None)
        if match is None:
            return f"cannot fix: {task.server.name} no longer has it"
        spool, _ = await conn.client.view(match, max_bytes=settings.COMFYHUB["MAX_OUTPUT_BYTES"])
        if spool.sha256 != output.sha256:
            return f"cannot fix: {task.server.name} now has different bytes under that name"
        await db(_rewrite)(output, spool)
    except ComfyError as exc:
        return f"cannot fix: {exc.message}"
    except StorageUnavailable as exc:
        return f"cannot fix: {exc}"
    finally:
        if spool is not None:
            spool.close()
        await conn.client.close()
    return f"copied again from {task.server.name}"


def _rewrite(output, spool):
    """Put the verified copy where the row says its file is (a bucket or disk may give a nearby name instead)."""
    delete_quietly(output.file.name)
    saved = save_verified(output.file.name, spool)
    if saved != output.file.name:
        TaskOutput.objects.filter(pk=output.pk).update(file=saved)
