"""The ComfyUI simulator speaks ComfyUI 0.3.64's protocol as measured on real servers.

Real HTTP and websocket clients against a simulator on 127.0.0.1:0; no database. What 0.26 does differently,
and what it keeps, is in test_comfyui_026.py.
"""

import asyncio
import contextlib
import copy
import io
import json
import struct
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from PIL import Image
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from comfysim import Simulator, SimulatorThread
from servers.management.commands.simulate_comfyui import Command as SimulateCommand

REPO_WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
# Graphs measured against real ComfyUI servers, with what each did (reference/README.md).
REFERENCE_GRAPHS = Path(__file__).resolve().parent / "reference"


# --- graphs (the ones of workflows/, built here so that the tests stand alone) ------------------------------------


def empty_image(width=64, height=64, batch_size=1, color=1193046):
    return {
        "class_type": "EmptyImage",
        "inputs": {"width": width, "height": height, "batch_size": batch_size, "color": color},
    }


def save(source, prefix="invert"):
    return {"class_type": "SaveImage", "inputs": {"images": [source, 0], "filename_prefix": prefix}}


def invert_graph(color=1193046, prefix="invert"):
    return {
        "1": empty_image(color=color),
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": save("2", prefix),
    }


def slow_graph(color=4242424, size=2048):
    return {
        "1": empty_image(size, size, color=color),
        "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 31, "sigma": 10.0}},
        "3": {
            "class_type": "ImageSharpen",
            "inputs": {"image": ["2", 0], "sharpen_radius": 31, "sigma": 10.0, "alpha": 1.0},
        },
        "4": save("3", "slow"),
    }


def websocket_images_graph(color=5):
    return {
        "1": empty_image(32, 32, batch_size=3, color=color),
        "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
    }


def upload_scale_graph(name):
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {
            "class_type": "ImageScaleBy",
            "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "scale_by": 0.5},
        },
        "3": save("2", "loadscale"),
    }


def txt2img_graph(seed=156680208700286, steps=20):
    sampler = {
        "seed": seed,
        "steps": steps,
        "cfg": 8.0,
        "sampler_name": "euler",
        "scheduler": "normal",
        "denoise": 1.0,
        "model": ["4", 0],
        "positive": ["6", 0],
        "negative": ["7", 0],
        "latent_image": ["5", 0],
    }
    return {
        "3": {"class_type": "KSampler", "inputs": sampler},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": save("8", "ComfyUI"),
    }


def png_bytes(size=(40, 30), color=(200, 10, 10)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


# --- fixtures and helpers -----------------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def sim(tmp_path):
    simulator = Simulator(time_scale=0, output_dir=tmp_path, comfyui_version="0.3.64")
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest_asyncio.fixture
async def http(sim):
    async with httpx.AsyncClient(base_url=sim.url, timeout=5) as client:
        yield client


def ws_url(sim, client_id=None, path="/ws"):
    query = f"?clientId={client_id}" if client_id else ""
    return sim.url.replace("http://", "ws://") + path + query


async def receive(ws, timeout=5.0):
    frame = await asyncio.wait_for(ws.recv(), timeout)
    return frame if isinstance(frame, bytes) else json.loads(frame)


@contextlib.asynccontextmanager
async def socket(sim, client_id=None, path="/ws"):
    """A websocket whose connect `status` has been read already."""
    async with connect(ws_url(sim, client_id, path), max_size=None) as ws:
        hello = await receive(ws)
        assert hello["type"] == "status"
        yield ws


async def until_end(ws, prompt_id, timeout=5.0):
    """Every frame up to and including the end of the job, executing{node: null}."""
    frames = []
    async with asyncio.timeout(timeout):
        while True:
            frames.append(await receive(ws))
            if frames[-1] == {"type": "executing", "data": {"node": None, "prompt_id": prompt_id}}:
                return frames


async def until_type(ws, kind, timeout=5.0, **data):
    async with asyncio.timeout(timeout):
        while True:
            frame = await receive(ws)
            if isinstance(frame, dict) and frame["type"] == kind and data.items() <= frame["data"].items():
                return frame


async def assert_silent(ws, seconds=0.2):
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ws.recv(), seconds)


def types(frames):
    return [frame["type"] if isinstance(frame, dict) else "binary" for frame in frames]


async def submit(http, graph, **body):
    reply = await http.post("/prompt", json={"prompt": graph, **body})
    assert reply.status_code == 200, reply.text
    return reply.json()["prompt_id"]


async def history_of(http, prompt_id, timeout=5.0):
    async with asyncio.timeout(timeout):
        while True:
            entry = (await http.get(f"/history/{prompt_id}")).json()
            if entry:
                return entry[prompt_id]
            await asyncio.sleep(0.01)


async def wait_until(predicate, timeout=5.0):
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


def output_files(sim):
    return sorted(p.name for p in Path(sim.folders.output).rglob("*.png"))


# --- a normal run and the cache -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_normal_run_sends_comfyuis_message_sequence(sim, http):
    async with socket(sim, "alice") as ws:
        prompt_id = await submit(http, invert_graph(), client_id="alice")
        frames = await until_end(ws, prompt_id)

    assert types(frames) == [
        "status", "status", "execution_start", "execution_cached",
        "progress_state", "executing", "progress_state",
        "progress_state", "executing", "progress_state",
        "progress_state", "executing", "executed", "progress_state",
        "execution_success", "status", "executing",
    ]  # fmt: skip
    assert [f["data"]["status"]["exec_info"]["queue_remaining"] for f in frames if f["type"] == "status"] == [1, 1, 0]
    assert [f["data"]["node"] for f in frames if f["type"] == "executing"] == ["1", "2", "3", None]
    assert frames[3]["data"]["nodes"] == [] and isinstance(frames[3]["data"]["timestamp"], int)
    assert frames[5]["data"] == {"node": "1", "display_node": "1", "prompt_id": prompt_id}
    image = {"filename": "invert_00001_.png", "subfolder": "", "type": "output"}
    assert frames[12]["data"] == {
        "node": "3",
        "display_node": "3",
        "output": {"images": [image]},
        "prompt_id": prompt_id,
    }
    last_state = frames[13]["data"]["nodes"]
    assert {node: (s["state"], s["value"], s["max"]) for node, s in last_state.items()} == {
        "1": ("finished", 1.0, 1.0),
        "2": ("finished", 1.0, 1.0),
        "3": ("finished", 1.0, 1.0),
    }
    assert last_state["2"] == {
        "value": 1.0, "max": 1.0, "state": "finished", "node_id": "2", "prompt_id": prompt_id,
        "display_node_id": "2", "parent_node_id": None, "real_node_id": "2",
    }  # fmt: skip

    with Image.open(Path(sim.folders.output) / "invert_00001_.png") as png:
        assert png.size == (64, 64)
        assert png.convert("RGB").getpixel((0, 0)) == (255 - 0x12, 255 - 0x34, 255 - 0x56)
        assert json.loads(png.info["prompt"])["3"]["class_type"] == "SaveImage"

    entry = await history_of(http, prompt_id)
    assert list(entry) == ["prompt", "outputs", "status", "meta"]
    assert entry["prompt"] == [0, prompt_id, invert_graph(), {"client_id": "alice"}, ["3"]]
    assert entry["outputs"] == {"3": {"images": [image]}}
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached", "execution_success"]
    assert entry["meta"] == {"3": {"node_id": "3", "display_node": "3", "parent_node": None, "real_node_id": "3"}}
    assert sim.executed_prompt_ids == [prompt_id]


