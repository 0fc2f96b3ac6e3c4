"""
The OpenAPI 3.1 description of JSON API v1, built as a dict and served at /api/v1/openapi.json (public: it
describes the API, it holds no data). tests/fuzz/test_schemathesis.py runs schemathesis against it, so a change
to an answer of tasks/api.py that is not reflected here fails the tests.
"""

from django.http import JsonResponse
from django.views.decorators.http import require_GET

from tasks.api import DEFAULT_LIST, MAX_LIST, MAX_OFFSET
from tasks.models import STATUS_FILTERS, TaskStatus
from tasks.params import PARAMETER_TYPES, SEED_MAX
from tasks.submission import PRIORITY_LIMIT

ERROR_CODES = {
    400: "Bad input: `details` maps each offending field to a sentence.",
    401: "No credentials, or a bearer token that is unknown or revoked.",
    403: "Not allowed (raw graphs without the permission, raising priority without staff), or a failed CSRF check.",
    404: "Not found, or not yours: another user's task, output or upload is a 404 too, with the same message.",
    409: "Cancel: the task already ended (`not_active`). Submit: the idempotency_key came earlier with another "
    "body (`idempotency_key_reused`).",
    413: "The request body is too large.",
    429: "Too many tasks waiting for this user, or too many failed token attempts from this address.",
}


def _ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema):
    return {"anyOf": [schema, {"type": "null"}]}


def _json(schema, description, **extra):
    return {"description": description, "content": {"application/json": {"schema": schema, **extra}}}


def _errors(*statuses):
    """Responses in the error shape, with the standard ones every authenticated request may get."""
    return {str(status): {"$ref": f"#/components/responses/Error{status}"} for status in sorted({401, 429, *statuses})}


def _uuid_path(description):
    return {
        "name": "id", "in": "path", "required": True, "description": description,
        "schema": {"type": "string", "format": "uuid"},
    }


