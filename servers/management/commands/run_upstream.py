import asyncio
import signal

from django.core.management.base import BaseCommand

from comfyhub import process
from servers.supervisor import Supervisor


class Command(BaseCommand):
    help = (
        "Run the upstream supervisor: hold the websockets of the ComfyUI servers this process leases, dispatch "
        "queued tasks to them and reconcile their tasks. Run one or more beside the Daphne processes in production."
    )

    def add_arguments(self, parser):
        parser.add_argument("--tick", type=float, default=1.0, help="Seconds between looks for new work")

    def handle(self, tick, **options):
        asyncio.run(self.run(Supervisor(tick=tick)))

    async def run(self, supervisor):
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, supervisor.stop)
        process.started(watch_loop=False)  # short garbage-collector pauses: every push of the process waits for them
        self.stdout.write(f"Upstream supervisor {supervisor.owner} running; SIGTERM stops it.")
        await supervisor.run()
