"""
Files are never active content on the hub's origin (issue 10, points 3 and 4).

A ComfyUI server, compromised or running a node that saves SVG, can send anything under any content type. The hub
reads the type from the bytes: only PNG, JPEG, WebP and GIF are served inline; everything else is an
application/octet-stream attachment. Every file response says nosniff and sandbox, and the staff file view needs the
permission to view tasks.
"""

import importlib
import io

import pytest
from django.apps import apps
from django.contrib.auth.models import Permission
from django.core.files.storage import default_storage
from django.test import Client
from PIL import Image

from comfysim import nodes as simulator_nodes
from servers.models import Server
from tasks import outputs
from tasks.models import DOWNLOAD_TYPE, INLINE_TYPES, ApiToken, Task, TaskOutput, TaskStatus
from tasks.submission import store_upload
from tests.conftest import make_user, wait_for

pytestmark = pytest.mark.django_db

SVG_WITH_SCRIPT = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
    b"<script>fetch('/steal?c=' + document.cookie)</script></svg>"
)
HTML = b"<!doctype html><html><body><script>alert(document.domain)</script></body></html>"


def image_bytes(fmt, size=(24, 16)):
    buffer = io.BytesIO()
    Image.new("RGB", size, (30, 140, 220)).save(buffer, fmt)
    return buffer.getvalue()


def body(reply):
    return b"".join(reply.streaming_content) if reply.streaming else reply.content


def api_client(user):
    return Client(HTTP_AUTHORIZATION=f"Bearer {ApiToken.issue(user)[1]}")


def named(data, name):
    handle = io.BytesIO(data)
    handle.name, handle.size = name, len(data)
    return handle


def browser(user):
    client = Client()
    client.force_login(user)
    return client


def finished_task(owner, *files):
    """A task that ran on a server whose outputs are `files`: (filename, announced content type, bytes)."""
    server, _ = Server.objects.get_or_create(name="gpu-x", defaults={"base_url": "http://127.0.0.1:9"})
    task = Task.objects.create(
        owner=owner, graph={}, status=TaskStatus.RUNNING, server=server, prompt_id=f"p-{Task.objects.count()}",
    )
    assert outputs.complete(task, [("9", name, announced, data) for name, announced, data in files], "test")
    return Task.objects.get(pk=task.pk)


def one_output(owner, filename, announced, data):
    return finished_task(owner, (filename, announced, data)).outputs.get()


@pytest.fixture
def staff_with_view_task(db):
    user = make_user("sam", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_task", content_type__app_label="tasks"))
    return user


def assert_safe_headers(reply):
    assert reply["X-Content-Type-Options"] == "nosniff"
    assert reply["Content-Security-Policy"] == "sandbox"


def assert_download(reply, filename):
    assert reply.status_code == 200, reply
    assert_safe_headers(reply)
    assert reply["Content-Type"] == "application/octet-stream"
    assert reply["Content-Disposition"] == f'attachment; filename="{filename}"'


def assert_inline(reply, content_type):
    assert reply.status_code == 200, reply
    assert_safe_headers(reply)
    assert reply["Content-Type"] == content_type
    assert reply["Content-Disposition"].startswith("inline")


# --- The stored type is read from the bytes -------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "announced", "data", "checked"),
    [
        ("drawing.svg", "image/svg+xml", SVG_WITH_SCRIPT, DOWNLOAD_TYPE),
        ("drawing.png", "image/png", SVG_WITH_SCRIPT, DOWNLOAD_TYPE),  # a lying server
        ("page.html", "text/html", HTML, DOWNLOAD_TYPE),
        ("page.html", "", HTML, DOWNLOAD_TYPE),
        ("fox.png", "text/html", image_bytes("PNG"), "image/png"),
        ("fox.png", "image/png", image_bytes("PNG"), "image/png"),
        ("fox.jpg", "image/jpeg", image_bytes("JPEG"), "image/jpeg"),
        ("fox.webp", "image/webp", image_bytes("WEBP"), "image/webp"),
        ("fox.gif", "image/gif", image_bytes("GIF"), "image/gif"),
        ("fox.svg", "image/svg+xml", image_bytes("GIF"), "image/gif"),
        ("fox.bmp", "image/bmp", image_bytes("BMP"), DOWNLOAD_TYPE),  # an image, but not one served inline
        ("cut.png", "image/png", image_bytes("PNG")[:-20], DOWNLOAD_TYPE),  # does not verify
        ("empty.png", "image/png", b"", DOWNLOAD_TYPE),
    ],
)
def test_the_stored_type_is_the_one_read_from_the_bytes(alice, filename, announced, data, checked):
    output = one_output(alice, filename, announced, data)
    assert output.content_type == checked
    assert output.announced_type == announced
    assert output.is_image == (checked in INLINE_TYPES)


