"""
Malformed multipart bodies get the API's JSON error under a real Daphne. Twisted used to parse every form body a
second time before the application saw it, and answered what it could not parse with a bare 400 and no body.
"""

import io
import json
import os
import socket
import subprocess
import sys

import httpx
import pytest
from PIL import Image

from comfyhub.harness import database_url, free_port, stop
from tasks.models import Upload
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def daphne(tmp_path, media_root):
    env = {**os.environ, "DATABASE_URL": database_url(), "MEDIA_ROOT": str(media_root),
           "COMFYHUB_EMBEDDED_SUPERVISOR": "false"}
    env.pop("REDIS_URL", None)
    port = free_port()
    log = open(tmp_path / "daphne.log", "w+")  # noqa: SIM115
    process = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "comfyhub.asgi:application"],
        env=env, stdout=log, stderr=log,
    )
    base = f"http://127.0.0.1:{port}"

    def up():
        try:
            return httpx.get(f"{base}/api/v1/tasks", timeout=1).status_code == 401
        except httpx.HTTPError:
            return process.poll() is not None

    try:
        wait_for(up, timeout=60, message="daphne to listen")
        assert process.poll() is None, (tmp_path / "daphne.log").read_text()
        yield base, port
    finally:
        stop(process)
        log.close()


def png():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    return buffer.getvalue()


PART = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b"--x\r\n\r\n"),
        ("multipart/form-data; boundary=", b"--x\r\n\r\n"),
        ("multipart/form-data; boundary=zzz", b"hello world"),
        ("multipart/form-data; boundary=b", PART + png()[:20]),
    ],
    ids=["no-boundary", "empty-boundary", "boundary-never-appears", "truncated"],
)
def test_a_malformed_multipart_upload_is_a_json_400(daphne, alice_api, content_type, body):
    base, _ = daphne
    reply = httpx.post(
        f"{base}/api/v1/uploads", content=body, timeout=10,
        headers={"Authorization": f"Bearer {alice_api.token}", "Content-Type": content_type},
    )
    assert reply.status_code == 400
    assert reply.headers["content-type"] == "application/json", reply.content
    error = reply.json()["error"]
    assert error["code"] and error["message"]
    assert not Upload.objects.exists()


def test_a_good_upload_still_works(daphne, alice_api):
    base, _ = daphne
    reply = httpx.post(
        f"{base}/api/v1/uploads", files={"image": ("cat.png", png(), "image/png")}, timeout=10,
        headers={"Authorization": f"Bearer {alice_api.token}"},
    )
    assert reply.status_code == 201, reply.text
    assert json.loads(reply.text)["filename"] == "cat.png"


def test_a_bad_content_length_is_refused_by_the_http_layer(daphne, alice_api):
    # The body's length is unknown, so there is no request to hand to the application: Twisted answers a bare 400
    # and closes the connection, as RFC 9112 asks. Documented in the README's Security section.
    _, port = daphne
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /api/v1/uploads HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Authorization: Bearer " + alice_api.token.encode() + b"\r\nContent-Length: abc\r\n\r\n" + PART
        )
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400 ")


def test_a_malformed_multipart_body_with_a_session_is_a_json_400_too(alice):
    # The session's CSRF check reads the form (csrfmiddlewaretoken), so it meets the malformed body first.
    from django.test import Client

    browser = Client(enforce_csrf_checks=True)
    browser.force_login(alice)
    browser.cookies["csrftoken"] = "a" * 32
    reply = browser.post("/api/v1/uploads", b"--x\r\n\r\n", content_type="multipart/form-data")
    assert reply.status_code == 400 and reply["Content-Type"] == "application/json"
    assert reply.json()["error"]["code"] == "bad_request"
