"""
The cyclic garbage collector's pauses, kept short in the hub's long-running processes (Daphne, run_upstream).

A full collection walks every object the process holds and stops the event loop while it does: with a thousand
open browser sockets one Daphne process holds so many that a full collection took 150-260 ms on a busy 2-core
machine, and every progress push of every window waited for it (BENCHMARKS.md). So:

- what the process built to start (Django, the URLconf, templates) is frozen: no collection walks it again;
- what survives a full collection is frozen as well, so the following ones walk only what is newer;
- every `full_every` seconds a full collection walks everything again, frozen objects included, so that cycles
  that became garbage after they were frozen (the objects of a socket that has closed since) are freed: the one
  long pause, at a known rate instead of whenever the heap has grown by a quarter.

Reference counting, which frees most objects, is not affected. The pauses, by generation, are a histogram on
/metrics (`comfyhub_gc_pause_seconds`). Self-contained (gc, time, prometheus_client), like comfyhub/looplag.py.
"""

import gc
import time

from prometheus_client import Histogram

from comfyhub.looplag import BUCKETS, REGISTRY

PAUSE = Histogram(
    "comfyhub_gc_pause_seconds",
    "How long the cyclic garbage collector stopped this process, by generation (2: a full collection).",
    ["generation"],
    buckets=BUCKETS,
    registry=REGISTRY,
)

_installed = []


class QuietCollector:
    """A `gc.callbacks` entry: measures each collection and freezes the survivors of each full one."""

    def __init__(self, full_every, histogram=PAUSE, clock=time.monotonic):
        self.full_every = full_every
        self.histogram = histogram
        self.clock = clock
        self.full_at = clock()  # when everything was last walked
        self.began = None

    def __call__(self, phase, info):
        generation = info.get("generation")
        if phase == "start":
            self.began = time.perf_counter()
            if generation == 2 and self.clock() - self.full_at >= self.full_every:
                gc.unfreeze()  # this collection walks everything, and frees what became garbage while frozen
                self.full_at = self.clock()
            return
        if self.began is not None:
            self.histogram.labels(str(generation)).observe(time.perf_counter() - self.began)
            self.began = None
        if generation == 2:
            gc.freeze()  # the survivors: none of the next collections walks them until the next full one


def install(full_every=600.0):
    """Quiet this process's collector (once): collect and freeze what starting built. Returns the callback."""
    if _installed:
        return _installed[0]
    callback = QuietCollector(full_every)
    gc.callbacks.append(callback)
    _installed.append(callback)
    gc.collect()  # a full collection: what the process built to start is frozen by the callback
    return callback
