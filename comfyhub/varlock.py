"""
One `manage.py serve` per var folder. The embedded hub registers its simulated servers and runs its supervisor on
the database in its var folder, so a second one started on the same folder would rewrite the first one's servers
and fight it for their sockets. An OS lock (flock) on a file in the folder, held for the life of the process, says
"taken": the kernel drops it when the process ends however it ends, so a crashed hub never blocks the next one.
"""

import fcntl
import os
from pathlib import Path

LOCK_NAME = "serve.lock"

_held = {}  # folder -> its open lock file: closing the file (or collecting it) would release the lock


class AlreadyServing(Exception):
    def __init__(self, folder, pid):
        self.folder, self.pid = folder, pid
        who = f"pid {pid}" if pid else "its pid not written yet"
        super().__init__(
            f"Another comfyhub is already serving from {folder} ({who}); stop it first, or give this one another "
            "folder with COMFYHUB_VAR_DIR."
        )


def hold(folder):
    """Take the folder's lock for the rest of this process, or raise AlreadyServing naming the holder's pid."""
    folder = Path(folder)
    if folder in _held:
        return
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_NAME, "a+")  # noqa: SIM115  (held open for the process's life on purpose)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().strip()
        handle.close()
        raise AlreadyServing(folder, pid) from None
    # Ours now: the pid is for the message of the next one that tries (the lock, not the file, is what counts).
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held[folder] = handle
