"""The stored files behind the pages and the API: outputs (full size and thumbnail) and uploads, each after an
ownership check, never as active content on the hub's origin."""

from django.contrib.admin.views.decorators import staff_member_required
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.files.storage import default_storage
from django.http import FileResponse, Http404
from django.shortcuts import get_object_or_404
from django.views.decorators.http import require_GET

from tasks import outputs
from tasks.models import DOWNLOAD_TYPE, INLINE_TYPES, TaskOutput, Upload


def own_outputs(user):
    """The outputs `user` may fetch: those of their own tasks (with what a download's name needs)."""
    return TaskOutput.objects.filter(task__owner=user).select_related("task__workflow")


def _own_output(user, pk):
    return get_object_or_404(own_outputs(user), pk=pk)


def _file_response(request, file, content_type, filename):
    """
    A stored file, never active content on the hub's origin: inline only as a raster type the hub checked from the
    bytes (and only if asked, as a download); anything else is an octet-stream attachment. Whatever it is, the
    browser may not sniff another type from it nor run it with the hub's origin (a sandbox without allow-*).
    """
    inline = content_type in INLINE_TYPES and request.GET.get("download") != "1"
    response = FileResponse(
        file,
        content_type=content_type if content_type in INLINE_TYPES else DOWNLOAD_TYPE,
        as_attachment=not inline,
        filename=filename,
    )
    response["X-Content-Type-Options"] = "nosniff"
    response["Content-Security-Policy"] = "sandbox"
    response["Cache-Control"] = "private, max-age=3600"
    return response


def output_response(request, output):
    """
    The stored file of an output the caller may see (pages, the admin and the API share it), named as its owner
    saves it (`<workflow>-<seed>-<n>.png`) rather than as the server's counter named it (`ComfyUI_00003_.png`).
    """
    try:
        file = output.file.open("rb")
    except FileNotFoundError:
        raise Http404("The file of this output is missing from storage.") from None
    return _file_response(request, file, output.content_type, output.download_name())


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
    return _file_response(request, default_storage.open(name, "rb"), "image/jpeg", f"{output.pk}-thumb.jpg")


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
    return _file_response(request, upload.file.open("rb"), upload.content_type, upload.original_name)
