"""POST/GET /api/v2/jobs, one job, its workflow and its cancellation: a task of the caller's, as a v2 job."""

import base64
import binascii
import hashlib
import json
import re
import uuid
from datetime import datetime
from typing import Any

from django.db.models import Q
from django.db.models.fields.json import KeyTransform
from django.http import JsonResponse
from django.shortcuts import get_object_or_404
from ninja import Header, Router, Schema
from pydantic import ConfigDict

from tasks.models import TaskStatus
from tasks.params import BindingError
from tasks.progress import emit_task_update
from tasks.queue import queue_positions
from tasks.quota import StorageFull, check_storage
from tasks.submission import IdempotencyConflict, QuotaExceeded, create_task, plain_output_names, user_tasks
from tasks.v2.errors import ApiError
from tasks.v2.refs import MissingAsset, resolve_asset_refs
from tasks.v2.shapes import job_item, job_json

router = Router(tags=["jobs"])

MAX_LABELS, MAX_LABEL_KEY, MAX_LABEL_VALUE = 16, 64, 512
LABEL_KEY = re.compile(r"^[A-Za-z0-9_.:/-]+$")
PAGE_DEFAULT, PAGE_MAX = 50, 100
MAX_KEY = 200  # Task.idempotency_key's length
# When a user's queue is full: about when a place should have freed up. A guess; the client retries at this pace.
QUEUE_FULL_RETRY_SECONDS = 10

# The contract's status names, as filters on the hub's statuses and cancel requests.
STATUS_FILTERS = {
    "queued": Q(status__in=(TaskStatus.QUEUED, TaskStatus.SUBMITTED), cancel_requested_at__isnull=True),
    "running": Q(status=TaskStatus.RUNNING, cancel_requested_at__isnull=True),
    "canceling": Q(
        status__in=(TaskStatus.QUEUED, TaskStatus.SUBMITTED, TaskStatus.RUNNING), cancel_requested_at__isnull=False
    ),
    "succeeded": Q(status=TaskStatus.SUCCEEDED),
    "failed": Q(status=TaskStatus.FAILED),
    "canceled": Q(status=TaskStatus.CANCELLED),
    "expired": Q(pk__in=()),  # the hub expires nothing
}


class JobRequest(Schema):
    """An API-format workflow graph, verbatim, and optional string labels stored on the job."""

    model_config = ConfigDict(extra="forbid")  # webhook_url, inputs and extra_data are not accepted

    workflow: dict[str, Any]
    metadata: dict[str, str] | None = None


def check_labels(labels, code="metadata_invalid"):
    if len(labels) > MAX_LABELS:
        raise ApiError(422, code, f"At most {MAX_LABELS} metadata labels.", {"metadata": f"has {len(labels)}"})
    for key, value in labels.items():
        if not 0 < len(key) <= MAX_LABEL_KEY or not LABEL_KEY.match(key):
            raise ApiError(
                422,
                code,
                "A metadata key is not valid.",
                {"metadata": f"keys are 1 to {MAX_LABEL_KEY} letters, digits or _ . : / -"},
            )
        if len(value) > MAX_LABEL_VALUE:
            raise ApiError(422, code, "A metadata value is too long.", {key: f"at most {MAX_LABEL_VALUE} characters"})


def request_hash(workflow, labels):
    """What "the same body" means for an Idempotency-Key: the same graph and labels, however the JSON was spelled."""
    text = json.dumps({"workflow": workflow, "metadata": labels}, sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def replay_or_refuse(task, digest):
    if task.idempotency_body != digest:
        raise ApiError(
            422,
            "idempotency_key_reuse",
            "This Idempotency-Key was used with another request; use a new key for a new job.",
        )


def own_task(request, job_id):
    """The caller's task, or 404: another user's job is answered exactly like one that does not exist."""
    try:
        pk = job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id))
    except ValueError:
        raise ApiError(404, "not_found", "No such job.") from None
    return get_object_or_404(user_tasks(request.auth), pk=pk)


def answer(task, request, status=200, replayed=None):
    positions = queue_positions([task]) if task.is_active else {}
    response = JsonResponse(job_json(task, request, positions), status=status)
    if replayed is not None:
        response["Idempotency-Replayed"] = "true" if replayed else "false"
    return response


