"""The pydantic shapes of JSON API v1's bodies and answers: what /api/v1/openapi.json describes."""

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from ninja import Field, Schema

from tasks.models import TaskStatus
from tasks.params import SEED_MAX
from tasks.submission import PRIORITY_LIMIT

SHA256 = r"^[0-9a-f]{64}$"


class ErrorBody(Schema):
    code: str = Field(description="Stable and machine-readable: `invalid`, `not_found`…")
    message: str = Field(description="A sentence for a person.")
    details: dict[str, Any] = Field(description="For 400: each offending field (or input name) mapped to a sentence.")


class ErrorOut(Schema):
    error: ErrorBody


class TaskOutputOut(Schema):
    id: UUID
    filename: str = Field(
        description="The name the ComfyUI server gave the file (without the hub's prefix). The file itself "
        "downloads as `<workflow>-<seed>-<n>.<ext>` (Content-Disposition)."
    )
    content_type: Literal["image/png", "image/jpeg", "image/webp", "image/gif", "application/octet-stream"] = Field(
        description="Read by the hub from the file's bytes, whatever the server said: a raster image (served "
        "inline), else application/octet-stream (served as an attachment)."
    )
    size: int = Field(ge=0)
    sha256: str = Field(pattern=SHA256)
    node_id: str = Field(description="The graph node that produced it.")
    url: str = Field(description="Where to GET the file: /api/v1/outputs/{id}.")


class TaskErrorOut(Schema):
    kind: str = Field(description="`node_error`, `interrupted`, `output_missing`, `rejected`…")
    message: str
    details: dict[str, Any]


class TaskOut(Schema):
    id: UUID
    status: TaskStatus
    progress: float = Field(ge=0, le=1, description="1 only once succeeded.")
    workflow: str | None = Field(description="The workflow's slug; null for a raw graph.")
    inputs: dict[str, Any] = Field(description="The cleaned inputs.")
    server: str | None = Field(description="The name of the server it is bound to.")
    prompt_id: str | None
    attempts: int = Field(ge=0)
    priority: int
    error: TaskErrorOut | None
    cancel_requested: bool
    waiting_reason: str | None = Field(description="Why a queued task is not sent yet.")
    outputs: list[TaskOutputOut]
    created_at: datetime
    submitted_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


class TaskListOut(Schema):
    count: int = Field(ge=0, description="How many match, before limit and offset.")
    tasks: list[TaskOut]


class GraphNode(Schema):
    class_type: str
    inputs: dict[str, Any] | None = None


class TaskIn(Schema):
    """
    Either `workflow` with `inputs`, or `prompt` (a raw graph: needs the `tasks.submit_raw_graph` permission).
    Input values are checked against the workflow's declared parameters: text, int, float, seed, choice, image
    (the id of one of your uploads).
    """

    model_config = {
        "extra": "forbid",
        "json_schema_extra": {"example": {"workflow": "txt2img", "inputs": {"prompt": "a red fox in snow"}}},
    }

    workflow: str | None = Field(None, description="A workflow's slug.")
    inputs: dict[str, Any] | None = Field(None, description=f"Parameter name → value (a seed: 0 … {SEED_MAX}).")
    prompt: dict[str, GraphNode] | None = Field(
        None, description="A graph in ComfyUI's API format: node id → {class_type, inputs}."
    )
    idempotency_key: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="The same key with the same body (in any key order) from the same user returns the same task "
        "(200) instead of a new one; the same key with another body is a 409.",
    )
    priority: int | None = Field(
        None, ge=-PRIORITY_LIMIT, le=PRIORITY_LIMIT, description="Higher runs first; only staff may raise it above 0."
    )
    webhook_url: str | None = Field(
        None,
        max_length=2000,
        description="Where this task's events (task.queued, task.started, task.succeeded, task.failed, "
        "task.cancelled) are posted, signed with the token's webhook secret (Standard Webhooks). Public http(s) "
        "only; without it the token's default URL, if any, applies.",
    )


class WorkflowParameterOut(Schema):
    name: str = Field(description="The key to use in a submission's `inputs`.")
    label: str
    type: Literal["text", "int", "float", "seed", "choice", "color", "image"] = Field(
        description='color: a number 0 … 16777215 or "#rrggbb"; image: the id of one of your uploads.'
    )
    default: Any = Field(description="Used when the input is left out; null when there is none.")
    random: bool = Field(description="A seed left out is drawn at random.")
    min: float | None
    max: float | None
    step: float | None = Field(description="A number must be min + k × step.")
    choices: list[Any] | None = Field(description="The values a choice accepts.")
    max_length: int | None = Field(description="For text: at most this many characters.")
    required: bool = Field(description="No task can be made without it (no default).")
    multiline: bool = Field(description="Text that takes paragraphs (a prompt).")
    help: str


class WorkflowOut(Schema):
    slug: str = Field(description="What a submission's `workflow` names.")
    name: str
    description: str
    parameters: list[WorkflowParameterOut]


class WorkflowListOut(Schema):
    count: int = Field(ge=0)
    workflows: list[WorkflowOut]


class UploadOut(Schema):
    id: UUID = Field(description="Use it as the value of an image input.")
    filename: str
    content_type: Literal["image/png", "image/jpeg", "image/webp"]
    size: int = Field(ge=0)
    sha256: str = Field(pattern=SHA256)
    width: int = Field(ge=0)
    height: int = Field(ge=0)


def errors(*statuses):
    """The error answers of an operation: those asked for, and the ones every authenticated request may get."""
    return dict.fromkeys(sorted({401, 429, *statuses}), ErrorOut)