@pytest.mark.asyncio
async def test_a_fully_cached_rerun_reports_the_old_file_and_writes_none(sim, http):
    async with socket(sim, "alice") as ws:
        first = await submit(http, invert_graph(), client_id="alice")
        await until_end(ws, first)
        second = await submit(http, invert_graph(), client_id="alice")
        frames = await until_end(ws, second)

    assert types(frames) == [
        "status", "status", "execution_start", "execution_cached", "executed", "progress_state",
        "execution_success", "status", "executing",
    ]  # fmt: skip
    assert frames[3]["data"]["nodes"] == ["1", "2", "3"]
    old = {"images": [{"filename": "invert_00001_.png", "subfolder": "", "type": "output"}]}
    assert frames[4]["data"]["output"] == old
    assert frames[5]["data"]["nodes"]["3"]["state"] == "finished" and list(frames[5]["data"]["nodes"]) == ["3"]
    assert output_files(sim) == ["invert_00001_.png"]
    entry = await history_of(http, second)
    assert entry["outputs"] == {"3": old} and entry["status"]["completed"] is True


@pytest.mark.asyncio
async def test_a_partly_cached_rerun_executes_only_the_changed_node(sim, http):
    async with socket(sim, "alice") as ws:
        await until_end(ws, await submit(http, invert_graph(), client_id="alice"))
        prompt_id = await submit(http, invert_graph(prefix="other"), client_id="alice")
        frames = await until_end(ws, prompt_id)

    cached = next(f for f in frames if f["type"] == "execution_cached")
    assert cached["data"]["nodes"] == ["1", "2"]
    assert [f["data"]["node"] for f in frames if f["type"] == "executing"] == ["3", None]
    assert output_files(sim) == ["invert_00001_.png", "other_00001_.png"]


@pytest.mark.asyncio
async def test_save_image_counts_on_from_the_files_on_disk(sim, http):
    Image.new("RGB", (4, 4)).save(Path(sim.folders.output) / "quick_00007_.png")
    async with socket(sim, "alice") as ws:
        prompt_id = await submit(http, {"1": empty_image(), "2": save("1", "quick")}, client_id="alice")
        await until_end(ws, prompt_id)
    entry = await history_of(http, prompt_id)
    assert entry["outputs"]["2"]["images"][0]["filename"] == "quick_00008_.png"


