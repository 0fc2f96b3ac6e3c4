"""One structured log line per task event, for log pipelines."""

import logging

import pytest
from django.db import transaction

from tasks.models import Task, TaskStatus
from tests.ops.conftest import make_server, make_task

pytestmark = pytest.mark.django_db


@pytest.fixture
def transitions(caplog):
    caplog.set_level(logging.INFO, logger="comfyhub.tasks")
    return caplog


def lines(caplog):
    return [record.getMessage() for record in caplog.records if record.name == "comfyhub.tasks"]


def test_a_transition_logs_task_server_prompt_statuses_and_kind(
    alice, workflows, transitions, django_capture_on_commit_callbacks
):
    server = make_server("gpu-a")
    task = make_task(alice, workflows["fast"])
    with django_capture_on_commit_callbacks(execute=True):
        assert Task.objects.get(pk=task.pk).bind(server, "prompt-1")
    with django_capture_on_commit_callbacks(execute=True):
        assert Task.objects.get(pk=task.pk).mark_running()
    assert lines(transitions) == [
        f"task={task.pk} server=gpu-a prompt_id=prompt-1 from=queued to=submitted kind=submitted",
        f"task={task.pk} server=gpu-a prompt_id=prompt-1 from=submitted to=running kind=running",
    ]


def test_a_requeue_names_the_server_the_task_left(alice, workflows, transitions, django_capture_on_commit_callbacks):
    server = make_server("gpu-b")
    task = make_task(alice, workflows["fast"], server, status=TaskStatus.RUNNING, prompt_id="p-9", attempts=1)
    with django_capture_on_commit_callbacks(execute=True):
        assert task.requeue("the server restarted")
    assert lines(transitions) == [f"task={task.pk} server=gpu-b prompt_id=p-9 from=running to=queued kind=requeued"]


def test_an_event_without_server_or_prompt_logs_dashes(
    alice, workflows, transitions, django_capture_on_commit_callbacks
):
    task = make_task(alice, workflows["fast"])
    with django_capture_on_commit_callbacks(execute=True):
        task.record("note", "nothing happened")
    assert lines(transitions) == [f"task={task.pk} server=- prompt_id=- from=queued to=queued kind=note"]


def test_a_transition_that_is_rolled_back_is_not_logged(
    alice, workflows, transitions, django_capture_on_commit_callbacks
):
    server = make_server("gpu-c")
    task = make_task(alice, workflows["fast"])
    with django_capture_on_commit_callbacks(execute=True), pytest.raises(RuntimeError), transaction.atomic():
        assert task.bind(server, "prompt-2")
        raise RuntimeError("crash after the transition")
    assert Task.objects.get(pk=task.pk).status == TaskStatus.QUEUED
    assert lines(transitions) == []
