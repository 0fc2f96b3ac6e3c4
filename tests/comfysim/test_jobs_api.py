"""ComfyUI 0.26's /api/jobs on the simulator (comfyui-protocol.md §7.5): list, detail, atomic cancel, bulk cancel;
absent (404) on 0.3.64."""

import asyncio
import uuid

import httpx
import pytest
import pytest_asyncio

from comfysim import Simulator
from tests.comfysim.test_simulator import (
    history_of,
    invert_graph,
    slow_graph,
    socket,
    submit,
    types,
    until_end,
    until_type,
    wait_until,
)

NOT_FOUND = {"error": "Job not found"}


@pytest_asyncio.fixture
async def sim(tmp_path, request):
    simulator = Simulator(time_scale=0, output_dir=tmp_path, comfyui_version=getattr(request, "param", "0.26.0"))
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest_asyncio.fixture
async def http(sim):
    async with httpx.AsyncClient(base_url=f"{sim.url}/api", timeout=5) as client:
        yield client


async def jobs(http, **query):
    reply = await http.get("/jobs", params=query)
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.mark.parametrize("sim", ["0.3.64"], indirect=True)
@pytest.mark.asyncio
async def test_0_3_64_has_no_jobs_api(sim, http):
    job_id = str(uuid.uuid4())
    assert (await http.get("/jobs")).status_code == 404
    assert (await http.get(f"/jobs/{job_id}")).status_code == 404
    assert (await http.post(f"/jobs/{job_id}/cancel")).status_code == 404


@pytest.mark.asyncio
async def test_the_list_shows_every_state_newest_first_and_pages(sim, http):
    async def submit_later(graph):
        await asyncio.sleep(0.005)  # create_time is in milliseconds
        return await submit(http, graph)

    done = await submit_later(invert_graph(color=1))
    await history_of(http, done)
    sim.fail_node("ImageInvert")
    failed = await submit_later(invert_graph(color=2))
    await history_of(http, failed)
    sim.stall()
    pending = [await submit_later(invert_graph(color=c)) for c in (3, 4)]

    listing = await jobs(http)
    assert [job["id"] for job in listing["jobs"]] == [pending[1], pending[0], failed, done]
    assert listing["pagination"] == {"offset": 0, "limit": None, "total": 4, "has_more": False}
    by_id = {job["id"]: job for job in listing["jobs"]}
    assert by_id[done]["status"] == "completed" and by_id[failed]["status"] == "failed"
    assert by_id[pending[0]] == {"id": pending[0], "status": "pending", "priority": 2,
                                 "create_time": by_id[pending[0]]["create_time"], "outputs_count": 0}  # fmt: skip
    finished = by_id[done]
    assert finished["outputs_count"] == 1 and finished["preview_output"]["nodeId"] == "3"
    assert finished["execution_start_time"] <= finished["execution_end_time"]
    assert "outputs" not in finished and "workflow" not in finished

    page = await jobs(http, limit=2, offset=1, sort_order="asc")
    assert [job["id"] for job in page["jobs"]] == [failed, pending[0]]
    assert page["pagination"] == {"offset": 1, "limit": 2, "total": 4, "has_more": True}
    assert [job["id"] for job in (await jobs(http, status="failed,pending"))["jobs"]] == [*pending[::-1], failed]
    assert (await jobs(http, sort_by="execution_duration"))["pagination"]["total"] == 4


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "query",
    [{"status": "running"}, {"sort_by": "name"}, {"sort_order": "up"}, {"limit": "0"}, {"limit": "x"},
     {"offset": "-1"}],  # fmt: skip
)
async def test_bad_list_filters_are_a_400_with_a_sentence(sim, http, query):
    reply = await http.get("/jobs", params=query)
    assert reply.status_code == 400 and isinstance(reply.json()["error"], str) and reply.json()["error"]


@pytest.mark.asyncio
async def test_the_api_is_also_under_api_api(sim, http):
    prompt_id = await submit(http, invert_graph())
    await history_of(http, prompt_id)
    doubled = (await http.get(f"/api/jobs/{prompt_id}")).json()
    assert doubled == (await http.get(f"/jobs/{prompt_id}")).json() and doubled["status"] == "completed"


@pytest.mark.asyncio
async def test_a_reused_prompt_id_is_listed_twice(sim, http):
    sim.stall()
    prompt_id = str(uuid.uuid4())
    for prefix in ("a", "b"):
        await submit(http, invert_graph(prefix=prefix), prompt_id=prompt_id)
    assert [job["id"] for job in (await jobs(http))["jobs"]] == [prompt_id, prompt_id]


