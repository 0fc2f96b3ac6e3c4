"""The contract's shapes of a task: its job object, list item, progress snapshot, outputs and status name."""

from datetime import timedelta

from django.urls import reverse
from django.utils import timezone

from tasks.api import error_json
from tasks.models import TaskStatus
from tasks.v2.assets import output_asset

STATUS_NAMES = {
    TaskStatus.QUEUED: "queued",
    TaskStatus.SUBMITTED: "queued",  # sent to a server's queue: to the integrator it still waits
    TaskStatus.RUNNING: "running",
    TaskStatus.SUCCEEDED: "succeeded",
    TaskStatus.FAILED: "failed",
    TaskStatus.CANCELLED: "canceled",
}
TERMINAL_NAMES = frozenset({"succeeded", "failed", "canceled", "expired"})
# The hub deletes no task by itself; `expires_at` is required by the contract, so it says "not within a year".
RETENTION = timedelta(days=365)
# How long a client may rely on an output link before reading the job again for a fresh one (the contract's
# links are short-lived). The v1 download URL itself stays valid: it checks the bearer token on every request.
LINK_LIFETIME = timedelta(hours=1)


def iso(value):
    return value.isoformat() if value else None


def status_name(task):
    """The contract's name for the task's status: an active task its owner asked to stop is `canceling`."""
    if task.is_active and task.cancel_requested_at is not None:
        return "canceling"
    return STATUS_NAMES[task.status]


def job_urls(task):
    return {
        "self": reverse("api-v2:job", args=[task.pk]),
        "events": reverse("api-v2:job_events", args=[task.pk]),
        "cancel": reverse("api-v2:job_cancel", args=[task.pk]),
    }


def progress_snapshot(detail, value):
    """A progress snapshot from a live fact or a row's stored detail (tasks/live.py progress_detail)."""
    step = detail.get("step") or None
    title = detail.get("title") or ""
    message = " ".join(part for part in (title, f"{step[0]}/{step[1]}" if step else "") if part)
    return {
        "value": round(min(max(float(value or 0.0), 0.0), 1.0), 4),
        "nodes_done": int(detail.get("done") or 0),
        "nodes_total": int(detail.get("total") or 0),
        "current_node": detail.get("node"),
        "current_node_class": None,  # the hub's facts carry the node's title, not its class
        "step": step[0] if step else None,
        "steps": step[1] if step else None,
        "message": message or None,
    }


def task_progress(task):
    if task.status == TaskStatus.SUCCEEDED:
        return progress_snapshot({}, 1.0)
    if task.status != TaskStatus.RUNNING:
        return None  # nothing has run yet (or it ended before it ran)
    return progress_snapshot(task.progress_detail or {}, task.progress)


def output_type(content_type):
    kind = (content_type or "").split("/", 1)[0]
    return kind if kind in ("image", "video", "audio", "text") else "file"


def output_json(output, request):
    """
    An output as the contract shows it: an asset of the job's owner (made the first time it is asked for, pointing
    at the stored file), fetched from the asset's content link like any other asset, so the SDK's downloads work.
    """
    asset = output_asset(output)
    return {
        "id": str(asset.pk),
        "job_id": str(output.task_id),
        "node_id": output.node_id,
        "name": output.display_name,
        "type": output_type(output.content_type),
        "content_type": output.content_type,
        "size_bytes": output.size,
        "hash": asset.hash if asset.blake3 else None,
        "url": request.build_absolute_uri(f"/api/v2/assets/{asset.pk}/content"),
        "url_expires_at": iso(timezone.now() + LINK_LIFETIME),
    }


def job_error(task, request):
    if task.status != TaskStatus.FAILED:
        return None
    shown = error_json(task, staff=request.user.is_staff) or {"kind": "", "message": "The job failed.", "details": {}}
    details = shown["details"] if isinstance(shown["details"], dict) else {}
    node = details.get("node_id") or details.get("node")
    return {
        "code": shown["kind"] or "execution_error",
        "message": shown["message"] or "The job failed.",
        "node_id": str(node) if node is not None else None,
        "class_type": details.get("node_type") or details.get("class_type"),
        "traceback": None,
    }


def milliseconds(start, end):
    return int((end - start).total_seconds() * 1000) if start and end else None


def job_json(task, request, positions=None):
    """The authoritative job object: status, latest progress, every output stored so far, links."""
    status = status_name(task)
    started = task.started_at or task.submitted_at
    return {
        "id": str(task.pk),
        "status": status,
        "created_at": iso(task.created_at),
        "started_at": iso(task.started_at),
        "completed_at": iso(task.finished_at),
        "expires_at": iso(task.created_at + RETENTION),
        "queue_position": (positions or {}).get(task.pk) if status == "queued" else None,
        "progress": task_progress(task),
        "outputs": [output_json(output, request) for output in task.outputs.all()],
        "error": job_error(task, request),
        "metadata": task.metadata or {},
        "metrics": {
            "queue_ms": milliseconds(task.created_at, started or (task.finished_at if task.is_terminal else None)),
            "execution_ms": milliseconds(task.started_at, task.finished_at),
        },
        "urls": job_urls(task),
    }


def job_item(task):
    """A job as the list shows it: lighter than the job object (no outputs, no progress)."""
    return {
        "id": str(task.pk),
        "status": status_name(task),
        "create_time": iso(task.created_at),
        "update_time": iso(max(task.last_event_at, task.created_at)),
        "metadata": task.metadata or {},
        "urls": job_urls(task),
    }
