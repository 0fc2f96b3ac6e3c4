"""The simulator plays ComfyUI 0.26.0 by default and 0.3.64 on request (comfyui-protocol.md §7): each behaviour
that differs is checked against both, on a real simulator on 127.0.0.1:0."""

import asyncio
import time
import uuid

import httpx
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from comfysim import Simulator
from tests.comfysim.test_simulator import (
    history_of,
    invert_graph,
    receive,
    socket,
    submit,
    ws_url,
)

BOTH = ["0.3.64", "0.26.0"]
INVALID_PROMPT_ID = {
    "error": {
        "type": "invalid_prompt_id",
        "message": "prompt_id must be a valid UUID",
        "details": "prompt_id must be a UUID string in canonical lowercase hyphenated form; omit it to let the server "
        "generate one",
        "extra_info": {},
    },
    "node_errors": {},
}


def new_id():
    return str(uuid.uuid4())


@pytest_asyncio.fixture
async def sim(tmp_path, request):
    simulator = Simulator(time_scale=0, output_dir=tmp_path, comfyui_version=getattr(request, "param", "0.26.0"))
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest_asyncio.fixture
async def http(sim):
    async with httpx.AsyncClient(base_url=sim.url, timeout=5) as client:
        yield client


def versions():
    return pytest.mark.parametrize("sim", BOTH, indirect=True)


# --- what it says it is ---------------------------------------------------------------------------------------------


def test_it_plays_0_26_unless_told_otherwise():
    assert Simulator().comfyui_version == "0.26.0" and Simulator().modern
    assert not Simulator(comfyui_version="0.3.64").modern


@versions()
@pytest.mark.asyncio
async def test_system_stats_and_features_tell_the_version(sim, http):
    system = (await http.get("/system_stats")).json()["system"]
    features = (await http.get("/api/features")).json()
    async with connect(ws_url(sim, "me"), max_size=None) as ws:
        await receive(ws)
        await ws.send('{"type": "feature_flags", "data": {"supports_preview_metadata": true}}')
        flags = (await receive(ws))["data"]
    assert system["comfyui_version"] == sim.comfyui_version and flags == features
    assert features["max_upload_size"] == 104857600 and features["supports_preview_metadata"] is True
    if sim.modern:
        assert system["os"] == "linux"
        assert isinstance(system["comfy_package_versions"], dict) and system["deploy_environment"]
        assert features["extension"] == {"manager": {"supports_v4": True}}
        assert features["node_replacements"] is True and features["assets"] is False
    else:
        assert system["os"] == "posix"
        assert "comfy_package_versions" not in system and "deploy_environment" not in system
        assert set(features) == {"supports_preview_metadata", "max_upload_size"}


# --- prompt ids -------------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "prompt_id",
    [
        "0B5C3A52-5D0E-4B7F-9A43-52F2A1C6E001",
        "0b5c3a525d0e4b7f9a4352f2a1c6e001",
        "{0b5c3a52-5d0e-4b7f-9a43-52f2a1c6e001}",
        "urn:uuid:0b5c3a52-5d0e-4b7f-9a43-52f2a1c6e001",
        12345,
        "",
        "my-own-id",
    ],
)
async def test_0_26_refuses_a_prompt_id_that_is_not_a_canonical_uuid(sim, http, prompt_id):
    async with socket(sim, "alice") as ws:
        body = {"prompt": invert_graph(), "prompt_id": prompt_id, "client_id": "alice"}
        refused = await http.post("/prompt", json=body)
        assert refused.status_code == 400 and refused.json() == INVALID_PROMPT_ID
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.2)  # nothing queued, nothing said
    assert sim.queue_snapshot() == ([], []) and sim.executed_prompt_ids == []
    # The refused POST used up queue number 0.
    assert (await http.post("/prompt", json={"prompt": invert_graph(color=3)})).json()["number"] == 1


@pytest.mark.parametrize("sim", ["0.3.64"], indirect=True)
@pytest.mark.asyncio
async def test_0_3_64_takes_any_prompt_id(sim, http):
    reply = await http.post("/prompt", json={"prompt": invert_graph(), "prompt_id": "0B5C3A52-5D0E-4B7F-9A43"})
    assert reply.status_code == 200 and reply.json()["prompt_id"] == "0B5C3A52-5D0E-4B7F-9A43"


@pytest.mark.asyncio
async def test_0_26_runs_a_valid_prompt_id_twice_and_makes_one_up_when_none_is_given(sim, http):
    sim.stall()
    prompt_id = "0b5c3a52-5d0e-1b7f-9a43-52f2a1c6e001"  # a version 1 UUID: the version is not checked
    for prefix in ("first", "second"):
        await submit(http, invert_graph(prefix=prefix), prompt_id=prompt_id)
    made_up = await submit(http, invert_graph(color=5))
    assert str(uuid.UUID(made_up)) == made_up
    sim.unstall()
    await history_of(http, made_up)
    assert sim.executed_prompt_ids == [prompt_id, prompt_id, made_up]