@pytest.mark.asyncio
async def test_preview_image_writes_temp_files(sim, http):
    graph = {"1": empty_image(), "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    prompt_id = await submit(http, graph)
    image = (await history_of(http, prompt_id))["outputs"]["2"]["images"][0]
    assert image["type"] == "temp" and image["subfolder"] == ""
    assert image["filename"].startswith("ComfyUI_temp_") and image["filename"].endswith("_00001_.png")
    assert (Path(sim.folders.temp) / image["filename"]).is_file()


# --- submitting: prompt ids, numbers, validation -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_client_chosen_prompt_id_is_used_and_never_deduplicated(sim, http):
    sim.stall()
    first = await http.post("/prompt", json={"prompt": invert_graph(prefix="dup1"), "prompt_id": "my-own-id"})
    second = await http.post("/prompt", json={"prompt": invert_graph(prefix="dup2"), "prompt_id": "my-own-id"})
    numeric = await http.post("/prompt", json={"prompt": invert_graph(prefix="n"), "prompt_id": 12345})
    assert first.json() == {"prompt_id": "my-own-id", "number": 0, "node_errors": {}}
    assert second.json()["prompt_id"] == "my-own-id" and second.json()["number"] == 1
    assert numeric.json()["prompt_id"] == "12345"
    pending = (await http.get("/queue")).json()["queue_pending"]
    assert [item[1] for item in pending].count("my-own-id") == 2

    sim.unstall()
    await history_of(http, "12345")
    assert sim.executed_prompt_ids == ["my-own-id", "my-own-id", "12345"]
    history = (await http.get("/history")).json()
    assert list(history) == ["my-own-id", "12345"]
    assert history["my-own-id"]["outputs"]["3"]["images"][0]["filename"] == "dup2_00001_.png"


@pytest.mark.asyncio
async def test_the_lowest_number_runs_first_and_pending_is_the_raw_heap(sim, http):
    sim.stall()
    for number in (5, 3, 4, 1, 2):
        body = {"prompt": invert_graph(color=number), "number": number, "prompt_id": f"n{number}"}
        assert (await http.post("/prompt", json=body)).json()["number"] == float(number)
    running, pending = sim.queue_snapshot()
    assert running == [] and [item[0] for item in pending] == [1.0, 2.0, 4.0, 5.0, 3.0]  # as measured
    front = await http.post("/prompt", json={"prompt": invert_graph(color=9), "front": True, "prompt_id": "front"})
    assert front.json()["number"] == 0  # -counter; the counter only counts POSTs without a number
    assert (await http.get("/prompt")).json() == {"exec_info": {"queue_remaining": 6}}

    sim.unstall()
    await history_of(http, "n5")
    assert sim.executed_prompt_ids == ["front", "n1", "n2", "n3", "n4", "n5"]


def validation_cases():
    invalid_values = {"1": empty_image(width=999999, height="abc"), "2": save("1", "x")}
    missing_input = {"1": empty_image(), "2": {"class_type": "ImageInvert", "inputs": {}}, "3": save("2", "x")}
    missing_file = upload_scale_graph("does_not_exist.png")
    dangling_link = {"2": save("99", "x")}
    bad_checkpoint = txt2img_graph()
    bad_checkpoint["4"]["inputs"]["ckpt_name"] = "nope.safetensors"
    too_small = {"1": empty_image(width=0), "2": save("1", "x")}
    return [
        ({"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}, "2": save("1", "x")}}, "invalid_prompt",
         "Cannot execute because node NoSuchNode does not exist.", "Node ID '#1'", {}),
        ({"prompt": {"1": {"inputs": {}}}}, "invalid_prompt",
         "Cannot execute because a node is missing the class_type property.", "Node ID '#1'", {}),
        ({"prompt": {"1": empty_image()}}, "prompt_no_outputs", "Prompt has no outputs", "", {}),
        ({"client_id": "x"}, "no_prompt", "No prompt provided", "No prompt provided", {}),
        ({"prompt": invalid_values}, "prompt_outputs_failed_validation", "Prompt outputs failed validation", "",
         {"1": ["value_bigger_than_max", "invalid_input_type"]}),
        ({"prompt": too_small}, "prompt_outputs_failed_validation", "Prompt outputs failed validation", "",
         {"1": ["value_smaller_than_min"]}),
        ({"prompt": missing_input}, "prompt_outputs_failed_validation", "Prompt outputs failed validation", "",
         {"2": ["required_input_missing"]}),
        ({"prompt": missing_file}, "prompt_outputs_failed_validation", "Prompt outputs failed validation", "",
         {"1": ["custom_validation_failed"]}),
        ({"prompt": dangling_link}, "prompt_outputs_failed_validation", "Prompt outputs failed validation",
         "Exception when validating node: '99'", {"2": ["exception_during_validation"]}),
        ({"prompt": bad_checkpoint}, "prompt_outputs_failed_validation", "Prompt outputs failed validation", "",
         {"4": ["value_not_in_list"]}),
    ]  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.parametrize(("body", "kind", "message", "details", "node_errors"), validation_cases())
async def test_an_invalid_prompt_is_refused_with_comfyuis_400(sim, http, body, kind, message, details, node_errors):
    reply = await http.post("/prompt", json=body)
    assert reply.status_code == 400
    data = reply.json()
    assert data["error"] == {"type": kind, "message": message, "details": details, "extra_info": {}}
    assert {node: [e["type"] for e in entry["errors"]] for node, entry in data["node_errors"].items()} == node_errors
    assert (await http.get("/queue")).json() == {"queue_running": [], "queue_pending": []}


@pytest.mark.asyncio
async def test_validation_errors_carry_comfyuis_details(sim, http):
    reply = await http.post("/prompt", json={"prompt": {"1": empty_image(width=999999, height="abc"), "2": save("1")}})
    entry = reply.json()["node_errors"]["1"]
    assert entry["dependent_outputs"] == ["2"] and entry["class_type"] == "EmptyImage"
    too_big, not_int = entry["errors"]
    assert too_big == {
        "type": "value_bigger_than_max",
        "message": "Value 999999 bigger than max of 16384",
        "details": "width",
        "extra_info": {
            "input_name": "width",
            "input_config": ["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}],
            "received_value": 999999,
        },
    }
    assert not_int["message"] == "Failed to convert an input value to a INT value"
    assert not_int["details"] == "height, abc, invalid literal for int() with base 10: 'abc'"

    missing = await http.post("/prompt", json={"prompt": upload_scale_graph("does_not_exist.png")})
    error = missing.json()["node_errors"]["1"]["errors"][0]
    assert error["details"] == "image - Invalid image file: does_not_exist.png"

    dangling = await http.post("/prompt", json={"prompt": {"2": save("99")}})
    error = dangling.json()["node_errors"]["2"]["errors"][0]
    assert error["details"] == "'99'" and error["extra_info"]["exception_type"] == "KeyError"
    assert error["extra_info"]["traceback"]


@pytest.mark.asyncio
async def test_load_image_cannot_read_outside_the_input_folder(sim, http):
    (Path(sim.folders.output) / "private.png").write_bytes(png_bytes())
    reply = await http.post("/prompt", json={"prompt": upload_scale_graph("../output/private.png")})
    assert reply.status_code == 400
    assert reply.json()["node_errors"]["1"]["errors"][0]["type"] == "custom_validation_failed"
    reply = await http.post("/prompt", json={"prompt": upload_scale_graph("private.png [output]")})
    assert reply.status_code == 200  # ComfyUI's annotated names may pick another folder of the server


@pytest.mark.asyncio
async def test_a_refused_prompt_sends_nothing_but_moves_the_counter(sim, http):
    async with socket(sim, "alice") as ws:
        for body, *_ in validation_cases():
            await http.post("/prompt", json={**body, "client_id": "alice"})
        await assert_silent(ws)
        reply = await http.post("/prompt", json={"prompt": invert_graph(), "client_id": "alice"})
        assert reply.json()["number"] == len(validation_cases())
        assert (await receive(ws))["data"]["status"]["exec_info"]["queue_remaining"] == 1


@pytest.mark.asyncio
async def test_a_partly_invalid_prompt_runs_its_valid_outputs(sim, http):
    graph = {
        "1": empty_image(),
        "2": save("1", "good"),
        "3": {"class_type": "ImageInvert", "inputs": {}},
        "4": save("3", "bad"),
    }
    reply = await http.post("/prompt", json={"prompt": graph})
    assert reply.status_code == 200
    node_errors = reply.json()["node_errors"]
    assert list(node_errors) == ["3"] and node_errors["3"]["dependent_outputs"] == ["4"]
    assert node_errors["3"]["errors"][0]["type"] == "required_input_missing"
    entry = await history_of(http, reply.json()["prompt_id"])
    assert entry["prompt"][4] == ["2"] and list(entry["outputs"]) == ["2"]


@pytest.mark.asyncio
async def test_partial_execution_targets_run_only_those_outputs(sim, http):
    graph = {"1": empty_image(), "2": save("1", "first"), "3": save("1", "second")}
    prompt_id = await submit(http, graph, partial_execution_targets=["3"])
    assert list((await history_of(http, prompt_id))["outputs"]) == ["3"]
    assert output_files(sim) == ["second_00001_.png"]


# --- failures and interrupts ----------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_runtime_error_ends_with_execution_error_then_status_then_executing_null(sim, http):
    graph = invert_graph(color=3, prefix="../escape")
    async with socket(sim, "alice") as ws:
        prompt_id = await submit(http, graph, client_id="alice")
        frames = await until_end(ws, prompt_id)

    assert types(frames)[-5:] == ["progress_state", "executing", "execution_error", "status", "executing"]
    assert "execution_success" not in types(frames)
    error = frames[-3]["data"]
    assert error["node_id"] == "3" and error["node_type"] == "SaveImage" and error["executed"] == ["1", "2"]
    assert error["exception_type"] == "Exception"
    assert error["exception_message"].startswith(
        "**** ERROR: Saving image outside the output folder is not allowed.\n full_output_folder: "
    )
    assert f"\n         output_dir: {sim.folders.output}\n" in error["exception_message"]
    assert error["current_inputs"]["filename_prefix"] == ["../escape"] and error["traceback"]
    assert set(error) >= {"prompt_id", "current_outputs", "timestamp"}

    entry = await history_of(http, prompt_id)
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    assert entry["status"]["messages"][-1] == ["execution_error", error]
    assert entry["outputs"] == {}


@pytest.mark.asyncio
async def test_fail_node_makes_the_next_execution_of_that_node_fail_once(sim, http):
    sim.fail_node("ImageInvert", "GPU on fire")
    async with socket(sim, "alice") as ws:
        prompt_id = await submit(http, invert_graph(color=1), client_id="alice")
        error = await until_type(ws, "execution_error")
        assert error["data"]["node_id"] == "2" and error["data"]["node_type"] == "ImageInvert"
        assert error["data"]["exception_type"] == "RuntimeError"
        assert error["data"]["exception_message"] == "GPU on fire"
        await until_end(ws, prompt_id)

        retry = await submit(http, invert_graph(color=1), client_id="alice")
        frames = await until_end(ws, retry)
    assert "execution_success" in types(frames)
    # Node 1 had run before the failure: the retry takes it from the cache.
    assert next(f for f in frames if f["type"] == "execution_cached")["data"]["nodes"] == ["1"]


@pytest.mark.asyncio
async def test_fail_node_also_matches_a_node_id(sim, http):
    sim.fail_node("3")
    prompt_id = await submit(http, invert_graph(color=2))
    entry = await history_of(http, prompt_id)
    assert entry["status"]["messages"][-1][1]["exception_message"] == "Simulated failure"
    assert entry["status"]["messages"][-1][1]["node_id"] == "3"


@pytest.mark.asyncio
async def test_an_interrupt_takes_effect_before_the_next_node(sim, http):
    sim.set_time_scale(0.05)  # ImageBlur of 2048x2048 takes ~0.25 s
    async with socket(sim, "alice") as ws:
        prompt_id = await submit(http, slow_graph(), client_id="alice")
        await until_type(ws, "executing", node="2")
        assert (await http.post("/interrupt")).status_code == 200
        frames = await until_end(ws, prompt_id)

    assert types(frames)[-6:] == [
        "progress_state", "progress_state", "executing", "execution_interrupted", "status", "executing",
    ]  # fmt: skip
    assert frames[-4]["data"]["node"] == "3"
    interrupted = frames[-3]["data"]
    assert {k: interrupted[k] for k in ("prompt_id", "node_id", "node_type", "executed")} == {
        "prompt_id": prompt_id,
        "node_id": "3",
        "node_type": "ImageSharpen",
        "executed": ["1", "2"],
    }
    entry = await history_of(http, prompt_id)
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    assert output_files(sim) == []


@pytest.mark.asyncio
async def test_an_interrupt_for_another_prompt_or_while_idle_does_nothing(sim, http):
    assert (await http.post("/interrupt")).status_code == 200  # idle: cleared when the next job starts
    sim.set_time_scale(0.02)
    async with socket(sim, "alice") as ws:
        prompt_id = await submit(http, slow_graph(color=7), client_id="alice")
        await until_type(ws, "executing", node="2")
        reply = await http.post("/interrupt", json={"prompt_id": "not-the-running-one"})
        assert reply.status_code == 200 and reply.text == ""
        frames = await until_end(ws, prompt_id)
    assert "execution_success" in types(frames)


@pytest.mark.asyncio
async def test_an_interrupt_stops_a_progress_node_at_its_next_step(sim, http):
    sim.set_time_scale(0.1)  # 15 ms per KSampler step
    async with socket(sim, "alice") as ws:
        prompt_id = await submit(http, txt2img_graph(steps=200), client_id="alice")
        await until_type(ws, "progress", value=2)
        running = sim.queue_snapshot()[0][0]
        await http.post("/interrupt", json={"prompt_id": running[1]})
        interrupted = await until_type(ws, "execution_interrupted")
        await until_end(ws, prompt_id)
    assert interrupted["data"]["node_id"] == "3" and interrupted["data"]["node_type"] == "KSampler"


# --- queue and history ------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_deleting_a_pending_job_only_broadcasts_status(sim, http):
    sim.stall()
    async with socket(sim, "alice") as ws:
        keep = await submit(http, invert_graph(color=10), client_id="alice")
        drop = await submit(http, invert_graph(color=11), client_id="alice")
        assert [(await receive(ws))["data"]["status"]["exec_info"]["queue_remaining"] for _ in range(2)] == [1, 2]
        assert (await http.post("/queue", json={"delete": [drop, "unknown"]})).status_code == 200
        assert await receive(ws) == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 1}}}}
        assert [item[1] for item in (await http.get("/queue")).json()["queue_pending"]] == [keep]
        sim.unstall()
        await until_end(ws, keep)
    assert (await http.get(f"/history/{drop}")).json() == {}
    assert drop not in sim.executed_prompt_ids


