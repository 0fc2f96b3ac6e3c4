"""Creating tasks and storing uploads: the one path shared by the JSON API and the browser pages."""

import hashlib
import io
import json
import re
import secrets
import uuid

from django.conf import settings
from django.db import IntegrityError, transaction
from PIL import Image, UnidentifiedImageError

from servers.dispatch import judge_pool
from servers.snapshot import pool_capabilities
from servers.wake import notify_work
from tasks.models import (
    Task,
    TaskEvent,
    TaskStatus,
    Upload,
    Workflow,
    graph_digest,
    record_webhook,
    webhook_url_problem,
)
from tasks.models.files import upload_path
from tasks.params import bind
from tasks.progress import emit_task_update
from tasks.quota import check_storage
from tasks.storage import Spool, delete_quietly, save_verified
from tasks.validators import BindingError, check_tree, text_problem

UPLOAD_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
PRIORITY_LIMIT = 1_000_000


def user_tasks(user):
    return Task.objects.filter(owner=user).select_related("workflow", "server").prefetch_related("outputs")


def validate_graph(graph):
    if not isinstance(graph, dict) or not graph:
        return "prompt must be a non-empty object of nodes in ComfyUI's API format"
    for node_id, node in graph.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            return f"node {node_id} needs a class_type"
        if not isinstance(node.get("inputs", {}), dict):
            return f"node {node_id} has inputs that are not an object"
    return None


HUB_PREFIX = re.compile(r"^ch-[0-9a-f]{24}(-|$)")  # what private_output_names puts first


def _with_prefixes(graph, make):
    """`graph` with every node input named filename_prefix set to make(the author's prefix as a plain name)."""
    changed = {}
    for node_id, node in graph.items():
        inputs = node.get("inputs") or {}
        if "filename_prefix" in inputs:
            value = inputs["filename_prefix"]
            # The last path part, without a hub prefix (a raw graph run again): never a folder, never "..".
            name = re.split(r"[/\\]", value)[-1] if isinstance(value, str) else ""
            name = re.sub(r"[^A-Za-z0-9_-]", "", HUB_PREFIX.sub("", name))[:40]
            changed[node_id] = {**node, "inputs": {**inputs, "filename_prefix": make(name)}}
    return {**graph, **changed}


def plain_output_names(graph):
    """`graph` as its author sent it, near enough: every filename_prefix without the prefix this hub put first."""
    return _with_prefixes(graph, lambda name: name)


def private_output_names(graph):
    """
    Return (the graph to send, its affinity hash). Every SaveImage-like node (any input named filename_prefix:
    SaveImage, SaveAnimatedWEBP, SaveVideo...) gets a prefix made for this task: a server's output folder is shared
    by all its users and ComfyUI numbers files in sequence (ComfyUI_00003_.png), so a plain prefix lets anyone who
    can reach the server guess another task's files. The author's prefix follows, as a plain name. The hash is
    taken without the task's prefix: identical graphs of one user still meet on one server, for ComfyUI's cache.
    """
    token = f"ch-{secrets.token_hex(12)}"
    affinity = graph_digest(_with_prefixes(graph, lambda name: name))
    return _with_prefixes(graph, lambda name: f"{token}-{name}" if name else token), affinity


class Unrunnable(BindingError):
    """No enabled server of the pool has the node types or model files the graph needs."""

    code = "no_capable_server"


def check_runnable(graph, field):
    """
    Refuse a graph that no enabled server can run, when what every enabled server can run is known: queued, it
    would wait forever. While some server is not known yet (never reached), the task may wait for it; the
    dispatcher fails it after COMFYHUB_UNRUNNABLE_SECONDS (servers/pool.py).
    """
    verdict = judge_pool(graph, pool_capabilities())
    if verdict.refused:
        reason = verdict.explain()
        raise Unrunnable(f"{reason[0].upper()}{reason[1:]}.", {field: reason})


class QuotaExceeded(Exception):
    """The user already has as many tasks waiting as one user may."""


def check_quota(user):
    limit = settings.COMFYHUB["USER_MAX_QUEUED"]
    waiting = Task.objects.filter(owner=user, status=TaskStatus.QUEUED).count()
    if waiting >= limit:
        raise QuotaExceeded(
            f"You already have {waiting} tasks waiting, the most one user may have; "
            "submit more when some have started."
        )


class IdempotencyConflict(Exception):
    """An idempotency key the user already sent with another body: answering with that task would be a lie."""

    def __init__(self, task):
        super().__init__("This idempotency key was used for another request.")
        self.task = task


