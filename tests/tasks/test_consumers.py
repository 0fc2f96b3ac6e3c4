"""The browser socket /ws/tasks/: who may connect, what each user receives, and how bursts are folded."""

import asyncio
import os
import time
import uuid

import pytest
from asgiref.sync import sync_to_async
from channels.routing import URLRouter
from django.contrib.auth.models import AnonymousUser

from tasks.live import apush, progress_detail, progress_fact
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
    # ... and at the top of its workflow's runs, for a workspace of that workflow open in any window.
    assert f'<div hx-swap-oob="afterbegin:#workflow-{workflows["fast"].pk}-runs">\n<article' in frame
    assert frame.count(f'<article class="task task--queued" id="task-{task.pk}"') == 2
    await window.disconnect()


def live_fact(task, owner, step, steps=20, **extra):
    detail = progress_detail(
        value=step / steps * 0.9, node="3", title="KSampler", step=[step, steps], done=2, total=5,
        started=time.time() - 4, eta_at=time.time() + 6,
    )  # fmt: skip
    return progress_fact(task.pk, owner.pk, detail, upstream_at=1000.0 + step, **extra)


async def test_a_progress_fact_reaches_every_window_of_its_owner_and_no_one_else(alice, bob, workflows, monkeypatch):
    from tasks import consumers

    async def no_rows(user, pending):
        raise AssertionError("a progress fact must not re-read or re-render the row")

    monkeypatch.setattr(consumers, "render_updates", no_rows)
    alices = [(await connect(alice))[0] for _ in range(3)]
    bobs, _ = await connect(bob)
    task = await make_task(alice, workflows["txt2img"], status=TaskStatus.RUNNING, progress=0.1)
    await apush(alice.pk, live_fact(task, alice, 12))
    for window in alices:
        [frame] = await frames(window)
        assert f'id="task-{task.pk}-live"' in frame and 'hx-swap-oob="true"' in frame
        assert "<article" not in frame  # a fragment, not the row
        assert 'value="54"' in frame and "step 12/20" in frame and "KSampler" in frame
        assert "2 of 5 nodes done" in frame and "left" in frame
        assert len(frame.encode()) < 1024
    assert await frames(bobs) == []
    for window in [*alices, bobs]:
        await window.disconnect()


async def test_a_fact_that_names_another_owner_is_not_shown(alice, bob, workflows):
    window, _ = await connect(alice)
    task = await make_task(bob, workflows["txt2img"], status=TaskStatus.RUNNING)
    await apush(alice.pk, live_fact(task, bob, 3))  # sent to alice's group by mistake: the feed checks the owner
    assert await frames(window) == []
    await window.disconnect()


async def test_a_window_that_reads_slowly_gets_the_newest_state_not_a_backlog(alice, workflows):
    from tasks.consumers import UserFeed

    first, _ = await connect(alice)
    second, _ = await connect(alice)
    slow, quick = list(UserFeed.feeds[alice.pk].sockets)
    send = slow.send

    async def slowly(*args, **kwargs):
        await asyncio.sleep(0.05)  # a client that reads slowly: each frame takes 50 ms to go out
        await send(*args, **kwargs)

    slow.send = slowly
    task = await make_task(alice, workflows["txt2img"], status=TaskStatus.RUNNING)
    for step in range(1, 301):
        await apush(alice.pk, live_fact(task, alice, step, steps=300))
        if step % 10 == 0:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    counts = []
    for window in (first, second):
        received = await frames(window)
        assert received and "step 300/300" in received[-1]  # both end with the newest state
        counts.append(len(received))
        await window.disconnect()
    # The slow window got a few frames with the newest state each, not 300 to replay; the other one was not held up.
    assert min(counts) < 30 and max(counts) > 2 * min(counts), counts


