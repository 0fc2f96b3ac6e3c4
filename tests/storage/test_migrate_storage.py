"""
`manage.py migrate_storage --to s3`, against a real S3 server (SeaweedFS): the files on disk land in the bucket under
the same names with their recorded sha256, a second run skips what is there, a damaged local file is reported and
not copied, and the hub switched to the bucket serves what was copied. And retention on a hub that uses the bucket
removes the objects themselves.
"""

import hashlib
import io
import uuid
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from comfyhub.object_storage import storages_setting
from tasks import outputs
from tasks.models import Asset, Task, TaskOutput, Upload
from tasks.v2.assets import output_asset
from tests.tasks.test_api import upload
from tests.tasks.test_retention import prune
from tests.tasks.test_views import finished_task
from tests.v2.test_assets import V2, png

pytestmark = pytest.mark.django_db


@pytest.fixture
def s3(seaweed):
    """The session's SeaweedFS server (tests/conftest.py)."""
    return seaweed


@pytest.fixture
def folder(s3, monkeypatch):
    """The hub's COMFYHUB_S3_* variables, with a folder of the bucket of this test's own."""
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    for name, value in {**s3.env, "COMFYHUB_S3_PREFIX": prefix}.items():
        monkeypatch.setenv(name, value)
    return prefix


def migrate(*args):
    """Run the command; returns (exit code, output)."""
    out = io.StringIO()
    try:
        call_command("migrate_storage", "--to", "s3", *args, stdout=out, stderr=out)
    except SystemExit as exc:
        return exc.code, out.getvalue()
    except CommandError as exc:
        return exc.returncode, out.getvalue() + str(exc)
    return 0, out.getvalue()


def in_bucket(s3, prefix):
    """{name: sha256} of every object under the test's folder."""
    client, found = s3.client(), {}
    for item in client.list_objects_v2(Bucket=s3.bucket, Prefix=f"{prefix}/").get("Contents", []):
        body = client.get_object(Bucket=s3.bucket, Key=item["Key"])["Body"].read()
        found[item["Key"].removeprefix(f"{prefix}/")] = hashlib.sha256(body).hexdigest()
    return found


@pytest.fixture
def files(alice, alice_api, workflows):
    """alice's output (with its thumbnail and its v2 asset), an upload and an asset she sent."""
    task = finished_task(alice, workflows["fast"])
    output = task.outputs.get()
    outputs.thumbnail(output)
    output_asset(output)
    assert upload(alice_api).status_code == 201
    assert V2(alice).upload(png()).status_code == 201
    return {"output": output, "upload": Upload.objects.get(), "asset": Asset.objects.uploaded().get()}


def test_it_copies_every_file_with_its_sha256_and_no_thumbnail(s3, folder, files, alice, settings):
    code, out = migrate()
    assert code == 0, out
    expected = {row.file.name: row.sha256 for row in files.values()}
    assert in_bucket(s3, folder) == expected  # the same names, the recorded bytes; no thumbs/
    assert out.strip().splitlines()[-1].startswith("Copied 3 files (")
    assert out.strip().endswith("skipped 0 already in the bucket, 0 failed.")
    assert TaskOutput.objects.get().file.name == files["output"].file.name  # rows need no change
    # Switched to the bucket, the hub serves the copies.
    settings.STORAGES = storages_setting({**s3.env, "COMFYHUB_S3_PREFIX": folder})
    client = Client()
    client.force_login(alice)
    reply = client.get(f"/outputs/{files['output'].pk}/")
    assert reply.status_code == 200
    assert hashlib.sha256(b"".join(reply.streaming_content)).hexdigest() == files["output"].sha256
    assert client.get(f"/outputs/{files['output'].pk}/thumb").status_code == 200  # made again, in the bucket


def test_a_dry_run_writes_nothing(s3, folder, files):
    code, out = migrate("--dry-run")
    assert code == 0, out
    assert out.count("would copy") == 3
    assert out.strip().endswith("Nothing was written (dry run).")
    assert in_bucket(s3, folder) == {}


def test_a_second_run_skips_what_is_there_and_resumes_the_rest(s3, folder, files):
    assert migrate()[0] == 0
    s3.client().delete_object(Bucket=s3.bucket, Key=f"{folder}/{files['upload'].file.name}")
    code, out = migrate()
    assert code == 0, out
    assert out.count("already in the bucket, skipped") == 2
    assert f"{files['upload'].file.name}: copied" in out
    assert out.strip().splitlines()[-1].startswith("Copied 1 file (")
    assert "skipped 2 already in the bucket, 0 failed." in out
    assert len(in_bucket(s3, folder)) == 3


def test_a_damaged_or_missing_local_file_is_reported_not_copied(s3, folder, files, media_root):
    (media_root / files["upload"].file.name).write_bytes(b"not the bytes that were recorded")
    (media_root / files["asset"].file.name).unlink()
    code, out = migrate()
    assert code == 1, out
    assert f"{files['upload'].file.name}: FAILED, the local file does not match its row" in out
    assert f"{files['asset'].file.name}: FAILED, missing from {media_root}" in out
    assert in_bucket(s3, folder) == {files["output"].file.name: files["output"].sha256}
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("Copied 1 file (") and summary.endswith("skipped 0 already in the bucket, 2 failed.")


def test_another_object_under_the_name_gets_the_copy_a_new_name_and_the_row_follows(s3, folder, files):
    output = files["output"]
    taken = output.file.name
    s3.client().put_object(Bucket=s3.bucket, Key=f"{folder}/{taken}", Body=b"something else")
    code, out = migrate()
    assert code == 0, out
    output.refresh_from_db()
    assert output.file.name != taken and f"copied {output.size} bytes as {output.file.name}, row updated" in out
    assert in_bucket(s3, folder)[output.file.name] == output.sha256
    assert Asset.objects.get(output=output).file.name == output.file.name  # the output's asset names it too
    assert "1 stored under a new name" in out
    # The rerun finds it where the row says.
    code, out = migrate()
    assert code == 0 and out.count("already in the bucket, skipped") == 3


def test_without_a_bucket_it_refuses_with_a_sentence(monkeypatch, files):
    for name in ("COMFYHUB_S3_BUCKET", "COMFYHUB_S3_ENDPOINT_URL", "COMFYHUB_S3_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    code, out = migrate()
    assert code == 2
    assert "COMFYHUB_S3_BUCKET is not set" in out


def test_a_bucket_that_does_not_answer_is_refused_before_anything(monkeypatch, files):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("COMFYHUB_S3_BUCKET", "comfyhub")
    monkeypatch.setenv("COMFYHUB_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    code, out = migrate()
    assert code == 2
    assert "The bucket 'comfyhub' does not answer" in out


def test_prune_outputs_removes_the_files_from_the_bucket_the_hub_uses(
    s3, folder, alice, alice_api, workflows, settings
):
    settings.STORAGES = storages_setting({**s3.env, "COMFYHUB_S3_PREFIX": folder})
    task = finished_task(alice, workflows["fast"])
    outputs.thumbnail(task.outputs.get())
    assert upload(alice_api).status_code == 201
    assert len(in_bucket(s3, folder)) == 3  # the output, its thumbnail, the upload
    long_ago = timezone.now() - timedelta(days=40)
    Task.objects.filter(pk=task.pk).update(finished_at=long_ago)
    Upload.objects.update(created_at=long_ago)
    code, out = prune("--older-than", "30d")
    assert code == 0, out
    assert in_bucket(s3, folder) == {}
    assert not TaskOutput.objects.exists() and not Upload.objects.exists()