@pytest.mark.asyncio
async def test_deleting_the_running_job_does_nothing_and_clear_empties_pending(sim, http):
    sim.set_time_scale(0.02)
    async with socket(sim, "alice") as ws:
        running = await submit(http, slow_graph(color=3), client_id="alice")
        await until_type(ws, "executing", node="2")
        sim.stall()
        for color in (1, 2):
            await submit(http, invert_graph(color=color), client_id="alice")
        await http.post("/queue", json={"delete": [running]})
        assert sim.queue_snapshot()[0][0][1] == running
        await http.post("/queue", json={"clear": True})
        assert sim.queue_snapshot()[1] == []
        sim.unstall()
        await until_end(ws, running)
    assert len(sim.executed_prompt_ids) == 1


@pytest.mark.asyncio
async def test_history_pages_and_deletes(sim, http):
    ids = [await submit(http, invert_graph(color=c), prompt_id=f"p{c}") for c in range(4)]
    await history_of(http, ids[-1])
    assert list((await http.get("/history")).json()) == ids
    assert list((await http.get("/history", params={"max_items": 2})).json()) == ["p2", "p3"]
    assert list((await http.get("/history", params={"offset": 1, "max_items": 2})).json()) == ["p1", "p2"]
    await http.post("/history", json={"delete": ["p1"]})
    assert (await http.get("/history/p1")).json() == {}
    await http.post("/history", json={"clear": True})
    assert (await http.get("/history")).json() == {}


