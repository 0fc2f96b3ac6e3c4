"""
Retention: remove what is older than an age from hub storage, the files first and then their rows.

- the outputs of finished tasks (succeeded, failed or cancelled before the age), with their thumbnails and their
  v2 assets (an output's asset shares its file, and goes with its row); each task so pruned gets an
  `outputs_removed` event on its timeline, so that its page says where its results went;
- uploads older than the age that no active task (queued, submitted, running) will send to a server;
- assets users sent to the v2 API, older than the age (a job that named one took an upload of its bytes).

A file that is already gone counts as removed. A file the store refuses to delete keeps its row (so that nothing
is forgotten while its bytes still take space) and is reported; `manage.py prune_outputs` exits 1 then.
"""

import re
from dataclasses import dataclass, field
from datetime import timedelta

from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from tasks.models import TERMINAL_STATUSES, Asset, Task, TaskOutput, Upload
from tasks.quota import human_size
from tasks.storage import delete_quietly

AGE = re.compile(r"^\s*(\d{1,9})\s*([dhm])\s*$")
UNITS = {"d": ("days", 86400), "h": ("hours", 3600), "m": ("minutes", 60)}
MAX_AGE = timedelta(days=36500)
EVENT_KIND = "outputs_removed"


def parse_age(text):
    """`30d`, `12h` or `90m` as a timedelta; ValueError with a sentence for anything else."""
    match = AGE.match(text or "")
    if not match:
        raise ValueError(
            f"The age {text!r} is not a duration: give a whole number followed by d (days), h (hours) or "
            "m (minutes), e.g. 30d."
        )
    number, unit = int(match.group(1)), match.group(2)
    age = timedelta(seconds=number * UNITS[unit][1])
    if age <= timedelta(0):
        raise ValueError("The age must be more than zero: everything finished before now is not a retention policy.")
    if age > MAX_AGE:
        raise ValueError(f"The age {text!r} is longer than {MAX_AGE.days} days.")
    return age


def describe_age(age):
    """An age as parse_age reads it, in its largest whole unit: 30d, 36h, 90m."""
    seconds = int(age.total_seconds())
    for unit, (_, factor) in UNITS.items():
        if seconds % factor == 0:
            return f"{seconds // factor}{unit}"
    return f"{seconds}s"


def in_chunks(queryset, size=500):
    """
    The rows of `queryset`, its ids read first and the rows fetched a chunk at a time: the loops below delete rows
    of the very table they walk, which an open cursor on SQLite would not survive.
    """
    ids = list(queryset.values_list("pk", flat=True))
    for start in range(0, len(ids), size):
        yield from queryset.filter(pk__in=ids[start : start + size])


def plural(count, noun):
    return f"{count} {noun}{'' if count == 1 else 's'}"


def in_use_uploads():
    """Ids of the uploads an active task will copy to its server (Task.image_inputs, what sending reads)."""
    used = set()
    for bindings in Task.objects.active().exclude(image_inputs=[]).values_list("image_inputs", flat=True).iterator():
        used.update(str(binding.get("upload")) for binding in bindings or () if isinstance(binding, dict))
    return used


@dataclass
class Tally:
    count: int = 0
    size: int = 0

    def add(self, size):
        self.count += 1
        self.size += size or 0

    def words(self, noun):
        return f"{plural(self.count, noun)} ({human_size(self.size)})"


@dataclass
class Report:
    """What a run removed (or would remove), line by line, with the totals and the files that would not go."""

    age: timedelta
    dry_run: bool
    lines: list = field(default_factory=list)
    outputs: Tally = field(default_factory=Tally)
    tasks: int = 0
    uploads: Tally = field(default_factory=Tally)
    assets: Tally = field(default_factory=Tally)
    kept_in_use: int = 0
    failures: list = field(default_factory=list)

    def say(self, text):
        self.lines.append(text)

    def summary(self):
        verb = "Would remove" if self.dry_run else "Removed"
        text = (
            f"{verb} {plural(self.outputs.count, 'output')} of {plural(self.tasks, 'task')} "
            f"({human_size(self.outputs.size)}), {self.uploads.words('upload')} and {self.assets.words('asset')}, "
            f"older than {describe_age(self.age)}"
        )
        if self.kept_in_use:
            text += f"; kept {plural(self.kept_in_use, 'upload')} an active task uses"
        if self.failures:
            text += f"; {plural(len(self.failures), 'file')} could not be deleted"
        return text + (". Nothing was changed (dry run)." if self.dry_run else ".")