@router.post("", url_name="jobs", summary="Submit a workflow for execution")
def submit(request, payload: JobRequest, idempotency_key: str | None = Header(None, alias="Idempotency-Key")):
    user = request.auth
    graph, labels = payload.workflow, payload.metadata or {}
    check_labels(labels)
    if "nodes" in graph and "links" in graph:
        raise ApiError(
            422,
            "workflow_format_ui",
            "This is a UI-format workflow; export it with 'Export (API)' and send that graph.",
        )
    if idempotency_key is not None and not (
        0 < len(idempotency_key) <= MAX_KEY and idempotency_key.isascii() and idempotency_key.isprintable()
    ):
        raise ApiError(
            422,
            "invalid_request",
            "The Idempotency-Key is not valid.",
            {"Idempotency-Key": f"must be 1 to {MAX_KEY} printable ASCII characters"},
        )
    digest = request_hash(graph, labels)
    if idempotency_key is not None:
        existing = user_tasks(user).filter(idempotency_key=idempotency_key).first()
        if existing is not None:
            replay_or_refuse(existing, digest)
            return answer(existing, request, 201, replayed=True)
    try:
        # Before the references below, which may store uploads: a refused job leaves no file behind.
        check_storage(user)
        # Inputs naming one of the user's assets become uploads the engine copies to the job's server first.
        graph, images = resolve_asset_refs(user, graph)
    except StorageFull as exc:
        raise storage_full(exc) from None
    except MissingAsset as exc:
        raise ApiError(422, exc.code, exc.message, {f"workflow.{k}": v for k, v in exc.details.items()}) from None
    body = {"prompt": graph}
    if idempotency_key is not None:
        body["idempotency_key"] = idempotency_key
    try:
        task, created = create_task(
            user, body, fields={
                "idempotency_body": digest if idempotency_key else "",
                "metadata": labels,
                "image_inputs": images,
            },
            token=getattr(request, "api_token", None),  # the contract has no webhook field: the token's default
        )
    except IdempotencyConflict as exc:  # the key came meanwhile, through v1 or v2
        replay_or_refuse(exc.task, digest)  # 422 unless it came with this very request
        return answer(user_tasks(user).get(pk=exc.task.pk), request, 201, replayed=True)
    except BindingError as exc:
        details = {("workflow" if key == "prompt" else key): value for key, value in (exc.details or {}).items()}
        raise ApiError(422, "invalid_workflow", exc.message, details or None) from None
    except PermissionError as exc:
        raise ApiError(403, "forbidden", str(exc)) from None
    except QuotaExceeded as exc:
        raise ApiError(
            429, "queue_full", str(exc), headers={"Retry-After": str(QUEUE_FULL_RETRY_SECONDS)}
        ) from None
    except StorageFull as exc:
        raise storage_full(exc) from None
    if not created:  # the same key arrived twice at once: the other request created the task
        replay_or_refuse(task, digest)
        return answer(user_tasks(user).get(pk=task.pk), request, 201, replayed=True)
    return answer(user_tasks(user).get(pk=task.pk), request, 201, replayed=False if idempotency_key else None)


def storage_full(exc):
    """
    The user's storage quota is used up: 403 without Retry-After. Not the contract's 429 `queue_full`, which the
    SDKs retry at the Retry-After pace: no wait frees storage, only deleting files or a larger quota does.
    """
    return ApiError(403, exc.code, exc.message, exc.details)


def encode_cursor(task):
    return base64.urlsafe_b64encode(f"{task.created_at.isoformat()}|{task.pk}".encode()).decode().rstrip("=")


def decode_cursor(cursor):
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, _, pk = text.partition("|")
        return datetime.fromisoformat(created), uuid.UUID(pk)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ApiError(422, "invalid_cursor", "The cursor was not made by this hub; start again without one.") from None


@router.get("", url_name="jobs_list", summary="The caller's jobs, newest first")
def list_jobs(request, limit: int = PAGE_DEFAULT, cursor: str | None = None, status: str | None = None):
    """
    Filters: `status` (one or more of the contract's names, comma-separated) and `metadata[<key>]=<value>` (every
    given label must match). Paging: `limit` (1 to 100) per page; `next_cursor` leads to the next page and is
    absent on the last one.
    """
    if not 1 <= limit <= PAGE_MAX:
        raise ApiError(422, "invalid_request", f"limit must be between 1 and {PAGE_MAX}.", {"limit": str(limit)})
    tasks = user_tasks(request.auth).order_by("-created_at", "-pk")
    if status:
        names = [name.strip() for name in status.split(",") if name.strip()]
        unknown = [name for name in names if name not in STATUS_FILTERS]
        if unknown or not names:
            raise ApiError(
                422, "invalid_request", "Unknown status.", {"status": f"use one of {', '.join(STATUS_FILTERS)}"}
            )
        wanted = Q(pk__in=())
        for name in names:
            wanted |= STATUS_FILTERS[name]
        tasks = tasks.filter(wanted)
    labels = {}
    for name, value in request.GET.items():
        match = re.fullmatch(r"metadata\[(.*)\]", name)
        if match:
            labels[match.group(1)] = value
        elif name.startswith("metadata"):
            raise ApiError(422, "invalid_metadata_filter", "Filter labels as metadata[<key>]=<value>.")
    check_labels(labels, code="invalid_metadata_filter")
    for number, (key, value) in enumerate(labels.items()):
        tasks = tasks.alias(**{f"label_{number}": KeyTransform(key, "metadata")}).filter(
            **{f"label_{number}": value}
        )
    if cursor:
        created, pk = decode_cursor(cursor)
        tasks = tasks.filter(Q(created_at__lt=created) | Q(created_at=created, pk__lt=pk))
    page = list(tasks[: limit + 1])
    body = {"jobs": [job_item(task) for task in page[:limit]]}
    if len(page) > limit:
        body["next_cursor"] = encode_cursor(page[limit - 1])
    return body


@router.get("/{uuid:job_id}", url_name="job", summary="The job: the authoritative state, outputs and links")
def get_job(request, job_id: uuid.UUID):
    return answer(own_task(request, job_id), request)


@router.get("/{uuid:job_id}/workflow", url_name="job_workflow", summary="The workflow graph the job runs")
def get_workflow(request, job_id: uuid.UUID):
    task = own_task(request, job_id)
    # Without the private filename prefixes the hub gave the job's outputs: the graph as the caller would send it.
    return {"workflow": plain_output_names(task.graph), "format": "api"}


@router.post("/{uuid:job_id}/cancel", url_name="job_cancel", summary="Request cancellation")
def cancel(request, job_id: uuid.UUID):
    """A queued job is canceled at once; a running one is `canceling` until its server has stopped it."""
    task = own_task(request, job_id)
    asked = task.cancel_requested_at is None and task.status != TaskStatus.QUEUED
    task.request_cancel()  # a finished job stays as it is: canceling it is a no-op, as the contract says
    task = user_tasks(request.auth).get(pk=task.pk)
    if asked and task.is_active and task.cancel_requested_at is not None:
        emit_task_update(task)  # open event streams and windows show `canceling` now, not when it has stopped
    return answer(task, request)
