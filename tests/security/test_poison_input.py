"""
Poison text is refused at the door: a lone surrogate ("\\ud800", which JSON allows and UTF-8 cannot hold) or bytes
that are not UTF-8, wherever text enters, is a 400 naming the field, and nothing is stored. Rows stored with such
text before (SQLite took it) still render.
"""

import io
import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import DataError, connection, transaction
from django.test import Client
from PIL import Image

from tasks.forms import WorkflowForm
from tasks.models import Task, Upload
from tasks.params import BindingError, bind
from tasks.submission import create_task, store_upload
from tasks.workflows import WorkflowFileError, load_workflow

pytestmark = pytest.mark.django_db

LONE = "is not valid text: it holds a lone surrogate (\\ud800)"


@pytest.fixture(autouse=True)
def fast_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def nothing_stored():
    yield
    assert Task.objects.count() == 0, "a task was stored"
    assert Upload.objects.count() == 0, "an upload was stored"


def png():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    return buffer.getvalue()


def refused(reply):
    assert reply.status_code == 400, reply.content[:500]
    assert reply["Content-Type"] == "application/json"
    return reply.json()["error"]


def post_json(api, text):
    """`text` is the body as sent: JSON escapes such as \\ud800 are written out, as a client would send them."""
    return api.client.post("/api/v1/tasks", text, content_type="application/json")


def browser(user):
    client = Client()
    client.force_login(user)
    return client


# --- JSON bodies --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "sentence"),
    [
        ('{"workflow": "txt2img", "inputs": {"prompt": "\\ud800"}}', "inputs.prompt", LONE),
        ('{"workflow": "txt2img", "inputs": {"prompt": "a cat \\ud800 on a mat"}}', "inputs.prompt", LONE),
        (
            '{"workflow": "txt2img", "inputs": {"prompt": "\\udc00"}}',
            "inputs.prompt",
            "is not valid text: it holds a lone surrogate (\\udc00)",
        ),
        ('{"workflow": "txt2img", "inputs": {"pro\\ud800mpt": "x"}}', "inputs.pro\\ud800mpt", f"this name {LONE}"),
        ('{"workflow": "txt2img\\ud800", "inputs": {}}', "workflow", LONE),
        ('{"workflow": "txt2img", "inputs": {}, "idempotency_key": "k-\\ud800"}', "idempotency_key", LONE),
        ('{"workflow": "txt2img", "inputs": {"prompt": "a\\u0000b"}}', "inputs.prompt", "must not contain NUL"
         " characters"),
    ],
    ids=["prompt", "prompt-inside-text", "low-surrogate", "input-name", "workflow-slug", "idempotency-key", "nul"],
)
def test_poison_text_in_an_api_body_is_a_400_naming_the_field(alice_api, workflows, body, field, sentence,
                                                             nothing_stored):
    error = refused(post_json(alice_api, body))
    assert error["code"] == "invalid"
    assert error["details"] == {field: sentence}


def test_poison_text_in_a_raw_graph_is_a_400_naming_the_node_input(alice, alice_api, raw_graph_permission,
                                                                  nothing_stored):
    alice.user_permissions.add(raw_graph_permission)
    graph = '{"1": {"class_type": "CLIPTextEncode", "inputs": {"text": "\\ud800", "clip": ["4", 1]}}}'
    error = refused(post_json(alice_api, f'{{"prompt": {graph}}}'))
    assert error["details"] == {"prompt.1.inputs.text": LONE}
    graph = '{"1": {"class_type": "X", "inputs": {"list": ["ok", "\\ud800"]}}}'
    assert refused(post_json(alice_api, f'{{"prompt": {graph}}}'))["details"] == {"prompt.1.inputs.list.1": LONE}


def test_a_surrogate_pair_is_ordinary_text(alice_api, workflows):
    # "\ud83e\udd8a" is one character (a fox), written the way JSON escapes it.
    reply = post_json(alice_api, '{"workflow": "txt2img", "inputs": {"prompt": "a \\ud83e\\udd8a"}}')
    assert reply.status_code == 201, reply.content
    assert Task.objects.get().inputs["prompt"] == "a \U0001f98a"


def test_every_caller_of_create_task_and_bind_is_covered(alice, workflows, nothing_stored):
    # The pages call create_task and bind without parse_json_body in front of them.
    with pytest.raises(BindingError) as caught:
        create_task(alice, {"workflow": "txt2img", "inputs": {"prompt": "\ud800"}})
    assert caught.value.details == {"inputs.prompt": LONE}
    with pytest.raises(BindingError) as caught:
        create_task(alice, {"workflow": "txt2img", "inputs": {}, "idempotency_key": "\udfff"})
    assert list(caught.value.details) == ["idempotency_key"]
    workflow = workflows["txt2img"]
    with pytest.raises(BindingError) as caught:
        bind(workflow.graph, workflow.parameters, {"prompt": "\ud800"}, lambda pk: None)
    assert caught.value.details == {"prompt": LONE}


# --- forms and uploads --------------------------------------------------------------------------------------


def txt2img_form(**overrides):
    return {"prompt": "a fox", "negative": "", "seed": "", "seed_random": "on", "steps": "12", "cfg": "7.5",
            "sampler": "euler", "width": "512", "height": "512", **overrides}


def test_the_form_puts_a_lone_surrogate_on_its_field(alice, workflows, nothing_stored):
    # Django decodes form bodies itself (see below), so a lone surrogate reaches the form only from code.
    form = WorkflowForm(workflows["txt2img"], alice, txt2img_form(prompt="a \ud800"))
    assert form.is_valid(), form.errors
    assert form.submit() == []
    assert form.errors["prompt"] == [LONE]