# --- websocket routing ------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_another_client_receives_only_status(sim, http):
    async with socket(sim, "observer") as observer, socket(sim, "alice") as ws:
        prompt_id = await submit(http, invert_graph(color=20), client_id="alice")
        await until_end(ws, prompt_id)
        seen = [await receive(observer) for _ in range(3)]
        await assert_silent(observer)
    assert [frame["data"]["status"]["exec_info"]["queue_remaining"] for frame in seen] == [1, 1, 0]


@pytest.mark.asyncio
async def test_a_job_without_client_id_broadcasts_only_progress(sim, http):
    async with socket(sim) as ws:
        await submit(http, websocket_images_graph())
        idle = {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}}}
        frames = []
        async with asyncio.timeout(5):
            while idle not in frames:
                frames.append(await receive(ws))
        await assert_silent(ws)
    assert set(types(frames)) == {"status", "progress_state", "progress", "binary"}
    assert [f["data"]["value"] for f in frames if types([f]) == ["progress"]] == [0, 1, 2]


@pytest.mark.asyncio
async def test_websocket_images_send_progress_and_one_frame_per_image(sim, http):
    async with socket(sim, "alice") as ws:
        prompt_id = await submit(http, websocket_images_graph(), client_id="alice")
        frames = await until_end(ws, prompt_id)

    progress = [(f["data"]["value"], f["data"]["max"]) for f in frames if types([f]) == ["progress"]]
    assert progress == [(0, 3), (1, 3), (2, 3)]
    images = [f for f in frames if isinstance(f, bytes)]
    assert len(images) == 3
    for frame in images:
        assert struct.unpack(">II", frame[:8]) == (1, 2)
        with Image.open(io.BytesIO(frame[8:])) as png:
            assert png.size == (32, 32)
    # A type 1 frame comes right after its progress message.
    assert types(frames)[types(frames).index("progress") + 1] == "binary"
    assert "executed" not in types(frames)
    finished = [f for f in frames if types([f]) == ["progress_state"]][-1]["data"]["nodes"]["2"]
    assert (finished["state"], finished["value"], finished["max"]) == ("finished", 3, 3)
    assert (await history_of(http, prompt_id))["outputs"] == {}


