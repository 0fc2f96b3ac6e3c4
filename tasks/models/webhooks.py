"""
Webhooks: where a task's news is sent (checked URLs), and one WebhookDelivery row per event to send. The rows are
the queue the workers' sender (servers/webhooks.py) claims, signs and posts; failures are stored on them.
"""

import base64
import ipaddress
import logging
import secrets
import socket
import uuid
from datetime import timedelta
from urllib.parse import urlsplit

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone

from tasks.fields import JSONField

logger = logging.getLogger(__name__)

MAX_URL_LENGTH = 2000
# Transition kinds (TaskEvent.kind) that are news for a webhook, and the event type each is sent as. Internal moves
# (requeued, moved, unbound) are not: the task is still waiting, as its owner was last told.
EVENT_TYPES = {
    "created": "task.queued",
    "retried": "task.queued",
    "running": "task.started",
    "succeeded": "task.succeeded",
    "failed": "task.failed",
    "cancelled": "task.cancelled",
}


def new_secret():
    """A signing secret in the Standard Webhooks format: whsec_ and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def public_address(address):
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # a link-local IPv6 address may carry its zone
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def resolve(host, port):
    """Every address `host` resolves to (an IP literal is its own), or raise OSError."""
    return {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}


def webhook_url_problem(url, *, allow_private=None):
    """
    What is wrong with `url` as a webhook address, in words that follow its field name, or None. Only http(s), no
    credentials in it, and (unless COMFYHUB_WEBHOOKS_ALLOW_PRIVATE) a host that resolves to public addresses only:
    the hub's workers post from inside the operator's network, which a webhook must not reach.
    """
    if allow_private is None:
        allow_private = settings.COMFYHUB["WEBHOOKS_ALLOW_PRIVATE"]
    if not isinstance(url, str) or not url:
        return "must be an http:// or https:// URL"
    if len(url) > MAX_URL_LENGTH:
        return f"must be at most {MAX_URL_LENGTH} characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not parts.hostname:
        return "must name a host"
    if parts.username is not None or parts.password is not None:
        return "must not hold a user name or password"
    if any(ord(char) <= 32 or ord(char) == 127 for char in url):
        return "must not hold spaces or control characters"
    if allow_private:
        return None
    try:
        addresses = resolve(parts.hostname, port or (443 if parts.scheme == "https" else 80))
    except (OSError, UnicodeError):
        return f"names a host that does not resolve ({parts.hostname})"
    if not addresses or not all(public_address(address) for address in addresses):
        return "must not point at a loopback, private, link-local or reserved address"
    return None


class DeliveryStatus(models.TextChoices):
    PENDING = "pending", "pending"
    """To be sent: for the first time, or again at next_attempt_at."""
    DELIVERED = "delivered", "delivered"
    """The receiver answered 2xx."""
    FAILED = "failed", "failed"
    """Given up after the last attempt (or nothing could ever deliver it); an operator may send it again."""


class WebhookDeliveryQuerySet(models.QuerySet):
    def pending(self):
        return self.filter(status=DeliveryStatus.PENDING)

    def due(self, now=None):
        return self.pending().filter(next_attempt_at__lte=now or timezone.now())

    def claim(self, limit, lease_seconds):
        """
        Take up to `limit` due deliveries for this worker: each is pushed `lease_seconds` into the future by a
        conditional UPDATE, so no other worker takes it meanwhile, and a worker that dies lets it come due again.
        The conditional UPDATE is the guard on SQLite and PostgreSQL alike; a count of 0 means another worker
        claimed that row first.
        """
        now = timezone.now()
        candidates = list(self.due(now).order_by("next_attempt_at", "pk").values_list("pk", flat=True)[:limit])
        claimed = [
            pk
            for pk in candidates
            if self.filter(pk=pk, status=DeliveryStatus.PENDING, next_attempt_at__lte=now).update(
                next_attempt_at=now + timedelta(seconds=lease_seconds)
            )
            == 1
        ]
        return list(self.filter(pk__in=claimed).select_related("task__webhook_token"))

    def send_again(self):
        """Queue these deliveries again, as new (attempts from 0): the admin's "send again". Returns the count."""
        return self.update(
            status=DeliveryStatus.PENDING, attempts=0, next_attempt_at=timezone.now(), delivered_at=None
        )


