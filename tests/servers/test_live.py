"""
The live path end to end: simulated ComfyUI servers sending progress and sampler previews, the supervisor turning
them into facts, the channel layer (in-memory, or Redis when REDIS_URL is set) and the users' windows.

A preview frame names its prompt only in type 4; a type 1 frame belongs to whatever the server runs now, and a
socket is per server, not per user: attributing frames to tasks is the hub's job, and showing one user's picture
in another user's window is the leak the design exists to prevent. So two users run at once, on two servers, each
with two windows open, once with type 4 frames and once with type 1.

The supervisor runs on the test's own event loop, beside the windows, as `run_upstream` runs beside nothing.
"""

import asyncio
import base64
import contextlib
import io
import re
import time
import uuid

import pytest
from asgiref.sync import sync_to_async
from channels.routing import URLRouter
from django.apps import apps
from django.db import connections
from django.test import Client
from PIL import Image

from comfysim import Simulator, SimulatorThread
from comfysim.nodes import preview_color
from servers.aio import db
from servers.models import Server, ServerState
from servers.supervisor import Supervisor
from servers.tracking import Tracking
from tasks.models import TERMINAL_STATUSES, Task, TaskOutput, TaskStatus
from tasks.routing import websocket_urlpatterns
from tests.conftest import ws_connect

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

application = URLRouter(websocket_urlpatterns)
STEPS = 40
# KSampler takes 0.15 s a step at time scale 1: 40 steps take about 2.4 s here, long enough to watch.
TIME_SCALE = 0.4
PREVIEW_SRC = re.compile(r'<img class="task__preview" id="task-([0-9a-f-]+)-preview" src="data:([^;]+);base64,([^"]+)"')


@pytest.fixture
def sims():
    # taesd: previews at the picture's full size (512 px), which the hub makes small. Only a ComfyUI before 0.5
    # draws what its flag says whatever the prompt asks (test_previews.py covers what newer ones are asked).
    options = {"time_scale": TIME_SCALE, "preview_method": "taesd", "comfyui_version": "0.3.64"}
    with SimulatorThread(name="gpu-a", **options) as one, SimulatorThread(name="gpu-b", **options) as two:
        yield one, two


@pytest.fixture
def servers(transactional_db, sims):
    # One task at a time each: two tasks submitted together run at once, one on each server.
    return [Server.objects.create(name=sim.sim.name, base_url=sim.url, max_in_flight=1) for sim in sims]


@pytest.fixture
def live_settings(fast_settings):
    """The shipped intervals: progress written at most once a second, previews at most 4 a second."""
    fast_settings.COMFYHUB = {
        **fast_settings.COMFYHUB, "PROGRESS_INTERVAL": 1.0, "PUSH_INTERVAL": 0.05, "PREVIEW_FPS": 4.0
    }  # fmt: skip
    return fast_settings


@contextlib.asynccontextmanager
async def running_hub(servers):
    supervisor = Supervisor(tick=0.05)
    supervisor.http_timeout = 5.0
    runner = asyncio.create_task(supervisor.run())
    try:
        await until(lambda: Server.objects.filter(state=ServerState.ONLINE).count() == len(servers), "servers online")
        yield supervisor
    finally:
        supervisor.stop()
        await runner
        await db(connections.close_all)()


async def until(predicate, message, timeout=90.0):
    """Poll a sync (ORM) predicate from the loop until it is truthy; return its value."""
    check = sync_to_async(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.1)
    pytest.fail(f"timed out after {timeout}s waiting for {message}")


class Window:
    """One browser window of a user: its socket and every frame it received."""

    def __init__(self, communicator):
        self.communicator = communicator
        self.frames = []

    @classmethod
    async def open(cls, user):
        communicator, connected = await ws_connect(application, "/ws/tasks/", user)
        assert connected
        return cls(communicator)

    async def drain(self):
        while not await self.communicator.receive_nothing(timeout=0.01):
            self.frames.append(await self.communicator.receive_from())

    def text(self):
        return "\n".join(self.frames)

    def steps(self, task_id, of=STEPS):
        """The step numbers (of `of`) the window was shown in the task's live line."""
        shown = set()
        for frame in self.frames:
            for part in re.split(r"(?=<div class=\"task__live\")", frame):
                if f'id="task-{task_id}-live"' in part:
                    shown.update(int(step) for step in re.findall(rf"step (\d+)/{of}\b", part))
        return shown

    def previews(self):
        return [match for frame in self.frames for match in PREVIEW_SRC.findall(frame)]


async def submit(api, **inputs):
    reply = await sync_to_async(api.submit)("txt2img", {"steps": STEPS, **inputs})
    assert reply.status_code == 201, reply.content
    return reply.json()["id"]


