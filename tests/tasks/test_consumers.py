"""The browser socket /ws/tasks/: who may connect, what each user receives, and how bursts are folded."""

import time

import pytest
from asgiref.sync import sync_to_async
from channels.routing import URLRouter
from django.contrib.auth.models import AnonymousUser

from tasks.models import Task, TaskStatus
from tasks.progress import aemit_task_update
from tasks.routing import websocket_urlpatterns
from tests.conftest import ws_connect, ws_frames

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

application = URLRouter(websocket_urlpatterns)


async def connect(user):
    return await ws_connect(application, "/ws/tasks/", user)


frames = ws_frames


@sync_to_async
def make_task(owner, workflow, **fields):
    return Task.objects.create(owner=owner, workflow=workflow, graph=workflow.graph, **fields)


@pytest.fixture
def push_fast(settings):
    settings.COMFYHUB = {**settings.COMFYHUB, "PUSH_INTERVAL": 0.1}


async def test_anonymous_sockets_are_refused():
    communicator, connected = await connect(AnonymousUser())
    assert not connected
    await communicator.disconnect()


async def test_each_user_receives_only_their_own_tasks(alice, bob, workflows, push_fast):
    alice_socket, ok_a = await connect(alice)
    bob_socket, ok_b = await connect(bob)
    assert ok_a and ok_b
    task = await make_task(alice, workflows["txt2img"], status=TaskStatus.RUNNING, progress=0.42)
    await aemit_task_update(task)
    [frame] = await frames(alice_socket)
    assert f'id="task-{task.pk}"' in frame and 'hx-swap-oob="true"' in frame
    assert '<progress max="100" value="42"' in frame
    assert await frames(bob_socket) == []
    await alice_socket.disconnect()
    await bob_socket.disconnect()


async def test_every_window_of_a_user_is_updated(alice, workflows, push_fast):
    windows = [(await connect(alice))[0] for _ in range(3)]
    task = await make_task(alice, workflows["fast"], status=TaskStatus.RUNNING, progress=0.5)
    await aemit_task_update(task)
    for window in windows:
        [frame] = await frames(window)
        assert f'id="task-{task.pk}"' in frame
        await window.disconnect()


async def test_a_new_task_is_inserted_at_the_top_of_the_list(alice, workflows, push_fast):
    window, _ = await connect(alice)
    task = await make_task(alice, workflows["fast"])
    await aemit_task_update(task, created=True)
    [frame] = await frames(window)
    assert frame.startswith('<div hx-swap-oob="afterbegin:#task-list">\n<article')
    assert f'id="task-{task.pk}"' in frame
    await window.disconnect()


async def test_a_burst_of_progress_is_folded_into_few_frames(alice, workflows, push_fast):
    window, _ = await connect(alice)
    tasks = [await make_task(alice, workflows["fast"], status=TaskStatus.RUNNING, progress=0.8) for _ in range(5)]
    started = time.monotonic()
    for step in range(1, 41):
        for task in tasks:
            await aemit_task_update(task, upstream_at=1000.0 + step)
    took = time.monotonic() - started
    received = await frames(window)
    # 200 updates: at most one frame per push interval (0.1 s) while they arrive, never one per update.
    assert 1 <= len(received) <= took / 0.1 + 3, (len(received), took)
    assert len(received) < 40
    # Every task reaches the window; a frame carries the tasks that changed since the one before it.
    for task in tasks:
        assert any(f'id="task-{task.pk}"' in frame for frame in received), task.pk
    assert 'value="80"' in received[-1]
    # The first frame names the earliest upstream message it folded in.
    assert 'data-upstream-at="1001.000000"' in received[0]
    await window.disconnect()


async def test_the_running_count_travels_with_the_rows(alice, workflows, push_fast):
    window, _ = await connect(alice)
    task = await make_task(alice, workflows["fast"], status=TaskStatus.RUNNING)
    await make_task(alice, workflows["fast"], status=TaskStatus.RUNNING)
    await aemit_task_update(task)
    [frame] = await frames(window)
    assert 'id="running-count"' in frame and 'data-count="2"' in frame
    await window.disconnect()


async def test_windows_of_one_user_share_one_render(alice, workflows, push_fast, monkeypatch):
    """Ten open windows of one user cost one render per frame, not ten (the feed folds each update's copies)."""
    from tasks import consumers

    renders = []
    original = consumers.render_updates

    async def counting(user, pending):
        renders.append(dict(pending))
        return await original(user, pending)

    monkeypatch.setattr(consumers, "render_updates", counting)
    windows = [(await connect(alice))[0] for _ in range(10)]
    task = await make_task(alice, workflows["fast"], status=TaskStatus.RUNNING, progress=0.3)
    await aemit_task_update(task)
    for window in windows:
        [frame] = await frames(window, wait=0.3)
        assert f'id="task-{task.pk}"' in frame
    assert len(renders) == 1, renders
    # A window that closes leaves the others live.
    await windows.pop().disconnect()
    await aemit_task_update(task)
    for window in windows:
        [frame] = await frames(window, wait=0.3)
        assert f'id="task-{task.pk}"' in frame
        await window.disconnect()
    assert len(renders) == 2
    assert consumers.UserFeed.feeds == {}  # the last window closing drops the feed
