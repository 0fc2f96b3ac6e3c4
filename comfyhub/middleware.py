"""Text that is not UTF-8 is refused at the door, before any view, form or admin search reads it."""

from urllib.parse import unquote_to_bytes

from django.core.exceptions import RequestDataTooBig
from django.http import HttpResponseBadRequest

FORM = "application/x-www-form-urlencoded"


def undecodable_field(encoded):
    """The name of the first field of urlencoded bytes whose name or value is not UTF-8 once unquoted, or None."""
    if b"%" not in encoded and encoded.isascii():
        return None  # the common case, in one scan
    for pair in encoded.split(b"&"):
        name, _, value = pair.partition(b"=")
        for part in (name, value):
            try:
                unquote_to_bytes(part.replace(b"+", b" ")).decode("utf-8")
            except UnicodeDecodeError:
                return unquote_to_bytes(name.replace(b"+", b" ")).decode("utf-8", "backslashreplace")
    return None


def refuse_undecodable_text(get_response):
    """
    A 400 naming the field for a query string or urlencoded form whose text is not UTF-8 ("%ED%A0%80" is a lone
    surrogate): Django would decode it to U+FFFD and carry on, so a user's text would change without a word.
    Multipart fields cannot be checked without a second parser; Django replaces them the same way.
    """

    def middleware(request):
        # Daphne hands Django an ASCII query string (Twisted refuses other bytes in the request line).
        field = undecodable_field(request.META.get("QUERY_STRING", "").encode("utf-8", "surrogatepass"))
        where = "query string"
        if field is None and request.method == "POST" and request.content_type == FORM:
            try:
                field, where = undecodable_field(request.body), "form"
            except RequestDataTooBig:
                pass  # refused when the view reads the form: nothing was read yet
            except OSError:
                return HttpResponseBadRequest("The request body could not be read.", content_type="text/plain")
        if field is None:
            return get_response(request)
        message = f"The {where} holds text that is not valid UTF-8."
        if request.path.startswith("/api/"):
            from tasks.api_base import error

            return error(400, "invalid", message, {field: "is not valid UTF-8 text"})
        return HttpResponseBadRequest(f"{message} Field: {field}", content_type="text/plain; charset=utf-8")

    return middleware


def sync_chain(get_response):
    """
    Last in MIDDLEWARE, and sync only on purpose: the views are sync, and with this at the bottom every middleware
    above it runs in the one thread that runs the view, so a request crosses between Daphne's event loop and
    that thread three times. Without it Django runs the async-capable middlewares on the loop, and each of
    their process_request and process_response hops to the thread and back (about a dozen crossings).
    comfyhub.asgi now serves HTTP with comfyhub/handler.py, which loads the chain in sync mode (one crossing);
    this stays for a deployment that mounts Django's own ASGI handler.
    """
    return get_response