async def test_no_fact_draws_over_a_finished_row(alice, workflows):
    window, _ = await connect(alice)
    task = await make_task(alice, workflows["fast"], status=TaskStatus.SUCCEEDED, progress=1.0)
    await aemit_task_update(task)
    [row] = await frames(window)
    assert 'data-status="succeeded"' in row
    await apush(alice.pk, live_fact(task, alice, 5))  # late: pushed before the end, delivered after it
    assert await frames(window) == []
    await window.disconnect()


async def test_the_running_count_travels_with_the_rows(alice, workflows, push_fast):
    window, _ = await connect(alice)
    task = await make_task(alice, workflows["fast"], status=TaskStatus.RUNNING)
    await make_task(alice, workflows["fast"], status=TaskStatus.RUNNING)
    await aemit_task_update(task)
    [frame] = await frames(window)
    assert 'id="running-count"' in frame and 'data-running="2"' in frame
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
    assert len(renders) == 1, renders  # one subscription and one render for the ten windows
    # A window that closes leaves the others live.
    await windows.pop().disconnect()
    await aemit_task_update(task)
    for window in windows:
        [frame] = await frames(window, wait=0.3)
        assert f'id="task-{task.pk}"' in frame
        await window.disconnect()
    assert len(renders) == 2
    assert consumers.UserFeed.feeds == {}  # the last window closing drops the feed


@pytest.mark.parametrize("backend", ["core.RedisChannelLayer", "pubsub.RedisPubSubChannelLayer"])
async def test_each_redis_layer_delivers_to_the_windows_of_many_users(backend, alice, bob, workflows, settings):
    # Both layers COMFYHUB_REDIS_LAYER may choose, with several users' feeds and windows in one process: the core
    # layer reads a process's own channels one prefix at a time, so a feed on a prefix of its own got nothing.
    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    config = {"hosts": [url], "prefix": f"consumers-{uuid.uuid4().hex[:8]}"}
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": f"channels_redis.{backend}", "CONFIG": config}}
    windows = {user: [(await connect(user))[0] for _ in range(2)] for user in (alice, bob)}
    for user, sockets in windows.items():
        task = await make_task(user, workflows["txt2img"], status=TaskStatus.RUNNING)
        await aemit_task_update(task)
        await apush(user.pk, live_fact(task, user, 7))
        for window in sockets:
            received = "".join(await frames(window, wait=0.5))
            assert f'id="task-{task.pk}"' in received and "step 7/20" in received, (backend, user)
    for sockets in windows.values():
        for window in sockets:
            await window.disconnect()


async def test_facts_do_not_wait_for_a_row_being_read_and_the_newest_follows_it(alice, workflows, monkeypatch):
    from tasks import consumers

    release, original = asyncio.Event(), consumers.render_updates

    async def slow_rows(user, pending):
        await release.wait()  # many rows changing at once: the database takes its time
        return await original(user, pending)

    monkeypatch.setattr(consumers, "render_updates", slow_rows)
    window, _ = await connect(alice)
    task = await make_task(alice, workflows["txt2img"], status=TaskStatus.RUNNING, progress=0.1)
    await aemit_task_update(task)
    await apush(alice.pk, live_fact(task, alice, 9))
    [fact] = await frames(window)
    assert "step 9/20" in fact and "<article" not in fact  # the fact went out while the row was being read
    release.set()
    [row] = await frames(window)
    # The row was read before the fact came (the database has 10 %): it is drawn with the fact's progress.
    assert row.index("<article") < row.index("step 9/20") < row.index("</article>")
    assert 'value="40"' in row and 'value="10"' not in row and row.count("-live") == 1
    await apush(alice.pk, live_fact(task, alice, 11))
    await frames(window)
    await aemit_task_update(task)
    [again] = await frames(window)
    # A row read after a fact is drawn with the fact's progress, not the database's older 10 %.
    assert again.index("<article") < again.index("step 11/20") < again.index("</article>")
    assert 'value="49"' in again and 'value="10"' not in again
    await window.disconnect()
