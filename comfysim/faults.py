"""
Fault injection: what the hub's tests, demos, benchmarks and chaos run do to a simulated server. Each method runs
on the simulator's loop (SimulatorThread has a blocking twin of each).
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from comfysim.protocol import missing_node_type_error

logger = logging.getLogger(__name__)


class Faults:
    """Mixed into Simulator: misbehaviour on request, and the capabilities of a differently equipped server."""

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
            if node.get("class_type") in self.missing_nodes and self.modern:
                return missing_node_type_error(node_id, node)
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

    async def drop_sockets(self) -> None:
        """Abruptly closes every open websocket (no close frame). Jobs keep running."""
        logger.info("Simulator %s: dropping %d websocket(s)", self.name, len(self._open_sockets))
        await self._abort_sockets()

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
