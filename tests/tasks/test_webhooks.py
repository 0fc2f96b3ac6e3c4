"""Webhooks: checked URLs, signed deliveries to a real receiver, retries with backoff, and nobody else's news."""

import asyncio
import json
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone
from standardwebhooks import Webhook

from servers.webhooks import WebhookSender
from tasks.models import ApiToken, DeliveryStatus, Task, TaskStatus, WebhookDelivery, webhook_url_problem
from tests.conftest import ApiClient, wait_for
from tests.tasks.test_engine import finished

pytestmark = pytest.mark.django_db(transaction=True)


class Receiver:
    """A real HTTP server on 127.0.0.1 that records each POST and answers with the next of `codes` (then 200)."""

    def __init__(self, codes=(), delay=0.0):
        self.codes = list(codes)
        self.delay = delay
        self.received = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append({"headers": dict(self.headers), "body": body, "path": self.path})
                time.sleep(receiver.delay)
                code = receiver.codes.pop(0) if receiver.codes else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def events(self):
        return [json.loads(item["body"])["type"] for item in self.received]


@pytest.fixture
def allow_private(settings):
    settings.COMFYHUB = {**settings.COMFYHUB, "WEBHOOKS_ALLOW_PRIVATE": True, "WEBHOOK_BACKOFF_SECONDS": 0.05}
    return settings


@pytest.fixture
def receiver():
    with Receiver() as running:
        yield running


def hooked_api(user, url):
    """An API client whose token has `url` as its default webhook; .secret is its signing secret."""
    api = ApiClient(user)
    token = ApiToken.objects.get(user=user, prefix=api.token[:10])
    api.secret = token.set_webhook_url(url)
    api.token_row = token
    return api


def send_due():
    """One step of the workers' sender, as the supervisor runs it."""
    return asyncio.run(WebhookSender().step())


def verify(item, secret):
    """The payload of a received webhook, after checking its Standard Webhooks signature with `secret`."""
    return Webhook(secret).verify(item["body"], item["headers"])


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/hook",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "https://user:secret@93.184.216.34/hook",
        "http://127.0.0.1:8000/hook",
        "http://localhost/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://0.0.0.0/hook",
        "http:///hook",
    ],
)
def test_it_refuses_a_webhook_url_that_is_not_public_http(alice, workflows, url):
    api = hooked_api(alice, "https://93.184.216.34/default")
    reply = api.submit("invert", {"color": 1}, webhook_url=url)
    assert reply.status_code == 400, reply.content
    assert "webhook_url" in reply.json()["error"]["details"]
    assert not Task.objects.exists()


def test_a_public_address_is_accepted_and_private_ones_only_when_the_operator_allows(alice, workflows, settings):
    assert webhook_url_problem("https://93.184.216.34/hook") is None
    assert webhook_url_problem("http://127.0.0.1:9/hook") is not None
    settings.COMFYHUB = {**settings.COMFYHUB, "WEBHOOKS_ALLOW_PRIVATE": True}
    assert webhook_url_problem("http://127.0.0.1:9/hook") is None
    # Still only http(s), and never credentials.
    assert webhook_url_problem("ftp://127.0.0.1/hook") is not None
    assert webhook_url_problem("http://a:b@127.0.0.1/hook") is not None
    api = hooked_api(alice, "http://127.0.0.1:9/default")
    reply = api.submit("invert", {"color": 1}, webhook_url="http://127.0.0.1:9/own")
    assert reply.status_code == 201, reply.content
    assert Task.objects.get().webhook_url == "http://127.0.0.1:9/own"


def test_a_webhook_url_needs_a_token_with_a_signing_secret(alice, alice_api, workflows):
    reply = alice_api.submit("invert", {"color": 1}, webhook_url="https://93.184.216.34/hook")
    assert reply.status_code == 400
    assert "secret" in reply.json()["error"]["details"]["webhook_url"]
    assert not Task.objects.exists()


