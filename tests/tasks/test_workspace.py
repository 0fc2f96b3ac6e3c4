"""The workflow page as a workspace: a submit that stays on the page, batches, forms that keep the user's work."""

import re

import pytest

from servers.models import Server, ServerState
from tasks.models import Task, TaskStatus
from tests.tasks.test_views import browser, finished_task, txt2img_form

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice_browser(alice):
    return browser(alice)


def test_an_htmx_submit_answers_the_new_rows_for_the_page(alice_browser, workflows):
    reply = alice_browser.post("/workflows/txt2img/", txt2img_form(), headers={"HX-Request": "true"})
    assert reply.status_code == 200
    task = Task.objects.get()
    html = reply.content.decode()
    assert html.lstrip().startswith(f'<article class="task task--queued" id="task-{task.pk}"')
    assert "<form id=\"submit-form\"" not in html  # the form stays as the user left it


def test_an_htmx_submit_with_an_error_answers_the_form_in_place(alice_browser, workflows):
    reply = alice_browser.post("/workflows/txt2img/", txt2img_form(steps="1000"), headers={"HX-Request": "true"})
    assert reply.status_code == 422
    assert reply["HX-Retarget"] == "#submit-form" and reply["HX-Reswap"] == "outerHTML"
    html = reply.content.decode()
    assert html.lstrip().startswith('<form id="submit-form"')
    assert "Ensure this value is less than or equal to 100." in html
    assert Task.objects.count() == 0


def test_a_batch_runs_that_many_tasks_with_consecutive_seeds(alice_browser, workflows):
    reply = alice_browser.post("/workflows/txt2img/", txt2img_form(seed="41", seed_random="", batch="4"))
    assert reply.status_code == 302
    seeds = sorted(Task.objects.values_list("inputs__seed", flat=True))
    assert seeds == [41, 42, 43, 44]
    Task.objects.all().delete()
    alice_browser.post("/workflows/txt2img/", txt2img_form(batch="3"))
    first, *rest = sorted(Task.objects.values_list("inputs__seed", flat=True))
    assert rest == [first + 1, first + 2]


@pytest.mark.parametrize("count", ["0", "9", "two"])
def test_a_batch_out_of_range_is_a_form_error(alice_browser, workflows, count):
    reply = alice_browser.post("/workflows/txt2img/", txt2img_form(batch=count))
    assert reply.status_code == 400 and Task.objects.count() == 0


def test_a_batch_past_the_quota_creates_none_of_it(alice_browser, workflows, settings):
    settings.COMFYHUB = {**settings.COMFYHUB, "USER_MAX_QUEUED": 3}
    reply = alice_browser.post("/workflows/txt2img/", txt2img_form(batch="5"))
    assert reply.status_code == 400
    assert "the most one user may have" in reply.content.decode()
    assert Task.objects.count() == 0


def test_an_emptied_required_text_is_an_error_not_the_default(alice_browser, alice_api, workflows):
    reply = alice_browser.post("/workflows/txt2img/", txt2img_form(prompt=""))
    assert reply.status_code == 400 and "This field is required." in reply.content.decode()
    reply = alice_api.post("/api/v1/tasks", {"workflow": "txt2img", "inputs": {"prompt": ""}})
    assert reply.status_code == 400 and reply.json()["error"]["details"]["prompt"] == "must not be empty"
    assert Task.objects.count() == 0
    # A field declared "required": false may be empty, and stays empty (not its default).
    alice_browser.post("/workflows/txt2img/", txt2img_form(negative=""))
    task = Task.objects.get()
    assert task.graph["7"]["inputs"]["text"] == "" and task.inputs["negative"] == ""
    # Left out entirely (an API call that does not care), a parameter takes its default.
    reply = alice_api.post("/api/v1/tasks", {"workflow": "txt2img", "inputs": {}})
    assert reply.status_code == 201
    assert Task.objects.get(pk=reply.json()["id"]).inputs["prompt"] == "a lighthouse on a cliff at dusk, oil painting"


def test_a_seed_typed_with_random_ticked_is_one_clear_error(alice_browser, workflows):
    reply = alice_browser.post("/workflows/txt2img/", txt2img_form(seed="7", seed_random="on"))
    assert reply.status_code == 400
    page = reply.content.decode()
    errors = re.findall(r'<ul class="errorlist"[^>]*>(.*?)</ul>', page, re.S)
    assert len(errors) == 1 and "Untick “random” to use the seed you typed" in errors[0]
    assert Task.objects.count() == 0


