"""
A browser socket lives only as long as the sign-in that opened it.

Each socket joins, besides the groups it pushes to, the group of its browser session and of its account. Logging
out sends a close to that session's group; a password change (or a deactivated or deleted account) sends one to
the account's group, since every session of that user is now invalid (AuthMiddlewareStack verifies the session
auth hash, so they are refused on reconnect). The close travels over the channel layer like every push, so it
reaches the sockets held by any Daphne process. The session that changed the password got a new auth hash and key
from update_session_auth_hash: its windows see the close, find themselves still signed in and open a new socket.
"""

import hashlib
import logging

from asgiref.sync import async_to_sync
from channels.auth import get_user
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth.signals import user_logged_out
from django.core.cache import cache
from django.db import transaction
from django.db.models.signals import post_delete, post_save, pre_save
from django.dispatch import receiver

logger = logging.getLogger(__name__)

SIGNED_OUT = 4001  # the close code the page's script recognises (static/comfyhub.js): "check whether you are signed in"
# How long a logged-out session is remembered, for a socket whose handshake read the session just before the logout
# and joins its group just after the close was sent. The handshake takes milliseconds; this is generous.
ENDED_SESSION_SECONDS = 300


def session_digest(session_key):
    # Group names and cache keys are stored in Redis in clear; a session key is as good as a password.
    return hashlib.sha256(session_key.encode()).hexdigest()[:40]


def account_group(user_id):
    """Every socket of one account, whichever page and process: closed together when the sign-in ends."""
    return f"account.{user_id}"


def session_group(session_key):
    return f"session.{session_digest(session_key)}"


def ended_key(session_key):
    return f"session-ended:{session_digest(session_key)}"


async def aclose_sockets(group, reason):
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        await layer.group_send(group, {"type": "sockets.close", "reason": reason})
    except Exception:
        # Not a hint like a push: the sockets stay open. Logged so that an operator sees the layer is down.
        logger.exception("could not close the sockets of %s (%s)", group, reason)


def close_sockets(group, reason):
    async_to_sync(aclose_sockets)(group, reason)


class SignedInSocket(AsyncWebsocketConsumer):
    """
    Base of the browser consumers: `join()` the groups to push to, the account's and the session's before accepting,
    `leave()` on disconnect; on `sockets.close` the socket stops pushing (`stop_pushing()`, which must drop
    whatever is pending without sending it) and closes with SIGNED_OUT.
    """

    joined = ()
    signed_out = False

    async def join(self, *groups):
        """Join `groups` and this session's group; False (and joined nothing) when the sign-in just ended."""
        session = self.scope.get("session")
        session_key = getattr(session, "session_key", None)
        account = [account_group(self.scope["user"].pk)]
        self.joined = [*groups, *account, *([session_group(session_key)] if session_key else [])]
        for group in self.joined:
            await self.channel_layer.group_add(group, self.channel_name)
        # A close sent between the handshake reading the session and the group_add above was missed: look at
        # what it was sent for, now that a later one cannot be missed any more.
        if session_key and not await self.still_signed_in(session_key):
            await self.leave()
            return False
        return True

    async def still_signed_in(self, session_key):
        try:
            if await cache.aget(ended_key(session_key)):
                return False
        except Exception:
            logger.warning("the cache does not answer; cannot tell whether a session logged out just now")
        user = await get_user(self.scope)  # reads the user again: a password changed since the handshake shows
        return user.is_authenticated and user.pk == self.scope["user"].pk

    async def leave(self):
        joined, self.joined = self.joined, ()
        for group in joined:
            await self.channel_layer.group_discard(group, self.channel_name)

    def stop_pushing(self):
        raise NotImplementedError

    async def sockets_close(self, event):
        if self.signed_out:
            return
        self.signed_out = True
        self.stop_pushing()  # before any await: nothing queued for this socket may go out after this point
        await self.leave()
        await self.close(code=SIGNED_OUT)


@receiver(user_logged_out, dispatch_uid="tasks.sockets.close_on_logout")
def close_on_logout(sender, request, user, **kwargs):
    session_key = getattr(getattr(request, "session", None), "session_key", None)
    if not session_key:
        return
    try:
        cache.set(ended_key(session_key), True, ENDED_SESSION_SECONDS)
    except Exception:
        logger.warning("the cache does not answer; a socket opening during this logout may stay open")
    close_sockets(session_group(session_key), "logged_out")


@receiver(pre_save, sender=settings.AUTH_USER_MODEL, dispatch_uid="tasks.sockets.note_sign_in_change")
def note_sign_in_change(sender, instance, raw=False, update_fields=None, **kwargs):
    """Whether this save ends the user's sessions: a new password hash (their auth hash changes) or deactivation."""
    instance._ends_sessions = False
    if raw or instance.pk is None:
        return
    if update_fields is not None and not {"password", "is_active"} & set(update_fields):
        return  # the save at every login (last_login) costs no query
    before = sender._default_manager.filter(pk=instance.pk).values("password", "is_active").first()
    if before is None:
        return
    instance._ends_sessions = before["password"] != instance.password or (
        before["is_active"] and not getattr(instance, "is_active", True)
    )


@receiver(post_save, sender=settings.AUTH_USER_MODEL, dispatch_uid="tasks.sockets.close_on_sign_in_change")
def close_on_sign_in_change(sender, instance, raw=False, using=None, **kwargs):
    if getattr(instance, "_ends_sessions", False):
        instance._ends_sessions = False
        close_user_sockets(instance.pk, "credentials_changed", using)


@receiver(post_delete, sender=settings.AUTH_USER_MODEL, dispatch_uid="tasks.sockets.close_on_delete")
def close_on_delete(sender, instance, using=None, **kwargs):
    close_user_sockets(instance.pk, "account_deleted", using)


def close_user_sockets(user_id, reason, using):
    # After the commit: a socket reconnecting at once must find the new password hash, and a change rolled back
    # ends nothing.
    transaction.on_commit(lambda: close_sockets(account_group(user_id), reason), using=using)
