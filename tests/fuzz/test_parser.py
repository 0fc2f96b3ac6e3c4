"""
Hostile upstream frames: whatever a ComfyUI server (or something pretending to be one) sends, the parser never
raises, and feeding the parsed messages to a real Connection never crashes it nor moves a task it should not.
"""

import json
import struct

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from servers.aio import db
from servers.connection import standalone
from servers.frames import Binary, Message, parse_frame
from servers.models import Server
from tasks.live import progress_fact, render_fact
from tasks.models import Task, TaskStatus

FUZZ = settings(max_examples=300, deadline=None, database=None)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
MESSAGE_TYPES = (
    "status", "feature_flags", "execution_start", "execution_cached", "executing", "progress", "progress_state",
    "executed", "execution_success", "execution_error", "execution_interrupted", "crystools.monitor",
)
message_types = st.sampled_from(MESSAGE_TYPES) | st.text(max_size=12)


def _dumps(value):
    # Python's json writes NaN and Infinity, and so does ComfyUI's: the parser must cope with them.
    return json.dumps(value, allow_nan=True)


typed_objects = st.fixed_dictionaries({"type": message_types, "data": json_values})
text_frames = (
    st.text()
    | json_values.map(_dumps)
    | typed_objects.map(_dumps)
    | st.dictionaries(st.sampled_from(["type", "data", "extra"]), json_values).map(_dumps)
)
uint32 = st.integers(min_value=0, max_value=2**32 - 1)


@st.composite
def headed_binary(draw):
    """A binary frame with ComfyUI's header: event type, then a format or a JSON length that may lie."""
    event = draw(st.sampled_from([1, 2, 3, 4]) | uint32)
    if event == 4 and draw(st.booleans()):
        metadata = draw(
            st.dictionaries(st.sampled_from(["node_id", "prompt_id", "image_type", "display_node"]), json_values)
            | json_values
        )
        raw = _dumps(metadata).encode()
        length = draw(st.sampled_from([len(raw)]) | uint32 | st.integers(0, len(raw) + 4))
        body = struct.pack(">II", event, length) + raw + draw(st.binary(max_size=32))
    else:
        body = struct.pack(">II", event, draw(uint32)) + draw(st.binary(max_size=64))
    cut = draw(st.none() | st.integers(min_value=0, max_value=len(body)))
    return body if cut is None else body[:cut]


binary_frames = st.binary(max_size=64) | headed_binary()
DEEP = "[" * 100_000 + "]" * 100_000


def _check(message):
    assert isinstance(message, Message | Binary)
    if isinstance(message, Message):
        assert isinstance(message.type, str) and isinstance(message.data, dict)
    else:
        assert isinstance(message.image, bytes) and isinstance(message.metadata, dict)
        assert isinstance(message.image_type, str)
    # Properties the Connection reads must not raise either.
    assert message.prompt_id is None or isinstance(message.prompt_id, str)


@FUZZ
@given(text_frames)
@example(DEEP)
@example('{"type": "progress", "data": ' + DEEP + "}")
@example('{"type": "executing", "data": {"prompt_id": "' + "\\u0000" + '"}}')
def test_text_frames_never_raise(frame):
    _check(parse_frame(frame))


@FUZZ
@given(binary_frames | binary_frames.map(bytearray) | binary_frames.map(memoryview))
@example(struct.pack(">II", 4, 200_000) + DEEP.encode())
@example(struct.pack(">II", 4, 2) + b"\xff\xfe")
def test_binary_frames_never_raise(frame):
    message = parse_frame(frame)
    _check(message)
    if isinstance(message, Binary):
        assert message.event == struct.unpack(">I", bytes(frame)[:4])[0]


# --- the stronger property: a real Connection fed hostile frames ----------------------------------------

PROMPT_ID = "5f0c6a52-0d3b-4f7e-9a43-6c1d2b7e8f90"
GRAPH = {
    "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 8, "height": 8, "batch_size": 1}},
    "2": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 4, "latent_image": ["1", 0]}},
    "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0]}},
    "4": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["3", 0]}},
    "5": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "fuzz"}},
}


def mostly(likely, other, percent=70):
    """`likely` in about `percent` % of the draws, else `other` (st.one_of would weigh every branch alike)."""
    return st.integers(0, 99).flatmap(lambda n: likely if n < percent else other)


