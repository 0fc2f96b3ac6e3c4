"""
The browser's live socket: one per window. The windows of one user in one process share one subscription to the
user's group (UserFeed), which patches the page from what arrives: a progress or preview fact becomes a small
fragment rendered from the fact alone; a status change re-renders the task's row from the database.
"""

import asyncio
import logging
from collections import deque

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.db.models import Count, Q
from django.template.loader import render_to_string

from tasks.live import PREVIEW, PROGRESS, redraw_live, render_fact
from tasks.models import ACTIVE_STATUSES, TERMINAL_STATUSES, Task, TaskStatus
from tasks.progress import user_group
from tasks.queue import queue_positions
from tasks.sockets import SignedInSocket
from tasks.submission import user_tasks

logger = logging.getLogger(__name__)

ENDED_REMEMBERED = 2000  # tasks a feed knows have ended, so that a late fact cannot draw over a finished row
LATEST_REMEMBERED = 2000  # newest facts a feed keeps, to draw again over a row that was read before them


class TaskConsumer(SignedInSocket):
    feed = None
    outbox = None

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close()  # before accept: the handshake is refused with 403
            return
        self.user = user
        feed = await UserFeed.open(user)  # subscribed before the sign-in check below, so nothing falls between
        if not await self.join():
            feed.release()
            await self.close()  # logged out (or password changed) while the handshake ran
            return
        await self.accept()
        self.outbox = Outbox(self)
        feed.attach(self)
        self.feed = feed

    async def disconnect(self, code):
        self.stop_pushing()
        await self.leave()

    async def receive(self, text_data=None, bytes_data=None):
        pass  # the page sends nothing we act on: every action is an ordinary HTTP request

    def stop_pushing(self):
        # Whatever waits in this window's outbox is dropped unsent; other windows still get theirs.
        feed, self.feed = self.feed, None
        if feed is not None:
            feed.leave(self)
        if self.outbox is not None:
            self.outbox.close()


class Outbox:
    """
    What waits to go to one window, one part per (kind, task): a part replaced before it went out is never sent.
    While a window's frame is being sent (a slow client, a busy process), what comes meanwhile folds into the next
    frame, so that window gets the newest state and the user's other windows do not wait for it.
    """

    def __init__(self, socket):
        self.socket = socket
        self.parts = {}
        self.sender = None

    def put(self, parts):
        for key, html in parts:
            self.parts.pop(key, None)  # moved to the end: the order of a batch is kept (a row before its facts)
            self.parts[key] = html
        if self.sender is None or self.sender.done():
            self.sender = asyncio.ensure_future(self.send())

    async def send(self):
        while self.parts:
            parts, self.parts = self.parts, {}
            try:
                await self.socket.send(text_data="\n".join(parts.values()))
            except Exception:
                logger.warning("could not push live updates to a window of user %s", self.socket.user.pk)

    def close(self):
        self.parts = {}
        sender, self.sender = self.sender, None
        if sender is not None and not sender.done() and sender is not asyncio.current_task():
            sender.cancel()


