"""
Hostile input to the API and the forms: each is a 4xx with a message, and nothing is stored (no Task or Upload
row, no file under MEDIA_ROOT).
"""

import io
import json
import os
import re
import struct
import zipfile
import zlib

import pytest
from django.test import Client
from PIL import Image

from tasks.models import Task, Upload

pytestmark = pytest.mark.django_db

MIB = 1024 * 1024


@pytest.fixture(autouse=True)
def fast_hashing(settings):
    # Users are made with passwords; the default hasher takes a quarter of a second on purpose.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]



def image_bytes(fmt="PNG", size=(16, 16), mode="RGB"):
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, fmt)
    return buffer.getvalue()


def png_claiming(width, height):
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's calling card)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def zip_bytes():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("cat.png", image_bytes())
    return buffer.getvalue()


SVG = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(document.cookie)</script></svg>'


def named(data, name):
    file = io.BytesIO(data)
    file.name = name
    return file


def files_under(root):
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()) if root.exists() else []


@pytest.fixture
def nothing_stored(media_root):
    yield
    assert Task.objects.count() == 0, "a task was stored"
    assert Upload.objects.count() == 0, "an upload was stored"
    assert files_under(media_root) == [], "a file was written"


def error_of(reply, status=400):
    assert reply.status_code == status, reply.content[:500]
    assert reply["Content-Type"] == "application/json"
    error = reply.json()["error"]
    assert error["message"], "an error without a message"
    return error


def upload(api, data, name="cat.png"):
    return api.client.post("/api/v1/uploads", {"image": named(data, name)})


# --- uploads ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"#!/bin/sh\nrm -rf /\n",
        image_bytes()[:60],
        zip_bytes(),
        SVG,
        b"",
        image_bytes("GIF"),
        b"\x89PNG\r\n\x1a\n" + b"\0" * 100,
    ],
    ids=["text", "truncated-png", "zip", "svg-with-script", "empty", "gif", "png-magic-only"],
)
def test_files_that_are_not_accepted_images_are_refused(alice_api, data, nothing_stored):
    error = error_of(upload(alice_api, data))
    assert "image" in error["details"] or "image" in error["message"].lower()


def test_a_decompression_bomb_is_refused(alice_api, nothing_stored):
    error = error_of(upload(alice_api, png_claiming(20_000, 20_000)))
    assert "pixels" in error["details"]["image"] or "image" in error["details"]


def test_a_jpeg_named_png_is_stored_as_what_it_is(alice_api, media_root):
    reply = upload(alice_api, image_bytes("JPEG"), "cat.png")
    assert reply.status_code == 201
    assert reply.json()["content_type"] == "image/jpeg"
    [name] = files_under(media_root)
    assert name.endswith(".jpg")


def test_an_upload_over_the_limit_is_refused_before_it_is_read(alice_api, settings, nothing_stored):
    settings.COMFYHUB = {**settings.COMFYHUB, "MAX_UPLOAD_BYTES": 64 * 1024}
    error = error_of(upload(alice_api, os.urandom(256 * 1024)), 413)
    assert error["code"] == "too_large"


