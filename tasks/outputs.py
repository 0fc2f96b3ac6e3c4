"""Outputs copied off a GPU server into hub storage, recorded only together with the task's success."""

import io
import logging
import os

from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction

from tasks.models import DOWNLOAD_TYPE, TaskOutput, output_path
from tasks.storage import Spool, delete_quietly, save_verified

logger = logging.getLogger(__name__)


def safe_filename(name):
    """Keep the base name only, so that a server's file name can never escape the task's folder."""
    base = os.path.basename(name.replace("\\", "/")).strip().lstrip(".")
    return base[:200] or "output"


# Pillow's format names of tasks.models.INLINE_TYPES.
RASTER_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}


def checked_type(file):
    """
    The content type of a file (bytes or an open binary file) read from its own bytes: a raster image Pillow
    recognises and verifies, else application/octet-stream. What a server announces or a file name says never counts:
    a compromised server can call an SVG with a script image/png.
    """
    return inspect(file)[0]


def inspect(file):
    """(content type as checked_type() reads it, width, height): the pixel size only of a checked image."""
    from PIL import Image, UnidentifiedImageError

    source = io.BytesIO(file) if isinstance(file, bytes | bytearray) else file
    try:
        with Image.open(source, formats=list(RASTER_FORMATS)) as image:
            fmt, (width, height) = image.format, image.size
            image.verify()
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError):
        return DOWNLOAD_TYPE, None, None
    if fmt not in RASTER_FORMATS:
        return DOWNLOAD_TYPE, None, None
    return RASTER_FORMATS[fmt], width, height


def measure(output):
    """
    Give an image output recorded before the hub stored pixel sizes its width and height, read once from the
    stored file and saved; an output that has them, or is no image, or whose file is gone, is left as it is.
    """
    if output.width is not None or not output.is_image:
        return output
    try:
        with output.file.open("rb") as source:
            _, width, height = inspect(source)
    except (OSError, ValueError):  # missing from storage, or no file at all
        return output
    if width is not None:
        output.width, output.height = width, height
        type(output).objects.filter(pk=output.pk).update(width=width, height=height)
    return output


def complete(task, files, source):
    """
    Store every (node_id, filename, content_type, data) of a finished task, then mark it succeeded; `data` is a
    storage.Spool (a copy streamed off the server) or bytes. Each file is saved and checked in the store first: a
    store that fails raises storage.StorageUnavailable and nothing is recorded, so the task is never succeeded
    without its files. The stored content_type is the one checked from the bytes; the server's is announced_type.
    Returns True when this call finished the task; False when another signal already had (its copies are removed).
    """
    stored = []
    try:
        for node_id, filename, content_type, data in files:
            spool = data if isinstance(data, Spool) else Spool.of(data)
            filename = safe_filename(filename)
            checked, width, height = inspect(spool.rewound())
            row = TaskOutput(
                task=task,
                node_id=str(node_id),
                filename=filename,
                content_type=checked,
                announced_type=(content_type or "")[:100],
                size=spool.size,
                width=width,
                height=height,
                sha256=spool.sha256,
            )
            try:
                row.file.name = save_verified(output_path(row, filename), spool)
            finally:
                if spool is not data:
                    spool.close()
            stored.append(row)
        with transaction.atomic():
            won = task.mark_succeeded(source)
            if won:
                TaskOutput.objects.bulk_create(stored)
    except BaseException:
        for row in stored:
            delete_quietly(row.file.name)
        raise
    if not won:
        for row in stored:
            delete_quietly(row.file.name)
        logger.info("task %s was already finished; %s ignored", task.pk, source)
    return won


THUMBNAIL_SIZE = (384, 384)


def thumbnail(output):
    """
    Return the storage name of a small JPEG of an image output, making it on first use; None when the output is
    not a checked raster image or not one Pillow can read. Thumbnails can always be made again, so they are not
    recorded anywhere.
    """
    from PIL import Image, UnidentifiedImageError

    if not output.is_image:
        return None
    name = f"thumbs/{output.task_id}/{output.pk}.jpg"
    if default_storage.exists(name):
        return name
    try:
        with output.file.open("rb") as source, Image.open(source, formats=list(RASTER_FORMATS)) as image:
            image.thumbnail(THUMBNAIL_SIZE)
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, "JPEG", quality=85)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError):
        logger.warning("output %s of task %s is not an image Pillow can read", output.pk, output.task_id)
        return None
    if default_storage.exists(name):  # another request made it meanwhile
        return name
    return default_storage.save(name, ContentFile(buffer.getvalue()))