def all_ended(task_ids):
    return Task.objects.filter(pk__in=task_ids, status__in=TERMINAL_STATUSES).count() == len(task_ids)


async def watch(windows, task_ids, timeout=90.0):
    """Read every window until the tasks have ended (and a little after: the finished rows)."""
    deadline = time.monotonic() + timeout
    ended = sync_to_async(all_ended)
    while not await ended(task_ids):
        assert time.monotonic() < deadline, "the tasks did not end"
        for window in windows:
            await window.drain()
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    for window in windows:
        await window.drain()


def decode(data):
    """(format, size, colour) of a pushed preview; the colour below the simulator's step bar is the seed's."""
    with Image.open(io.BytesIO(base64.b64decode(data))) as picture:
        width, height = picture.size
        return picture.format, picture.size, picture.convert("RGB").getpixel((width // 2, height * 3 // 4))


def nearest(color, candidates):
    return min(candidates, key=lambda owner: sum((a - b) ** 2 for a, b in zip(color, candidates[owner], strict=True)))


@pytest.mark.parametrize(
    ("frames", "layout"),
    [("type 4", "two servers"), ("type 1", "two servers"), ("type 1", "one server"), ("type 4", "one server")],
)
async def test_two_users_each_see_only_their_own_task_live(
    alice, bob, alice_api, bob_api, workflows, servers, live_settings, monkeypatch, frames, layout
):
    """
    Two servers: the tasks run at the same time, one on each. One server: both prompts are on it together, one
    running and one waiting, so that a frame given to the wrong prompt of that socket would reach the other user.
    """
    if frames == "type 1":  # as a server that does not negotiate metadata: frames name no prompt
        monkeypatch.setattr(Simulator, "_supports_preview_metadata", lambda self, sid: False)
    if layout == "one server":
        await sync_to_async(Server.objects.filter(pk=servers[0].pk).update)(max_in_flight=2)
        await sync_to_async(Server.objects.filter(pk=servers[1].pk).update)(enabled=False)
        servers = servers[:1]
    windows = {user.pk: [await Window.open(user) for _ in range(2)] for user in (alice, bob)}
    async with running_hub(servers):
        # Seeds whose preview colours are far apart: a picture shows whose it is.
        ids = {alice.pk: await submit(alice_api, seed=1), bob.pk: await submit(bob_api, seed=5)}
        await watch([*windows[alice.pk], *windows[bob.pk]], list(ids.values()))
    tasks = {task.owner_id: task for task in await sync_to_async(list)(Task.objects.filter(pk__in=ids.values()))}
    assert {task.status for task in tasks.values()} == {TaskStatus.SUCCEEDED}
    first, second = sorted(tasks.values(), key=lambda task: task.started_at)
    if layout == "two servers":
        assert first.server_id != second.server_id
        assert second.started_at < first.finished_at  # they ran at the same time
    else:
        assert first.server_id == second.server_id
        assert second.submitted_at < first.finished_at  # the second was on the server while the first ran

    colors = {owner: preview_color(task.graph["3"]["inputs"]["seed"]) for owner, task in tasks.items()}
    for owner, other in ((alice.pk, bob.pk), (bob.pk, alice.pk)):
        own, stranger = str(ids[owner]), str(ids[other])
        for window in windows[owner]:
            assert stranger not in window.text(), "a window showed another user's task"
            steps = window.steps(own)
            assert len(steps) >= 2 and max(steps) <= STEPS, steps  # the step line moved
            previews = window.previews()
            assert previews, "no preview reached the owner's window"
            assert {task_id for task_id, _, _ in previews} == {own}
            for _, mime, data in previews:
                picture_format, size, color = decode(data)
                assert mime == "image/webp" and picture_format == "WEBP" and size == (256, 256), (mime, size)
                assert nearest(color, colors) == owner, f"a window showed another user's picture: {color} {colors}"
            finished = [frame for frame in window.frames if f'id="task-{own}"' in frame and "succeeded" in frame]
            assert finished, "the window never got the finished row"
    for window in [*windows[alice.pk], *windows[bob.pk]]:
        await window.communicator.disconnect()


def stored_texts():
    """Every value of every row of the hub's tables, as text."""
    for model in [*apps.get_app_config("tasks").get_models(), *apps.get_app_config("servers").get_models()]:
        names = [field.attname for field in model._meta.concrete_fields]
        for row in model.objects.values_list(*names):
            yield model.__name__, repr(row)


async def test_previews_never_reach_the_database_or_the_media_folder(
    alice, alice_api, workflows, servers, live_settings, media_root
):
    window = await Window.open(alice)
    async with running_hub(servers):
        task_id = await submit(alice_api)
        await watch([window], [task_id])
    assert window.previews(), "no preview was pushed: nothing to look for"
    task = await sync_to_async(Task.objects.get)(pk=task_id)
    assert task.status == TaskStatus.SUCCEEDED
    assert await sync_to_async(TaskOutput.objects.filter(task=task).count)() == 1  # the SaveImage picture only
    assert set(task.progress_detail or {}) <= {"value", "node", "title", "step", "done", "total", "started", "eta_at"}
    found = [(name, row[:200]) for name, row in await sync_to_async(list)(stored_texts())
             if "UklGR" in row or "data:image" in row or "RIFF" in row]  # fmt: skip
    assert found == []
    stored = [path.name for path in media_root.rglob("*") if path.is_file()]
    assert [name for name in stored if name.endswith(".webp")] == [] and len(stored) <= 2, stored
    await window.communicator.disconnect()


async def test_progress_is_written_about_once_a_second_and_a_reload_shows_the_step(
    alice, bob, alice_api, bob_api, workflows, servers, live_settings, monkeypatch
):
    writes = []
    real = Task.set_progress

    def counting(self, progress, detail=None):
        writes.append((str(self.pk), time.monotonic(), progress))
        return real(self, progress, detail)

    monkeypatch.setattr(Task, "set_progress", counting)
    messages = {}  # prompt_id -> progress messages the socket brought
    real_handle = Tracking.handle

    async def handle(self, message):
        if message.type == "progress":
            messages[message.prompt_id] = messages.get(message.prompt_id, 0) + 1
        return await real_handle(self, message)

    monkeypatch.setattr(Tracking, "handle", handle)
    page = Client()
    await sync_to_async(page.force_login)(alice)
    steps = 2 * STEPS  # about 5 s of sampling: several write intervals
    async with running_hub(servers):
        ids = [await submit(alice_api, steps=steps), await submit(bob_api, steps=steps)]

        def row_shows_the_step():
            html = page.get(f"/tasks/{ids[0]}/row").content.decode()
            return html if re.search(rf"step \d+/{steps}", html) and "KSampler" in html else None

        row = await until(row_shows_the_step, "the stored row to show the sampler's step")
        assert "nodes done" in row and "running for" in row
        detail = (await sync_to_async(page.get)(f"/tasks/{ids[0]}/")).content.decode()
        assert re.search(rf"step \d+/{steps}", detail)  # a reload of the task's page shows it too
        await until(lambda: all_ended(ids), "the tasks to end")
    prompts = dict(await sync_to_async(list)(Task.objects.filter(pk__in=ids).values_list("pk", "prompt_id")))
    for task_id in ids:
        times = [at for written, at, _ in writes if written == task_id]
        assert len(times) >= 2, writes
        # Leading edge, then at most one a second, then the final flush; not one per progress message.
        assert len(times) <= (times[-1] - times[0]) / 1.0 + 2, times
        assert messages[prompts[uuid.UUID(task_id)]] >= steps and len(times) < steps / 4, (messages, times)


async def test_a_task_cancelled_mid_run_keeps_the_newest_progress(
    alice, alice_api, workflows, servers, live_settings, monkeypatch
):
    # Written once when it starts and then not for 30 s: only the flush at the end can bring the newest value.
    live_settings.COMFYHUB = {**live_settings.COMFYHUB, "PROGRESS_INTERVAL": 30.0}
    at_end = {}
    real_ended = Tracking.ended

    async def ended(self, task, tracker, source):
        at_end[str(task.pk)] = (tracker.value, tracker.steps)
        return await real_ended(self, task, tracker, source)

    monkeypatch.setattr(Tracking, "ended", ended)
    window = await Window.open(alice)
    async with running_hub(servers):
        task_id = await submit(alice_api, steps=100)
        for _ in range(600):  # until the window shows the sampler past step 10
            await window.drain()
            if any(step > 10 for step in window.steps(task_id, of=100)):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail(f"the sampler never got past step 10: {window.frames[-3:]}")
        reply = await sync_to_async(alice_api.post)(f"/api/v1/tasks/{task_id}/cancel")
        assert reply.status_code in (200, 202), reply.content
        await until(lambda: all_ended([task_id]), "the task to be cancelled")
    task = await sync_to_async(Task.objects.get)(pk=task_id)
    assert task.status == TaskStatus.CANCELLED
    value, steps = at_end[task_id]
    assert steps is not None and steps[0] > 10
    assert task.progress == pytest.approx(min(value, 0.99), abs=1e-4)
    assert task.progress_detail["step"] == steps
    await window.communicator.disconnect()
