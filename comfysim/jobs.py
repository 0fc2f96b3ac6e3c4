"""
One execution of a queue item, as ComfyUI's PromptExecutor.execute() runs it: the message sequence
(execution_start, execution_cached, executing, progress_state, progress, executed, execution_success|error|
interrupted), the output cache, previews as binary frames, and the history entry's outputs.

A Job talks to its server through a few of the server's members (its message outbox, the stall gate, the cache,
the interrupt flag and the injected failures); it never imports the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import traceback
from typing import TYPE_CHECKING

from comfysim.nodes import NODE_CLASSES, CacheEntry, ExecutionList, Interrupted, is_link
from comfysim.protocol import PNG, PREVIEW_IMAGE, PREVIEW_IMAGE_WITH_METADATA, now_ms, type_name

if TYPE_CHECKING:
    from comfysim.server import Simulator

logger = logging.getLogger(__name__)


class NodeRun:
    """The NodeContext (see comfysim/nodes.py) of one node execution."""

    def __init__(self, job: Job, node_id: str):
        self.job = job
        self.node_id = node_id
        self.folders = job.sim.folders
        self.prompt = job.prompt
        self.extra_data = job.extra_data
        self.preview_method = job.preview_method

    async def spend(self, seconds: float) -> None:
        await self.job.sim._spend(seconds)

    async def compute(self, fn, /, *args):
        return await asyncio.to_thread(fn, *args)

    async def progress(self, value: int, total: int, preview_png: bytes | None = None) -> None:
        await self.job.progress(self.node_id, value, total, preview_png)


class Job:
    """One execution of a queue item: ComfyUI's PromptExecutor.execute() for one prompt."""

    def __init__(self, sim: Simulator, item: list):
        self.sim = sim
        self.item = item
        self.prompt_id = item[1]
        self.prompt: dict = item[2]
        self.extra_data: dict = item[3]
        self.outputs_to_execute: list[str] = item[4]
        self.client_id = self.extra_data.get("client_id")
        self.preview_method = sim._preview_method(self.extra_data)
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
        data = {**data, "timestamp": now_ms()}
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

        # History shows the UI output of every node of this graph that has one in the cache, old or new; 0.26
        # forgets the ones served from the cache when the job has no client_id (a fully cached rerun: none, §7.4).
        shown = self.executed if sim.modern and self.client_id is None else list(self.prompt)
        for node_id in shown:
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
            "exception_type": type_name(ex),
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
        outputs, ui = await NODE_CLASSES[class_type].run(NodeRun(self, node_id), **self.current_inputs)
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
