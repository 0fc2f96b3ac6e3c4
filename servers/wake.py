"""
Waking the upstream supervisors when there is new work: a queued task, a cancel request, a freed slot. Request
handlers and models call notify_work(); a supervisor subscribes while it runs. At the bottom of the house, so that
nothing which wakes the supervisors has to import them.
"""

import contextlib
import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings

logger = logging.getLogger(__name__)

# The channel-layer group every supervisor process listens on (production: run_upstream workers).
SUPERVISOR_GROUP = "comfyhub.supervisors"
# Supervisors running in this process: they are woken directly, without the channel layer.
_subscribers = []


def subscribe(callback):
    """`callback(cancel)` (thread-safe, quick) is called on every notify_work() of this process."""
    _subscribers.append(callback)


def unsubscribe(callback):
    with contextlib.suppress(ValueError):
        _subscribers.remove(callback)


def notify_work(cancel=False):
    """
    Tell every supervisor that there is new work; `cancel`: a cancel request, which supervisors otherwise look for
    once a tick. Supervisors also look every second: a lost call only delays.
    """
    for callback in list(_subscribers):
        callback(cancel)
    if not _subscribers and settings.REDIS_URL:
        try:
            message = {"type": "supervisor.wake", "cancel": cancel}
            async_to_sync(get_channel_layer().group_send)(SUPERVISOR_GROUP, message)
        except Exception:
            logger.exception("could not wake the supervisors")
