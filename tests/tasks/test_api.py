import io
import json
import re

import pytest
from django.test import Client
from PIL import Image

from servers.models import Server
from tasks.models import Task, TaskEvent, TaskStatus, Upload

pytestmark = pytest.mark.django_db


def png_bytes(size=(8, 8), color=(200, 10, 10)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def upload(api, data=None, name="image.png"):
    handle = io.BytesIO(data if data is not None else png_bytes())
    handle.name = name
    return api.client.post("/api/v1/uploads", {"image": handle})


def test_it_creates_a_queued_task_from_a_workflow(alice_api, workflows):
    reply = alice_api.submit("invert", {"color": 255})
    assert reply.status_code == 201, reply.content
    body = reply.json()
    assert body["status"] == "queued"
    assert body["progress"] == 0
    assert body["workflow"] == "invert"
    assert body["server"] is None and body["prompt_id"] is None
    task = Task.objects.get(pk=body["id"])
    assert task.graph["1"]["inputs"]["color"] == 255
    assert task.events.filter(kind="created").exists()


def test_it_fills_defaults_and_a_random_seed(alice_api, workflows):
    first = Task.objects.get(pk=alice_api.submit("txt2img", {"prompt": "a cat"}).json()["id"])
    second = Task.objects.get(pk=alice_api.submit("txt2img", {"prompt": "a cat"}).json()["id"])
    assert first.graph["6"]["inputs"]["text"] == "a cat"
    assert first.graph["3"]["inputs"]["steps"] == 20
    assert first.inputs["seed"] != second.inputs["seed"]
    assert first.graph["3"]["inputs"]["seed"] == first.inputs["seed"]


def test_it_refuses_bad_inputs_with_field_errors_and_stores_nothing(alice_api, workflows):
    reply = alice_api.submit("txt2img", {"steps": 1000, "sampler": "nope", "colour": 1})
    assert reply.status_code == 400
    details = reply.json()["error"]["details"]
    assert details["steps"] == "must be at most 100"
    assert details["sampler"].startswith("must be one of")
    assert details["colour"] == "is not a parameter of this workflow"
    assert Task.objects.count() == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"workflow": "no-such"}, "workflow"),
        ({}, "workflow"),
        ({"workflow": "fast", "prompt": {}}, "workflow"),
        ({"workflow": "fast", "extra": 1}, "extra"),
        ({"workflow": "fast", "idempotency_key": 5}, "idempotency_key"),
    ],
)
def test_it_refuses_malformed_submissions(alice_api, workflows, body, field):
    reply = alice_api.post("/api/v1/tasks", body)
    assert reply.status_code == 400
    assert field in reply.json()["error"]["details"]
    assert Task.objects.count() == 0


def test_it_refuses_a_body_that_is_not_json(alice_api, workflows):
    reply = alice_api.client.post("/api/v1/tasks", "{not json", content_type="application/json")
    assert reply.status_code == 400
    assert reply.json()["error"]["message"] == "The body is not valid JSON."


def test_it_refuses_deeply_nested_json(alice_api, workflows):
    body = '{"workflow": "fast", "inputs": ' + "[" * 10000 + "]" * 10000 + "}"
    reply = alice_api.client.post("/api/v1/tasks", body, content_type="application/json")
    assert reply.status_code == 400
    assert Task.objects.count() == 0


def test_idempotency_key_returns_the_same_task(alice_api, bob_api, workflows):
    first = alice_api.submit("fast", {}, idempotency_key="job-1")
    again = alice_api.submit("fast", {}, idempotency_key="job-1")
    assert first.status_code == 201
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other_user = bob_api.submit("fast", {}, idempotency_key="job-1")
    assert other_user.status_code == 201
    assert other_user.json()["id"] != first.json()["id"]
    assert Task.objects.count() == 2


