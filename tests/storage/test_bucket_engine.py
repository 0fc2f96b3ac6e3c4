"""
The engine with its outputs in a bucket: while the bucket does not answer, a finished task stays running (never
succeeded without its files, never failed for the store's fault); once the bucket is back, it succeeds with its files.
The consistency check verifies objects in the bucket and copies a lost one again from the server.
"""

import pytest
from botocore.config import Config
from django.core.management import call_command

from comfyhub.object_storage import storages_setting
from servers.models import Server
from tasks import outputs
from tasks import storage as store
from tasks.models import Task, TaskStatus, Upload
from tests.conftest import wait_for
from tests.storage.conftest import objects


def finished(task_id, timeout=30):
    return wait_for(
        lambda: (task := Task.objects.get(pk=task_id)).is_terminal and task, timeout=timeout, message="the task to end"
    )


def test_a_task_waits_for_the_bucket_then_succeeds_with_its_files(
    alice_api, workflows, server, simulator, hub, seaweed, settings, monkeypatch
):
    down = storages_setting({**seaweed.env, "COMFYHUB_S3_ENDPOINT_URL": "http://127.0.0.1:9"})
    down["default"]["OPTIONS"]["client_config"] = Config(retries={"max_attempts": 1}, connect_timeout=1)
    settings.STORAGES = down
    monkeypatch.setattr(store, "SAVE_BACKOFF", 0.01)
    tries = []

    def counted(name, spool):
        tries.append(name)
        return store.save_verified(name, spool)

    monkeypatch.setattr(outputs, "save_verified", counted)
    task_id = alice_api.submit("invert", {"color": 4321}).json()["id"]
    prompt = wait_for(lambda: Task.objects.get(pk=task_id).prompt_id, message="the task to be sent")
    wait_for(lambda: simulator.sim.executed_prompt_ids.count(prompt) == 1, message="the server to run it")
    # More failed attempts to store its outputs than a step may fail before its task fails (STEP_FAILURES, 3).
    wait_for(lambda: len(tries) > 4, timeout=30, message="several attempts to store the outputs")
    task = Task.objects.get(pk=task_id)
    assert task.status == TaskStatus.RUNNING and not task.outputs.exists()
    assert not task.events.filter(kind="failed").exists()

    settings.STORAGES = storages_setting(seaweed.env)
    task = finished(task_id)
    assert task.status == TaskStatus.SUCCEEDED, task.error
    output = task.outputs.get()
    assert objects(seaweed, f"outputs/{task_id}/") and output.size > 0
    body = b"".join(alice_api.get(f"/api/v1/outputs/{output.pk}").streaming_content)
    assert len(body) == output.size
    assert simulator.sim.executed_prompt_ids.count(prompt) == 1  # stored from the first run, not run again


@pytest.fixture
def quiet_check(capsys):
    def run(*args):
        try:
            call_command("check_consistency", *args)
            code = 0
        except SystemExit as exc:
            code = exc.code
        return code, capsys.readouterr().out

    return run


def test_the_consistency_check_verifies_objects_and_repairs_from_the_server(
    alice_api, alice, workflows, server, simulator, hub, bucket, quiet_check
):
    task = finished(alice_api.submit("invert", {"color": 99}).json()["id"])
    hub.stop()  # the check talks to the server itself
    output = task.outputs.get()
    client, key = bucket.client(), output.file.name
    original = client.get_object(Bucket=bucket.bucket, Key=key)["Body"].read()
    assert quiet_check()[0] == 0

    client.delete_object(Bucket=bucket.bucket, Key=key)
    code, out = quiet_check()
    assert code == 1 and "[output_missing]" in out
    code, out = quiet_check("--fix")
    assert "copied again from gpu-a" in out
    assert client.get_object(Bucket=bucket.bucket, Key=key)["Body"].read() == original

    client.put_object(Bucket=bucket.bucket, Key=key, Body=original[:-1] + bytes([original[-1] ^ 0xFF]))
    code, out = quiet_check()
    assert code == 1 and "[output_corrupt]" in out
    quiet_check("--fix")
    assert client.get_object(Bucket=bucket.bucket, Key=key)["Body"].read() == original

    upload = Upload.objects.create(
        owner=alice, original_name="in.png", content_type="image/png", size=10, sha256="0" * 64, width=1, height=1,
        file="uploads/gone.png",
    )
    code, out = quiet_check("--fix")
    assert code == 1 and "[file_missing]" in out and str(upload.pk) in out and "upload it again" in out
    assert Server.objects.count() == 1
