"""The browser pages: pick a workflow, submit, follow tasks live, look at results. Each works without JavaScript."""

import re
import secrets
import uuid
from urllib.parse import urlsplit

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import Case, When
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_POST

from tasks import outputs
from tasks.models import ACTIVE_STATUSES, STATUS_FILTERS, TaskStatus, Upload, Workflow
from tasks.params import BindingError
from tasks.queue import pool_state, queue_positions
from tasks.quota import StorageFull
from tasks.submission import QuotaExceeded, create_task, user_tasks

PAGE_SIZE = 50


def get_task_for_user(user, pk):
    """The one ownership check of the pages: another user's task is a 404, like one that does not exist."""
    return get_object_or_404(user_tasks(user), pk=pk)


# --- What a user may see of an error -------------------------------------------------------------------------
# Errors come from ComfyUI and from the hub's HTTP client: they may hold a server's address and a Python traceback.
# Users never see either (browsers never learn a ComfyUI URL); staff read them raw in the admin.

URL_PATTERN = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
IPV4_PATTERN = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d{1,5})?\b")
IPV6_PATTERN = re.compile(r"\[[0-9a-fA-F]*:[0-9a-fA-F]*:[0-9a-fA-F:.]*\](?::\d{1,5})?")
TRACEBACK_PATTERN = re.compile(r"Traceback \(most recent call last\)|File \"[^\"\n]*\", line \d+")
HIDDEN_KEYS = ("traceback", "current_inputs", "current_outputs")
HIDDEN = "[hidden]"
SERVER = "[server]"


def server_hosts(*servers):
    """Host names (and host:port) of servers, to be hidden from users wherever they appear in a message."""
    hosts = set()
    for server in servers:
        if server is None:
            continue
        parts = urlsplit(server.base_url)
        # A host named like the server (gpu-1) hides nothing: the server's name is shown anyway.
        hosts.update(host for host in (parts.netloc, parts.hostname) if host and host != server.name)
    return sorted(hosts, key=len, reverse=True)


def public_text(text, hosts=()):
    """`text` without tracebacks, URLs, IP addresses and the given host names."""
    if not isinstance(text, str) or not text:
        return text
    found = TRACEBACK_PATTERN.search(text)
    if found:
        text = f"{text[: found.start()].rstrip()} {HIDDEN}".strip()
    text = URL_PATTERN.sub(SERVER, text)
    text = IPV6_PATTERN.sub(SERVER, text)
    text = IPV4_PATTERN.sub(SERVER, text)
    for host in hosts:
        text = re.sub(rf"(?<![\w.-]){re.escape(host)}(?![\w-])", SERVER, text)
    return text


def public_details(details, hosts=(), depth=0):
    """Error details without tracebacks, a node's live inputs and outputs, and addresses in any text."""
    if depth > 16:
        return HIDDEN
    if isinstance(details, dict):
        return {
            key: public_details(value, hosts, depth + 1)
            for key, value in details.items()
            if not any(word in str(key).lower() for word in HIDDEN_KEYS)
        }
    if isinstance(details, list):
        return [public_details(value, hosts, depth + 1) for value in details]
    return public_text(details, hosts)


def for_display(task, viewer=None):
    """The task with its error message fit for `viewer` (None: any user). Only for rendering: never save it."""
    if viewer is None or not viewer.is_staff:
        task.error = public_text(task.error, server_hosts(task.server))
    return task


def row_context(task, viewer=None, positions=None, **extra):
    """What a task's row shows; `positions` from `queue_positions()` of all the rows of a page, when it has many."""
    positions = queue_positions([task]) if positions is None else positions
    return {"task": for_display(task, viewer), "position": positions.get(task.pk), **extra}


@require_GET
@login_required
def home(request):
    workflows = Workflow.objects.filter(enabled=True)
    recent = [for_display(task, request.user) for task in user_tasks(request.user)[:5]]
    context = {"workflows": workflows, "recent": recent, "pool": pool_state(request.user)}
    return render(request, "tasks/home.html", context)


@require_GET
@login_required
def task_list(request):
    tasks = user_tasks(request.user)
    status = request.GET.get("status", "")
    if status == "active":
        tasks = tasks.filter(status__in=ACTIVE_STATUSES)
    elif status:
        if status not in TaskStatus.values:
            messages.error(request, f"There is no status “{status}”; showing all tasks.")
            status = ""
        else:
            tasks = tasks.filter(status=status)
    if status in ("active", TaskStatus.QUEUED, TaskStatus.SUBMITTED):
        # The order they will run in: running, then on servers in the order sent, then the hub's queue. One
        # user's queued tasks leave it by priority, then oldest first (servers/dispatch.py fair_order).
        stage = Case(When(status=TaskStatus.RUNNING, then=0), When(status=TaskStatus.SUBMITTED, then=1), default=2)
        tasks = tasks.order_by(stage, "-priority", "submitted_at", "created_at")
    page = Paginator(tasks, PAGE_SIZE).get_page(request.GET.get("page"))
    positions = queue_positions(page.object_list)
    rows = [row_context(task, request.user, positions) for task in page.object_list]
    context = {
        "page": page,
        "rows": rows,
        "status": status,
        "filters": STATUS_FILTERS,
        "run_order": status in ("active", TaskStatus.QUEUED, TaskStatus.SUBMITTED),
    }
    return render(request, "tasks/task_list.html", context)


