"""
The v2 assets on their own API object, mounted at /api/v2/ until they join the v2 API's (tasks/v2/api.py); the
handlers answer ninja's own errors in the contract's envelope.
"""

from django.http import Http404
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, ValidationError

from tasks.v2.assets import error, router
from tasks.v2.auth import TokenAuth

api = NinjaAPI(urls_namespace="api-v2-assets", title="comfyhub Comfy API v2 (assets)", version="2", auth=TokenAuth())
api.add_router("", router)


@api.exception_handler(AuthenticationError)
def unauthorized(request, exc):
    response = error(401, "unauthorized", "Send Authorization: Bearer <your comfyhub API token>.")
    response["WWW-Authenticate"] = "Bearer"
    return response


@api.exception_handler(ValidationError)
def invalid(request, exc):
    details = {".".join(str(part) for part in e["loc"]): e["msg"] for e in exc.errors}
    return error(422, "invalid_request", "The request is not valid: see details.", details)


@api.exception_handler(Http404)
def missing(request, exc):
    return error(404, "not_found", "Not found.")
