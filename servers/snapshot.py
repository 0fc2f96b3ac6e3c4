"""
The pool's capabilities as request handlers judge a new graph by (tasks/submission.py check_runnable): read at
most every SNAPSHOT_SECONDS per process instead of on every submission. A real server's summary is tens of
kilobytes of JSON, and a pool has many servers. A server saved in this process is seen at once; one whose
capabilities a worker refreshed is seen within SNAPSHOT_SECONDS (until then a submission is judged by the old
ones, and a graph refused or accepted by mistake is judged again by the dispatcher).
"""

import threading
import time

from servers.models import Server

SNAPSHOT_SECONDS = 2.0
_snapshot = {"at": float("-inf"), "servers": ()}
_lock = threading.Lock()


def pool_capabilities():
    """((name, capabilities), ...) of the enabled servers, at most SNAPSHOT_SECONDS old."""
    with _lock:
        if time.monotonic() - _snapshot["at"] >= SNAPSHOT_SECONDS:
            _snapshot["servers"] = tuple(Server.objects.enabled().values_list("name", "capabilities"))
            _snapshot["at"] = time.monotonic()
        return _snapshot["servers"]


def forget(**kwargs):
    """A server was saved or deleted in this process: the next judgement reads the pool again."""
    with _lock:
        _snapshot["at"] = float("-inf")
