"""
The per-user storage quota: once a user's files take it, every way in for new work or new files (the workspace
form, "run again", API v1, API v2 jobs and assets) refuses with the figures and what to do, and leaves nothing
behind; other users go on as before, and work accepted earlier still finishes.
"""

import io

import pytest
from django.test import Client

from servers.models import Server
from tasks import outputs
from tasks.models import Asset, Task, TaskOutput, TaskStatus, Upload
from tasks.quota import human_size, storage_usage, storage_used
from tasks.v2.assets import output_asset
from tests.tasks.test_api import png_bytes, upload
from tests.tasks.test_views import finished_task, txt2img_form
from tests.v2.conftest import FAST_GRAPH, V2Client
from tests.v2.test_assets import V2, png

pytestmark = pytest.mark.django_db

CODE = "storage_quota_exceeded"


def browser(user):
    client = Client()
    client.force_login(user)
    return client


def set_quota(settings, size):
    settings.COMFYHUB = {**settings.COMFYHUB, "USER_STORAGE_BYTES": size}


def files_on_disk(media_root):
    return sorted(path for path in media_root.rglob("*") if path.is_file()) if media_root.exists() else []


@pytest.fixture
def full(alice, alice_api, settings):
    """Alice has one upload, and the quota is exactly what her files take: she is at it."""
    assert upload(alice_api).status_code == 201
    set_quota(settings, storage_used(alice))
    return storage_usage(alice)


def assert_refusal(body, usage):
    error = body["error"]
    assert error["code"] == CODE
    assert f"You are using {human_size(usage.total)} of your {human_size(usage.quota)}" in error["message"]
    assert "ask an operator" in error["message"]
    assert error["details"] == {"used_bytes": usage.total, "quota_bytes": usage.quota}


def test_usage_sums_outputs_uploads_and_sent_assets_once_each(alice, bob, alice_api, workflows):
    upload(alice_api)
    task = finished_task(alice, workflows["fast"])
    output_asset(task.outputs.get())  # shares the output's file: no bytes of its own
    sent = V2(alice).upload(png(colour=(1, 2, 3)))
    assert sent.status_code == 201
    finished_task(bob, workflows["fast"])
    usage = storage_usage(alice)
    assert usage.outputs == TaskOutput.objects.get(task=task).size
    assert usage.uploads == Upload.objects.get(owner=alice).size
    assert usage.assets == sent.json()["size_bytes"]
    assert storage_used(alice) == usage.outputs + usage.uploads + usage.assets
    assert storage_used(bob) == TaskOutput.objects.get(task__owner=bob).size


def test_the_v1_api_refuses_new_tasks_and_uploads_when_storage_is_full(full, alice_api, bob_api, workflows, media_root):
    before = files_on_disk(media_root)
    reply = alice_api.submit("invert", {"color": 255})
    assert reply.status_code == 403, reply.content
    assert_refusal(reply.json(), full)
    reply = upload(alice_api, png_bytes(color=(1, 1, 1)))
    assert reply.status_code == 403
    assert_refusal(reply.json(), full)
    assert Task.objects.count() == 0 and Upload.objects.count() == 1
    assert files_on_disk(media_root) == before
    # Bob's files are his own business: he is nowhere near the quota.
    assert bob_api.submit("invert", {"color": 255}).status_code == 201
    assert upload(bob_api).status_code == 201


def test_under_the_quota_a_user_goes_on(alice, alice_api, settings, workflows):
    assert upload(alice_api).status_code == 201
    set_quota(settings, storage_used(alice) + 1)
    assert alice_api.submit("invert", {"color": 255}).status_code == 201
    set_quota(settings, 0)  # no limit at all
    for _ in range(3):
        assert upload(alice_api, png_bytes(color=(_, 0, 0))).status_code == 201


