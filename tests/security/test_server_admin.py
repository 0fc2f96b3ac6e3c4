"""
Where a server's URL can be changed: only in the admin, and only by staff holding servers.change_server. The
hub fetches whatever a server's base URL points at, so whoever may change it may point the hub anywhere.
"""

import re
import uuid

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver

from servers.models import Server
from tests.conftest import make_user

pytestmark = pytest.mark.django_db

EVIL = "http://169.254.169.254:80"


@pytest.fixture(autouse=True)
def fast_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def gpu(db):
    return Server.objects.create(name="gpu-1", base_url="http://10.1.2.3:8188")


def browser(user):
    client = Client()
    client.force_login(user)
    return client


def change_form(server, **changes):
    data = {
        "name": server.name, "base_url": server.base_url, "enabled": "on", "weight": "1.0",
        "pipeline_depth": "2", "max_in_flight": "3",
        "events-TOTAL_FORMS": "0", "events-INITIAL_FORMS": "0", "events-MIN_NUM_FORMS": "0",
        "events-MAX_NUM_FORMS": "1000",
    }
    data.update(changes)
    return data


def staff_with(*codenames):
    user = make_user(f"staff-{uuid.uuid4().hex[:6]}", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    return user


def test_normal_users_cannot_reach_the_admin(alice, gpu):
    client = browser(alice)
    change = f"/admin/servers/server/{gpu.pk}/change/"
    for reply in (client.get("/admin/"), client.get(change), client.post(change, change_form(gpu, base_url=EVIL))):
        assert reply.status_code == 302 and reply["Location"].startswith("/admin/login/")
    gpu.refresh_from_db()
    assert gpu.base_url == "http://10.1.2.3:8188"


def test_staff_without_the_permission_cannot_change_a_server(gpu):
    for user in (staff_with(), staff_with("view_server")):
        client = browser(user)
        change = f"/admin/servers/server/{gpu.pk}/change/"
        assert client.post(change, change_form(gpu, base_url=EVIL)).status_code == 403
        added = client.post("/admin/servers/server/add/", change_form(gpu, name="gpu-2", base_url=EVIL))
        assert added.status_code == 403
        gpu.refresh_from_db()
        assert gpu.base_url == "http://10.1.2.3:8188"
        assert Server.objects.count() == 1
    # Without even the view permission the page itself is refused.
    assert browser(staff_with()).get(f"/admin/servers/server/{gpu.pk}/change/").status_code == 403


def test_staff_with_the_permission_can(gpu):
    """The control: the refusals above are the permission check, not a form that could never be valid."""
    client = browser(staff_with("view_server", "change_server"))
    reply = client.post(f"/admin/servers/server/{gpu.pk}/change/", change_form(gpu, base_url="http://10.9.9.9:8188"))
    assert reply.status_code == 302, reply.content.decode()[-3000:]
    gpu.refresh_from_db()
    assert gpu.base_url == "http://10.9.9.9:8188"


def every_route(patterns, prefix=""):
    for entry in patterns:
        route = prefix + str(entry.pattern)
        if isinstance(entry, URLResolver):
            yield from every_route(entry.url_patterns, route)
        elif isinstance(entry, URLPattern):
            yield route


def test_no_page_outside_the_admin_changes_a_server(admin_user, gpu, workflows):
    """Every non-admin URL, posted to by a superuser with a server's fields: no server changes."""
    before = list(Server.objects.values())
    fields = {"name": "gpu-1", "base_url": EVIL, "enabled": "", "draining": "on", "weight": "9", "id": gpu.pk}
    routes = [route for route in every_route(get_resolver().url_patterns) if not route.startswith("admin/")]
    assert len(routes) > 20
    for route in routes:
        for value in (gpu.pk, uuid.uuid4(), "txt2img"):
            path = "/" + re.sub(r"<(?:\w+:)?\w+>", str(value), route)
            client = browser(admin_user)
            client.post(path, fields)
            client.post(path, {**fields, "id": str(gpu.pk)}, content_type="application/json")
            client.put(path, fields, content_type="application/json")
            client.patch(path, fields, content_type="application/json")
    assert list(Server.objects.values()) == before
