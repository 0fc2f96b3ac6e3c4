"""
ComfyUI's websocket frames turned into typed messages: a JSON `{"type", "data"}` frame becomes a Message, a binary
frame (a preview or a SaveImageWebsocket image) a Binary. Junk never raises: it becomes a Message of type
"malformed" with the reason.
"""

import json
import math
import struct
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Message:
    type: str
    data: dict = field(default_factory=dict)

    @property
    def prompt_id(self):
        value = self.data.get("prompt_id")
        return str(value) if value is not None else None


@dataclass(frozen=True)
class Binary:
    """A binary frame: an image from SaveImageWebsocket or a sampler preview."""

    event: int
    image: bytes
    image_type: str
    metadata: dict = field(default_factory=dict)
    type: str = "binary"

    @property
    def prompt_id(self):
        value = self.metadata.get("prompt_id")
        return str(value) if value is not None else None


TERMINAL_TYPES = frozenset({"execution_success", "execution_error", "execution_interrupted"})
_IMAGE_FORMATS = {1: "image/jpeg", 2: "image/png"}


def parse_frame(frame) -> Message | Binary:
    """Turn one websocket frame into a message. Never raises: junk becomes a Message of type 'malformed'."""
    if isinstance(frame, bytes | bytearray | memoryview):
        return _parse_binary(bytes(frame))
    try:
        obj = json.loads(frame)
    except (TypeError, ValueError, RecursionError):
        # RecursionError: a frame nested deeper than the interpreter's stack ("[[[[...").
        return Message("malformed", {"reason": "not JSON"})
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        return Message("malformed", {"reason": "no type"})
    data = obj.get("data")
    if not isinstance(data, dict):
        return Message("malformed", {"reason": f"{obj['type']} without a data object"})
    problem = _shape_problem(obj["type"], data)
    if problem:
        return Message("malformed", {"reason": problem})
    return Message(obj["type"], data)


def _shape_problem(kind, data):
    """
    What makes a message unusable although it is a JSON object: a field the hub reads with the wrong type. The
    supervisor trusts these fields (a number that overflows a float, `nodes: 5`, a NUL in a prompt_id that
    PostgreSQL cannot even compare), so junk in them is malformed here, like junk anywhere else.
    """
    prompt_id = data.get("prompt_id")
    if prompt_id is not None and not (
        (isinstance(prompt_id, str) and "\x00" not in prompt_id)
        or (isinstance(prompt_id, int) and not isinstance(prompt_id, bool))
    ):
        return f"{kind} with a prompt_id that is not text"
    if kind == "execution_cached" and not isinstance(data.get("nodes") or [], list):
        return "execution_cached whose nodes are not a list"
    if kind == "progress":
        counters = [data]
    elif kind == "progress_state" and isinstance(data.get("nodes"), dict):
        counters = [info for info in data["nodes"].values() if isinstance(info, dict)]
    else:
        counters = []
    for counter in counters:
        for key in ("value", "max"):
            value = counter.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and not _finite(value):
                return f"{kind} with a {key} that is not a finite number"
    return None


def _finite(number):
    try:
        return math.isfinite(number)
    except OverflowError:  # an int too large for a float
        return False


def _parse_binary(frame):
    if len(frame) < 8:
        return Message("malformed", {"reason": "short binary frame"})
    (event,) = struct.unpack(">I", frame[:4])
    if event == 1:
        (fmt,) = struct.unpack(">I", frame[4:8])
        return Binary(event, frame[8:], _IMAGE_FORMATS.get(fmt, "application/octet-stream"))
    if event == 4:
        (length,) = struct.unpack(">I", frame[4:8])
        try:
            metadata = json.loads(frame[8 : 8 + length])
        except (ValueError, RecursionError):
            return Message("malformed", {"reason": "bad preview metadata"})
        if not isinstance(metadata, dict):
            return Message("malformed", {"reason": "bad preview metadata"})
        return Binary(event, frame[8 + length :], str(metadata.get("image_type", "image/png")), metadata)
    return Binary(event, frame[8:], "application/octet-stream")
