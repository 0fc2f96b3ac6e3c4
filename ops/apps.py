import logging

from django.apps import AppConfig
from django.db import transaction

transitions = logging.getLogger("comfyhub.tasks")

TRANSITION_LINE = "task=%s server=%s prompt_id=%s from=%s to=%s kind=%s"


class OpsConfig(AppConfig):
    name = "ops"
    verbose_name = "Operations"

    def ready(self):
        from django.db.models.signals import post_save

        from tasks.models import TaskEvent

        post_save.connect(log_task_event, sender=TaskEvent, dispatch_uid="ops.log_task_event")


def log_task_event(sender, instance, created, raw=False, using=None, **kwargs):
    """
    One line per TaskEvent for log pipelines (`task=… server=… prompt_id=… from=… to=… kind=…`). It is written
    when the transaction commits: a line about a transition that was rolled back would lie.
    """
    if not created or raw or not transitions.isEnabledFor(logging.INFO):
        return
    args = (
        instance.task_id,
        server_name(instance),
        instance.prompt_id or "-",
        instance.from_status or "-",
        instance.to_status or "-",
        instance.kind,
    )
    transaction.on_commit(lambda: transitions.info(TRANSITION_LINE, *args), using=using)


def server_name(event):
    """The event's server name, from objects already in memory when possible (a transition has its task's)."""
    from servers.models import Server
    from tasks.models import Task, TaskEvent

    if event.server_id is None:
        return "-"
    if TaskEvent.server.is_cached(event) and event.server is not None:
        return event.server.name
    if TaskEvent.task.is_cached(event):
        task = event.task
        if task.server_id == event.server_id and Task.server.is_cached(task) and task.server is not None:
            return task.server.name
    name = Server.objects.filter(pk=event.server_id).values_list("name", flat=True).first()
    return name or str(event.server_id)
