"""What each long-running hub process does once it runs: Daphne (by `manage.py serve` or plain `daphne`) and
`manage.py run_upstream`."""

import sys
from pathlib import Path

from django.conf import settings

from comfyhub import collector, looplag


def started(loop=None, watch_loop=True):
    """Watch the event loop's lag (on /metrics) and keep the garbage collector's pauses short."""
    if watch_loop:
        looplag.watch(loop)
    full_every = settings.COMFYHUB["GC_FULL_SECONDS"]
    if full_every > 0:
        collector.install(full_every)


def run_by_daphne():
    """Whether this process is Daphne's own command (`daphne` or `python -m daphne`), not a test or a command."""
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    return program.name == "daphne" or program.parts[-2:] == ("daphne", "__main__.py")
