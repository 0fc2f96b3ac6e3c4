"""JSON API v1: session or `Authorization: Bearer <token>` auth; another user's objects are 404."""

import hashlib
import io
import json
import uuid
from functools import wraps

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.core.files.base import ContentFile
from django.db import IntegrityError, transaction
from django.http import FileResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt
from PIL import Image, UnidentifiedImageError

from servers.upstream import wake_supervisors
from tasks.models import ApiToken, Task, TaskEvent, TaskOutput, TaskStatus, Upload, Workflow
from tasks.params import BindingError, bind

UPLOAD_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
MAX_LIST = 200


def error(status, code, message, details=None):
    return JsonResponse({"error": {"code": code, "message": message, "details": details or {}}}, status=status)


def api_view(*methods):
    """Authenticate by bearer token or session (with CSRF for session writes) and answer errors in JSON."""

    def decorate(view):
        @csrf_exempt
        @wraps(view)
        def wrapper(request, *args, **kwargs):
            if request.method not in methods:
                return error(405, "method_not_allowed", f"Use {' or '.join(methods)} here.")
            header = request.headers.get("Authorization", "")
            if header:
                scheme, _, token = header.partition(" ")
                user = ApiToken.authenticate(token.strip()) if scheme.lower() == "bearer" and token else None
                if user is None:
                    return error(401, "invalid_token", "The bearer token is missing, unknown or revoked.")
                request.user = user
            elif not request.user.is_authenticated:
                return error(401, "not_authenticated", "Log in or send an Authorization: Bearer token.")
            elif request.method not in ("GET", "HEAD", "OPTIONS"):
                refused = CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {})
                if refused is not None:
                    return error(403, "csrf_failed", "CSRF check failed: send the X-CSRFToken header.")
            try:
                return view(request, *args, **kwargs)
            except RequestDataTooBig:
                return error(413, "too_large", "The request body is too large.")

        return wrapper

    return decorate


def iso(value):
    return value.isoformat() if value else None


def task_json(task, request=None):
    outputs = [
        {
            "id": str(out.pk),
            "filename": out.filename,
            "content_type": out.content_type,
            "size": out.size,
            "sha256": out.sha256,
            "node_id": out.node_id,
            "url": reverse("api-output", args=[out.pk]),
        }
        for out in task.outputs.all()
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
        "error": (
            {"kind": task.error_kind, "message": task.error, "details": task.error_details} if task.error else None
        ),
        "cancel_requested": task.cancel_requested_at is not None,
        "outputs": outputs,
        "created_at": iso(task.created_at),
        "submitted_at": iso(task.submitted_at),
        "started_at": iso(task.started_at),
        "finished_at": iso(task.finished_at),
    }


def user_tasks(user):
    return Task.objects.filter(owner=user).select_related("workflow", "server").prefetch_related("outputs")