def body_digest(body):
    """SHA-256 of `body` as canonical JSON (keys sorted, no spaces): the same request in any key order matches."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def earlier_task(user, key, digest):
    """The task created earlier with `key`, or None; IdempotencyConflict when it came with another body."""
    existing = user_tasks(user).filter(idempotency_key=key).first()
    if existing is not None and existing.idempotency_body and existing.idempotency_body != digest:
        raise IdempotencyConflict(existing)
    return existing


def webhook_for(url, token, field="webhook_url"):
    """
    (URL, token) of a submission's webhooks: its own `url` (None: none given), else the default of the ApiToken it
    came with (None: a session), or ("", None). Every webhook is signed with that token's secret, so a URL of its
    own needs a token that has one. Raises BindingError naming `field`. The v1 and v2 APIs both call it.
    """
    if url is None:
        return (token.webhook_url, token) if token is not None and token.webhook_url else ("", None)
    problem = webhook_url_problem(url)
    if problem:
        raise BindingError(f"Invalid {field}.", {field: problem})
    if token is None or not token.webhook_secret:
        raise BindingError(
            "A webhook needs a signing secret.",
            {field: "needs a bearer token with a webhook secret (manage.py create_token --webhook-url)"},
        )
    return url, token


def create_task(user, body, fields=None, token=None):
    """
    Validate a submission and create its task; returns (task, created) or raises BindingError, PermissionError,
    QuotaExceeded, StorageFull (tasks/quota.py) or IdempotencyConflict. `fields`: more columns of a new task (the
    v2 API's labels, and its own digest of the request as `idempotency_body`), written with it in one statement.
    `token`: the ApiToken the request came with, whose webhook settings apply.
    """
    # Before anything looks text up: a lone surrogate in a slug or key is a database error on PostgreSQL.
    check_tree(body)
    allowed = {"workflow", "inputs", "prompt", "idempotency_key", "priority", "webhook_url"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BindingError(
            "The body has fields a task does not take.", dict.fromkeys(unknown, "is not a field of a task")
        )
    key = body.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 200):
        raise BindingError(
            "The idempotency_key is not valid.", {"idempotency_key": "must be a string of 1 to 200 characters"}
        )
    digest = body_digest(body) if key is not None else ""
    if key is not None:
        existing = earlier_task(user, key, digest)
        if existing is not None:
            return existing, False
    priority = body.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise BindingError("The priority is not valid.", {"priority": "must be a whole number"})
    if not -PRIORITY_LIMIT <= priority <= PRIORITY_LIMIT:
        # The column is a 32-bit integer: a larger number would be a database error, not an answer.
        raise BindingError(
            "The priority is not valid.", {"priority": f"must be between {-PRIORITY_LIMIT} and {PRIORITY_LIMIT}"}
        )
    if priority > 0 and not user.is_staff:
        raise PermissionError("Only staff may raise a task's priority.")
    webhook_url, webhook_token = webhook_for(body.get("webhook_url"), token)
    check_storage(user)  # first: a full queue empties by itself, full storage does not
    check_quota(user)
    has_workflow, has_prompt = body.get("workflow") is not None, body.get("prompt") is not None
    if has_workflow == has_prompt:
        raise BindingError(
            "Send either a workflow with inputs or a prompt graph.", {"workflow": "or prompt is required"}
        )
    workflow, inputs, images = None, {}, []
    if has_workflow:
        slug = body["workflow"]
        workflow = Workflow.objects.filter(slug=slug, enabled=True).first() if isinstance(slug, str) else None
        if workflow is None:
            raise BindingError("There is no such workflow.", {"workflow": f"there is no workflow {slug!r}"})
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
    check_runnable(graph, "workflow" if has_workflow else "prompt")
    graph, graph_hash = private_output_names(graph)
    try:
        with transaction.atomic():
            task = Task.objects.create(
                owner=user,
                workflow=workflow,
                inputs=inputs,
                graph=graph,
                graph_hash=graph_hash,
                idempotency_key=key,
                priority=priority,
                **{"image_inputs": images, "idempotency_body": digest, **(fields or {})},
                webhook_url=webhook_url,
                webhook_token=webhook_token,
            )
            TaskEvent.objects.create(task=task, kind="created", to_status=TaskStatus.QUEUED)
            if webhook_url:
                transaction.on_commit(lambda: record_webhook(task, "created"))
            transaction.on_commit(notify_work)
            # Every open window of the owner inserts the new task's row.
            transaction.on_commit(lambda: emit_task_update(task, created=True))
    except IntegrityError:
        # The same idempotency key arrived twice at once: the other request created the task.
        existing = earlier_task(user, key, digest) if key is not None else None
        if existing is None:
            raise
        return existing, False
    return task, True


def describe_size(size):
    for unit, factor in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


def read_image(upload):
    """Return (bytes, format, width, height) of an uploaded image, or raise BindingError."""
    limit = settings.COMFYHUB["MAX_UPLOAD_BYTES"]
    if upload.size > limit:
        raise BindingError("The image is too large.", {"image": f"must be at most {describe_size(limit)}"})
    data = upload.read()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height) = image.format, image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise BindingError(
            "The file is not an image.", {"image": "must be a PNG, JPEG or WebP image"}
        ) from None
    if fmt not in UPLOAD_FORMATS:
        raise BindingError("The image format is not supported.", {"image": "must be a PNG, JPEG or WebP image"})
    if width * height > Image.MAX_IMAGE_PIXELS:
        # A few kilobytes of PNG can claim gigabytes of pixels; ComfyUI would decode them all.
        raise BindingError(
            "The image has too many pixels.", {"image": f"must have at most {Image.MAX_IMAGE_PIXELS:,} pixels"}
        )
    return data, fmt, width, height


def store_upload(user, upload):
    """Store an image the user sent as their Upload; raises StorageFull (before reading it) or BindingError."""
    check_storage(user)
    problem = text_problem(upload.name or "")
    if problem:
        # Django's multipart parser replaces undecodable bytes; a name made in code may still hold "\ud800".
        raise BindingError("The file name is not valid text.", {"image": f"has a file name that {problem}"})
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
    row.file.name = save_verified(upload_path(row, row.remote_name), Spool.of(data))
    try:
        row.save()
    except BaseException:
        delete_quietly(row.file.name)
        raise
    return row