def test_the_workspace_form_refuses_a_batch_and_keeps_no_image(full, alice, workflows, media_root):
    client = browser(alice)
    before = files_on_disk(media_root)
    reply = client.post("/workflows/txt2img/", txt2img_form(batch="3"))
    assert reply.status_code == 400
    page = reply.content.decode()
    assert "new tasks and uploads are refused" in page and "ask an operator" in page
    image = io.BytesIO(png_bytes(color=(9, 9, 9)))
    image.name = "cat.png"
    reply = client.post("/workflows/upload-scale/", {"image": image, "scale_by": "0.5", "method": "area"})
    assert reply.status_code == 400
    assert reply.content.decode().count("new tasks and uploads are refused") == 1
    assert 'src="/uploads/' not in reply.content.decode()  # no image kept for the next try
    assert Task.objects.count() == 0 and Upload.objects.count() == 1
    assert files_on_disk(media_root) == before


def test_an_image_is_not_kept_past_the_quota_when_another_field_is_wrong(full, alice, workflows, media_root):
    before = files_on_disk(media_root)
    image = io.BytesIO(png_bytes(color=(9, 9, 9)))
    image.name = "cat.png"
    reply = browser(alice).post("/workflows/upload-scale/", {"image": image, "scale_by": "99", "method": "area"})
    assert reply.status_code == 400
    assert "new tasks and uploads are refused" in reply.content.decode()
    assert Upload.objects.count() == 1 and files_on_disk(media_root) == before


def test_run_again_is_refused_with_the_reason(alice, alice_api, settings, workflows):
    task = finished_task(alice, workflows["fast"])
    set_quota(settings, storage_used(alice))
    client = browser(alice)
    reply = client.post(f"/tasks/{task.pk}/rerun", follow=True)
    assert "Could not run it again: You are using" in reply.content.decode()
    assert Task.objects.count() == 1


def test_v2_jobs_are_refused_with_403_and_no_retry_after(full, alice, bob, raw_graph_permission, media_root):
    alice.user_permissions.add(raw_graph_permission)
    bob.user_permissions.add(raw_graph_permission)
    before = files_on_disk(media_root)
    reply = V2Client(alice).submit(FAST_GRAPH)
    assert reply.status_code == 403, reply.content
    assert_refusal(reply.json(), full)
    assert "Retry-After" not in reply.headers
    assert Task.objects.count() == 0
    assert V2Client(bob).submit(FAST_GRAPH).status_code == 201
    assert files_on_disk(media_root) == before


def test_a_v2_job_naming_an_asset_makes_no_upload_when_refused(alice, raw_graph_permission, settings, media_root):
    alice.user_permissions.add(raw_graph_permission)
    sent = V2(alice).upload(png())
    assert sent.status_code == 201
    set_quota(settings, storage_used(alice))
    reference = {"__type": "core/ASSET", "info": {"id": sent.json()["id"]}}
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": reference}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    before = files_on_disk(media_root)
    reply = V2Client(alice).submit(graph)
    assert reply.status_code == 403 and reply.json()["error"]["code"] == CODE
    assert Upload.objects.count() == 0 and Task.objects.count() == 0
    assert files_on_disk(media_root) == before


def test_v2_assets_refuse_new_bytes_but_give_back_what_the_user_has(alice, bob, settings, workflows, media_root):
    data = png(colour=(50, 60, 70))
    assert V2(alice).upload(data).status_code == 201
    task = finished_task(alice, workflows["fast"])
    set_quota(settings, storage_used(alice))
    usage = storage_usage(alice)
    before = files_on_disk(media_root)
    reply = V2(alice).upload(png(colour=(1, 1, 1)))
    assert reply.status_code == 403
    assert_refusal(reply.json(), usage)
    # The same bytes again cost nothing: she gets the asset she has.
    again = V2(alice).upload(data)
    assert again.status_code == 200 and again.json()["created_new"] is False
    # Minting an upload from an output's bytes would store a second copy.
    output_hash = output_asset(task.outputs.get()).hash
    reply = V2(alice).from_hash(output_hash)
    assert reply.status_code == 403 and reply.json()["error"]["code"] == CODE
    assert Asset.objects.uploaded().count() == 1
    assert files_on_disk(media_root) == before
    assert V2(bob).upload(png(colour=(1, 1, 1))).status_code == 201


