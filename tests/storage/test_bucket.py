"""
Outputs and uploads in an S3 bucket (a real SeaweedFS server): stored there and nowhere on disk, downloaded after
the ownership check whole, by range or through a presigned URL that expires, and never recorded without their file.
"""

import hashlib
import io
import time

import httpx
import pytest
from django.test import Client
from PIL import Image
from storages.backends.s3 import S3Storage

from comfyhub.object_storage import storages_setting
from servers.models import Server
from tasks import outputs
from tasks import storage as store
from tasks.models import Asset, Task, TaskStatus, Upload
from tasks.storage import StorageUnavailable
from tests.storage.conftest import objects
from tests.tasks.test_api import upload

pytestmark = pytest.mark.django_db


def png(size=(64, 48), colour=(200, 30, 10)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def running_task(owner, workflow):
    server, _ = Server.objects.get_or_create(name="gpu-s3", defaults={"base_url": "http://127.0.0.1:9"})
    return Task.objects.create(
        owner=owner, workflow=workflow, graph=workflow.graph, inputs={"seed": 7}, status=TaskStatus.RUNNING,
        server=server, prompt_id=f"p-{Task.objects.count()}",
    )


def browser(user):
    client = Client()
    client.force_login(user)
    return client


def test_outputs_go_to_the_bucket_and_nowhere_on_disk(bucket, alice, workflows, media_root):
    data = png()
    task = running_task(alice, workflows["txt2img"])
    assert outputs.complete(task, [("9", "ComfyUI_00001_.png", "image/png", data)], "test")
    output = Task.objects.get(pk=task.pk).outputs.get()
    stored = objects(bucket, f"outputs/{task.pk}/")
    assert list(stored.values()) == [data]
    assert output.sha256 == hashlib.sha256(data).hexdigest() and output.size == len(data)
    assert (output.width, output.height) == (64, 48)
    assert not media_root.exists() or not any(media_root.rglob("*"))


def test_a_download_streams_from_the_bucket_whole_and_by_range_for_its_owner_only(bucket, alice, bob, workflows):
    data = png((300, 200))
    task = running_task(alice, workflows["txt2img"])
    outputs.complete(task, [("9", "ComfyUI_00001_.png", "image/png", data)], "test")
    output = Task.objects.get(pk=task.pk).outputs.get()
    page = browser(alice)

    whole = page.get(f"/outputs/{output.pk}/")
    assert whole.status_code == 200 and b"".join(whole.streaming_content) == data
    assert whole["Content-Type"] == "image/png" and whole["Content-Length"] == str(len(data))
    assert whole["X-Content-Type-Options"] == "nosniff" and whole["Content-Security-Policy"] == "sandbox"

    part = page.get(f"/outputs/{output.pk}/", HTTP_RANGE="bytes=10-29")
    assert part.status_code == 206 and b"".join(part.streaming_content) == data[10:30]
    assert part["Content-Range"] == f"bytes 10-29/{len(data)}"
    tail = page.get(f"/outputs/{output.pk}/", HTTP_RANGE="bytes=-5")
    assert b"".join(tail.streaming_content) == data[-5:]
    past = page.get(f"/outputs/{output.pk}/", HTTP_RANGE=f"bytes={len(data)}-")
    assert past.status_code == 416 and past["Content-Range"] == f"bytes */{len(data)}"

    thumb = page.get(f"/outputs/{output.pk}/thumb")
    assert thumb.status_code == 200 and thumb["Content-Type"] == "image/jpeg"
    assert objects(bucket, f"thumbs/{task.pk}/")  # made once, kept in the bucket

    other = browser(bob)
    assert other.get(f"/outputs/{output.pk}/").status_code == 404
    assert other.get(f"/outputs/{output.pk}/", HTTP_RANGE="bytes=0-9").status_code == 404
    assert other.get(f"/outputs/{output.pk}/thumb").status_code == 404


def test_a_file_that_is_not_an_image_is_an_attachment_from_the_bucket_too(bucket, alice, workflows):
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    task = running_task(alice, workflows["txt2img"])
    outputs.complete(task, [("9", "ComfyUI_00001_.png", "image/png", svg)], "test")
    output = Task.objects.get(pk=task.pk).outputs.get()
    reply = browser(alice).get(f"/outputs/{output.pk}/")
    assert reply["Content-Type"] == "application/octet-stream"
    assert reply["Content-Disposition"].startswith("attachment;")
    assert b"".join(reply.streaming_content) == svg


def test_presigned_downloads_redirect_the_owner_only_and_expire(bucket, settings, alice, bob, workflows):
    settings.COMFYHUB = {**settings.COMFYHUB, "PRESIGNED_SECONDS": 2}
    data = png()
    task = running_task(alice, workflows["txt2img"])
    outputs.complete(task, [("9", "ComfyUI_00001_.png", "image/png", data)], "test")
    output = Task.objects.get(pk=task.pk).outputs.get()

    assert browser(bob).get(f"/outputs/{output.pk}/").status_code == 404
    reply = browser(alice).get(f"/outputs/{output.pk}/?download=1")
    assert reply.status_code == 302 and reply["Cache-Control"] == "private, no-store"
    url = reply["Location"]
    assert url.startswith(bucket.endpoint) and "X-Amz-Expires=2" in url
    fetched = httpx.get(url)
    assert fetched.status_code == 200 and fetched.content == data
    assert fetched.headers["content-type"] == "image/png"
    assert fetched.headers["content-disposition"].startswith("attachment;")
    assert "txt2img-7-1.png" in fetched.headers["content-disposition"]
    ranged = httpx.get(url, headers={"Range": "bytes=0-7"})
    assert ranged.status_code == 206 and ranged.content == data[:8]
    time.sleep(3.5)
    assert httpx.get(url).status_code == 403  # expired


def test_a_bucket_that_does_not_answer_records_nothing(settings, alice, workflows, seaweed):
    unreachable = {**seaweed.env, "COMFYHUB_S3_ENDPOINT_URL": "http://127.0.0.1:9"}
    settings.STORAGES = storages_setting(unreachable)
    task = running_task(alice, workflows["txt2img"])
    with pytest.raises(StorageUnavailable):
        outputs.complete(task, [("9", "ComfyUI_00001_.png", "image/png", png())], "test")
    task.refresh_from_db()
    assert task.status == TaskStatus.RUNNING and not task.outputs.exists()


def test_a_failed_write_is_tried_again(bucket, alice, workflows, monkeypatch):
    calls = []
    real_save = S3Storage.save

    def flaky_save(self, name, content, max_length=None):
        calls.append(name)
        if len(calls) == 1:
            raise ConnectionError("the bucket dropped the connection")
        return real_save(self, name, content, max_length=max_length)

    monkeypatch.setattr(S3Storage, "save", flaky_save)
    monkeypatch.setattr(store, "SAVE_BACKOFF", 0.01)
    data = png()
    task = running_task(alice, workflows["txt2img"])
    assert outputs.complete(task, [("9", "ComfyUI_00001_.png", "image/png", data)], "test")
    assert len(calls) == 2
    assert list(objects(bucket, f"outputs/{task.pk}/").values()) == [data]
    assert Task.objects.get(pk=task.pk).status == TaskStatus.SUCCEEDED


def test_uploads_go_to_the_bucket_and_a_bucket_that_does_not_answer_is_a_503_that_changes_nothing(
    bucket, settings, alice, alice_api, monkeypatch
):
    monkeypatch.setattr(store, "SAVE_BACKOFF", 0.01)
    data = png((20, 20))
    reply = upload(alice_api, data)
    assert reply.status_code == 201
    row = Upload.objects.get(pk=reply.json()["id"])
    assert objects(bucket, f"uploads/{alice.pk}/") == {row.file.name: data}

    settings.STORAGES = storages_setting({**bucket.env, "COMFYHUB_S3_ENDPOINT_URL": "http://127.0.0.1:9"})
    refused = upload(alice_api, png((21, 21)))
    assert refused.status_code == 503 and refused["Retry-After"] == "5"
    assert refused.json()["error"]["code"] == "storage_unavailable"
    v2 = alice_api.client.post("/api/v2/assets", {"file": io.BytesIO(png((22, 22)))})
    assert v2.status_code == 503 and v2.json()["error"]["code"] == "service_unavailable"
    assert Upload.objects.count() == 1 and not Asset.objects.exists()
