"""
The webhook sender: a task of its own in each supervisor process that claims due WebhookDelivery rows, signs them
with the Standard Webhooks scheme (webhook-id, webhook-timestamp, webhook-signature) and posts them.

It never touches the engine: its own asyncio task, its own HTTP client, a few seconds' timeout, and every delivery
guarded so that one bad receiver (slow, refusing, unreachable) costs nothing but its own retries. Several workers
share the queue: a claim pushes a row's next_attempt_at forward (WebhookDeliveryQuerySet.claim).
"""

import asyncio
import contextlib
import ipaddress
import json
import logging
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx
from django.conf import settings
from django.db import close_old_connections
from standardwebhooks import Webhook

from servers.aio import db
from tasks.models import WebhookDelivery
from tasks.models.webhooks import public_address

logger = logging.getLogger(__name__)


class WebhookSender:
    def __init__(self, *, tick=1.0, batch=20):
        self.tick = tick
        self.batch = batch
        self.client = None

    def lease_seconds(self):
        # Longer than one delivery can take: a claimed row comes due again only if its worker died.
        return settings.COMFYHUB["WEBHOOK_TIMEOUT"] * 4 + 10

    async def run(self):
        logger.info("webhook sender started")
        try:
            while True:
                try:
                    found = await self.step()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    logger.exception("webhook sender step failed")
                    await db(close_old_connections)()
                    found = 0
                if found < self.batch:
                    await asyncio.sleep(self.tick)
        finally:
            await self.close()

    async def close(self):
        if self.client is not None:
            client, self.client = self.client, None
            with contextlib.suppress(Exception):
                await client.aclose()

    async def step(self):
        """Claim and send what is due; the number of deliveries it tried."""
        rows = await db(WebhookDelivery.objects.claim)(self.batch, self.lease_seconds())
        by_task = {}
        for row in sorted(rows, key=lambda row: row.pk):
            by_task.setdefault(row.task_id, []).append(row)
        if by_task:
            # Tasks side by side; one task's events in the order they happened (queued before succeeded).
            await asyncio.gather(*(self.deliver_in_order(group) for group in by_task.values()))
        return len(rows)

    async def deliver_in_order(self, rows):
        for row in rows:
            await self.deliver(row)

    async def deliver(self, row):
        try:
            secret = await db(lambda: row.secret)()
            if secret is None:
                await db(row.give_up)("the token that set this webhook was revoked")
                return
            status_code, error = await self.post(row, secret)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("webhook %s of task %s failed to send", row.event, row.task_id)
            status_code, error = None, f"{type(exc).__name__}: {exc}"
        try:
            await db(row.finish)(status_code, error)
        except Exception:
            logger.exception("webhook %s: its outcome could not be stored (it is tried again)", row.pk)

    async def post(self, row, secret):
        """(HTTP status code or None, error text) of one attempt."""
        problem = await self.refused_address(row.url)
        if problem:
            return None, problem
        body = json.dumps(row.payload, separators=(",", ":"))
        now = datetime.now(UTC)
        headers = {
            "content-type": "application/json",
            "user-agent": "comfyhub-webhooks",
            "webhook-id": row.message_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": Webhook(secret).sign(row.message_id, now, body),
        }
        if self.client is None:
            # Redirects are not followed: the address checked is the one posted to.
            self.client = httpx.AsyncClient(timeout=settings.COMFYHUB["WEBHOOK_TIMEOUT"], follow_redirects=False)
        try:
            reply = await self.client.post(row.url, content=body.encode(), headers=headers)
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"[:1000]
        error = "" if reply.is_success else f"answered {reply.status_code}: {reply.text[:200]}"
        return reply.status_code, error

    async def refused_address(self, url):
        """
        The URL was checked when it was set; its host is checked again now (a name may have been pointed at an
        inside address since), unless private addresses are allowed.
        """
        if settings.COMFYHUB["WEBHOOKS_ALLOW_PRIVATE"]:
            return None
        parts = urlsplit(url)
        host = parts.hostname or ""
        try:
            ipaddress.ip_address(host)
            addresses = {host}
        except ValueError:
            try:
                found = await asyncio.get_running_loop().getaddrinfo(host, parts.port or 443)
            except OSError as exc:
                return f"{host} does not resolve: {exc}"
            addresses = {info[4][0] for info in found}
        if not addresses or not all(public_address(address) for address in addresses):
            return f"{host} resolves to a loopback, private, link-local or reserved address"
        return None
