import sys

from asgiref.sync import async_to_sync
from django.core.management.base import BaseCommand, CommandError

from servers.connection import standalone
from servers.models import Server
from servers.recovery import recover


class Command(BaseCommand):
    help = (
        "Find tasks quiet too long for their state and apply the next recovery step to each: re-sync with the "
        "server, re-fetch outputs, interrupt and requeue, fail. Each step is recorded on the task. "
        "Exit code 0: no stuck task; 1: stuck tasks were found (and, without --dry-run, acted on)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--dry-run", action="store_true", help="Say what would be done; change nothing")
        parser.add_argument(
            "--older-than", type=float, help="Quiet for more than this many seconds (default: the limit per state)"
        )
        parser.add_argument("--server", help="Only tasks on this server (by name)")

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
