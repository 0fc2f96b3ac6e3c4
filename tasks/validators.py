"""
The hub's rules for hostile input, shared by the pages, JSON API v1 and the v2 surface: numbers JSON allows but
nothing can store (NaN, 1e400), nesting deeper than any real body, NUL characters, lone surrogates ("\\ud800" is
valid JSON, not UTF-8), in any string or key. `JsonBodyParser` is the body parser every NinjaAPI of the hub uses.
"""

import json
import math

from ninja.parser import Parser

# Deeper JSON is refused before anything walks it: inputs are flat, and ComfyUI graphs are a few levels deep.
MAX_JSON_DEPTH = 64


class BindingError(ValueError):
    """Bad input: `details` maps each offending field to a sentence."""

    code = "invalid"  # the API's error code

    def __init__(self, message, details=None):
        super().__init__(message)
        self.message = message
        self.details = details or {}


def text_problem(text):
    """Why `text` cannot be stored or sent (a NUL, a lone surrogate), as a sentence; None when it can."""
    if "\x00" in text:
        # PostgreSQL refuses NUL in text and in jsonb: it would be a 500 there and a surprise on ComfyUI.
        return "must not contain NUL characters"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            # JSON allows "\ud800" but UTF-8 cannot hold it: no database, page or ComfyUI server could take it.
            return f"is not valid text: it holds a lone surrogate (\\u{ord(text[exc.start]):04x})"
    return None


def printable(text):
    """`text` fit to be shown back in an error: lone surrogates and NULs as escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _place(path):
    return ".".join(printable(str(part)) for part in path) or "body"


def check_tree(value, max_depth=MAX_JSON_DEPTH):
    """
    Refuse what parses but no database, page or server should meet: nesting deeper than `max_depth`, and text,
    keys too, that `text_problem` refuses. Details name the place, e.g. {"inputs.prompt": "..."}.
    """
    stack = [(value, 1, ())]
    while stack:
        item, depth, path = stack.pop()
        if depth > max_depth:
            raise BindingError("The body is nested too deeply.", {_place(path[:1]): f"at most {max_depth} levels"})
        if isinstance(item, dict):
            for key, child in item.items():
                place = (*path, key)
                problem = text_problem(key) if isinstance(key, str) else None
                if problem:
                    raise BindingError(
                        "The body holds a name that is not valid text.", {_place(place): f"this name {problem}"}
                    )
                stack.append((child, depth + 1, place))
        elif isinstance(item, list):
            stack.extend((child, depth + 1, (*path, index)) for index, child in enumerate(item))
        elif isinstance(item, str):
            problem = text_problem(item)
            if problem:
                raise BindingError("The body holds text that is not valid.", {_place(path): problem})


def _refuse_constant(name):
    raise BindingError("The body has a number JSON does not allow.", {"body": f"{name} is not a finite number"})


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as infinity
        raise BindingError("The body has a number out of range.", {"body": f"{text[:40]} is not a finite number"})
    return value


def parse_json_body(request):
    """The request's JSON object under the rules above, or a BindingError that says what is wrong and where."""
    if not request.content_type or request.content_type != "application/json":
        raise BindingError("Send a JSON body with Content-Type: application/json.")
    try:
        body = json.loads(request.body or b"null", parse_constant=_refuse_constant, parse_float=_finite_float)
    except BindingError:
        raise
    except (ValueError, RecursionError):
        # RecursionError: nested deeper than the parser goes (about 1,000 levels).
        raise BindingError("The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise BindingError("The body must be a JSON object.")
    check_tree(body)
    return body


class JsonBodyParser(Parser):
    """
    A NinjaAPI's body parser under the rules above. `refuse` turns the BindingError into what the API answers
    with (its own error type and status); ninja hands it to the API's HttpError handler as the error's cause.
    """

    def __init__(self, refuse=lambda exc: exc):
        self.refuse = refuse

    def parse_body(self, request):
        try:
            return parse_json_body(request)
        except BindingError as exc:
            raise self.refuse(exc) from None