def _delete_file(name, storage, report, what):
    """Remove `name` from the store; True when it is gone (or was already), False when the store refused."""
    if not name:
        return True
    try:
        storage.delete(name)
    except Exception as exc:  # a disk answers with OSError, a bucket with botocore's errors
        report.failures.append((name, f"{type(exc).__name__}: {exc}"))
        report.say(f"  could not delete {name} ({what}): {type(exc).__name__}: {exc}; its row is kept")
        return False
    return True


def prune(age, user=None, dry_run=False, now=None, storage=None):
    """Remove (or, with dry_run, list) what is older than `age`, of every user or of `user`; returns a Report."""
    storage = storage or default_storage
    cutoff = (now or timezone.now()) - age
    report = Report(age=age, dry_run=dry_run)
    _prune_outputs(cutoff, user, dry_run, storage, report)
    _prune_uploads(cutoff, user, dry_run, storage, report)
    _prune_assets(cutoff, user, dry_run, storage, report)
    return report


def _prune_outputs(cutoff, user, dry_run, storage, report):
    tasks = Task.objects.filter(
        status__in=TERMINAL_STATUSES, finished_at__lt=cutoff, pk__in=TaskOutput.objects.values("task_id")
    )
    if user is not None:
        tasks = tasks.filter(owner=user)
    tasks = tasks.select_related("owner", "workflow").order_by("finished_at", "pk")
    # What the lines and the event need, not each task's graph.
    tasks = tasks.only("status", "finished_at", "server_id", "prompt_id", "owner__username", "workflow__slug")
    for task in in_chunks(tasks):
        outputs = list(TaskOutput.objects.filter(task=task).order_by("created_at", "pk"))
        label = (
            f"task {task.pk} ({task.owner.get_username()}, {task.workflow.slug if task.workflow else 'raw graph'}, "
            f"{task.status} {task.finished_at:%Y-%m-%d %H:%M})"
        )
        removed = Tally()
        if dry_run:
            for output in outputs:
                removed.add(output.size)
        else:
            gone = []
            for output in outputs:
                if _delete_file(output.file.name, storage, report, f"output of task {task.pk}"):
                    delete_quietly(f"thumbs/{task.pk}/{output.pk}.jpg", storage)  # made again on demand anyway
                    gone.append(output.pk)
                    removed.add(output.size)
            if gone:
                with transaction.atomic():
                    TaskOutput.objects.filter(pk__in=gone).delete()  # and each output's asset with it
                    task.record(
                        EVENT_KIND,
                        f"outputs removed by retention: {removed.count} file(s), {human_size(removed.size)}",
                        {"outputs": removed.count, "bytes": removed.size},
                        touch=False,  # news of storage, not of the task: it must not look alive
                    )
        if removed.count:
            report.tasks += 1
            report.outputs.count += removed.count
            report.outputs.size += removed.size
            verb = "would remove" if dry_run else "removed"
            report.say(f"{label}: {verb} {removed.words('output')}")


def _prune_uploads(cutoff, user, dry_run, storage, report):
    uploads = Upload.objects.filter(created_at__lt=cutoff).select_related("owner").order_by("created_at", "pk")
    if user is not None:
        uploads = uploads.filter(owner=user)
    # Read once, just before the loop: a task submitted meanwhile that names one of these old uploads (an "edit and
    # run" of an old task) would find it gone when sent, and fail. The window is this loop; run retention at a
    # quiet hour.
    in_use = in_use_uploads()
    for upload in in_chunks(uploads):
        label = (
            f"upload {upload.pk} ({upload.owner.get_username()}, {upload.original_name!r}, "
            f"uploaded {upload.created_at:%Y-%m-%d %H:%M}, {human_size(upload.size)})"
        )
        if str(upload.pk) in in_use:
            report.kept_in_use += 1
            report.say(f"{label}: kept, an active task uses it")
            continue
        if not dry_run:
            if not _delete_file(upload.file.name, storage, report, f"upload {upload.pk}"):
                continue
            upload.delete()
        report.uploads.add(upload.size)
        report.say(f"{label}: {'would remove' if dry_run else 'removed'}")


def _prune_assets(cutoff, user, dry_run, storage, report):
    assets = Asset.objects.uploaded().filter(created_at__lt=cutoff).select_related("owner").order_by("created_at", "pk")
    if user is not None:
        assets = assets.filter(owner=user)
    for asset in in_chunks(assets):
        label = (
            f"asset {asset.pk} ({asset.owner.get_username()}, {asset.original_name or 'no name'!r}, "
            f"sent {asset.created_at:%Y-%m-%d %H:%M}, {human_size(asset.size)})"
        )
        if not dry_run:
            if not _delete_file(asset.file.name, storage, report, f"asset {asset.pk}"):
                continue
            asset.delete()
        report.assets.add(asset.size)
        report.say(f"{label}: {'would remove' if dry_run else 'removed'}")
