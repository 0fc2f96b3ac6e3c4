"""
The gallery: each image with what made it for the lightbox (prompt, seed, other inputs, run again, use these
settings, download), filters by workflow and day that survive paging, clear words for a bad day, and nothing of
another user's images whatever the filters say.
"""

import io
import re
from datetime import UTC, datetime

import pytest
from django.test import Client
from PIL import Image

from servers.models import Server
from tasks import gallery, outputs
from tasks.models import Task, TaskOutput, TaskStatus

pytestmark = pytest.mark.django_db

TXT2IMG = {"prompt": "a red fox in the snow", "negative": "blurry", "seed": 4242, "steps": 12, "cfg": 7.5,
           "sampler": "euler", "width": 512, "height": 512}


def png(size=(20, 10)):
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


def browser(user):
    client = Client()
    client.force_login(user)
    return client


def image_of(owner, workflow, inputs=None, made=None):
    """One finished task of `owner` with one PNG; `made`: the day its output was made."""
    server, _ = Server.objects.get_or_create(name="gpu-x", defaults={"base_url": "http://127.0.0.1:9"})
    task = Task.objects.create(
        owner=owner, workflow=workflow, graph=workflow.graph if workflow else {"1": {"class_type": "X"}},
        inputs=inputs or ({"color": 1} if workflow else {}), status=TaskStatus.RUNNING, server=server,
        prompt_id=f"p-{Task.objects.count()}",
    )
    assert outputs.complete(task, [("9", "ComfyUI_00001_.png", "image/png", png())], "test")
    output = task.outputs.get()
    if made is not None:
        TaskOutput.objects.filter(pk=output.pk).update(created_at=made)
    return output


def shown(page, output):
    return f"/outputs/{output.pk}/thumb" in page


def day(text):
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def lightbox_info(page, output):
    """The part of the page the lightbox shows for `output`."""
    figure = page.split(f'data-output="{output.pk}"', 1)[1].split("</figure>", 1)[0]
    return figure.split('class="shot__info"', 1)[1]


def test_a_picture_carries_what_made_it_and_what_to_do_with_it(alice, workflows):
    output = image_of(alice, workflows["txt2img"], TXT2IMG)
    page = browser(alice).get("/gallery/").content.decode()
    info = lightbox_info(page, output)
    assert '<p class="shot__prompt">a red fox in the snow</p>' in info
    assert '<dd class="shot__seed">4242</dd>' in info
    for label, value in [("Negative prompt", "blurry"), ("Steps", "12"), ("Sampler", "euler")]:
        assert re.search(rf"<dt>{label}</dt><dd>{value}</dd>", info, re.I), label
    assert "20×10" in info  # the picture's own size
    assert f'action="/tasks/{output.task_id}/rerun"' in info and "csrfmiddlewaretoken" in info
    assert f'href="/workflows/txt2img/?from={output.task_id}">Use these settings</a>' in info
    assert f'href="/outputs/{output.pk}/?download=1"' in info
    # Without JavaScript the picture leads to its task's page, at this output.
    assert f'href="/tasks/{output.task_id}/#output-{output.pk}" data-full="/outputs/{output.pk}/"' in page
    assert '<dialog id="lightbox"' in page


def test_a_raw_graph_has_no_settings_to_reuse(alice):
    output = image_of(alice, None)
    info = lightbox_info(browser(alice).get("/gallery/").content.decode(), output)
    assert "Use these settings" not in info and "/workflows/" not in info
    assert f'action="/tasks/{output.task_id}/rerun"' in info and "Download" in info
    assert "submitted as a raw graph" in info


def test_it_filters_by_workflow_among_my_own_workflows(alice, bob, workflows):
    fast = image_of(alice, workflows["fast"])
    invert = image_of(alice, workflows["invert"])
    image_of(bob, workflows["txt2img"], TXT2IMG)
    client = browser(alice)
    page = client.get("/gallery/").content.decode()
    select = page.split('<select name="workflow">', 1)[1].split("</select>", 1)[0]
    assert 'value="fast"' in select and 'value="invert"' in select
    assert 'value="txt2img"' not in select  # only bob has used it
    page = client.get("/gallery/?workflow=invert").content.decode()
    assert shown(page, invert) and not shown(page, fast)
    assert '<option value="invert" selected>' in page


def test_a_workflow_i_have_no_images_of_is_said_and_shows_all_mine(alice, bob, workflows):
    mine = image_of(alice, workflows["fast"])
    image_of(bob, workflows["txt2img"], TXT2IMG)
    page = browser(alice).get("/gallery/?workflow=txt2img").content.decode()
    assert "None of your images comes from a workflow “txt2img”; showing them all." in page
    assert shown(page, mine)