@pytest.mark.asyncio
async def test_feature_flags_switch_image_frames_to_type_4_with_metadata(sim, http):
    async with socket(sim, "alice") as ws:
        await ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        assert await receive(ws) == {
            "type": "feature_flags",
            "data": {"supports_preview_metadata": True, "max_upload_size": 104857600},
        }
        prompt_id = await submit(http, websocket_images_graph(color=6), client_id="alice")
        frames = await until_end(ws, prompt_id)

    first = types(frames).index("binary")
    assert types(frames)[first + 1] == "progress"  # type 4 arrives just before its progress message
    frame = frames[first]
    event, length = struct.unpack(">II", frame[:8])
    metadata = json.loads(frame[8 : 8 + length])
    assert event == 4
    assert metadata == {
        "node_id": "2", "prompt_id": prompt_id, "display_node_id": "2", "parent_node_id": None,
        "real_node_id": "2", "image_type": "image/png",
    }  # fmt: skip
    assert frame[8 + length : 8 + length + 8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.asyncio
async def test_the_server_ignores_other_client_frames(sim, http):
    async with socket(sim, "alice") as ws:
        await ws.send("not json")
        await ws.send(json.dumps({"type": "hello"}))
        await ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        await assert_silent(ws)  # feature flags count only as the first valid message


@pytest.mark.asyncio
async def test_a_socket_without_client_id_gets_a_random_sid(sim):
    async with connect(ws_url(sim, path="/api/ws"), max_size=None) as ws:
        hello = await receive(ws)
    assert hello["type"] == "status" and len(hello["data"]["sid"]) == 32
    assert hello["data"]["status"] == {"exec_info": {"queue_remaining": 0}}


@pytest.mark.asyncio
async def test_a_reconnect_while_running_gets_only_the_current_node(tmp_path):
    sim = Simulator(time_scale=0.05, output_dir=tmp_path, faithful_socket_bug=False)
    await sim.start()
    try:
        async with httpx.AsyncClient(base_url=sim.url) as http:
            async with socket(sim, "alice") as ws:
                prompt_id = await submit(http, slow_graph(color=8), client_id="alice")
                await until_type(ws, "executing", node="2")
                sim.stall()
            async with connect(ws_url(sim, "alice"), max_size=None) as ws:
                hello = await receive(ws)
                assert hello["data"]["sid"] == "alice"
                assert await receive(ws) == {"type": "executing", "data": {"node": "2"}}
                sim.unstall()
                frames = await until_end(ws, prompt_id)
        assert "execution_start" not in types(frames)
        assert [f["data"]["node"] for f in frames if f["type"] == "executing"] == ["3", "4", None]
    finally:
        await sim.stop()


@pytest.mark.asyncio
async def test_two_sockets_with_one_client_id_orphan_the_newer_one(sim, http):
    old = await connect(ws_url(sim, "alice"), max_size=None)
    await receive(old)
    async with socket(sim, "alice") as new:
        assert sim.connected_clients() == ["alice"]
        await old.close()
        await wait_until(lambda: sim.connected_clients() == [])
        prompt_id = await submit(http, invert_graph(color=30), client_id="alice")
        await history_of(http, prompt_id)
        await assert_silent(new)  # not even status: the new socket is orphaned (§2.6)


@pytest.mark.asyncio
async def test_without_the_faithful_bug_the_newer_socket_keeps_working(tmp_path):
    sim = Simulator(time_scale=0, output_dir=tmp_path, faithful_socket_bug=False)
    await sim.start()
    try:
        async with httpx.AsyncClient(base_url=sim.url) as http:
            old = await connect(ws_url(sim, "alice"), max_size=None)
            await receive(old)
            async with socket(sim, "alice") as new:
                await old.close()
                await asyncio.sleep(0.05)
                assert sim.connected_clients() == ["alice"]
                prompt_id = await submit(http, invert_graph(color=31), client_id="alice")
                assert "execution_success" in types(await until_end(new, prompt_id))
    finally:
        await sim.stop()


# --- files --------------------------------------------------------------------------------------------------------


async def upload(http, data, name="capture_red.png", **fields):
    return await http.post("/upload/image", files={"image": (name, data, "image/png")}, data=fields)


@pytest.mark.asyncio
async def test_upload_keeps_identical_files_and_renames_different_ones(sim, http):
    red, blue = png_bytes(color=(255, 0, 0)), png_bytes(color=(0, 0, 255))
    assert (await upload(http, red)).json() == {"name": "capture_red.png", "subfolder": "", "type": "input"}
    assert (await upload(http, red)).json()["name"] == "capture_red.png"
    assert (await upload(http, blue)).json()["name"] == "capture_red (1).png"
    assert (await upload(http, blue, overwrite="true")).json()["name"] == "capture_red.png"
    assert (Path(sim.folders.input) / "capture_red.png").read_bytes() == blue
    reply = await upload(http, red, subfolder="sub", type="temp")
    assert reply.json() == {"name": "capture_red.png", "subfolder": "sub", "type": "temp"}
    assert (Path(sim.folders.temp) / "sub" / "capture_red.png").is_file()


@pytest.mark.asyncio
async def test_upload_refuses_non_images_and_escapes(sim, http):
    assert (await upload(http, b"#!/bin/sh\necho hi\n", name="x.png")).status_code == 400
    assert (await upload(http, png_bytes(), subfolder="../..")).status_code == 400
    assert (await upload(http, png_bytes(), type="elsewhere")).status_code == 400
    assert (await http.post("/upload/image", data={"type": "input"})).status_code == 400
    assert list(Path(sim.folders.input).iterdir()) == []


@pytest.mark.asyncio
async def test_an_uploaded_image_runs_in_upload_scale(sim, http):
    name = (await upload(http, png_bytes(size=(40, 30)), name="photo.png")).json()["name"]
    object_info = (await http.get("/object_info/LoadImage")).json()
    assert object_info["LoadImage"]["input"]["required"]["image"][0] == ["photo.png"]
    prompt_id = await submit(http, upload_scale_graph(name))
    image = (await history_of(http, prompt_id))["outputs"]["3"]["images"][0]
    assert image["filename"] == "loadscale_00001_.png"
    with Image.open(Path(sim.folders.output) / image["filename"]) as png:
        assert png.size == (20, 15)


@pytest.mark.asyncio
async def test_the_image_nodes_do_real_pixel_work(sim, http):
    gradient = Image.linear_gradient("L").resize((80, 40)).convert("RGB")
    buffer = io.BytesIO()
    gradient.save(buffer, format="PNG")
    name = (await upload(http, buffer.getvalue(), name="gradient.png")).json()["name"]
    scale = {"upscale_method": "lanczos", "width": 32, "height": 32, "crop": "center"}
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], **scale}},
        "3": {"class_type": "ImageBlur", "inputs": {"image": ["2", 0], "blur_radius": 3, "sigma": 2.0}},
        "4": {
            "class_type": "ImageSharpen",
            "inputs": {"image": ["3", 0], "sharpen_radius": 2, "sigma": 1.0, "alpha": 2.0},
        },
        "5": {"class_type": "ImageInvert", "inputs": {"image": ["4", 0]}},
        "6": save("5", "pixels"),
    }
    image = (await history_of(http, await submit(http, graph)))["outputs"]["6"]["images"][0]
    with Image.open(Path(sim.folders.output) / image["filename"]) as png:
        assert png.size == (32, 32)
        top, bottom = png.convert("L").getpixel((16, 0)), png.convert("L").getpixel((16, 31))
    assert top > bottom  # the gradient, inverted: light at the top


@pytest.mark.asyncio
async def test_history_keeps_comfyuis_limit_plus_one(sim, http, monkeypatch):
    monkeypatch.setattr("comfysim.server.MAXIMUM_HISTORY_SIZE", 2)
    for color in range(5):
        await history_of(http, await submit(http, invert_graph(color=color), prompt_id=f"h{color}"))
    assert list((await http.get("/history")).json()) == ["h2", "h3", "h4"]


@pytest.mark.asyncio
async def test_view_serves_outputs_and_refuses_escapes(sim, http):
    prompt_id = await submit(http, invert_graph(color=40))
    image = (await history_of(http, prompt_id))["outputs"]["3"]["images"][0]
    reply = await http.get("/view", params={"filename": image["filename"], "type": "output", "subfolder": ""})
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"
    assert reply.headers["content-disposition"] == f'filename="{image["filename"]}"'
    assert reply.content == (Path(sim.folders.output) / image["filename"]).read_bytes()
    webp = await http.get("/api/view", params={"filename": image["filename"], "preview": "webp;50"})
    assert webp.headers["content-type"] == "image/webp"

    assert (await http.get("/view", params={"filename": "missing.png"})).status_code == 404
    assert (await http.get("/view", params={"filename": "../secret.png"})).status_code == 400
    assert (await http.get("/view", params={"filename": "/etc/passwd"})).status_code == 400
    assert (await http.get("/view", params={"filename": "x.png", "subfolder": "../.."})).status_code == 403
    assert (await http.get("/view", params={"filename": "x.png", "type": "nowhere"})).status_code == 400


