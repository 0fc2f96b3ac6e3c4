"""JSON API v1's routes, on the NinjaAPI of tasks/api_base.py; another user's objects are 404."""

import uuid

from django import forms
from django.conf import settings
from django.http import Http404, JsonResponse
from django.urls import reverse

from tasks.api_base import ApiError, api, error, own
from tasks.api_schemas import (
    TaskIn,
    TaskListOut,
    TaskOut,
    UploadOut,
    WorkflowListOut,
    WorkflowOut,
    errors,
)
from tasks.downloads import output_response, own_outputs
from tasks.models import STATUS_FILTERS, TaskStatus, Workflow
from tasks.params import describe
from tasks.quota import StorageFull
from tasks.submission import IdempotencyConflict, QuotaExceeded, create_task, describe_size, store_upload, user_tasks
from tasks.validators import BindingError, parse_json_body
from tasks.views import public_details, public_text, server_hosts

MAX_LIST = 200
DEFAULT_LIST = 50
MAX_OFFSET = 10**9


def iso(value):
    return value.isoformat() if value else None


def task_json(task, request=None, outputs=None):
    """The task as its owner sees it. Only staff see error details raw: they may hold tracebacks and server URLs."""
    outputs = [
        {
            "id": str(out.pk),
            "filename": out.display_name,
            "content_type": out.content_type,
            "size": out.size,
            "sha256": out.sha256,
            "node_id": out.node_id,
            "url": reverse("api-output", args=[out.pk]),
        }
        for out in (task.outputs.all() if outputs is None else outputs)
    ]
    return {
        "id": str(task.pk),
        "status": task.status,
        "progress": round(task.progress, 4),
        "workflow": task.workflow.slug if task.workflow else None,
        "inputs": task.inputs,
        "server": task.server.name if task.server else None,
        "prompt_id": task.prompt_id,
        "attempts": task.attempts,
        "priority": task.priority,
        "error": error_json(task, staff=request is not None and request.user.is_staff),
        "cancel_requested": task.cancel_requested_at is not None,
        "waiting_reason": task.waiting_reason or None,
        "outputs": outputs,
        "created_at": iso(task.created_at),
        "submitted_at": iso(task.submitted_at),
        "started_at": iso(task.started_at),
        "finished_at": iso(task.finished_at),
    }


def error_json(task, staff):
    if not task.error:
        return None
    if staff:
        return {"kind": task.error_kind, "message": task.error, "details": task.error_details}
    hosts = server_hosts(task.server)
    return {
        "kind": task.error_kind,
        "message": public_text(task.error, hosts),
        "details": public_details(task.error_details, hosts),
    }


@api.post(
    "/tasks",
    operation_id="createTask",
    url_name="api-tasks",
    summary="Submit a task.",
    response={201: TaskOut, 200: TaskOut, **errors(400, 403, 409, 413)},
    # The body is read by the hub's parser in the view, not by ninja's model: a wrong field gets the sentence
    # create_task writes for it ("There is no workflow 'x'."), and the model only describes the body.
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": TaskIn.model_json_schema()}}}
    },
)
def create(request):
    try:
        body = parse_json_body(request)
        task, created = create_task(request.user, body, token=getattr(request, "api_token", None))
    except BindingError as exc:
        return error(400, exc.code, exc.message, exc.details)
    except PermissionError as exc:
        return error(403, "forbidden", str(exc))
    except QuotaExceeded as exc:
        return error(429, "too_many_tasks", str(exc))
    except StorageFull as exc:
        # 403, not 429: waiting frees nothing; only deleting files or a larger quota lets the next one in.
        return error(403, exc.code, exc.message, exc.details)
    except IdempotencyConflict as exc:
        return error(
            409,
            "idempotency_key_reused",
            str(exc),
            {"idempotency_key": f"was sent with a different body for task {exc.task.pk}; use a new key"},
        )
    if created:  # as it was just written: no server, no outputs yet
        return JsonResponse(task_json(task, request, outputs=()), status=201)
    task = user_tasks(request.user).get(pk=task.pk)
    return JsonResponse(task_json(task, request), status=200)


