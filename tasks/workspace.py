"""
The workflow page as a workspace: the form on one side; on the other the tasks just submitted, live, and this
workflow's recent results, each a click from "use these settings". With htmx a submit stays on the page; without
JavaScript it is a POST and a redirect back to the same page.
"""

import uuid

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods
from django_htmx.http import reswap, retarget

from tasks.forms import WorkflowForm, kept_field_name, random_field_name
from tasks.models import TaskOutput, Upload, Workflow
from tasks.queue import pool_state, queue_positions
from tasks.submission import user_tasks
from tasks.views import row_context

SHOWN_TASKS = 6
SHOWN_RESULTS = 12


@require_http_methods(["GET", "POST"])
@login_required
def submit(request, slug):
    workflow = get_object_or_404(Workflow, slug=slug, enabled=True)
    initial = settings_of(request, workflow)
    form = WorkflowForm(workflow, request.user, request.POST or None, request.FILES or None, initial=initial)
    if request.method == "POST":
        if form.is_valid():
            created = form.submit()
            if created and request.htmx:
                # Newest first, as the list shows them and as pushes from other windows insert them.
                return render(request, "tasks/submit.html#new-rows", rows_context(request, reversed(created)))
            if created:
                return redirect(f"{reverse('submit', args=[slug])}?from={created[0].pk}&random=1")
        form.keep_valid_images()
        if request.htmx:
            response = render(request, "tasks/submit.html#form", form_context(workflow, form), status=422)
            return reswap(retarget(response, "#submit-form"), "outerHTML")
    context = {
        **form_context(workflow, form),
        **rows_context(request, user_tasks(request.user).filter(workflow=workflow)[:SHOWN_TASKS]),
        "results": recent_results(request.user, workflow),
        "pool": pool_state(request.user, workflow),
    }
    return render(request, "tasks/submit.html", context, status=400 if request.method == "POST" else 200)


def form_context(workflow, form):
    return {"workflow": workflow, "form": form, "max_upload_bytes": settings.COMFYHUB["MAX_UPLOAD_BYTES"]}


def rows_context(request, tasks):
    tasks = list(tasks)
    positions = queue_positions(tasks)
    return {"rows": [row_context(task, request.user, positions) for task in tasks]}


def settings_of(request, workflow):
    """
    The form's starting values: "use these settings" (?from=<task>) starts from one of the user's own tasks of
    this workflow, its image included; with ?random=1 its seeds stay random (the page a plain submit lands on).
    """
    try:
        earlier = user_tasks(request.user).filter(pk=uuid.UUID(request.GET.get("from", "")), workflow=workflow).first()
    except ValueError:
        return {}  # no id, or a malformed one: no earlier task
    if earlier is None:
        return {}
    keep_random = request.GET.get("random") == "1"
    initial = {}
    for param in workflow.parameters:
        name, kind = param["name"], param["type"]
        if name not in earlier.inputs:
            continue
        if kind == "image":
            if Upload.objects.filter(owner=request.user, pk=earlier.inputs[name]).exists():
                initial[kept_field_name(name)] = earlier.inputs[name]
        elif kind == "seed" and keep_random:
            initial[random_field_name(name)] = True
        else:
            initial[name] = earlier.inputs[name]
            if kind == "seed":
                initial[random_field_name(name)] = False
    return initial


def recent_results(user, workflow):
    """The user's latest pictures from this workflow, newest first."""
    return (
        TaskOutput.objects.images()
        .filter(task__owner=user, task__workflow=workflow)
        .select_related("task")
        .order_by("-created_at")[:SHOWN_RESULTS]
    )
