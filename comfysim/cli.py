"""`python -m comfysim`: one simulated ComfyUI server in the foreground, until Ctrl-C or SIGTERM."""

import argparse
import asyncio
import logging
import signal

from comfysim.protocol import COMFYUI_VERSION, PREVIEW_METHODS, VERSIONS
from comfysim.server import Simulator


class ListenError(Exception):
    """The simulator could not listen on the address it was given."""


def parser():
    parser = argparse.ArgumentParser(
        prog="python -m comfysim", description="Run one simulated ComfyUI server (its HTTP and websocket protocol)."
    )
    add_arguments(parser)
    return parser


def add_arguments(parser):
    parser.add_argument("--port", type=int, default=8188, help="Port to listen on; 0 picks a free one")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="Multiplies every node's duration: 1 looks real, 0.01 is fast, 0 runs nodes instantly",
    )
    parser.add_argument(
        "--output-dir", default=None, help="Folder for input/, output/ and temp/ (default: a temporary folder)"
    )
    parser.add_argument("--name", default="sim", help="Name shown in logs and in /system_stats")
    parser.add_argument(
        "--preview-method",
        choices=PREVIEW_METHODS,
        default="none",
        help="As ComfyUI's flag: how KSampler draws sampler previews (none: no previews)",
    )
    parser.add_argument(
        "--comfyui-version",
        choices=VERSIONS,
        default=COMFYUI_VERSION,
        help="Which measured ComfyUI release to behave as (default: the newer)",
    )


def check(port, time_scale):
    """The sentence that says what is wrong with the arguments, or None."""
    if time_scale < 0:
        return "--time-scale must be 0 or more"
    if not 0 <= port <= 65535:
        return "--port must be between 0 and 65535"
    return None


async def serve(simulator, host, port, stop=None, say=print):
    """Runs `simulator` until `stop` is set; without `stop`, until SIGINT or SIGTERM."""
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    try:
        await simulator.start(host, port)
    except OSError as exc:
        raise ListenError(f"Cannot listen on {host}:{port}: {exc}") from exc
    say(f"ComfyUI simulator {simulator.name} listening on {simulator.url}; Ctrl-C stops it.")
    try:
        await stop.wait()
    finally:
        await simulator.stop()


def main(argv=None):
    args = parser().parse_args(argv)
    problem = check(args.port, args.time_scale)
    if problem:
        parser().error(problem)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    simulator = Simulator(
        time_scale=args.time_scale,
        output_dir=args.output_dir,
        name=args.name,
        preview_method=args.preview_method,
        comfyui_version=args.comfyui_version,
    )
    try:
        asyncio.run(serve(simulator, args.host, args.port))
    except ListenError as exc:
        raise SystemExit(str(exc)) from None