class UserFeed:
    """
    The open windows of one user in this process and their one subscription to the user's group. It reads its
    channel as fast as messages come and folds what arrived while it was busy: per task the newest progress and the
    newest preview, and one row for any number of status changes. A window never gets a backlog, only the newest
    state; ten open windows cost one render, not ten.
    """

    feeds = {}  # user pk -> UserFeed, in this process

    def __init__(self, user):
        self.user = user
        self.layer = get_channel_layer()
        self.loop = asyncio.get_running_loop()
        self.sockets = set()
        self.opening = 0  # windows between open() and attach() or release()
        self.inbox = deque()
        self.arrived = asyncio.Event()
        self.ended = {}  # ids of tasks whose finished row went out, oldest first
        self.latest = {}  # (task id, kind) -> the newest fact of each running task, oldest first
        self.pending_rows = {}  # task id -> {"created"}: rows waiting to be read and drawn
        self.row_renderer = None
        self.channel = None
        self.loops = []
        self.subscribed = asyncio.ensure_future(self.subscribe())

    @classmethod
    async def open(cls, user):
        feed = cls.feeds.get(user.pk)
        if feed is None or feed.loop is not asyncio.get_running_loop() or feed.layer is not get_channel_layer():
            feed = cls.feeds[user.pk] = cls(user)
        feed.opening += 1
        try:
            await asyncio.shield(feed.subscribed)
        except BaseException:
            feed.release()
            raise
        return feed

    async def subscribe(self):
        # The default prefix: channels_redis' core layer reads a process's own channels one prefix at a time.
        self.channel = await self.layer.new_channel()
        await self.layer.group_add(user_group(self.user.pk), self.channel)
        self.loops = [asyncio.ensure_future(self.read()), asyncio.ensure_future(self.work())]

    def attach(self, socket):
        self.opening -= 1
        self.sockets.add(socket)

    def release(self):
        self.opening -= 1
        self.close_if_unused()

    def leave(self, socket):
        self.sockets.discard(socket)
        self.close_if_unused()

    def close_if_unused(self):
        if self.sockets or self.opening > 0:
            return
        if UserFeed.feeds.get(self.user.pk) is self:
            del UserFeed.feeds[self.user.pk]
        for loop in [*self.loops, self.row_renderer]:
            if loop is not None:
                loop.cancel()
        asyncio.ensure_future(self.unsubscribe())

    async def unsubscribe(self):
        try:
            await self.subscribed
            await self.layer.group_discard(user_group(self.user.pk), self.channel)
        except Exception:
            logger.warning("could not leave the group of user %s; it expires by itself", self.user.pk)

    async def read(self):
        while True:
            try:
                message = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("the live feed of user %s cannot read the channel layer", self.user.pk)
                await asyncio.sleep(1.0)
                continue
            self.inbox.append(message)
            self.arrived.set()

    async def work(self):
        while True:
            await self.arrived.wait()
            self.arrived.clear()
            batch, self.inbox = list(self.inbox), deque()
            try:
                rows, facts = self.fold(batch)
                if rows:
                    self.queue_rows(rows)
                self.deliver([((kind, task_id), render_fact(fact)) for (task_id, kind), fact in facts.items()])
            except asyncio.CancelledError:
                raise
            except Exception:
                # The page still shows the truth on its next load; a lost push must not stop later ones.
                logger.exception("could not render live updates for user %s", self.user.pk)

    def fold(self, batch):
        """The rows to render again ({task id: entry}) and the newest fact per (task, kind) of a batch."""
        rows, facts = {}, {}
        for message in batch:
            kind, task_id = message.get("type"), message.get("task")
            if task_id is None:
                continue
            if kind == "task.update":
                entry = rows.setdefault(task_id, {"created": False})
                entry["created"] = entry["created"] or bool(message.get("created"))
                if message.get("status") in TERMINAL_STATUSES:
                    self.remember_ended(task_id)
                    facts = {key: fact for key, fact in facts.items() if key[0] != task_id}
            elif kind in (PROGRESS, PREVIEW):
                if message.get("owner") != self.user.pk:
                    # The group is the owner's own: a fact for someone else here is a bug, and it is not shown.
                    logger.error("a live update of task %s reached the feed of user %s", task_id, self.user.pk)
                    continue
                if task_id not in self.ended:
                    facts[(task_id, kind)] = self.latest[(task_id, kind)] = message  # the newest wins
        while len(self.latest) > LATEST_REMEMBERED:
            del self.latest[next(iter(self.latest))]
        return rows, facts

    def queue_rows(self, rows):
        """
        Rows are read from the database, which takes a while when many change at once: facts do not wait for
        them. A row is drawn with the newest progress fact (the database's may be a second older, and the bar
        must not go back), or again with one that came while it was read, and followed by the newest preview.
        """
        for task_id, entry in rows.items():
            pending = self.pending_rows.setdefault(task_id, {"created": False})
            pending["created"] = pending["created"] or entry["created"]
        if self.row_renderer is None or self.row_renderer.done():
            self.row_renderer = asyncio.ensure_future(self.render_rows())

    async def render_rows(self):
        while self.pending_rows:
            rows, self.pending_rows = self.pending_rows, {}
            for task_id, entry in rows.items():
                entry["live"] = self.latest.get((task_id, PROGRESS))  # the bar as the newest fact has it
            try:
                parts = await render_updates(self.user, rows)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("could not render the rows of user %s", self.user.pk)
                continue
            for n, (key, html) in enumerate(parts):
                task_id = key[-1]
                progress = self.latest.get((task_id, PROGRESS)) if key[0] in ("row", "new", "new-run") else None
                if progress is not None and progress is not rows[task_id]["live"]:
                    parts[n] = (key, redraw_live(html, progress))  # a fact came while the row was being read
            for task_id in rows:
                preview = self.latest.get((task_id, PREVIEW))
                if preview is not None and task_id not in self.ended:
                    parts.append(((PREVIEW, task_id), render_fact(preview)))  # the row drew an empty preview
            self.deliver(parts)

    def deliver(self, parts):
        if not parts:
            return
        for socket in list(self.sockets):
            if socket.outbox is not None:
                socket.outbox.put(parts)

    def remember_ended(self, task_id):
        self.ended[task_id] = None
        for kind in (PROGRESS, PREVIEW):
            self.latest.pop((task_id, kind), None)
        if len(self.ended) > ENDED_REMEMBERED:
            del self.ended[next(iter(self.ended))]


@database_sync_to_async
def render_updates(user, pending):
    """
    The rows of `pending` ({task id: {"created"}}) that belong to `user`, rendered out of band, as
    [(key, html)] parts of a frame, with the user's running count.
    """
    from tasks.views import row_context

    tasks = {str(task.pk): task for task in user_tasks(user).filter(pk__in=list(pending))}
    positions = queue_positions(tasks.values())
    parts = []
    for task_id, entry in pending.items():
        task = tasks.get(task_id)
        if task is None:
            continue  # not this user's (never expected: the group is the user's own) or deleted
        if entry.get("live") and task.status == TaskStatus.RUNNING:
            task.live_fact = entry["live"]  # newer than the progress the database has
        context = row_context(task, positions=positions, oob=not entry["created"])
        row = render_to_string("tasks/task_list.html#task-row", context)
        if entry["created"]:
            parts.append((("new", task_id), f'<div hx-swap-oob="afterbegin:#task-list">{row}</div>'))
            if task.workflow_id:
                # The workspace of its workflow shows it too, in every window of the owner that has it open.
                target = f"#workflow-{task.workflow_id}-runs"
                parts.append((("new-run", task_id), f'<div hx-swap-oob="afterbegin:{target}">{row}</div>'))
        else:
            parts.append((("row", task_id), row))
    if parts:
        parts.append((("count",), render_to_string("running_count.html", task_counts(user))))
    return parts


def task_counts(user):
    """The user's active tasks (the "My tasks" badge) and how many of them run (the page title), in one query."""
    counts = Task.objects.filter(owner=user, status__in=ACTIVE_STATUSES).aggregate(
        active_count=Count("pk"), running_count=Count("pk", filter=Q(status=TaskStatus.RUNNING))
    )
    return {key: value or 0 for key, value in counts.items()}