@pytest.mark.parametrize(
    "body",
    [
        "prompt=a+%ED%A0%80&negative=&seed_random=on&steps=12&cfg=7.5&sampler=euler&width=512&height=512",
        b"prompt=a+\xff&negative=&seed_random=on&steps=12&cfg=7.5&sampler=euler&width=512&height=512",
    ],
    ids=["percent-encoded-surrogate", "raw-bytes"],
)
def test_a_form_body_that_is_not_utf8_is_a_400_naming_the_field(alice, workflows, body, nothing_stored):
    # Django would decode it to U+FFFD and carry on: the user's text would change without a word.
    reply = browser(alice).post("/workflows/txt2img/", body, content_type="application/x-www-form-urlencoded")
    assert reply.status_code == 400
    text = reply.content.decode()
    assert "not valid UTF-8" in text and "prompt" in text


def test_an_upload_name_with_a_lone_surrogate_is_refused(alice, nothing_stored):
    with pytest.raises(BindingError) as caught:
        store_upload(alice, SimpleUploadedFile("cat\ud800.png", png(), "image/png"))
    assert caught.value.details == {"image": f"has a file name that {LONE}"}


def test_the_form_refuses_an_upload_name_with_a_lone_surrogate(alice, workflows, nothing_stored):
    form = WorkflowForm(
        workflows["upload-scale"], alice, {"scale_by": "0.5", "method": "area"},
        {"image": SimpleUploadedFile("cat\ud800.png", png(), "image/png")},
    )
    assert form.is_valid(), form.errors
    assert form.submit() == []
    assert form.errors["image"] == [f"has a file name that {LONE}"]


def test_an_undecodable_multipart_file_name_arrives_as_valid_text(alice_api):
    # What HTTP can actually bring: Django's multipart parser decodes names with U+FFFD for what is not UTF-8.
    body = (
        b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename*=UTF-8''cat%ED%A0%80.png\r\n"
        b"Content-Type: image/png\r\n\r\n" + png() + b"\r\n--b--\r\n"
    )
    reply = alice_api.client.post("/api/v1/uploads", body, content_type="multipart/form-data; boundary=b")
    assert reply.status_code == 201, reply.content
    name = Upload.objects.get().original_name
    assert name.startswith("cat") and name.endswith(".png") and "\ufffd" in name
    name.encode("utf-8")  # storable and showable


# --- query strings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "field"),
    [("status=%ED%A0%80", "status"), ("status=queued&limit=%FF", "limit"), ("a%ED%A0%80=1", "a\\xed\\xa0\\x80")],
    ids=["value", "second-value", "name"],
)
def test_an_api_query_string_that_is_not_utf8_is_a_400_naming_the_field(alice_api, query, field):
    error = refused(alice_api.get(f"/api/v1/tasks?{query}"))
    assert error["details"] == {field: "is not valid UTF-8 text"}
    assert "query string" in error["message"]


def test_page_and_admin_query_strings_that_are_not_utf8_are_a_400(alice, admin_user):
    reply = browser(alice).get("/tasks/?status=%ED%A0%80")
    assert reply.status_code == 400 and "status" in reply.content.decode()
    reply = browser(admin_user).get("/admin/tasks/task/?q=%ED%A0%80")
    assert reply.status_code == 400 and "q" in reply.content.decode()


def test_utf8_query_strings_pass(alice_api, alice):
    assert alice_api.get("/api/v1/tasks?status=queued&x=%C3%A9%F0%9F%A6%8A+").status_code == 200
    assert browser(alice).get("/tasks/?page=%C3%A9").status_code == 200


# --- workflow files -----------------------------------------------------------------------------------------


def test_a_workflow_file_with_a_lone_surrogate_is_refused(tmp_path):
    path = tmp_path / "bad.json"
    graph = {"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}}
    path.write_text(json.dumps({"slug": "bad", "name": "Bad \ud800", "graph": graph}))
    with pytest.raises(WorkflowFileError, match=r"name is not valid text: it holds a lone surrogate"):
        load_workflow(path)


# --- rows stored before the door was shut -------------------------------------------------------------------


def test_a_task_stored_with_a_lone_surrogate_still_renders(alice, alice_api, admin_user, workflows):
    task = create_task(alice, {"workflow": "txt2img", "inputs": {"prompt": "a fox"}})[0]
    poison = json.dumps({"prompt": "a \ud800 fox"})  # ensure_ascii: the escape, as SQLite kept it
    graph = json.dumps({**task.graph, "6": {**task.graph["6"], "inputs": {"text": "a \ud800 fox"}}})
    if connection.vendor != "sqlite":
        # Only SQLite ever stored one: PostgreSQL's JSON types refuse a lone surrogate outright.
        with pytest.raises(DataError), transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("UPDATE tasks_task SET inputs = %s WHERE id = %s", [poison, task.pk])
        return
    with connection.cursor() as cursor:
        cursor.execute("UPDATE tasks_task SET inputs = %s, graph = %s WHERE id = %s", [poison, graph, task.pk.hex])
        cursor.execute("SELECT inputs FROM tasks_task WHERE id = %s", [task.pk.hex])
        assert "\\ud800" in cursor.fetchone()[0]
    task = Task.objects.get(pk=task.pk)
    assert task.inputs == {"prompt": "a \ufffd fox"} and task.graph["6"]["inputs"]["text"] == "a \ufffd fox"
    page = browser(alice).get(f"/tasks/{task.pk}/")
    assert page.status_code == 200 and "a \ufffd fox" in page.content.decode()
    assert browser(alice).get("/tasks/").status_code == 200
    assert browser(admin_user).get(f"/admin/tasks/task/{task.pk}/change/").status_code == 200
    assert alice_api.task(task.pk)["inputs"] == {"prompt": "a \ufffd fox"}
