"""
Request bodies are Django's to parse, not Twisted's.

Under Daphne, Twisted's HTTP request parses every POST form body (multipart and urlencoded) into `request.args`,
which Daphne never reads: a second body parser that holds a whole upload in memory once more, and that answers a
multipart body it cannot parse (no boundary, a boundary that never appears) with a bare "400 Bad Request" without
headers or body, before the ASGI application ever sees the request. Switched off, Django's parser is the only one
and a malformed upload gets the API's JSON error. Bodies with a bad Content-Length are still refused by Twisted's
HTTP parser: their framing is unknown, so there is no request to hand on.
"""

import functools
import inspect
import logging

logger = logging.getLogger(__name__)


def leave_bodies_to_django():
    """Make every Daphne request skip Twisted's form parsing (idempotent; harmless where Daphne is not serving)."""
    from daphne.http_protocol import WebRequest
    from twisted.web.http import Request

    if getattr(WebRequest, "leaves_bodies_to_django", False):
        return
    if "parsePOSTFormSubmission" not in inspect.signature(Request.__init__).parameters:
        logger.warning("This Twisted parses form bodies itself: a malformed multipart body gets a bare 400")
        return
    original = WebRequest.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        kwargs["parsePOSTFormSubmission"] = False
        original(self, *args, **kwargs)

    WebRequest.__init__ = __init__
    WebRequest.leaves_bodies_to_django = True
