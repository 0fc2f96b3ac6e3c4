"""The buttons of /ops/: drain, undrain, probe a server, check the pool. Staff only, POST only, CSRF-checked."""

import re
import uuid
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from servers.models import Server
from tasks.models import Task, TaskStatus
from tests.ops.conftest import browser

pytestmark = pytest.mark.django_db(transaction=True)

GRAPH = {"1": {"class_type": "EmptyImage", "inputs": {"color": 1}}}
ACTIONS = ["/ops/servers/gpu-a/drain/", "/ops/servers/gpu-a/undrain/", "/ops/servers/gpu-a/probe/",
           "/ops/check-consistency/"]


@pytest.fixture
def gpu(simulator):
    return Server.objects.create(name="gpu-a", base_url=simulator.url, state="online")


def messages_of(html):
    return [re.sub(r"\s+", " ", text) for text in re.findall(r'<li class="message message--\w+">(.*?)</li>', html)]


def server_card(html, server):
    start = html.index(f'id="server-{server.pk}"')
    return html[start : html.index("</article>", start)]


def test_staff_drain_and_undrain_a_server_without_javascript(operator, gpu):
    client = browser(operator)
    reply = client.post("/ops/servers/gpu-a/drain/")
    assert reply.status_code == 302 and reply["Location"] == "/ops/"
    assert Server.objects.get(pk=gpu.pk).draining
    html = client.get("/ops/").content.decode()
    assert messages_of(html) == ["gpu-a is draining: no new work goes to it; what it has runs to the end."]
    card = server_card(html, gpu)
    assert 'data-draining="true"' in card and "<dt>Draining</dt><dd>yes: no new work goes to it</dd>" in card
    assert 'action="/ops/servers/gpu-a/undrain/"' in card and 'action="/ops/servers/gpu-a/drain/"' not in card

    client.post("/ops/servers/gpu-a/drain/")
    assert messages_of(client.get("/ops/").content.decode()) == ["gpu-a was draining already."]

    client.post("/ops/servers/gpu-a/undrain/")
    html = client.get("/ops/").content.decode()
    assert messages_of(html) == ["gpu-a takes new work again."]
    assert not Server.objects.get(pk=gpu.pk).draining
    card = server_card(html, gpu)
    assert "<dt>Draining</dt><dd>no</dd>" in card and 'action="/ops/servers/gpu-a/drain/"' in card
    assert messages_of(client.get("/ops/").content.decode()) == []  # said once


def test_with_htmx_the_answer_swaps_the_body_and_the_messages_in_place(operator, gpu):
    client = browser(operator)
    reply = client.post("/ops/servers/gpu-a/drain/", headers={"HX-Request": "true"})
    assert reply.status_code == 200
    html = reply.content.decode()
    assert html.startswith('<div id="ops-body" class="ops-body" hx-swap-oob="true">')
    assert 'data-draining="true"' in server_card(html, gpu)
    notes = html[html.index('<ul id="ops-notes"') :]
    assert 'hx-swap-oob="true"' in notes[:120]
    assert messages_of(notes) == ["gpu-a is draining: no new work goes to it; what it has runs to the end."]
    assert messages_of(client.get("/ops/").content.decode()) == []  # shown by the swap, not again on the next page


def test_the_page_labels_a_servers_limits_in_words(operator, gpu):
    Server.objects.filter(pk=gpu.pk).update(pipeline_depth=2, max_in_flight=3)
    card = server_card(browser(operator).get("/ops/").content.decode(), gpu)
    assert "<dt>Tasks</dt><dd>pipeline depth 2, at most 3 on the server</dd>" in card
    assert "<dt>Draining</dt><dd>no</dd>" in card  # plain text, not an error badge
    assert "badge--draining" not in card


