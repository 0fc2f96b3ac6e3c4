"""
A task's page says each thing once: one title, one picture per output with its pixel and file size (at its own
size when small), the error once, and a timeline in plain words with day and seconds; the internal event names
only for staff, never a server's address.
"""

import io
import os
import re

import pytest
from django.template.defaultfilters import filesizeformat
from django.test import Client
from PIL import Image

from servers.models import Server
from tasks import outputs
from tasks.models import Task, TaskEvent, TaskOutput, TaskStatus
from tests.conftest import make_user

pytestmark = pytest.mark.django_db

ROW = re.compile(r'<article class="task task--[a-z]+" id="task-[^"]+".*?</article>', re.S)
DAY_AND_SECONDS = r"\d{1,2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2}"


def png(size, noise=False):
    image = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)) if noise else Image.new("RGB", size)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def browser(user):
    client = Client()
    client.force_login(user)
    return client


def gpu():
    return Server.objects.get_or_create(name="gpu-x", defaults={"base_url": "http://10.1.2.3:8188"})[0]


def ran(owner, workflow, files, inputs=None):
    """A task that went through the hub's transitions on gpu-x and left `files` ((name, bytes))."""
    task = Task.objects.create(owner=owner, workflow=workflow, graph=workflow.graph, inputs=inputs or {"color": 1})
    TaskEvent.objects.create(task=task, kind="created", to_status=TaskStatus.QUEUED)
    assert task.bind(gpu(), f"p-{task.pk}")
    assert task.mark_accepted(1)
    assert task.mark_running()
    assert outputs.complete(task, [("9", name, "image/png", data) for name, data in files], "history")
    return Task.objects.get(pk=task.pk)


def outside_the_row(page):
    """The page without the live status row, whose own name, thumbnails and error this page hides (CSS)."""
    return ROW.sub("", page.split("</title>", 1)[1])


def results(page):
    return page.split('<section id="outputs"', 1)[1].split("</section>", 1)[0]


def test_each_output_shows_once_with_its_pixel_size_and_file_size(alice, workflows):
    big = png((640, 600), noise=True)
    task = ran(alice, workflows["fast"], [("ComfyUI_00001_.png", png((32, 24))), ("ComfyUI_00002_.png", big)])
    small, large = task.outputs.all()
    page = browser(alice).get(f"/tasks/{task.pk}/").content.decode()
    shown = results(page)
    for output in (small, large):
        assert shown.count(f'src="/outputs/{output.pk}/"') == 1
    assert len(re.findall(r"<img ", shown)) == 2
    # Its natural size is the image's own: a small one is not stretched to the column.
    assert 'width="32" height="24"' in shown and "32×24" in shown
    assert 'width="640" height="600"' in shown and "640×600" in shown
    assert filesizeformat(large.size).endswith("MB") and filesizeformat(large.size) in shown
    assert filesizeformat(small.size) in shown
    # Named as it downloads, not as the server's counter named it.
    assert "fast-1.png" in shown and "fast-2.png" in shown and "ComfyUI_0000" not in shown


def test_the_name_is_the_pages_one_title(alice, workflows):
    task = ran(alice, workflows["fast"], [("a.png", png((8, 8)))])
    page = browser(alice).get(f"/tasks/{task.pk}/").content.decode()
    name = workflows["fast"].name
    assert f"<h1>{name}</h1>" in page
    assert outside_the_row(page).count(name) == 1
    # The row that pushes keep live stays, wrapped so that its copy of the name is not shown.
    assert re.search(r'<div class="task-detail__status">\s*<article class="task task--succeeded"', page)


def test_an_output_recorded_before_pixel_sizes_were_stored_is_measured_once(alice, workflows):
    task = ran(alice, workflows["fast"], [("a.png", png((40, 30)))])
    output = task.outputs.get()
    assert (output.width, output.height) == (40, 30)  # recorded with the output
    TaskOutput.objects.filter(pk=output.pk).update(width=None, height=None)
    page = browser(alice).get(f"/tasks/{task.pk}/").content.decode()
    assert "40×30" in results(page)
    output.refresh_from_db()
    assert (output.width, output.height) == (40, 30)


def test_a_file_that_is_not_an_image_has_no_pixel_size(alice, workflows):
    task = ran(alice, workflows["fast"], [("notes.txt", b"not a picture at all")])
    output = task.outputs.get()
    assert output.width is None and output.height is None
    shown = results(browser(alice).get(f"/tasks/{task.pk}/").content.decode())
    assert "<img" not in shown and "×" not in shown and filesizeformat(20) in shown


def test_the_timeline_says_what_happened_in_plain_words_with_day_and_seconds(alice, workflows):
    task = ran(alice, workflows["fast"], [("a.png", png((8, 8)))])
    page = browser(alice).get(f"/tasks/{task.pk}/").content.decode()
    timeline = page.split('<ol id="timeline"', 1)[1].split("</ol>", 1)[0]
    sentences = re.findall(rf">({DAY_AND_SECONDS})</time> — ([^<]+)</li>", timeline)
    assert [sentence for _, sentence in sentences] == [
        "Added to the queue",
        "Sent to gpu-x",
        "Waiting in gpu-x&#x27;s queue",
        "Started on gpu-x",
        "Finished",
    ]
    # Internal names are for staff only.
    for internal in ("event-kind", "bound to gpu-x", "started (websocket)", "finished (history)", "<strong>"):
        assert internal not in timeline


def test_staff_also_see_the_internal_event_names(workflows):
    staff = make_user("sam", is_staff=True)
    task = ran(staff, workflows["fast"], [("a.png", png((8, 8)))])
    timeline = browser(staff).get(f"/tasks/{task.pk}/").content.decode().split('<ol id="timeline"', 1)[1]
    assert "— Sent to gpu-x" in timeline
    for kind in ("created", "submitted", "accepted", "running", "succeeded"):
        assert f'<code class="event-kind">{kind}</code>' in timeline
    assert "bound to gpu-x" in timeline


def test_a_failure_is_explained_once_and_no_address_leaks(alice, workflows):
    task = Task.objects.create(owner=alice, workflow=workflows["fast"], graph={}, status=TaskStatus.QUEUED)
    assert task.bind(gpu(), "p-1")
    assert task.requeue("gpu-x restarted: http://10.1.2.3:8188/prompt did not answer")
    assert task.bind(gpu(), "p-2")
    assert task.mark_failed("node_error", "SaveImage (node 9) failed: disk full on 10.1.2.3")
    page = browser(alice).get(f"/tasks/{task.pk}/").content.decode()
    assert "10.1.2.3" not in page and "8188" not in page
    assert outside_the_row(page).count("SaveImage (node 9) failed: disk full") == 1
    assert "Back in the queue after gpu-x lost it: gpu-x restarted: [server] did not answer" in page
    assert re.search(rf"{DAY_AND_SECONDS}</time> — Failed</li>", page)


def test_an_unknown_event_kind_still_reads_as_words(alice, workflows):
    task = Task.objects.create(owner=alice, workflow=workflows["fast"], graph={})
    task.record("some_new_thing", "internal detail")
    timeline = browser(alice).get(f"/tasks/{task.pk}/").content.decode().split('<ol id="timeline"', 1)[1]
    assert "— Some new thing</li>" in timeline and "internal detail" not in timeline


def test_another_users_task_page_is_404(alice, bob, workflows):
    task = ran(alice, workflows["fast"], [("a.png", png((8, 8)))])
    assert browser(bob).get(f"/tasks/{task.pk}/").status_code == 404