# --- the model-based graph ----------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_txt2img_reports_every_sampler_step_and_writes_a_512_png(sim, http):
    async with socket(sim, "alice") as ws:
        prompt_id = await submit(http, txt2img_graph(), client_id="alice")
        frames = await until_end(ws, prompt_id)
    progress = [(f["data"]["value"], f["data"]["max"], f["data"]["node"]) for f in frames if f["type"] == "progress"]
    assert progress == [(step, 20, "3") for step in range(1, 21)]
    image = (await history_of(http, prompt_id))["outputs"]["9"]["images"][0]
    with Image.open(Path(sim.folders.output) / image["filename"]) as png:
        assert png.size == (512, 512) and png.format == "PNG"
        assert len(png.convert("RGB").getcolors(maxcolors=1 << 20)) > 100  # a picture, not a solid square


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("version", "flag", "asked", "size"),
    [
        ("0.3.64", "none", None, None),  # ComfyUI's default: no previews
        ("0.3.64", "auto", None, (64, 64)),  # latent size
        ("0.3.64", "taesd", None, (512, 512)),
        ("0.3.64", "none", "taesd", None),  # 0.3 does not read extra_data.preview_method
        ("0.5.1", "none", "taesd", (512, 512)),
        ("0.5.1", "auto", "none", None),
    ],
)
async def test_ksampler_sends_previews_as_the_flag_or_the_prompt_says(tmp_path, version, flag, asked, size):
    sim = Simulator(time_scale=0, output_dir=tmp_path, comfyui_version=version, preview_method=flag)
    await sim.start()
    try:
        async with httpx.AsyncClient(base_url=sim.url, timeout=5) as http, socket(sim, "alice") as ws:
            assert (await http.get("/system_stats")).json()["system"]["comfyui_version"] == version
            extra = {"extra_data": {"preview_method": asked}} if asked else {}
            prompt_id = await submit(http, txt2img_graph(steps=5), client_id="alice", **extra)
            frames = await until_end(ws, prompt_id)
    finally:
        await sim.stop()
    previews = [frame for frame in frames if isinstance(frame, bytes)]
    if size is None:
        assert previews == []
        return
    assert len(previews) == 5  # one per step, each right after its progress message
    for frame in previews:
        assert struct.unpack(">II", frame[:8]) == (1, 2)
        with Image.open(io.BytesIO(frame[8:])) as png:
            assert png.size == size and png.format == "PNG"


@pytest.mark.asyncio
async def test_txt2img_duration_follows_the_time_scale(sim, http):
    sim.set_time_scale(0.01)
    started = asyncio.get_running_loop().time()
    await history_of(http, await submit(http, txt2img_graph(seed=1)))
    elapsed = asyncio.get_running_loop().time() - started
    # 3-5 s at time_scale 1, 0.03-0.05 s of it scaled at 0.01; the bound leaves room for the Pillow work of a machine
    # running the rest of the suite, and still fails a scale that is not applied.
    assert 0.03 < elapsed < 2.5
    assert 0.03 < sim.busy_seconds < 2.5


# --- fault injection ------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_restart_loses_everything_in_memory_and_comes_back_on_the_same_port(sim, http):
    done = await submit(http, invert_graph(color=50))
    await history_of(http, done)
    started_before = (await http.get("/system_stats")).json()["system"]["argv"][-1]
    sim.set_time_scale(0.02)
    port = sim.port
    async with socket(sim, "alice") as ws:
        running = await submit(http, slow_graph(color=51), client_id="alice")
        await until_type(ws, "executing", node="2")
        await submit(http, invert_graph(color=52), client_id="alice")
        await sim.restart(down_for=0.05)
        with pytest.raises(ConnectionClosed):
            while True:
                await receive(ws)

    assert sim.port == port
    async with httpx.AsyncClient(base_url=sim.url) as fresh:
        assert (await fresh.get("/history")).json() == {}
        assert (await fresh.get("/queue")).json() == {"queue_running": [], "queue_pending": []}
        assert (await fresh.get("/system_stats")).json()["system"]["argv"][-1] != started_before
        async with socket(sim, "alice") as ws:
            await assert_silent(ws, 0.3)  # the aborted job never reports anything
        assert (await fresh.get(f"/history/{running}")).json() == {}
        assert (await fresh.post("/prompt", json={"prompt": invert_graph(color=53)})).json()["number"] == 0
    assert (Path(sim.folders.output) / "invert_00001_.png").is_file()


@pytest.mark.asyncio
async def test_a_restart_refuses_connections_while_down(sim):
    restarting = asyncio.create_task(sim.restart(down_for=0.3))
    await asyncio.sleep(0.1)
    async with httpx.AsyncClient(base_url=sim.url) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get("/prompt")
        await restarting
        assert (await http.get("/prompt")).status_code == 200


@pytest.mark.asyncio
async def test_dropped_sockets_close_but_the_job_finishes(sim, http):
    sim.set_time_scale(0.02)
    async with socket(sim, "alice") as ws:
        prompt_id = await submit(http, slow_graph(color=60), client_id="alice")
        await until_type(ws, "executing", node="2")
        await sim.drop_sockets()
        with pytest.raises(ConnectionClosed):
            while True:
                await receive(ws)
    assert sim.connected_clients() == []
    entry = await history_of(http, prompt_id)
    assert entry["status"]["status_str"] == "success"


@pytest.mark.asyncio
async def test_a_stalled_job_sends_nothing_until_unstalled(sim, http):
    sim.set_time_scale(0.05)
    async with socket(sim, "alice") as ws:
        prompt_id = await submit(http, slow_graph(color=70), client_id="alice")
        await until_type(ws, "executing", node="2")
        sim.stall()
        await assert_silent(ws, 0.4)
        assert (await http.get(f"/history/{prompt_id}")).json() == {}
        assert sim.queue_snapshot()[0][0][1] == prompt_id
        sim.unstall()
        frames = await until_end(ws, prompt_id)
    assert "execution_success" in types(frames)


