"""
Normal users never see a ComfyUI server's address or a Python traceback: not on the task's page, in the list, in
the row htmx fetches, in the API's task JSON, in a pushed row, nor on an error page. Staff see the details raw.
"""

import asyncio

import pytest
from asgiref.sync import sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.test import Client

from servers.models import Server
from tasks.models import Task, TaskEvent, TaskStatus
from tasks.progress import aemit_task_update
from tasks.routing import websocket_urlpatterns
from tests.conftest import ApiClient

ADDRESS = "10.1.2.3"
CONNECTION_ERROR = (
    "HTTPConnectionPool(host='10.1.2.3', port=8188): Max retries exceeded with url: /view?filename=x.png"
)
TRACEBACK = [
    "Traceback (most recent call last):\n",
    '  File "/opt/ComfyUI/execution.py", line 151, in recursive_execute\n',
    "    output_data = get_output_data(obj, input_data_all)\n",
]
SECRETS = (ADDRESS, "Traceback", "/opt/ComfyUI", "recursive_execute")


@pytest.fixture(autouse=True)
def fast_hashing(settings):
    # Users are made with passwords; the default hasher takes a quarter of a second on purpose.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]



def failed_task(owner, workflow):
    server, _ = Server.objects.get_or_create(name="gpu-1", defaults={"base_url": f"http://{ADDRESS}:8188"})
    task = Task.objects.create(
        owner=owner, workflow=workflow, graph=workflow.graph, status=TaskStatus.FAILED, server=server,
        prompt_id=f"p-{owner.pk}", error_kind="node_error",
        error=f"KSampler (node 3) failed: {CONNECTION_ERROR}\n{''.join(TRACEBACK)}",
        error_details={
            "node_id": "3",
            "node_type": "KSampler",
            "exception_type": "requests.exceptions.ConnectionError",
            "exception_message": CONNECTION_ERROR,
            "traceback": TRACEBACK,
            "current_inputs": {"url": [f"http://{ADDRESS}:8188/prompt"]},
            "node_errors": {
                "3": {
                    "class_type": "KSampler",
                    "errors": [
                        {"message": "Exception when validating node", "details": "".join(TRACEBACK)},
                        {"message": "Could not fetch", "details": f"GET http://{ADDRESS}:8188/object_info failed"},
                    ],
                }
            },
        },
    )
    TaskEvent.objects.create(
        task=task, kind="unbound", server=server,
        message=f"gpu-1 unreachable: cannot connect for POST /prompt: [Errno 111] Connect call failed "
        f"('{ADDRESS}', 8188)",
    )
    return task


def text(reply):
    return reply.content.decode()


def assert_clean(page, where):
    found = [secret for secret in SECRETS if secret in page]
    assert not found, f"{where} shows {found}"


@pytest.mark.django_db
def test_pages_and_the_api_hide_addresses_and_tracebacks_from_users(alice, workflows):
    task = failed_task(alice, workflows["txt2img"])
    browser = Client()
    browser.force_login(alice)
    detail = text(browser.get(f"/tasks/{task.pk}/"))
    # What went wrong is still said, without the address.
    assert "KSampler (node 3) failed" in detail and "Max retries exceeded" in detail
    assert "Exception when validating node" in detail and "unreachable" in detail
    assert_clean(detail, "the task page")
    assert_clean(text(browser.get("/tasks/")), "the task list")
    assert_clean(text(browser.get("/tasks/?status=failed")), "the filtered task list")
    assert_clean(text(browser.get(f"/tasks/{task.pk}/row")), "the task row")
    assert_clean(text(browser.get("/")), "the home page")

    api = ApiClient(alice)
    body = api.get(f"/api/v1/tasks/{task.pk}").content.decode()
    assert_clean(body, "the API's task JSON")
    error = api.task(task.pk)["error"]
    assert error["kind"] == "node_error" and error["details"]["node_type"] == "KSampler"
    assert "traceback" not in error["details"] and "current_inputs" not in error["details"]
    assert_clean(api.get("/api/v1/tasks").content.decode(), "the API's task list")


@pytest.mark.django_db
def test_staff_see_the_details_raw(admin_user, workflows):
    task = failed_task(admin_user, workflows["txt2img"])
    error = ApiClient(admin_user).task(task.pk)["error"]
    assert error["details"]["traceback"] == TRACEBACK
    browser = Client()
    browser.force_login(admin_user)
    assert ADDRESS in text(browser.get(f"/tasks/{task.pk}/"))


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_pushed_row_hides_them_too(alice, workflows, settings):
    settings.COMFYHUB = {**settings.COMFYHUB, "PUSH_INTERVAL": 0.05}
    communicator = WebsocketCommunicator(URLRouter(websocket_urlpatterns), "/ws/tasks/")
    communicator.scope["user"] = alice
    connected, _ = await communicator.connect()
    assert connected
    task = await sync_to_async(failed_task)(alice, workflows["txt2img"])
    await aemit_task_update(task)
    frame = await communicator.receive_from(timeout=5)
    await asyncio.sleep(0)
    await communicator.disconnect()
    assert f'id="task-{task.pk}"' in frame and "KSampler (node 3) failed" in frame
    assert_clean(frame, "the pushed row")


def test_the_tests_run_without_debug(settings):
    assert settings.DEBUG is False


@pytest.mark.django_db
def test_an_api_crash_is_a_json_500_without_a_traceback(alice, monkeypatch, caplog):
    from tasks import api

    def crash(user):
        raise RuntimeError(f"boom: cannot reach http://{ADDRESS}:8188")

    monkeypatch.setattr(api, "user_tasks", crash)
    client = ApiClient(alice).client
    client.raise_request_exception = False
    reply = client.get("/api/v1/tasks")
    assert reply.status_code == 500 and reply["Content-Type"] == "application/json"
    assert reply.json()["error"]["code"] == "server_error"
    assert_clean(text(reply), "the API's 500")
    assert "boom" not in text(reply)
    assert "boom" in caplog.text, "the operators lost the error"


@pytest.mark.django_db
def test_a_page_crash_shows_no_traceback(alice, monkeypatch):
    from tasks import views

    def crash(user):
        raise RuntimeError(f"boom: cannot reach http://{ADDRESS}:8188")

    monkeypatch.setattr(views, "user_tasks", crash)
    browser = Client(raise_request_exception=False)
    browser.force_login(alice)
    reply = browser.get("/tasks/")
    assert reply.status_code == 500
    assert_clean(text(reply), "the 500 page")
    assert "boom" not in text(reply)


@pytest.mark.django_db
def test_a_servers_host_name_is_hidden_but_its_name_is_not(alice, workflows):
    server = Server.objects.create(name="gpu-2", base_url="http://gpu-box.lab.internal:8188")
    task = Task.objects.create(
        owner=alice, workflow=workflows["fast"], graph=workflows["fast"].graph, status=TaskStatus.FAILED,
        server=server, prompt_id="p-host", error="gpu-2 lost it: gpu-box.lab.internal did not answer",
        error_details={"why": "[Errno -2] Name or service not known: 'gpu-box.lab.internal'"},
    )
    browser = Client()
    browser.force_login(alice)
    page = text(browser.get(f"/tasks/{task.pk}/"))
    assert "gpu-2 lost it" in page and "gpu-box" not in page
    assert "gpu-box" not in ApiClient(alice).get(f"/api/v1/tasks/{task.pk}").content.decode()
