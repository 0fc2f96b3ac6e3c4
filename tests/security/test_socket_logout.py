"""
A live socket ends with the sign-in that opened it: logging out closes that session's sockets (and only them), a
password change closes every socket of that user, and a closed socket receives nothing more.

The sockets go through the project's real ASGI application (origin check, session cookie, AuthMiddlewareStack)
with the session cookie of a Django test client, which logs out and changes passwords through the real views.
Run with REDIS_URL set, the closes cross the Redis channel layer.
"""

import asyncio

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.core.cache import cache
from django.test import Client

from comfyhub.asgi import application
from tasks.models import Task, TaskStatus
from tasks.progress import aemit_ops_update, aemit_task_update
from tasks.sockets import SIGNED_OUT, ended_key
from tests.conftest import make_user

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def fast_hashing(settings):
    # Users are made with passwords; the default hasher takes a quarter of a second on purpose.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def push_fast(settings):
    settings.COMFYHUB = {**settings.COMFYHUB, "PUSH_INTERVAL": 0.1}


@sync_to_async
def signed_in(user):
    """A browser of its own (a test client with its own session), signed in as `user`."""
    browser = Client()
    browser.force_login(user)
    return browser


def cookie(browser):
    return f"sessionid={browser.cookies['sessionid'].value}".encode()


async def open_socket(browser, path="/ws/tasks/"):
    headers = [(b"host", b"testserver"), (b"origin", b"http://testserver"), (b"cookie", cookie(browser))]
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, _ = await communicator.connect(timeout=5)
    return communicator, connected


async def close_code(communicator, timeout=3.0):
    """The code the hub closed the socket with; fails if it sent a frame first or did not close."""
    message = await communicator.receive_output(timeout=timeout)
    assert message["type"] == "websocket.close", message
    return message.get("code")


async def frames(communicator, wait=0.4):
    await asyncio.sleep(wait)
    received = []
    while not await communicator.receive_nothing(timeout=0.05):
        received.append(await communicator.receive_output())
    return received


@sync_to_async
def make_task(owner, **fields):
    return Task.objects.create(owner=owner, graph={}, status=TaskStatus.RUNNING, **fields)


@sync_to_async
def log_out(browser):
    assert browser.post("/accounts/logout/").status_code in (200, 302)


@sync_to_async
def change_password(browser, user):
    reply = browser.post(
        "/accounts/password_change/",
        {
            "old_password": f"{user.username}-pass-123",
            "new_password1": "a-new-long-password-9",
            "new_password2": "a-new-long-password-9",
        },
    )
    assert reply.status_code == 302, reply.content.decode()[:500]


@pytest.fixture
def carol(db):
    return make_user("carol")


async def test_logging_out_closes_that_sessions_socket_and_nothing_reaches_it_after(alice):
    browser = await signed_in(alice)
    socket, connected = await open_socket(browser)
    assert connected
    await log_out(browser)
    assert await close_code(socket) == SIGNED_OUT
    task = await make_task(alice)
    await aemit_task_update(task)
    assert await frames(socket) == []
    await socket.disconnect()
    # The same cookie opens nothing now: the session is gone.
    again, connected = await open_socket(browser)
    assert not connected
    await again.disconnect(timeout=0.1)


async def test_another_session_of_the_same_user_stays_open(alice):
    laptop, phone = await signed_in(alice), await signed_in(alice)
    on_laptop, _ = await open_socket(laptop)
    on_phone, _ = await open_socket(phone)
    await log_out(laptop)
    assert await close_code(on_laptop) == SIGNED_OUT
    task = await make_task(alice)
    await aemit_task_update(task)
    [frame] = await frames(on_phone)
    assert frame["type"] == "websocket.send" and f'id="task-{task.pk}"' in frame["text"]
    await on_laptop.disconnect()
    await on_phone.disconnect()


