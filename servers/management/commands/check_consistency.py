import sys

from asgiref.sync import async_to_sync
from django.core.management.base import BaseCommand, CommandError

from servers.connection import standalone
from servers.consistency import check
from servers.models import Server


class Command(BaseCommand):
    help = (
        "Compare the hub's tasks with each server's /queue and /history and the files in hub storage, and report "
        "each difference by kind. --fix applies the safe repair for each. Exit code 0: nothing found; "
        "1: something was found (fixed or not); 2: bad arguments."
    )

    def add_arguments(self, parser):
        parser.add_argument("--server", help="Only this server (by name)")
        parser.add_argument("--fix", action="store_true", help="Repair what can be repaired safely")

    def handle(self, server, fix, **options):
        if server is not None and not Server.objects.filter(name=server).exists():
            raise CommandError(f"There is no server named {server!r}.", returncode=2)
        report = async_to_sync(check)(standalone, server, fix)
        for finding in report.findings:
            self.stdout.write(str(finding))
        # Said even when nothing was found: "nothing to repair" after checking no server at all is no reassurance.
        self.stdout.write(report.summary())
        if report.findings:
            sys.exit(1)
