"""
Affinity: a user's tasks that share an upload, or an identical graph, are pinned to one server while any of them
is pending (servers/pool.py pins them), so that ComfyUI's cache and the copied image are reused there.
"""

import hashlib
import json

from django.db.models import Exists

from servers.models import Lock, LockPurpose


def graph_digest(graph):
    return hashlib.sha256(json.dumps(graph, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def affinity_keys(task):
    """The affinity lock keys of a task: each upload it uses, and its exact graph."""
    keys = [f"upload:{binding['upload']}" for binding in task.image_inputs]
    if task.graph_hash:
        keys.append(f"graph:{task.owner_id}:{task.graph_hash}")
    return keys


def release_affinity(task):
    """
    Release the affinity locks of a finished task that no other active task of its owner still needs. Asked by
    key, so the cost does not grow with the owner's queue: the graph's through the indexed hash, the uploads'
    among the owner's active tasks that use any upload at all (their bindings only).
    """
    keys = set(affinity_keys(task))
    if not keys:
        return 0
    others = type(task).objects.active().filter(owner_id=task.owner_id).exclude(pk=task.pk)
    locks = Lock.objects.filter(purpose=LockPurpose.AFFINITY)
    released = 0
    graph_key = f"graph:{task.owner_id}:{task.graph_hash}"
    if graph_key in keys:
        # One statement: DELETE … WHERE NOT EXISTS (another active task of the owner with the same graph).
        released += locks.filter(key=graph_key).filter(~Exists(others.filter(graph_hash=task.graph_hash))).delete()[0]
    uploads = {key for key in keys if key.startswith("upload:")}
    if uploads:
        for bindings in others.exclude(image_inputs=[]).values_list("image_inputs", flat=True).iterator():
            uploads -= {f"upload:{binding['upload']}" for binding in bindings}
            if not uploads:
                break
        if uploads:
            released += locks.filter(key__in=uploads).delete()[0]
    return released
