"""Operator tooling: the consistency check, stuck-task recovery, and the admin actions that run them."""

import io
import uuid
from datetime import timedelta

import httpx
import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.management import CommandError, call_command, load_command_class
from django.test import Client
from django.utils import timezone

from servers.models import Lock, LockPurpose, Server
from tasks.models import Task, TaskEvent, TaskStatus
from tests.conftest import Hub, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

GRAPH = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 4}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "ops"}},
}
SLOW = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 512, "height": 512, "batch_size": 1, "color": 9}},
    "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 31, "sigma": 1.0}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "slow"}},
}
LONG_AGO = timezone.now() - timedelta(hours=1)


def command(name, *args):
    """Run a management command; returns (exit code, output)."""
    out = io.StringIO()
    try:
        call_command(name, *args, stdout=out, stderr=out)
    except SystemExit as exc:
        return exc.code, out.getvalue()
    except CommandError as exc:
        return exc.returncode, out.getvalue() + str(exc)
    return 0, out.getvalue()


def post_prompt(simulator, server, prompt_id, graph=GRAPH):
    reply = httpx.post(
        f"{simulator.url}/prompt", json={"prompt": graph, "prompt_id": prompt_id, "client_id": server.client_id}
    )
    reply.raise_for_status()


def in_history(simulator, prompt_id):
    return wait_for(
        lambda: httpx.get(f"{simulator.url}/history/{prompt_id}").json().get(prompt_id), message="history entry"
    )


def bound_task(owner, server, status=TaskStatus.SUBMITTED, prompt_id=None, **fields):
    return Task.objects.create(
        owner=owner, graph=GRAPH, status=status, server=server, prompt_id=prompt_id or str(uuid.uuid4()),
        client_id=server.client_id, submitted_at=LONG_AGO, accepted_at=LONG_AGO, last_event_at=LONG_AGO,
        attempts=1, **fields,
    )


def test_a_consistent_hub_says_what_it_checked_and_exits_0(alice, server, simulator):
    assert command("check_consistency") == (
        0, "Checked 1 server, 0 tasks, 0 outputs, 0 uploaded files: nothing to repair.\n"
    )
    prompt_id = str(uuid.uuid4())
    post_prompt(simulator, server, prompt_id)
    in_history(simulator, prompt_id)
    bound_task(alice, server, status=TaskStatus.RUNNING, prompt_id=prompt_id, started_at=LONG_AGO)
    assert command("check_consistency", "--fix")[0] == 1  # completes it from the history, with its output
    stuck_running(alice, server, simulator)  # running on the server as the hub believes
    assert command("check_consistency") == (
        0, "Checked 1 server, 1 task, 1 output, 0 uploaded files: nothing to repair.\n"
    )


def test_an_unknown_server_name_is_a_clear_error(db):
    code, out = command("check_consistency", "--server", "nope")
    assert code == 2 and "There is no server named 'nope'." in out


def test_a_task_the_server_does_not_know_is_reported_then_requeued(alice, server):
    task = bound_task(alice, server)
    code, out = command("check_consistency")
    assert code == 1
    assert f"[unknown_to_server] server=gpu-a task={task.pk}" in out
    assert (
        "Checked 1 server, 1 task, 0 outputs, 0 uploaded files: found 1: 1 hub task the server does not know. "
        "Nothing changed." in out
    )
    assert Task.objects.get(pk=task.pk).status == TaskStatus.SUBMITTED
    code, out = command("check_consistency", "--fix")
    assert code == 1 and "requeued" in out and "Repaired 1." in out
    assert Task.objects.get(pk=task.pk).status == TaskStatus.QUEUED
    assert command("check_consistency")[0] == 0


