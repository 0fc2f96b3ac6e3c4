"""
A job's `core/ASSET` references become the user's uploads of the same bytes, which the engine copies to the job's own
server; a reference to what is not the user's, not an image or not well formed is refused before anything is made.
"""

import hashlib

import pytest
from PIL import Image

from servers.wake import notify_work
from tasks.models import Asset, Task, TaskStatus, Upload
from tasks.submission import private_output_names
from tasks.v2.assets import output_asset
from tasks.v2.refs import MissingAsset, resolve_asset_refs
from tests.conftest import wait_for
from tests.tasks.test_api import upload
from tests.v2.test_assets import V2, finished_task, png

GRAPH = {
    "1": {"class_type": "LoadImage", "inputs": {"image": None}},
    "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "scale_by": 0.5}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "assets"}},
}


def referencing(asset_id, **info):
    graph = {key: {**node, "inputs": dict(node["inputs"])} for key, node in GRAPH.items()}
    graph["1"]["inputs"]["image"] = {"__type": "core/ASSET", "info": {"id": str(asset_id), **info}}
    return graph


def uploaded(user, data=None):
    reply = V2(user).upload(data or png())
    assert reply.status_code in (200, 201), reply.content
    return Asset.objects.get(pk=reply.json()["id"])


@pytest.mark.django_db
def test_a_reference_becomes_the_users_upload_of_the_same_bytes(alice):
    asset = uploaded(alice)
    graph = referencing(asset.pk, hash="blake3:whatever", file_path="elsewhere.png")
    resolved, images = resolve_asset_refs(alice, graph)
    upload = Upload.objects.get()
    assert upload.owner == alice
    assert upload.sha256 == asset.sha256
    with upload.file.open("rb") as file:
        assert hashlib.sha256(file.read()).hexdigest() == asset.sha256
    assert resolved["1"]["inputs"]["image"] == upload.remote_name
    assert resolved["2"] == GRAPH["2"]
    assert images == [{"node": "1", "input": "image", "upload": str(upload.pk)}]
    assert graph["1"]["inputs"]["image"]["__type"] == "core/ASSET"  # the caller's graph is left as it was


@pytest.mark.django_db
def test_deleting_the_asset_leaves_the_upload_a_job_uses(alice, django_capture_on_commit_callbacks):
    asset = uploaded(alice)
    _, images = resolve_asset_refs(alice, referencing(asset.pk))
    with django_capture_on_commit_callbacks(execute=True):
        assert V2(alice).delete(f"/api/v2/assets/{asset.pk}").status_code == 204
    upload = Upload.objects.get(pk=images[0]["upload"])
    with upload.file.open("rb") as file:
        assert hashlib.sha256(file.read()).hexdigest() == asset.sha256


@pytest.mark.django_db
def test_the_same_bytes_are_one_upload_however_often_referenced(alice):
    asset = uploaded(alice)
    graph = referencing(asset.pk)
    graph["4"] = {"class_type": "LoadImage", "inputs": {"image": graph["1"]["inputs"]["image"]}}
    _, images = resolve_asset_refs(alice, graph)
    resolve_asset_refs(alice, referencing(asset.pk))
    assert Upload.objects.count() == 1
    assert {image["node"] for image in images} == {"1", "4"}


@pytest.mark.django_db
def test_an_image_uploaded_through_v1_is_reused(alice_api, alice):
    data = png()
    earlier = upload(alice_api, data).json()["id"]
    _, images = resolve_asset_refs(alice, referencing(uploaded(alice, data).pk))
    assert images[0]["upload"] == earlier
    assert Upload.objects.count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ({"__type": "core/ASSET"}, "without an asset id"),
        ({"__type": "core/ASSET", "info": {"id": "not-a-uuid"}}, "without an asset id"),
        ({"__type": "core/ASSET", "info": {"id": "00000000-0000-0000-0000-000000000000"}}, "which you do not have"),
        ([{"__type": "core/ASSET", "info": {"id": "x"}}], "inside it"),
    ],
)
def test_a_malformed_or_unknown_reference_is_refused(alice, value, reason):
    graph = referencing("x")
    graph["1"]["inputs"]["image"] = value
    with pytest.raises(MissingAsset) as refused:
        resolve_asset_refs(alice, graph)
    assert refused.value.code == "missing_asset"
    assert reason in refused.value.details["1.image"]


@pytest.mark.django_db
def test_another_users_asset_is_refused_and_nothing_is_made(alice, bob):
    mine = uploaded(alice, png(colour=(1, 1, 1)))
    graph = referencing(uploaded(bob).pk)
    graph["4"] = {"class_type": "LoadImage", "inputs": {"image": referencing(mine.pk)["1"]["inputs"]["image"]}}
    with pytest.raises(MissingAsset) as refused:
        resolve_asset_refs(alice, graph)
    assert "which you do not have" in refused.value.details["1.image"]
    assert not Upload.objects.exists()  # not even for the reference that was alice's own


@pytest.mark.django_db
def test_an_asset_that_is_not_an_image_is_refused(alice):
    task = finished_task(alice, [("out.png", png())])
    output = task.outputs.get()
    output.content_type = "application/octet-stream"  # a .flac, a .json: what the hub could not read as an image
    output.save()
    with pytest.raises(MissingAsset) as refused:
        resolve_asset_refs(alice, referencing(output_asset(output).pk))
    assert "only images can be job inputs" in refused.value.details["1.image"]


@pytest.mark.django_db(transaction=True)
def test_a_referenced_asset_reaches_the_jobs_server_and_the_job_runs(alice, server, simulator, hub):
    asset = uploaded(alice, png(size=(40, 20)))
    graph, images = resolve_asset_refs(alice, referencing(asset.pk))
    graph, graph_hash = private_output_names(graph)
    task = Task.objects.create(owner=alice, graph=graph, image_inputs=images, graph_hash=graph_hash)
    notify_work()

    def done():
        row = Task.objects.get(pk=task.pk)
        return row if row.is_terminal else None

    task = wait_for(done, timeout=20, message="the job to finish")
    assert task.status == TaskStatus.SUCCEEDED, task.error
    [output] = task.outputs.all()
    with output.file.open("rb") as handle, Image.open(handle) as image:
        assert image.size == (20, 10)


@pytest.mark.django_db
def test_a_job_posted_with_a_reference_carries_the_users_upload_and_another_users_is_refused(alice_v2, bob_v2):
    asset = uploaded(alice_v2.user)
    reply = alice_v2.submit(workflow=referencing(asset.pk))
    assert reply.status_code == 201, reply.content
    task = Task.objects.get(pk=reply.json()["id"])
    [image] = task.image_inputs
    upload_row = Upload.objects.get(pk=image["upload"])
    assert upload_row.owner == alice_v2.user and upload_row.sha256 == asset.sha256
    assert task.graph["1"]["inputs"]["image"] == upload_row.remote_name
    # Bob names alice's asset: the same answer as an asset that does not exist, and nothing is made.
    before = (Task.objects.count(), Upload.objects.count())
    reply = bob_v2.submit(workflow=referencing(asset.pk))
    assert reply.status_code == 422, reply.content
    assert reply.json()["error"]["code"] == "missing_asset"
    assert "workflow.1.image" in reply.json()["error"]["details"]
    assert (Task.objects.count(), Upload.objects.count()) == before