def test_an_image_just_over_the_limit_is_refused(alice_api, settings, nothing_stored):
    settings.COMFYHUB = {**settings.COMFYHUB, "MAX_UPLOAD_BYTES": 64 * 1024}
    noise = Image.frombytes("RGB", (160, 160), os.urandom(160 * 160 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    assert 64 * 1024 < len(buffer.getvalue()) < 128 * 1024
    error_of(upload(alice_api, buffer.getvalue()))


@pytest.mark.parametrize(
    "name",
    ["../../etc/passwd.png", "..\\..\\windows\\win.ini.png", "a\x00b.png", "x" * 600 + ".png", "/abs/cat.png"],
    ids=["dotdot", "backslashes", "nul", "long", "absolute"],
)
def test_upload_names_never_reach_the_disk_as_given(alice, alice_api, media_root, name):
    reply = upload(alice_api, image_bytes(), name)
    assert reply.status_code == 201, reply.content
    row = Upload.objects.get()
    assert files_under(media_root) == [f"uploads/{alice.pk}/{row.pk}.png"]
    assert "/" not in row.original_name and "\\" not in row.original_name and "\x00" not in row.original_name
    assert len(row.original_name) <= 255
    assert not (media_root.parent / "etc").exists()


def test_a_file_name_longer_than_multipart_headers_may_be_is_a_json_400(alice_api, nothing_stored):
    error_of(upload(alice_api, image_bytes(), "x" * 5000 + ".png"))


def test_a_multipart_body_without_a_boundary_is_a_json_400(alice_api, nothing_stored):
    reply = alice_api.client.post(
        "/api/v1/uploads", b"--x\r\n\r\n", content_type="multipart/form-data"
    )
    error_of(reply)


def test_an_upload_that_is_not_multipart_is_refused(alice_api, nothing_stored):
    error_of(alice_api.post("/api/v1/uploads", {"image": "iVBORw0KGgo="}))


def test_the_form_refuses_an_svg_and_stores_nothing(alice, workflows, nothing_stored):
    browser = Client()
    browser.force_login(alice)
    reply = browser.post(
        "/workflows/upload-scale/", {"image": named(SVG, "cat.png"), "scale_by": "0.5", "method": "area"}
    )
    assert reply.status_code == 400
    assert "must be a PNG, JPEG or WebP image" in reply.content.decode()


# --- JSON submissions ---------------------------------------------------------------------------------------


def raw(api, body, content_type="application/json"):
    return api.client.post("/api/v1/tasks", body, content_type=content_type)


@pytest.mark.parametrize("depth", [10_000, 900, 100])
def test_deeply_nested_json_is_a_400(alice_api, admin_api, workflows, depth, nothing_stored):
    nested = "[" * depth + "]" * depth
    error_of(raw(alice_api, f'{{"workflow": "txt2img", "inputs": {{"prompt": {nested}}}}}'))
    # A raw graph is stored and walked as sent: it must be refused before any of that.
    graph = f'{{"1": {{"class_type": "X", "inputs": {{"a": {nested}}}}}}}'
    error_of(raw(admin_api, f'{{"prompt": {graph}}}'))


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999"])
def test_non_finite_numbers_are_a_400(alice_api, admin_api, workflows, number, nothing_stored):
    error = error_of(raw(alice_api, f'{{"workflow": "txt2img", "inputs": {{"cfg": {number}}}}}'))
    assert "finite" in json.dumps(error)
    graph = f'{{"1": {{"class_type": "X", "inputs": {{"a": {number}}}}}}}'
    error_of(raw(admin_api, f'{{"prompt": {graph}}}'))


def test_huge_integers_are_a_400(alice_api, admin_api, workflows, nothing_stored):
    error = error_of(alice_api.submit("txt2img", {"seed": 2**200}))
    assert error["details"]["seed"] == f"must be at most {2**64 - 1}"
    error_of(alice_api.submit("txt2img", {"steps": 10**5000 if False else 2**200}))
    error_of(raw(alice_api, '{"workflow": "txt2img", "inputs": {"seed": ' + "9" * 5000 + "}}"))
    # The priority is a 32-bit column: past it the database would fail, not answer.
    assert "priority" in error_of(admin_api.submit("fast", priority=2**200))["details"]
    assert "priority" in error_of(alice_api.submit("fast", priority=-(2**70)))["details"]


def test_a_one_megabyte_prompt_is_a_400(alice_api, workflows, nothing_stored):
    error = error_of(alice_api.submit("txt2img", {"prompt": "x" * MIB}))
    assert error["details"]["prompt"] == "must be at most 10000 characters"


def test_a_body_over_the_limit_is_a_json_413(alice_api, workflows, settings, nothing_stored):
    body = json.dumps({"workflow": "txt2img", "inputs": {"prompt": "x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1)}})
    assert error_of(raw(alice_api, body), 413)["code"] == "too_large"


@pytest.mark.parametrize(
    ("inputs", "field", "message"),
    [
        ({"steps": "many"}, "steps", "must be a whole number"),
        ({"steps": "²"}, "steps", "must be a whole number"),
        ({"steps": "1" * 5000}, "steps", "must be a whole number"),
        ({"steps": True}, "steps", "must be a whole number"),
        ({"cfg": [1]}, "cfg", "must be a number"),
        ({"cfg": "nan"}, "cfg", "must be a number"),
        ({"sampler": {"a": 1}}, "sampler", "must be one of"),
        ({"prompt": 5}, "prompt", "must be text"),
        ({"prompt": ["a"]}, "prompt", "must be text"),
        ({"seed": -1}, "seed", "must be at least 0"),
        ({"nonsense": 1}, "nonsense", "is not a parameter of this workflow"),
    ],
)
def test_inputs_of_the_wrong_type_are_a_400_naming_the_field(alice_api, workflows, inputs, field, message,
                                                            nothing_stored):
    error = error_of(alice_api.submit("txt2img", inputs))
    assert error["details"][field].startswith(message), error


def test_an_image_input_that_is_not_an_upload_id_is_a_400(alice_api, workflows, nothing_stored):
    for value in ({"x": 1}, "../../etc/passwd", "00000000-0000-0000-0000-000000000000"):
        error = error_of(alice_api.submit("upload-scale", {"image": value}))
        assert error["details"]["image"] == "must be the id of one of your uploads"


@pytest.mark.parametrize(
    "body",
    [
        {"workflow": "txt2img", "inputs": {"prompt": "a\x00b"}},
        {"workflow": "txt2img\x00", "inputs": {}},
        {"workflow": "txt2img", "inputs": {}, "idempotency_key": "k\x00"},
        {"workflow": "txt2img", "inputs": {"pro\x00mpt": "x"}},
    ],
    ids=["prompt", "workflow", "idempotency-key", "key"],
)
def test_nul_characters_are_a_400(alice_api, workflows, body, nothing_stored):
    # PostgreSQL refuses NUL in text and jsonb: without the check these were 500s there.
    error_of(alice_api.post("/api/v1/tasks", body))


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        ('{"workflow": "fast"}', "text/plain"),
        ("workflow=fast", "application/x-www-form-urlencoded"),
        ("<task><workflow>fast</workflow></task>", "application/xml"),
        ('{"workflow": "fast"}', "multipart/form-data; boundary=x"),
        ('{"workflow": "fast"}', ""),
        (b'{"workflow": "\xff\xfe"}', "application/json"),
        ("[1, 2]", "application/json"),
        ("null", "application/json"),
        ('{"workflow": "fast",', "application/json"),
    ],
    ids=["text", "form", "xml", "multipart", "none", "bad-utf8", "array", "null", "truncated"],
)
def test_bodies_that_are_not_a_json_object_are_a_400(alice_api, workflows, body, content_type, nothing_stored):
    error_of(raw(alice_api, body, content_type))


def test_absurd_paging_is_not_a_500(alice_api):
    for query in ("offset=" + "9" * 30, "offset=-5&limit=-5", "limit=" + "9" * 30, "offset=1e9"):
        reply = alice_api.get(f"/api/v1/tasks?{query}")
        assert reply.status_code in (200, 400), (query, reply.status_code)
        assert reply["Content-Type"] == "application/json"


def test_the_form_refuses_a_one_megabyte_prompt_and_nul(alice, workflows, nothing_stored):
    browser = Client()
    browser.force_login(alice)
    form = {"negative": "", "seed": "", "seed_random": "on", "steps": "12", "cfg": "7.5", "sampler": "euler",
            "width": "512", "height": "512"}
    reply = browser.post("/workflows/txt2img/", {**form, "prompt": "x" * MIB})
    assert reply.status_code == 400
    assert re.search(r"at most 10[,.]?000 characters", reply.content.decode())
    reply = browser.post("/workflows/txt2img/", {**form, "prompt": "a\x00b"})
    assert reply.status_code == 400 and "Null characters are not allowed" in reply.content.decode()
