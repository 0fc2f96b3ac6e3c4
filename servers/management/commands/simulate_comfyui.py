import asyncio
import signal

from django.core.management.base import BaseCommand, CommandError

from servers.simulator import Simulator


class Command(BaseCommand):
    help = (
        "Run one ComfyUI simulator (servers/simulator.py) until Ctrl-C or SIGTERM: ComfyUI's HTTP and websocket "
        "protocol without a GPU, for demos and for trying the hub on a fresh machine."
    )
    # A plain network server: it needs neither the database nor the system checks.
    requires_system_checks = []
    requires_migrations_checks = False

    def add_arguments(self, parser):
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

    def handle(self, *, port, host, time_scale, output_dir, name, **options):
        if time_scale < 0:
            raise CommandError("--time-scale must be 0 or more")
        if not 0 <= port <= 65535:
            raise CommandError("--port must be between 0 and 65535")
        simulator = Simulator(time_scale=time_scale, output_dir=output_dir, name=name)
        asyncio.run(self.serve(simulator, host, port))

    async def serve(self, simulator, host, port, stop=None):
        """Runs `simulator` until `stop` is set; without `stop`, until SIGINT or SIGTERM."""
        if stop is None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        try:
            await simulator.start(host, port)
        except OSError as exc:
            raise CommandError(f"Cannot listen on {host}:{port}: {exc}") from exc
        self.stdout.write(f"ComfyUI simulator {simulator.name} listening on {simulator.url}; Ctrl-C stops it.")
        try:
            await stop.wait()
        finally:
            await simulator.stop()