def test_the_checked_types_are_the_inline_types():
    assert tuple(outputs.RASTER_FORMATS.values()) == INLINE_TYPES


# --- What every file URL answers ---------------------------------------------------------------------------


def test_an_svg_with_a_script_is_a_download_everywhere(alice, admin_user):
    output = one_output(alice, "drawing.svg", "image/svg+xml", SVG_WITH_SCRIPT)
    page, api = browser(alice), api_client(alice)
    for client, path in [
        (page, f"/outputs/{output.pk}/"),
        (page, f"/outputs/{output.pk}/?download=1"),
        (api, f"/api/v1/outputs/{output.pk}"),
        (browser(admin_user), f"/staff/outputs/{output.pk}/"),
    ]:
        reply = client.get(path)
        assert_download(reply, "graph-1.svg")  # a raw graph's first output; the extension of no inline type
        assert body(reply) == SVG_WITH_SCRIPT  # the file is still the owner's to have, as it was made
    assert page.get(f"/outputs/{output.pk}/thumb").status_code == 404


def test_an_html_output_is_a_download(alice):
    output = one_output(alice, "page.html", "text/html", HTML)
    assert_download(browser(alice).get(f"/outputs/{output.pk}/"), "graph-1.html")


def test_a_png_claimed_as_html_is_shown_as_a_png(alice):
    output = one_output(alice, "fox.png", "text/html", image_bytes("PNG"))
    client = browser(alice)
    assert_inline(client.get(f"/outputs/{output.pk}/"), "image/png")
    thumb = client.get(f"/outputs/{output.pk}/thumb")
    assert_inline(thumb, "image/jpeg")


@pytest.mark.parametrize(("fmt", "content_type"), [
    ("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif"),
])
def test_raster_images_are_inline_with_safe_headers(alice, admin_user, fmt, content_type):
    output = one_output(alice, f"fox.{fmt.lower()}", content_type, image_bytes(fmt))
    page = browser(alice)
    api = api_client(alice)
    assert_inline(page.get(f"/outputs/{output.pk}/"), content_type)
    assert_inline(api.get(f"/api/v1/outputs/{output.pk}"), content_type)
    assert_inline(browser(admin_user).get(f"/staff/outputs/{output.pk}/"), content_type)
    assert_inline(page.get(f"/outputs/{output.pk}/thumb"), "image/jpeg")
    download = page.get(f"/outputs/{output.pk}/?download=1")
    assert download["Content-Type"] == content_type
    assert download["Content-Disposition"].startswith("attachment")
    assert_safe_headers(download)


def test_an_upload_has_the_same_safe_headers(alice):
    upload = store_upload(alice, named(image_bytes("WEBP"), "mine.webp"))
    assert_inline(browser(alice).get(f"/uploads/{upload.pk}/"), "image/webp")


def test_an_upload_of_another_type_than_an_inline_one_would_be_a_download(alice):
    # Uploads are Pillow-verified PNG, JPEG or WebP; a row that says otherwise is still never served inline.
    upload = store_upload(alice, named(image_bytes("PNG"), "mine.png"))
    type(upload).objects.filter(pk=upload.pk).update(content_type="image/svg+xml")
    assert_download(browser(alice).get(f"/uploads/{upload.pk}/"), "mine.png")


# --- Pages show as pictures only checked images -------------------------------------------------------------


def test_pages_show_only_checked_images_as_pictures(alice, admin_user):
    task = finished_task(
        alice,
        ("drawing.svg", "image/svg+xml", SVG_WITH_SCRIPT),
        ("liar.png", "image/png", HTML),
        ("fox.png", "text/html", image_bytes("PNG")),
    )
    by_name = {output.filename: output for output in task.outputs.all()}
    svg, liar, fox = by_name["drawing.svg"], by_name["liar.png"], by_name["fox.png"]
    client = browser(alice)
    detail = client.get(f"/tasks/{task.pk}/").content.decode()
    rows = client.get("/tasks/").content.decode()
    gallery = client.get("/gallery/").content.decode()
    for html in (detail, rows, gallery):
        assert f'src="/outputs/{svg.pk}/' not in html and f'src="/outputs/{liar.pk}/' not in html
    assert f'src="/outputs/{fox.pk}/' in detail
    assert f'src="/outputs/{fox.pk}/thumb"' in rows and f'src="/outputs/{fox.pk}/thumb"' in gallery
    assert f'href="/outputs/{svg.pk}/?download=1"' in detail  # still there to download
    admin = browser(admin_user).get(f"/admin/tasks/task/{task.pk}/change/").content.decode()
    assert f'src="/staff/outputs/{fox.pk}/"' in admin
    assert f'src="/staff/outputs/{svg.pk}/"' not in admin and f'href="/staff/outputs/{svg.pk}/"' in admin
    assert "image/svg+xml" in admin  # staff see what the server announced


