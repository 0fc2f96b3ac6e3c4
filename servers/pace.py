"""
How deep one server's pipeline must be so that it never waits for the hub.

A server holds its pipeline depth of our tasks: the running one and the next ones. When a task ends, the hub copies
its outputs, plans, claims and sends the next one: its refill time. The server runs what it already holds in the
meantime, so it idles only when the refill takes longer than the tasks waiting there take to run:

    depth needed = 1 + ceil(refill / job)

Seconds-long jobs need 2 (the default). Sub-second jobs (SDXL-Lightning, Flux-schnell, small image operations)
need more. Both times are measured here, as moving averages: the job from its start to its end message, the refill
from an end message to the server's answer to the next POST, counted only while tasks wait in the hub (a refill
that waited for a submission says nothing about the hub). The depth stays within pipeline_depth and
max_in_flight - 1: one slot above it stays free for the first task of a user who has nothing running.
"""

import math
import time

WEIGHT = 0.2  # of each new sample in the moving averages


class Pace:
    def __init__(self):
        self.job = None  # seconds, moving average
        self.refill = None  # seconds, moving average
        self.ended_at = None  # monotonic time of the last end message heard while tasks waited in the hub

    def ended(self, started_at_epoch, waiting):
        """A task's end message; it started at `started_at_epoch` (None: unknown). `waiting`: tasks wait in the hub."""
        if started_at_epoch is not None:
            self.job = _average(self.job, max(time.time() - started_at_epoch, 0.0))
        if waiting and self.ended_at is None:
            self.ended_at = time.monotonic()

    def refilled(self):
        """The server accepted a prompt: the refill since the end message before it, if one is open."""
        if self.ended_at is not None:
            self.refill = _average(self.refill, time.monotonic() - self.ended_at)
            self.ended_at = None

    def depth(self, server):
        """The pipeline depth for `server` now (its pipeline_depth until both times are known)."""
        base = server.effective_depth
        if self.job is None or self.refill is None:
            return base
        needed = 1 + math.ceil(self.refill / max(self.job, 0.001))
        return max(base, min(needed, max(server.max_in_flight, 1) - 1))


def _average(current, sample):
    return sample if current is None else current + WEIGHT * (sample - current)
