"""
Every URL that takes an object id, found in the URLconf rather than listed here, refuses another user's objects.

A new URL with an id in it is covered the day it is added: bob asks for it with each of alice's ids and must get a
404 (or a staff-only refusal), never her data; anonymous visitors are sent to the login page (or get a 401 from
the API). A parameter of a kind this test does not know fails it, until someone says here what it holds.
"""

import io
import re
import uuid

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from django.urls.converters import IntConverter, UUIDConverter
from django.urls.resolvers import RoutePattern
from PIL import Image

from servers.models import Server
from tasks import outputs
from tasks.models import ApiToken, Task, TaskStatus
from tasks.submission import store_upload
from tasks.v2.assets import output_asset
from tests.conftest import ApiClient

pytestmark = pytest.mark.django_db

SECRET_PROMPT = "alice-secret-prompt-7f3a"
SECRET_OUTPUT = "alice-secret-output.png"
SECRET_UPLOAD = "alice-secret-upload.png"

# Routes whose parameters are not ids of anyone's objects, and why. Anything else with a parameter must take ids.
NOT_OWNED = {
    "submit": "a workflow slug: workflows are shared by every user (?from=<task> is tested below)",
    "api-workflow": "a workflow slug: workflows are shared by every user; a disabled one is a 404 to all",
    "password_reset_confirm": "a signed token from a reset e-mail, checked by Django",
    # The pool's servers belong to no user; these staff-only POSTs answer 404 to everyone else
    # (tests/ops/test_actions.py).
    "ops-server-drain": "a server's name",
    "ops-server-undrain": "a server's name",
    "ops-server-probe": "a server's name",
    # Looked up among the caller's own assets only; another user's hash is a 404 (tests/v2/test_assets.py).
    "asset_by_hash": "a content hash, answered from the caller's own assets",
}
SKIPPED_PREFIXES = ("admin/", "static/", "media/")


@pytest.fixture(autouse=True)
def fast_hashing(settings):
    # Users are made with passwords; the default hasher takes a quarter of a second on purpose.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]



