"""
How much hub storage a user takes (their outputs, uploads and uploaded v2 assets), and the per-user quota
COMFYHUB["USER_STORAGE_BYTES"] (0: none): at or over it, new tasks and new uploads are refused. Work already
accepted still runs, so its outputs may take a user over the quota; nothing here deletes anything
(`manage.py prune_outputs` does, tasks/retention.py).
"""

from dataclasses import dataclass

from django.conf import settings
from django.db.models import Sum

from tasks.models import Asset, TaskOutput, Upload

# From this share of the quota on, the account page says the storage is nearly full.
NEAR_SHARE = 0.9


def human_size(size):
    """`size` bytes for people: 512 bytes, 1.5 KiB, 12.0 MiB, 1.25 GiB."""
    if size < 1024:
        return f"{size} byte{'' if size == 1 else 's'}"
    for unit, factor, digits in (("TiB", 1024**4, 2), ("GiB", 1024**3, 2), ("MiB", 1024**2, 1)):
        if size >= factor:
            return f"{size / factor:.{digits}f} {unit}"
    return f"{size / 1024:.1f} KiB"


def quota_bytes():
    return max(settings.COMFYHUB["USER_STORAGE_BYTES"], 0)


@dataclass(frozen=True)
class Usage:
    """One user's stored bytes by kind, against the quota in force (0: none)."""

    outputs: int
    uploads: int
    assets: int
    quota: int

    @property
    def total(self):
        return self.outputs + self.uploads + self.assets

    @property
    def full(self):
        return self.quota > 0 and self.total >= self.quota

    @property
    def near(self):
        return self.quota > 0 and not self.full and self.total >= self.quota * NEAR_SHARE

    @property
    def percent(self):
        """Whole percent of the quota used (may pass 100: queued work still runs); None without a quota."""
        return int(self.total * 100 // self.quota) if self.quota else None

    def describe(self):
        """The refusal, with the figures and what the user can do about it."""
        return (
            f"You are using {human_size(self.total)} of your {human_size(self.quota)} storage quota, so new tasks "
            "and uploads are refused. Free space by deleting uploaded assets you no longer need, or ask an "
            "operator to remove old results or to raise your quota."
        )


def storage_usage(user):
    """The user's Usage: three aggregate queries, whatever the number of files."""
    outputs = TaskOutput.objects.filter(task__owner=user).aggregate(total=Sum("size"))["total"]
    uploads = Upload.objects.filter(owner=user).aggregate(total=Sum("size"))["total"]
    # An output's asset shares the output's file: only the assets a user sent hold bytes of their own.
    assets = Asset.objects.owned_by(user).uploaded().aggregate(total=Sum("size"))["total"]
    return Usage(outputs or 0, uploads or 0, assets or 0, quota_bytes())


def storage_used(user):
    """Bytes of the user's outputs, uploads and uploaded assets."""
    return storage_usage(user).total


class StorageFull(Exception):
    """The user's files take their whole storage quota: no new task or upload until they take less."""

    code = "storage_quota_exceeded"

    def __init__(self, usage):
        self.message = usage.describe()
        super().__init__(self.message)
        self.usage = usage
        self.details = {"used_bytes": usage.total, "quota_bytes": usage.quota}


def check_storage(user):
    """Raise StorageFull when a quota is set and the user's files take it all; costs nothing without a quota."""
    if quota_bytes() <= 0:
        return
    usage = storage_usage(user)
    if usage.full:
        raise StorageFull(usage)
