"""A Simulator in a background thread with its own event loop, for sync tests and commands."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading

from comfysim.server import Simulator


class SimulatorThread:
    """Runs a Simulator in a background thread with its own event loop, for sync tests and commands.

    with SimulatorThread(time_scale=0) as server:
        httpx.post(f"{server.url}/prompt", json={"prompt": graph})
        server.restart(down_for=0.5)
    """

    def __init__(self, **simulator_kwargs):
        self.sim = Simulator(**simulator_kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.sim.url

    def start(self, host: str = "127.0.0.1", port: int = 0) -> SimulatorThread:
        loop = asyncio.new_event_loop()
        started: concurrent.futures.Future = concurrent.futures.Future()

        def serve():
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.sim.start(host, port))
            except BaseException as exc:
                started.set_exception(exc)
            else:
                started.set_result(None)
                loop.run_forever()
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

        self._thread = threading.Thread(target=serve, name=f"comfy-simulator-{self.sim.name}", daemon=True)
        self._thread.start()
        try:
            started.result()
        except BaseException:
            self._thread.join()
            self._thread = None
            raise
        self._loop = loop
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        try:
            self.call(self.sim.stop)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._thread = self._loop = None

    def __enter__(self) -> SimulatorThread:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def call(self, fn, *args, **kwargs):
        """Runs fn on the simulator's loop (awaiting it if it returns an awaitable) and returns its result."""

        async def invoke():
            result = fn(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result

        if self._loop is None:
            raise RuntimeError("SimulatorThread is not started")
        return asyncio.run_coroutine_threadsafe(invoke(), self._loop).result()

    def drop_sockets(self) -> None:
        self.call(self.sim.drop_sockets)

    def restart(self, down_for: float = 0.0) -> None:
        self.call(self.sim.restart, down_for)

    def stall(self) -> None:
        self.call(self.sim.stall)

    def unplug(self) -> None:
        self.call(self.sim.unplug)

    def plug(self) -> None:
        self.call(self.sim.plug)

    def unstall(self) -> None:
        self.call(self.sim.unstall)

    def fail_node(self, target: str, message: str = "Simulated failure") -> None:
        self.call(self.sim.fail_node, target, message)

    def set_time_scale(self, factor: float) -> None:
        self.call(self.sim.set_time_scale, factor)