SCHEMAS = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "additionalProperties": False,
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message", "details"],
                "additionalProperties": False,
                "properties": {
                    "code": {"type": "string", "description": "Stable and machine-readable: `invalid`, `not_found`…"},
                    "message": {"type": "string", "description": "A sentence for a person."},
                    "details": {
                        "type": "object",
                        "description": "For 400: each offending field (or input name) mapped to a sentence.",
                        "additionalProperties": True,
                    },
                },
            }
        },
    },
    "TaskOutput": {
        "type": "object",
        "required": ["id", "filename", "content_type", "size", "sha256", "node_id", "url"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "filename": {
                "type": "string",
                "description": "The name the ComfyUI server gave the file (without the hub's prefix). The file "
                "itself downloads as `<workflow>-<seed>-<n>.<ext>` (Content-Disposition).",
            },
            "content_type": {
                "type": "string",
                "enum": ["image/png", "image/jpeg", "image/webp", "image/gif", "application/octet-stream"],
                "description": "Read by the hub from the file's bytes, whatever the server said: a raster image "
                "(served inline), else application/octet-stream (served as an attachment).",
            },
            "size": {"type": "integer", "minimum": 0},
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "node_id": {"type": "string", "description": "The graph node that produced it."},
            "url": {"type": "string", "description": "Where to GET the file: /api/v1/outputs/{id}."},
        },
    },
    "TaskError": {
        "type": "object",
        "required": ["kind", "message", "details"],
        "properties": {
            "kind": {"type": "string", "description": "`node_error`, `interrupted`, `output_missing`, `rejected`…"},
            "message": {"type": "string"},
            "details": {"type": "object", "additionalProperties": True},
        },
    },
    "Task": {
        "type": "object",
        "required": [
            "id", "status", "progress", "workflow", "inputs", "server", "prompt_id", "attempts", "priority", "error",
            "cancel_requested", "waiting_reason", "outputs", "created_at", "submitted_at", "started_at",
            "finished_at",
        ],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "status": {"type": "string", "enum": list(TaskStatus.values)},
            "progress": {"type": "number", "minimum": 0, "maximum": 1, "description": "1 only once succeeded."},
            "workflow": _nullable({"type": "string", "description": "The workflow's slug; null for a raw graph."}),
            "inputs": {"type": "object", "additionalProperties": True, "description": "The cleaned inputs."},
            "server": _nullable({"type": "string", "description": "The name of the server it is bound to."}),
            "prompt_id": _nullable({"type": "string"}),
            "attempts": {"type": "integer", "minimum": 0},
            "priority": {"type": "integer"},
            "error": _nullable(_ref("TaskError")),
            "cancel_requested": {"type": "boolean"},
            "waiting_reason": _nullable({"type": "string", "description": "Why a queued task is not sent yet."}),
            "outputs": {"type": "array", "items": _ref("TaskOutput")},
            "created_at": {"type": "string", "format": "date-time"},
            "submitted_at": _nullable({"type": "string", "format": "date-time"}),
            "started_at": _nullable({"type": "string", "format": "date-time"}),
            "finished_at": _nullable({"type": "string", "format": "date-time"}),
        },
    },
    "TaskList": {
        "type": "object",
        "required": ["count", "tasks"],
        "additionalProperties": False,
        "properties": {
            "count": {"type": "integer", "minimum": 0, "description": "How many match, before limit and offset."},
            "tasks": {"type": "array", "items": _ref("Task")},
        },
    },
    "TaskSubmission": {
        "type": "object",
        "description": (
            "Either `workflow` with `inputs`, or `prompt` (a raw graph: needs the `tasks.submit_raw_graph` "
            "permission). Input values are checked against the workflow's declared parameters: text, int, float, "
            f"seed (0 … {SEED_MAX}), choice, image (the id of one of your uploads)."
        ),
        "additionalProperties": False,
        "properties": {
            "workflow": {"type": "string", "description": "A workflow's slug."},
            "inputs": {"type": "object", "additionalProperties": True, "description": "Parameter name → value."},
            "prompt": {
                "type": "object",
                "description": "A graph in ComfyUI's API format: node id → {class_type, inputs}.",
                "additionalProperties": {
                    "type": "object",
                    "required": ["class_type"],
                    "properties": {"class_type": {"type": "string"}, "inputs": {"type": "object"}},
                },
            },
            "idempotency_key": {
                "type": "string", "minLength": 1, "maxLength": 200,
                "description": "The same key with the same body (in any key order) from the same user returns the "
                "same task (200) instead of a new one; the same key with another body is a 409.",
            },
            "priority": {
                "type": "integer", "minimum": -PRIORITY_LIMIT, "maximum": PRIORITY_LIMIT,
                "description": "Higher runs first; only staff may raise it above 0.",
            },
            "webhook_url": {
                "type": "string", "format": "uri", "maxLength": 2000,
                "description": (
                    "Where this task's events (task.queued, task.started, task.succeeded, task.failed, "
                    "task.cancelled) are posted, signed with the token's webhook secret (Standard Webhooks). "
                    "Public http(s) only; without it the token's default URL, if any, applies."
                ),
            },
        },
        "example": {"workflow": "txt2img", "inputs": {"prompt": "a red fox in snow", "steps": 20}},
    },
    "WorkflowParameter": {
        "type": "object",
        "required": [
            "name", "label", "type", "default", "random", "min", "max", "step", "choices", "max_length", "required",
            "multiline", "help",
        ],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "description": "The key to use in a submission's `inputs`."},
            "label": {"type": "string"},
            "type": {
                "type": "string", "enum": list(PARAMETER_TYPES),
                "description": "color: a number 0 … 16777215 or \"#rrggbb\"; image: the id of one of your uploads.",
            },
            "default": {"description": "Used when the input is left out; null when there is none."},
            "random": {"type": "boolean", "description": "A seed left out is drawn at random."},
            "min": _nullable({"type": "number"}),
            "max": _nullable({"type": "number"}),
            "step": _nullable({"type": "number", "description": "A number must be min + k × step."}),
            "choices": _nullable({"type": "array", "description": "The values a choice accepts."}),
            "max_length": _nullable({"type": "integer", "description": "For text: at most this many characters."}),
            "required": {"type": "boolean", "description": "No task can be made without it (no default)."},
            "multiline": {"type": "boolean", "description": "Text that takes paragraphs (a prompt)."},
            "help": {"type": "string"},
        },
    },
    "Workflow": {
        "type": "object",
        "required": ["slug", "name", "description", "parameters"],
        "additionalProperties": False,
        "properties": {
            "slug": {"type": "string", "description": "What a submission's `workflow` names."},
            "name": {"type": "string"},
            "description": {"type": "string"},
            "parameters": {"type": "array", "items": _ref("WorkflowParameter")},
        },
    },
    "WorkflowList": {
        "type": "object",
        "required": ["count", "workflows"],
        "additionalProperties": False,
        "properties": {
            "count": {"type": "integer", "minimum": 0},
            "workflows": {"type": "array", "items": _ref("Workflow")},
        },
    },
    "Upload": {
        "type": "object",
        "required": ["id", "filename", "content_type", "size", "sha256", "width", "height"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "format": "uuid", "description": "Use it as the value of an image input."},
            "filename": {"type": "string"},
            "content_type": {"type": "string", "enum": ["image/png", "image/jpeg", "image/webp"]},
            "size": {"type": "integer", "minimum": 0},
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "width": {"type": "integer", "minimum": 0},
            "height": {"type": "integer", "minimum": 0},
        },
    },
}

