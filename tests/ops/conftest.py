from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from servers.models import Server, ServerState
from tasks.models import Task
from tests.conftest import make_user


@pytest.fixture
def operator(db):
    """Staff without being a superuser: what an on-call engineer usually has."""
    return make_user("olivia", is_staff=True)


def browser(user=None):
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def make_server(name, state=ServerState.ONLINE, **fields):
    return Server.objects.create(
        name=name, base_url=f"http://{name}.internal:8188", state=state, state_changed_at=timezone.now(), **fields
    )


def make_task(owner, workflow, server=None, *, now=None, created=None, started=None, finished=None, **fields):
    """A task with its phase timestamps given as seconds before `now` (None: not reached)."""
    now = now or timezone.now()

    def ago(seconds):
        return None if seconds is None else now - timedelta(seconds=seconds)

    prompt_id = fields.pop("prompt_id", f"p-{Task.objects.count()}" if server else None)
    return Task.objects.create(
        owner=owner,
        workflow=workflow,
        graph=workflow.graph,
        server=server,
        prompt_id=prompt_id,
        created_at=ago(created if created is not None else 0),
        started_at=ago(started),
        finished_at=ago(finished),
        **fields,
    )