def test_raw_graphs_need_the_permission(alice, alice_api, admin_api, raw_graph_permission):
    graph = {"1": {"class_type": "EmptyImage", "inputs": {}}, "2": {"class_type": "SaveImage", "inputs": {}}}
    assert alice_api.post("/api/v1/tasks", {"prompt": graph}).status_code == 403
    assert admin_api.post("/api/v1/tasks", {"prompt": graph}).status_code == 201
    alice.user_permissions.add(raw_graph_permission)
    assert alice_api.post("/api/v1/tasks", {"prompt": graph}).status_code == 201
    bad = admin_api.post("/api/v1/tasks", {"prompt": {"1": {"inputs": {}}}})
    assert bad.status_code == 400
    assert bad.json()["error"]["details"]["prompt"] == "node 1 needs a class_type"


def test_only_staff_may_raise_priority(alice_api, admin_api, workflows):
    assert alice_api.submit("fast", {}, priority=5).status_code == 403
    assert admin_api.submit("fast", {}, priority=5).json()["priority"] == 5


def test_it_requires_authentication(workflows):
    anonymous = Client()
    assert anonymous.get("/api/v1/tasks").status_code == 401
    assert anonymous.post("/api/v1/tasks", {}, content_type="application/json").status_code == 401
    wrong = Client(HTTP_AUTHORIZATION="Bearer ch_not-a-token")
    reply = wrong.get("/api/v1/tasks")
    assert reply.status_code == 401
    assert reply.json()["error"]["code"] == "invalid_token"


def test_session_writes_need_csrf(alice, workflows):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(alice)
    assert browser.get("/api/v1/tasks").status_code == 200
    reply = browser.post("/api/v1/tasks", {"workflow": "fast"}, content_type="application/json")
    assert reply.status_code == 403
    assert Task.objects.count() == 0


def test_users_see_only_their_own_tasks(alice_api, bob_api, workflows):
    mine = alice_api.submit("fast", {}).json()["id"]
    theirs = bob_api.submit("fast", {}).json()["id"]
    listed = [task["id"] for task in alice_api.get("/api/v1/tasks").json()["tasks"]]
    assert listed == [mine]
    assert alice_api.get(f"/api/v1/tasks/{theirs}").status_code == 404
    assert alice_api.post(f"/api/v1/tasks/{theirs}/cancel").status_code == 404
    assert Task.objects.get(pk=theirs).status == TaskStatus.QUEUED


def test_listing_filters_by_status(alice_api, workflows):
    keep = alice_api.submit("fast", {}).json()["id"]
    gone = alice_api.submit("fast", {}).json()["id"]
    alice_api.post(f"/api/v1/tasks/{gone}/cancel")
    queued = alice_api.get("/api/v1/tasks?status=queued").json()
    assert [task["id"] for task in queued["tasks"]] == [keep]
    assert alice_api.get("/api/v1/tasks?status=bogus").status_code == 400


def test_cancelling_a_queued_task_is_immediate(alice_api, workflows):
    task_id = alice_api.submit("fast", {}).json()["id"]
    reply = alice_api.post(f"/api/v1/tasks/{task_id}/cancel")
    assert reply.status_code == 200
    assert reply.json()["status"] == "cancelled"
    again = alice_api.post(f"/api/v1/tasks/{task_id}/cancel")
    assert again.status_code == 409


def test_uploads_are_images_owned_by_their_uploader(alice_api, bob_api, workflows):
    reply = upload(alice_api)
    assert reply.status_code == 201, reply.content
    upload_id = reply.json()["id"]
    assert reply.json()["width"] == 8
    mine = alice_api.submit("upload-scale", {"image": upload_id})
    assert mine.status_code == 201
    assert Task.objects.get(pk=mine.json()["id"]).graph["1"]["inputs"]["image"] == f"comfyhub-{upload_id}.png"
    theirs = bob_api.submit("upload-scale", {"image": upload_id})
    assert theirs.status_code == 400
    assert theirs.json()["error"]["details"]["image"] == "must be the id of one of your uploads"