def parse_json_body(request):
    if not request.content_type or request.content_type != "application/json":
        raise BindingError("Send a JSON body with Content-Type: application/json.")
    try:
        body = json.loads(request.body or b"null")
    except (ValueError, RecursionError):
        raise BindingError("The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise BindingError("The body must be a JSON object.")
    return body


def validate_graph(graph):
    if not isinstance(graph, dict) or not graph:
        return "prompt must be a non-empty object of nodes in ComfyUI's API format"
    for node_id, node in graph.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            return f"node {node_id} needs a class_type"
        if not isinstance(node.get("inputs", {}), dict):
            return f"node {node_id} has inputs that are not an object"
    return None


def create_task(user, body):
    """Validate a submission and create its task; returns (task, created) or raises BindingError / PermissionError."""
    allowed = {"workflow", "inputs", "prompt", "idempotency_key", "priority"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BindingError("Unknown fields.", {name: "is not a field of a task" for name in unknown})
    key = body.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 200):
        raise BindingError("Invalid idempotency_key.", {"idempotency_key": "must be a string of 1 to 200 characters"})
    if key is not None:
        existing = user_tasks(user).filter(idempotency_key=key).first()
        if existing is not None:
            return existing, False
    priority = body.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise BindingError("Invalid priority.", {"priority": "must be a whole number"})
    if priority > 0 and not user.is_staff:
        raise PermissionError("Only staff may raise a task's priority.")
    has_workflow, has_prompt = body.get("workflow") is not None, body.get("prompt") is not None
    if has_workflow == has_prompt:
        raise BindingError("Send either a workflow with inputs or a prompt graph.", {"workflow": "or prompt is required"})
    workflow, inputs, images = None, {}, []
    if has_workflow:
        slug = body["workflow"]
        workflow = Workflow.objects.filter(slug=slug, enabled=True).first() if isinstance(slug, str) else None
        if workflow is None:
            raise BindingError("Unknown workflow.", {"workflow": f"there is no workflow {slug!r}"})
        graph, inputs, images = bind(
            workflow.graph,
            workflow.parameters,
            body.get("inputs") or {},
            lambda pk: Upload.objects.filter(owner=user, pk=pk).first(),
        )
    else:
        if not user.has_perm("tasks.submit_raw_graph"):
            raise PermissionError("You may not submit raw graphs; pick a workflow.")
        graph = body["prompt"]
        problem = validate_graph(graph)
        if problem:
            raise BindingError("The prompt is not a ComfyUI graph.", {"prompt": problem})
        if body.get("inputs"):
            raise BindingError("Inputs only apply to a workflow.", {"inputs": "only with a workflow"})
    try:
        with transaction.atomic():
            task = Task.objects.create(
                owner=user,
                workflow=workflow,
                inputs=inputs,
                graph=graph,
                image_inputs=images,
                idempotency_key=key,
                priority=priority,
            )
            TaskEvent.objects.create(task=task, kind="created", to_status=TaskStatus.QUEUED)
            transaction.on_commit(wake_supervisors)
    except IntegrityError:
        # The same idempotency key arrived twice at once: the other request created the task.
        return user_tasks(user).get(idempotency_key=key), False
    from tasks.progress import emit_task_update

    emit_task_update(task)
    return task, True


@api_view("GET", "POST")
def tasks_collection(request):
    if request.method == "POST":
        try:
            task, created = create_task(request.user, parse_json_body(request))
        except BindingError as exc:
            return error(400, "invalid", exc.message, exc.details)
        except PermissionError as exc:
            return error(403, "forbidden", str(exc))
        task = user_tasks(request.user).get(pk=task.pk)
        return JsonResponse(task_json(task), status=201 if created else 200)
    tasks = user_tasks(request.user)
    status = request.GET.get("status")
    if status:
        if status not in TaskStatus.values:
            return error(400, "invalid", "Unknown status.", {"status": f"use one of {', '.join(TaskStatus.values)}"})
        tasks = tasks.filter(status=status)
    try:
        limit = min(int(request.GET.get("limit", 50)), MAX_LIST)
        offset = max(int(request.GET.get("offset", 0)), 0)
    except ValueError:
        return error(400, "invalid", "limit and offset must be whole numbers.")
    return JsonResponse(
        {"count": tasks.count(), "tasks": [task_json(task) for task in tasks[offset : offset + max(limit, 0)]]}
    )


@api_view("GET")
def task_detail(request, pk):
    return JsonResponse(task_json(get_object_or_404(user_tasks(request.user), pk=pk)))


@api_view("POST")
def task_cancel(request, pk):
    task = get_object_or_404(user_tasks(request.user), pk=pk)
    if not task.request_cancel():
        return error(409, "not_active", f"The task is {task.status}; only an active task can be cancelled.")
    return JsonResponse(task_json(user_tasks(request.user).get(pk=pk)))


@api_view("GET")
def output_file(request, pk):
    output = get_object_or_404(TaskOutput.objects.filter(task__owner=request.user), pk=pk)
    response = FileResponse(
        output.file.open("rb"),
        content_type=output.content_type,
        as_attachment=request.GET.get("download") == "1",
        filename=output.filename,
    )
    response["X-Content-Type-Options"] = "nosniff"
    return response


def read_image(upload):
    """Return (bytes, format, width, height) of an uploaded image, or raise BindingError."""
    limit = settings.COMFYHUB["MAX_UPLOAD_BYTES"]
    if upload.size > limit:
        raise BindingError("The image is too large.", {"image": f"must be at most {limit // (1024 * 1024)} MiB"})
    data = upload.read()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height) = image.format, image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise BindingError("The file is not an image.", {"image": "must be a PNG, JPEG or WebP image"}) from None
    if fmt not in UPLOAD_FORMATS:
        raise BindingError("Unsupported image format.", {"image": "must be a PNG, JPEG or WebP image"})
    return data, fmt, width, height


def store_upload(user, upload):
    data, fmt, width, height = read_image(upload)
    row = Upload(
        id=uuid.uuid4(),
        owner=user,
        original_name=(upload.name or "image")[:255],
        content_type=UPLOAD_FORMATS[fmt],
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        width=width,
        height=height,
    )
    row.file.save(row.remote_name, ContentFile(data), save=False)
    row.save()
    return row


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


@api_view("POST")
def uploads_collection(request):
    upload = request.FILES.get("image") or request.FILES.get("file")
    if upload is None:
        return error(400, "invalid", "Send the image as multipart form field 'image'.", {"image": "is required"})
    try:
        row = store_upload(request.user, upload)
    except BindingError as exc:
        return error(400, "invalid", exc.message, exc.details)
    return JsonResponse(upload_json(row), status=201)