def test_a_task_finished_on_the_server_is_completed_with_its_outputs(alice, server, simulator):
    prompt_id = str(uuid.uuid4())
    post_prompt(simulator, server, prompt_id)
    in_history(simulator, prompt_id)
    task = bound_task(alice, server, status=TaskStatus.RUNNING, prompt_id=prompt_id, started_at=LONG_AGO)
    code, out = command("check_consistency", "--server", "gpu-a")
    assert code == 1 and "[finished_not_recorded]" in out
    code, out = command("check_consistency", "--server", "gpu-a", "--fix")
    assert "completed from the server's history: now succeeded" in out
    task.refresh_from_db()
    assert task.status == TaskStatus.SUCCEEDED and task.outputs.count() == 1


def freeze_running(simulator, server, prompt_id):
    """Post a slow prompt, wait until it runs, then freeze the simulator so that it stays running."""
    simulator.set_time_scale(1.0)
    post_prompt(simulator, server, prompt_id, graph=SLOW)
    wait_for(lambda: simulator.call(simulator.sim.queue_snapshot)[0], message="the job to run")
    simulator.stall()
    simulator.set_time_scale(0.01)


def test_an_orphan_prompt_of_this_hub_is_reported_then_deleted(alice, server, simulator):
    running, waiting = str(uuid.uuid4()), str(uuid.uuid4())
    freeze_running(simulator, server, running)
    post_prompt(simulator, server, waiting)
    code, out = command("check_consistency")
    assert code == 1 and out.count("[orphan]") == 2
    assert len(simulator.call(simulator.sim.queue_snapshot)[1]) == 1  # nothing changed without --fix
    code, out = command("check_consistency", "--fix")
    assert "deleted from the server's queue" in out and "interrupted on the server" in out
    simulator.unstall()
    wait_for(lambda: simulator.call(simulator.sim.queue_snapshot) == ([], []), message="an empty queue")
    assert waiting not in simulator.sim.executed_prompt_ids


def test_missing_and_corrupt_output_files_are_found_and_copied_again(alice, server, simulator):
    prompt_id = str(uuid.uuid4())
    post_prompt(simulator, server, prompt_id)
    in_history(simulator, prompt_id)
    task = bound_task(alice, server, status=TaskStatus.RUNNING, prompt_id=prompt_id, started_at=LONG_AGO)
    command("check_consistency", "--fix")
    output = Task.objects.get(pk=task.pk).outputs.get()
    original = output.file.open("rb").read()
    default_storage.delete(output.file.name)
    code, out = command("check_consistency")
    assert code == 1 and "[output_missing]" in out
    code, out = command("check_consistency", "--fix")
    assert "copied again from gpu-a" in out
    assert output.file.open("rb").read() == original
    with default_storage.open(output.file.name, "wb") as handle:
        handle.write(b"garbage")
    code, out = command("check_consistency", "--fix")
    assert "[output_wrong_size]" in out and f"7 bytes stored, {len(original)} recorded" in out
    assert "copied again" in out and output.file.open("rb").read() == original
    altered = bytearray(original)
    altered[-1] ^= 0xFF  # the same size, one bit pattern changed
    default_storage.delete(output.file.name)
    default_storage.save(output.file.name, ContentFile(bytes(altered)))
    code, out = command("check_consistency")
    assert code == 1 and "[output_corrupt]" in out and "another sha256" in out
    code, out = command("check_consistency", "--fix")
    assert "copied again" in out and output.file.open("rb").read() == original
    assert command("check_consistency")[0] == 0


def test_expired_locks_are_reported_then_released(server):
    Lock.objects.create(purpose=LockPurpose.AFFINITY, key="upload:x", owner="user:1", server=server,
                        expires_at=timezone.now() - timedelta(minutes=1))
    Lock.objects.create(purpose=LockPurpose.AFFINITY, key="upload:y", owner="user:1", server=server,
                        expires_at=timezone.now() + timedelta(minutes=5))
    code, out = command("check_consistency")
    assert code == 1 and "[expired_lock]" in out and "upload:x" in out and "upload:y" not in out
    command("check_consistency", "--fix")
    assert list(Lock.objects.values_list("key", flat=True)) == ["upload:y"]