class WebhookDelivery(models.Model):
    """One event of one task to post to its webhook URL, with every attempt's outcome."""

    task = models.ForeignKey("tasks.Task", on_delete=models.CASCADE, related_name="webhook_deliveries")
    event = models.CharField(max_length=40)
    # The webhook-id header: the same on every attempt, so the receiver can ignore a repeat.
    message_id = models.CharField(max_length=40, unique=True, editable=False)
    url = models.CharField(max_length=MAX_URL_LENGTH)
    payload = JSONField(default=dict)
    status = models.CharField(max_length=16, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    last_status_code = models.PositiveIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    objects = WebhookDeliveryQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-pk"]
        verbose_name_plural = "webhook deliveries"
        indexes = [
            models.Index(fields=["next_attempt_at"], name="webhook_due_idx", condition=Q(status="pending")),
        ]

    def __str__(self):
        return f"{self.event} of task {self.task_id} ({self.status})"

    @property
    def secret(self):
        """The signing secret of the token the task came with; None once that token is revoked."""
        token = self.task.webhook_token
        return token.webhook_secret if token is not None and token.webhook_secret else None

    def finish(self, status_code=None, error=""):
        """
        Store one attempt's outcome: delivered on a 2xx; else pending again after a backoff that doubles with each
        attempt (COMFYHUB_WEBHOOK_BACKOFF_SECONDS × 2^(attempts - 1)), or failed after the last attempt.
        """
        conf, now = settings.COMFYHUB, timezone.now()
        attempts = self.attempts + 1
        fields = {"attempts": attempts, "last_attempt_at": now, "last_status_code": status_code, "last_error": error}
        if status_code is not None and 200 <= status_code < 300:
            fields.update(status=DeliveryStatus.DELIVERED, delivered_at=now, last_error="")
        elif attempts >= conf["WEBHOOK_MAX_ATTEMPTS"]:
            fields.update(status=DeliveryStatus.FAILED)
        else:
            backoff = conf["WEBHOOK_BACKOFF_SECONDS"] * 2 ** (attempts - 1)
            fields.update(next_attempt_at=now + timedelta(seconds=backoff))
        # Conditional: an operator may have sent it again, or deleted the task, while it was in flight.
        WebhookDelivery.objects.filter(pk=self.pk, status=DeliveryStatus.PENDING).update(**fields)
        for key, value in fields.items():
            setattr(self, key, value)

    def give_up(self, error):
        """Failed at once: nothing will ever deliver it (its token was revoked)."""
        self.attempts = settings.COMFYHUB["WEBHOOK_MAX_ATTEMPTS"]
        self.finish(None, error)


def payload(task, event):
    """What a receiver gets: the event, when, and the task as its owner may see it (with its outputs once done)."""
    data = {
        "id": str(task.pk),
        "status": task.status,
        "workflow": task.workflow.slug if task.workflow_id and task.workflow else None,
        "url": reverse("api-task", args=[task.pk]),
        "created_at": task.created_at.isoformat(),
        "started_at": task.started_at.isoformat() if task.started_at else None,
        "finished_at": task.finished_at.isoformat() if task.finished_at else None,
        # The kind only: messages may name servers; the task's URL answers its owner with the full error.
        "error": {"kind": task.error_kind} if task.error_kind else None,
    }
    if event == "task.succeeded":
        data["outputs"] = [
            {
                "id": str(out.pk), "filename": out.display_name, "content_type": out.content_type,
                "size": out.size, "sha256": out.sha256, "url": reverse("api-output", args=[out.pk]),
            }
            for out in task.outputs.order_by("pk")
        ]  # fmt: skip
    return {"type": event, "timestamp": timezone.now().isoformat(), "data": data}


def record_webhook(task, kind):
    """
    Queue the webhook of transition `kind` of `task`, if it has a webhook URL and the kind is news. Called after
    the transition commits (its outputs are stored by then); a failure here is logged and never fails the task.
    """
    event = EVENT_TYPES.get(kind)
    if not task.webhook_url or event is None:
        return None
    try:
        return WebhookDelivery.objects.create(
            task=task, event=event, message_id=f"msg_{uuid.uuid4().hex}", url=task.webhook_url,
            payload=payload(task, event),
        )  # fmt: skip
    except Exception:
        logger.exception("the %s webhook of task %s could not be queued", event, task.pk)
        return None
