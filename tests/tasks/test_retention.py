"""
`manage.py prune_outputs`: what is older than the age goes from storage and from the database (outputs of finished
tasks with their thumbnails and assets, uploads no active task uses, sent v2 assets), a dry run changes nothing, and
the pages of a pruned task say where its results went.
"""

import io
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.core.files.storage import default_storage
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from servers.models import Server
from tasks import outputs
from tasks.models import Asset, Task, TaskEvent, TaskOutput, TaskStatus, Upload
from tasks.v2.assets import output_asset
from tests.tasks.test_api import png_bytes, upload
from tests.tasks.test_views import finished_task
from tests.v2.conftest import V2Client
from tests.v2.test_assets import V2, png

pytestmark = pytest.mark.django_db


def prune(*args):
    """Run the command; returns (exit code, output)."""
    out = io.StringIO()
    try:
        call_command("prune_outputs", *args, stdout=out, stderr=out)
    except SystemExit as exc:
        return exc.code, out.getvalue()
    except CommandError as exc:
        return exc.returncode, out.getvalue() + str(exc)
    return 0, out.getvalue()


def ago(**age):
    return timezone.now() - timedelta(**age)


def old_task(owner, workflow, **age):
    """A succeeded task with one PNG output, its thumbnail and its v2 asset, finished `age` ago."""
    task = finished_task(owner, workflow, png_bytes(size=(40, 30)))
    Task.objects.filter(pk=task.pk).update(finished_at=ago(**age))
    output = task.outputs.get()
    assert outputs.thumbnail(output) == f"thumbs/{task.pk}/{output.pk}.jpg"
    output_asset(output)
    return Task.objects.get(pk=task.pk)


def old_upload(api, colour, **age):
    reply = upload(api, png_bytes(color=colour))
    assert reply.status_code == 201
    Upload.objects.filter(pk=reply.json()["id"]).update(created_at=ago(**age))
    return Upload.objects.get(pk=reply.json()["id"])


def old_asset(user, colour, **age):
    reply = V2(user).upload(png(colour=colour))
    assert reply.status_code == 201
    Asset.objects.filter(pk=reply.json()["id"]).update(created_at=ago(**age))
    return Asset.objects.get(pk=reply.json()["id"])


def stored(name):
    return default_storage.exists(name)


@pytest.fixture
def history(alice, alice_api, workflows):
    """alice's files: a task, an upload and an asset 40 days old, and the same 10 days old."""
    fast = workflows["fast"]
    return {
        "old_task": old_task(alice, fast, days=40),
        "new_task": old_task(alice, fast, days=10),
        "old_upload": old_upload(alice_api, (1, 1, 1), days=40),
        "new_upload": old_upload(alice_api, (2, 2, 2), days=10),
        "old_asset": old_asset(alice, (3, 3, 3), days=40),
        "new_asset": old_asset(alice, (4, 4, 4), days=10),
    }


def test_a_dry_run_says_what_would_go_and_changes_nothing(history):
    old = history["old_task"].outputs.get()
    names = [old.file.name, f"thumbs/{old.task_id}/{old.pk}.jpg", history["old_upload"].file.name]
    counts = (TaskOutput.objects.count(), Upload.objects.count(), Asset.objects.count(), TaskEvent.objects.count())
    code, out = prune("--older-than", "30d", "--dry-run")
    assert code == 0, out
    assert f"task {old.task_id} (alice, fast, succeeded" in out and "would remove 1 output" in out
    assert f"upload {history['old_upload'].pk}" in out and f"asset {history['old_asset'].pk}" in out
    assert str(history["new_task"].pk) not in out and str(history["new_upload"].pk) not in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("Would remove 1 output of 1 task (") and "1 upload (" in last and "1 asset (" in last
    assert last.endswith("older than 30d. Nothing was changed (dry run).")
    assert (TaskOutput.objects.count(), Upload.objects.count(), Asset.objects.count(), TaskEvent.objects.count()) == (
        counts
    )
    assert all(stored(name) for name in names)


