from django.db import models
from django.utils import timezone

from servers.models import Server
from tasks.fields import JSONField


class TaskEvent(models.Model):
    """Append-only trail: every transition, reconnect and reconciliation of a task, with the server involved."""

    task = models.ForeignKey("tasks.Task", on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(default=timezone.now, db_index=True)
    kind = models.CharField(max_length=40, db_index=True)
    from_status = models.CharField(max_length=16, blank=True)
    to_status = models.CharField(max_length=16, blank=True)
    server = models.ForeignKey(Server, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    prompt_id = models.CharField(max_length=64, blank=True)
    message = models.TextField(blank=True)
    detail = JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["at", "pk"]

    def __str__(self):
        return f"{self.kind} {self.from_status}→{self.to_status}"
