"""A task's states, the groups the pages and the engine ask for, and the queries that select them."""

from django.db import models
from django.utils import timezone


class TaskStatus(models.TextChoices):
    QUEUED = "queued", "queued"
    """Waiting in the hub for a server."""
    SUBMITTED = "submitted", "submitted"
    """Bound to a server and prompt_id; sent (or being sent) to its queue."""
    RUNNING = "running", "running"
    """The server has started executing it."""
    SUCCEEDED = "succeeded", "succeeded"
    """Finished and every output is in hub storage."""
    FAILED = "failed", "failed"
    """Finished with an error stored on the task."""
    CANCELLED = "cancelled", "cancelled"
    """Stopped at a user's request."""


ACTIVE_STATUSES = (TaskStatus.QUEUED, TaskStatus.SUBMITTED, TaskStatus.RUNNING)
ON_SERVER_STATUSES = (TaskStatus.SUBMITTED, TaskStatus.RUNNING)
TERMINAL_STATUSES = (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED)
# What a task list may be filtered by, on the page and in the API: "active" (not ended yet) or one status.
STATUS_FILTERS = ("active", *TaskStatus.values)


class TaskQuerySet(models.QuerySet):
    def queued(self):
        return self.filter(status=TaskStatus.QUEUED)

    def active(self):
        return self.filter(status__in=ACTIVE_STATUSES)

    def with_status(self, name):
        """The tasks a status filter (one of STATUS_FILTERS) shows."""
        return self.active() if name == "active" else self.filter(status=name)

    def on_server(self, server):
        return self.filter(server=server, status__in=ON_SERVER_STATUSES)

    def for_user(self, user):
        return self.filter(owner=user)

    def quiet(self, for_):
        return self.active().filter(last_event_at__lt=timezone.now() - for_)