@require_GET
@login_required
def task_detail(request, pk):
    task = get_task_for_user(request.user, pk)
    events = list(task.events.select_related("server"))
    if not request.user.is_staff:
        # Only for rendering: none of these instances is saved.
        hosts = server_hosts(task.server, *(event.server for event in events))
        task.error_details = public_details(task.error_details, hosts)
        for event in events:
            event.message = public_text(event.message, hosts)
    context = {
        **row_context(task, request.user),
        "events": events,
        "outputs": [
            (outputs.measure(output), output.download_name(number))
            for number, output in enumerate(task.outputs.all(), start=1)
        ],
        "parameters": _parameters(task),
        # manage.py prune_outputs removed its results (all, or all it could): say so rather than "no results".
        "outputs_removed": next((event for event in events if event.kind == "outputs_removed"), None),
        "has_seed": task.workflow is not None and any(p["type"] == "seed" for p in task.workflow.parameters),
    }
    return render(request, "tasks/task_detail.html", context)


REMOVED_UPLOAD = "an uploaded image, since removed"


def _parameters(task):
    """(label, value) of each input the task was run with, in the workflow's order."""
    if task.workflow is None:
        return [("graph", f"{len(task.graph)} nodes, submitted as a raw graph")]
    labels = {p["name"]: p.get("label") or p["name"] for p in task.workflow.parameters}
    uploads = {}
    images = {p["name"] for p in task.workflow.parameters if p["type"] == "image"}
    image_ids = [value for name, value in task.inputs.items() if name in images]
    if image_ids:
        uploads = {str(u.pk): u for u in Upload.objects.filter(owner=task.owner, pk__in=image_ids)}
    return [
        (labels.get(name, name), uploads.get(str(value), REMOVED_UPLOAD if name in images else value))
        for name, value in task.inputs.items()
    ]


@require_GET
@login_required
def task_row(request, pk):
    """One task's row: what htmx polls or swaps when it needs a single task again."""
    task = get_task_for_user(request.user, pk)
    return render(request, "tasks/task_list.html#task-row", row_context(task, request.user))


@require_POST
@login_required
def task_cancel(request, pk):
    task = get_task_for_user(request.user, pk)
    if task.request_cancel():
        task.refresh_from_db()
        if not request.htmx:
            messages.success(request, "Cancelled." if task.is_terminal else "Cancelling: the server is stopping it.")
    elif not request.htmx:
        messages.error(request, f"This task is already {task.status}; there is nothing to cancel.")
    if request.htmx:
        return render(request, "tasks/task_list.html#task-row", row_context(task, request.user))
    return redirect(_back(request, reverse("task-detail", args=[task.pk])))


@require_POST
@login_required
def task_cancel_many(request):
    """Cancel the ticked tasks of a list: only the user's own active ones; the others are left as they are."""
    ids = []
    for value in request.POST.getlist("ids")[:PAGE_SIZE]:
        try:
            ids.append(uuid.UUID(value))
        except ValueError:
            continue  # a malformed id names no task of the user
    cancelled = sum(1 for task in user_tasks(request.user).filter(pk__in=ids, status__in=ACTIVE_STATUSES)
                    if task.request_cancel())
    if not ids:
        messages.error(request, "Tick the tasks to cancel first.")
    elif cancelled:
        messages.success(request, f"Cancelling {cancelled} task{'s' if cancelled != 1 else ''}.")
    else:
        messages.error(request, "None of the ticked tasks could be cancelled: they had ended already.")
    return redirect(_back(request, reverse("task-list")))


def _back(request, default):
    target = request.POST.get("next") or ""
    if url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}, require_https=request.is_secure()):
        return target
    return default


@require_POST
@login_required
def task_rerun(request, pk):
    """Run a task again with the same inputs, or with a new seed."""
    task = get_task_for_user(request.user, pk)
    if task.workflow is None:
        body = {"prompt": task.graph}
    elif not task.workflow.enabled:
        messages.error(request, f"The workflow “{task.workflow.name}” is switched off; it cannot run again.")
        return redirect("task-detail", pk=task.pk)
    else:
        inputs = dict(task.inputs)
        if request.POST.get("new_seed"):
            for param in task.workflow.parameters:
                if param["type"] == "seed":
                    inputs[param["name"]] = secrets.randbelow(2**48)
        body = {"workflow": task.workflow.slug, "inputs": inputs}
    try:
        new_task, _ = create_task(request.user, body)
    except (BindingError, PermissionError, QuotaExceeded, StorageFull) as exc:
        messages.error(request, f"Could not run it again: {getattr(exc, 'message', exc)}")
        return redirect("task-detail", pk=task.pk)
    return redirect("task-detail", pk=new_task.pk)
