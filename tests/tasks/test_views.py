import io
import re

import pytest
from django.core.files.storage import default_storage
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from PIL import Image

from servers.models import Server
from tasks import outputs
from tasks.models import Task, TaskOutput, TaskStatus, Upload
from tasks.queue import queue_positions

pytestmark = pytest.mark.django_db


def png_bytes(size=(32, 24), color=(200, 10, 10)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def browser(user):
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def alice_browser(alice):
    return browser(alice)


@pytest.fixture
def bob_browser(bob):
    return browser(bob)


def finished_task(owner, workflow, data=None):
    """A task that ran on a server and left one PNG in hub storage."""
    server, _ = Server.objects.get_or_create(name="gpu-x", defaults={"base_url": "http://127.0.0.1:9"})
    task = Task.objects.create(
        owner=owner, workflow=workflow, graph=workflow.graph, inputs={"color": 1}, status=TaskStatus.RUNNING,
        server=server, prompt_id=f"p-{Task.objects.count()}",
    )
    assert outputs.complete(task, [("9", "ComfyUI_00001_.png", "image/png", data or png_bytes())], "test")
    return Task.objects.get(pk=task.pk)


def txt2img_form(**overrides):
    data = {
        "prompt": "a fox in the snow", "negative": "", "seed": "", "seed_random": "on", "steps": "12",
        "cfg": "7.5", "sampler": "euler", "width": "512", "height": "512",
    }
    data.update(overrides)
    return data


def test_pages_need_a_login(workflows):
    for path in ["/", "/tasks/", "/gallery/", "/workflows/txt2img/"]:
        reply = Client().get(path)
        assert reply.status_code == 302
        assert reply["Location"].startswith("/accounts/login/?next=")


def test_home_lists_the_enabled_workflows(alice_browser, workflows):
    workflows["invert"].enabled = False
    workflows["invert"].save()
    page = alice_browser.get("/").content.decode()
    assert 'href="/workflows/txt2img/"' in page
    assert 'href="/workflows/invert/"' not in page


def test_the_form_follows_the_declared_parameters(alice_browser, workflows):
    page = alice_browser.get("/workflows/txt2img/").content.decode()
    assert re.search(r'<textarea name="prompt"', page)
    assert re.search(r'<input type="number" name="steps"[^>]*min="1"[^>]*max="100"', page)
    assert re.search(r'<select name="sampler"', page) and '<option value="dpmpp_2m">' in page
    assert re.search(r'<input type="checkbox" name="seed_random"[^>]*checked', page)
    upload_page = alice_browser.get("/workflows/upload-scale/").content.decode()
    assert re.search(r'<input type="file" name="image"[^>]*accept="image/', upload_page)


def test_submitting_the_form_creates_the_task_and_shows_it(alice, alice_browser, workflows):
    reply = alice_browser.post("/workflows/txt2img/", txt2img_form())
    task = Task.objects.get()
    # Without JavaScript: back to the same workspace, showing the new task, the form keeping what was typed.
    assert reply.status_code == 302 and reply["Location"] == f"/workflows/txt2img/?from={task.pk}&random=1"
    assert task.owner == alice and task.status == TaskStatus.QUEUED
    assert task.graph["6"]["inputs"]["text"] == "a fox in the snow"
    assert task.graph["3"]["inputs"]["steps"] == 12
    assert isinstance(task.inputs["seed"], int)
    page = alice_browser.get(reply["Location"]).content.decode()
    assert f'id="task-{task.pk}"' in page and 'data-status="queued"' in page
    assert "waiting in the hub&#x27;s queue, 1st" in page
    assert re.search(r'<textarea name="prompt"[^>]*>\s*a fox in the snow</textarea>', page)
    assert re.search(r'<input type="checkbox" name="seed_random"[^>]*checked', page)


def test_a_fixed_seed_is_kept(alice_browser, workflows):
    alice_browser.post("/workflows/txt2img/", txt2img_form(seed="1234", seed_random=""))
    assert Task.objects.get().graph["3"]["inputs"]["seed"] == 1234


def test_bad_input_shows_field_errors_and_creates_nothing(alice_browser, workflows):
    reply = alice_browser.post("/workflows/txt2img/", txt2img_form(steps="1000", sampler="nope", width="wide"))
    assert reply.status_code == 400
    page = reply.content.decode()
    assert "Ensure this value is less than or equal to 100." in page
    assert "Select a valid choice." in page
    assert "Enter a whole number." in page
    assert Task.objects.count() == 0


def test_a_seed_is_required_when_random_is_off(alice_browser, workflows):
    reply = alice_browser.post("/workflows/txt2img/", txt2img_form(seed="", seed_random=""))
    assert reply.status_code == 400
    assert "Enter a seed or tick" in reply.content.decode()
    assert Task.objects.count() == 0


def test_an_uploaded_image_becomes_the_task_input(alice, alice_browser, workflows):
    image = io.BytesIO(png_bytes())
    image.name = "cat.png"
    reply = alice_browser.post("/workflows/upload-scale/", {"image": image, "scale_by": "0.5", "method": "area"})
    assert reply.status_code == 302, reply.content.decode()
    upload = Upload.objects.get(owner=alice)
    task = Task.objects.get()
    assert task.graph["1"]["inputs"]["image"] == upload.remote_name
    assert task.image_inputs == [{"node": "1", "input": "image", "upload": str(upload.pk)}]
    page = alice_browser.get(f"/tasks/{task.pk}/").content.decode()
    assert f'src="/uploads/{upload.pk}/"' in page
    assert alice_browser.get(f"/uploads/{upload.pk}/").status_code == 200


def test_a_file_that_is_not_an_image_is_refused_and_nothing_is_stored(alice_browser, workflows, media_root):
    bogus = io.BytesIO(b"#!/bin/sh\necho not a picture\n")
    bogus.name = "cat.png"
    reply = alice_browser.post("/workflows/upload-scale/", {"image": bogus, "scale_by": "0.5", "method": "area"})
    assert reply.status_code == 400
    assert "must be a PNG, JPEG or WebP image" in reply.content.decode()
    assert Upload.objects.count() == 0 and Task.objects.count() == 0
    assert not any(path.is_file() for path in media_root.rglob("*")) if media_root.exists() else True


def test_a_valid_image_is_kept_when_another_field_is_wrong(alice, bob, alice_browser, workflows, media_root):
    image = io.BytesIO(png_bytes())
    image.name = "cat.png"
    reply = alice_browser.post("/workflows/upload-scale/", {"image": image, "scale_by": "99", "method": "area"})
    assert reply.status_code == 400 and Task.objects.count() == 0
    # The picture is stored as her upload and shown again, held by the form: no second pick needed.
    upload = Upload.objects.get(owner=alice)
    page = reply.content.decode()
    assert f'name="image_upload" value="{upload.pk}"' in page and f'src="/uploads/{upload.pk}/"' in page
    assert "Using <b>cat.png</b>" in page
    reply = alice_browser.post(
        "/workflows/upload-scale/", {"image_upload": str(upload.pk), "scale_by": "0.5", "method": "area"}
    )
    assert reply.status_code == 302, reply.content.decode()
    task = Task.objects.get()
    assert task.image_inputs == [{"node": "1", "input": "image", "upload": str(upload.pk)}]
    assert Upload.objects.count() == 1
    # Bob cannot run alice's kept image by sending its id.
    reply = browser(bob).post(
        "/workflows/upload-scale/", {"image_upload": str(upload.pk), "scale_by": "0.5", "method": "area"}
    )
    assert reply.status_code == 400 and "no longer there" in reply.content.decode()
    assert Task.objects.count() == 1


def test_use_these_settings_preselects_the_image_of_the_task(alice, alice_browser, workflows):
    image = io.BytesIO(png_bytes())
    image.name = "cat.png"
    alice_browser.post("/workflows/upload-scale/", {"image": image, "scale_by": "0.5", "method": "area"})
    task, upload = Task.objects.get(), Upload.objects.get()
    page = alice_browser.get(f"/workflows/upload-scale/?from={task.pk}").content.decode()
    assert f'name="image_upload" value="{upload.pk}"' in page and f'src="/uploads/{upload.pk}/"' in page
    assert re.search(r'name="scale_by" value="0.5"', page)


def test_my_tasks_shows_only_my_tasks_newest_first(alice, bob, alice_browser, workflows):
    older = Task.objects.create(owner=alice, workflow=workflows["fast"], graph={})
    newer = Task.objects.create(owner=alice, workflow=workflows["invert"], graph={})
    theirs = Task.objects.create(owner=bob, workflow=workflows["fast"], graph={})
    page = alice_browser.get("/tasks/").content.decode()
    assert page.index(f"task-{newer.pk}") < page.index(f"task-{older.pk}")
    assert str(theirs.pk) not in page
    assert '<progress max="100" value="0"' in page


def test_my_tasks_filters_by_status(alice, alice_browser, workflows):
    done = finished_task(alice, workflows["fast"])
    waiting = Task.objects.create(owner=alice, workflow=workflows["fast"], graph={})
    page = alice_browser.get("/tasks/?status=succeeded").content.decode()
    assert f"task-{done.pk}" in page and f"task-{waiting.pk}" not in page
    page = alice_browser.get("/tasks/?status=active").content.decode()
    assert f"task-{waiting.pk}" in page and f"task-{done.pk}" not in page
    page = alice_browser.get("/tasks/?status=bogus", follow=True).content.decode()
    assert "There is no status" in page and f"task-{done.pk}" in page


def test_an_empty_list_says_so(alice_browser):
    assert "No tasks yet." in alice_browser.get("/tasks/").content.decode()


def test_a_finished_task_shows_full_progress_and_its_images(alice, alice_browser, workflows):
    task = finished_task(alice, workflows["fast"])
    output = task.outputs.get()
    page = alice_browser.get(f"/tasks/{task.pk}/").content.decode()
    assert 'data-status="succeeded"' in page and '<progress max="100" value="100"' in page
    assert f'href="/outputs/{output.pk}/"' in page and f'src="/outputs/{output.pk}/thumb"' in page
    assert "gpu-x" in page and "127.0.0.1:9" not in page  # the server's name, never its URL
    full = alice_browser.get(f"/outputs/{output.pk}/")
    assert full.status_code == 200 and full["Content-Type"] == "image/png"
    assert b"".join(full.streaming_content) == output.file.open("rb").read()
    thumb = alice_browser.get(f"/outputs/{output.pk}/thumb")
    assert thumb.status_code == 200 and thumb["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(b"".join(thumb.streaming_content))).size == (32, 24)


def test_a_running_task_never_shows_100(alice, alice_browser, workflows):
    task = Task.objects.create(
        owner=alice, workflow=workflows["fast"], graph={}, status=TaskStatus.RUNNING, progress=0.999
    )
    page = alice_browser.get("/tasks/").content.decode()
    assert f'id="task-{task.pk}"' in page and '<progress max="100" value="99"' in page


def test_a_failed_task_explains_itself_without_internals(alice, alice_browser, workflows):
    task = Task.objects.create(owner=alice, workflow=workflows["fast"], graph={}, status=TaskStatus.RUNNING)
    task.mark_failed(
        "node_error",
        "SaveImage (node 9) failed: disk full",
        {"node_id": "9", "node_type": "SaveImage", "exception_type": "OSError", "exception_message": "disk full"},
        match_prompt=False,
    )
    page = alice_browser.get(f"/tasks/{task.pk}/").content.decode()
    assert "What went wrong" in page and "SaveImage (node 9) failed: disk full" in page
    assert "Raw details" not in page


def test_nobody_can_reach_another_users_task_or_files(alice, bob_browser, workflows):
    task = finished_task(alice, workflows["fast"])
    output = task.outputs.get()
    for path in [
        f"/tasks/{task.pk}/",
        f"/tasks/{task.pk}/row",
        f"/outputs/{output.pk}/",
        f"/outputs/{output.pk}/thumb",
    ]:
        assert bob_browser.get(path).status_code == 404, path
    assert bob_browser.post(f"/tasks/{task.pk}/rerun").status_code == 404
    assert bob_browser.post(f"/tasks/{task.pk}/cancel").status_code == 404
    assert str(task.pk) not in bob_browser.get("/tasks/").content.decode()
    assert str(output.pk) not in bob_browser.get("/gallery/").content.decode()
    assert Task.objects.count() == 1


def test_another_users_upload_is_404(alice, bob_browser, alice_browser, workflows):
    image = io.BytesIO(png_bytes())
    image.name = "mine.png"
    alice_browser.post("/workflows/upload-scale/", {"image": image, "scale_by": "0.5", "method": "area"})
    upload = Upload.objects.get()
    assert bob_browser.get(f"/uploads/{upload.pk}/").status_code == 404


def test_the_gallery_shows_my_images(alice, bob, alice_browser, workflows):
    mine = finished_task(alice, workflows["fast"]).outputs.get()
    theirs = finished_task(bob, workflows["fast"]).outputs.get()
    page = alice_browser.get("/gallery/").content.decode()
    assert f"/outputs/{mine.pk}/thumb" in page and str(theirs.pk) not in page
    assert "No images yet" in browser(
        type(alice).objects.create_user("carol", password="carol-pass-123")
    ).get("/gallery/").content.decode()


def test_cancel_from_the_page_without_javascript(alice, alice_browser, workflows):
    task = Task.objects.create(owner=alice, workflow=workflows["fast"], graph={})
    reply = alice_browser.post(f"/tasks/{task.pk}/cancel", {"next": "/tasks/"})
    assert reply.status_code == 302 and reply["Location"] == "/tasks/"
    task.refresh_from_db()
    assert task.status == TaskStatus.CANCELLED
    again = alice_browser.post(f"/tasks/{task.pk}/cancel", follow=True)
    assert "already cancelled" in again.content.decode()


def test_cancel_with_htmx_swaps_the_row(alice, alice_browser, workflows):
    task = Task.objects.create(owner=alice, workflow=workflows["fast"], graph={})
    reply = alice_browser.post(f"/tasks/{task.pk}/cancel", HTTP_HX_REQUEST="true")
    body = reply.content.decode()
    assert reply.status_code == 200
    assert body.lstrip().startswith(f'<article class="task task--cancelled" id="task-{task.pk}"')
    assert 'class="cancel"' not in body  # nothing left to cancel


def test_cancel_never_goes_to_another_site(alice, alice_browser, workflows):
    task = Task.objects.create(owner=alice, workflow=workflows["fast"], graph={})
    reply = alice_browser.post(f"/tasks/{task.pk}/cancel", {"next": "https://evil.example/"})
    assert reply["Location"] == f"/tasks/{task.pk}/"


def test_run_again_and_with_a_new_seed(alice, alice_browser, workflows):
    alice_browser.post("/workflows/txt2img/", txt2img_form())
    first = Task.objects.get()
    again = alice_browser.post(f"/tasks/{first.pk}/rerun")
    second = Task.objects.exclude(pk=first.pk).get()
    assert again["Location"] == f"/tasks/{second.pk}/"
    # The same graph (same affinity hash), but its own unguessable file names on the server.
    assert second.inputs == first.inputs and second.graph_hash == first.graph_hash
    prefixes = [task.graph["9"]["inputs"].pop("filename_prefix") for task in (first, second)]
    assert second.graph == first.graph and prefixes[0] != prefixes[1]
    alice_browser.post(f"/tasks/{first.pk}/rerun", {"new_seed": "1"})
    third = Task.objects.exclude(pk__in=[first.pk, second.pk]).get()
    assert third.inputs["seed"] != first.inputs["seed"]
    assert {k: v for k, v in third.inputs.items() if k != "seed"} == {
        k: v for k, v in first.inputs.items() if k != "seed"
    }


def test_edit_and_run_starts_from_the_earlier_inputs(alice, alice_browser, workflows):
    alice_browser.post("/workflows/txt2img/", txt2img_form(prompt="a very particular owl"))
    task = Task.objects.get()
    page = alice_browser.get(f"/workflows/txt2img/?from={task.pk}").content.decode()
    assert "a very particular owl" in page
    assert alice_browser.get("/workflows/txt2img/?from=not-a-uuid").status_code == 200


def test_the_title_counts_running_tasks(alice, alice_browser, workflows):
    assert "<title>My tasks · comfyhub</title>" in alice_browser.get("/tasks/").content.decode()
    for _ in range(2):
        Task.objects.create(owner=alice, workflow=workflows["fast"], graph={}, status=TaskStatus.RUNNING)
    assert "<title>(2 running) My tasks · comfyhub</title>" in alice_browser.get("/tasks/").content.decode()


def test_a_missing_output_file_is_a_clear_404(alice, alice_browser, workflows):
    output = finished_task(alice, workflows["fast"]).outputs.get()
    default_storage.delete(output.file.name)
    assert alice_browser.get(f"/outputs/{output.pk}/").status_code == 404
    assert TaskOutput.objects.filter(pk=output.pk).exists()


def test_the_queue_position_follows_the_turns_users_take(alice, bob, workflows):
    batch = [Task.objects.create(owner=alice, workflow=workflows["fast"], graph={}) for _ in range(5)]
    single = Task.objects.create(owner=bob, workflow=workflows["fast"], graph={})
    # Bob's task comes after alice's first, not after all five of hers.
    assert queue_positions([single]) == {single.pk: 2}
    positions = queue_positions([*batch, single])
    assert [positions[task.pk] for task in batch] == [1, 3, 4, 5, 6]


def test_a_higher_priority_goes_first_and_a_task_that_left_the_queue_has_no_position(alice, bob, workflows):
    mine = [Task.objects.create(owner=alice, workflow=workflows["fast"], graph={}) for _ in range(2)]
    urgent = Task.objects.create(owner=bob, workflow=workflows["fast"], graph={}, priority=5)
    assert queue_positions([*mine, urgent]) == {urgent.pk: 1, mine[0].pk: 2, mine[1].pk: 3}
    Task.objects.filter(pk=mine[0].pk).update(status=TaskStatus.RUNNING)  # the page read it just before
    assert queue_positions(mine) == {mine[1].pk: 2}


def test_a_page_of_queued_tasks_shows_their_positions_in_a_few_queries(alice, bob, alice_browser, workflows):
    Task.objects.bulk_create([Task(owner=bob, workflow=workflows["fast"], graph={}) for _ in range(30)])
    for _ in range(40):
        Task.objects.create(owner=alice, workflow=workflows["fast"], graph={})
    with CaptureQueriesContext(connection) as queries:
        page = alice_browser.get("/tasks/").content.decode()
    # Her first goes after bob's first; her 40th after 39 of her own and all 30 of his.
    assert "waiting in the hub&#x27;s queue, 2nd" in page and "waiting in the hub&#x27;s queue, 70th" in page
    assert len(queries) < 20, [query["sql"][:80] for query in queries]
