"""The files of tasks: outputs copied off the servers into hub storage, and the images users upload."""

import os
import re
import uuid

from django.conf import settings
from django.db import models


def output_path(instance, filename):
    return f"outputs/{instance.task_id}/{filename}"


# The only types a file is ever served inline as, and only once the hub has read them from the file's own bytes:
# raster images cannot run script on the hub's origin, whereas SVG, HTML or anything unknown could.
INLINE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif")
DOWNLOAD_TYPE = "application/octet-stream"
EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "image/gif": ".gif"}
# What may be kept of a server's extension for a file that is not a checked image (.flac, .mp4, .json).
PLAIN_EXTENSION = re.compile(r"^\.[a-z0-9]{1,8}$")


class TaskOutputQuerySet(models.QuerySet):
    def images(self):
        """Outputs whose bytes the hub read as a raster image: the ones shown as pictures."""
        return self.filter(content_type__in=INLINE_TYPES)


# The unguessable prefix every SaveImage-like node gets on the server (tasks/submission.py): "ch-<24 hex>-".
HUB_PREFIX_IN_NAME = re.compile(r"^ch-[0-9a-f]{24}(?:-|(?=_))")


class TaskOutput(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    task = models.ForeignKey("tasks.Task", on_delete=models.CASCADE, related_name="outputs")
    node_id = models.CharField(max_length=64)
    filename = models.CharField(max_length=255)
    content_type = models.CharField(
        max_length=100,
        help_text="Read by the hub from the bytes: a PNG, JPEG, WebP or GIF type, else application/octet-stream.",
    )
    announced_type = models.CharField(
        max_length=100, blank=True, help_text="What the ComfyUI server said the file was; never trusted, for staff."
    )
    size = models.PositiveBigIntegerField()
    # Pixels, read from the stored image when it is recorded (tasks/outputs.py); empty for a file that is not an
    # image, and for an output recorded before these fields existed until it is first shown (outputs.measure).
    width = models.PositiveIntegerField(null=True, blank=True)
    height = models.PositiveIntegerField(null=True, blank=True)
    sha256 = models.CharField(max_length=64)
    file = models.FileField(upload_to=output_path, max_length=400)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TaskOutputQuerySet.as_manager()

    class Meta:
        ordering = ["created_at", "filename"]

    def __str__(self):
        return self.filename

    @property
    def display_name(self):
        """
        The name its owner sees and downloads: the server's name without the hub's per-task prefix, which only
        keeps other users of the server from guessing it (`filename` keeps it: the consistency check matches it).
        """
        name = HUB_PREFIX_IN_NAME.sub("", self.filename)
        if name.startswith("_"):
            name = "output" + name  # the author gave no prefix of their own
        return name or self.filename

    @property
    def is_image(self):
        return self.content_type in INLINE_TYPES

    @property
    def extension(self):
        """From the checked type; a file that is not an image keeps its own plain extension, else `.bin`."""
        if self.content_type in EXTENSIONS:
            return EXTENSIONS[self.content_type]
        own = os.path.splitext(self.display_name)[1].lower()
        return own if PLAIN_EXTENSION.match(own) else ".bin"

    def download_name(self, number=None):
        """
        `<workflow>-<seed>-<n>.<ext>`, the name its owner saves it under: `n` counts the task's outputs from 1 in
        their order; a raw graph is `graph`; no seed, no seed part. `number` when the caller already knows it.
        """
        task = self.task
        if number is None:
            number = list(task.outputs.values_list("pk", flat=True)).index(self.pk) + 1
        parts = [task.workflow.slug if task.workflow else "graph"]
        name = task.workflow.first_parameter("seed") if task.workflow else None
        seed = re.sub(r"[^0-9A-Za-z_]", "", str(task.inputs.get(name, "")) if name else "")[:40]
        if seed:
            parts.append(seed)
        return f"{'-'.join(parts)}-{number}{self.extension}"


def upload_path(instance, filename):
    return f"uploads/{instance.owner_id}/{instance.id}{instance.extension}"


class Upload(models.Model):
    """An image a user uploaded, kept in hub storage and copied to a task's own server before its prompt."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="uploads")
    original_name = models.CharField(max_length=255)
    content_type = models.CharField(max_length=100)
    size = models.PositiveBigIntegerField()
    sha256 = models.CharField(max_length=64)
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    file = models.FileField(upload_to=upload_path, max_length=400)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return self.original_name

    @property
    def extension(self):
        return {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}.get(
            self.content_type, ".png"
        )

    @property
    def remote_name(self):
        """The unique name used on ComfyUI servers, so that two users' image.png never collide."""
        return f"comfyhub-{self.id}{self.extension}"
