"""
The official client, comfy-sdk, against a running hub (`manage.py serve --demo`, simulated ComfyUI servers): what
an integrator who points the SDK at comfyhub with a comfyhub token gets.
"""

import json
from pathlib import Path

import pytest
from comfy_sdk import Comfy
from comfy_sdk.events import OutputReady, Progress, StatusChange
from comfy_sdk.exceptions import ComfyError, NotFound

from tests.browser.conftest import hub  # noqa: F401  (the fixture: one real hub for this module)
from tests.conftest import wait_for

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
GRANT = """
from django.contrib.auth.models import Permission, User
permission = Permission.objects.get(codename="submit_raw_graph")
for name in ("alice", "bob"):
    User.objects.get(username=name).user_permissions.add(permission)
"""


def graph(name):
    return json.loads((WORKFLOWS / f"{name}.json").read_text())["graph"]


@pytest.fixture(scope="module")
def sdk(hub):  # noqa: F811
    hub.manage("shell", "-c", GRANT)
    clients = {}

    def client(username):
        if username not in clients:
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("COMFY_BASE_URL", hub.base)
                clients[username] = Comfy(api_key=hub.tokens[username], timeout=15)
        return clients[username]

    yield client
    for opened in clients.values():
        opened.close()


def test_a_job_runs_through_the_sdk_with_its_outputs_and_labels(sdk, hub):  # noqa: F811
    alice = sdk("alice")
    job = alice.submit(alice.workflows.from_json(graph("fast")), metadata={"suite": "sdk"})
    assert job.status == "queued" and job.metadata == {"suite": "sdk"}
    job.wait(timeout=60)
    assert job.status == "succeeded"
    [output] = job.outputs
    assert output.node_id == "2" and output.type == "image" and output.content_type == "image/png"
    # Its bytes, through the SDK's own download (an output is an asset of its owner), whole and by range.
    data = output.to_bytes()
    assert data.startswith(b"\x89PNG") and len(data) == output.size_bytes
    assert output.to_bytes(range=(0, 7)) == data[:8]
    # ... and never through another user's key.
    assert alice.assets.get(output.id).job_id == job.id
    with pytest.raises(NotFound):
        sdk("bob").assets.get(output.id)
    assert job.get_workflow().graph == graph("fast")
    assert [summary.id for summary in alice.list_jobs(metadata={"suite": "sdk"})] == [job.id]


def test_another_user_cannot_see_or_cancel_the_job(sdk):
    job = sdk("alice").submit(sdk("alice").workflows.from_json(graph("fast")))
    with pytest.raises(NotFound):
        sdk("bob").jobs.get(job.id)
    bobs_handle = sdk("bob").jobs.get  # a handle of bob's cannot reach alice's job by id either
    with pytest.raises(NotFound):
        bobs_handle(job.id).cancel()
    assert job.id not in {summary.id for summary in sdk("bob").list_jobs()}
    assert job.wait(timeout=60).status == "succeeded"


def test_an_idempotency_key_reused_with_another_workflow_is_refused(sdk):
    alice = sdk("alice")
    first = alice.submit(alice.workflows.from_json(graph("fast")), idempotency_key="sdk-key-1")
    again = alice.submit(alice.workflows.from_json(graph("fast")), idempotency_key="sdk-key-1")
    assert again.id == first.id
    with pytest.raises(ComfyError) as refused:
        alice.submit(alice.workflows.from_json(graph("invert")), idempotency_key="sdk-key-1")
    assert refused.value.code == "idempotency_key_reuse" and refused.value.http_status == 422


def test_a_running_job_is_canceled_and_its_events_stream_to_the_end(sdk):
    alice = sdk("alice")
    job = alice.submit(alice.workflows.from_json(graph("txt2img")))
    seen, asked = [], False
    for event in job.events():
        seen.append(event)
        if isinstance(event, Progress) and (event.step or 0) >= 3 and not asked:
            asked = True
            job.cancel()
            assert job.status in ("canceling", "canceled")
    statuses = [event.status for event in seen if isinstance(event, StatusChange)]
    assert statuses[0] in ("queued", "running") and statuses[-2:] == ["canceling", "canceled"]
    assert any(isinstance(event, Progress) and event.steps == 20 for event in seen)
    assert wait_for(lambda: job.refresh().status == "canceled", timeout=30, message="the job to be canceled")


def test_the_events_of_a_job_that_succeeds_end_with_its_output(sdk):
    alice = sdk("alice")
    job = alice.submit(alice.workflows.from_json(graph("fast")))
    seen = list(job.events())
    assert isinstance(seen[-1], StatusChange) and seen[-1].status == "succeeded"
    assert any(isinstance(event, OutputReady) and event.output.node_id == "2" for event in seen)


def test_an_asset_uploaded_with_the_sdk_feeds_a_job_on_whichever_server_runs_it(sdk):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 32), (200, 30, 30)).save(buffer, "PNG")
    alice = sdk("alice")
    asset = alice.assets.from_bytes(buffer.getvalue(), filename="red.png")
    workflow = graph("upload-scale")
    workflow["1"]["inputs"]["image"] = asset.as_reference()
    job = alice.submit(alice.workflows.from_json(workflow))
    job.wait(timeout=60)
    assert job.status == "succeeded"
    [output] = job.outputs
    with Image.open(io.BytesIO(output.to_bytes())) as result:
        assert result.size == (32, 16)  # the asset's bytes, scaled by the graph
    # Bob names alice's asset in his job: refused as an asset he does not have.
    with pytest.raises(ComfyError):
        sdk("bob").submit(sdk("bob").workflows.from_json(workflow))