@pytest.mark.asyncio
async def test_the_detail_of_a_finished_job_carries_outputs_status_and_workflow(sim, http):
    prompt_id = await submit(http, invert_graph(), client_id="alice")
    entry = await history_of(http, prompt_id)
    detail = (await http.get(f"/jobs/{prompt_id}")).json()
    assert detail["status"] == "completed" and detail["outputs"] == entry["outputs"]
    assert detail["execution_status"] == entry["status"]
    assert detail["workflow"] == {"prompt": entry["prompt"][2], "extra_data": entry["prompt"][3]}
    assert "execution_error" not in detail

    sim.fail_node("ImageInvert", "boom")
    failed = await submit(http, invert_graph(color=9))
    await history_of(http, failed)
    error = (await http.get(f"/jobs/{failed}")).json()
    assert error["status"] == "failed"
    assert error["execution_error"]["node_type"] == "ImageInvert"
    assert error["execution_error"]["exception_message"] == "boom"


@pytest.mark.asyncio
@pytest.mark.parametrize("job_id", [str(uuid.uuid4()), "not-a-uuid", "0B5C3A52-5D0E-4B7F-9A43-52F2A1C6E001"])
async def test_an_unknown_or_malformed_id_is_not_found(sim, http, job_id):
    reply = await http.get(f"/jobs/{job_id}")
    assert reply.status_code == 404 and reply.json() == NOT_FOUND


@pytest.mark.asyncio
async def test_cancelling_a_pending_job_removes_it_without_a_trace(sim, http):
    sim.stall()
    async with socket(sim, "alice") as ws:
        prompt_id = await submit(http, invert_graph(), client_id="alice")
        assert (await until_type(ws, "status"))["data"]["status"]["exec_info"]["queue_remaining"] == 1
        assert (await http.get(f"/jobs/{prompt_id}")).json()["status"] == "pending"
        reply = await http.post(f"/jobs/{prompt_id}/cancel")
        assert reply.status_code == 200 and reply.json() == {"cancelled": True}
        assert (await until_type(ws, "status"))["data"]["status"]["exec_info"]["queue_remaining"] == 0
    assert (await http.get(f"/jobs/{prompt_id}")).json() == NOT_FOUND
    assert (await http.post(f"/jobs/{prompt_id}/cancel")).json() == {"cancelled": False}  # idempotent
    sim.unstall()
    assert (await jobs(http))["jobs"] == [] and sim.executed_prompt_ids == []


@pytest.mark.asyncio
async def test_cancelling_the_running_job_interrupts_it_at_the_next_node(sim, http):
    sim.set_time_scale(0.05)  # ImageBlur of 2048x2048 takes ~0.25 s
    async with socket(sim, "alice") as ws:
        prompt_id = await submit(http, slow_graph(), client_id="alice")
        await until_type(ws, "executing", node="2")
        running = (await http.get(f"/jobs/{prompt_id}")).json()
        assert running["status"] == "in_progress" and "execution_start_time" not in running
        assert (await http.post(f"/jobs/{prompt_id}/cancel")).json() == {"cancelled": True}
        frames = await until_end(ws, prompt_id)
    assert types(frames)[-4:] == ["executing", "execution_interrupted", "status", "executing"]
    assert frames[-4]["data"]["node"] == "3"
    detail = (await http.get(f"/jobs/{prompt_id}")).json()
    assert detail["status"] == "cancelled" and detail["execution_status"]["status_str"] == "error"
    assert (await jobs(http, status="cancelled"))["jobs"][0]["id"] == prompt_id
    assert (await http.post(f"/jobs/{prompt_id}/cancel")).json() == {"cancelled": False}  # finished


@pytest.mark.asyncio
async def test_cancel_never_checks_the_id(sim, http):
    for job_id in ("nothing-here", str(uuid.uuid4())):
        reply = await http.post(f"/jobs/{job_id}/cancel")
        assert reply.status_code == 200 and reply.json() == {"cancelled": False}


@pytest.mark.asyncio
async def test_bulk_cancel_says_whether_any_was_cancelled_and_refuses_malformed_ids(sim, http):
    sim.stall()
    kept, gone = await submit(http, invert_graph(color=1)), await submit(http, invert_graph(color=2))
    refused = await http.post("/jobs/cancel", json={"job_ids": [gone, "ABC", 7]})
    assert refused.status_code == 400
    assert refused.json() == {"error": "job_ids contains invalid id(s)", "invalid_ids": ["ABC", 7]}
    assert (await jobs(http))["pagination"]["total"] == 2  # nothing cancelled
    assert (await http.post("/jobs/cancel", json={"job_ids": "x"})).status_code == 400
    unknown = str(uuid.uuid4())
    assert (await http.post("/jobs/cancel", json={"job_ids": [unknown]})).json() == {"cancelled": False}
    assert (await http.post("/jobs/cancel", json={"job_ids": [unknown, gone]})).json() == {"cancelled": True}
    assert [job["id"] for job in (await jobs(http))["jobs"]] == [kept]
    sim.unstall()
    await wait_until(lambda: sim.executed_prompt_ids == [kept])
