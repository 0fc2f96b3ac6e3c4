import asyncio

from django.core.management.base import BaseCommand, CommandError

from comfysim import Simulator
from comfysim.cli import ListenError, add_arguments, check
from comfysim.cli import serve as serve_simulator
from comfysim.protocol import COMFYUI_VERSION


class Command(BaseCommand):
    help = (
        "Run one ComfyUI simulator (the comfysim package; also `python -m comfysim`) until Ctrl-C or SIGTERM: "
        "ComfyUI's HTTP and websocket protocol without a GPU, for demos and for trying the hub on a fresh machine."
    )
    # A plain network server: it needs neither the database nor the system checks.
    requires_system_checks = []
    requires_migrations_checks = False

    def add_arguments(self, parser):
        add_arguments(parser)

    def handle(
        self, *, port, host, time_scale, output_dir, name, preview_method="none", comfyui_version=COMFYUI_VERSION,
        **options,
    ):
        problem = check(port, time_scale)
        if problem:
            raise CommandError(problem)
        simulator = Simulator(
            time_scale=time_scale,
            output_dir=output_dir,
            name=name,
            preview_method=preview_method,
            comfyui_version=comfyui_version,
        )
        asyncio.run(self.serve(simulator, host, port))

    async def serve(self, simulator, host, port, stop=None):
        """Runs `simulator` until `stop` is set; without `stop`, until SIGINT or SIGTERM."""
        try:
            await serve_simulator(simulator, host, port, stop, say=self.stdout.write)
        except ListenError as exc:
            raise CommandError(str(exc)) from exc
