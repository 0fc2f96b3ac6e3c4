import asyncio
import time

import pytest
from channels.layers import channel_layers
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
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
    from comfysim import SimulatorThread

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


def Hub():
    from servers.supervisor import SupervisorThread

    hub = SupervisorThread(tick=0.05)
    hub.supervisor.http_timeout = 5.0
    hub.connection = lambda server: hub.supervisor.connections.get(server.pk)
    return hub


@pytest.fixture
def server(transactional_db, simulator):
    return Server.objects.create(name="gpu-a", base_url=simulator.url, max_in_flight=2)


@pytest.fixture
def hub(transactional_db, fast_settings):
    running = Hub().start()
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def fresh_channel_layer():
    """
    Each test gets a channel layer of its own. channels_redis binds a layer to the event loop of its first receive
    until every receive has ended; a test whose loop closes while a consumer's receive waits (a socket the test
    gave up on) would leave it bound to that dead loop, and every later test's receive would fail.
    """
    yield
    channel_layers.backends.clear()


@pytest.fixture(autouse=True)
def fresh_ops_news():
    """Each test starts with no dashboard known to be open and no ops.update sent in the last second."""
    from django.core.cache import cache

    from servers import snapshot
    from tasks import progress

    cache.delete(progress.DASHBOARDS_KEY)
    progress._ops_news.update(sent_at=float("-inf"), checked_at=float("-inf"), watched=False)
    snapshot.forget()  # and the pool's capabilities are read again (a test may change them with update())


@pytest.fixture(scope="session")
def seaweed():
    """One real S3 server (SeaweedFS) for the whole session, started by the first test that asks (about 3 s)."""
    from comfyhub.seaweed import SeaweedServer

    with SeaweedServer() as server:
        yield server


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    return settings.MEDIA_ROOT


async def ws_connect(application, path, user):
    """A websocket test client on `path`, as `user`; returns (communicator, whether the handshake was accepted)."""
    communicator = WebsocketCommunicator(application, path)
    communicator.scope["user"] = user
    connected, _ = await communicator.connect()
    return communicator, connected


async def ws_frames(communicator, wait=0.6):
    """Every frame received within `wait` seconds (receive_nothing, unlike a timed-out receive, keeps the app)."""
    await asyncio.sleep(wait)
    received = []
    while not await communicator.receive_nothing(timeout=0.05):
        received.append(await communicator.receive_from())
    return received
