"""
Both JSON APIs (v1 and the Comfy API v2) against their own OpenAPI documents, by schemathesis in-process (WSGI):
no request it generates gets a 5xx, and every answer has a documented status, content type and body.
"""

import io
import json
import re
from urllib.parse import unquote, urlsplit

import pytest
import schemathesis
from django.contrib.auth.models import Permission
from django.urls import Resolver404, resolve
from hypothesis import HealthCheck, settings
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from werkzeug.test import Client

from comfyhub.wsgi import application
from servers.models import Server
from tasks import outputs
from tasks.models import ApiToken, Task, TaskStatus
from tasks.workflows import load_demo_workflows
from tests.conftest import make_user

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture
def bearer(transactional_db):
    load_demo_workflows()
    _, token = ApiToken.issue(make_user("fuzzer"))
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def v2_bearer(transactional_db):
    user = make_user("v2-fuzzer")
    user.user_permissions.add(Permission.objects.get(codename="submit_raw_graph"))  # API-format graphs get through
    _, token = ApiToken.issue(user)
    return {"Authorization": f"Bearer {token}"}


# Read from the app itself: the documents under test are the ones it serves (the views need no database).
schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", application)
v2_schema = schemathesis.openapi.from_wsgi("/api/v2/openapi.json", application).exclude(
    # The event stream answers text/event-stream and stays open until the job ends: a generated request would wait
    # for a job that never runs here (no server). tests/v2/test_events.py drives it with a live job instead.
    path_regex=r"/events$",
).exclude(
    # Multipart uploads: schemathesis fills the file field with random bytes, which the hub refuses as "not an
    # image" every time, so the route's storing path is never reached. tests/v2/test_assets.py covers it with real
    # files, and the from-hash and content routes are fuzzed here.
    method="POST",
    path="/api/v2/assets",
)


@pytest.mark.django_db(transaction=True)
@settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@schema.parametrize()
def test_the_api_answers_every_generated_request_as_documented(case, bearer):
    response = case.call(headers=bearer)
    if not routable(response.request.url):
        # A path parameter that is not a UUID ("/api/v1/tasks/null,null") never reaches the API: Django's URL
        # resolver answers its own 404 page before any view could answer JSON.
        assert response.status_code == 404
        return
    case.validate_response(response, checks=CHECKS, headers=bearer)


@pytest.mark.django_db(transaction=True)
@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@v2_schema.parametrize()
def test_the_v2_api_answers_every_generated_request_as_documented(case, v2_bearer):
    response = case.call(headers=v2_bearer)
    if not routable(response.request.url):
        assert response.status_code == 404  # as for v1: Django's resolver refuses an id that is not a UUID
        return
    case.validate_response(response, checks=CHECKS, headers=v2_bearer)


def routable(url):
    try:
        resolve(unquote(urlsplit(url).path))
    except Resolver404:
        return False
    return True


