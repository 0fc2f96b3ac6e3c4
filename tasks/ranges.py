"""
A stored file as the hub answers it, from a disk or a bucket alike: whole (200) or one byte range (206 / 416), never
as active content on the hub's origin; or, when files are in a bucket and COMFYHUB_S3_PRESIGNED_SECONDS is set, a
redirect to a presigned URL of the bucket that carries the same headers and expires within that many seconds.
The caller has already checked that the user may have the file. werkzeug's parser reads the Range header's syntax.
"""

from django.conf import settings
from django.http import HttpResponseRedirect, JsonResponse, StreamingHttpResponse
from django.utils.http import content_disposition_header
from werkzeug.http import parse_range_header

from tasks.models import DOWNLOAD_TYPE, INLINE_TYPES
from tasks.storage import StorageUnavailable, open_range, presigned_url


class Missing(Exception):
    """The stored file is gone: the caller answers 404 in its own words."""


def wanted_range(request, size, etag):
    """
    (start, stop) of the one byte range asked for, "all" to send the whole file, or None when it cannot be met.
    A malformed header, several ranges, another unit or a stale If-Range all get the whole file, as RFC 9110
    allows; a suffix longer than the file is the whole file in a 206.
    """
    header = request.headers.get("Range")
    if not header:
        return "all"
    if_range = request.headers.get("If-Range")
    if if_range is not None and (etag is None or if_range.strip() != etag):
        return "all"
    parsed = parse_range_header(header)
    if parsed is None or parsed.units != "bytes" or len(parsed.ranges) != 1:
        return "all"
    start, stop = parsed.ranges[0]
    if start < 0:
        start, stop = max(0, size + start), size
    else:
        stop = size if stop is None else min(stop, size)
    if start >= size:
        return None
    return start, stop


def _safe_headers(response, disposition, cache):
    """What every answer with a stored file carries: the browser may not sniff another type nor run it here."""
    response["Content-Disposition"] = disposition
    response["X-Content-Type-Options"] = "nosniff"
    response["Content-Security-Policy"] = "sandbox"
    response["Cache-Control"] = cache
    return response


def stored_response(request, name, size, content_type, filename, etag=None):
    """
    The stored file `name` of `size` bytes: inline only as a raster type the hub checked from the bytes (and only
    when not asked as a download, ?download=1), anything else an octet-stream attachment. Raises Missing when the
    file is not in the store; answers 503 when the store does not answer.
    """
    inline = content_type in INLINE_TYPES and request.GET.get("download") != "1"
    served_type = content_type if content_type in INLINE_TYPES else DOWNLOAD_TYPE
    disposition = content_disposition_header(not inline, filename)
    seconds = settings.COMFYHUB["PRESIGNED_SECONDS"]
    url = presigned_url(name, seconds, content_type=served_type, disposition=disposition)
    if url:
        # The bucket answers the Range itself; the URL is the user's for `seconds`, so nothing may cache it.
        return _safe_headers(HttpResponseRedirect(url), disposition, "private, no-store")
    wanted = wanted_range(request, size, etag)
    if wanted is None:
        message = f"The range asked for starts past the end of the file, which has {size} bytes."
        response = JsonResponse({"error": {"code": "range_not_satisfiable", "message": message}}, status=416)
        response["Content-Range"] = f"bytes */{size}"
        return response
    start, stop = (0, size) if wanted == "all" else wanted
    try:
        chunks = open_range(name, start, stop)
    except FileNotFoundError:
        raise Missing(name) from None
    except StorageUnavailable:
        response = JsonResponse(
            {"error": {"code": "storage_unavailable", "message": "Hub storage did not answer; try again shortly."}},
            status=503,
        )
        response["Retry-After"] = "5"
        return response
    response = StreamingHttpResponse(chunks, status=200 if wanted == "all" else 206, content_type=served_type)
    response["Content-Length"] = str(stop - start)
    if wanted != "all":
        response["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    response["Accept-Ranges"] = "bytes"
    if etag:
        response["ETag"] = etag
    return _safe_headers(response, disposition, "private, max-age=3600")
