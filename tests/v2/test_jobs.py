"""The v2 job surface through Django's test client: shapes, errors in the contract's envelope, isolation."""

import secrets

import pytest
from django.test import Client

from tasks.models import Task
from tests.v2.conftest import FAST_GRAPH, V2Client

pytestmark = pytest.mark.django_db


def address():
    return f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"


def error_of(reply, status, code):
    assert reply.status_code == status, reply.content
    body = reply.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]


def test_a_submitted_job_is_queued_with_its_links_and_labels(alice_v2):
    reply = alice_v2.submit(metadata={"run": "nightly"})
    assert reply.status_code == 201, reply.content
    job = reply.json()
    assert job["status"] == "queued" and job["queue_position"] == 1
    assert job["metadata"] == {"run": "nightly"} and job["outputs"] == [] and job["error"] is None
    assert job["urls"] == {
        "self": f"/api/v2/jobs/{job['id']}",
        "events": f"/api/v2/jobs/{job['id']}/events",
        "cancel": f"/api/v2/jobs/{job['id']}/cancel",
    }
    assert alice_v2.get(job["urls"]["self"]).json()["id"] == job["id"]
    assert Task.objects.get(pk=job["id"]).owner == alice_v2.user


def test_the_workflow_comes_back_without_the_hubs_private_prefixes(alice_v2):
    job = alice_v2.submit().json()
    stored = Task.objects.get(pk=job["id"]).graph["2"]["inputs"]["filename_prefix"]
    assert stored.startswith("ch-")  # sent to ComfyUI under an unguessable name
    body = alice_v2.get(f"/api/v2/jobs/{job['id']}/workflow").json()
    assert body == {"workflow": FAST_GRAPH, "format": "api"}


def test_it_speaks_the_contracts_envelope_for_auth_errors(db):
    client = Client(REMOTE_ADDR=address())
    error_of(client.get("/api/v2/jobs"), 401, "unauthorized")
    error_of(client.get("/api/v2/jobs", HTTP_AUTHORIZATION="Bearer nope"), 401, "unauthorized")
    assert client.get("/api/v2/health").json() == {"status": "ok"}


def test_wrong_tokens_are_slowed_down_per_address_but_right_ones_pass(alice_v2, settings):
    settings.COMFYHUB = {**settings.COMFYHUB, "TOKEN_FAILURES_PER_ADDRESS": 2}
    guesser = address()
    wrong = Client(HTTP_AUTHORIZATION="Bearer ch_not-a-token", REMOTE_ADDR=guesser)
    for _ in range(2):
        error_of(wrong.get("/api/v2/jobs"), 401, "unauthorized")
    refused = wrong.get("/api/v2/jobs")
    error_of(refused, 429, "too_many_attempts")
    assert int(refused["Retry-After"]) > 0
    assert alice_v2.get("/api/v2/jobs", REMOTE_ADDR=guesser).status_code == 200


def test_another_users_job_is_not_found_like_a_missing_one(alice_v2, bob_v2):
    job = alice_v2.submit().json()
    for path in (f"/api/v2/jobs/{job['id']}", f"/api/v2/jobs/{job['id']}/workflow", f"/api/v2/jobs/{job['id']}/events"):
        error_of(bob_v2.get(path), 404, "not_found")
    error_of(bob_v2.post(f"/api/v2/jobs/{job['id']}/cancel"), 404, "not_found")
    error_of(bob_v2.get("/api/v2/jobs/00000000-0000-0000-0000-000000000000"), 404, "not_found")
    error_of(bob_v2.get("/api/v2/jobs/not-a-uuid"), 404, "not_found")
    assert bob_v2.get("/api/v2/jobs").json() == {"jobs": []}
    assert Task.objects.get(pk=job["id"]).status == "queued"  # bob's cancel changed nothing


def test_a_queued_job_is_canceled_at_once(alice_v2):
    job = alice_v2.submit().json()
    reply = alice_v2.post(job["urls"]["cancel"])
    assert reply.status_code == 200 and reply.json()["status"] == "canceled"
    again = alice_v2.post(job["urls"]["cancel"])  # canceling an ended job is a no-op answering its state
    assert again.status_code == 200 and again.json()["status"] == "canceled"


def test_a_running_job_is_canceling_until_its_server_stops_it(alice_v2):
    job = alice_v2.submit().json()
    Task.objects.filter(pk=job["id"]).update(status="running", prompt_id="p-1")
    reply = alice_v2.post(job["urls"]["cancel"])
    assert reply.json()["status"] == "canceling"
    assert alice_v2.get(job["urls"]["self"]).json()["status"] == "canceling"
    Task.objects.get(pk=job["id"]).mark_cancelled()
    assert alice_v2.get(job["urls"]["self"]).json()["status"] == "canceled"


def test_the_same_idempotency_key_and_body_give_the_same_job(alice_v2):
    first = alice_v2.submit(key="k-1", metadata={"a": "1"})
    again = alice_v2.submit(key="k-1", metadata={"a": "1"})
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert first["Idempotency-Replayed"] == "false" and again["Idempotency-Replayed"] == "true"
    assert Task.objects.count() == 1


def test_an_idempotency_key_reused_with_another_body_is_refused(alice_v2, bob_v2):
    alice_v2.submit(key="k-1")
    other = {**FAST_GRAPH, "1": {**FAST_GRAPH["1"], "inputs": {**FAST_GRAPH["1"]["inputs"], "width": 128}}}
    error_of(alice_v2.submit(other, key="k-1"), 422, "idempotency_key_reuse")
    error_of(alice_v2.submit(key="k-1", metadata={"a": "1"}), 422, "idempotency_key_reuse")
    assert Task.objects.count() == 1
    # Keys are per user: bob's k-1 is a job of his own.
    assert bob_v2.submit(other, key="k-1").status_code == 201
    assert Task.objects.count() == 2


