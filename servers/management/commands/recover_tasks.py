import sys
from argparse import RawDescriptionHelpFormatter

from asgiref.sync import async_to_sync
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, DjangoHelpFormatter

from servers.connection import standalone
from servers.models import Server
from servers.recovery import recover

EPILOG = """\
Without --older-than, a task is stuck once it has been quiet (no event on its timeline) for longer than its
state allows:
  submitted  {submitted} s  (COMFYHUB_STUCK_SUBMITTED)
  running    {running} s  (COMFYHUB_STUCK_RUNNING)
--older-than SECONDS applies one limit to both states.

Exit codes:
  0  no stuck task
  1  stuck tasks were found (and, without --dry-run, acted on)
  2  bad arguments (an unknown --server, a negative or non-numeric --older-than)
"""


class HelpFormatter(DjangoHelpFormatter, RawDescriptionHelpFormatter):
    """Django's order of arguments, with the epilog's table kept as written."""


class Command(BaseCommand):
    # Line breaks of our own: the raw formatter keeps the epilog's table, and so does not wrap this either.
    help = (
        "Find tasks quiet too long for their state and apply the next recovery step to each:\n"
        "re-sync with the server, re-fetch outputs, interrupt and requeue, fail. Each step is recorded on the task."
    )

    def create_parser(self, prog_name, subcommand, **kwargs):
        conf = settings.COMFYHUB
        epilog = EPILOG.format(submitted=conf["STUCK_SUBMITTED"], running=conf["STUCK_RUNNING"])
        return super().create_parser(prog_name, subcommand, formatter_class=HelpFormatter, epilog=epilog, **kwargs)

    def add_arguments(self, parser):
        parser.add_argument(
            "--dry-run", action="store_true",
            help="Say what would be done to each stuck task (how long it has been quiet, its workflow and owner); "
            "change nothing",
        )
        parser.add_argument(
            "--older-than", type=float, metavar="SECONDS",
            help="Quiet for more than this many seconds, whatever the state (default: the limit of each state, below)",
        )
        parser.add_argument("--server", metavar="NAME", help="Only tasks on this server (by name)")

    def handle(self, dry_run, older_than, server, **options):
        if server is not None and not Server.objects.filter(name=server).exists():
            raise CommandError(f"There is no server named {server!r}.", returncode=2)
        if older_than is not None and older_than < 0:
            raise CommandError("--older-than must be zero or more seconds.", returncode=2)
        actions = async_to_sync(recover)(older_than, server, dry_run, connect=standalone)
        for action in actions:
            self.stdout.write(str(action))
        verb = "would act on" if dry_run else "acted on"
        if not actions:
            self.stdout.write("No stuck task.")
            return
        self.stdout.write(f"{len(actions)} stuck task(s); {verb} {len(actions)}.")
        sys.exit(1)
