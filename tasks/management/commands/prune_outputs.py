import sys
from argparse import RawDescriptionHelpFormatter

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, DjangoHelpFormatter

from tasks.retention import parse_age, prune

EPILOG = """\
What goes, for every user or the one named by --user:
  outputs   of tasks that finished (succeeded, failed, cancelled) before the age, with their thumbnails and
            v2 assets; each such task's timeline records that its outputs were removed
  uploads   sent before the age, unless a queued, submitted or running task still uses them
  assets    sent to the v2 API before the age

Exit codes:
  0  done (or nothing to do)
  1  some files could not be deleted from storage; their rows are kept, so a later run tries again
  2  bad arguments (an age that is not a duration, an unknown user)
"""


class HelpFormatter(DjangoHelpFormatter, RawDescriptionHelpFormatter):
    """Django's order of arguments, with the epilog's table kept as written."""


class Command(BaseCommand):
    help = "Remove stored results, uploads and v2 assets older than an age, to free hub storage."

    def create_parser(self, prog_name, subcommand, **kwargs):
        return super().create_parser(prog_name, subcommand, formatter_class=HelpFormatter, epilog=EPILOG, **kwargs)

    def add_arguments(self, parser):
        parser.add_argument(
            "--older-than", required=True, metavar="AGE", help="30d (days), 12h (hours) or 90m (minutes)"
        )
        parser.add_argument("--user", metavar="USERNAME", help="Only this user's files")
        parser.add_argument("--dry-run", action="store_true", help="Say what would be removed; change nothing")

    def handle(self, older_than, user, dry_run, **options):
        try:
            age = parse_age(older_than)
        except ValueError as exc:
            raise CommandError(str(exc), returncode=2) from None
        owner = None
        if user is not None:
            owner = get_user_model().objects.filter(**{get_user_model().USERNAME_FIELD: user}).first()
            if owner is None:
                raise CommandError(f"There is no user named {user!r}.", returncode=2)
        report = prune(age, owner, dry_run)
        for line in report.lines:
            self.stdout.write(line)
        self.stdout.write(report.summary())
        if report.failures:
            sys.exit(1)
