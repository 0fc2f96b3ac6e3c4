"""
An output downloads as `<workflow>-<seed>-<n>.<ext>`, the same from the pages and from the API, with the security
headers every file has; another user gets a 404 whichever way they ask.
"""

import io

import pytest
from django.test import Client
from PIL import Image

from servers.models import Server
from tasks import outputs
from tasks.models import ApiToken, Task, TaskStatus

pytestmark = pytest.mark.django_db


def image(fmt="PNG"):
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buffer, fmt)
    return buffer.getvalue()


def browser(user):
    client = Client()
    client.force_login(user)
    return client


def api(user):
    return Client(HTTP_AUTHORIZATION=f"Bearer {ApiToken.issue(user)[1]}")


def finished(owner, workflow, files, inputs=None):
    server, _ = Server.objects.get_or_create(name="gpu-x", defaults={"base_url": "http://127.0.0.1:9"})
    task = Task.objects.create(
        owner=owner, workflow=workflow, graph=workflow.graph if workflow else {"1": {"class_type": "X"}},
        inputs=inputs or {}, status=TaskStatus.RUNNING, server=server, prompt_id=f"p-{Task.objects.count()}",
    )
    assert outputs.complete(task, [("9", name, "image/png", data) for name, data in files], "test")
    return Task.objects.get(pk=task.pk)


def disposition(reply):
    assert reply.status_code == 200, reply
    assert reply["X-Content-Type-Options"] == "nosniff"
    assert reply["Content-Security-Policy"] == "sandbox"
    assert reply["Cache-Control"] == "private, max-age=3600"
    return reply["Content-Disposition"]


def test_outputs_are_named_after_workflow_seed_and_their_place_in_the_task(alice, workflows):
    task = finished(
        alice, workflows["txt2img"],
        [("ComfyUI_00003_.png", image()), ("ComfyUI_00004_.png", image()), ("ComfyUI_00005_.jpg", image("JPEG"))],
        inputs={"prompt": "a fox", "seed": 42, "steps": 20},
    )
    first, second, third = task.outputs.all()
    page = browser(alice)
    assert disposition(page.get(f"/outputs/{first.pk}/")) == 'inline; filename="txt2img-42-1.png"'
    assert disposition(page.get(f"/outputs/{second.pk}/?download=1")) == 'attachment; filename="txt2img-42-2.png"'
    # The extension is the type the hub read from the bytes.
    assert disposition(page.get(f"/outputs/{third.pk}/")) == 'inline; filename="txt2img-42-3.jpg"'


def test_the_api_names_the_download_the_same_way(alice, workflows):
    task = finished(alice, workflows["txt2img"], [("ComfyUI_00001_.png", image())], inputs={"seed": 7})
    [described] = api(alice).get(f"/api/v1/tasks/{task.pk}").json()["outputs"]
    reply = api(alice).get(described["url"])
    assert disposition(reply) == 'inline; filename="txt2img-7-1.png"'
    assert disposition(api(alice).get(described["url"] + "?download=1")) == 'attachment; filename="txt2img-7-1.png"'
    assert described["filename"] == "ComfyUI_00001_.png"  # what the server named it, as before


def test_without_a_seed_the_seed_part_is_left_out(alice, workflows):
    output = finished(alice, workflows["fast"], [("ComfyUI_00001_.png", image())], inputs={"color": 3}).outputs.get()
    assert disposition(browser(alice).get(f"/outputs/{output.pk}/")) == 'inline; filename="fast-1.png"'


def test_a_raw_graph_is_named_graph(alice):
    output = finished(alice, None, [("ComfyUI_00001_.png", image())]).outputs.get()
    assert disposition(browser(alice).get(f"/outputs/{output.pk}/")) == 'inline; filename="graph-1.png"'


@pytest.mark.parametrize(
    ("name", "expected"),
    [("song.FLAC", "graph-1.flac"), ("notes", "graph-1.bin"), ("weird.<script>", "graph-1.bin")],
)
def test_a_file_that_is_not_an_image_keeps_a_plain_extension_of_its_own(alice, name, expected):
    output = finished(alice, None, [(name, b"not an image")]).outputs.get()
    reply = browser(alice).get(f"/outputs/{output.pk}/")
    assert reply["Content-Type"] == "application/octet-stream"
    assert disposition(reply) == f'attachment; filename="{expected}"'


def test_staff_download_under_the_same_name(alice, admin_user, workflows):
    output = finished(alice, workflows["txt2img"], [("x.png", image())], inputs={"seed": 5}).outputs.get()
    assert disposition(browser(admin_user).get(f"/staff/outputs/{output.pk}/")) == 'inline; filename="txt2img-5-1.png"'


def test_another_user_gets_404_for_the_file_however_asked(alice, bob, workflows):
    output = finished(alice, workflows["txt2img"], [("x.png", image())], inputs={"seed": 5}).outputs.get()
    for client, path in [
        (browser(bob), f"/outputs/{output.pk}/"),
        (browser(bob), f"/outputs/{output.pk}/?download=1"),
        (browser(bob), f"/outputs/{output.pk}/thumb"),
        (api(bob), f"/api/v1/outputs/{output.pk}"),
    ]:
        assert client.get(path).status_code == 404, path