@pytest.mark.parametrize("data", [b"not an image at all", b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_it_refuses_uploads_that_are_not_images(alice_api, data):
    reply = upload(alice_api, data, name="../../etc/passwd.png")
    assert reply.status_code == 400
    assert Upload.objects.count() == 0


def test_it_refuses_uploads_over_the_limit(alice_api, settings):
    settings.COMFYHUB = {**settings.COMFYHUB, "MAX_UPLOAD_BYTES": 100}
    reply = upload(alice_api, png_bytes((64, 64)))
    assert reply.status_code == 400
    assert Upload.objects.count() == 0


def test_upload_file_names_never_reach_the_disk(alice_api):
    reply = upload(alice_api, name="../../../evil.png")
    stored = Upload.objects.get(pk=reply.json()["id"])
    assert ".." not in stored.file.name
    assert stored.file.name.endswith(f"/{stored.pk}.png")


def test_wrong_methods_get_a_json_405(alice_api):
    reply = alice_api.client.delete("/api/v1/tasks")
    assert reply.status_code == 405
    assert json.loads(reply.content)["error"]["code"] == "method_not_allowed"


def test_events_record_the_cancel(alice_api, workflows):
    task_id = alice_api.submit("fast", {}).json()["id"]
    alice_api.post(f"/api/v1/tasks/{task_id}/cancel")
    kinds = list(TaskEvent.objects.filter(task_id=task_id).values_list("kind", flat=True))
    assert kinds == ["created", "cancelled"]


@pytest.mark.parametrize("path", ["/api/v1/tasks/not-a-uuid", "/api/v1/tasks/1/cancel", "/api/v1/nothing-here"])
def test_unknown_api_paths_answer_json_404(client, path):
    reply = client.get(path)
    assert reply.status_code == 404
    assert reply["Content-Type"] == "application/json"
    assert reply.json()["error"]["code"] == "not_found"
    assert client.post(path, data="{}", content_type="application/json").status_code == 404


def test_unknown_site_paths_keep_the_html_404(client):
    reply = client.get("/no-such-page/")
    assert reply.status_code == 404
    assert reply["Content-Type"].startswith("text/html")


def test_a_cancel_read_as_queued_of_a_task_sent_meanwhile_asks_its_server(alice, workflows):
    """A page or the API read the task queued; a supervisor sent it before the cancel came: it is not ended in the
    hub alone (its prompt would run on), its server's supervisor is asked to remove it."""
    server = Server.objects.create(name="gpu-c", base_url="http://127.0.0.1:9")
    task = Task.objects.create(owner=alice, workflow=workflows["fast"], graph={})
    Task.objects.filter(pk=task.pk).update(status=TaskStatus.SUBMITTED, server=server, prompt_id="p-1")
    assert task.status == TaskStatus.QUEUED  # what the caller holds
    assert task.request_cancel()
    task.refresh_from_db()
    assert task.status == TaskStatus.SUBMITTED and task.cancel_requested_at is not None
    assert task.finished_at is None


def test_the_openapi_document_is_public_and_describes_every_route(db):
    """Anyone may read the document, and an API route missing from it (or one it invents) fails here."""
    from tasks.api_urls import urlpatterns

    reply = Client().get("/api/v1/openapi.json")
    assert reply.status_code == 200
    document = reply.json()
    served = {"/api/v1/" + re.sub(r"<\w+:(\w+)>", r"{\1}", str(pattern.pattern)) for pattern in urlpatterns}
    assert set(document["paths"]) == served
    submit = document["paths"]["/api/v1/tasks"]["post"]
    assert submit["operationId"] == "createTask"
    assert {"workflow", "inputs", "idempotency_key", "webhook_url"} <= set(
        submit["requestBody"]["content"]["application/json"]["schema"]["properties"]
    )
    assert {"200", "201", "400", "401", "409", "429"} <= set(submit["responses"])
    assert set(document["components"]["securitySchemes"]) == {"BearerToken", "BrowserSession"}
