"""
The websockets, through the project's real ASGI application (origin check, session auth, routing): a page on
another site cannot open them in a logged-in user's name, even with the user's session cookie.
"""

import pytest
from channels.testing import WebsocketCommunicator
from django.test import Client

from comfyhub.asgi import application
from tests.conftest import make_user

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

FOREIGN_ORIGINS = [b"http://evil.example", b"https://testserver.evil.example", b"null"]
OWN_ORIGINS = [b"http://testserver", b"http://127.0.0.1:8000", b"http://localhost:8000"]


@pytest.fixture(autouse=True)
def fast_hashing(settings):
    # Users are made with passwords; the default hasher takes a quarter of a second on purpose.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]



def session_cookie(user):
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


@pytest.fixture
def alice_cookie(alice):
    return session_cookie(alice)


@pytest.fixture
def operator_cookie(db):
    return session_cookie(make_user("olivia", is_staff=True))


async def opens(path, origin=None, cookie=None):
    headers = [(b"host", b"testserver")]
    if origin is not None:
        headers.append((b"origin", origin))
    if cookie is not None:
        headers.append((b"cookie", cookie))
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, _ = await communicator.connect(timeout=5)
    # A refused socket's consumer only waits to be told the socket is gone: no need to wait for it long.
    await communicator.disconnect(timeout=1 if connected else 0.1)
    return connected


async def test_a_foreign_origin_is_refused_even_with_a_session(alice_cookie, operator_cookie):
    for origin in FOREIGN_ORIGINS:
        assert not await opens("/ws/tasks/", origin, alice_cookie), origin
        assert not await opens("/ws/ops/", origin, operator_cookie), origin


async def test_no_origin_is_refused(alice_cookie):
    assert not await opens("/ws/tasks/", None, alice_cookie)


async def test_the_hubs_own_origin_is_accepted_for_a_logged_in_user(alice_cookie, operator_cookie):
    for origin in OWN_ORIGINS:
        assert await opens("/ws/tasks/", origin, alice_cookie), origin
        assert await opens("/ws/ops/", origin, operator_cookie), origin


async def test_the_own_origin_without_a_session_is_refused():
    assert not await opens("/ws/tasks/", b"http://testserver")
    assert not await opens("/ws/ops/", b"http://testserver")


async def test_a_normal_user_cannot_open_the_ops_socket(alice_cookie):
    assert not await opens("/ws/ops/", b"http://testserver", alice_cookie)