def test_it_filters_by_day_from_and_to(alice, workflows):
    early = image_of(alice, workflows["fast"], made=day("2026-03-01T10:00:00"))
    middle = image_of(alice, workflows["fast"], made=day("2026-03-02T23:59:00"))
    late = image_of(alice, workflows["fast"], made=day("2026-03-04T00:00:00"))
    client = browser(alice)
    page = client.get("/gallery/?from=2026-03-02&to=2026-03-03").content.decode()
    assert shown(page, middle) and not shown(page, early) and not shown(page, late)
    page = client.get("/gallery/?from=2026-03-02").content.decode()
    assert shown(page, middle) and shown(page, late) and not shown(page, early)
    page = client.get("/gallery/?to=2026-03-01").content.decode()
    assert shown(page, early) and not shown(page, middle)
    assert 'name="to" value="2026-03-01"' in page  # the form shows what it filters by


def test_a_bad_day_is_a_clear_message_not_an_error(alice, workflows):
    mine = image_of(alice, workflows["fast"])
    for bad in ("2026-13-45", "yesterday", "2026-02-30", "9" * 500):
        reply = browser(alice).get("/gallery/", {"from": bad})
        assert reply.status_code == 200, bad
        page = reply.content.decode()
        assert "is not a day: write it as YYYY-MM-DD (e.g. 2026-12-07). It was left out." in page, bad
        assert shown(page, mine)


def test_from_after_to_says_so(alice, workflows):
    image_of(alice, workflows["fast"], made=day("2026-03-02T12:00:00"))
    page = browser(alice).get("/gallery/?from=2026-03-05&to=2026-03-01").content.decode()
    assert "The “from” day is after the “to” day" in page
    assert "No images match these filters." in page


def test_the_filters_survive_paging(alice, workflows, monkeypatch):
    monkeypatch.setattr(gallery, "PAGE_SIZE", 2)
    made = [image_of(alice, workflows["fast"], made=day(f"2026-03-0{n}T12:00:00")) for n in (1, 2, 3, 4)]
    image_of(alice, workflows["invert"], made=day("2026-03-03T12:00:00"))
    client = browser(alice)
    page = client.get("/gallery/?workflow=fast&from=2026-03-02").content.decode()
    assert shown(page, made[3]) and shown(page, made[2]) and not shown(page, made[1])
    older = re.search(r'<a href="([^"]+)">older →</a>', page).group(1).replace("&amp;", "&")
    assert older == "?workflow=fast&from=2026-03-02&page=2"
    page = client.get("/gallery/" + older).content.decode()
    assert shown(page, made[1]) and not shown(page, made[0]) and "page 2 of 2" in page
    newer = re.search(r'<a href="([^"]+)">← newer</a>', page).group(1).replace("&amp;", "&")
    assert newer == "?workflow=fast&from=2026-03-02&page=1"


def test_bob_sees_nothing_of_alices_images_whatever_he_asks(alice, bob, workflows):
    alices = image_of(alice, workflows["txt2img"], TXT2IMG, made=day("2026-03-02T12:00:00"))
    bobs = image_of(bob, workflows["fast"], made=day("2026-03-02T12:00:00"))
    client = browser(bob)
    for query in ("", "?workflow=txt2img", f"?workflow={gallery.RAW_GRAPHS}", "?from=2026-03-01&to=2026-03-03",
                  "?workflow=fast&from=2026-03-02", "?page=2"):
        page = client.get("/gallery/" + query).content.decode()
        assert str(alices.pk) not in page and str(alices.task_id) not in page, query
        assert "a red fox in the snow" not in page and "4242" not in page, query
    assert shown(client.get("/gallery/").content.decode(), bobs)
    for path in (f"/outputs/{alices.pk}/", f"/outputs/{alices.pk}/thumb", f"/tasks/{alices.task_id}/"):
        assert client.get(path).status_code == 404, path
    assert client.post(f"/tasks/{alices.task_id}/rerun").status_code == 404
    # Alice's settings do not fill bob's form.
    form = client.get(f"/workflows/txt2img/?from={alices.task_id}").content.decode()
    assert "a red fox in the snow" not in form


def test_raw_graphs_are_a_choice_only_for_a_user_who_has_some(alice, bob, workflows):
    raw = image_of(alice, None)
    fast = image_of(alice, workflows["fast"])
    page = browser(alice).get("/gallery/").content.decode()
    assert f'<option value="{gallery.RAW_GRAPHS}"' in page
    page = browser(alice).get("/gallery/", {"workflow": gallery.RAW_GRAPHS}).content.decode()
    assert shown(page, raw) and not shown(page, fast)
    image_of(bob, workflows["fast"])
    assert gallery.RAW_GRAPHS not in browser(bob).get("/gallery/").content.decode()
