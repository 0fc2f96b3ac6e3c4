"""
v2 assets as an integrator sees them: an upload is kept once per user and content, hashes are only ever found among
the user's own files, the bytes come back whole or by range with the hub's download headers, and another user's asset
is a 404 whichever way it is asked for.
"""

import io

import pytest
from blake3 import blake3
from django.core.files.storage import default_storage
from django.test import Client
from PIL import Image

from servers.models import Server
from tasks import outputs
from tasks.models import ApiToken, Asset, Task, TaskStatus
from tasks.v2.assets import output_asset

pytestmark = pytest.mark.django_db


def png(colour=(10, 200, 30), size=(16, 16)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


class V2:
    """The v2 API with a comfyhub token, the way an SDK speaks it."""

    def __init__(self, user):
        self.client = Client(HTTP_AUTHORIZATION=f"Bearer {ApiToken.issue(user)[1]}")

    def upload(self, data, name="photo.png", **fields):
        body = {"file": io.BytesIO(data), "content_type": "image/png", "file_path": name, **fields}
        body["file"].name = name
        return self.client.post("/api/v2/assets", body)

    def get(self, path, **headers):
        return self.client.get(path, headers=headers)

    def head(self, path):
        return self.client.head(path)

    def from_hash(self, digest, **body):
        return self.client.post("/api/v2/assets/from-hash", {"hash": digest, **body}, content_type="application/json")

    def delete(self, path):
        return self.client.delete(path)


@pytest.fixture
def as_alice(alice):
    return V2(alice)


@pytest.fixture
def as_bob(bob):
    return V2(bob)


def content(reply):
    return b"".join(reply.streaming_content) if reply.streaming else reply.content


def test_an_upload_is_an_asset_with_the_hash_of_its_bytes(as_alice, alice):
    data = png()
    reply = as_alice.upload(data, "inputs/photo.png")
    assert reply.status_code == 201, reply.content
    body = reply.json()
    assert body["hash"] == f"blake3:{blake3(data).hexdigest()}"
    assert body["size_bytes"] == len(data)
    assert body["content_type"] == "image/png"
    assert body["file_path"] == "inputs/photo.png"
    assert body["created_new"] is True
    assert body["job_id"] is None
    assert body["url"] == f"http://testserver/api/v2/assets/{body['id']}/content"
    assert Asset.objects.get(pk=body["id"]).owner == alice


def test_the_type_is_read_from_the_bytes_not_taken_from_the_client(as_alice):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    reply = as_alice.upload(buffer.getvalue(), "looks.png", content_type="image/png")
    assert reply.status_code == 201
    assert reply.json()["content_type"] == "image/jpeg"


def test_the_same_bytes_twice_are_the_same_asset(as_alice):
    data = png()
    first = as_alice.upload(data, "a.png").json()
    again = as_alice.upload(data, "b.png")
    assert again.status_code == 200
    assert again.json()["id"] == first["id"]
    assert again.json()["created_new"] is False
    assert Asset.objects.count() == 1


def test_another_user_uploading_the_same_bytes_gets_an_asset_of_their_own(as_alice, as_bob, bob):
    data = png()
    mine = as_alice.upload(data).json()
    theirs = as_bob.upload(data)
    assert theirs.status_code == 201
    assert theirs.json()["created_new"] is True
    assert theirs.json()["id"] != mine["id"]
    assert Asset.objects.get(pk=theirs.json()["id"]).owner == bob


def test_from_hash_finds_only_the_users_own_bytes(as_alice, as_bob):
    data = png()
    mine = as_alice.upload(data).json()
    reply = as_alice.from_hash(mine["hash"], file_path="again.png")
    assert reply.status_code == 200
    assert reply.json()["id"] == mine["id"]
    refused = as_bob.from_hash(mine["hash"])
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "blob_not_found"
    assert Asset.objects.count() == 1


def test_from_hash_refuses_a_hash_that_is_not_one(as_alice):
    reply = as_alice.from_hash("md5:abc")
    assert reply.status_code == 422
    assert "64 hex digits" in reply.json()["error"]["message"]


def test_by_hash_is_200_only_for_the_users_own(as_alice, as_bob):
    digest = as_alice.upload(png()).json()["hash"]
    assert as_alice.head(f"/api/v2/assets/by-hash/{digest}").status_code == 200
    assert as_alice.head(f"/api/v2/assets/by-hash/{digest.removeprefix('blake3:')}").status_code == 200
    assert as_bob.head(f"/api/v2/assets/by-hash/{digest}").status_code == 404
    assert as_alice.head(f"/api/v2/assets/by-hash/blake3:{'0' * 64}").status_code == 404


def test_the_content_comes_back_whole_with_the_download_headers(as_alice):
    data = png()
    asset = as_alice.upload(data).json()
    reply = as_alice.get(f"/api/v2/assets/{asset['id']}/content")
    assert reply.status_code == 200
    assert content(reply) == data
    assert reply["Content-Type"] == "image/png"
    assert reply["X-Content-Type-Options"] == "nosniff"
    assert reply["Content-Security-Policy"] == "sandbox"
    assert reply["Accept-Ranges"] == "bytes"


@pytest.mark.parametrize(
    ("asked", "start", "stop"),
    [("bytes=0-9", 0, 10), ("bytes=5-", 5, None), ("bytes=-7", -7, None), ("bytes=3-100000", 3, None)],
)
def test_a_range_answers_206_with_those_bytes(as_alice, asked, start, stop):
    data = png()
    asset = as_alice.upload(data).json()
    reply = as_alice.get(f"/api/v2/assets/{asset['id']}/content", Range=asked)
    assert reply.status_code == 206
    wanted = data[start:stop]
    assert content(reply) == wanted
    first = start if start >= 0 else len(data) + start
    assert reply["Content-Range"] == f"bytes {first}-{first + len(wanted) - 1}/{len(data)}"
    assert reply["Content-Length"] == str(len(wanted))
    assert reply["X-Content-Type-Options"] == "nosniff"
    assert reply["Content-Security-Policy"] == "sandbox"


def test_a_range_past_the_end_is_416(as_alice):
    data = png()
    asset = as_alice.upload(data).json()
    reply = as_alice.get(f"/api/v2/assets/{asset['id']}/content", Range=f"bytes={len(data)}-")
    assert reply.status_code == 416
    assert reply["Content-Range"] == f"bytes */{len(data)}"
    assert reply.json()["error"]["code"] == "range_not_satisfiable"


@pytest.mark.parametrize("asked", ["bytes=0-1,4-5", "items=0-3", "bytes=x-y"])
def test_a_range_the_hub_does_not_serve_gets_the_whole_file(as_alice, asked):
    data = png()
    asset = as_alice.upload(data).json()
    reply = as_alice.get(f"/api/v2/assets/{asset['id']}/content", Range=asked)
    assert reply.status_code == 200
    assert content(reply) == data


def test_a_stale_if_range_gets_the_whole_file(as_alice):
    data = png()
    asset = as_alice.upload(data).json()
    path = f"/api/v2/assets/{asset['id']}/content"
    assert as_alice.get(path, Range="bytes=0-3", If_Range='"other"').status_code == 200
    current = f'"{asset["hash"].removeprefix("blake3:")}"'
    assert as_alice.get(path, Range="bytes=0-3", If_Range=current).status_code == 206


def test_a_deleted_asset_is_gone_with_its_file(as_alice, django_capture_on_commit_callbacks):
    asset = as_alice.upload(png()).json()
    name = Asset.objects.get(pk=asset["id"]).file.name
    with django_capture_on_commit_callbacks(execute=True):
        assert as_alice.delete(f"/api/v2/assets/{asset['id']}").status_code == 204
    assert as_alice.get(f"/api/v2/assets/{asset['id']}").status_code == 404
    assert not default_storage.exists(name)
    assert as_alice.head(f"/api/v2/assets/by-hash/{asset['hash']}").status_code == 404


def test_another_users_asset_is_404_however_asked(as_alice, as_bob):
    asset = as_alice.upload(png()).json()
    for reply in (
        as_bob.get(f"/api/v2/assets/{asset['id']}"),
        as_bob.get(f"/api/v2/assets/{asset['id']}/content"),
        as_bob.get(f"/api/v2/assets/{asset['id']}/content", Range="bytes=0-3"),
        as_bob.delete(f"/api/v2/assets/{asset['id']}"),
    ):
        assert reply.status_code == 404
        assert reply.json()["error"]["code"] == "not_found"
    missing = as_bob.get("/api/v2/assets/00000000-0000-0000-0000-000000000000")
    assert missing.json() == as_bob.get(f"/api/v2/assets/{asset['id']}").json()
    assert Asset.objects.filter(pk=asset["id"]).exists()
    assert as_alice.get(f"/api/v2/assets/{asset['id']}").status_code == 200


def test_a_file_over_the_limit_is_413_and_nothing_is_kept(as_alice, settings):
    settings.COMFYHUB = {**settings.COMFYHUB, "MAX_UPLOAD_BYTES": 100}
    reply = as_alice.upload(png(size=(64, 64), colour=(1, 2, 3)) + b"\0" * 200)
    assert reply.status_code == 413
    assert "at most 100 bytes" in reply.json()["error"]["message"]
    assert not Asset.objects.exists()


@pytest.mark.parametrize(
    ("data", "name"),
    [(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "x.svg"), (b"hello", "notes.txt"), (None, "anim.gif")],
)
def test_a_file_that_is_not_a_png_jpeg_or_webp_is_refused(as_alice, data, name):
    if data is None:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, "GIF")
        data = buffer.getvalue()
    reply = as_alice.upload(data, name)
    assert reply.status_code == 415
    assert "PNG, JPEG or WebP" in reply.json()["error"]["message"]
    assert not Asset.objects.exists()


