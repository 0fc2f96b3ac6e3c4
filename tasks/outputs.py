"""Outputs copied off a GPU server into hub storage, recorded only together with the task's success."""

import hashlib
import io
import logging
import mimetypes
import os

from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction

from tasks.models import TaskOutput, output_path

logger = logging.getLogger(__name__)


def safe_filename(name):
    """Keep the base name only, so that a server's file name can never escape the task's folder."""
    base = os.path.basename(name.replace("\\", "/")).strip().lstrip(".")
    return base[:200] or "output"


def complete(task, files, source):
    """
    Store every (node_id, filename, content_type, bytes) of a finished task, then mark it succeeded.
    Returns True when this call finished the task; False when another signal already had (its copies are removed).
    """
    stored = []
    for node_id, filename, content_type, data in files:
        filename = safe_filename(filename)
        row = TaskOutput(
            task=task,
            node_id=str(node_id),
            filename=filename,
            content_type=content_type or mimetypes.guess_type(filename)[0] or "application/octet-stream",
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        row.file.name = default_storage.save(output_path(row, filename), ContentFile(data))
        stored.append(row)
    with transaction.atomic():
        won = task.mark_succeeded(source)
        if won:
            TaskOutput.objects.bulk_create(stored)
    if not won:
        for row in stored:
            default_storage.delete(row.file.name)
        logger.info("task %s was already finished; %s ignored", task.pk, source)
    return won


THUMBNAIL_SIZE = (384, 384)


def thumbnail(output):
    """
    Return the storage name of a small JPEG of an image output, making it on first use; None when the output is
    not an image Pillow can read. Thumbnails can always be made again, so they are not recorded anywhere.
    """
    from PIL import Image, UnidentifiedImageError

    name = f"thumbs/{output.task_id}/{output.pk}.jpg"
    if default_storage.exists(name):
        return name
    if not output.content_type.startswith("image/"):
        return None
    try:
        with output.file.open("rb") as source, Image.open(source) as image:
            image.thumbnail(THUMBNAIL_SIZE)
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, "JPEG", quality=85)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError):
        logger.warning("output %s of task %s is not an image Pillow can read", output.pk, output.task_id)
        return None
    if default_storage.exists(name):  # another request made it meanwhile
        return name
    return default_storage.save(name, ContentFile(buffer.getvalue()))
