# daphne.server installs Twisted's asyncio reactor when imported: it must come before anything imports Twisted.
import daphne.server  # noqa: I001  isort:skip

import asyncio
import logging

from channels.routing import get_default_application
from daphne.endpoints import build_endpoint_description_strings
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from comfyhub import process, varlock
from servers.models import Server
from servers.supervisor import Supervisor
from tasks import demo as demo_hub
from tasks.demo import DEMO_PASSWORD, DEMO_USER
from tasks.workflows import load_demo_workflows

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = (
        "Run the embedded all-in-one hub: migrate, then Daphne with the upstream supervisor in the same process. "
        "--demo also starts two ComfyUI simulators, loads the demo workflows and creates a demo user. Its files "
        "are in the var folder (var/ beside manage.py, or COMFYHUB_VAR_DIR); while it runs, another serve on the "
        "same folder refuses to start (exit code 1) rather than take over its servers."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--host", default="127.0.0.1", metavar="ADDRESS",
            help="Address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every network interface)",
        )
        parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default: 8000)")
        parser.add_argument(
            "--demo", action="store_true", help="Start two simulated ComfyUI servers and a demo user"
        )
        parser.add_argument(
            "--time-scale", type=float, default=1.0, help="Simulator node duration factor (1 looks real)"
        )
        parser.add_argument(
            "--no-supervisor", action="store_true", help="Serve only (run_upstream runs elsewhere)"
        )

    def handle(self, host, port, demo, time_scale, no_supervisor, **options):
        # COMFYHUB_EMBEDDED_SUPERVISOR=false (the default with REDIS_URL): run_upstream processes own the servers.
        embedded = settings.COMFYHUB["EMBEDDED_SUPERVISOR"] and not no_supervisor
        if demo or embedded:
            # Before anything changes (migrations, servers): a serve that only serves pages (--no-supervisor, as
            # the production layout runs several) leaves the servers alone and may run beside others.
            self.own_var_folder()
        call_command("migrate", interactive=False, verbosity=0)
        simulators = []
        if demo or not Server.objects.exists():
            if not demo:
                self.stdout.write(
                    "No ComfyUI server is configured: starting two simulated ones (see add_server)."
                )
            self.own_var_folder()
            simulators = self.start_demo(time_scale)
        application = ASGIStaticFilesHandler(get_default_application())
        supervisor = Supervisor() if embedded else None

        def ready():
            process.started()  # the lag of the loop every socket of this process shares, on /metrics; short GC pauses
            if supervisor is not None:
                # Daphne has made the reactor's asyncio loop current: the supervisor shares it with the consumers,
                # which the in-memory channel layer needs.
                asyncio.get_event_loop().create_task(supervisor.run())
            self.stdout.write(f"comfyhub is running on http://{host}:{port}/  (Ctrl-C stops it)")

        server = daphne.server.Server(
            application=application,
            endpoints=build_endpoint_description_strings(host=host, port=port),
            ready_callable=ready,
        )
        try:
            server.run()
        finally:
            for simulator in simulators:
                simulator.stop()

    def own_var_folder(self):
        try:
            varlock.hold(settings.VAR_DIR)
        except varlock.AlreadyServing as exc:
            raise CommandError(str(exc), returncode=1) from None

    def start_demo(self, time_scale):
        from comfysim import SimulatorThread

        simulators = []
        for index in (1, 2):
            output = settings.VAR_DIR / f"simulator-{index}"
            # A demo shows the picture forming, as a ComfyUI started with --preview-method auto does.
            simulator = SimulatorThread(
                time_scale=time_scale, output_dir=output, name=f"sim-{index}", preview_method="auto"
            ).start()
            simulators.append(simulator)
            call_command("add_server", f"sim-{index}", simulator.url, verbosity=0, stdout=self.stdout)
        for workflow in load_demo_workflows():
            logger.info("demo workflow %s loaded", workflow.slug)
        user = get_user_model().objects.filter(username=DEMO_USER).first()
        if user is None:
            user = get_user_model().objects.create_user(DEMO_USER, password=DEMO_PASSWORD)
            self.stdout.write(f"Created the demo user: log in as {DEMO_USER} / {DEMO_PASSWORD}")
        else:
            self.stdout.write(f"Log in as {DEMO_USER} (password {DEMO_PASSWORD} unless you changed it)")
        self.stdout.write(
            "The demo user is not staff. For the pool dashboard (/ops/) and the admin (/admin/) make a staff "
            "account: manage.py createsuperuser"
        )
        demo_hub.start()  # the pages' banner says all this too
        return simulators