def test_the_tokens_default_url_applies_to_its_tasks_only(alice, bob, workflows, allow_private):
    api = hooked_api(alice, "http://127.0.0.1:9/alice")
    other = ApiClient(alice)  # alice's second token, without a webhook
    bob_api = ApiClient(bob)
    hooked = Task.objects.get(pk=api.submit("invert", {"color": 1}).json()["id"])
    plain = Task.objects.get(pk=other.submit("invert", {"color": 2}).json()["id"])
    bobs = Task.objects.get(pk=bob_api.submit("invert", {"color": 3}).json()["id"])
    assert (hooked.webhook_url, hooked.webhook_token_id) == ("http://127.0.0.1:9/alice", api.token_row.pk)
    assert plain.webhook_url == "" and bobs.webhook_url == ""
    # Only alice's hooked task queued a delivery, to her URL.
    assert list(WebhookDelivery.objects.values_list("task_id", "event", "url")) == [
        (hooked.pk, "task.queued", "http://127.0.0.1:9/alice")
    ]


def test_create_token_sets_a_default_url_and_prints_its_secret_once(alice, capsys):
    call_command("create_token", "alice", "--webhook-url", "https://93.184.216.34/hook")
    plain, secret = capsys.readouterr().out.split()
    token = ApiToken.objects.get(user=alice)
    assert ApiToken.authenticate(plain) == alice
    assert token.webhook_url == "https://93.184.216.34/hook" and token.webhook_secret == secret
    assert secret.startswith("whsec_")
    with pytest.raises(CommandError, match="loopback"):
        call_command("create_token", "alice", "--webhook-url", "http://127.0.0.1/hook")
    assert ApiToken.objects.filter(user=alice).count() == 1  # the refused one was not kept


def test_a_task_run_by_the_engine_delivers_signed_webhooks(
    alice, workflows, server, simulator, hub, allow_private, receiver
):
    api = hooked_api(alice, receiver.url)
    task = finished(api.submit("invert", {"color": 4321}).json()["id"])
    assert task.status == TaskStatus.SUCCEEDED, task.error
    # The supervisor's own sender posts them; nothing here sends.
    wait_for(lambda: "task.succeeded" in receiver.events(), message="the succeeded webhook")
    assert receiver.events() == ["task.queued", "task.started", "task.succeeded"]
    last = receiver.received[-1]
    body = verify(last, api.secret)
    assert body["data"]["id"] == str(task.pk) and body["data"]["status"] == "succeeded"
    [output] = body["data"]["outputs"]
    assert output["id"] == str(task.outputs.get().pk) and output["url"].startswith("/api/v1/outputs/")
    assert last["headers"]["webhook-id"] == WebhookDelivery.objects.get(event="task.succeeded").message_id
    # Signed with alice's secret and no other.
    with pytest.raises(Exception, match="signature"):
        Webhook(hooked_api(alice, receiver.url).secret).verify(last["body"], last["headers"])
    # The sender records the answer just after the receiver has the post.
    wait_for(
        lambda: set(WebhookDelivery.objects.values_list("status", flat=True)) == {DeliveryStatus.DELIVERED},
        message="every delivery recorded as delivered",
    )


def test_a_cancelled_task_sends_its_cancel(alice, workflows, allow_private, receiver):
    api = hooked_api(alice, receiver.url)
    task_id = api.submit("invert", {"color": 1}).json()["id"]
    assert api.post(f"/api/v1/tasks/{task_id}/cancel").status_code == 200
    assert send_due() == 2
    assert receiver.events() == ["task.queued", "task.cancelled"]
    assert verify(receiver.received[-1], api.secret)["data"]["status"] == "cancelled"


def test_it_retries_with_growing_backoff_then_delivers(alice, workflows, allow_private):
    with Receiver(codes=[500, 503]) as receiver:
        api = hooked_api(alice, receiver.url)
        api.submit("invert", {"color": 1})
        delivery = WebhookDelivery.objects.get()
        before = timezone.now()
        assert send_due() == 1
        delivery.refresh_from_db()
        assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("pending", 1, 500)
        assert "500" in delivery.last_error
        first_wait = delivery.next_attempt_at - before
        assert timedelta(seconds=0.04) <= first_wait <= timedelta(seconds=1)
        assert send_due() == 0  # not due yet
        wait_for(lambda: send_due() == 1, message="the second attempt")
        delivery.refresh_from_db()
        assert (delivery.attempts, delivery.last_status_code) == (2, 503)
        assert delivery.next_attempt_at - delivery.last_attempt_at >= timedelta(seconds=0.1)  # doubled
        wait_for(lambda: send_due() == 1, message="the third attempt")
        delivery.refresh_from_db()
        assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("delivered", 3, 200)
        assert delivery.delivered_at is not None and delivery.last_error == ""
        # The same webhook-id on every attempt: the receiver can tell a repeat.
        assert len({item["headers"]["webhook-id"] for item in receiver.received}) == 1
        assert len(receiver.received) == 3