def test_numbers_honour_their_step(alice_browser, alice_api, workflows):
    reply = alice_browser.post("/workflows/txt2img/", txt2img_form(width="65"))
    assert reply.status_code == 400 and "multiple of step size 64" in reply.content.decode()
    reply = alice_api.post(
        "/api/v1/tasks", {"workflow": "txt2img", "inputs": {"width": 65}}
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["details"]["width"] == "must be 64 plus a multiple of 64 (64 or 128, for instance)"
    reply = alice_api.post(
        "/api/v1/tasks", {"workflow": "txt2img", "inputs": {"width": 576, "cfg": 7.5}}
    )
    assert reply.status_code == 201
    assert Task.objects.count() == 1


def test_a_colour_is_picked_with_a_colour_field(alice_browser, alice_api, workflows):
    page = alice_browser.get("/workflows/fast/").content.decode()
    default = workflows["fast"].parameters[0]["default"]
    assert f'<input type="color" name="color" value="#{default:06x}"' in page
    alice_browser.post("/workflows/fast/", {"color": "#ff8000", "batch": "1"})
    assert Task.objects.get().inputs["color"] == 0xFF8000
    reply = alice_api.post("/api/v1/tasks", {"workflow": "fast", "inputs": {"color": "red"}})
    assert reply.status_code == 400 and "#rrggbb" in reply.json()["error"]["details"]["color"]


def test_the_workspace_shows_this_workflows_runs_and_results(alice, bob, alice_browser, workflows):
    done = finished_task(alice, workflows["fast"])
    other = finished_task(alice, workflows["invert"])
    theirs = finished_task(bob, workflows["fast"])
    page = alice_browser.get("/workflows/fast/").content.decode()
    assert f'id="task-{done.pk}"' in page and f'id="task-{other.pk}"' not in page
    assert str(theirs.pk) not in page and str(theirs.outputs.get().pk) not in page
    assert f'href="/workflows/fast/?from={done.pk}">Use these settings' in page
    assert f'src="/outputs/{done.outputs.get().pk}/thumb"' in page


def test_the_pool_state_says_how_busy_the_pool_is(alice, bob, alice_browser, workflows):
    Server.objects.create(name="gpu-1", base_url="http://127.0.0.1:9", state=ServerState.ONLINE)
    Server.objects.create(name="gpu-2", base_url="http://127.0.0.1:8", state=ServerState.ONLINE, draining=True)
    Task.objects.bulk_create([Task(owner=bob, workflow=workflows["fast"], graph={}) for _ in range(5)])
    page = alice_browser.get("/").content.decode()
    assert "<b class=\"servers\">1</b> of 2 servers taking tasks, 1 draining" in page
    # Users take turns: of bob's five, one goes before a new task of hers.
    assert "<b>1</b> task ahead of a new one" in page
    page = alice_browser.get("/workflows/fast/").content.decode()
    assert "no recent runs of this workflow to time" in page
    Server.objects.filter(name="gpu-1").update(draining=True)
    page = alice_browser.get("/").content.decode()
    assert "every server is draining" in page and "no server is online" not in page


def test_cancel_several_at_once_only_touches_ones_own(alice, bob, alice_browser, workflows):
    mine = [Task.objects.create(owner=alice, workflow=workflows["fast"], graph={}) for _ in range(3)]
    theirs = Task.objects.create(owner=bob, workflow=workflows["fast"], graph={})
    reply = alice_browser.post(
        "/tasks/cancel", {"ids": [str(mine[0].pk), str(mine[1].pk), str(theirs.pk), "not-an-id"], "next": "/tasks/"}
    )
    assert reply.status_code == 302 and reply["Location"] == "/tasks/"
    statuses = dict(Task.objects.values_list("pk", "status"))
    assert statuses[mine[0].pk] == statuses[mine[1].pk] == TaskStatus.CANCELLED
    assert statuses[mine[2].pk] == TaskStatus.QUEUED and statuses[theirs.pk] == TaskStatus.QUEUED
    page = alice_browser.get("/tasks/").content.decode()
    assert "Cancelling 2 tasks." in page


def test_the_badge_counts_every_active_task_and_the_title_the_running_ones(alice, alice_browser, workflows):
    Task.objects.create(owner=alice, workflow=workflows["fast"], graph={})
    Task.objects.create(owner=alice, workflow=workflows["fast"], graph={}, status=TaskStatus.RUNNING)
    page = alice_browser.get("/").content.decode()
    assert re.search(r'id="running-count"[^>]*data-count="2" data-running="1"', page)
    assert "<title>(1 running) " in page


def test_queued_tasks_are_listed_in_the_order_they_will_run(alice, alice_browser, workflows):
    first = Task.objects.create(owner=alice, workflow=workflows["fast"], graph={})
    second = Task.objects.create(owner=alice, workflow=workflows["fast"], graph={})
    page = alice_browser.get("/tasks/?status=queued").content.decode()
    assert page.index(f"task-{first.pk}") < page.index(f"task-{second.pk}")
    assert "waiting in the hub&#x27;s queue, 1st" in page and 'data-order="run"' in page
