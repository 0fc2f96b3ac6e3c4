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


# --- Workflows ----------------------------------------------------------------------------------------------------


def test_the_workflow_list_shows_the_enabled_ones_with_their_parameters(alice_api, workflows):
    workflows["blur-sharpen"].enabled = False
    workflows["blur-sharpen"].save()
    reply = alice_api.get("/api/v1/workflows")
    assert reply.status_code == 200
    body = reply.json()
    slugs = [workflow["slug"] for workflow in body["workflows"]]
    assert sorted(slugs) == ["fast", "invert", "txt2img", "upload-scale"]
    assert body["count"] == 4
    txt2img = next(workflow for workflow in body["workflows"] if workflow["slug"] == "txt2img")
    assert txt2img["name"] == "Text to image"
    params = {param["name"]: param for param in txt2img["parameters"]}
    assert list(params) == ["prompt", "negative", "seed", "steps", "cfg", "sampler", "width", "height"]
    assert params["cfg"] == {
        "name": "cfg", "label": "CFG scale", "type": "float", "default": 8.0, "random": False,
        "min": 1.0, "max": 30.0, "step": 0.5, "choices": None, "max_length": None,
        "required": False, "multiline": False, "help": "",
    }  # fmt: skip
    assert params["sampler"]["choices"] == ["euler", "euler_ancestral", "dpmpp_2m", "ddim"]
    assert params["prompt"]["multiline"] is True and params["prompt"]["max_length"] == 10_000
    assert params["seed"]["random"] is True and params["seed"]["default"] is None
    assert params["seed"]["max"] == 2**64 - 1
    assert "node" not in params["steps"] and "input" not in params["steps"]


def test_a_parameter_without_default_is_required(alice_api, workflows):
    image = alice_api.get("/api/v1/workflows/upload-scale").json()["parameters"][0]
    assert image["name"] == "image" and image["type"] == "image"
    assert image["required"] is True


def test_what_the_list_describes_is_what_the_api_accepts(alice_api, workflows):
    params = {p["name"]: p for p in alice_api.get("/api/v1/workflows/txt2img").json()["parameters"]}
    inputs = {"steps": params["steps"]["max"], "sampler": params["sampler"]["choices"][-1]}
    assert alice_api.submit("txt2img", inputs).status_code == 201
    too_many = alice_api.submit("txt2img", {"steps": params["steps"]["max"] + 1})
    assert too_many.status_code == 400


def test_one_workflow_by_slug_and_404_for_unknown_or_disabled(alice_api, workflows):
    reply = alice_api.get("/api/v1/workflows/invert")
    assert reply.status_code == 200
    assert reply.json()["slug"] == "invert"
    assert [p["type"] for p in reply.json()["parameters"]] == ["color", "int", "int"]
    workflows["invert"].enabled = False
    workflows["invert"].save()
    for slug in ("invert", "no-such"):
        gone = alice_api.get(f"/api/v1/workflows/{slug}")
        assert gone.status_code == 404
        assert gone.json()["error"]["message"] == f"There is no workflow '{slug}'."


def test_workflows_need_authentication(client, workflows):
    assert client.get("/api/v1/workflows").status_code == 401
    assert client.get("/api/v1/workflows/fast").status_code == 401


def test_a_seed_declared_not_random_shows_its_default(alice_api, workflows):
    workflow = workflows["txt2img"]
    workflow.parameters = [
        {**p, "random": False, "default": 7} if p["type"] == "seed" else p for p in workflow.parameters
    ]
    workflow.save()
    seed = next(p for p in alice_api.get("/api/v1/workflows/txt2img").json()["parameters"] if p["type"] == "seed")
    assert seed["random"] is False and seed["default"] == 7
    task = Task.objects.get(pk=alice_api.submit("txt2img", {}).json()["id"])
    assert task.inputs["seed"] == 7


# --- Errors in plain words ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (TaskStatus.SUCCEEDED, "The task has already succeeded; there is nothing to cancel."),
        (TaskStatus.FAILED, "The task has already failed; there is nothing to cancel."),
        (TaskStatus.CANCELLED, "The task has already been cancelled."),
    ],
)
def test_cancelling_a_finished_task_says_how_it_ended(alice_api, workflows, status, message):
    task_id = alice_api.submit("fast", {}).json()["id"]
    Task.objects.filter(pk=task_id).update(status=status)
    reply = alice_api.post(f"/api/v1/tasks/{task_id}/cancel")
    assert reply.status_code == 409
    assert reply.json()["error"] == {"code": "not_active", "message": message, "details": {}}
    assert Task.objects.get(pk=task_id).status == status


def test_a_task_sent_back_to_the_queue_meanwhile_is_still_cancelled(alice_api, workflows, monkeypatch):
    task_id = alice_api.submit("fast", {}).json()["id"]
    Task.objects.filter(pk=task_id).update(status=TaskStatus.FAILED)
    original = Task.request_cancel
    seen = []

    def retried_first(task):
        if not seen:  # an operator's "retry" lands between the API's read (failed) and its cancel
            Task.objects.filter(pk=task.pk).update(status=TaskStatus.QUEUED)
        seen.append(task.status)
        return original(task)

    monkeypatch.setattr(Task, "request_cancel", retried_first)
    reply = alice_api.post(f"/api/v1/tasks/{task_id}/cancel")
    assert reply.status_code == 200, reply.content
    assert reply.json()["status"] == "cancelled"
    assert seen == ["failed", "queued"]


def test_another_users_task_reads_exactly_like_a_missing_one(alice_api, bob_api, workflows):
    theirs = alice_api.submit("fast", {}).json()["id"]
    missing = "00000000-0000-4000-8000-000000000000"
    for path in ("/api/v1/tasks/{}", "/api/v1/outputs/{}"):
        foreign, absent = bob_api.get(path.format(theirs)), bob_api.get(path.format(missing))
        assert foreign.status_code == absent.status_code == 404
        assert foreign.json() == absent.json()
    cancel = bob_api.post(f"/api/v1/tasks/{theirs}/cancel")
    assert cancel.status_code == 404
    assert cancel.json()["error"]["message"] == "There is no task with this id."
    assert Task.objects.get(pk=theirs).status == TaskStatus.QUEUED


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"workflow": "fast", "colour": 1}, "The body has fields a task does not take."),
        ({"workflow": "fast", "idempotency_key": ""}, "The idempotency_key is not valid."),
        ({"workflow": "fast", "priority": "high"}, "The priority is not valid."),
        ({"workflow": "nope"}, "There is no such workflow."),
        ({"workflow": "fast", "inputs": [1]}, "The inputs must be an object."),
    ],
)
def test_refusals_are_sentences(alice_api, workflows, body, message):
    reply = alice_api.post("/api/v1/tasks", body)
    assert reply.status_code == 400
    assert reply.json()["error"]["message"] == message
    assert Task.objects.count() == 0


def test_an_unknown_address_and_a_wrong_method_are_sentences(alice_api):
    assert alice_api.get("/api/v1/nothing").json()["error"]["message"] == (
        "There is nothing at this address; the API is described at /api/v1/openapi.json."
    )
    assert alice_api.post("/api/v1/workflows").json()["error"]["message"] == "This address answers GET only."
