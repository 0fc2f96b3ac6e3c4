"""What a task's row says in words: its prompt and settings in a line, and where it stands as a user reads it."""

from django.contrib.humanize.templatetags.humanize import ordinal

from tasks.models import TaskStatus
from tasks.params import color_hex

KEY_SETTINGS = 4  # settings shown beside the prompt; the task's page has them all


def summarize(task):
    """{"prompt": the prompt or first text input, "settings": [(label, value)] of a few others}."""
    workflow = task.workflow
    if workflow is None:
        return {"prompt": "", "settings": [("graph", f"{len(task.graph)} nodes")]}
    inputs = task.inputs or {}
    prompt, settings = "", []
    for param in workflow.parameters:
        name, kind = param["name"], param["type"]
        if name not in inputs or kind == "image":
            continue
        if kind == "text":
            if not prompt and inputs[name]:
                prompt = inputs[name]
            continue
        if len(settings) < KEY_SETTINGS:
            value = color_hex(inputs[name]) if kind == "color" else inputs[name]
            settings.append(((param.get("label") or name).lower(), value))
    return {"prompt": prompt, "settings": settings}


def where(task, position=None):
    """Where the task stands, in a user's words: "waiting in gpu-1's queue, 2nd", "running on gpu-2"."""
    server = task.server.name if task.server_id and task.server else "a server"
    if task.status == TaskStatus.QUEUED:
        return f"waiting in the hub's queue, {ordinal(position)}" if position else "waiting in the hub's queue"
    if task.status == TaskStatus.SUBMITTED:
        return f"waiting in {server}'s queue, {ordinal(position)}" if position else f"waiting in {server}'s queue"
    if task.status == TaskStatus.RUNNING:
        return f"running on {server}"
    return task.get_status_display()
