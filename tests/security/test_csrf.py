"""Forms and session-authenticated API writes refuse a POST without a CSRF token, and change nothing."""

import io
import json

import pytest
from django.test import Client
from PIL import Image

from tasks.models import Task, TaskStatus, Upload
from tests.conftest import ApiClient

pytestmark = pytest.mark.django_db

FORM = {
    "prompt": "a fox", "negative": "", "seed": "", "seed_random": "on", "steps": "12", "cfg": "7.5",
    "sampler": "euler", "width": "512", "height": "512",
}


@pytest.fixture(autouse=True)
def fast_hashing(settings):
    # Users are made with passwords; the default hasher takes a quarter of a second on purpose.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]



@pytest.fixture
def alice_browser(alice):
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    return client


@pytest.fixture
def queued(alice, workflows):
    return Task.objects.create(owner=alice, workflow=workflows["fast"], graph=workflows["fast"].graph)


def csrf_token(client):
    client.get("/workflows/txt2img/")
    return client.cookies["csrftoken"].value


def png():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    buffer.seek(0)
    buffer.name = "x.png"
    return buffer


def test_forms_refuse_a_post_without_a_token(alice_browser, queued):
    assert alice_browser.post("/workflows/txt2img/", FORM).status_code == 403
    assert alice_browser.post(f"/tasks/{queued.pk}/cancel").status_code == 403
    assert alice_browser.post(f"/tasks/{queued.pk}/rerun").status_code == 403
    assert alice_browser.post(f"/tasks/{queued.pk}/rerun", {"new_seed": "1"}).status_code == 403
    assert alice_browser.post("/accounts/logout/").status_code == 403
    queued.refresh_from_db()
    assert queued.status == TaskStatus.QUEUED and queued.cancel_requested_at is None
    assert Task.objects.count() == 1
    assert alice_browser.get("/").status_code == 200, "the refused logout logged her out anyway"


def test_a_wrong_token_is_refused_too(alice_browser, queued):
    csrf_token(alice_browser)
    reply = alice_browser.post(f"/tasks/{queued.pk}/cancel", {"csrfmiddlewaretoken": "x" * 32})
    assert reply.status_code == 403
    queued.refresh_from_db()
    assert queued.cancel_requested_at is None


def test_the_same_posts_with_the_token_go_through(alice_browser, queued):
    """The control: the refusals above are the CSRF check, not something else."""
    token = {"csrfmiddlewaretoken": csrf_token(alice_browser)}
    assert alice_browser.post("/workflows/txt2img/", {**FORM, **token}).status_code == 302
    assert alice_browser.post(f"/tasks/{queued.pk}/rerun", token).status_code == 302
    assert alice_browser.post(f"/tasks/{queued.pk}/cancel", token).status_code == 302
    queued.refresh_from_db()
    assert queued.status == TaskStatus.CANCELLED
    assert alice_browser.post("/accounts/logout/", token).status_code == 302
    assert alice_browser.get("/")["Location"].startswith("/accounts/login/")


def test_session_api_writes_need_the_csrf_header(alice_browser, queued, workflows):
    body = json.dumps({"workflow": "fast", "inputs": {}})
    reply = alice_browser.post("/api/v1/tasks", body, content_type="application/json")
    assert reply.status_code == 403 and reply.json()["error"]["code"] == "csrf_failed"
    assert alice_browser.post(f"/api/v1/tasks/{queued.pk}/cancel").status_code == 403
    assert alice_browser.post("/api/v1/uploads", {"image": png()}).status_code == 403
    queued.refresh_from_db()
    assert queued.cancel_requested_at is None
    assert Task.objects.count() == 1 and Upload.objects.count() == 0

    token = csrf_token(alice_browser)
    reply = alice_browser.post("/api/v1/tasks", body, content_type="application/json", HTTP_X_CSRFTOKEN=token)
    assert reply.status_code == 201


def test_bearer_token_writes_need_no_csrf_token(alice, workflows):
    api = ApiClient(alice)
    api.client = Client(enforce_csrf_checks=True, HTTP_AUTHORIZATION=f"Bearer {api.token}")
    assert api.submit("fast").status_code == 201