def test_simulator_thread_serves_sync_code(tmp_path):
    with SimulatorThread(time_scale=0, output_dir=tmp_path, name="threaded") as server:
        prompt_id = "0b5c3a52-5d0e-4b7f-9a43-52f2a1c6e001"
        reply = httpx.post(f"{server.url}/prompt", json={"prompt": invert_graph(), "prompt_id": prompt_id})
        assert reply.status_code == 200
        for _ in range(500):
            if httpx.get(f"{server.url}/history/{prompt_id}").json():
                break
        running, pending = server.call(server.sim.queue_snapshot)
        assert running == [] and pending == []
        server.stall()
        server.unstall()
        server.fail_node("ImageInvert", message="boom")
        server.set_time_scale(0.01)
        server.drop_sockets()
        server.restart(down_for=0.0)
        assert httpx.get(f"{server.url}/history/sync").json() == {}
        assert "--simulator-name" in httpx.get(f"{server.url}/system_stats").json()["system"]["argv"]
        assert server.call(lambda: 40 + 2) == 42
    assert (tmp_path / "output" / "invert_00001_.png").is_file()


# --- the rest of the HTTP surface ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_foreign_origin_is_refused_and_bad_json_is_a_500(sim, http):
    reply = await http.post("/prompt", json={"prompt": invert_graph()}, headers={"Origin": "http://evil.example"})
    assert reply.status_code == 403
    same = await http.get("/prompt", headers={"Origin": sim.url})
    assert same.status_code == 200
    broken = await http.post("/prompt", content=b"{not json", headers={"Content-Type": "application/json"})
    assert broken.status_code == 500 and broken.text == "500 Internal Server Error\n\nServer got itself in trouble"
    assert (await http.post("/queue", content=b"nope")).status_code == 500
    assert (await http.get("/queue")).json()["queue_pending"] == []


@pytest.mark.asyncio
async def test_the_informational_endpoints_look_like_comfyui(sim, http):
    stats = (await http.get("/api/system_stats")).json()
    assert stats["system"]["comfyui_version"] == "0.3.64"
    assert stats["system"]["argv"][-2] == "--simulator-started" and stats["devices"][0]["type"] == "cpu"
    assert (await http.get("/features")).json() == {"supports_preview_metadata": True, "max_upload_size": 104857600}
    assert (await http.get("/embeddings")).json() == [] and (await http.get("/extensions")).json() == []
    assert "checkpoints" in (await http.get("/models")).json()
    assert "v1-5-pruned-emaonly.safetensors" in (await http.get("/api/models/checkpoints")).json()
    assert (await http.get("/models/nowhere")).status_code == 404
    assert (await http.get("/api/jobs")).status_code == 404
    assert (await http.get("/object_info/NoSuchNode")).json() == {}

    info = (await http.get("/object_info")).json()
    assert {"EmptyImage", "SaveImage", "KSampler", "SaveImageWebsocket", "LoadImage", "VAEDecode"} <= set(info)
    empty = info["EmptyImage"]
    assert empty["input"]["required"]["width"] == ["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}]
    assert empty["output"] == ["IMAGE"] and empty["output_is_list"] == [False] and empty["output_node"] is False
    assert empty["name"] == "EmptyImage" and empty["category"] == "image"
    assert info["SaveImage"]["output_node"] is True
    assert "euler" in info["KSampler"]["input"]["required"]["sampler_name"][0]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "path",
    sorted(p.name for p in REFERENCE_GRAPHS.glob("*.json")),
)
async def test_every_reference_graph_behaves_as_a_real_server_did(sim, http, path):
    graph = json.loads((REFERENCE_GRAPHS / path).read_text())
    if path == "upload-scale.json":
        graph["1"]["inputs"]["image"] = (await upload(http, png_bytes())).json()["name"]
    reply = await http.post("/prompt", json={"prompt": graph})
    if path == "invalid-node.json":
        assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_prompt"
        return
    entry = await history_of(http, reply.json()["prompt_id"], timeout=10)
    expected = "error" if path == "runtime-error.json" else "success"
    assert entry["status"]["status_str"] == expected


@pytest.mark.asyncio
async def test_the_repository_workflows_run(sim, http):
    for path in sorted(REPO_WORKFLOWS.glob("*.json")):
        graph = copy.deepcopy(json.loads(path.read_text())["graph"])
        for node in graph.values():
            if node["class_type"] == "LoadImage":
                node["inputs"]["image"] = (await upload(http, png_bytes())).json()["name"]
        entry = await history_of(http, await submit(http, graph), timeout=10)
        assert entry["status"]["status_str"] == "success", path.name


@pytest.mark.asyncio
async def test_a_fast_job_at_time_scale_zero_takes_milliseconds(sim, http):
    started = asyncio.get_running_loop().time()
    await history_of(http, await submit(http, {"1": empty_image(color=99), "2": save("1", "quick")}))
    assert sim.busy_seconds < 0.05  # the job itself
    assert asyncio.get_running_loop().time() - started < 0.5  # with HTTP and polling, on a busy CI machine


# --- the management command ---------------------------------------------------------------------------------------


def test_the_command_parses_its_arguments():
    parser = SimulateCommand().create_parser("manage.py", "simulate_comfyui")
    options = parser.parse_args(["--port", "8190", "--time-scale", "0.5", "--output-dir", "var/sim", "--host", "::1"])
    assert (options.port, options.time_scale, options.output_dir, options.host) == (8190, 0.5, "var/sim", "::1")
    defaults = parser.parse_args([])
    assert (defaults.port, defaults.host, defaults.time_scale, defaults.output_dir) == (8188, "127.0.0.1", 1.0, None)


@pytest.mark.asyncio
async def test_the_command_serves_until_stopped(tmp_path):
    command, stop = SimulateCommand(stdout=io.StringIO()), asyncio.Event()
    simulator = Simulator(time_scale=0, output_dir=tmp_path, name="cmd")
    serving = asyncio.create_task(command.serve(simulator, "127.0.0.1", 0, stop))
    await wait_until(lambda: simulator.url)
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{simulator.url}/prompt")).status_code == 200
    assert simulator.url in command.stdout.getvalue()
    stop.set()
    await asyncio.wait_for(serving, 5)
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"{simulator.url}/prompt")
