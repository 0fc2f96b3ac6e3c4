"""The task admin as an operator reads it at 1280 px: short linked ids, and times to the second."""

import re
import uuid
from datetime import UTC, datetime

import pytest
from django.test import Client

from servers.models import Server
from tasks.models import Task, TaskEvent, TaskStatus

pytestmark = pytest.mark.django_db

GRAPH = {"1": {"class_type": "EmptyImage", "inputs": {"color": 1}}}
AT = datetime(2026, 12, 7, 11, 31, 5, tzinfo=UTC)


@pytest.fixture
def staff(admin_user):
    client = Client()
    client.force_login(admin_user)
    return client


@pytest.fixture
def task(alice):
    server = Server.objects.create(name="gpu-a", base_url="http://gpu-a.internal:8188")
    task = Task.objects.create(
        owner=alice, graph=GRAPH, status=TaskStatus.RUNNING, server=server, prompt_id=str(uuid.uuid4()),
        last_event_at=AT,
    )
    TaskEvent.objects.create(task=task, at=AT, kind="started", from_status="submitted", to_status="running")
    return task


def test_the_task_list_shows_short_ids_linked_to_each_task(staff, task):
    page = staff.get("/admin/tasks/task/").content.decode()
    short = str(task.pk)[:8]
    link = re.search(rf'<a href="/admin/tasks/task/{task.pk}/change/[^"]*"><code title="{task.pk}">(\w+)</code>', page)
    assert link and link.group(1) == short
    assert f">{task.pk}<" not in page and f">{task.prompt_id}<" not in page  # no whole UUID to wrap a column
    assert f'<code title="{task.prompt_id}">{task.prompt_id[:8]}</code>' in page
    assert "2026-12-07 11:31:05" in page  # last event, to the second


def test_the_short_id_finds_its_task(staff, task, alice):
    other = Task.objects.create(owner=alice, graph=GRAPH)
    page = staff.get("/admin/tasks/task/", {"q": str(task.pk)[:8]}).content.decode()
    assert f"/admin/tasks/task/{task.pk}/change/" in page and f"/admin/tasks/task/{other.pk}/change/" not in page
    page = staff.get("/admin/tasks/task/", {"q": task.prompt_id[:8]}).content.decode()
    assert f"/admin/tasks/task/{task.pk}/change/" in page


def test_the_timeline_gives_each_event_to_the_second(staff, task):
    page = staff.get(f"/admin/tasks/task/{task.pk}/change/").content.decode()
    assert page.count("2026-12-07 11:31:05") >= 2  # the event's time, and the task's last event
    assert "a.m." not in page and "p.m." not in page