LIST_PARAMETERS = [
    {
        "name": "status", "in": "query", "description": "`active`: not ended yet; or one status.",
        "schema": {"type": "string", "enum": list(STATUS_FILTERS)},
    },
    {
        "name": "limit", "in": "query", "description": f"1 to {MAX_LIST}; {DEFAULT_LIST} when absent.",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST, "default": DEFAULT_LIST},
    },
    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0}},
]  # fmt: skip


@api.get(
    "/tasks",
    operation_id="listTasks",
    url_name="api-tasks",
    summary="Your tasks, newest first.",
    response={200: TaskListOut, **errors(400)},
    # Read by TaskListQuery in the view, whose messages are the task page's: described here.
    openapi_extra={"parameters": LIST_PARAMETERS},
)
def list_tasks(request):
    query = TaskListQuery(request.GET)
    if not query.is_valid():
        details = {field: " ".join(messages) for field, messages in query.errors.items()}
        return error(400, "invalid", "The query is not valid: see details for each parameter.", details)
    tasks = user_tasks(request.user)
    if query.cleaned_data["status"]:
        tasks = tasks.with_status(query.cleaned_data["status"])
    limit = query.cleaned_data["limit"] or DEFAULT_LIST
    offset = query.cleaned_data["offset"] or 0
    return JsonResponse(
        {"count": tasks.count(), "tasks": [task_json(task, request) for task in tasks[offset : offset + limit]]}
    )


NUMBER_ERRORS = {
    "invalid": "must be a whole number",
    "min_value": "must be at least %(limit_value)s",
    "max_value": "must be at most %(limit_value)s",
}


class TaskListQuery(forms.Form):
    """The query of GET /api/v1/tasks: the task page's status filters, and a page within bounds."""

    status = forms.ChoiceField(
        choices=[(name, name) for name in STATUS_FILTERS],
        required=False,
        error_messages={"invalid_choice": f"must be one of {', '.join(STATUS_FILTERS)}"},
    )
    limit = forms.IntegerField(min_value=1, max_value=MAX_LIST, required=False, error_messages=NUMBER_ERRORS)
    # Past a 64-bit integer the database driver raises instead of finding nothing.
    offset = forms.IntegerField(min_value=0, max_value=MAX_OFFSET, required=False, error_messages=NUMBER_ERRORS)


@api.get(
    "/tasks/{uuid:pk}",
    operation_id="getTask",
    url_name="api-task",
    summary="One of your tasks.",
    response={200: TaskOut, **errors(404)},
)
def task_detail(request, pk: uuid.UUID):
    return JsonResponse(task_json(own(user_tasks(request.user), pk, "task"), request))


ALREADY_ENDED = {
    TaskStatus.SUCCEEDED: "The task has already succeeded; there is nothing to cancel.",
    TaskStatus.FAILED: "The task has already failed; there is nothing to cancel.",
    TaskStatus.CANCELLED: "The task has already been cancelled.",
}


@api.post(
    "/tasks/{uuid:pk}/cancel",
    operation_id="cancelTask",
    url_name="api-task-cancel",
    summary="Cancel a task: a queued one at once, one on a server is removed from its queue or interrupted.",
    response={200: TaskOut, **errors(403, 404, 409)},
)
def task_cancel(request, pk: uuid.UUID):
    task = own(user_tasks(request.user), pk, "task")
    if not task.request_cancel():
        task.refresh_from_db(fields=["status"])
        # Queued when read, sent to a server before the cancel landed: ask again, now of its server.
        if not (task.is_active and task.request_cancel()):
            message = ALREADY_ENDED.get(task.status, f"The task is {task.status} and cannot be cancelled.")
            return error(409, "not_active", message)
    return JsonResponse(task_json(user_tasks(request.user).get(pk=pk), request))