prompt_ids = mostly(st.just(PROMPT_ID), st.uuids().map(str) | json_scalars, 60)
node_ids = st.sampled_from(sorted(GRAPH)) | json_scalars
numbers = (
    st.integers(-5, 50)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(min_value=-(10**400), max_value=10**400)
    | json_values
)
node_states = st.dictionaries(
    st.sampled_from(sorted(GRAPH)) | st.text(max_size=4),
    st.fixed_dictionaries(
        {}, optional={"state": st.sampled_from(["pending", "running", "finished", "error"]) | json_scalars,
                      "value": numbers, "max": numbers, "node_id": node_ids}
    )
    | json_values,
    max_size=5,
)
message_fields = {
    "node": node_ids,
    "display_node": node_ids,
    "value": numbers,
    "max": numbers,
    "nodes": st.lists(node_ids, max_size=6) | node_states | json_scalars | json_values,
    "output": json_values,
    "timestamp": numbers,
}
message_data = st.fixed_dictionaries({"prompt_id": prompt_ids}, optional=message_fields) | st.fixed_dictionaries(
    {}, optional={"prompt_id": prompt_ids, **message_fields}
)
upstream_messages = st.fixed_dictionaries(
    {"type": st.sampled_from(MESSAGE_TYPES) | message_types, "data": message_data}
).map(_dumps)


@st.composite
def preview_frames(draw):
    metadata = draw(
        st.fixed_dictionaries(
            {}, optional={"prompt_id": prompt_ids, "node_id": node_ids, "image_type": st.sampled_from(["image/png"])}
        )
    )
    raw = _dumps(metadata).encode()
    return struct.pack(">II", 4, len(raw)) + raw + draw(st.binary(max_size=16))


upstream_frames = st.lists(
    mostly(upstream_messages, text_frames | binary_frames | preview_frames(), 80), min_size=1, max_size=30
)


def _ends_our_task(message):
    """The terminal facts for our prompt: the simple property leaves them out (finishing reads /history)."""
    if not isinstance(message, Message) or message.prompt_id != PROMPT_ID:
        return False
    if message.type in ("execution_success", "execution_error", "execution_interrupted"):
        return True
    return message.type == "executing" and message.data.get("node") is None


def _flush(conn):
    """Write each task's progress now, as the throttled write would, and render the fact its windows would get."""

    async def flush():
        for prompt_id, tracker in list(conn.prompts.trackers.items()):
            task = conn.prompts.tasks.get(prompt_id)
            if task is not None and prompt_id not in conn.prompts.finishing:
                await conn.tracking.write(prompt_id)
                assert len(render_fact(progress_fact(task.pk, task.owner_id, tracker.detail())).encode()) < 2048

    return flush()


HOSTILE = [
    _dumps({"type": "execution_cached", "data": {"prompt_id": PROMPT_ID, "nodes": 5}}),
    _dumps({"type": "progress", "data": {"prompt_id": PROMPT_ID, "node": "2", "value": 10**400, "max": 1}}),
    _dumps({"type": "progress", "data": {"prompt_id": PROMPT_ID, "node": "2", "value": 1, "max": 10**-320}}),
    _dumps({"type": "progress_state", "data": {"prompt_id": PROMPT_ID, "nodes": {"2": {"state": "running",
                                                                                   "value": 10**400, "max": 3}}}}),
    _dumps({"type": "progress", "data": {"prompt_id": PROMPT_ID, "node": "2", "value": float("nan"), "max": 1}}),
    _dumps({"type": "executing", "data": {"prompt_id": "a\x00b", "node": "2"}}),
    _dumps({"type": "executed", "data": {"prompt_id": PROMPT_ID, "node": {"2": 1}, "output": None}}),
]


@pytest.mark.django_db(transaction=True)
def test_a_connection_survives_hostile_frames_and_keeps_its_task_running():
    owner = get_user_model().objects.create(username="fuzz")
    server = Server.objects.create(name="fuzz", base_url="http://127.0.0.1:9")
    task = Task.objects.create(
        owner=owner, graph=GRAPH, status=TaskStatus.RUNNING, server=server, prompt_id=PROMPT_ID,
        client_id=server.client_id,
    )

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(upstream_frames)
    @example(HOSTILE)
    def feed_frames(frames):
        Task.objects.filter(pk=task.pk).update(status=TaskStatus.RUNNING, progress=0.1)
        seen = []

        async def feed():
            conn = standalone(server)
            try:
                for frame in frames:
                    message = parse_frame(frame)
                    if _ends_our_task(message):
                        continue
                    await conn.handle(message)
                    await _flush(conn)
                    seen.append(await db(lambda: Task.objects.values_list("status", "progress").get(pk=task.pk))())
                assert not conn.background.tasks and not conn.prompts.finishing, (
                    "a frame that is not terminal finished the task"
                )
            finally:
                conn.prompts.close()
                await conn.client.close()

        async_to_sync(feed)()
        previous = 0.1
        for status, progress in seen:
            assert status == TaskStatus.RUNNING
            assert 0.0 <= progress <= 0.99
            assert progress >= previous, f"progress went back from {previous} to {progress}"
            previous = progress

    feed_frames()
