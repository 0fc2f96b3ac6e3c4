"""
Assets of the Comfy API v2: files a user uploaded, and the outputs of their tasks, each named by a UUID and by the
blake3 of its bytes. An upload is kept once per user and content (the same bytes twice are one asset); never across
users, so a hash another user uploaded is never "found" for this one.
"""

import uuid

from blake3 import blake3
from django.conf import settings
from django.db import models

CHUNK = 1024 * 1024


def asset_path(instance, filename):
    return f"assets/{instance.owner_id}/{instance.id}{instance.extension}"


def blake3_of(file):
    """The hex blake3 of a stored or uploaded file, read in chunks from its start."""
    hasher = blake3()
    file.seek(0)
    for chunk in iter(lambda: file.read(CHUNK), b""):
        hasher.update(chunk)
    file.seek(0)
    return hasher.hexdigest()


class AssetQuerySet(models.QuerySet):
    def owned_by(self, user):
        return self.filter(owner=user)

    def uploaded(self):
        """Assets a user sent, as opposed to the outputs of their tasks."""
        return self.filter(output__isnull=True)


class Asset(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="assets")
    blake3 = models.CharField(max_length=64, help_text="Hex blake3 of the bytes, computed by the hub.")
    sha256 = models.CharField(max_length=64, help_text="Hex sha256: how an asset finds the user's Upload of it.")
    size = models.PositiveBigIntegerField()
    content_type = models.CharField(
        max_length=100, help_text="Read by the hub from the bytes, never the type the client declared."
    )
    original_name = models.CharField(max_length=255, blank=True, help_text="The client's file_path, as sent.")
    file = models.FileField(upload_to=asset_path, max_length=400)
    # An output's asset points at the output's own stored file: the bytes are kept once and go with their task.
    output = models.OneToOneField(
        "tasks.TaskOutput", null=True, blank=True, on_delete=models.CASCADE, related_name="asset"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = AssetQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            # Uploads only: two outputs of the same user may hold the same bytes (a seeded graph run twice).
            models.UniqueConstraint(
                fields=["owner", "blake3"], condition=models.Q(output__isnull=True), name="asset_upload_once_per_owner"
            ),
        ]

    def __str__(self):
        return self.original_name or str(self.id)

    @property
    def extension(self):
        return {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}.get(self.content_type, ".bin")

    @property
    def hash(self):
        """The hash as the contract writes it."""
        return f"blake3:{self.blake3}"

    @property
    def job_id(self):
        return str(self.output.task_id) if self.output_id else None
