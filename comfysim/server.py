"""
A ComfyUI server simulator: ComfyUI 0.26's (or 0.3.64's) HTTP + websocket protocol, as measured on real servers,
on aiohttp (like ComfyUI), without a GPU.

It copies the real server's behaviour including the parts that hurt clients: one job at a time (lowest `number`
first), no prompt_id deduplication, execution messages only to the socket of the job's clientId and never
replayed, history in memory only, the node cache (`execution_cached`, no new file for a fully cached rerun), 400
replies with ComfyUI's error shapes, and the same-clientId socket bug (a socket of a clientId that connects again
is orphaned when the older socket closes; turn it off with `faithful_socket_bug=False`).

This module holds the server's state, its queue worker and its websockets; the HTTP routes are in routes.py,
fault injection in faults.py, one prompt's execution in jobs.py and the nodes in nodes.py.

Detecting a restart: like a real ComfyUI process, a restarted simulator has lost its queue and history.
`GET /system_stats` shows each start in `system.argv`, which ends with
`"--simulator-name", NAME, "--simulator-started", "<ISO 8601 UTC time of this start>"`: a changed value means
the server was restarted since it was last seen.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import heapq
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import WSMsgType, web

from comfysim.faults import Faults
from comfysim.jobs import Job
from comfysim.jobs_api import JobsRoutes
from comfysim.nodes import Folders, Interrupted, OutputCache
from comfysim.protocol import (
    COMFYUI_VERSION,
    JOBS_API_VERSION,
    MAXIMUM_HISTORY_SIZE,
    PREVIEW_METHODS,
    SERVER_FEATURES,
    SERVER_FEATURES_0_26,
    SLICE_SECONDS,
    version_at_least,
)
from comfysim.routes import HttpRoutes

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Socket:
    ws: web.WebSocketResponse
    request: web.Request
    client_id: str
    feature_flags: dict = field(default_factory=dict)


class Simulator(Faults, JobsRoutes, HttpRoutes):
    """One simulated ComfyUI server, run on the caller's event loop.

    time_scale multiplies every node's duration (1.0 looks real: txt2img ~4 s, slow.json ~10 s; 0 runs nodes
    instantly but still yields to the loop between nodes and steps). output_dir holds input/, output/ and
    temp/; None means a fresh temporary folder, removed by stop(). `url` and `port` are set once started.
    executed_prompt_ids (every job started, in order, repeats kept) and busy_seconds (time spent running
    jobs) are statistics for tests and benchmarks; they survive restart().

    comfyui_version is the ComfyUI release it plays: "0.26.0" (the default) or "0.3.64", as measured (see
    comfyui-protocol.md §7 for what differs: UUID prompt ids, missing_node_type, Sec-Fetch-Site, /api/jobs,
    create_time, empty outputs of a fully cached rerun without client_id); any other version string is reported
    by /system_stats and behaves as the nearest of the two below it. preview_method is ComfyUI's --preview-method
    flag (none, auto, latent2rgb, taesd): whether KSampler sends sampler previews as binary frames. A version 0.5
    or later lets a prompt's extra_data.preview_method override it, as ComfyUI does.
    """

    def __init__(
        self,
        *,
        time_scale: float = 1.0,
        output_dir: str | Path | None = None,
        name: str = "sim",
        faithful_socket_bug: bool = True,
        comfyui_version: str = COMFYUI_VERSION,
        preview_method: str = "none",
    ):
        if time_scale < 0:
            raise ValueError("time_scale must be >= 0")
        self.time_scale = float(time_scale)
        self.name = name
        self.faithful_socket_bug = faithful_socket_bug
        if preview_method not in PREVIEW_METHODS:
            raise ValueError(f"preview_method must be one of {', '.join(PREVIEW_METHODS)}")
        self.comfyui_version = comfyui_version
        self.preview_method = preview_method
        self._owns_root = output_dir is None
        self._root = Path(output_dir).resolve() if output_dir is not None else None
        self.folders: Folders | None = None
        self.url = ""
        self.port = 0
        self._host = "127.0.0.1"
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []
        self._open_sockets: set[_Socket] = set()
        self._failures: dict[str, str] = {}
        # Statistics for tests and benchmarks; they survive restarts.
        self.executed_prompt_ids: list[str] = []
        self.busy_seconds = 0.0
        # (prompt_id, wall-clock start, wall-clock end, ran to success) of every job started: idle gaps between
        # jobs, and how many times a prompt really completed.
        self.job_log: list[tuple[str, float, float, bool]] = []
        # What this server lacks, like a differently equipped GPU box: see limit_capabilities().
        self.missing_nodes: set[str] = set()
        self.checkpoints: list[str] | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        """Everything a ComfyUI process keeps in memory only, i.e. what a restart loses."""
        self._pending: list[tuple] = []  # heap of (number, prompt_id, sequence, item)
        self._sequence = 0
        self._running: list | None = None
        self._running_client_id: str | None = None
        self._last_node_id: str | None = None
        self._history: dict[str, dict] = {}
        self._cache = OutputCache()
        self._number = 0
        self._interrupt_requested = False
        self._sockets: dict[str, _Socket] = {}
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._wakeup = asyncio.Event()
        self._gate = asyncio.Event()  # cleared while stalled
        self._gate.set()
        self.started_at = datetime.datetime.now(datetime.UTC)

    @property
    def modern(self) -> bool:
        """Whether this server behaves as ComfyUI 0.26 (True) or as 0.3.64."""
        return version_at_least(self.comfyui_version, JOBS_API_VERSION)

    @property
    def features(self) -> dict:
        """GET /features, and the reply to a socket's feature_flags message."""
        return SERVER_FEATURES_0_26 if self.modern else SERVER_FEATURES

    # --- lifecycle ------------------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if self._runner is not None:
            raise RuntimeError(f"Simulator {self.name} is already running at {self.url}")
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix=f"comfy-sim-{self.name}-")).resolve()
        self.folders = Folders(*(str(self._root / kind) for kind in ("input", "output", "temp")))
        for folder in (self.folders.input, self.folders.output):
            os.makedirs(folder, exist_ok=True)
        self._reset_state()
        self._wipe_temp()
        await self._listen(host, port)
        logger.info("ComfyUI simulator %s listening on %s (files in %s)", self.name, self.url, self._root)

    async def stop(self) -> None:
        await self._close()
        if self._owns_root and self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
        logger.info("ComfyUI simulator %s stopped", self.name)

    async def _listen(self, host: str, port: int) -> None:
        runner = web.AppRunner(self._make_app(), handle_signals=False, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._host = runner, host
        self.port = runner.addresses[0][1]
        self.url = f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"
        self._tasks = [asyncio.create_task(self._worker()), asyncio.create_task(self._publisher())]
        for task in self._tasks:
            task.add_done_callback(self._report_crash)

    def _report_crash(self, task: asyncio.Task) -> None:
        # The worker and the publisher never return; if one dies the simulator is broken: say so loudly.
        if not task.cancelled() and task.exception() is not None:
            logger.error("Simulator %s: background task died", self.name, exc_info=task.exception())

    async def _close(self) -> None:
        """Stops listening and aborts everything in flight, like a killed process."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self._abort_sockets()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _wipe_temp(self) -> None:
        # ComfyUI empties temp/ on every start (PreviewImage files).
        shutil.rmtree(self.folders.temp, ignore_errors=True)
        os.makedirs(self.folders.temp, exist_ok=True)

    # --- fault injection ------------------------------------------------------------------------------------

    async def _abort_sockets(self) -> None:
        for sock in list(self._open_sockets):
            transport = sock.request.transport
            if transport is not None:
                transport.abort()
        # Wait for the handlers' cleanup, so the socket table is settled when this returns.
        for _ in range(200):
            if not self._open_sockets:
                break
            await asyncio.sleep(0.005)

    def queue_snapshot(self) -> tuple[list, list]:
        """(running items, pending items) exactly as GET /queue shows them."""
        running = [self._running] if self._running is not None else []
        return copy.deepcopy(running), copy.deepcopy([entry[-1] for entry in self._pending])

    def connected_clients(self) -> list[str]:
        """The clientIds in the socket table (an orphaned socket of §2.6 is not in it)."""
        return list(self._sockets)

    # --- queue and worker -----------------------------------------------------------------------------------


    def _queue_info(self) -> dict:
        return {"exec_info": {"queue_remaining": len(self._pending) + (self._running is not None)}}

    def _queue_updated(self) -> None:
        self._emit("status", {"status": self._queue_info()})

    def _check_interrupt(self) -> None:
        if self._interrupt_requested:
            self._interrupt_requested = False
            raise Interrupted()

    async def _spend(self, seconds: float) -> None:
        remaining = seconds
        while True:
            await self._gate.wait()
            scale = self.time_scale
            if remaining <= 0 or scale <= 0:
                await asyncio.sleep(0)  # still let the server answer between nodes and steps
                return
            chunk = min(remaining, SLICE_SECONDS / scale)
            await asyncio.sleep(chunk * scale)
            remaining -= chunk

    async def _worker(self) -> None:
        while True:
            await self._gate.wait()
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            item = heapq.heappop(self._pending)[-1]
            self._running = item
            self._queue_updated()
            job = Job(self, item)
            self._running_client_id = job.client_id
            self.executed_prompt_ids.append(job.prompt_id)
            started, started_wall = time.monotonic(), time.time()
            ended = False  # stays False when a restart cuts the job off
            try:
                await job.run()
                ended = True
            except Exception:
                # A bug in the simulator, not a simulated failure: keep the worker alive and say so loudly.
                logger.exception("Simulator %s: job %s crashed", self.name, job.prompt_id)
                job.success = False
            finally:
                self.busy_seconds += time.monotonic() - started
                self.job_log.append((job.prompt_id, started_wall, time.time(), ended and job.success))
            self._task_done(job)
            if job.client_id is not None:
                self._emit("executing", {"node": None, "prompt_id": job.prompt_id}, job.client_id)

    def _task_done(self, job: Job) -> None:
        self._running = None
        if len(self._history) > MAXIMUM_HISTORY_SIZE:
            self._history.pop(next(iter(self._history)))
        status = {"status_str": "success" if job.success else "error", "completed": job.success}
        self._history[job.prompt_id] = {
            "prompt": job.item,
            "outputs": job.outputs,
            "status": {**status, "messages": job.status_messages},
            "meta": job.meta,
        }
        self._queue_updated()

    # --- websocket ------------------------------------------------------------------------------------------

    def _emit(self, event: str, data: dict, sid: str | None = None) -> None:
        # Serialised now: the data (e.g. progress_state) keeps changing after the message is queued.
        self._outbox.put_nowait((json.dumps({"type": event, "data": data}), sid))

    def _emit_binary(self, frame: bytes, sid: str | None) -> None:
        self._outbox.put_nowait((frame, sid))

    def _preview_method(self, extra_data: dict) -> str:
        """How a job draws sampler previews: the server's flag, or (0.5 and later) what its prompt asks."""
        asked = extra_data.get("preview_method")
        if asked in PREVIEW_METHODS and version_at_least(self.comfyui_version, (0, 5)):
            return asked
        return self.preview_method

    def _supports_preview_metadata(self, sid: str | None) -> bool:
        sock = self._sockets.get(sid) if sid is not None else None
        return bool(sock and sock.feature_flags.get("supports_preview_metadata"))

    async def _publisher(self) -> None:
        # ComfyUI's publish_loop: one ordered stream; sid None is a broadcast; a sid without a socket is dropped.
        while True:
            message, sid = await self._outbox.get()
            if sid is None:
                targets = list(self._sockets.values())
            else:
                targets = [self._sockets[sid]] if sid in self._sockets else []
            for sock in targets:
                await self._send(sock.ws, message)

    async def _send(self, ws: web.WebSocketResponse, message: str | bytes) -> None:
        if ws.closed:
            return
        try:
            if isinstance(message, bytes):
                await ws.send_bytes(message)
            else:
                await ws.send_str(message)
        except (ConnectionError, RuntimeError) as exc:
            logger.debug("Simulator %s: send to a closing socket failed: %s", self.name, exc)

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.query.get("clientId", "")
        if sid:
            # §2.6: the older socket of this clientId leaves the table but is not closed.
            self._sockets.pop(sid, None)
        else:
            sid = uuid.uuid4().hex
        sock = _Socket(ws, request, sid)
        self._sockets[sid] = sock
        self._open_sockets.add(sock)
        try:
            await self._send(ws, json.dumps({"type": "status", "data": {"status": self._queue_info(), "sid": sid}}))
            if self._running is not None and self._running_client_id == sid and self._last_node_id is not None:
                # §2.5: the reconnecting owner of the running job learns the current node, and only that.
                await self._send(ws, json.dumps({"type": "executing", "data": {"node": self._last_node_id}}))
            first_message = True
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    logger.warning("Simulator %s: invalid JSON from client %s", self.name, sid)
                    continue
                if first_message and isinstance(data, dict) and data.get("type") == "feature_flags":
                    sock.feature_flags = data.get("data") or {}
                    await self._send(ws, json.dumps({"type": "feature_flags", "data": self.features}))
                first_message = False
        finally:
            self._open_sockets.discard(sock)
            if self.faithful_socket_bug:
                # §2.6, reproduced: this pops whatever socket holds the clientId now, maybe a newer one.
                self._sockets.pop(sid, None)
            elif self._sockets.get(sid) is sock:
                del self._sockets[sid]
        return ws

    # --- HTTP -----------------------------------------------------------------------------------------------