@api.get(
    "/outputs/{uuid:pk}",
    operation_id="getOutput",
    url_name="api-output",
    summary="An output file of one of your tasks.",
    response=errors(404),
    openapi_extra={
        "parameters": [
            {"name": "download", "in": "query", "description": "1: as an attachment.",
             "schema": {"type": "string", "enum": ["1"]}},
        ],
        "responses": {
            "200": {
                "description": "The file: inline as its checked raster type, else application/octet-stream as an "
                "attachment; always with `X-Content-Type-Options: nosniff` and `Content-Security-Policy: sandbox`. "
                "Its Content-Disposition name is the workflow's slug (`graph` for a raw graph), the seed when the "
                "task has one, and the output's place among the task's outputs from 1: `txt2img-42-1.png`.",
                "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    },
)  # fmt: skip
def output_file(request, pk: uuid.UUID):
    output = own(own_outputs(request.user), pk, "output")
    try:
        return output_response(request, output)
    except Http404 as exc:  # the owner's own output whose file is gone: the sentence is written for them
        raise ApiError(404, "not_found", str(exc)) from None


def workflow_json(workflow):
    return {
        "slug": workflow.slug,
        "name": workflow.name,
        "description": workflow.description,
        "parameters": [describe(param) for param in workflow.parameters],
    }


@api.get(
    "/workflows",
    operation_id="listWorkflows",
    url_name="api-workflows",
    summary="The workflows you may run, with the parameters each takes.",
    response={200: WorkflowListOut, **errors()},
)
def workflows_collection(request):
    workflows = [workflow_json(workflow) for workflow in Workflow.objects.filter(enabled=True)]
    return JsonResponse({"count": len(workflows), "workflows": workflows})


@api.get(
    "/workflows/{slug:slug}",
    operation_id="getWorkflow",
    url_name="api-workflow",
    summary="One workflow and its parameters.",
    response={200: WorkflowOut, **errors(404)},
)
def workflow_detail(request, slug: str):
    workflow = Workflow.objects.filter(enabled=True, slug=slug).first()
    if workflow is None:
        return error(404, "not_found", f"There is no workflow {slug!r}.")
    return JsonResponse(workflow_json(workflow))


UPLOAD_OVERHEAD = 64 * 1024  # multipart boundaries and headers around the image


def upload_json(upload):
    return {
        "id": str(upload.pk),
        "filename": upload.original_name,
        "content_type": upload.content_type,
        "size": upload.size,
        "sha256": upload.sha256,
        "width": upload.width,
        "height": upload.height,
    }


@api.post(
    "/uploads",
    operation_id="createUpload",
    url_name="api-uploads",
    summary="Upload an image for an image input: PNG, JPEG or WebP only.",
    response={201: UploadOut, **errors(400, 403, 413)},
    # Read from request.FILES in the view: the size is checked before Django parses the multipart body.
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {"image": {"type": "string", "format": "binary"}},
                    }
                }
            },
        }
    },
)
def uploads_collection(request):
    limit = settings.COMFYHUB["MAX_UPLOAD_BYTES"]
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > limit + UPLOAD_OVERHEAD:
        # Refused before the multipart body is parsed. Daphne has received it already: only a proxy's body limit
        # stops a huge upload earlier.
        return error(413, "too_large", "The image is too large.", {"image": f"must be at most {describe_size(limit)}"})
    upload = request.FILES.get("image") or request.FILES.get("file")
    if upload is None:
        return error(
            400, "invalid", "Send the image as multipart form field 'image'.", {"image": "is required"}
        )
    try:
        row = store_upload(request.user, upload)
    except StorageFull as exc:
        return error(403, exc.code, exc.message, exc.details)
    except BindingError as exc:
        return error(400, "invalid", exc.message, exc.details)
    return JsonResponse(upload_json(row), status=201)


@api.get(
    "/openapi.json",
    auth=None,
    operation_id="getOpenApi",
    url_name="api-openapi",
    summary="This document.",
    response={200: dict},
)
def openapi_document(request):
    """Public: it describes the API and holds no data."""
    return JsonResponse(api.get_openapi_schema(path_prefix=request.path.removesuffix("openapi.json")))