def test_the_api_lists_the_checked_type(alice):
    task = finished_task(alice, ("drawing.svg", "image/svg+xml", SVG_WITH_SCRIPT), ("fox.png", "", image_bytes("PNG")))
    api = api_client(alice)
    listed = {out["filename"]: out["content_type"] for out in api.get(f"/api/v1/tasks/{task.pk}").json()["outputs"]}
    assert listed == {"drawing.svg": DOWNLOAD_TYPE, "fox.png": "image/png"}


# --- Outputs stored before the check -------------------------------------------------------------------------


def test_the_migration_checks_outputs_stored_before_again(alice):
    task = finished_task(
        alice,
        ("drawing.svg", "image/svg+xml", SVG_WITH_SCRIPT),
        ("fox.png", "image/png", image_bytes("PNG")),
        ("gone.png", "image/png", image_bytes("PNG")),
    )
    # As rows looked before: the announced type, no announced_type, and one whose file was lost.
    task.outputs.update(announced_type="")
    task.outputs.filter(filename="drawing.svg").update(content_type="image/svg+xml")
    gone = task.outputs.get(filename="gone.png")
    default_storage.delete(gone.file.name)
    migration = importlib.import_module("tasks.migrations.0004_output_checked_type")
    migration.check_stored_types(apps, None)
    stored = {out.filename: (out.content_type, out.announced_type) for out in task.outputs.all()}
    assert stored == {
        "drawing.svg": (DOWNLOAD_TYPE, "image/svg+xml"),
        "fox.png": ("image/png", "image/png"),
        "gone.png": (DOWNLOAD_TYPE, "image/png"),
    }
    svg = task.outputs.get(filename="drawing.svg")
    assert_download(browser(alice).get(f"/outputs/{svg.pk}/"), "graph-1.svg")


def test_a_thumbnail_made_before_is_not_served_for_a_file_that_is_no_image(alice):
    output = one_output(alice, "fox.png", "image/png", image_bytes("PNG"))
    client = browser(alice)
    assert client.get(f"/outputs/{output.pk}/thumb").status_code == 200
    TaskOutput.objects.filter(pk=output.pk).update(content_type=DOWNLOAD_TYPE)
    assert client.get(f"/outputs/{output.pk}/thumb").status_code == 404


# --- Staff file access follows permissions --------------------------------------------------------------------


def test_staff_need_the_permission_to_view_tasks_to_open_outputs(alice, admin_user, staff_with_view_task):
    output = one_output(alice, "fox.png", "image/png", image_bytes("PNG"))
    path = f"/staff/outputs/{output.pk}/"
    staff_without = make_user("stan", is_staff=True)
    assert browser(staff_without).get(path).status_code == 403
    assert browser(staff_with_view_task).get(path).status_code == 200
    assert browser(admin_user).get(path).status_code == 200
    for visitor in (Client(), browser(alice)):  # not staff: sent to the admin's login, as before
        reply = visitor.get(path)
        assert reply.status_code == 302 and reply["Location"].startswith("/admin/login/?next=")


# --- End to end: a server that sends an SVG --------------------------------------------------------------------


def save_svg_batch(images, prefix, folder_root, kind, *rest):
    """SaveImage as a node that saves SVG (or a compromised server) would: a script inside, served as SVG."""
    folder, filename, counter, subfolder = simulator_nodes.save_image_path(
        prefix, folder_root, images[0].width, images[0].height
    )
    name = f"{filename}_{counter:05}_.svg"
    with open(f"{folder}/{name}", "wb") as handle:
        handle.write(SVG_WITH_SCRIPT)
    return [{"filename": name, "subfolder": subfolder, "type": kind}]


@pytest.mark.django_db(transaction=True)
def test_an_svg_from_a_server_is_stored_and_served_as_a_download(
    monkeypatch, alice, workflows, server, simulator, hub
):
    monkeypatch.setattr(simulator_nodes, "_save_batch", save_svg_batch)
    api = api_client(alice)
    reply = api.post("/api/v1/tasks", {"workflow": "invert", "inputs": {"color": 99}}, content_type="application/json")
    assert reply.status_code == 201, reply.content
    task_id = reply.json()["id"]
    task = wait_for(lambda: Task.objects.filter(pk=task_id, status=TaskStatus.SUCCEEDED).first(), timeout=20,
                    message="the task to succeed")
    output = task.outputs.get()
    assert output.filename.endswith(".svg") and output.announced_type == "image/svg+xml"
    assert output.content_type == DOWNLOAD_TYPE
    reply = api.get(f"/api/v1/outputs/{output.pk}")
    # Named after the workflow and the output's place in the task: never the server's name, nor the hub's prefix.
    assert_download(reply, "invert-1.svg")
    assert body(reply) == SVG_WITH_SCRIPT
    assert output.size == len(SVG_WITH_SCRIPT)
