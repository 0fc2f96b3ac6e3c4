"""JSON API v1: workflow discovery, the listing's filters and bounds, idempotency conflicts, errors in plain words."""


import pytest

from tasks.models import Task, TaskStatus

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


# --- Listing: status filters and bounds -------------------------------------------------------------------------


def listed(api, query):
    reply = api.get(f"/api/v1/tasks?{query}")
    assert reply.status_code == 200, reply.content
    return [task["id"] for task in reply.json()["tasks"]]


def test_the_list_filters_by_active_and_every_status(alice_api, bob_api, workflows):
    waiting = alice_api.submit("fast", {}).json()["id"]
    running = alice_api.submit("fast", {}).json()["id"]
    Task.objects.filter(pk=running).update(status=TaskStatus.RUNNING)
    done = alice_api.submit("fast", {}).json()["id"]
    Task.objects.filter(pk=done).update(status=TaskStatus.SUCCEEDED)
    bob_api.submit("fast", {})  # bob's active task is never in alice's lists
    assert set(listed(alice_api, "status=active")) == {waiting, running}
    assert alice_api.get("/api/v1/tasks?status=active").json()["count"] == 2
    assert listed(alice_api, "status=running") == [running]
    assert listed(alice_api, "status=succeeded") == [done]
    assert listed(alice_api, "status=failed") == []
    assert len(listed(alice_api, "")) == 3


def test_an_unknown_status_is_a_400_naming_the_allowed_ones(alice_api):
    reply = alice_api.get("/api/v1/tasks?status=done")
    assert reply.status_code == 400
    sentence = reply.json()["error"]["details"]["status"]
    assert sentence == "must be one of active, queued, submitted, running, succeeded, failed, cancelled"


@pytest.mark.parametrize(
    ("query", "field", "sentence"),
    [
        ("limit=0", "limit", "must be at least 1"),
        ("limit=-5", "limit", "must be at least 1"),
        ("limit=201", "limit", "must be at most 200"),
        ("limit=ten", "limit", "must be a whole number"),
        ("offset=-1", "offset", "must be at least 0"),
        ("offset=abc", "offset", "must be a whole number"),
        ("offset=1.5", "offset", "must be a whole number"),
        ("offset=99999999999999999999", "offset", "must be at most 1000000000"),
    ],
)
def test_a_limit_or_offset_out_of_range_is_a_400_with_a_sentence(alice_api, query, field, sentence):
    reply = alice_api.get(f"/api/v1/tasks?{query}")
    assert reply.status_code == 400
    body = reply.json()["error"]
    assert body["code"] == "invalid"
    assert body["details"] == {field: sentence}


def test_limit_and_offset_page_through_the_list(alice_api, workflows):
    ids = [alice_api.submit("fast", {}).json()["id"] for _ in range(3)]
    newest_first = list(reversed(ids))
    assert listed(alice_api, "limit=2") == newest_first[:2]
    assert listed(alice_api, "limit=2&offset=2") == newest_first[2:]
    assert listed(alice_api, "limit=200&offset=3") == []
