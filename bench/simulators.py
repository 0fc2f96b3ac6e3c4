"""
`python -m bench.simulators --count N`: N simulated ComfyUI servers in one process of their own, so that a
benchmark's simulators never share a GIL with the hub or with the load client. Prints `URL <url>` for each, then
`READY`, and serves until SIGINT or SIGTERM. Imports comfysim only (no Django).
"""

import argparse
import asyncio
import inspect
import logging
import signal
import subprocess
import sys

from comfysim.server import Simulator


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.simulators")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--preview-method", default="none", help="none, auto, latent2rgb or taesd")
    parser.add_argument("--name", default="sim")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve(args))


async def serve(args):
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    options = {"time_scale": args.time_scale}
    if "preview_method" in inspect.signature(Simulator).parameters:
        options["preview_method"] = args.preview_method
    simulators = [Simulator(name=f"{args.name}-{n}", **options) for n in range(args.count)]
    for simulator in simulators:
        await simulator.start("127.0.0.1", 0)
        sys.stdout.write(f"URL {simulator.url}\n")
        sys.stdout.flush()
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        for simulator in simulators:
            await simulator.stop()


class SimulatorProcesses:
    """`count` simulators spread over `processes` child processes; `urls` once started."""

    def __init__(self, count, processes=2, time_scale=1.0, preview_method="none", cwd=None):
        self.urls, self.children = [], []
        per = [count // processes + (1 if n < count % processes else 0) for n in range(processes)]
        for n, size in enumerate(p for p in per if p):
            child = subprocess.Popen(  # noqa: S603
                [sys.executable, "-m", "bench.simulators", "--count", str(size), "--time-scale", str(time_scale),
                 "--preview-method", preview_method, "--name", f"sim{n}"],
                cwd=cwd, stdout=subprocess.PIPE, text=True,
            )
            self.children.append(child)
        for child in self.children:
            for line in child.stdout:
                if line.startswith("URL "):
                    self.urls.append(line.split()[1])
                elif line.startswith("READY"):
                    break
            else:
                self.stop()
                raise RuntimeError("a simulator process exited before it was ready")

    @property
    def pids(self):
        return [child.pid for child in self.children]

    def stop(self):
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


if __name__ == "__main__":
    main()