def test_it_removes_old_files_and_rows_and_records_it_on_the_task(history, alice):
    old_task, new_task = history["old_task"], history["new_task"]
    output = old_task.outputs.get()
    gone = [output.file.name, f"thumbs/{old_task.pk}/{output.pk}.jpg", history["old_upload"].file.name,
            history["old_asset"].file.name]  # fmt: skip
    code, out = prune("--older-than", "30d")
    assert code == 0, out
    assert f"task {old_task.pk} (alice, fast, succeeded" in out and f"removed 1 output ({output.size} bytes)" in out
    assert not any(stored(name) for name in gone)
    assert not TaskOutput.objects.filter(task=old_task).exists()
    assert not Asset.objects.filter(output_id=output.pk).exists()  # the output's asset went with it
    assert not Upload.objects.filter(pk=history["old_upload"].pk).exists()
    assert not Asset.objects.filter(pk=history["old_asset"].pk).exists()
    event = TaskEvent.objects.get(task=old_task, kind="outputs_removed")
    assert event.message.startswith("outputs removed by retention") and event.detail["outputs"] == 1
    # The task itself stays, as it was, and what is younger than the age is untouched.
    old_task.refresh_from_db()
    assert old_task.status == TaskStatus.SUCCEEDED
    assert new_task.outputs.count() == 1 and stored(new_task.outputs.get().file.name)
    assert Upload.objects.filter(pk=history["new_upload"].pk).exists()
    assert Asset.objects.filter(pk=history["new_asset"].pk).exists()
    summary = out.strip().splitlines()[-1]
    assert summary.startswith(f"Removed 1 output of 1 task ({output.size} bytes), 1 upload (")
    # Nothing is left to find the second time.
    code, out = prune("--older-than", "30d")
    assert code == 0
    assert out.strip() == (
        "Removed 0 outputs of 0 tasks (0 bytes), 0 uploads (0 bytes) and 0 assets (0 bytes), older than 30d."
    )


def test_only_finished_tasks_lose_their_outputs(alice, workflows):
    task = old_task(alice, workflows["fast"], days=40)
    Task.objects.filter(pk=task.pk).update(status=TaskStatus.RUNNING)  # an operator's retry that runs again
    code, out = prune("--older-than", "30d")
    assert code == 0 and TaskOutput.objects.filter(task=task).exists()
    for status in (TaskStatus.FAILED, TaskStatus.CANCELLED):
        task = old_task(alice, workflows["fast"], days=40)
        Task.objects.filter(pk=task.pk).update(status=status)
        prune("--older-than", "30d")
        assert not TaskOutput.objects.filter(task=task).exists()


def test_the_age_takes_days_hours_and_minutes(alice, workflows):
    fast = workflows["fast"]
    two_hours = old_task(alice, fast, hours=2)
    half_hour = old_task(alice, fast, minutes=30)
    prune("--older-than", "3h")
    assert two_hours.outputs.exists() and half_hour.outputs.exists()
    prune("--older-than", "90m")
    assert not two_hours.outputs.exists() and half_hour.outputs.exists()
    code, out = prune("--older-than", "1d")
    assert code == 0 and half_hour.outputs.exists()


def test_user_limits_it_to_one_users_files(alice, bob, alice_api, bob_api, workflows):
    fast = workflows["fast"]
    hers, his = old_task(alice, fast, days=40), old_task(bob, fast, days=40)
    her_upload, his_upload = old_upload(alice_api, (1, 0, 0), days=40), old_upload(bob_api, (0, 1, 0), days=40)
    her_asset, his_asset = old_asset(alice, (0, 0, 1), days=40), old_asset(bob, (1, 1, 0), days=40)
    code, out = prune("--older-than", "30d", "--user", "bob")
    assert code == 0, out
    assert "alice" not in out
    assert not his.outputs.exists() and not Upload.objects.filter(pk=his_upload.pk).exists()
    assert not Asset.objects.filter(pk=his_asset.pk).exists()
    assert hers.outputs.exists() and Upload.objects.filter(pk=her_upload.pk).exists()
    assert Asset.objects.filter(pk=her_asset.pk).exists() and stored(hers.outputs.get().file.name)


def test_an_upload_an_active_task_uses_is_kept(alice, alice_api, workflows):
    used, unused = old_upload(alice_api, (5, 5, 5), days=40), old_upload(alice_api, (6, 6, 6), days=40)
    reply = alice_api.submit("upload-scale", {"image": str(used.pk)})
    assert reply.status_code == 201, reply.content
    code, out = prune("--older-than", "30d")
    assert code == 0, out
    assert f"upload {used.pk}" in out and "kept, an active task uses it" in out
    assert Upload.objects.filter(pk=used.pk).exists() and stored(used.file.name)
    assert not Upload.objects.filter(pk=unused.pk).exists() and not stored(unused.file.name)
    assert "kept 1 upload an active task uses" in out.strip().splitlines()[-1]
    # Once that task has ended, the upload goes too.
    Task.objects.filter(pk=reply.json()["id"]).update(status=TaskStatus.CANCELLED, finished_at=timezone.now())
    prune("--older-than", "30d")
    assert not Upload.objects.filter(pk=used.pk).exists()