async def test_a_password_change_closes_every_socket_of_that_user_only(alice, bob):
    laptop, phone, bobs = await signed_in(alice), await signed_in(alice), await signed_in(bob)
    sockets = [(await open_socket(browser))[0] for browser in (laptop, laptop, phone)]
    bob_socket, _ = await open_socket(bobs)
    await change_password(laptop, alice)
    for socket in sockets:
        assert await close_code(socket) == SIGNED_OUT
        await socket.disconnect()
    # Bob's socket is untouched and still receives his tasks.
    task = await make_task(bob)
    await aemit_task_update(task)
    [frame] = await frames(bob_socket)
    assert f'id="task-{task.pk}"' in frame["text"]
    await bob_socket.disconnect()
    # The session that changed the password was given the new auth hash: it opens a socket again. The other
    # session is invalid now and is refused.
    again, connected = await open_socket(laptop)
    assert connected
    await again.disconnect()
    refused, connected = await open_socket(phone)
    assert not connected
    await refused.disconnect(timeout=0.1)


async def test_a_frame_waiting_for_its_push_is_dropped_at_logout(alice, settings):
    from tasks.consumers import UserFeed

    browser = await signed_in(alice)
    socket, _ = await open_socket(browser)
    task = await make_task(alice)
    await aemit_task_update(task)
    [first] = await frames(socket, wait=0.3)
    assert first["type"] == "websocket.send"
    # A client that reads slowly: the next frame takes a second to go out, and one more waits behind it. The logout
    # comes first, and neither goes out.
    [window] = UserFeed.feeds[alice.pk].sockets
    send = window.send

    async def slowly(*args, **kwargs):
        await asyncio.sleep(1.0)
        await send(*args, **kwargs)

    window.send = slowly
    await aemit_task_update(task)
    await asyncio.sleep(0.05)
    await aemit_task_update(task)
    await asyncio.sleep(0.05)
    await log_out(browser)
    assert await close_code(socket) == SIGNED_OUT
    assert await frames(socket, wait=1.2) == []
    await socket.disconnect()


async def test_the_ops_dashboard_socket_closes_at_logout_and_password_change(db, monkeypatch):
    from ops import consumers

    monkeypatch.setattr(consumers, "REFRESH_SECONDS", 60.0)  # only the update below makes a frame
    olivia = await sync_to_async(make_user)("olivia", is_staff=True)
    first, second = await signed_in(olivia), await signed_in(olivia)
    dashboard, connected = await open_socket(first, "/ws/ops/")
    assert connected
    other, _ = await open_socket(second, "/ws/ops/")
    await frames(dashboard)  # the pool as it is when the socket opens
    await frames(other)
    await log_out(first)
    assert await close_code(dashboard) == SIGNED_OUT
    await aemit_ops_update()
    assert await frames(dashboard, wait=1.2) == []
    assert len(await frames(other, wait=0)) == 1  # the other session's dashboard is live
    await dashboard.disconnect()
    await change_password(second, olivia)
    assert await close_code(other) == SIGNED_OUT
    await other.disconnect()


async def test_a_socket_whose_handshake_raced_a_logout_is_refused(alice):
    """The close went out before this socket joined its session's group: the hub remembers the logout."""
    browser = await signed_in(alice)
    session_key = browser.cookies["sessionid"].value
    await cache.aset(ended_key(session_key), True, 60)  # what the logout leaves behind before the session is gone
    socket, connected = await open_socket(browser)
    assert not connected
    await socket.disconnect(timeout=0.1)


async def test_deactivating_a_user_closes_their_sockets(alice, carol):
    browser = await signed_in(alice)
    socket, _ = await open_socket(browser)
    carols, _ = await open_socket(await signed_in(carol))
    alice.is_active = False
    await alice.asave()
    assert await close_code(socket) == SIGNED_OUT
    await socket.disconnect()
    # Saving a user without touching the password (the last_login update at every login) closes nothing.
    carol.first_name = "Carol"
    await carol.asave()
    await carol.asave(update_fields=["last_login"])
    assert await carols.receive_nothing(timeout=0.3)
    await carols.disconnect()
