"""
The gallery: a user's images, newest first, filtered by workflow and by day, each with what made it (prompt, seed,
the other inputs) for the lightbox that opens over the page. Without JavaScript a picture links to its task.
"""

import uuid
from dataclasses import dataclass, field
from datetime import date

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.shortcuts import render
from django.views.decorators.http import require_GET

from tasks import outputs
from tasks.downloads import own_outputs
from tasks.models import INLINE_TYPES, Upload, Workflow

PAGE_SIZE = 60
# The workflow filter's value for tasks sent as raw graphs: not a slug, so no workflow can take it.
RAW_GRAPHS = ":raw"


@dataclass
class Made:
    """What made an image: its workflow's name, the prompt (the first text input), the seed and every other input,
    as (label, value)."""

    title: str = "Raw graph"
    prompt: str | None = None
    seed: object = None
    others: list = field(default_factory=list)


@require_GET
@login_required
def gallery(request):
    images = own_outputs(request.user).images().order_by("-created_at")
    choices = list(
        Workflow.objects.filter(tasks__owner=request.user, tasks__outputs__content_type__in=INLINE_TYPES).distinct()
    )
    has_raw = images.filter(task__workflow__isnull=True).exists()

    chosen = request.GET.get("workflow", "")
    if chosen == RAW_GRAPHS and has_raw:
        images = images.filter(task__workflow__isnull=True)
    elif chosen in {workflow.slug for workflow in choices}:
        images = images.filter(task__workflow__slug=chosen)
    elif chosen:
        # Only the user's own workflows are choices: another one says nothing of other users' images.
        messages.error(request, f"None of your images comes from a workflow “{chosen[:80]}”; showing them all.")
        chosen = ""
    start = _day(request, "from")
    end = _day(request, "to")
    if start:
        images = images.filter(created_at__date__gte=start)
    if end:
        images = images.filter(created_at__date__lte=end)
    if start and end and start > end:
        messages.error(request, "The “from” day is after the “to” day: no image can be made in between.")

    page = Paginator(images, PAGE_SIZE).get_page(request.GET.get("page"))
    shown = [outputs.measure(output) for output in page.object_list]
    made = what_made(request.user, {output.task for output in shown})
    context = {
        "page": page,
        "shots": [(output, made[output.task_id]) for output in shown],
        "choices": choices,
        "has_raw": has_raw,
        "raw_graphs": RAW_GRAPHS,
        "chosen": chosen,
        "start": start,
        "end": end,
        "filtered": bool(chosen or start or end),
    }
    return render(request, "tasks/gallery.html", context)


def _day(request, name):
    """The day in the GET parameter `name` (YYYY-MM-DD, as date inputs send it); a bad one is said and left out."""
    text = request.GET.get(name, "").strip()
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        messages.error(
            request, f"“{text[:40]}” is not a day: write it as YYYY-MM-DD (e.g. 2026-12-07). It was left out."
        )
        return None


def what_made(owner, tasks):
    """{task id: Made} for `tasks` (all `owner`'s), with the uploads they read found in one query."""
    image_ids = set()
    for task in tasks:
        for param in task.workflow.parameters if task.workflow else ():
            if param.get("type") == "image" and _is_uuid(task.inputs.get(param["name"])):
                image_ids.add(str(task.inputs[param["name"]]))
    uploads = {}
    if image_ids:
        uploads = {str(u.pk): u.original_name for u in Upload.objects.filter(owner=owner, pk__in=image_ids)}
    return {task.pk: _made(task, uploads) for task in tasks}


def _made(task, uploads):
    if task.workflow is None:
        return Made(others=[("graph", f"{len(task.graph)} nodes, submitted as a raw graph")])
    declared = {param["name"]: param for param in task.workflow.parameters}
    prompt_name = task.workflow.first_parameter("text")
    seed_name = task.workflow.first_parameter("seed")
    made = Made(title=task.workflow.name, prompt=task.inputs.get(prompt_name), seed=task.inputs.get(seed_name))
    for name, value in task.inputs.items():
        if name in (prompt_name, seed_name):
            continue
        param = declared.get(name, {})
        if param.get("type") == "image":
            value = uploads.get(str(value), "an uploaded image")
        made.others.append((param.get("label") or name, value))
    return made


def _is_uuid(value):
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True