def test_it_gives_up_after_the_limit_and_the_admin_sends_it_again(alice, admin_user, workflows, allow_private):
    allow_private.COMFYHUB = {**allow_private.COMFYHUB, "WEBHOOK_MAX_ATTEMPTS": 2}
    with Receiver(codes=[500, 500]) as receiver:
        api = hooked_api(alice, receiver.url)
        api.submit("invert", {"color": 1})
        delivery = WebhookDelivery.objects.get()
        send_due()
        wait_for(lambda: send_due() == 1, message="the last attempt")
        delivery.refresh_from_db()
        assert (delivery.status, delivery.attempts) == ("failed", 2)
        assert send_due() == 0  # given up: nothing more is sent
        assert len(receiver.received) == 2

        browser = Client()
        browser.force_login(admin_user)
        listing = browser.get("/admin/tasks/webhookdelivery/?status__exact=failed")
        assert listing.status_code == 200 and str(delivery.task_id) in listing.content.decode()
        reply = browser.post(
            "/admin/tasks/webhookdelivery/",
            {"action": "send_again", "_selected_action": [delivery.pk]},
            follow=True,
        )
        assert "1 webhook delivery queued again" in reply.content.decode()
        # The task's own admin page lists its deliveries, with the last answer.
        task_page = browser.get(f"/admin/tasks/task/{delivery.task_id}/change/").content.decode()
        assert "task.queued" in task_page and "answered 500" in task_page
        delivery.refresh_from_db()
        assert (delivery.status, delivery.attempts) == ("pending", 0)
        assert send_due() == 1
        delivery.refresh_from_db()
        assert delivery.status == "delivered" and len(receiver.received) == 3


def test_a_revoked_token_stops_its_webhooks(alice, workflows, allow_private, receiver):
    api = hooked_api(alice, receiver.url)
    api.submit("invert", {"color": 1})
    api.token_row.delete()
    assert send_due() == 1
    delivery = WebhookDelivery.objects.get()
    assert delivery.status == "failed" and "revoked" in delivery.last_error
    assert receiver.received == []


def test_one_users_webhooks_never_reach_another(alice, bob, workflows, allow_private):
    with Receiver() as alices, Receiver() as bobs:
        alice_api = hooked_api(alice, alices.url)
        bob_api = hooked_api(bob, bobs.url)
        bob_api.submit("invert", {"color": 1})
        # Bob naming alice's URL gets it signed with his own secret: her receiver can tell it is not hers.
        bob_api.submit("invert", {"color": 2}, webhook_url=alices.url)
        alice_api.submit("invert", {"color": 3})
        assert send_due() == 3
        assert len(bobs.received) == 1
        verify(bobs.received[0], bob_api.secret)
        mine = [item for item in alices.received if item["path"] == "/hook"]
        assert len(mine) == 2
        signed_by_alice = []
        for item in mine:
            try:
                verify(item, alice_api.secret)
                signed_by_alice.append(json.loads(item["body"])["data"]["id"])
            except Exception:  # noqa: S112, BLE001 — the point: it does not verify
                continue
        alices_task = Task.objects.get(owner=alice)
        assert signed_by_alice == [str(alices_task.pk)]


def test_a_bad_receiver_does_not_hold_up_the_others(alice, workflows, allow_private, receiver):
    api = hooked_api(alice, receiver.url)
    api.submit("invert", {"color": 1}, webhook_url="http://127.0.0.1:9/nobody-listens")
    api.submit("invert", {"color": 2})
    assert send_due() == 2
    statuses = dict(WebhookDelivery.objects.values_list("url", "status"))
    assert statuses == {"http://127.0.0.1:9/nobody-listens": "pending", receiver.url: "delivered"}
    assert "Connect" in WebhookDelivery.objects.get(url__endswith="nobody-listens").last_error