def test_the_openapi_documents_say_a_refusal_is_403(alice_api):
    v1 = alice_api.get("/api/v1/openapi.json").json()["paths"]
    assert "403" in v1["/api/v1/tasks"]["post"]["responses"] and "403" in v1["/api/v1/uploads"]["post"]["responses"]
    v2 = alice_api.get("/api/v2/openapi.json").json()["paths"]
    assert "403" in v2["/api/v2/assets"]["post"]["responses"]
    assert "403" in v2["/api/v2/assets/from-hash"]["post"]["responses"]


def test_work_accepted_before_the_quota_still_stores_its_outputs(alice, alice_api, settings, workflows):
    queued = alice_api.submit("fast", {})
    assert queued.status_code == 201
    assert upload(alice_api).status_code == 201
    set_quota(settings, storage_used(alice))
    # The engine takes the task on and it finishes: its results are stored, taking her over the quota.
    server = Server.objects.create(name="gpu-q", base_url="http://127.0.0.1:9")
    task = Task.objects.get(pk=queued.json()["id"])
    Task.objects.filter(pk=task.pk).update(status=TaskStatus.RUNNING, server=server, prompt_id="p-q")
    task.refresh_from_db()
    assert outputs.complete(task, [("9", "ComfyUI_00001_.png", "image/png", png_bytes(size=(64, 64)))], "test")
    task.refresh_from_db()
    assert task.status == TaskStatus.SUCCEEDED and task.outputs.count() == 1
    assert storage_used(alice) > settings.COMFYHUB["USER_STORAGE_BYTES"]
    assert alice_api.submit("fast", {}).status_code == 403


# --- what the account page says --------------------------------------------------------------------------------


def storage_card(client):
    page = client.get("/account/").content.decode()
    start = page.index('<section class="card storage')
    return page[start : page.index("</section>", start)]


def test_the_account_page_shows_ones_own_storage_and_no_limit(alice, bob, alice_api, workflows):
    upload(alice_api)
    finished_task(alice, workflows["fast"])
    finished_task(bob, workflows["fast"])
    usage = storage_usage(alice)
    card = storage_card(browser(alice))
    assert f'<strong class="storage-used">{human_size(usage.total)}</strong> used' in card
    assert "There is no storage limit" in card and "<meter" not in card
    assert f"Results: {human_size(usage.outputs)}" in card and f"Uploaded images: {human_size(usage.uploads)}" in card
    # Bob sees his own figure, not alice's, nor the two added up.
    bob_card = storage_card(browser(bob))
    assert f'<strong class="storage-used">{human_size(storage_used(bob))}</strong> used' in bob_card
    assert "Uploaded images: 0 bytes" in bob_card


def test_the_account_page_shows_the_quota_and_warns_near_and_at_it(alice, alice_api, settings):
    upload(alice_api)
    used = storage_used(alice)
    set_quota(settings, used * 4)
    card = storage_card(browser(alice))
    assert f"of your <strong class=\"storage-quota\">{human_size(used * 4)}</strong>" in card
    assert '<span class="storage-percent">25%</span>' in card
    assert f'max="{used * 4}" value="{used}"' in card
    assert "nearly full" not in card and "is full" not in card
    set_quota(settings, used + 1)
    card = storage_card(browser(alice))
    assert "Your storage is nearly full." in card and "storage--near" in card
    set_quota(settings, used)
    card = storage_card(browser(alice))
    assert "Your storage is full:" in card and "new tasks and uploads are refused" in card
    assert '<span class="storage-percent">100%</span>' in card
