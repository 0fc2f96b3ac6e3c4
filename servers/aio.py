"""
Asyncio helpers the supervisor's pieces share: the ORM from the event loop, and background work whose failures are
logged, never swallowed. At the bottom of the house: nothing of the hub's is imported here.
"""

import asyncio
import logging
import random

from asgiref.sync import sync_to_async

logger = logging.getLogger(__name__)


def phase(interval):
    """
    A first wait somewhere within `interval`: the timers of servers connected together (a worker starting, a
    lease taken over) would otherwise fire together, and their burst of requests and writes holds up the live
    pushes of every task the process follows.
    """
    return random.uniform(0.0, interval)  # noqa: S311 (timing, not secrets)


def jittered(interval, spread=0.1):
    """`interval` give or take `spread` of it, so that timers spread apart stay apart."""
    return interval * random.uniform(1.0 - spread, 1.0 + spread)  # noqa: S311


def db(fn):
    """Run a sync ORM function from the supervisor's event loop."""
    return sync_to_async(fn, thread_sensitive=True)


async def cancel_and_wait(tasks):
    """
    Cancel the tasks and wait until every one has ended. One cancel is not always enough: cancelled while its sync
    function runs, asgiref's sync_to_async waits for the function and then returns normally, so the task goes on
    (a connection's socket loop would go on reading its socket, and whoever waits for it would wait until the
    server closes that socket).
    """
    tasks = [task for task in tasks if task is not None]
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: each task logs its own failures


class Background:
    """The background work of one connection: each failure logged, everything cancelled together at the end."""

    def __init__(self, name):
        self.name = name
        self.tasks = set()

    def spawn(self, coro, name=None):
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task):
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background work for %s failed", self.name, exc_info=task.exception())

    async def cancel(self):
        await cancel_and_wait(list(self.tasks))


class Throttle:
    """
    Leading-edge rate limit for one stream of changes: the first `poke()` after a quiet spell runs `send()` at once,
    later ones at most every `interval` seconds, and the newest state always goes out last (`send` reads the state
    when it runs, so the pokes in between fold into it). No fixed tick: nothing waits that need not.
    """

    def __init__(self, interval, send):
        self.interval = interval
        self.send = send
        self.dirty = False
        self.last = None
        self.runner = None

    def poke(self):
        self.dirty = True
        if self.runner is None or self.runner.done():
            self.runner = asyncio.create_task(self._run())

    async def _run(self):
        loop = asyncio.get_running_loop()
        while self.dirty:
            if self.last is not None:
                wait = self.last + self.interval - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            self.dirty = False
            self.last = loop.time()
            try:
                await self.send()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("a throttled send failed")  # the next poke tries again with newer state

    async def flush(self):
        """Send the newest state now if it has not gone out yet, and stop the pending send."""
        dirty, self.dirty = self.dirty, False
        self.close()
        if dirty:
            await self.send()

    def close(self):
        runner, self.runner = self.runner, None
        if runner is not None and not runner.done() and runner is not asyncio.current_task():
            runner.cancel()