def test_a_failed_task_sends_its_error_kind_but_not_its_message(alice, workflows, allow_private, receiver):
    api = hooked_api(alice, receiver.url)
    task = Task.objects.get(pk=api.submit("invert", {"color": 1}).json()["id"])
    assert task.mark_failed("node_error", "boom at http://10.0.0.5:8188", match_prompt=False)
    send_due()
    body = verify(receiver.received[-1], api.secret)
    assert body["type"] == "task.failed" and body["data"]["error"] == {"kind": "node_error"}
    assert "10.0.0.5" not in receiver.received[-1]["body"].decode()


def test_the_admin_sets_a_tokens_url_and_shows_its_secret_once(alice, admin_user):
    token, _ = ApiToken.issue(alice, name="script")
    browser = Client()
    browser.force_login(admin_user)
    page = f"/admin/tasks/apitoken/{token.pk}/change/"
    form = {"user": alice.pk, "name": "script"}
    refused = browser.post(page, {**form, "webhook_url": "http://192.168.1.1/hook"})
    assert refused.status_code == 200 and "private" in refused.content.decode()
    token.refresh_from_db()
    assert token.webhook_url == "" and token.webhook_secret == ""
    reply = browser.post(page, {**form, "webhook_url": "https://93.184.216.34/hook"}, follow=True)
    token.refresh_from_db()
    assert token.webhook_url == "https://93.184.216.34/hook" and token.webhook_secret.startswith("whsec_")
    assert token.webhook_secret in reply.content.decode()
    # Saved again, the secret stays and is not shown again.
    again = browser.post(page, {**form, "webhook_url": "https://93.184.216.35/hook"}, follow=True)
    assert token.webhook_secret not in again.content.decode()
    token.refresh_from_db()
    assert token.webhook_url.endswith(".35/hook")


def test_a_receiver_that_hangs_costs_only_its_own_timeout(alice, workflows, allow_private, receiver):
    allow_private.COMFYHUB = {**allow_private.COMFYHUB, "WEBHOOK_TIMEOUT": 0.3}
    with Receiver(delay=3.0) as hanging:
        api = hooked_api(alice, receiver.url)
        api.submit("invert", {"color": 1}, webhook_url=hanging.url)
        api.submit("invert", {"color": 2})
        started = time.monotonic()
        assert send_due() == 2
        assert time.monotonic() - started < 2.0
        statuses = dict(WebhookDelivery.objects.values_list("url", "status"))
        assert statuses == {hanging.url: "pending", receiver.url: "delivered"}
        assert "Timeout" in WebhookDelivery.objects.get(url=hanging.url).last_error


def test_a_user_sets_a_tokens_webhook_on_the_account_page_and_sees_its_secret_once(alice, bob):
    client = Client()
    client.force_login(alice)
    refused = client.post("/account/tokens/", {"name": "hooks", "webhook_url": "http://10.0.0.1/hook"})
    assert refused.status_code == 400 and "private" in refused.content.decode()
    assert not ApiToken.objects.exists()
    reply = client.post("/account/tokens/", {"name": "hooks", "webhook_url": "https://93.184.216.34/hook"})
    assert reply.status_code == 201
    token = ApiToken.objects.get(user=alice)
    assert token.webhook_url == "https://93.184.216.34/hook"
    assert token.webhook_secret and token.webhook_secret in reply.content.decode()
    page = client.get("/account/").content.decode()
    assert "https://93.184.216.34/hook" in page and token.webhook_secret not in page
    # Bob's page shows nothing of alice's.
    other = Client()
    other.force_login(bob)
    assert "93.184.216.34" not in other.get("/account/").content.decode()


def test_a_v2_job_takes_its_tokens_default_webhook(alice, allow_private, raw_graph_permission):
    from tests.v2.conftest import FAST_GRAPH

    alice.user_permissions.add(raw_graph_permission)
    api = hooked_api(alice, "http://127.0.0.1:9/v2")
    reply = api.post("/api/v2/jobs", {"workflow": FAST_GRAPH})
    assert reply.status_code == 201, reply.content
    task = Task.objects.get(pk=reply.json()["id"])
    assert (task.webhook_url, task.webhook_token_id) == ("http://127.0.0.1:9/v2", api.token_row.pk)
    assert list(WebhookDelivery.objects.values_list("task_id", "event")) == [(task.pk, "task.queued")]
