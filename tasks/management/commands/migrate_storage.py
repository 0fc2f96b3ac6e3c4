import os
import sys

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from tasks.storage_migration import Refused, bucket_storage, migrate


class Command(BaseCommand):
    help = (
        "Copy the hub's outputs, uploads and v2 assets from MEDIA_ROOT on this disk into the S3 bucket named by the "
        "COMFYHUB_S3_* variables, under the same names, checking each copy's sha256 against its row; files already "
        "there are skipped, so a second run resumes the first. Thumbnails are not copied (they are made again). "
        "Exit code 0: every file is in the bucket; 1: some could not be copied (missing or damaged on disk, or "
        "refused by the bucket); 2: no bucket named, or it does not answer."
    )

    def add_arguments(self, parser):
        parser.add_argument("--to", required=True, choices=["s3"], help="Where to copy the files: s3 (the bucket)")
        parser.add_argument("--dry-run", action="store_true", help="Check and list what would be copied; write nothing")

    def handle(self, to, dry_run, **options):
        folder = os.environ.get("COMFYHUB_S3_PREFIX", "").strip("/")
        where = f"the bucket {os.environ.get('COMFYHUB_S3_BUCKET', '')!r}" + (f", folder {folder!r}" if folder else "")
        try:
            bucket_storage(os.environ)  # refused before anything is said without a bucket
            self.stdout.write(f"From {settings.MEDIA_ROOT} to {where}:")
            report = migrate(os.environ, dry_run=dry_run, write=self.stdout.write)
        except Refused as exc:
            raise CommandError(str(exc), returncode=2) from None
        self.stdout.write(report.summary())
        if report.failed:
            sys.exit(1)
