"""The staff dashboard's live socket: joined to the "ops" group, it pushes the re-rendered dashboard body."""

import asyncio
import logging
import time

from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.template.loader import render_to_string

from ops.dashboard import dashboard
from tasks.progress import OPS_GROUP, dashboard_open
from tasks.sockets import SignedInSocket

logger = logging.getLogger(__name__)

# Seconds between frames to one dashboard: nobody reads a pool faster than this, and each frame costs a few
# aggregate queries.
PUSH_INTERVAL = 1.0
# Status changes arrive as ops.update; progress does not (it travels to its owner only, on the live path), so an
# open dashboard reads the pool again this often to keep its progress bars moving.
REFRESH_SECONDS = 2.0


class OpsConsumer(SignedInSocket):
    flusher = None
    refresher = None

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated or not user.is_staff:
            await self.close()  # before accept: the handshake is refused with 403
            return
        self.user = user
        self.dirty_since = None
        self.last_flush = None
        # With the account's group (join adds it): a password change or a deactivation closes dashboards too.
        if not await self.join(OPS_GROUP):
            await self.close()  # logged out (or password changed) while the handshake ran
            return
        await self.accept()
        # The page may be older than this socket (a reconnect after a restart): send the pool as it is now.
        self.mark_dirty()
        self.refresher = asyncio.create_task(self.refresh())

    async def refresh(self):
        while True:
            try:
                await dashboard_open()  # so that status changes are announced to the ops group meanwhile
            except Exception:
                logger.warning("could not tell the other processes that a dashboard is open", exc_info=True)
            await asyncio.sleep(REFRESH_SECONDS)
            self.mark_dirty()

    async def disconnect(self, code):
        self.stop_pushing()
        await self.leave()

    async def receive(self, text_data=None, bytes_data=None):
        pass  # the page sends nothing we act on

    async def ops_update(self, event):
        self.mark_dirty()

    def stop_pushing(self):
        self.signed_out = True
        self.dirty_since = None
        if self.flusher is not None:
            self.flusher.cancel()  # a frame being rendered is dropped with it
        if self.refresher is not None and self.refresher is not asyncio.current_task():
            self.refresher.cancel()

    def mark_dirty(self):
        if self.signed_out:
            return
        # Coalesce: any number of updates before the next frame become that one frame.
        if self.dirty_since is None:
            self.dirty_since = time.monotonic()
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.create_task(self.flush())

    async def flush(self):
        try:
            while self.dirty_since is not None:
                if self.last_flush is not None:
                    await asyncio.sleep(max(0.0, self.last_flush + PUSH_INTERVAL - time.monotonic()))
                since, self.dirty_since = self.dirty_since, None
                html = await render_body(self.user.pk, since)
                self.last_flush = time.monotonic()
                if html is None:
                    await self.close()  # no longer staff
                    return
                await self.send(text_data=html)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The page still shows the truth on its next load; a lost push must not kill the socket silently.
            logger.exception("could not push the pool dashboard to user %s", self.user.pk)


# The last body rendered in this process. It is the same for every staff user, so one render serves every
# dashboard of the process that was told of a change before the render began reading the database.
_last_render = {"started": float("-inf"), "html": ""}


@database_sync_to_async
def render_body(user_id, since):
    """The dashboard body swapped out of band, or None when the user is no longer active staff."""
    if not get_user_model().objects.filter(pk=user_id, is_active=True, is_staff=True).exists():
        return None
    if _last_render["started"] >= since:
        return _last_render["html"]
    started = time.monotonic()
    html = render_to_string("ops/dashboard.html#ops-body", {**dashboard(), "oob": True}).strip()
    if started > _last_render["started"]:
        _last_render.update(started=started, html=html)
    return html
