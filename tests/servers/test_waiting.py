"""Why queued tasks wait: written in bulk, and only when the reason changes."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from servers.pool import make_plan
from tasks.models import Task
from tests.conftest import make_user

pytestmark = pytest.mark.django_db

GRAPH = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 1}}}


def updates(queries):
    return [query["sql"] for query in queries if query["sql"].startswith("UPDATE")]


def test_the_reasons_of_many_tasks_are_one_update_and_an_unchanged_reason_none(django_capture_on_commit_callbacks):
    users = [make_user(f"user{n}") for n in range(3)]
    Task.objects.bulk_create([Task(owner=users[n % 3], graph=GRAPH) for n in range(30)])
    with CaptureQueriesContext(connection) as first, django_capture_on_commit_callbacks() as pushes:
        make_plan({}, horizon=50)
    assert len(updates(first)) == 1
    reasons = set(Task.objects.values_list("waiting_reason", flat=True))
    assert reasons == {"waiting: no server is online (the pool has no enabled server)"}
    assert len(pushes) == 30  # each owner's windows hear of their own tasks
    with CaptureQueriesContext(connection) as again:
        make_plan({}, horizon=50)
    assert updates(again) == []