def test_a_wrong_expected_hash_is_409_and_nothing_is_kept(as_alice):
    reply = as_alice.upload(png(), expected_hash=f"blake3:{'ab' * 32}")
    assert reply.status_code == 409
    assert reply.json()["error"]["code"] == "hash_mismatch"
    assert not Asset.objects.exists()


def test_a_file_path_that_is_not_text_is_refused(as_alice):
    reply = as_alice.upload(png(), "bad\x00name.png")
    assert reply.status_code == 422
    assert not Asset.objects.exists()


def test_an_upload_without_a_file_is_422(as_alice):
    reply = as_alice.client.post("/api/v2/assets", {"file_path": "photo.png"})
    assert reply.status_code == 422
    assert reply.json()["error"]["code"] == "invalid_request"
    assert "file" in str(reply.json()["error"]["details"])


def test_the_asset_endpoints_are_described_in_openapi(as_alice):
    paths = as_alice.get("/api/v2/openapi.json").json()["paths"]
    assert {"/api/v2/assets", "/api/v2/assets/from-hash", "/api/v2/assets/by-hash/{hash}"} <= set(paths)
    assert "head" in paths["/api/v2/assets/by-hash/{hash}"]


def test_without_a_valid_token_it_is_401(as_alice):
    asset = as_alice.upload(png()).json()
    for client in (Client(), Client(HTTP_AUTHORIZATION="Bearer ch_nonsense")):
        reply = client.get(f"/api/v2/assets/{asset['id']}")
        assert reply.status_code == 401
        assert reply.json()["error"]["code"] == "unauthorized"


