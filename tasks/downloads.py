"""The stored files behind the pages and the API: outputs (full size and thumbnail) and uploads, each after an
ownership check, never as active content on the hub's origin (tasks/ranges.py answers them)."""

from django.contrib.admin.views.decorators import staff_member_required
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.files.storage import default_storage
from django.http import Http404
from django.shortcuts import get_object_or_404
from django.views.decorators.http import require_GET

from tasks import outputs
from tasks.models import TaskOutput, Upload
from tasks.ranges import Missing, stored_response


def own_outputs(user):
    """The outputs `user` may fetch: those of their own tasks (with what a download's name needs)."""
    return TaskOutput.objects.filter(task__owner=user).select_related("task__workflow")


def _own_output(user, pk):
    return get_object_or_404(own_outputs(user), pk=pk)


def output_response(request, output):
    """
    The stored file of an output the caller may see (pages, the admin and the API share it), named as its owner
    saves it (`<workflow>-<seed>-<n>.png`) rather than as the server's counter named it (`ComfyUI_00003_.png`).
    """
    try:
        return stored_response(
            request, output.file.name, output.size, output.content_type, output.download_name(), f'"{output.sha256}"'
        )
    except Missing:
        raise Http404("The file of this output is missing from storage.") from None


@require_GET
@login_required
def output_file(request, pk):
    return output_response(request, _own_output(request.user, pk))


@require_GET
@login_required
def output_thumb(request, pk):
    output = _own_output(request.user, pk)
    name = outputs.thumbnail(output) if output.file else None
    if name is None:
        raise Http404("This output has no preview.")
    try:
        return stored_response(request, name, default_storage.size(name), "image/jpeg", f"{output.pk}-thumb.jpg")
    except (Missing, FileNotFoundError):
        raise Http404("This output has no preview.") from None


@require_GET
@staff_member_required
def staff_output_file(request, pk):
    """Any output, for staff who may view tasks in the admin (the page that links here needs the same permission)."""
    if not request.user.has_perm("tasks.view_task"):
        raise PermissionDenied("Viewing tasks' outputs needs the permission to view tasks.")
    return output_response(request, get_object_or_404(TaskOutput.objects.select_related("task__workflow"), pk=pk))


@require_GET
@login_required
def upload_file(request, pk):
    upload = get_object_or_404(Upload.objects.filter(owner=request.user), pk=pk)
    try:
        return stored_response(request, upload.file.name, upload.size, upload.content_type, upload.original_name)
    except Missing:
        raise Http404("The file of this upload is missing from storage.") from None
