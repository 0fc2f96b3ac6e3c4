"""
The v2 surface: a NinjaAPI with bearer comfyhub tokens and the contract's error envelope on every error,
`{"error": {"code", "message", "details"}}`, with the contract's codes (unauthorized, not_found, queue_full...).
"""

import logging
from functools import wraps

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import Http404
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.security import HttpBearer

from comfyhub.ratelimit import count_wrong_token, wait_message
from tasks.models import ApiToken
from tasks.storage import StorageUnavailable
from tasks.v2.assets import ErrorBody
from tasks.v2.assets import router as assets_router
from tasks.v2.errors import ApiError, envelope
from tasks.v2.events import router as jobs_router  # the job routes, with the event stream added
from tasks.validators import JsonBodyParser

logger = logging.getLogger(__name__)


class TokenAuth(HttpBearer):
    """
    A comfyhub API token. A wrong one is counted against the client's address (comfyhub/ratelimit.py, as v1
    counts); once the address has used up its failures it is answered 429 until the window ends. A valid token
    always passes: see tasks/api_base.py for why.
    """

    def authenticate(self, request, token):
        found = ApiToken.authenticate_token(token.strip()) if token.strip() else None
        if found is not None:
            request.user, request.api_token = found.user, found  # the token's webhook settings apply to its jobs
            return found.user
        wait = count_wrong_token(request)
        if wait:
            raise ApiError(429, "too_many_attempts", wait_message(wait), headers={"Retry-After": str(wait)})
        raise ApiError(401, "unauthorized", "The bearer token is unknown or revoked.")


def refused(exc):
    """A body the hub's input rules refuse: the contract's 422 invalid_request, saying what and where."""
    return ApiError(422, "invalid_request", exc.message, exc.details or None)


ERRORS = {
    "401": "No bearer token, or one that is unknown or revoked (`unauthorized`).",
    "403": "Not allowed: a raw workflow graph without the permission to send one (`forbidden`).",
    "404": "Not found, or not yours: another user's job or asset is a 404 too, with the same message (`not_found`).",
    "409": "The request conflicts with the object's state.",
    "422": "The request is not valid: `details` names each offending field (`invalid_request` and the like).",
    "429": "Too many failed token attempts from this address (`too_many_attempts`), or the caller's queue is full "
    "(`queue_full`); Retry-After says when to try again.",
}


class HubNinjaAPI(NinjaAPI):
    """
    The generated document, with the errors every operation may answer in the envelope: ninja lists only the
    statuses a route declares, and the routes raise ApiError rather than declare each one.
    """

    def get_openapi_schema(self, *args, **kwargs):
        document = super().get_openapi_schema(*args, **kwargs)
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        schemas.setdefault("ErrorBody", ErrorBody.model_json_schema())
        schemas["ErrorOut"] = {
            "type": "object",
            "title": "ErrorOut",
            "required": ["error"],
            "properties": {"error": {"$ref": "#/components/schemas/ErrorBody"}},
        }
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
        for path, operations in document["paths"].items():
            for method, operation in operations.items():
                statuses = ["422"]
                if operation.get("security"):
                    statuses += ["401", "429"]
                if "{" in path:
                    statuses.append("404")
                if (method, path) == ("post", "/api/v2/jobs"):
                    statuses += ["403", "409"]
                if method == "post" and path.endswith("/cancel"):
                    statuses.append("409")
                responses = operation.setdefault("responses", {})
                for status in statuses:
                    # A HEAD answer has no body: its status is the whole answer.
                    described = {"description": ERRORS[status]} if method == "head" else {"content": error}
                    responses.setdefault(status, {"description": ERRORS[status], **described})
                if method == "head":
                    responses["404"] = {"description": ERRORS["404"]}
        return document


api = HubNinjaAPI(
    title="comfyhub — Comfy API v2",
    version="2",
    description="Comfy-Org's Comfy API v2 job contract, served over the hub's whole pool of ComfyUI servers.",
    urls_namespace="api-v2",
    auth=TokenAuth(),
    parser=JsonBodyParser(refuse=refused),
    docs_url=None,
)


@api.exception_handler(ApiError)
def api_error(request, exc):
    return exc.response()


@api.exception_handler(AuthenticationError)
def not_authenticated(request, exc):
    return envelope(401, "unauthorized", "Send an Authorization: Bearer <comfyhub API token> header.")


@api.exception_handler(ValidationError)
def invalid(request, exc):
    details = {}
    for problem in exc.errors:
        place = ".".join(str(part) for part in problem.get("loc", ()) if part not in ("body", "payload"))
        details.setdefault(place or "request", problem.get("msg", "is not valid"))
    return envelope(422, "invalid_request", "The request is not valid.", details)


@api.exception_handler(Http404)
def not_found(request, exc):
    return envelope(404, "not_found", "Not found.")


@api.exception_handler(HttpError)
def http_error(request, exc):
    if isinstance(exc.__cause__, ApiError):  # ninja wraps what the body parser raised
        return exc.__cause__.response()
    return envelope(exc.status_code, "error", exc.message)


@api.exception_handler(StorageUnavailable)
def storage_unavailable(request, exc):
    logger.warning("API v2 %s %s: %s", request.method, request.path, exc)
    message = "Hub storage did not answer; nothing was changed. Try again shortly."
    response = envelope(503, "service_unavailable", message)
    response["Retry-After"] = "5"
    return response


@api.exception_handler(Exception)
def server_error(request, exc):
    # Logged with its traceback for the operators; the client gets the envelope without one.
    logger.exception("API v2 %s %s failed", request.method, request.path, exc_info=exc)
    return envelope(500, "server_error", "Something went wrong on the hub; it has been logged.")


@api.get("/health", auth=None, tags=["health"])
def health(request):
    """Whether the hub answers: a liveness check for clients and load balancers."""
    return {"status": "ok"}


api.add_router("/jobs", jobs_router)
api.add_router("", assets_router)  # its paths start with /assets


def method_not_allowed(response):
    """Ninja answers a wrong method in plain text; the contract wants its envelope on every error."""
    if response.status_code != 405 or response.get("Content-Type", "").startswith("application/json"):
        return response
    allowed = response.get("Allow", "")
    return envelope(405, "method_not_allowed", f"Use {allowed} here.", headers={"Allow": allowed})


def enveloped(view):
    if iscoroutinefunction(view):

        async def answer(request, *args, **kwargs):
            return method_not_allowed(await view(request, *args, **kwargs))

        answer = markcoroutinefunction(answer)
    else:

        def answer(request, *args, **kwargs):
            return method_not_allowed(view(request, *args, **kwargs))

    return wraps(view)(answer)  # keeps csrf_exempt: bearer tokens are not ambient credentials


def urls():
    """The URL patterns to mount at api/v2/."""
    patterns, app_name, namespace = api.urls
    for pattern in patterns:
        pattern.callback = enveloped(pattern.callback)
    return patterns, app_name, namespace