@pytest.mark.parametrize(
    ("age", "words"),
    [
        ("30", "is not a duration"),
        ("30x", "is not a duration"),
        ("-1d", "is not a duration"),
        ("1.5d", "is not a duration"),
        ("", "is not a duration"),
        ("0d", "must be more than zero"),
        ("999999999d", "longer than 36500 days"),
    ],
)
def test_a_bad_age_exits_2_with_a_sentence_and_changes_nothing(history, age, words):
    code, out = prune(f"--older-than={age}")
    assert code == 2
    assert words in out
    assert TaskOutput.objects.count() == 2 and Upload.objects.count() == 2


def test_an_unknown_user_exits_2(history):
    code, out = prune("--older-than", "30d", "--user", "nobody")
    assert code == 2 and "There is no user named 'nobody'." in out
    assert TaskOutput.objects.count() == 2


def test_a_file_already_gone_is_removed_quietly(alice, workflows):
    task = old_task(alice, workflows["fast"], days=40)
    default_storage.delete(task.outputs.get().file.name)
    code, out = prune("--older-than", "30d")
    assert code == 0, out
    assert not task.outputs.exists()


def test_a_file_the_store_will_not_delete_keeps_its_row_and_exits_1(alice, workflows, media_root):
    stuck, fine = old_task(alice, workflows["fast"], days=40), old_task(alice, workflows["fast"], days=41)
    name = stuck.outputs.get().file.name
    # A non-empty folder where the file was: the disk refuses to remove it, as a store that fails would.
    path = media_root / name
    path.unlink()
    (path / "inside").mkdir(parents=True)
    code, out = prune("--older-than", "30d")
    assert code == 1, out
    assert f"could not delete {name}" in out and "its row is kept" in out
    assert stuck.outputs.exists() and not TaskEvent.objects.filter(task=stuck, kind="outputs_removed").exists()
    assert not fine.outputs.exists()
    assert out.strip().splitlines()[-1].endswith("; 1 file could not be deleted.")
    # Once the store lets go, the next run finishes the job.
    (path / "inside").rmdir()
    code, out = prune("--older-than", "30d")
    assert code == 0 and not stuck.outputs.exists()


def test_a_pruned_tasks_pages_say_its_results_were_removed(alice, bob, alice_api, workflows):
    image = old_upload(alice_api, (7, 7, 7), days=40)
    reply = alice_api.submit("upload-scale", {"image": str(image.pk)})
    task = Task.objects.get(pk=reply.json()["id"])
    server = Server.objects.create(name="gpu-r", base_url="http://127.0.0.1:9")
    Task.objects.filter(pk=task.pk).update(status=TaskStatus.RUNNING, server=server, prompt_id="p-r")
    task.refresh_from_db()
    assert outputs.complete(task, [("9", "ComfyUI_00001_.png", "image/png", png_bytes())], "test")
    Task.objects.filter(pk=task.pk).update(finished_at=ago(days=40))
    code, out = prune("--older-than", "30d")
    assert code == 0, out
    client = Client()
    client.force_login(alice)
    page = client.get(f"/tasks/{task.pk}/")
    assert page.status_code == 200
    text = page.content.decode()
    assert "Its results were removed from storage on" in text and "This task left no results" not in text
    assert "Its results were removed from storage (retention)" in text  # on the timeline
    assert "an uploaded image, since removed" in text
    assert client.get("/gallery/").status_code == 200 and str(task.pk) not in client.get("/gallery/").content.decode()
    assert client.get("/tasks/").status_code == 200
    assert alice_api.task(task.pk)["outputs"] == []
    alice.user_permissions.add(Permission.objects.get(codename="submit_raw_graph"))
    job = V2Client(alice).get(f"/api/v2/jobs/{task.pk}")
    assert job.status_code == 200 and job.json()["outputs"] == []
    # Bob still gets nothing of hers.
    bob_client = Client()
    bob_client.force_login(bob)
    assert bob_client.get(f"/tasks/{task.pk}/").status_code == 404