def test_an_unusable_idempotency_key_is_refused(alice_v2):
    for key in ("", "x" * 201, "caf\u00e9"):
        error = error_of(alice_v2.submit(key=key), 422, "invalid_request")
        assert "Idempotency-Key" in error["details"]
    assert not Task.objects.exists()


def test_a_failed_job_says_why_without_the_servers_address(alice_v2):
    job = alice_v2.submit().json()
    task = Task.objects.get(pk=job["id"])
    Task.objects.filter(pk=task.pk).update(status="running", prompt_id="p-1")
    task.refresh_from_db()
    task.mark_failed("node_error", "KSampler failed at http://10.0.0.7:8188/prompt", {"node_id": "3"})
    body = alice_v2.get(job["urls"]["self"]).json()
    assert body["status"] == "failed" and body["progress"] is None and body["completed_at"]
    assert body["error"]["code"] == "node_error" and body["error"]["node_id"] == "3"
    assert "10.0.0.7" not in body["error"]["message"] and "KSampler failed" in body["error"]["message"]


def test_other_methods_and_paths_answer_in_the_envelope(alice_v2):
    refused = alice_v2.client.delete("/api/v2/jobs")
    error_of(refused, 405, "method_not_allowed")
    assert refused["Allow"]
    job = alice_v2.submit().json()
    error_of(alice_v2.post(job["urls"]["events"]), 405, "method_not_allowed")  # an async route answers alike
    assert "/api/v2/openapi.json" in error_of(alice_v2.get("/api/v2/nothing-here"), 404, "not_found")["message"]


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"workflow": {"1": {"inputs": {}}}}, "invalid_workflow", "workflow"),
        ({"workflow": {"nodes": [], "links": []}}, "workflow_format_ui", None),
        ({"workflow": FAST_GRAPH, "webhook_url": "https://example.com/"}, "invalid_request", "webhook_url"),
        ({"workflow": FAST_GRAPH, "metadata": {"a": 1}}, "invalid_request", "metadata.a"),
        ({"workflow": FAST_GRAPH, "metadata": {"bad key": "x"}}, "metadata_invalid", "metadata"),
        ({}, "invalid_request", "workflow"),
    ],
)
def test_bad_submissions_are_refused_and_create_nothing(alice_v2, body, code, field):
    error = error_of(alice_v2.post("/api/v2/jobs", body), 422, code)
    if field:
        assert field in error["details"], error
    assert not Task.objects.exists()


def test_hostile_json_is_refused(alice_v2):
    reply = alice_v2.client.post("/api/v2/jobs", '{"workflow": {"1": NaN}}', content_type="application/json")
    error_of(reply, 422, "invalid_request")
    nested = '{"workflow": ' + '{"a": ' * 100 + "1" + "}" * 100 + "}"
    error_of(alice_v2.client.post("/api/v2/jobs", nested, content_type="application/json"), 422, "invalid_request")
    assert not Task.objects.exists()


def test_raw_workflows_need_the_raw_graph_permission(alice):
    error_of(V2Client(alice).submit(), 403, "forbidden")
    assert not Task.objects.exists()


def test_a_full_queue_answers_queue_full_with_retry_after(alice_v2, settings):
    settings.COMFYHUB = {**settings.COMFYHUB, "USER_MAX_QUEUED": 1}
    alice_v2.submit()
    reply = alice_v2.submit()
    error_of(reply, 429, "queue_full")
    assert int(reply["Retry-After"]) > 0
    assert Task.objects.count() == 1


def test_the_list_pages_newest_first_and_filters(alice_v2):
    ids = [alice_v2.submit(metadata={"batch": "a" if n % 2 else "b"}).json()["id"] for n in range(5)]
    seen, cursor = [], None
    while True:
        page = alice_v2.get("/api/v2/jobs", data={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        seen += [job["id"] for job in page["jobs"]]
        cursor = page.get("next_cursor")
        if cursor is None:
            break
    assert seen == ids[::-1]
    labelled = alice_v2.get("/api/v2/jobs", data={"metadata[batch]": "a"}).json()["jobs"]
    assert [job["id"] for job in labelled] == [ids[3], ids[1]]
    assert labelled[0]["metadata"] == {"batch": "a"} and labelled[0]["status"] == "queued"
    alice_v2.post(f"/api/v2/jobs/{ids[0]}/cancel")
    canceled = alice_v2.get("/api/v2/jobs", data={"status": "canceled"}).json()["jobs"]
    assert [job["id"] for job in canceled] == [ids[0]]
    assert len(alice_v2.get("/api/v2/jobs", data={"status": "queued,canceled"}).json()["jobs"]) == 5


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ({"limit": 0}, "invalid_request"),
        ({"limit": 101}, "invalid_request"),
        ({"limit": "many"}, "invalid_request"),
        ({"status": "cancelled"}, "invalid_request"),
        ({"cursor": "!!!"}, "invalid_cursor"),
        ({"metadata[bad key]": "x"}, "invalid_metadata_filter"),
    ],
)
def test_bad_list_queries_are_refused(alice_v2, query, code):
    error_of(alice_v2.get("/api/v2/jobs", data=query), 422, code)


def test_the_openapi_document_describes_the_job_routes(client, db):
    paths = client.get("/api/v2/openapi.json").json()["paths"]
    job = "/api/v2/jobs/{job_id}"
    assert {"/api/v2/jobs", job, f"{job}/workflow", f"{job}/cancel", f"{job}/events", "/api/v2/health"} <= set(paths)