def test_staff_probe_a_server_and_read_what_it_answered(operator, gpu, simulator):
    client = browser(operator)
    client.post("/ops/servers/gpu-a/probe/")
    [message] = messages_of(client.get("/ops/").content.decode())
    assert message.startswith("Server gpu-a answers; 0 prompt(s) of other clients queued;")
    assert Server.objects.get(pk=gpu.pk).capabilities["classes"]["SaveImage"] == {}
    simulator.unplug()
    try:
        reply = client.post("/ops/servers/gpu-a/probe/", headers={"HX-Request": "true"})
        assert 'class="message message--error">Server gpu-a: no answer:' in reply.content.decode()
    finally:
        simulator.plug()


def test_staff_check_the_pools_consistency_and_nothing_changes(operator, alice, gpu):
    client = browser(operator)
    client.post("/ops/check-consistency/")
    assert messages_of(client.get("/ops/").content.decode()) == [
        "Checked 1 server, 0 tasks, 0 outputs, 0 uploaded files: nothing to repair."
    ]
    long_ago = timezone.now() - timedelta(hours=1)
    lost = Task.objects.create(
        owner=alice, graph=GRAPH, status=TaskStatus.SUBMITTED, server=gpu, prompt_id=str(uuid.uuid4()),
        client_id=gpu.client_id, submitted_at=long_ago, accepted_at=long_ago, last_event_at=long_ago, attempts=1,
    )
    client.post("/ops/check-consistency/")
    summary, finding = messages_of(client.get("/ops/").content.decode())
    assert summary.startswith(
        "Checked 1 server, 1 task, 0 outputs, 0 uploaded files: found 1: 1 hub task the server does not know."
    )
    assert "Repair with manage.py check_consistency --fix" in summary
    assert finding.startswith(f"[unknown_to_server] server=gpu-a task={lost.pk}")
    assert Task.objects.get(pk=lost.pk).status == TaskStatus.SUBMITTED  # a report, not a repair


def test_the_page_has_a_button_for_each_action(operator, gpu):
    html = browser(operator).get("/ops/").content.decode()
    for action in ["/ops/servers/gpu-a/drain/", "/ops/servers/gpu-a/probe/", "/ops/check-consistency/"]:
        form = re.search(rf'<form[^>]* method="post" action="{action}" hx-post="{action}" hx-swap="none"[^>]*>', html)
        assert form, action
        assert 'name="csrfmiddlewaretoken"' in html[form.end() : form.end() + 200]


def test_normal_users_get_a_404_and_change_nothing(alice, gpu):
    client = browser(alice)
    for path in ACTIONS:
        assert client.post(path).status_code == 404, path
    assert not Server.objects.get(pk=gpu.pk).draining
    assert Server.objects.get(pk=gpu.pk).capabilities == {}  # not probed


def test_anonymous_visitors_are_sent_to_log_in(gpu):
    for path in ACTIONS:
        reply = browser().post(path)
        assert reply.status_code == 302 and reply["Location"].startswith("/accounts/login/"), path
    assert not Server.objects.get(pk=gpu.pk).draining


def test_a_get_changes_nothing(operator, gpu):
    client = browser(operator)
    for path in ACTIONS:
        assert client.get(path).status_code == 405, path
    assert not Server.objects.get(pk=gpu.pk).draining


def test_an_unknown_server_is_a_404(operator, gpu):
    assert browser(operator).post("/ops/servers/gpu-z/drain/").status_code == 404


def test_a_staff_session_cannot_be_made_to_act_without_the_csrf_token(operator, gpu):
    """A page elsewhere that posts a form to the hub rides on the staff member's cookie, but has no token."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(operator)
    for path in ACTIONS:
        assert client.post(path).status_code == 403, path
    assert not Server.objects.get(pk=gpu.pk).draining
    html = client.get("/ops/").content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html).group(1)
    assert client.post("/ops/servers/gpu-a/drain/", {"csrfmiddlewaretoken": token}).status_code == 302
    assert Server.objects.get(pk=gpu.pk).draining