def stuck_running(owner, server, simulator):
    """A task the hub believes running, truly running (frozen) on the simulator, and quiet for an hour."""
    prompt_id = str(uuid.uuid4())
    freeze_running(simulator, server, prompt_id)
    return bound_task(owner, server, status=TaskStatus.RUNNING, prompt_id=prompt_id, started_at=LONG_AGO)


def age(task):
    Task.objects.filter(pk=task.pk).update(last_event_at=LONG_AGO)


def test_recovery_dry_run_says_how_long_each_task_was_quiet_and_whose_it_is(alice, server, simulator, workflows):
    task = stuck_running(alice, server, simulator)
    quiet_since = timezone.now() - timedelta(minutes=75)
    Task.objects.filter(pk=task.pk).update(workflow=workflows["txt2img"], last_event_at=quiet_since)
    code, out = command("recover_tasks", "--dry-run")
    assert code == 1
    assert (
        f"task={task.pk} server=gpu-a recover_resync: would apply: running, quiet for 1h 15m "
        f"(since {quiet_since:%Y-%m-%d %H:%M:%S}), workflow txt2img, owner alice\n"
    ) in out
    assert not TaskEvent.objects.filter(task=task).exists()
    assert command("recover_tasks", "--server", "gpu-a", "--older-than", "7200") == (0, "No stuck task.\n")


def test_recovery_help_gives_the_limits_per_state_and_the_exit_codes(settings):
    settings.COMFYHUB = {**settings.COMFYHUB, "STUCK_SUBMITTED": 120, "STUCK_RUNNING": 1800}
    parser = load_command_class("servers", "recover_tasks").create_parser("manage.py", "recover_tasks")
    text = parser.format_help()
    assert "  submitted  120 s  (COMFYHUB_STUCK_SUBMITTED)\n  running    1800 s  (COMFYHUB_STUCK_RUNNING)\n" in text
    assert "  0  no stuck task\n  1  stuck tasks were found" in text and "\n  2  bad arguments" in text


def test_recovery_refuses_bad_arguments_with_exit_code_2(db):
    assert command("recover_tasks", "--server", "nope")[0] == 2
    code, out = command("recover_tasks", "--older-than", "-1")
    assert code == 2 and "--older-than must be zero or more seconds." in out


def test_a_stuck_task_climbs_the_recovery_grades(alice, server, simulator, settings):
    settings.COMFYHUB = {**settings.COMFYHUB, "MAX_ATTEMPTS": 5}
    task = stuck_running(alice, server, simulator)
    code, out = command("recover_tasks")
    assert code == 1 and "recover_resync: still running on gpu-a" in out
    assert command("recover_tasks")[1] == "No stuck task.\n"  # the step itself is news: not quiet any more
    age(task)
    assert "recover_refetch: still running on gpu-a" in command("recover_tasks")[1]
    age(task)
    assert "recover_requeue: running on gpu-a: requeued" in command("recover_tasks")[1]
    task.refresh_from_db()
    assert task.status == TaskStatus.QUEUED and task.server is None
    simulator.unstall()
    # Stuck again on its next attempt: the last grade fails it with the reason.
    Task.objects.filter(pk=task.pk).update(
        status=TaskStatus.RUNNING, server=server, prompt_id=str(uuid.uuid4()), last_event_at=LONG_AGO
    )
    code, out = command("recover_tasks", "--server", "gpu-a")
    task.refresh_from_db()
    assert task.status == TaskStatus.FAILED and task.error_kind == "stuck"
    kinds = list(task.events.filter(kind__startswith="recover").values_list("kind", flat=True))
    assert kinds == ["recover_resync", "recover_refetch", "recover_requeue", "recover_fail"]


def test_the_supervisor_watchdog_recovers_stuck_tasks(alice, server, simulator, fast_settings):
    fast_settings.COMFYHUB = {**fast_settings.COMFYHUB, "STUCK_RUNNING": 1, "WATCHDOG_INTERVAL": 1}
    task = stuck_running(alice, server, simulator)
    hub = Hub().start()
    try:
        wait_for(lambda: task.events.filter(kind="recover_resync").exists(), message="the watchdog's first step")
    finally:
        hub.stop()


