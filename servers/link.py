"""
One server's websocket: connect under a stable clientId, read typed messages, back off, and notice when the server
has stopped talking to us.

ComfyUI unregisters a clientId's socket when an older socket with the same clientId closes (protocol reference
§2.6): the newer socket stays open but hears nothing at all, ever. So the old socket is always closed, and its
close awaited, before a new one opens; and a socket that stays silent while HTTP shows its prompts moving is
connected again, quietly, because the server itself is fine.
"""

import asyncio
import logging
import random
import time

from servers.comfy_replies import ComfyError, ComfyUnavailable

logger = logging.getLogger(__name__)

# How long a socket must have waited in recv, hearing nothing, before its silence means anything.
QUIET_SECONDS = 3.0


class Link:
    """
    The socket loop of one connection. What it hears and when it opens or closes it tells the connection through
    the callbacks it is made with: `opened()` (the socket is up; before the link counts as online), `online()`
    (counted online now), `message(msg)` per frame, `offline(reason, was_online)` and `record(kind, message)`.
    """

    def __init__(self, client, client_id, name, *, opened, online, message, offline, record):
        self.client = client
        self.client_id = client_id
        self.name = name
        self.on_opened, self.on_online, self.on_message = opened, online, message
        self.on_offline, self.record = offline, record
        self.online = False
        self.stopping = False
        self.stream = None
        self.last_frame_at = 0.0
        # Since when the socket loop waits in recv with nothing unread; None while it handles a frame. Only a loop
        # that waits can tell silence: a busy one (a message waiting for the database) has frames not read yet.
        self.idle_since = None
        self.watching = None  # the stream a watch() follows, so that one at a time does
        self.orphaned = False  # closed on purpose to register again
        # ... and not connected again yet: the server is fine meanwhile. True until the first connection is made
        # or fails, too: a health probe whose timer fires first must not call the server's websocket down.
        self.reconnecting = True

    async def run(self):
        backoff = 0.2
        while not self.stopping:
            try:
                # The block closes the old socket and waits for the close before we ever reconnect (§2.6).
                async with self.client.events(self.client_id) as stream:
                    backoff = 0.2
                    self.orphaned = False
                    await self.on_opened()
                    self.online, self.reconnecting, self.stream = True, False, stream
                    await self.on_online()
                    await self.read(stream)
                if not self.orphaned:
                    raise ComfyUnavailable("the server closed the websocket")
            except asyncio.CancelledError:
                raise
            except ComfyError as exc:
                if not self.orphaned:
                    await self.went_offline(exc.message)
            except Exception as exc:
                logger.exception("upstream loop of %s failed", self.name)
                self.orphaned = False
                await self.went_offline(f"{exc.__class__.__name__}: {exc}")
            if self.orphaned:
                # Closed on purpose (reconnect_quietly): connecting again registers it again. The server answers
                # all along, so its state stays; if this connect fails, that is news and goes through went_offline.
                self.orphaned = False
                logger.info("%s: connecting the websocket again", self.name)
                continue
            # Jittered exponential backoff, so that a pool of hubs does not hammer a server that restarts.
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))  # noqa: S311
            backoff = min(backoff * 2, 15.0)

    async def read(self, stream):
        """One message of one task must never take the connection down for every other task."""
        try:
            self.idle_since = time.monotonic()
            async for message in stream:
                self.idle_since, self.last_frame_at = None, time.monotonic()
                try:
                    await self.on_message(message)
                except Exception:
                    logger.exception("%s: could not handle a %s message", self.name, message.type)
                self.idle_since = time.monotonic()
        finally:
            self.idle_since = None

    async def went_offline(self, reason):
        was_online, self.online, self.reconnecting = self.online, False, False
        await self.on_offline(reason, was_online)

    # --- is the server still talking to us? ------------------------------------------------------------

    def posted(self, stream, since, prompt_id, spawn):
        """A prompt was sent at `since` while `stream` was the socket: watch that socket (one watch at a time)."""
        if stream is not None and self.watching is not stream:
            self.watching = stream
            spawn(self.watch(stream, since, prompt_id))

    async def watch(self, stream, since, prompt_id, patience=900.0):
        """
        Whether the socket still hears the server after a prompt was sent at `since`. ComfyUI sends `status` to
        every registered socket when a prompt is queued, and execution messages when it starts and ends; a socket
        it has unregistered hears nothing at all. Silence is only evidence while the socket loop waits in recv,
        and it must be confirmed over HTTP: the prompt started or finished (/queue, /history) while the socket
        heard nothing since it was sent. A prompt that waits behind other work is quiet by nature.
        """
        pause, deadline = QUIET_SECONDS, time.monotonic() + patience
        try:
            while time.monotonic() < deadline:
                await asyncio.sleep(pause)
                if self.heard_since(stream, since):
                    return
                if not self.quiet_for(QUIET_SECONDS):
                    continue  # frames read before `since` are still being handled
                moved = await self.prompt_moved(prompt_id)
                if moved is None:
                    return  # gone, or the server does not answer: reconciliation and the probe take over
                if not moved:
                    pause = min(pause * 2, 30.0)
                    continue
                await asyncio.sleep(0.5)  # its start or end may be on the wire right now
                if self.heard_since(stream, since) or not self.quiet_for(QUIET_SECONDS):
                    continue
                await self.reconnect_quietly(
                    stream, "the server sent nothing to the hub's websocket while a task started or finished"
                )
                return
        finally:
            if self.watching is stream:
                self.watching = None

    async def confirm_unheard(self, stream, found_at, unheard, patience=60.0):
        """
        Reconciliation found tasks started or finished that the socket did not report: their messages may simply
        not be handled yet. `unheard()` (the prompts still not heard of) counts only once the socket loop waits in
        recv and has heard nothing at all since `found_at`: then the socket is connected again.
        """
        deadline = time.monotonic() + patience
        await asyncio.sleep(QUIET_SECONDS)
        while not self.quiet_for(QUIET_SECONDS):
            if self.heard_since(stream, found_at) or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.5)
        if self.heard_since(stream, found_at):
            return
        missed = unheard()
        if missed:
            await self.reconnect_quietly(stream, f"the websocket did not report the start or end of {missed} tasks")

    def heard_since(self, stream, since):
        """True when there is nothing to watch any more: another socket now, offline, or a frame since `since`."""
        return stream is not self.stream or not self.online or self.stopping or self.last_frame_at >= since

    def quiet_for(self, seconds):
        return self.idle_since is not None and time.monotonic() - self.idle_since >= seconds

    async def prompt_moved(self, prompt_id):
        """True when the server started or finished the prompt, False while it waits, None if it is gone."""
        try:
            where = (await self.client.queue()).where(prompt_id)
            if where is not None:
                return where == "running"
            return True if await self.client.history(prompt_id) is not None else None
        except ComfyError as exc:
            logger.info("%s: could not look for %s: %s", self.name, prompt_id, exc.message)
            return None

    async def reconnect_quietly(self, stream, reason):
        """Close the socket so that the loop connects again (registering it again), without a state change."""
        if stream is not self.stream or not self.online or self.stopping:
            return
        logger.warning("%s: %s; connecting the websocket again", self.name, reason)
        self.orphaned, self.reconnecting, self.online = True, True, False
        try:
            await self.record("socket_orphaned", f"{reason}; connected it again")
        finally:
            await stream.socket.close()