@pytest.mark.django_db(transaction=True)
def test_the_answers_random_ids_never_reach_match_the_document(bearer):
    """Outputs, a failed task's error, cancel and its 409, an upload: real objects, checked against the document."""
    client = Client(application)

    def answer(method, path, status, **kwargs):
        response = client.open(path, method=method, headers=bearer, **kwargs)
        assert response.status_code == status, response.get_data(as_text=True)
        schema[template(path)][method].validate_response(response)
        return response

    def template(path):
        path = re.sub(r"^/api/v1/workflows/[-\w]+$", "/api/v1/workflows/{slug}", urlsplit(path).path)
        return re.sub(r"/[0-9a-f-]{36}", "/{pk}", path)

    body = json.dumps({"workflow": "txt2img", "inputs": {"prompt": "a red fox in snow"}})
    created = [
        answer("POST", "/api/v1/tasks", 201, data=body, content_type="application/json").get_json()["id"]
        for _ in range(3)
    ]
    answer("POST", f"/api/v1/tasks/{created[0]}/cancel", 200)
    answer("POST", f"/api/v1/tasks/{created[0]}/cancel", 409)

    server = Server.objects.create(name="fuzz", base_url="http://127.0.0.1:9")
    Task.objects.filter(pk__in=created[1:]).update(status=TaskStatus.RUNNING, server=server, prompt_id="p")
    finished = Task.objects.get(pk=created[1])
    assert outputs.complete(finished, [("9", "fox.png", "image/png", png())], "test")
    failed = Task.objects.get(pk=created[2])
    assert failed.mark_failed("node_error", "KSampler (node 3) failed: out of memory", {"node_id": "3"})

    for task_id in created:
        answer("GET", f"/api/v1/tasks/{task_id}", 200)
    listed = answer("GET", "/api/v1/tasks?limit=10", 200).get_json()
    assert listed["count"] == 3
    (output,) = answer("GET", f"/api/v1/tasks/{created[1]}", 200).get_json()["outputs"]
    assert answer("GET", output["url"], 200).get_data() == png()
    answer("GET", output["url"] + "?download=1", 200)
    answer("POST", "/api/v1/uploads", 201, data={"image": (io.BytesIO(png()), "fox.png")})
    answer("GET", "/api/v1/openapi.json", 200)

    assert answer("GET", "/api/v1/workflows", 200).get_json()["count"] == 5
    assert answer("GET", "/api/v1/workflows/txt2img", 200).get_json()["parameters"]
    answer("GET", "/api/v1/workflows/no-such", 404)
    answer("GET", "/api/v1/tasks?status=active", 200)
    answer("GET", "/api/v1/tasks?limit=0", 400)
    keyed = {"workflow": "fast", "inputs": {}, "idempotency_key": "fuzz-1"}
    answer("POST", "/api/v1/tasks", 201, data=json.dumps(keyed), content_type="application/json")
    answer("POST", "/api/v1/tasks", 200, data=json.dumps(keyed), content_type="application/json")
    other = json.dumps({**keyed, "inputs": {"color": 0}})
    answer("POST", "/api/v1/tasks", 409, data=other, content_type="application/json")


@pytest.mark.django_db(transaction=True)
def test_the_v2_answers_for_real_jobs_and_assets_match_the_document(v2_bearer):
    """A job and an asset that exist, and another user's: answers random ids never reach, checked against v2's."""
    client = Client(application)

    def answer(method, path, status, template, **kwargs):
        response = client.open(path, method=method, headers=kwargs.pop("headers", v2_bearer), **kwargs)
        assert response.status_code == status, response.get_data(as_text=True)
        v2_schema[template][method].validate_response(response)
        return response

    graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}}
    body = json.dumps({"workflow": graph, "metadata": {"run": "fuzz"}})
    job = answer("POST", "/api/v2/jobs", 201, "/api/v2/jobs", data=body, content_type="application/json").get_json()
    path = f"/api/v2/jobs/{job['id']}"
    answer("GET", path, 200, "/api/v2/jobs/{job_id}")
    answer("GET", path + "/workflow", 200, "/api/v2/jobs/{job_id}/workflow")
    answer("GET", "/api/v2/jobs?limit=5", 200, "/api/v2/jobs")
    answer("GET", "/api/v2/jobs?limit=0", 422, "/api/v2/jobs")
    assert answer("POST", path + "/cancel", 200, "/api/v2/jobs/{job_id}/cancel").get_json()["status"] == "canceled"

    uploaded = client.post("/api/v2/assets", headers=v2_bearer, data={"file": (io.BytesIO(png()), "fox.png")})
    assert uploaded.status_code == 201, uploaded.get_data(as_text=True)
    asset = uploaded.get_json()
    answer("GET", f"/api/v2/assets/{asset['id']}", 200, "/api/v2/assets/{asset_id}")
    answer("HEAD", f"/api/v2/assets/by-hash/{asset['hash']}", 200, "/api/v2/assets/by-hash/{hash}")
    from_hash = json.dumps({"hash": asset["hash"]})
    answer("POST", "/api/v2/assets/from-hash", 200, "/api/v2/assets/from-hash", data=from_hash,
           content_type="application/json")  # fmt: skip

    _, token = ApiToken.issue(make_user("v2-other"))
    other = {"Authorization": f"Bearer {token}"}
    answer("GET", path, 404, "/api/v2/jobs/{job_id}", headers=other)
    answer("GET", f"/api/v2/assets/{asset['id']}", 404, "/api/v2/assets/{asset_id}", headers=other)
    answer("HEAD", f"/api/v2/assets/by-hash/{asset['hash']}", 404, "/api/v2/assets/by-hash/{hash}", headers=other)
    answer("DELETE", f"/api/v2/assets/{asset['id']}", 204, "/api/v2/assets/{asset_id}")


def png():
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "orange").save(buffer, "PNG")
    return buffer.getvalue()