PATHS = {
    "/api/v1/tasks": {
        "get": {
            "operationId": "listTasks",
            "summary": "Your tasks, newest first.",
            "parameters": [
                {
                    "name": "status", "in": "query", "description": "`active`: not ended yet; or one status.",
                    "schema": {"type": "string", "enum": list(STATUS_FILTERS)},
                },
                {
                    "name": "limit", "in": "query", "description": f"1 to {MAX_LIST}; {DEFAULT_LIST} when absent.",
                    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST, "default": DEFAULT_LIST},
                },
                {
                    "name": "offset", "in": "query",
                    "schema": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0},
                },
            ],
            "responses": {"200": _json(_ref("TaskList"), "Your tasks."), **_errors(400)},
        },
        "post": {
            "operationId": "createTask",
            "summary": "Submit a task.",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("TaskSubmission")}}},
            "responses": {
                "201": _json(_ref("Task"), "Created, queued."),
                "200": _json(_ref("Task"), "The task created earlier with the same idempotency_key and body."),
                **_errors(400, 403, 409, 413),
            },
        },
    },
    "/api/v1/tasks/{id}": {
        "get": {
            "operationId": "getTask",
            "summary": "One of your tasks.",
            "parameters": [_uuid_path("The task's id.")],
            "responses": {"200": _json(_ref("Task"), "The task."), **_errors(404)},
        },
    },
    "/api/v1/tasks/{id}/cancel": {
        "post": {
            "operationId": "cancelTask",
            "summary": "Cancel a task: a queued one at once, one on a server is removed from its queue or interrupted.",
            "parameters": [_uuid_path("The task's id.")],
            "responses": {"200": _json(_ref("Task"), "Cancelling (or cancelled)."), **_errors(403, 404, 409)},
        },
    },
    "/api/v1/workflows": {
        "get": {
            "operationId": "listWorkflows",
            "summary": "The workflows you may run, with the parameters each takes.",
            "responses": {"200": _json(_ref("WorkflowList"), "The enabled workflows, by name."), **_errors()},
        },
    },
    "/api/v1/workflows/{slug}": {
        "get": {
            "operationId": "getWorkflow",
            "summary": "One workflow and its parameters.",
            "parameters": [
                {
                    "name": "slug", "in": "path", "required": True, "description": "The workflow's slug.",
                    "schema": {"type": "string", "pattern": "^[-a-zA-Z0-9_]+$"},
                },
            ],
            "responses": {"200": _json(_ref("Workflow"), "The workflow."), **_errors(404)},
        },
    },
    "/api/v1/outputs/{id}": {
        "get": {
            "operationId": "getOutput",
            "summary": "An output file of one of your tasks.",
            "parameters": [
                _uuid_path("The output's id."),
                {
                    "name": "download", "in": "query", "description": "1: as an attachment.",
                    "schema": {"type": "string", "enum": ["1"]},
                },
            ],
            "responses": {
                "200": {
                    "description": "The file: inline as its checked raster type, else application/octet-stream "
                    "as an attachment; always with `X-Content-Type-Options: nosniff` and "
                    "`Content-Security-Policy: sandbox`. Its Content-Disposition name is the workflow's slug "
                    "(`graph` for a raw graph), the seed when the task has one, and the output's place among the "
                    "task's outputs from 1: `txt2img-42-1.png`.",
                    "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
                },
                **_errors(404),
            },
        },
    },
    "/api/v1/uploads": {
        "post": {
            "operationId": "createUpload",
            "summary": "Upload an image for an image input: PNG, JPEG or WebP only.",
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
            },
            "responses": {"201": _json(_ref("Upload"), "Stored."), **_errors(400, 403, 413)},
        },
    },
    "/api/v1/openapi.json": {
        "get": {
            "operationId": "getOpenApi",
            "summary": "This document.",
            "security": [],
            "responses": {"200": _json({"type": "object"}, "The OpenAPI document of this API.")},
        },
    },
}


def build_schema():
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "comfyhub JSON API",
            "version": "1",
            "description": (
                "Submit ComfyUI workflows to the hub and follow them. Authenticate with `Authorization: Bearer "
                "<token>` (`manage.py create_token USERNAME`) or a browser session, whose writes need the "
                "`X-CSRFToken` header. Every error is `{\"error\": {\"code\", \"message\", \"details\"}}`."
            ),
        },
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "responses": {
                f"Error{status}": _json(_ref("Error"), description) for status, description in ERROR_CODES.items()
            },
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "A token from create_token."},
                "sessionAuth": {"type": "apiKey", "in": "cookie", "name": "sessionid"},
            },
        },
        "security": [{"bearerAuth": []}, {"sessionAuth": []}],
    }


@require_GET
def openapi_json(request):
    return JsonResponse(build_schema())
