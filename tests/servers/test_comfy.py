import json
import struct

import pytest

from servers.comfy import ComfyClient
from servers.comfy_replies import ComfyUnavailable, HistoryEntry
from servers.frames import Binary, parse_frame
from servers.tracking import ProgressTracker


def test_text_frames_become_typed_messages():
    message = parse_frame(json.dumps({"type": "progress", "data": {"value": 3, "max": 9, "prompt_id": 12}}))
    assert message.type == "progress"
    assert message.prompt_id == "12"
    assert message.data["value"] == 3


@pytest.mark.parametrize(
    "frame",
    ["", "not json", "[]", '{"type": 5}', '{"type": "progress"}', '{"type": "x", "data": []}', "null", b"\x00\x01"],
)
def test_junk_frames_never_raise(frame):
    assert parse_frame(frame).type == "malformed"


def test_binary_preview_frames_are_decoded():
    plain = parse_frame(struct.pack(">II", 1, 2) + b"PNGDATA")
    assert isinstance(plain, Binary) and plain.image == b"PNGDATA" and plain.image_type == "image/png"
    meta = json.dumps({"node_id": "2", "prompt_id": "p", "image_type": "image/png"}).encode()
    framed = parse_frame(struct.pack(">II", 4, len(meta)) + meta + b"IMG")
    assert framed.prompt_id == "p" and framed.metadata["node_id"] == "2" and framed.image == b"IMG"
    assert parse_frame(struct.pack(">II", 4, 50) + b"{bad").type == "malformed"


def test_history_entries_list_every_output_file():
    entry = HistoryEntry.parse(
        "p",
        {
            "outputs": {
                "9": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}], "text": ["hi"]},
                "10": {"gifs": [{"filename": "b.gif", "subfolder": "s", "type": "output"}]},
            },
            "status": {"status_str": "success", "completed": True, "messages": [["execution_success", {}]]},
        },
    )
    assert entry.succeeded and not entry.interrupted
    assert [(f.node_id, f.filename, f.subfolder) for f in entry.files()] == [("9", "a.png", ""), ("10", "b.gif", "s")]


def test_progress_counts_cached_nodes_and_never_reaches_one():
    tracker = ProgressTracker({"1": {}, "2": {}, "3": {}, "4": {}})
    tracker.cached(["1", "2"])
    tracker.executing("3")
    tracker.step("3", 9, 9)
    assert tracker.value == pytest.approx(0.75)
    tracker.executing("4")
    tracker.step("4", 1, 2)
    assert tracker.value == pytest.approx(3.5 / 4)
    tracker.state({"4": {"state": "finished"}})
    assert tracker.value == 1.0  # the tracker may say so; Task.set_progress caps it below 1 until completion


@pytest.mark.asyncio
async def test_an_unreachable_server_is_a_retryable_error_that_was_not_sent():
    async with ComfyClient("http://127.0.0.1:9", timeout=2) as client:
        with pytest.raises(ComfyUnavailable) as caught:
            await client.queue()
    assert caught.value.permanent is False
    assert caught.value.sent is False