@pytest.fixture
def staff_browser(admin_user):
    client = Client()
    client.force_login(admin_user)
    return client


def admin_action(client, model, action, ids, **extra):
    return client.post(
        f"/admin/{model}/", {"action": action, "_selected_action": [str(pk) for pk in ids], **extra}, follow=True
    )


def test_staff_can_retry_cancel_and_fail_tasks_from_the_admin(alice, staff_browser, server):
    failed = Task.objects.create(owner=alice, graph=GRAPH, status=TaskStatus.FAILED, error="boom")
    waiting = Task.objects.create(owner=alice, graph=GRAPH)
    other = Task.objects.create(owner=alice, graph=GRAPH)
    page = admin_action(staff_browser, "tasks/task", "retry", [failed.pk, waiting.pk]).content.decode()
    assert "1 task(s) sent back to the queue." in page and "1 task(s) left alone" in page
    failed.refresh_from_db()
    assert failed.status == TaskStatus.QUEUED and failed.error == ""
    page = admin_action(staff_browser, "tasks/task", "cancel", [waiting.pk]).content.decode()
    assert "1 task(s) cancelled or being cancelled." in page
    page = admin_action(staff_browser, "tasks/task", "fail", [other.pk]).content.decode()
    assert "Give a reason" in page and Task.objects.get(pk=other.pk).status == TaskStatus.QUEUED
    page = admin_action(staff_browser, "tasks/task", "fail", [other.pk], reason="bad inputs").content.decode()
    other.refresh_from_db()
    assert other.status == TaskStatus.FAILED and other.error == "bad inputs (failed by root)"


def test_staff_can_recover_and_check_from_the_admin(alice, staff_browser, server, simulator):
    task = stuck_running(alice, server, simulator)
    page = admin_action(staff_browser, "tasks/task", "recover", [task.pk]).content.decode()
    assert "recover_resync: still running on gpu-a" in page
    lost = bound_task(alice, server)
    page = admin_action(staff_browser, "servers/server", "consistency_check", [server.pk]).content.decode()
    assert f"[unknown_to_server] server=gpu-a task={lost.pk}" in page
    assert Task.objects.get(pk=lost.pk).status == TaskStatus.SUBMITTED
    page = admin_action(staff_browser, "tasks/task", "reconcile_now", [lost.pk]).content.decode()
    assert "Server gpu-a reconciled: 1 task(s) changed." in page
    assert Task.objects.get(pk=lost.pk).status == TaskStatus.QUEUED


def test_normal_users_cannot_use_the_admin(alice, server):
    client = Client()
    client.force_login(alice)
    task = Task.objects.create(owner=alice, graph=GRAPH, status=TaskStatus.FAILED)
    reply = client.post("/admin/tasks/task/", {"action": "retry", "_selected_action": [str(task.pk)]})
    assert reply.status_code == 302 and reply["Location"].startswith("/admin/login/")
    assert Task.objects.get(pk=task.pk).status == TaskStatus.FAILED
    assert client.get(f"/staff/outputs/{uuid.uuid4()}/").status_code == 302
    assert Server.objects.get(pk=server.pk).enabled


def test_staff_can_drain_and_probe_servers_from_the_admin(staff_browser, server, simulator):
    page = admin_action(staff_browser, "servers/server", "drain", [server.pk]).content.decode()
    assert "1 server(s) draining" in page and Server.objects.get(pk=server.pk).draining
    page = admin_action(staff_browser, "servers/server", "probe_now", [server.pk]).content.decode()
    assert "Server gpu-a answers; 0 prompt(s) of other clients queued;" in page
    assert Server.objects.get(pk=server.pk).capabilities["classes"]["SaveImage"] == {}
    simulator.unplug()
    page = admin_action(staff_browser, "servers/server", "probe_now", [server.pk]).content.decode()
    assert "Server gpu-a: no answer:" in page
    simulator.plug()
