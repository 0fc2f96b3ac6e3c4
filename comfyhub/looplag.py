"""
Event-loop lag of this process: how much later than asked a short sleep on the event loop wakes up. Anything that
holds the loop (a render, a slow callback, a burst of frames) shows here as lag, and every socket served by the
loop waits that long. A histogram on /metrics (ops/metrics.py), per process: each Daphne answers for its own loop.

Self-contained on purpose (prometheus_client and asyncio only), so that a benchmark can load it into a hub of
another checkout as well.
"""

import asyncio
import time

from prometheus_client import CollectorRegistry, Histogram

INTERVAL = 0.05  # seconds slept between two observations
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)

REGISTRY = CollectorRegistry(auto_describe=True)
LAG = Histogram(
    "comfyhub_event_loop_lag_seconds",
    f"How much later than asked a {INTERVAL * 1000:.0f} ms sleep on this process's event loop woke up.",
    buckets=BUCKETS,
    registry=REGISTRY,
)

_watched = {}  # id(loop) -> the task measuring it


def watch(loop=None, histogram=LAG):
    """Start measuring `loop` (the running one by default), once per loop; returns the measuring task."""
    loop = loop or asyncio.get_event_loop()
    task = _watched.get(id(loop))
    if task is None or task.done():
        task = _watched[id(loop)] = loop.create_task(measure(histogram))
    return task


async def measure(histogram=LAG, interval=INTERVAL):
    while True:
        before = time.monotonic()
        await asyncio.sleep(interval)
        histogram.observe(max(0.0, time.monotonic() - before - interval))
