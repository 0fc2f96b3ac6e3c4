"""The staff socket /ws/ops/: who may connect, what it pushes, and how bursts are folded."""

import asyncio
import time
from itertools import pairwise

import pytest
from asgiref.sync import sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser
from django.test import Client

from ops import consumers
from ops.routing import websocket_urlpatterns
from tasks import progress
from tasks.models import TaskStatus
from tasks.progress import aemit_ops_update
from tests.conftest import ws_connect, ws_frames
from tests.ops.conftest import make_server, make_task

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

application = URLRouter(websocket_urlpatterns)


async def connect(user):
    return await ws_connect(application, "/ws/ops/", user)


frames = ws_frames


@pytest.fixture
def push_fast(monkeypatch):
    monkeypatch.setattr(consumers, "PUSH_INTERVAL", 0.1)


async def test_anonymous_sockets_are_refused():
    communicator, connected = await connect(AnonymousUser())
    assert not connected
    await communicator.disconnect()


async def test_normal_users_are_refused(alice):
    communicator, connected = await connect(alice)
    assert not connected
    await communicator.disconnect()


async def test_staff_get_the_pool_at_once_and_again_after_an_update(operator, alice, workflows, push_fast):
    await sync_to_async(make_server)("gpu-a")
    socket, connected = await connect(operator)
    assert connected
    [first] = await frames(socket, wait=0.3)
    assert first.startswith('<div id="ops-body" class="ops-body" hx-swap-oob="true">')
    assert "gpu-a" in first and "Nothing running." in first

    gpu_b = await sync_to_async(make_server)("gpu-b")
    task = await sync_to_async(make_task)(
        alice, workflows["txt2img"], gpu_b, status=TaskStatus.RUNNING, progress=0.37, created=5, started=2
    )
    await aemit_ops_update("task")
    [frame] = await frames(socket)
    assert frame.startswith('<div id="ops-body"') and frame.count('id="ops-body"') == 1
    assert "gpu-b" in frame and f"/admin/tasks/task/{task.pk}/change/" in frame and 'value="37"' in frame
    await socket.disconnect()


async def test_a_burst_of_updates_becomes_at_most_one_frame_a_second(operator):
    await sync_to_async(make_server)("gpu-a")
    socket, _ = await connect(operator)

    async def keep_updating():
        while True:
            await aemit_ops_update("task")
            await asyncio.sleep(0.05)

    updates = asyncio.create_task(keep_updating())
    started = time.monotonic()
    arrivals = []
    while time.monotonic() < started + 2.6:
        if not await socket.receive_nothing(timeout=0.02):
            await socket.receive_from()
            arrivals.append(time.monotonic() - started)
    updates.cancel()
    # About 50 updates: the frame sent on connect, then one a second.
    assert len(arrivals) == 3, arrivals
    assert arrivals[0] < 0.5
    assert all(later - earlier > 0.9 for earlier, later in pairwise(arrivals)), arrivals
    await socket.disconnect()


async def test_every_staff_window_is_updated(operator, admin_user, push_fast):
    await sync_to_async(make_server)("gpu-a")
    windows = [(await connect(user))[0] for user in (operator, operator, admin_user)]
    for window in windows:
        assert len(await frames(window, wait=0.2)) == 1
    await sync_to_async(make_server)("gpu-new")
    await aemit_ops_update("server")
    for window in windows:
        [frame] = await frames(window, wait=0.3)
        assert "gpu-new" in frame
        await window.disconnect()


async def test_a_user_who_is_no_longer_staff_is_disconnected(operator, push_fast):
    socket, _ = await connect(operator)
    await frames(socket, wait=0.2)
    operator.is_staff = False
    await sync_to_async(operator.save)()
    await aemit_ops_update("server")
    assert (await socket.receive_output(timeout=1))["type"] == "websocket.close"
    await socket.disconnect()


async def test_the_hub_serves_the_ops_socket_to_a_staff_session(operator):
    from comfyhub.asgi import application as hub

    client = Client()
    await sync_to_async(client.force_login)(operator)
    cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
    socket = WebsocketCommunicator(
        hub, "/ws/ops/", headers=[(b"origin", b"http://testserver"), (b"host", b"testserver"), (b"cookie", cookie)]
    )
    connected, _ = await socket.connect()
    assert connected
    [frame] = await frames(socket, wait=0.3)
    assert 'id="ops-body"' in frame
    await socket.disconnect()


async def test_an_open_dashboard_follows_progress_without_a_status_change(operator, alice, workflows, monkeypatch):
    # Progress travels to its owner only; the dashboard reads the pool again on its own to keep the bars moving.
    monkeypatch.setattr(consumers, "PUSH_INTERVAL", 0.05)
    monkeypatch.setattr(consumers, "REFRESH_SECONDS", 0.2)
    gpu = await sync_to_async(make_server)("gpu-a")
    task = await sync_to_async(make_task)(
        alice, workflows["txt2img"], gpu, status=TaskStatus.RUNNING, progress=0.10, created=5, started=2
    )
    socket, _ = await connect(operator)
    [first] = await frames(socket, wait=0.1)
    assert 'value="10"' in first
    await sync_to_async(type(task).objects.filter(pk=task.pk).update)(progress=0.64)  # the once-a-second write
    later = await frames(socket, wait=0.6)
    assert later and 'value="64"' in later[-1]
    await socket.disconnect()


async def test_the_pool_is_announced_only_while_a_dashboard_is_open_and_at_most_once_a_second(monkeypatch):
    sent = []

    class Layer:
        async def group_send(self, group, message):
            sent.append((group, message["type"]))

    monkeypatch.setattr("tasks.progress.get_channel_layer", Layer)
    await aemit_ops_update("task")
    assert sent == []  # nobody watches: nothing goes out
    monkeypatch.setattr("tasks.progress.OPS_UPDATE_SECONDS", 0.3)
    await progress.dashboard_open()
    for _ in range(5):
        await aemit_ops_update("task")
    assert sent == [("ops", "ops.update")]
    await asyncio.sleep(0.35)
    await aemit_ops_update("task")
    assert len(sent) == 2


async def test_a_dashboard_open_in_another_process_is_seen_through_the_cache(monkeypatch):
    from django.core.cache import cache

    sent = []

    class Layer:
        async def group_send(self, group, message):
            sent.append(group)

    monkeypatch.setattr("tasks.progress.get_channel_layer", Layer)
    await cache.aset(progress.DASHBOARDS_KEY, True, 10)  # what the other process's dashboard wrote
    await aemit_ops_update("server")
    assert sent == ["ops"]