# --- cross-site requests ----------------------------------------------------------------------------------------------


@versions()
@pytest.mark.asyncio
async def test_a_cross_site_browser_request_is_refused_by_0_26_everywhere(sim, http):
    cross = {"Sec-Fetch-Site": "cross-site"}
    post = await http.post("/prompt", json={"prompt": invert_graph()}, headers=cross)
    stats = await http.get("/api/system_stats", headers=cross)
    if sim.modern:
        assert (post.status_code, post.content, stats.status_code, stats.content) == (403, b"", 403, b"")
        assert sim.queue_snapshot() == ([], []) and sim.executed_prompt_ids == []
        with pytest.raises(InvalidStatus) as refused:
            async with connect(ws_url(sim, "eve"), additional_headers=cross):
                pass
        assert refused.value.response.status_code == 403
    else:
        assert post.status_code == 200 and stats.status_code == 200
    for value in ("same-site", "same-origin", "none", "Cross-Site"):
        assert (await http.get("/system_stats", headers={"Sec-Fetch-Site": value})).status_code == 200


# --- unknown node types -----------------------------------------------------------------------------------------------


@versions()
@pytest.mark.asyncio
async def test_an_unknown_node_type_is_missing_node_type_on_0_26(sim, http):
    reply = await http.post("/prompt", json={"prompt": {"1": {"class_type": "NoSuchNode", "inputs": {}}}})
    assert reply.status_code == 400
    if sim.modern:
        assert reply.json() == {
            "error": {
                "type": "missing_node_type",
                "message": "Node 'NoSuchNode' not found. The custom node may not be installed.",
                "details": "Node ID '#1'",
                "extra_info": {"node_id": "1", "class_type": "NoSuchNode", "node_title": "NoSuchNode"},
            },
            "node_errors": {},
        }
    else:
        assert reply.json()["error"] == {
            "type": "invalid_prompt",
            "message": "Cannot execute because node NoSuchNode does not exist.",
            "details": "Node ID '#1'",
            "extra_info": {},
        }


@versions()
@pytest.mark.asyncio
async def test_a_node_without_class_type_or_one_this_server_lacks(sim, http):
    no_class = await http.post("/prompt", json={"prompt": {"1": {"inputs": {}}}})
    sim.limit_capabilities(missing_nodes=["ImageInvert"])
    lacking = await http.post("/prompt", json={"prompt": invert_graph()})
    assert no_class.status_code == 400 and lacking.status_code == 400
    if sim.modern:
        assert no_class.json()["error"] == {
            "type": "missing_node_type",
            "message": "Node 'ID #1' has no class_type. The workflow may be corrupted or a custom node is missing.",
            "details": "Node ID '#1'",
            "extra_info": {"node_id": "1", "class_type": None, "node_title": "ID #1"},
        }
        assert lacking.json()["error"]["type"] == "missing_node_type"
        assert lacking.json()["error"]["extra_info"] == {"node_id": "2", "class_type": "ImageInvert",
                                                         "node_title": "ImageInvert"}  # fmt: skip
    else:
        assert no_class.json()["error"]["type"] == "invalid_prompt"
        assert lacking.json()["error"]["message"] == "Cannot execute because node ImageInvert does not exist."


# --- the cache, create_time -------------------------------------------------------------------------------------------


@versions()
@pytest.mark.asyncio
async def test_a_fully_cached_rerun_without_client_id_has_empty_outputs_on_0_26(sim, http):
    first = await submit(http, invert_graph(prefix="cached"))
    file = (await history_of(http, first))["outputs"]["3"]
    rerun = await history_of(http, await submit(http, invert_graph(prefix="cached")))
    with_client = await history_of(http, await submit(http, invert_graph(prefix="cached"), client_id="alice"))
    assert with_client["outputs"] == {"3": file} and with_client["meta"]["3"]["node_id"] == "3"
    if sim.modern:
        assert rerun["outputs"] == {} and rerun["meta"] == {}
    else:
        assert rerun["outputs"] == {"3": file}


@versions()
@pytest.mark.asyncio
async def test_0_26_stamps_create_time_in_the_queue_and_history(sim, http):
    sim.stall()
    before = int(time.time() * 1000)
    prompt_id = await submit(http, invert_graph(), client_id="alice", extra_data={"note": "kept"})
    queued = (await http.get("/queue")).json()["queue_pending"][0][3]
    sim.unstall()
    stored = (await history_of(http, prompt_id))["prompt"][3]
    assert queued == stored and stored["note"] == "kept" and stored["client_id"] == "alice"
    if sim.modern:
        assert before <= stored["create_time"] <= before + 5000
    else:
        assert "create_time" not in stored