def png_bytes(color=(10, 200, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buffer, "PNG")
    return buffer.getvalue()


class NamedBytes(io.BytesIO):
    def __init__(self, data, name):
        super().__init__(data)
        self.name = name
        self.size = len(data)


def walk(patterns, prefix="", converters=None):
    """(route, name, {parameter: converter}) of every URL pattern under `patterns`, includes flattened."""
    for entry in patterns:
        if (prefix + str(entry.pattern)).startswith(SKIPPED_PREFIXES):
            continue
        if not isinstance(entry.pattern, RoutePattern):
            pytest.fail(f"{prefix}{entry.pattern} is a regex route: teach this test how to fill it in")
        route = prefix + str(entry.pattern)
        found = {**(converters or {}), **entry.pattern.converters}
        if isinstance(entry, URLResolver):
            yield from walk(entry.url_patterns, route, found)
        elif isinstance(entry, URLPattern):
            yield route, entry.name, found


def id_routes():
    routes = []
    for route, name, converters in walk(get_resolver().url_patterns):
        if not converters:
            continue
        if name in NOT_OWNED:
            continue
        strange = {param: type(conv).__name__ for param, conv in converters.items()
                   if not isinstance(conv, UUIDConverter | IntConverter)}
        assert not strange, (
            f"/{route} takes {strange}: say in NOT_OWNED why it needs no ownership check, or make it an id"
        )
        routes.append((route, converters))
    return routes


def fill(route, converters, value):
    return "/" + re.sub(r"<(?:\w+:)?(\w+)>", lambda m: str(value), route)


@pytest.fixture
def alices_things(alice, workflows):
    """One of alice's objects of every kind an id can name, each carrying a secret that must not leak."""
    server = Server.objects.create(name="gpu-own", base_url="http://127.0.0.1:9")
    upload = store_upload(alice, NamedBytes(png_bytes(), SECRET_UPLOAD))
    queued = Task.objects.create(
        owner=alice, workflow=workflows["txt2img"], graph=workflows["txt2img"].graph,
        inputs={"prompt": SECRET_PROMPT},
    )
    finished = Task.objects.create(
        owner=alice, workflow=workflows["upload-scale"], graph=workflows["upload-scale"].graph,
        inputs={"image": str(upload.pk), "scale_by": 0.5}, status=TaskStatus.RUNNING, server=server,
        prompt_id="p-alice",
    )
    assert outputs.complete(finished, [("9", SECRET_OUTPUT, "image/png", png_bytes((1, 2, 3)))], "test")
    token, _ = ApiToken.issue(alice)
    asset = output_asset(finished.outputs.get())  # the v2 API's view of her output
    return {
        "uuid": [queued.pk, finished.pk, finished.outputs.get().pk, upload.pk, asset.pk],
        "int": [event.pk for event in finished.events.all()] + [token.pk],
        "queued": queued,
    }


def ids_for(converters, things):
    kinds = {"int" if isinstance(conv, IntConverter) else "uuid" for conv in converters.values()}
    return [value for kind in sorted(kinds) for value in things[kind]]


def refused(reply):
    if reply.status_code in (403, 404, 405):
        return True
    location = reply.get("Location", "")
    return reply.status_code == 302 and location.startswith(("/accounts/login/", "/admin/login/"))


def body(reply):
    if not hasattr(reply, "_body"):
        reply._body = b"".join(reply.streaming_content) if reply.streaming else reply.content
    return reply._body


def leaks(reply):
    return [secret for secret in (SECRET_PROMPT, SECRET_OUTPUT, SECRET_UPLOAD) if secret.encode() in body(reply)]


def test_the_walk_finds_the_id_urls():
    routes = {route for route, _ in id_routes()}
    # A walk that silently found nothing would make every test below pass.
    assert {"tasks/<uuid:pk>/", "api/v1/tasks/<uuid:pk>", "outputs/<uuid:pk>/", "uploads/<uuid:pk>/"} <= routes
    assert len(routes) >= 10


def test_other_users_get_nothing_from_any_id_url(alice, bob, admin_user, alices_things):
    bob_pages = Client()
    bob_pages.force_login(bob)
    bob_api = ApiClient(bob).client
    tasks_before = Task.objects.count()
    for route, converters in id_routes():
        # v1 takes a session or a token; v2 only a bearer token (a session gets its 401, which tells nothing).
        clients = [bob_pages, bob_api] if route.startswith("api/") else [bob_pages]
        if route.startswith("api/v2/"):
            clients = [bob_api]
        exercised = False
        for client in clients:
            for value in ids_for(converters, alices_things):
                path = fill(route, converters, value)
                for method in (client.get, client.post):
                    reply = method(path)
                    answer = f"{reply.status_code} {body(reply)[:200]}"
                    assert refused(reply), f"bob got {answer} from {method.__name__} {path}"
                    assert not leaks(reply), f"{path} showed bob {leaks(reply)}"
                    exercised = exercised or reply.status_code != 405
        assert exercised, f"/{route} answered 405 to every method: the ownership check was never reached"
    queued = Task.objects.get(pk=alices_things["queued"].pk)
    assert queued.status == TaskStatus.QUEUED and queued.cancel_requested_at is None
    assert Task.objects.count() == tasks_before


def bearer_client(user, avoid):
    """
    A client with a fresh token of `user` whose id is none of `avoid`: the walk POSTs /account/tokens/<int>/revoke
    with every int id it uses, and an event's id may equal a token's (each table counts on its own).
    """
    while True:
        token, secret = ApiToken.issue(user)
        if token.pk not in avoid:
            return Client(HTTP_AUTHORIZATION=f"Bearer {secret}")


def test_the_ids_used_are_real(alice, admin_user, alices_things):
    """The refusals above are ownership checks, not ids that match nothing: the owner (or staff) gets through."""
    owners = [Client(), Client(), bearer_client(alice, alices_things["int"])]
    owners[0].force_login(alice)
    owners[1].force_login(admin_user)
    for route, converters in id_routes():
        answers = [
            method(fill(route, converters, value)).status_code
            for client in owners
            for value in ids_for(converters, alices_things)
            for method in (client.get, client.post)
        ]
        assert any(status in (200, 201, 302, 409) for status in answers), f"/{route}: nobody got in: {answers}"


def test_anonymous_visitors_are_sent_to_log_in(alices_things):
    anonymous = Client()
    for route, converters in id_routes():
        api = route.startswith("api/")
        asked_to_log_in = False
        for value in ids_for(converters, alices_things):
            path = fill(route, converters, value)
            for method in (anonymous.get, anonymous.post):
                reply = method(path)
                assert not leaks(reply)
                if reply.status_code == 405:
                    continue
                if api:
                    assert reply.status_code == 401, f"{method.__name__} {path}: {reply.status_code}"
                else:
                    assert reply.status_code == 302, f"{method.__name__} {path}: {reply.status_code}"
                    assert reply["Location"].startswith(("/accounts/login/?next=", "/admin/login/?next="))
                asked_to_log_in = True
        assert asked_to_log_in, f"/{route}: never asked an anonymous visitor to log in"


def test_edit_and_run_does_not_start_from_another_users_task(bob, alices_things):
    client = Client()
    client.force_login(bob)
    reply = client.get(f"/workflows/txt2img/?from={alices_things['queued'].pk}")
    assert reply.status_code == 200
    assert SECRET_PROMPT not in reply.content.decode()


def test_a_random_id_is_a_404_like_another_users(alice):
    client = Client()
    client.force_login(alice)
    assert client.get(f"/tasks/{uuid.uuid4()}/").status_code == 404
