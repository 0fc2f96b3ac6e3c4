"""JSON API v1: session or `Authorization: Bearer <token>` auth; another user's objects are 404."""

import logging
from functools import wraps

from django import forms
from django.conf import settings
from django.core.exceptions import BadRequest, PermissionDenied, RequestDataTooBig, SuspiciousOperation
from django.http import Http404, HttpResponseServerError, JsonResponse
from django.http.multipartparser import MultiPartParserError
from django.middleware.csrf import CsrfViewMiddleware
from django.template import loader
from django.urls import reverse
from django.views import defaults
from django.views.decorators.csrf import csrf_exempt

from comfyhub.ratelimit import TOKEN_BY_ADDRESS, client_address, wait_message
from tasks.downloads import output_response, own_outputs
from tasks.models import STATUS_FILTERS, ApiToken, TaskStatus, Workflow
from tasks.params import describe
from tasks.submission import IdempotencyConflict, QuotaExceeded, create_task, describe_size, store_upload, user_tasks
from tasks.validators import BindingError, parse_json_body
from tasks.views import public_details, public_text, server_hosts

logger = logging.getLogger(__name__)

MAX_LIST = 200
DEFAULT_LIST = 50
MAX_OFFSET = 10**9


def error(status, code, message, details=None):
    return JsonResponse(
        {"error": {"code": code, "message": message, "details": details or {}}}, status=status
    )


class ApiError(Exception):
    """An answer in the error shape, raised from anywhere under a view; api_view turns it into the response."""

    def __init__(self, status, code, message, details=None):
        super().__init__(message)
        self.response = error(status, code, message, details)


def own(queryset, pk, noun):
    """
    One of the user's own objects (`queryset` is already filtered to the user), or a 404 that reads the same
    whether the object belongs to someone else or does not exist at all.
    """
    found = queryset.filter(pk=pk).first()
    if found is None:
        raise ApiError(404, "not_found", f"There is no {noun} with this id.")
    return found


def page_not_found(request, exception=None):
    """The site's 404 (handler404): JSON under /api/ (a malformed id, a typo), the HTML page elsewhere."""
    if request.path.startswith("/api/"):
        described = "/api/v2/openapi.json" if request.path.startswith("/api/v2/") else "/api/v1/openapi.json"
        return error(404, "not_found", f"There is nothing at this address; the API is described at {described}.")
    return defaults.page_not_found(request, exception)


def server_error(request):
    """
    The site's 500 (handler500): JSON under /api/, the HTML page elsewhere. The page is drawn with the request
    (navigation for the signed-in user) when that works; when it fails too (the database may be what broke, and the
    user and the running count come from it), Django's handler draws the same template without a request.
    """
    if request.path.startswith("/api/"):
        return error(500, "server_error", "Something went wrong on the hub; it has been logged.")
    try:
        body = loader.render_to_string(defaults.ERROR_500_TEMPLATE_NAME, request=request)
    except Exception:
        logger.exception("the error page could not be drawn with its request; drawn without it")
        return defaults.server_error(request)
    return HttpResponseServerError(body)


def api_view(*methods):
    """Authenticate by bearer token or session (with CSRF for session writes) and answer errors in JSON."""

    def decorate(view):
        @csrf_exempt
        @wraps(view)
        def wrapper(request, *args, **kwargs):
            if request.method not in methods:
                return error(405, "method_not_allowed", f"This address answers {' or '.join(methods)} only.")
            header = request.headers.get("Authorization", "")
            if header:
                scheme, _, token = header.partition(" ")
                row = ApiToken.authenticate_token(token.strip()) if scheme.lower() == "bearer" and token else None
                if row is None:
                    return invalid_token(request)
                request.api_token, user = row, row.user
                # A valid token always passes, whatever other clients behind the same address sent: with 256
                # random bits a token cannot be guessed, so refusing right ones would only let guessers lock
                # out the integrators who share their address (a NAT, a CI fleet).
                request.user = user
            elif not request.user.is_authenticated:
                return error(401, "not_authenticated", "Log in or send an Authorization: Bearer token.")
            elif request.method not in ("GET", "HEAD", "OPTIONS"):
                try:
                    refused = CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {})
                except MultiPartParserError:
                    # The check reads the form's csrfmiddlewaretoken, and so parses the body first.
                    return error(400, "bad_request", "The request could not be read.")
                if refused is not None:
                    return error(403, "csrf_failed", "The CSRF check failed: send the X-CSRFToken header.")
            try:
                return view(request, *args, **kwargs)
            except ApiError as exc:
                return exc.response
            except RequestDataTooBig:
                return error(413, "too_large", "The request body is too large.")
            except (SuspiciousOperation, MultiPartParserError, BadRequest):
                return error(400, "bad_request", "The request could not be read.")
            except Http404:
                return error(404, "not_found", "There is nothing here, or it is not yours.")
            except PermissionDenied:
                return error(403, "forbidden", "You may not do that.")
            except Exception:
                # Logged with its traceback for the operators; the client gets JSON without one.
                logger.exception("API %s %s failed", request.method, request.path)
                return error(500, "server_error", "Something went wrong on the hub; it has been logged.")

        return wrapper

    return decorate


def invalid_token(request):
    """401 for an invalid token; 429 with Retry-After once its address has sent too many within the window."""
    address = client_address(request)
    wait = TOKEN_BY_ADDRESS.retry_after(address)
    if wait:
        # Not counted: the window still ends when the answer says, however often a broken client retries.
        response = error(429, "too_many_attempts", wait_message(wait))
        response["Retry-After"] = str(wait)
        return response
    TOKEN_BY_ADDRESS.fail(address)
    return error(401, "invalid_token", "The bearer token is missing, unknown or revoked.")


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


@api_view("GET", "POST")
def tasks_collection(request):
    if request.method == "POST":
        try:
            body = parse_json_body(request)
            task, created = create_task(request.user, body, token=getattr(request, "api_token", None))
        except BindingError as exc:
            return error(400, exc.code, exc.message, exc.details)
        except PermissionError as exc:
            return error(403, "forbidden", str(exc))
        except QuotaExceeded as exc:
            return error(429, "too_many_tasks", str(exc))
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


@api_view("GET")
def task_detail(request, pk):
    return JsonResponse(task_json(own(user_tasks(request.user), pk, "task"), request))


ALREADY_ENDED = {
    TaskStatus.SUCCEEDED: "The task has already succeeded; there is nothing to cancel.",
    TaskStatus.FAILED: "The task has already failed; there is nothing to cancel.",
    TaskStatus.CANCELLED: "The task has already been cancelled.",
}


@api_view("POST")
def task_cancel(request, pk):
    task = own(user_tasks(request.user), pk, "task")
    if not task.request_cancel():
        task.refresh_from_db(fields=["status"])
        # Queued when read, sent to a server before the cancel landed: ask again, now of its server.
        if not (task.is_active and task.request_cancel()):
            message = ALREADY_ENDED.get(task.status, f"The task is {task.status} and cannot be cancelled.")
            return error(409, "not_active", message)
    return JsonResponse(task_json(user_tasks(request.user).get(pk=pk), request))


@api_view("GET")
def output_file(request, pk):
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


@api_view("GET")
def workflows_collection(request):
    workflows = [workflow_json(workflow) for workflow in Workflow.objects.filter(enabled=True)]
    return JsonResponse({"count": len(workflows), "workflows": workflows})


@api_view("GET")
def workflow_detail(request, slug):
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


@api_view("POST")
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
    except BindingError as exc:
        return error(400, "invalid", exc.message, exc.details)
    return JsonResponse(upload_json(row), status=201)
