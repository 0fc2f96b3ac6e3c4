"""
A stored file answered whole (200) or in part (206 / 416) for a `Range: bytes=...` request, with the hub's download
headers either way. Django's FileResponse ignores Range; werkzeug's parser reads the header's syntax.
"""

from django.http import JsonResponse, StreamingHttpResponse
from django.utils.http import content_disposition_header
from werkzeug.http import parse_range_header

from tasks.downloads import _file_response
from tasks.models import DOWNLOAD_TYPE, INLINE_TYPES

CHUNK = 64 * 1024


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


def _slice(file, start, stop):
    try:
        file.seek(start)
        left = stop - start
        while left > 0:
            chunk = file.read(min(CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk
    finally:
        file.close()


def _headers(response, content_type, filename, inline):
    response["Content-Disposition"] = content_disposition_header(not inline, filename)
    response["X-Content-Type-Options"] = "nosniff"
    response["Content-Security-Policy"] = "sandbox"
    response["Cache-Control"] = "private, max-age=3600"
    response["Accept-Ranges"] = "bytes"
    return response


def ranged_file_response(request, file, size, content_type, filename, etag=None):
    """`file` (opened, closed by the response) as the downloads answer it, honouring one byte range."""
    wanted = wanted_range(request, size, etag)
    inline = content_type in INLINE_TYPES and request.GET.get("download") != "1"
    if wanted is None:
        file.close()
        message = f"The range asked for starts past the end of the file, which has {size} bytes."
        response = JsonResponse({"error": {"code": "range_not_satisfiable", "message": message}}, status=416)
        response["Content-Range"] = f"bytes */{size}"
        return response
    if wanted == "all":
        response = _file_response(request, file, content_type, filename)
        response["Accept-Ranges"] = "bytes"
    else:
        start, stop = wanted
        response = StreamingHttpResponse(
            _slice(file, start, stop), status=206, content_type=content_type if inline else DOWNLOAD_TYPE
        )
        response["Content-Length"] = str(stop - start)
        response["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        _headers(response, content_type, filename, inline)
    if etag:
        response["ETag"] = etag
    return response
