"""
JSON API v1's NinjaAPI: session or `Authorization: Bearer <token>` auth (session writes need the CSRF header), and
every error in `{"error": {"code", "message", "details"}}`. Its routes are in tasks/api.py.
"""

import logging
from functools import wraps

from django.core.exceptions import BadRequest, PermissionDenied, RequestDataTooBig, SuspiciousOperation
from django.http import Http404, HttpResponseServerError, JsonResponse
from django.http.multipartparser import MultiPartParserError
from django.middleware.csrf import CsrfViewMiddleware
from django.template import loader
from django.urls import path
from django.views import defaults
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.security import APIKeyCookie, HttpBearer

from comfyhub.ratelimit import count_wrong_token, wait_message
from tasks.models import ApiToken
from tasks.storage import StorageUnavailable
from tasks.validators import JsonBodyParser

logger = logging.getLogger(__name__)


def error(status, code, message, details=None):
    return JsonResponse(
        {"error": {"code": code, "message": message, "details": details or {}}}, status=status
    )


class ApiError(Exception):
    """An answer in the error shape, raised from anywhere under a view; the API's handler answers it."""

    def __init__(self, status, code, message, details=None, headers=None):
        super().__init__(message)
        self.response = error(status, code, message, details)
        for name, value in (headers or {}).items():
            self.response[name] = value


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


def invalid_token(request):
    """401 for an invalid token; 429 with Retry-After once its address has sent too many within the window."""
    wait = count_wrong_token(request)
    if wait:
        return ApiError(429, "too_many_attempts", wait_message(wait), headers={"Retry-After": str(wait)})
    return ApiError(401, "invalid_token", "The bearer token is missing, unknown or revoked.")


class BearerToken(HttpBearer):
    """A token from create_token. Any Authorization header is taken as a token: a wrong one is never passed over."""

    def __call__(self, request):
        header = request.headers.get("Authorization", "")
        if not header:
            return None  # the session may still authenticate
        scheme, _, token = header.partition(" ")
        row = ApiToken.authenticate_token(token.strip()) if scheme.lower() == "bearer" and token else None
        if row is None:
            raise invalid_token(request)
        # A valid token always passes, whatever other clients behind the same address sent: with 256 random
        # bits a token cannot be guessed, so refusing right ones would only let guessers lock out the
        # integrators who share their address (a NAT, a CI fleet).
        request.api_token, request.user = row, row.user
        return row.user

    def authenticate(self, request, token):  # __call__ does it all; ninja asks for the method
        return None


class BrowserSession(APIKeyCookie):
    """The signed-in browser's session; a write (anything but GET, HEAD, OPTIONS) also needs the CSRF header."""

    param_name = "sessionid"

    def __call__(self, request):
        if not request.user.is_authenticated:
            return None
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            try:
                refused = CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {})
            except MultiPartParserError:
                # The check reads the form's csrfmiddlewaretoken, and so parses the body first.
                raise ApiError(400, "bad_request", "The request could not be read.") from None
            if refused is not None:
                raise ApiError(403, "csrf_failed", "The CSRF check failed: send the X-CSRFToken header.")
        return request.user

    def authenticate(self, request, key):  # __call__ does it all; ninja asks for the method
        return None


api = NinjaAPI(
    title="comfyhub JSON API",
    version="1",
    description=(
        "Submit ComfyUI workflows to the hub and follow them. Authenticate with `Authorization: Bearer <token>` "
        "(`manage.py create_token USERNAME`) or a browser session, whose writes need the `X-CSRFToken` header. "
        'Every error is `{"error": {"code", "message", "details"}}`.'
    ),
    urls_namespace="api-v1",
    auth=[BearerToken(), BrowserSession()],
    parser=JsonBodyParser(refuse=lambda exc: ApiError(400, exc.code, exc.message, exc.details)),
    openapi_url=None,  # served by a route of its own in tasks/api.py, under the URL name the code reverses
    docs_url=None,
)

FAILURES = [
    (RequestDataTooBig, 413, "too_large", "The request body is too large."),
    (SuspiciousOperation, 400, "bad_request", "The request could not be read."),
    (MultiPartParserError, 400, "bad_request", "The request could not be read."),
    (BadRequest, 400, "bad_request", "The request could not be read."),
    (Http404, 404, "not_found", "There is nothing here, or it is not yours."),
    (PermissionDenied, 403, "forbidden", "You may not do that."),
    (AuthenticationError, 401, "not_authenticated", "Log in or send an Authorization: Bearer token."),
]
for kind, status, code, message in FAILURES:
    api.add_exception_handler(kind, lambda request, exc, answer=(status, code, message): error(*answer))


@api.exception_handler(ApiError)
def api_error(request, exc):
    return exc.response


@api.exception_handler(ValidationError)
def invalid(request, exc):
    details = {}
    for problem in exc.errors:
        place = ".".join(str(part) for part in problem.get("loc", ()) if part not in ("body", "payload", "query"))
        details.setdefault(place or "request", problem.get("msg", "is not valid"))
    return error(400, "invalid", "The request is not valid: see details for each parameter.", details)


@api.exception_handler(HttpError)
def http_error(request, exc):
    if isinstance(exc.__cause__, ApiError):  # ninja wraps what the body parser raised
        return exc.__cause__.response
    return error(exc.status_code, "error", exc.message)


@api.exception_handler(StorageUnavailable)
def storage_unavailable(request, exc):
    logger.warning("API %s %s: %s", request.method, request.path, exc)
    response = error(503, "storage_unavailable", "Hub storage did not answer; nothing was changed. Try again shortly.")
    response["Retry-After"] = "5"
    return response


@api.exception_handler(Exception)
def crashed(request, exc):
    # Logged with its traceback for the operators; the client gets JSON without one.
    logger.exception("API %s %s failed", request.method, request.path, exc_info=exc)
    return error(500, "server_error", "Something went wrong on the hub; it has been logged.")


def method_not_allowed(view):
    """Ninja answers a wrong method in plain text; the API answers it in its error shape."""

    @wraps(view)  # keeps csrf_exempt: the session's writes are checked by BrowserSession
    def answer(request, *args, **kwargs):
        response = view(request, *args, **kwargs)
        if response.status_code != 405 or response.get("Content-Type", "").startswith("application/json"):
            return response
        allowed = [method.strip() for method in response.get("Allow", "").split(",") if method.strip()]
        return error(405, "method_not_allowed", f"This address answers {' or '.join(allowed)} only.")

    return answer


def urls():
    """
    The URL patterns to mount at api/v1/, without a namespace: the code reverses "api-tasks" and the like. Ninja
    makes one pattern per operation (GET and POST /tasks share a view) and its own `uuidstr` converter; the
    patterns keep Django's `uuid` converter (ninja's path model takes the UUID as it comes) and one per path.
    """
    patterns, seen = [], set()
    for pattern in api.urls[0]:
        route = str(pattern.pattern).replace("<uuidstr:", "<uuid:")
        if pattern.name == "api-root" or route in seen:
            continue  # the root is ninja's docs home, which v1 does not serve
        seen.add(route)
        patterns.append(path(route, method_not_allowed(pattern.callback), name=pattern.name))
    return patterns
