"""
Storing one output, old path against new, on a disk and on a real S3 server (SeaweedFS, a process of its own):

- old: the file's chunks kept in the worker's memory and joined into bytes, hashed, then
  `default_storage.save(ContentFile(data))`;
- new: the file streamed in 64 KiB chunks into a storage.Spool (counted and hashed on the way, on disk past 4 MiB),
  then `storage.save_verified` (save, then read back the stored size).

For each it prints milliseconds per output (median), the peak Python memory allocated while storing one output
(tracemalloc), and the requests each output costs the bucket (botocore's before-send events), from one run.
"""

import hashlib
import os
import statistics
import tempfile
import time
import tracemalloc
import uuid

from django.core.files.base import ContentFile
from django.core.files.storage import default_storage, storages
from django.core.management.base import BaseCommand
from django.test import override_settings

from comfyhub.object_storage import storages_setting
from comfyhub.seaweed import SeaweedServer
from tasks.storage import Spool, save_verified

CHUNK = 64 * 1024


def old_path(name, data):
    chunks = [data[start : start + CHUNK] for start in range(0, len(data), CHUNK)]  # as /view's chunks arrived
    whole = b"".join(chunks)
    hashlib.sha256(whole).hexdigest()
    return default_storage.save(name, ContentFile(whole))


def new_path(name, data):
    spool = Spool()
    try:
        for start in range(0, len(data), CHUNK):
            spool.write(data[start : start + CHUNK])  # as the chunks arrive from the server's /view
        return save_verified(name, spool)
    finally:
        spool.close()


class Command(BaseCommand):
    help = "Store outputs the old way and the new way, on disk and in a SeaweedFS bucket, and print the figures."

    def add_arguments(self, parser):
        parser.add_argument("--count", type=int, default=10, help="outputs of each size per path and store")
        parser.add_argument("--sizes-mib", default="1,16", help="output sizes in MiB, comma-separated")

    def handle(self, *args, count, sizes_mib, **options):
        sizes = [int(float(size) * 1024 * 1024) for size in sizes_mib.split(",")]
        self.stdout.write(f"{count} outputs of each size per path and store; figures are per output")
        self.stdout.write(f"{'store':7} {'size':>7} {'path':4} {'ms p50':>8} {'peak MiB':>9} {'requests':>9}")
        with tempfile.TemporaryDirectory() as media, SeaweedServer() as seaweed:
            stores = {
                "disk": {"MEDIA_ROOT": media, "STORAGES": storages_setting({})},
                "bucket": {"STORAGES": storages_setting(seaweed.env)},
            }
            for store, overrides in stores.items():
                with override_settings(**overrides):
                    for size in sizes:
                        data = os.urandom(size)
                        for label, path in (("old", old_path), ("new", new_path)):
                            self.measure(store, size, label, path, data, count)

    def measure(self, store, size, label, path, data, count):
        requests = []
        storage = storages["default"]
        if store == "bucket":
            storage.connection.meta.client.meta.events.register("before-send", lambda **kw: requests.append(1))
        times, peaks = [], []
        for _ in range(count):
            name = f"bench/{uuid.uuid4()}/output.png"
            tracemalloc.start()
            started = time.perf_counter()
            saved = path(name, data)
            times.append((time.perf_counter() - started) * 1000)
            peaks.append(tracemalloc.get_traced_memory()[1] / 2**20)
            tracemalloc.stop()
            default_storage.delete(saved)
        calls = len(requests) / count - 1  # the delete after each output is not part of storing it
        self.stdout.write(
            f"{store:7} {size / 2**20:>5.0f}Mi {label:4} {statistics.median(times):>8.1f} {max(peaks):>9.1f} "
            f"{calls if store == 'bucket' else '-':>9}"
        )