def finished_task(owner, files):
    server, _ = Server.objects.get_or_create(name="gpu-x", defaults={"base_url": "http://127.0.0.1:9"})
    task = Task.objects.create(
        owner=owner, graph={"1": {"class_type": "X"}}, status=TaskStatus.RUNNING, server=server,
        prompt_id=f"p-{Task.objects.count()}",
    )  # fmt: skip
    assert outputs.complete(task, [("9", name, "image/png", data) for name, data in files], "test")
    return Task.objects.get(pk=task.pk)


def test_a_job_output_is_an_asset_of_its_owner(as_alice, as_bob, alice):
    data = png(colour=(200, 0, 0))
    task = finished_task(alice, [("out.png", data)])
    asset = output_asset(task.outputs.get())
    assert output_asset(task.outputs.get()) == asset  # made once
    body = as_alice.get(f"/api/v2/assets/{asset.pk}").json()
    assert body["job_id"] == str(task.pk)
    assert body["hash"] == f"blake3:{blake3(data).hexdigest()}"
    assert content(as_alice.get(f"/api/v2/assets/{asset.pk}/content")) == data
    assert as_bob.get(f"/api/v2/assets/{asset.pk}").status_code == 404
    assert as_bob.head(f"/api/v2/assets/by-hash/{body['hash']}").status_code == 404
    assert as_bob.from_hash(body["hash"]).status_code == 404
    refused = as_alice.delete(f"/api/v2/assets/{asset.pk}")
    assert refused.status_code == 409
    assert default_storage.exists(asset.file.name)


def test_an_outputs_hash_mints_an_upload_of_the_same_bytes(as_alice, alice):
    data = png(colour=(0, 0, 200))
    task = finished_task(alice, [("out.png", data)])
    digest = output_asset(task.outputs.get()).hash
    reply = as_alice.from_hash(digest, file_path="again.png")
    assert reply.status_code == 201
    minted = reply.json()
    assert minted["job_id"] is None
    assert content(as_alice.get(f"/api/v2/assets/{minted['id']}/content")) == data
    assert as_alice.delete(f"/api/v2/assets/{minted['id']}").status_code == 204
    assert default_storage.exists(task.outputs.get().file.name)  # the job's output keeps its own file
