"""GET /api/v2/jobs/{id}/events through Django's real ASGI handler, fed by the live path's facts."""

import asyncio
import json

import pytest
from asgiref.sync import sync_to_async
from asgiref.testing import ApplicationCommunicator
from channels.layers import get_channel_layer
from django.core.asgi import get_asgi_application
from django.utils import timezone

from tasks.live import apush, preview_fact, progress_detail, progress_fact
from tasks.models import Task
from tasks.progress import emit_task_update, user_group

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


class Stream:
    """One SSE request as a client makes it: the response head, then frames as they come, then a disconnect."""

    def __init__(self, path, token):
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": [(b"host", b"testserver"), (b"authorization", f"Bearer {token}".encode())],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }
        self.app = ApplicationCommunicator(get_asgi_application(), scope)
        self.buffer = ""
        self.ended = False

    async def open(self):
        await self.app.send_input({"type": "http.request", "body": b"", "more_body": False})
        start = await self.app.receive_output(timeout=5)
        return start["status"], dict(start["headers"])

    async def event(self, timeout=5):
        """The next (event, data) frame; keep-alive comments skipped; None once the response has ended."""
        while "\n\n" not in self.buffer:
            if self.ended:
                return None
            message = await self.app.receive_output(timeout=timeout)
            self.buffer += message.get("body", b"").decode()
            self.ended = not message.get("more_body", False)
        block, self.buffer = self.buffer.split("\n\n", 1)
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if not fields:
            return await self.event(timeout)
        return fields["event"], json.loads(fields["data"])

    async def disconnect(self):
        await self.app.send_input({"type": "http.disconnect"})
        await self.app.wait(timeout=5)


async def members(owner_id):
    """The channels in the owner's group, on whichever layer the suite runs (in memory, or Redis's two layers)."""
    layer, group = get_channel_layer(), user_group(owner_id)
    if hasattr(layer, "_get_layer"):  # channels_redis' pubsub layer: this loop's subscriptions
        inner = layer._get_layer()
        return set(inner.groups.get(inner._get_group_channel_name(group), ()))
    if hasattr(layer, "_group_key"):  # channels_redis' core layer: a sorted set in Redis
        connection = layer.connection(layer.consistent_hash(group))
        return {name.decode() for name in await connection.zrange(layer._group_key(group), 0, -1)}
    return set(layer.groups.get(group, {}))


async def left_empty(owner_id, timeout=5.0):
    """Whether the owner's group empties within `timeout` (leaving takes a round trip on Redis)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while await members(owner_id):
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@sync_to_async
def submit(api):
    reply = api.submit()
    assert reply.status_code == 201, reply.content
    return reply.json()["id"]


@sync_to_async
def start_running(task_id):
    Task.objects.filter(pk=task_id).update(status="running", prompt_id="p-1", started_at=timezone.now())
    emit_task_update(Task.objects.get(pk=task_id))


@sync_to_async
def succeed(task_id):
    assert Task.objects.get(pk=task_id).mark_succeeded("websocket")


async def test_the_stream_follows_a_job_from_queued_to_its_end_and_closes(alice_v2):
    task_id = await submit(alice_v2)
    owner = alice_v2.user.pk
    stream = Stream(f"/api/v2/jobs/{task_id}/events", alice_v2.token)
    status, headers = await stream.open()
    assert status == 200 and headers[b"Content-Type"].startswith(b"text/event-stream")
    assert await stream.event() == ("status", {"status": "queued", "queue_position": 1})
    assert len(await members(owner)) == 1  # joined the owner's group, with a channel of its own

    await start_running(task_id)
    assert await stream.event() == ("status", {"status": "running", "queue_position": None})
    detail = progress_detail(value=0.5, node="3", title="KSampler", step=(5, 10), done=1, total=3)
    await apush(owner, progress_fact("another-task", owner, {**detail, "value": 0.9}))  # not this job's
    await apush(owner, progress_fact(task_id, owner, detail))
    kind, progress = await stream.event()
    assert kind == "progress"
    assert progress["value"] == 0.5 and progress["step"] == 5 and progress["steps"] == 10
    assert progress["nodes_done"] == 1 and progress["nodes_total"] == 3 and progress["message"] == "KSampler 5/10"
    await apush(owner, preview_fact(task_id, owner, b"\xff\xd8jpeg", "image/jpeg", (8, 8)))
    kind, preview = await stream.event()
    assert kind == "preview" and preview["content_type"] == "image/jpeg" and preview["data_base64"] == "/9hqcGVn"

    await succeed(task_id)
    assert await stream.event() == ("status", {"status": "succeeded", "queue_position": None})
    assert await stream.event() is None  # the stream ends after the terminal status
    await stream.app.wait(timeout=5)
    assert await left_empty(owner)


async def test_a_stream_of_an_ended_job_says_so_and_closes(alice_v2):
    task_id = await submit(alice_v2)
    await sync_to_async(lambda: Task.objects.get(pk=task_id).request_cancel())()
    stream = Stream(f"/api/v2/jobs/{task_id}/events", alice_v2.token)
    assert (await stream.open())[0] == 200
    assert await stream.event() == ("status", {"status": "canceled", "queue_position": None})
    assert await stream.event() is None


async def test_a_client_that_goes_away_leaves_the_group(alice_v2):
    task_id = await submit(alice_v2)
    streams = [Stream(f"/api/v2/jobs/{task_id}/events", alice_v2.token) for _ in range(12)]
    for stream in streams:  # more than a browser's 8 connections: no cap
        assert (await stream.open())[0] == 200
        assert (await stream.event())[0] == "status"
    assert len(await members(alice_v2.user.pk)) == 12
    for stream in streams:
        await stream.disconnect()
    assert await left_empty(alice_v2.user.pk)


async def test_another_users_stream_is_not_found(alice_v2, bob_v2):
    task_id = await submit(alice_v2)
    stream = Stream(f"/api/v2/jobs/{task_id}/events", bob_v2.token)
    status, _ = await stream.open()
    assert status == 404
    body = await stream.app.receive_output(timeout=5)
    assert json.loads(body["body"])["error"]["code"] == "not_found"
    assert await members(alice_v2.user.pk) == set()
