"""JSON API v1: workflow discovery, the listing's filters and bounds, idempotency conflicts, errors in plain words."""


import pytest

from tasks.models import Task

pytestmark = pytest.mark.django_db


# --- Idempotency ------------------------------------------------------------------------------------------------


def test_the_same_key_with_the_same_body_in_another_order_returns_the_task(alice_api, workflows):
    first = alice_api.submit("invert", {"color": 255}, idempotency_key="job-1")
    assert first.status_code == 201
    reordered = '{"idempotency_key": "job-1",  "inputs": {"color": 255}, "workflow": "invert"}'
    again = alice_api.client.post("/api/v1/tasks", reordered, content_type="application/json")
    assert again.status_code == 200, again.content
    assert again.json()["id"] == first.json()["id"]
    assert Task.objects.count() == 1


def test_the_same_key_with_another_body_is_a_409_that_changes_nothing(alice_api, workflows):
    first = alice_api.submit("invert", {"color": 255}, idempotency_key="job-1").json()
    reply = alice_api.submit("invert", {"color": 0}, idempotency_key="job-1")
    assert reply.status_code == 409
    body = reply.json()["error"]
    assert body["code"] == "idempotency_key_reused"
    assert body["message"] == "This idempotency key was used for another request."
    assert first["id"] in body["details"]["idempotency_key"]
    assert Task.objects.count() == 1
    assert Task.objects.get().inputs["color"] == 255


def test_another_users_key_is_not_a_conflict(alice_api, bob_api, workflows):
    alice_api.submit("invert", {"color": 255}, idempotency_key="job-1")
    reply = bob_api.submit("invert", {"color": 0}, idempotency_key="job-1")
    assert reply.status_code == 201
    assert Task.objects.filter(owner=bob_api.user).get().inputs["color"] == 0


def test_a_task_stored_before_bodies_were_kept_answers_its_key(alice_api, workflows):
    first = alice_api.submit("invert", {"color": 255}, idempotency_key="job-1").json()
    Task.objects.update(idempotency_body="")
    reply = alice_api.submit("invert", {"color": 0}, idempotency_key="job-1")
    assert reply.status_code == 200
    assert reply.json()["id"] == first["id"]
