"""The browser's live socket: one per window, joined to its user's group only, pushing rendered rows."""

import asyncio
import logging

from channels.db import database_sync_to_async
from django.conf import settings
from django.template.loader import render_to_string

from tasks.models import TaskStatus
from tasks.progress import user_group
from tasks.sockets import SignedInSocket
from tasks.submission import user_tasks

logger = logging.getLogger(__name__)

SEEN_UPDATES = 2000  # update ids a feed remembers: far more than arrive between two copies of one update


class TaskConsumer(SignedInSocket):
    feed = None

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close()  # before accept: the handshake is refused with 403
            return
        self.user = user
        if not await self.join(user_group(user.pk)):
            await self.close()  # logged out (or password changed) while the handshake ran
            return
        await self.accept()
        self.feed = UserFeed.join(user, self)

    async def disconnect(self, code):
        self.stop_pushing()
        await self.leave()

    async def receive(self, text_data=None, bytes_data=None):
        pass  # the page sends nothing we act on: every action is an ordinary HTTP request

    async def task_update(self, event):
        if self.feed is not None:
            self.feed.add(event)

    def stop_pushing(self):
        # Leaving the feed drops this window from the frame being rendered; other windows still get theirs.
        feed, self.feed = self.feed, None
        if feed is not None:
            feed.leave(self)


class UserFeed:
    """
    The open windows of one user in this process. Every window receives its own copy of each update (the group
    is the user's); the feed folds the copies and a burst of updates into one frame per push interval, renders it
    once, and sends it to every window: ten open windows cost one render, not ten.
    """

    feeds = {}  # user pk -> UserFeed, in this process

    def __init__(self, user):
        self.user = user
        self.sockets = set()
        self.pending = {}  # task id -> {"created", "upstream_at"}
        self.seen = {}  # ids of the last updates folded, oldest first (each arrives once per window)
        self.flusher = None
        self.last_flush = 0.0

    @classmethod
    def join(cls, user, socket):
        feed = cls.feeds.get(user.pk)
        if feed is None:
            feed = cls.feeds[user.pk] = cls(user)
        feed.sockets.add(socket)
        return feed

    def leave(self, socket):
        self.sockets.discard(socket)
        if not self.sockets:
            if self.flusher is not None:
                self.flusher.cancel()
            if UserFeed.feeds.get(self.user.pk) is self:
                del UserFeed.feeds[self.user.pk]

    def add(self, event):
        event_id = event.get("id")
        if event_id is not None:
            if event_id in self.seen:
                return
            self.seen[event_id] = None
            if len(self.seen) > SEEN_UPDATES:
                del self.seen[next(iter(self.seen))]
        entry = self.pending.setdefault(event["task"], {"created": False, "upstream_at": None})
        entry["created"] = entry["created"] or bool(event.get("created"))
        upstream_at = event.get("upstream_at")
        if upstream_at and (entry["upstream_at"] is None or upstream_at < entry["upstream_at"]):
            entry["upstream_at"] = upstream_at
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.create_task(self.flush())

    async def flush(self):
        interval = settings.COMFYHUB["PUSH_INTERVAL"]
        loop = asyncio.get_running_loop()
        while self.pending and self.sockets:
            await asyncio.sleep(max(0.0, self.last_flush + interval - loop.time()))
            pending, self.pending = self.pending, {}
            try:
                html = await render_updates(self.user, pending)
            except Exception:
                # The page still shows the truth on its next load; a lost push must not stop later ones.
                logger.exception("could not render task updates for user %s", self.user.pk)
                html = ""
            self.last_flush = loop.time()
            if not html:
                continue
            for socket in list(self.sockets):
                if socket not in self.sockets:
                    continue  # signed out while an earlier window was being sent to
                try:
                    await socket.send(text_data=html)
                except Exception:
                    logger.warning("could not push task updates to a window of user %s", self.user.pk)


@database_sync_to_async
def render_updates(user, pending):
    """Render the rows of `pending` ({task id: {"created", "upstream_at"}}) that belong to `user`, out of band."""
    from tasks.views import row_context

    tasks = {str(task.pk): task for task in user_tasks(user).filter(pk__in=list(pending))}
    parts = []
    for task_id, entry in pending.items():
        task = tasks.get(task_id)
        if task is None:
            continue  # not this user's (never expected: the group is the user's own) or deleted
        context = row_context(task, upstream_at=entry["upstream_at"], oob=not entry["created"])
        row = render_to_string("tasks/task_list.html#task-row", context)
        parts.append(f'<div hx-swap-oob="afterbegin:#task-list">{row}</div>' if entry["created"] else row)
    if not parts:
        return ""
    parts.append(render_to_string("running_count.html", {"running_count": running_count(user)}))
    return "\n".join(parts)


def running_count(user):
    return user_tasks(user).filter(status=TaskStatus.RUNNING).count()
