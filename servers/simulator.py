"""
A ComfyUI server simulator: ComfyUI 0.3.64's HTTP + websocket protocol, as measured in
/work/shared/comfyui-protocol.md, on aiohttp (like ComfyUI), without a GPU.

It backs the demo mode, the tests and the benchmarks, so it copies the real server's behaviour including the
parts that hurt clients: one job at a time (lowest `number` first), no prompt_id deduplication, execution
messages only to the socket of the job's clientId and never replayed, history in memory only, the node cache
(`execution_cached`, no new file for a fully cached rerun), 400 replies with ComfyUI's error shapes, and the
same-clientId socket bug of §2.6 (turn it off with `faithful_socket_bug=False`). The nodes, their durations and
the validation live in servers/simulator_nodes.py; the pictures are real PNG files written with Pillow.

Fault injection, for the hub's tests and demos (call from the simulator's loop, or through SimulatorThread):
`drop_sockets()`, `restart(down_for)`, `stall()`/`unstall()`, `fail_node(target)` and `set_time_scale(f)`.

Detecting a restart: like a real ComfyUI process, a restarted simulator has lost its queue and history.
`GET /system_stats` shows each start in `system.argv`, which ends with
`"--simulator-name", NAME, "--simulator-started", "<ISO 8601 UTC time of this start>"`: a changed value means
the server was restarted since it was last seen.

Run one from a shell with `python manage.py simulate_comfyui --port 8188`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import datetime
import heapq
import inspect
import ipaddress
import json
import logging
import mimetypes
import os
import shutil
import struct
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from urllib.parse import urlparse, urlsplit

from aiohttp import WSMsgType, web
from PIL import Image

from servers.simulator_nodes import (
    CHECKPOINTS,
    NODE_CLASSES,
    CacheEntry,
    ExecutionList,
    Folders,
    Interrupted,
    OutputCache,
    is_image_file,
    is_link,
    validate_prompt,
)

logger = logging.getLogger(__name__)

COMFYUI_VERSION = "0.3.64"
MAX_UPLOAD_SIZE = 100 * 1024 * 1024
SERVER_FEATURES = {"supports_preview_metadata": True, "max_upload_size": MAX_UPLOAD_SIZE}
MAXIMUM_HISTORY_SIZE = 10000
# Kept out of the queue item and the history (ComfyUI's SENSITIVE_EXTRA_DATA_KEYS).
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
MODEL_FOLDERS = [
    "checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision", "style_models",
    "embeddings", "diffusers", "vae_approx", "controlnet", "gligen", "upscale_models", "latent_upscale_models",
    "custom_nodes", "hypernetworks", "photomaker", "classifiers", "model_patches", "audio_encoders",
]  # fmt: skip
# Binary websocket frames: [uint32 event][payload]. PNG is the image format code inside PREVIEW_IMAGE.
PREVIEW_IMAGE, PREVIEW_IMAGE_WITH_METADATA, PNG = 1, 4, 2
# What aiohttp (and so ComfyUI) answers when a handler raises, e.g. on a body that is not JSON.
SERVER_ERROR_TEXT = "500 Internal Server Error\n\nServer got itself in trouble"
# A stalled or slowed node sleeps in slices of at most this many real seconds, so that stall() and
# set_time_scale() take effect within that time even in the middle of a long node.
SLICE_SECONDS = 0.1


def _now_ms() -> int:
    return int(time.time() * 1000)


def _type_name(ex: BaseException) -> str:
    # ComfyUI's full_type_name(): builtins by bare name, anything else with its module.
    module = type(ex).__module__
    return type(ex).__qualname__ if module == "builtins" else f"{module}.{type(ex).__qualname__}"


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass(eq=False)
class _Socket:
    ws: web.WebSocketResponse
    request: web.Request
    client_id: str
    feature_flags: dict = field(default_factory=dict)


class _NodeRun:
    """The NodeContext (see simulator_nodes) of one node execution."""

    def __init__(self, job: _Job, node_id: str):
        self.job = job
        self.node_id = node_id
        self.folders = job.sim.folders
        self.prompt = job.prompt
        self.extra_data = job.extra_data

    async def spend(self, seconds: float) -> None:
        await self.job.sim._spend(seconds)

    async def compute(self, fn, /, *args):
        return await asyncio.to_thread(fn, *args)

    async def progress(self, value: int, total: int, preview_png: bytes | None = None) -> None:
        await self.job.progress(self.node_id, value, total, preview_png)


class _Job:
    """One execution of a queue item: ComfyUI's PromptExecutor.execute() for one prompt."""

    def __init__(self, sim: Simulator, item: list):
        self.sim = sim
        self.item = item
        self.prompt_id = item[1]
        self.prompt: dict = item[2]
        self.extra_data: dict = item[3]
        self.outputs_to_execute: list[str] = item[4]
        self.client_id = self.extra_data.get("client_id")
        self.status_messages: list = []
        self.executed: list[str] = []
        self.progress_nodes: dict[str, dict] = {}
        self.success = True
        self.current_inputs: dict = {}
        self.outputs: dict = {}
        self.meta: dict = {}

    # --- messages -------------------------------------------------------------------------------------------

    async def send(self, event: str, data: dict, *, broadcast: bool = False) -> None:
        """Like ComfyUI's send_sync(event, data, client_id): a job without client_id sends only `broadcast`
        messages, and those go to every socket."""
        await self.sim._gate.wait()
        if self.client_id is not None or broadcast:
            self.sim._emit(event, data, self.client_id)

    async def add_message(self, event: str, data: dict, *, broadcast: bool = False) -> None:
        data = {**data, "timestamp": _now_ms()}
        self.status_messages.append([event, data])
        await self.send(event, data, broadcast=broadcast)

    def _node_ids(self, node_id: str) -> dict:
        # No subgraphs here: the display and real node ids are the node id itself.
        ids = {"node_id": node_id, "prompt_id": self.prompt_id, "display_node_id": node_id}
        return {**ids, "parent_node_id": None, "real_node_id": node_id}

    async def send_progress_state(self) -> None:
        nodes = {node_id: {**state, **self._node_ids(node_id)} for node_id, state in self.progress_nodes.items()}
        await self.send("progress_state", {"prompt_id": self.prompt_id, "nodes": nodes}, broadcast=True)

    async def set_progress(self, node_id: str, state: str, value=None, maximum=None) -> None:
        entry = self.progress_nodes.setdefault(node_id, {"value": 0, "max": 1, "state": state})
        entry["state"] = state
        if maximum is not None:
            entry["max"] = maximum
        entry["value"] = entry["max"] if state == "finished" else value
        await self.send_progress_state()

    async def progress(self, node_id: str, value: int, total: int, preview_png: bytes | None) -> None:
        # ComfyUI's progress hook: interrupt check, progress_state (+ a type 4 frame), progress (+ a type 1 frame).
        self.sim._check_interrupt()
        await self.set_progress(node_id, "running", value, total)
        with_metadata = preview_png is not None and self.sim._supports_preview_metadata(self.client_id)
        if with_metadata:
            blob = json.dumps({**self._node_ids(node_id), "image_type": "image/png"}).encode()
            frame = struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(blob)) + blob + preview_png
            await self.send_binary(frame)
        progress = {"value": value, "max": total, "prompt_id": self.prompt_id, "node": node_id}
        await self.send("progress", progress, broadcast=True)
        if preview_png is not None and not with_metadata:
            await self.send_binary(struct.pack(">II", PREVIEW_IMAGE, PNG) + preview_png)

    async def send_binary(self, frame: bytes) -> None:
        await self.sim._gate.wait()
        self.sim._emit_binary(frame, self.client_id)

    # --- execution ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        sim = self.sim
        sim._interrupt_requested = False  # an interrupt sent while idle or for the previous job does not count
        await self.add_message("execution_start", {"prompt_id": self.prompt_id})
        self.keys = sim._cache.signatures(self.prompt, sim.folders)
        sim._cache.retain(self.keys.values())
        cached = [node_id for node_id in self.prompt if sim._cache.get(self.keys[node_id])]
        self.current_outputs = list(cached)
        await self.add_message("execution_cached", {"nodes": cached, "prompt_id": self.prompt_id})

        pending = ExecutionList(self.prompt, self.outputs_to_execute, lambda n: sim._cache.get(self.keys[n]))
        node_id = None
        try:
            while pending:
                node_id = pending.next()
                await self.execute(node_id)
                pending.done(node_id)
        except Interrupted:
            self.success = False
            logger.info("Simulator %s: prompt %s interrupted at node %s", sim.name, self.prompt_id, node_id)
            message = {"prompt_id": self.prompt_id, "node_id": node_id, "node_type": self._class_type(node_id)}
            await self.add_message(
                "execution_interrupted", {**message, "executed": list(self.executed)}, broadcast=True
            )
        except Exception as ex:
            self.success = False
            logger.info("Simulator %s: prompt %s failed at node %s: %s", sim.name, self.prompt_id, node_id, ex)
            await self.add_message("execution_error", self._error_message(node_id, ex))
        else:
            await self.add_message("execution_success", {"prompt_id": self.prompt_id})

        # History shows the UI output of every node of this graph that has one in the cache, old or new.
        for node_id in self.prompt:
            entry = sim._cache.get(self.keys[node_id])
            if entry is not None and entry.ui:
                self.outputs[node_id] = entry.ui
                meta = {"node_id": node_id, "display_node": node_id, "parent_node": None}
                self.meta[node_id] = {**meta, "real_node_id": node_id}
        sim._last_node_id = None

    def _class_type(self, node_id: str | None):
        return self.prompt[node_id]["class_type"] if node_id in self.prompt else None

    def _error_message(self, node_id: str | None, ex: Exception) -> dict:
        return {
            "prompt_id": self.prompt_id,
            "node_id": node_id,
            "node_type": self._class_type(node_id),
            "executed": list(self.executed),
            "exception_message": str(ex),
            "exception_type": _type_name(ex),
            "traceback": traceback.format_tb(ex.__traceback__),
            "current_inputs": {
                name: [value if isinstance(value, str | int | float | bool | None) else str(value)]
                for name, value in self.current_inputs.items()
            },
            "current_outputs": self.current_outputs,
        }

    async def execute(self, node_id: str) -> None:
        sim, key = self.sim, self.keys[node_id]
        class_type = self.prompt[node_id]["class_type"]
        cached = sim._cache.get(key)
        if cached is not None:
            # An output node served from the cache: `executed` with the old files, and no `executing`.
            executed = {"node": node_id, "display_node": node_id, "output": cached.ui, "prompt_id": self.prompt_id}
            await self.send("executed", executed)
            await self.set_progress(node_id, "finished")
            return
        self.current_inputs = {}
        await self.set_progress(node_id, "running", 0.0, 1.0)
        self.current_inputs = self._inputs(node_id)
        if self.client_id is not None:
            sim._last_node_id = node_id
            await self.send("executing", {"node": node_id, "display_node": node_id, "prompt_id": self.prompt_id})
        sim._check_interrupt()
        sim._inject_failure(node_id, class_type)
        outputs, ui = await NODE_CLASSES[class_type].run(_NodeRun(self, node_id), **self.current_inputs)
        sim._cache.set(key, CacheEntry(outputs, ui or None))
        if ui:
            executed = {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": self.prompt_id}
            await self.send("executed", executed)
        await self.set_progress(node_id, "finished")
        self.executed.append(node_id)

    def _inputs(self, node_id: str) -> dict:
        cls = NODE_CLASSES[self.prompt[node_id]["class_type"]]
        declared = cls.input_types(self.sim.folders)
        given = self.prompt[node_id]["inputs"]
        inputs = {}
        for name in [*declared.get("required", {}), *declared.get("optional", {})]:
            if name not in given:
                continue
            value = given[name]
            inputs[name] = self.sim._cache.get(self.keys[value[0]]).outputs[value[1]] if is_link(value) else value
        return inputs


class Simulator:
    """One simulated ComfyUI server, run on the caller's event loop.

    time_scale multiplies every node's duration (1.0 looks real: txt2img ~4 s, slow.json ~10 s; 0 runs nodes
    instantly but still yields to the loop between nodes and steps). output_dir holds input/, output/ and
    temp/; None means a fresh temporary folder, removed by stop(). `url` and `port` are set once started.
    executed_prompt_ids (every job started, in order, repeats kept) and busy_seconds (time spent running
    jobs) are statistics for tests and benchmarks; they survive restart().
    """

    def __init__(
        self,
        *,
        time_scale: float = 1.0,
        output_dir: str | Path | None = None,
        name: str = "sim",
        faithful_socket_bug: bool = True,
    ):
        if time_scale < 0:
            raise ValueError("time_scale must be >= 0")
        self.time_scale = float(time_scale)
        self.name = name
        self.faithful_socket_bug = faithful_socket_bug
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

    def limit_capabilities(self, *, missing_nodes=(), checkpoints=None) -> None:
        """Make the server lack some node classes, or have only some checkpoint files (object_info follows)."""
        self.missing_nodes = set(missing_nodes)
        self.checkpoints = list(checkpoints) if checkpoints is not None else None

    def _capability_error(self, prompt) -> dict | None:
        if not isinstance(prompt, dict):
            return None
        for node_id, node in prompt.items():
            if not isinstance(node, dict):
                continue
            if node.get("class_type") in self.missing_nodes:
                message = f"Cannot execute because node {node['class_type']} does not exist."
                return {"type": "invalid_prompt", "message": message, "details": f"Node ID '#{node_id}'",
                        "extra_info": {}}
            ckpt = (node.get("inputs") or {}).get("ckpt_name")
            if node.get("class_type") == "CheckpointLoaderSimple" and self.checkpoints is not None \
                    and ckpt not in self.checkpoints:
                message = "Prompt outputs failed validation"
                return {"type": "prompt_outputs_failed_validation", "message": message,
                        "details": f"Value not in list: ckpt_name: '{ckpt}' not in {self.checkpoints}",
                        "extra_info": {}}
        return None

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

    async def unplug(self) -> None:
        """Like a cut cable: nobody reaches the server, but it keeps its queue and goes on running its jobs."""
        logger.warning("Simulator %s: unplugged", self.name)
        await self._abort_sockets()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def plug(self) -> None:
        """Reachable again after unplug(), on the same port, with its queue and history as they are now."""
        runner = web.AppRunner(self._make_app(), handle_signals=False, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, self._host, self.port).start()
        self._runner = runner
        logger.info("Simulator %s: plugged back in on %s", self.name, self.url)

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

    async def drop_sockets(self) -> None:
        """Abruptly closes every open websocket (no close frame). Jobs keep running."""
        logger.info("Simulator %s: dropping %d websocket(s)", self.name, len(self._open_sockets))
        await self._abort_sockets()

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

    async def restart(self, down_for: float = 0.0) -> None:
        """Like a process restart: everything in memory is lost; files in input/ and output/ stay."""
        logger.warning("Simulator %s: restarting (down for %.2f s)", self.name, down_for)
        await self._close()
        self._reset_state()
        self._wipe_temp()
        if down_for > 0:
            await asyncio.sleep(down_for)
        await self._listen(self._host, self.port)
        logger.info("Simulator %s: back on %s", self.name, self.url)

    def stall(self) -> None:
        """Freezes the worker: the running job sends nothing more and never ends until unstall()."""
        logger.info("Simulator %s: stalled", self.name)
        self._gate.clear()

    def unstall(self) -> None:
        logger.info("Simulator %s: unstalled", self.name)
        self._gate.set()

    def fail_node(self, target: str, message: str = "Simulated failure") -> None:
        """The next execution of a node with this class_type or node id raises RuntimeError(message)."""
        self._failures[target] = message

    def set_time_scale(self, factor: float) -> None:
        if factor < 0:
            raise ValueError("time_scale must be >= 0")
        self.time_scale = float(factor)

    def _inject_failure(self, node_id: str, class_type: str) -> None:
        for target in (node_id, class_type):
            if target in self._failures:
                raise RuntimeError(self._failures.pop(target))

    # --- read-only helpers ----------------------------------------------------------------------------------

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
            job = _Job(self, item)
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

    def _task_done(self, job: _Job) -> None:
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
                    await self._send(ws, json.dumps({"type": "feature_flags", "data": SERVER_FEATURES}))
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

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[_origin_check, self._errors], client_max_size=MAX_UPLOAD_SIZE)
        routes = [
            ("GET", "/ws", self._websocket),
            ("GET", "/prompt", self._get_prompt),
            ("POST", "/prompt", self._post_prompt),
            ("GET", "/queue", self._get_queue),
            ("POST", "/queue", self._post_queue),
            ("GET", "/history", self._get_history),
            ("GET", "/history/{prompt_id}", self._get_history_item),
            ("POST", "/history", self._post_history),
            ("POST", "/interrupt", self._post_interrupt),
            ("POST", "/free", self._post_free),
            ("POST", "/upload/image", self._upload_image),
            ("GET", "/view", self._view),
            ("GET", "/system_stats", self._system_stats),
            ("GET", "/object_info", self._object_info),
            ("GET", "/object_info/{node_class}", self._object_info),
            ("GET", "/features", _constant(SERVER_FEATURES)),
            ("GET", "/embeddings", _constant([])),
            ("GET", "/extensions", _constant([])),
            ("GET", "/models", _constant(MODEL_FOLDERS)),
            ("GET", "/models/{folder}", self._models),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
            app.router.add_route(method, "/api" + path, handler)
        app.router.add_get("/", self._index)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        # The same reply as aiohttp's own for an exception (what ComfyUI sends), logged through our logger.
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except ValueError as exc:  # a body or query parameter that does not parse
            logger.warning("Simulator %s: %s %s: %s", self.name, request.method, request.path, exc)
        except Exception:
            logger.exception("Simulator %s: %s %s failed", self.name, request.method, request.path)
        return web.Response(status=500, text=SERVER_ERROR_TEXT)

    async def _index(self, request: web.Request) -> web.Response:
        body = f"<!doctype html><title>ComfyUI simulator {self.name}</title><p>ComfyUI {COMFYUI_VERSION} simulator"
        return web.Response(text=body, content_type="text/html")

    async def _get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response(self._queue_info())

    async def _post_prompt(self, request: web.Request) -> web.Response:
        body = await request.json()
        if "number" in body:
            number = float(body["number"])
        else:
            # The counter moves on every POST without a number, rejected ones included.
            number = -self._number if body.get("front") else self._number
            self._number += 1
        if "prompt" not in body:
            error = {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided"}
            return web.json_response({"error": {**error, "extra_info": {}}, "node_errors": {}}, status=400)
        prompt = body["prompt"]
        prompt_id = str(body.get("prompt_id", uuid.uuid4()))
        error, outputs, node_errors = validate_prompt(prompt, body.get("partial_execution_targets"), self.folders)
        error = self._capability_error(prompt) or error
        extra_data = body.get("extra_data", {})
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if error is not None:
            logger.info("Simulator %s: invalid prompt: %s", self.name, error["message"])
            return web.json_response({"error": error, "node_errors": node_errors}, status=400)
        for key in SENSITIVE_EXTRA_DATA_KEYS:
            extra_data.pop(key, None)
        item = [number, prompt_id, prompt, extra_data, outputs]
        # (number, prompt_id) orders the heap as ComfyUI's does; the sequence number only breaks the tie that
        # would crash ComfyUI's worker (same number and prompt_id, §4), so that this simulator stays usable.
        heapq.heappush(self._pending, (number, prompt_id, self._sequence, item))
        self._sequence += 1
        self._wakeup.set()
        self._queue_updated()
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

    async def _get_queue(self, request: web.Request) -> web.Response:
        running, pending = self.queue_snapshot()
        return web.json_response({"queue_running": running, "queue_pending": pending})

    async def _post_queue(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("clear"):
            self._pending = []
            self._queue_updated()
        for prompt_id in body.get("delete", []):
            for index, entry in enumerate(self._pending):
                if entry[1] == prompt_id:  # the first match only, as ComfyUI; the running job is not here
                    self._pending.pop(index)
                    heapq.heapify(self._pending)
                    self._queue_updated()
                    break
        return web.Response()

    async def _get_history(self, request: web.Request) -> web.Response:
        max_items = request.query.get("max_items")
        max_items = int(max_items) if max_items is not None else None
        offset = int(request.query.get("offset", -1))
        if offset < 0 and max_items is not None:
            offset = len(self._history) - max_items
        selected = list(self._history.items())[max(offset, 0) :]
        if max_items is not None:
            selected = selected[:max_items]
        return web.json_response(dict(selected))

    async def _get_history_item(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        entry = self._history.get(prompt_id)
        return web.json_response({prompt_id: entry} if entry is not None else {})

    async def _post_history(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("clear"):
            self._history.clear()
        for prompt_id in body.get("delete", []):
            self._history.pop(prompt_id, None)
        return web.Response()

    async def _post_interrupt(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = {}
        target = body.get("prompt_id") if isinstance(body, dict) else None
        if not target or self._running is not None and self._running[1] == target:
            self._interrupt_requested = True
        else:
            logger.info("Simulator %s: prompt %s is not running, interrupt ignored", self.name, target)
        return web.Response()

    async def _post_free(self, request: web.Request) -> web.Response:
        await request.json()
        return web.Response()

    async def _upload_image(self, request: web.Request) -> web.Response:
        post = await request.post()
        image = post.get("image")
        kind = post.get("type") or "input"
        root = self.folders.by_type(kind)
        if not isinstance(image, web.FileField) or not image.filename or root is None:
            return web.Response(status=400, text="Expected an image file and type input, temp or output")
        subfolder = str(post.get("subfolder", ""))
        overwrite = post.get("overwrite") in ("true", "1")
        data = image.file.read()
        name = await asyncio.to_thread(_store_upload, root, subfolder, image.filename, data, overwrite)
        if name is None:
            return web.Response(status=400, text="Not an image, or a path outside the folder")
        return web.json_response({"name": name, "subfolder": subfolder, "type": kind})

    async def _view(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        filename = query.get("filename")
        if filename is None:
            return web.Response(status=404)
        root = None
        for kind in ("input", "output", "temp"):  # ComfyUI's annotated names: "a.png [output]"
            if filename.endswith(f" [{kind}]"):
                filename, root = filename[: -len(kind) - 3], self.folders.by_type(kind)
        if not filename or filename[0] == "/" or ".." in filename:
            return web.Response(status=400)
        root = root or self.folders.by_type(query.get("type", "output"))
        if root is None:
            return web.Response(status=400)
        if "subfolder" in query:
            folder = os.path.join(root, query["subfolder"])
            if os.path.commonpath((os.path.abspath(folder), root)) != root:
                return web.Response(status=403)
            root = folder
        filename = os.path.basename(filename)
        path = os.path.join(root, filename)
        if not os.path.isfile(path):
            return web.Response(status=404)
        disposition = {"Content-Disposition": f'filename="{filename}"'}
        if "preview" in query or query.get("channel", "rgba") != "rgba":
            body, content_type = await asyncio.to_thread(_reencode, path, query.get("preview"), query.get("channel"))
            return web.Response(body=body, content_type=content_type, headers=disposition)
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        if content_type in {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}:
            content_type = "application/octet-stream"  # as ComfyUI: never let a browser render these
        return web.FileResponse(path, headers={**disposition, "Content-Type": content_type})

    async def _system_stats(self, request: web.Request) -> web.Response:
        ram_total, ram_free = 16 * 1024**3, 12 * 1024**3
        argv = ["main.py", "--cpu", "--listen", self._host, "--port", str(self.port)]
        argv += ["--simulator-name", self.name, "--simulator-started", self.started_at.isoformat()]
        system = {
            "os": sys.platform,
            "ram_total": ram_total,
            "ram_free": ram_free,
            "comfyui_version": COMFYUI_VERSION,
            "required_frontend_version": "1.27.10",
            "python_version": sys.version,
            "pytorch_version": "2.8.0+cpu",
            "embedded_python": False,
            "argv": argv,
        }
        device = {"name": "cpu", "type": "cpu", "index": None, "vram_total": ram_total, "vram_free": ram_free}
        device.update(torch_vram_total=ram_total, torch_vram_free=ram_free)
        return web.json_response({"system": system, "devices": [device]})

    async def _object_info(self, request: web.Request) -> web.Response:
        wanted = request.match_info.get("node_class")
        names = [wanted] if wanted is not None else list(NODE_CLASSES)
        names = [name for name in names if name not in self.missing_nodes]
        info = await asyncio.to_thread(
            lambda: {name: NODE_CLASSES[name].info(self.folders) for name in names if name in NODE_CLASSES}
        )
        if self.checkpoints is not None and "CheckpointLoaderSimple" in info:
            required = info["CheckpointLoaderSimple"]["input"]["required"]
            required["ckpt_name"] = [list(self.checkpoints), *required["ckpt_name"][1:]]
        return web.json_response(info)

    async def _models(self, request: web.Request) -> web.Response:
        folder = request.match_info["folder"]
        if folder not in MODEL_FOLDERS:
            return web.Response(status=404)
        return web.json_response(list(CHECKPOINTS) if folder == "checkpoints" else [])


def _constant(value):
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(value)

    return handler


@web.middleware
async def _origin_check(request: web.Request, handler):
    # ComfyUI's origin_only_middleware: on a loopback host, a browser request from another origin is refused,
    # so that a random web page cannot queue jobs on the user's local server.
    host, origin = request.headers.get("Host"), request.headers.get("Origin")
    if host and origin:
        host_domain = host.lower()
        origin_domain = urlparse(origin).netloc.lower()
        if _is_loopback(urlsplit("//" + host_domain).hostname) and origin_domain and host_domain != origin_domain:
            logger.warning("Refused a request with non matching host and origin %s != %s", host_domain, origin_domain)
            return web.Response(status=403)
    if request.method == "OPTIONS":
        return web.Response()
    return await handler(request)


def _store_upload(root: str, subfolder: str, filename: str, data: bytes, overwrite: bool) -> str | None:
    """ComfyUI's image_upload(): same name and bytes -> same name; same name, other bytes -> "name (1).png"."""
    folder = os.path.join(root, os.path.normpath(subfolder))
    path = os.path.abspath(os.path.join(folder, filename))
    if os.path.commonpath((root, path)) != root or not is_image_file(data):
        return None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    stem, suffix = os.path.splitext(filename)
    counter = 1
    while not overwrite and os.path.exists(path):
        with open(path, "rb") as existing:
            if existing.read() == data:
                return filename
        filename = f"{stem} ({counter}){suffix}"
        path = os.path.join(folder, filename)
        counter += 1
    with open(path, "wb") as f:
        f.write(data)
    return filename


def _reencode(path: str, preview: str | None, channel: str | None) -> tuple[bytes, str]:
    """/view with preview=webp;90 or channel=rgb/a, as ComfyUI."""
    buffer = BytesIO()
    with Image.open(path) as img:
        if preview:
            image_format, *rest = preview.split(";")
            if image_format not in ("webp", "jpeg") or "a" in (channel or ""):
                image_format = "webp"
            quality = int(rest[-1]) if rest and rest[-1].isdigit() else 90
            if image_format == "jpeg" or channel == "rgb":
                img = img.convert("RGB")
            img.save(buffer, format=image_format, quality=quality)
            return buffer.getvalue(), f"image/{image_format}"
        if channel == "a":
            alpha = img.getchannel("A") if "A" in img.getbands() else Image.new("L", img.size, 255)
            Image.merge("RGBA", (Image.new("L", img.size, 255),) * 3 + (alpha,)).save(buffer, format="PNG")
        else:
            img.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue(), "image/png"


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
