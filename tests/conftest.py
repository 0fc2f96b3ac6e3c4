import asyncio
import threading
import time

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import connections
from django.test import Client

from servers.models import Server
from tasks.models import ApiToken
from tasks.workflows import load_demo_workflows


def wait_for(predicate, timeout=15.0, interval=0.02, message="condition"):
    """Poll until predicate() is truthy; return its value or fail the test with `message`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {message}")


def make_user(username, **extra):
    return get_user_model().objects.create_user(username, password=f"{username}-pass-123", **extra)


@pytest.fixture
def alice(db):
    return make_user("alice")


@pytest.fixture
def bob(db):
    return make_user("bob")


@pytest.fixture
def admin_user(db):
    return get_user_model().objects.create_superuser("root", password="root-pass-123")


class ApiClient:
    """The JSON API as an integrator sees it: bearer token, JSON in and out."""

    def __init__(self, user):
        _, self.token = ApiToken.issue(user)
        self.user = user
        self.client = Client(HTTP_AUTHORIZATION=f"Bearer {self.token}")

    def post(self, path, body=None, **kwargs):
        return self.client.post(path, body, content_type="application/json", **kwargs)

    def get(self, path, **kwargs):
        return self.client.get(path, **kwargs)

    def submit(self, workflow=None, inputs=None, **body):
        if workflow is not None:
            body["workflow"] = workflow
            body["inputs"] = inputs or {}
        return self.post("/api/v1/tasks", body)

    def task(self, task_id):
        reply = self.get(f"/api/v1/tasks/{task_id}")
        assert reply.status_code == 200, reply.content
        return reply.json()


@pytest.fixture
def alice_api(alice):
    return ApiClient(alice)


@pytest.fixture
def bob_api(bob):
    return ApiClient(bob)


@pytest.fixture
def admin_api(admin_user):
    return ApiClient(admin_user)


@pytest.fixture
def workflows(db):
    return {workflow.slug: workflow for workflow in load_demo_workflows()}


@pytest.fixture
def raw_graph_permission():
    return Permission.objects.get(codename="submit_raw_graph")


@pytest.fixture
def simulator():
    from servers.simulator import SimulatorThread

    with SimulatorThread(time_scale=0.01) as sim:
        yield sim


@pytest.fixture
def fast_settings(settings):
    settings.COMFYHUB = {
        **settings.COMFYHUB,
        "RECONCILE_INTERVAL": 1,
        "PROGRESS_INTERVAL": 0.05,
        "LEASE_SECONDS": 5,
    }
    return settings


class Hub:
    """The upstream supervisor in a background thread with its own event loop, as run_upstream runs it."""

    def __init__(self):
        from servers.upstream import Supervisor

        self.supervisor = Supervisor(tick=0.05)
        self.supervisor.http_timeout = 5.0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="hub", daemon=True)
        self.failure = None

    def _run(self):
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:  # surfaced by stop()
            self.failure = exc
        finally:
            self.loop.close()

    async def _main(self):
        try:
            await self.supervisor.run()
        finally:
            from asgiref.sync import sync_to_async

            # The ORM ran in asgiref's worker thread: close its connections so the test database can be dropped.
            await sync_to_async(connections.close_all)()

    def start(self):
        self.thread.start()
        wait_for(lambda: self.supervisor.wake is not None, message="the supervisor to start")
        return self

    def stop(self):
        wait_for(lambda: self.supervisor._stopped is not None, message="the supervisor loop")
        self.supervisor.stop()
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "the supervisor did not stop"
        if self.failure is not None:
            raise self.failure

    def connection(self, server):
        return self.supervisor.connections.get(server.pk)

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=15)


@pytest.fixture
def server(transactional_db, simulator):
    return Server.objects.create(name="gpu-a", base_url=simulator.url, max_in_flight=2)


@pytest.fixture
def hub(transactional_db, fast_settings):
    running = Hub().start()
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    return settings.MEDIA_ROOT
