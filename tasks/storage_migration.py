"""
Moving the hub's files from local disk into an S3 bucket (`manage.py migrate_storage --to s3`): every output,
upload and uploaded v2 asset is copied under the same name, and each copy is read back from the bucket and its
sha256 compared with the one recorded on its row. Thumbnails stay behind: they are made again on demand.

Both storages are built here side by side, whatever the hub itself is configured with: the source is
FileSystemStorage on settings.MEDIA_ROOT (the one place the hub reads MEDIA_ROOT on purpose: it is where the files
are), the target django-storages' S3Storage from the COMFYHUB_S3_* variables. A file already in the bucket with
the recorded size and sha256 is skipped, so a run stopped halfway resumes where it was.
"""

from dataclasses import dataclass, field

from django.conf import settings
from django.core.files.storage import FileSystemStorage

from comfyhub.object_storage import storages_setting
from tasks.models import Asset, TaskOutput, Upload
from tasks.quota import human_size
from tasks.storage import Spool, StorageUnavailable, delete_quietly, digest, open_range, ping, save_verified

CHUNK = 500


class Refused(Exception):
    """Nothing can be copied: no bucket is named, or the one named does not answer."""


def local_storage():
    return FileSystemStorage(location=settings.MEDIA_ROOT)


def bucket_storage(environ):
    """The S3Storage the hub would use with these variables; Refused without COMFYHUB_S3_BUCKET."""
    from storages.backends.s3 import S3Storage

    if not environ.get("COMFYHUB_S3_BUCKET", "").strip():
        raise Refused(
            "COMFYHUB_S3_BUCKET is not set: set it (and COMFYHUB_S3_ENDPOINT_URL, COMFYHUB_S3_ACCESS_KEY_ID, "
            "COMFYHUB_S3_SECRET_ACCESS_KEY as your bucket needs) to say where the files go."
        )
    return S3Storage(**storages_setting(environ)["default"]["OPTIONS"])


def stored_files():
    """(kind, model, rows) of every row that owns a stored file: an output's asset shares its output's file."""
    fields = ("pk", "file", "size", "sha256")
    return [
        ("output", TaskOutput, TaskOutput.objects.exclude(file="").order_by("created_at", "pk").only(*fields)),
        ("upload", Upload, Upload.objects.exclude(file="").order_by("created_at", "pk").only(*fields)),
        ("asset", Asset, Asset.objects.uploaded().exclude(file="").order_by("created_at", "pk").only(*fields)),
    ]


@dataclass
class Report:
    dry_run: bool
    lines: list = field(default_factory=list)
    copied: int = 0
    copied_bytes: int = 0
    skipped: int = 0
    failed: int = 0
    renamed: int = 0

    def say(self, text):
        self.lines.append(text)

    def summary(self):
        verb = "would copy" if self.dry_run else "copied"
        text = (
            f"{verb.capitalize()} {self.copied} file{'' if self.copied == 1 else 's'} "
            f"({human_size(self.copied_bytes)}), skipped {self.skipped} already in the bucket, "
            f"{self.failed} failed"
        )
        if self.renamed:
            text += f"; {self.renamed} stored under a new name (their rows now say so)"
        return text + (". Nothing was written (dry run)." if self.dry_run else ".")


def in_bucket(name, row, target):
    """Whether the bucket holds `name` with the row's size and sha256 (the size first: one HEAD, no download)."""
    try:
        if target.size(name) != row.size:
            return False
        return digest(name, storage=target) == (row.size, row.sha256)
    except FileNotFoundError:
        return False


def read_local(name, source):
    """A Spool of the local file (hashed on the way in); FileNotFoundError when it is not there."""
    spool = Spool()
    try:
        for chunk in open_range(name, storage=source):
            spool.write(chunk)
    except BaseException:
        spool.close()
        raise
    return spool


def copy_one(kind, model, row, source, target, report, position):
    name = row.file.name
    where = f"[{position}] {kind} {row.pk} {name}"
    try:
        if in_bucket(name, row, target):
            report.skipped += 1
            report.say(f"{where}: already in the bucket, skipped")
            return
    except Exception as exc:  # StorageUnavailable, or botocore's errors for anything but a missing object
        report.failed += 1
        report.say(f"{where}: FAILED, the bucket did not answer: {type(exc).__name__}: {exc}")
        return
    try:
        spool = read_local(name, source)
    except FileNotFoundError:
        report.failed += 1
        report.say(f"{where}: FAILED, missing from {settings.MEDIA_ROOT}; not copied")
        return
    try:
        if (spool.size, spool.sha256) != (row.size, row.sha256):
            report.failed += 1
            report.say(
                f"{where}: FAILED, the local file does not match its row ({spool.size} bytes, sha256 "
                f"{spool.sha256[:12]}…; recorded {row.size} bytes, {row.sha256[:12]}…); not copied"
            )
            return
        if report.dry_run:
            report.copied += 1
            report.copied_bytes += row.size
            report.say(f"{where}: would copy {human_size(row.size)}")
            return
        try:
            saved = save_verified(name, spool, storage=target)
            copied = digest(saved, storage=target)
        except (StorageUnavailable, FileNotFoundError) as exc:
            report.failed += 1
            report.say(f"{where}: FAILED, the bucket did not keep it: {exc}")
            return
    finally:
        spool.close()
    if copied != (row.size, row.sha256):
        delete_quietly(saved, target)
        report.failed += 1
        report.say(f"{where}: FAILED, the copy read back from the bucket does not match; removed from the bucket")
        return
    report.copied += 1
    report.copied_bytes += row.size
    if saved != name:
        # The bucket already held another object under this name (file_overwrite is off): the row follows the copy.
        model.objects.filter(pk=row.pk).update(file=saved)
        if model is TaskOutput:
            Asset.objects.filter(output_id=row.pk).update(file=saved)  # an output's asset names the same file
        report.renamed += 1
        report.say(f"{where}: copied {human_size(row.size)} as {saved}, row updated")
        return
    report.say(f"{where}: copied {human_size(row.size)}")


def rows_of(rows):
    """
    The rows of `rows`, their ids read first and the rows fetched by chunks: a copy stored under a new name updates
    the table being walked, which an open cursor on SQLite would not survive.
    """
    ids = list(rows.values_list("pk", flat=True))
    for start in range(0, len(ids), CHUNK):
        yield from rows.filter(pk__in=ids[start : start + CHUNK])


def migrate(environ, dry_run=False, write=None):
    """Copy every stored file into the bucket; `write(line)` as each is done. Returns the Report."""
    target = bucket_storage(environ)
    try:
        ping(target)
    except Exception as exc:
        raise Refused(f"The bucket {target.bucket_name!r} does not answer: {type(exc).__name__}: {exc}") from exc
    source = local_storage()
    report = Report(dry_run=dry_run)
    kinds = stored_files()
    total, position = sum(rows.count() for _, _, rows in kinds), 0
    for kind, model, rows in kinds:
        for row in rows_of(rows):
            position += 1
            before = len(report.lines)
            copy_one(kind, model, row, source, target, report, f"{position}/{total}")
            for line in report.lines[before:] if write is not None else ():
                write(line)
    return report
