"""
The hub's files in Django's default storage, a local disk or an S3 bucket alike: copies saved and checked (size and
sha256), read back whole or by byte range, presigned URLs for downloads from a bucket, and a readiness probe.
Nothing here knows where MEDIA_ROOT is: every read and write goes through the storage API.
"""

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path

from django.core.files import File
from django.core.files.storage import default_storage

from comfyhub.object_storage import uses_bucket

logger = logging.getLogger(__name__)

CHUNK = 256 * 1024
SPOOL_MEMORY = 4 * 1024 * 1024  # a copy larger than this waits in a temporary file, not in memory
SAVE_ATTEMPTS = 3
SAVE_BACKOFF = 0.5  # seconds before the second attempt, doubled before each later one


class StorageUnavailable(Exception):
    """The store (disk or bucket) did not take or give back a file. Not a task's fault: the step is tried again."""


class Spool:
    """
    A file being copied in, counted and hashed on the way: in memory while small, then in a temporary file, so
    that a large output never sits whole in a worker's memory.
    """

    def __init__(self):
        self.file = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)  # noqa: SIM115  (closed by close())
        self._hash = hashlib.sha256()
        self.size = 0

    @classmethod
    def of(cls, data):
        spool = cls()
        spool.write(data)
        return spool

    def write(self, chunk):
        self.file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    @property
    def sha256(self):
        return self._hash.hexdigest()

    def rewound(self):
        self.file.seek(0)
        return self.file

    def close(self):
        self.file.close()


def save_verified(name, spool, storage=None):
    """
    Save `spool` under `name` (or a free name near it; the saved name is returned) and check that the store holds
    exactly its size. A failed or short write is removed and tried again (SAVE_ATTEMPTS times, backing off);
    then StorageUnavailable, so that the caller records nothing.
    """
    storage = storage or default_storage
    error = None
    for attempt in range(SAVE_ATTEMPTS):
        if attempt:
            time.sleep(SAVE_BACKOFF * 2 ** (attempt - 1))
        saved = None
        try:
            saved = storage.save(name, File(spool.rewound(), name=name.rsplit("/", 1)[-1]))
            stored = storage.size(saved)
            if stored == spool.size:
                return saved
            error = f"the store holds {stored} of {spool.size} bytes"
        except Exception as exc:  # a bucket answers with botocore's errors, a disk with OSError
            error = f"{type(exc).__name__}: {exc}"
        logger.warning("storing %s failed (attempt %d of %d): %s", name, attempt + 1, SAVE_ATTEMPTS, error)
        if saved:
            delete_quietly(saved, storage)
    raise StorageUnavailable(f"could not store {name}: {error}")


def delete_quietly(name, storage=None):
    """Remove a stored file; a file already gone or a store that fails is logged, never raised."""
    storage = storage or default_storage
    try:
        storage.delete(name)
    except Exception:
        logger.warning("could not remove %s from storage", name, exc_info=True)


def _bucket_key(storage, name):
    from storages.utils import clean_name

    return storage._normalize_name(clean_name(name))


def _bucket_error(exc, name):
    """FileNotFoundError for a missing object, StorageUnavailable for anything else a bucket answers."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchKey", "404", "NotFound"):
            return FileNotFoundError(name)
    return StorageUnavailable(f"the bucket did not give {name}: {type(exc).__name__}: {exc}")


def open_range(name, start=0, stop=None, storage=None):
    """
    An iterator over the bytes [start, stop) of a stored file (stop None: to its end). The file is opened before
    this returns, so a missing one raises FileNotFoundError here rather than halfway through a response.
    """
    storage = storage or default_storage
    if stop is not None and stop <= start:
        return iter(())
    if uses_bucket(storage):
        wanted = f"bytes={start}-{'' if stop is None else stop - 1}"
        try:
            reply = storage.connection.meta.client.get_object(
                Bucket=storage.bucket_name, Key=_bucket_key(storage, name), Range=wanted
            )
        except Exception as exc:
            raise _bucket_error(exc, name) from exc
        return _body_chunks(reply["Body"], name)
    file = storage.open(name, "rb")
    return _file_chunks(file, start, stop)


def _body_chunks(body, name):
    try:
        yield from body.iter_chunks(CHUNK)
    except Exception as exc:
        raise _bucket_error(exc, name) from exc
    finally:
        body.close()


def _file_chunks(file, start, stop):
    try:
        file.seek(start)
        left = None if stop is None else stop - start
        while left is None or left > 0:
            chunk = file.read(CHUNK if left is None else min(CHUNK, left))
            if not chunk:
                break
            if left is not None:
                left -= len(chunk)
            yield chunk
    finally:
        file.close()


def digest(name, storage=None):
    """(size, sha256) of a stored file, read through once; FileNotFoundError when it is not there."""
    hasher, size = hashlib.sha256(), 0
    for chunk in open_range(name, storage=storage):
        hasher.update(chunk)
        size += len(chunk)
    return size, hasher.hexdigest()


def presigned_url(name, seconds, *, content_type, disposition, storage=None):
    """
    A URL of the bucket that serves `name` for `seconds`, with the response headers the hub would send (type,
    disposition, private caching); None when files are on a disk, which has no such URLs.
    """
    storage = storage or default_storage
    if not uses_bucket(storage) or seconds <= 0:
        return None
    parameters = {
        "ResponseContentType": content_type,
        "ResponseContentDisposition": disposition,
        "ResponseCacheControl": f"private, max-age={seconds}",
    }
    return storage.url(name, parameters=parameters, expire=seconds)


def ping(storage=None):
    """Raise unless the store answers: the bucket exists and the credentials reach it, or MEDIA_ROOT is usable."""
    storage = storage or default_storage
    if uses_bucket(storage):
        storage.connection.meta.client.head_bucket(Bucket=storage.bucket_name)
    else:
        folder = Path(storage.path(""))
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"{folder} is not writable")
