"""
Failure counters in Django's cache that slow down password and token guessing.

A `Limit` allows `limit` failures per key (a username, an address) within a window counted from the first of
them. Once they are used up every attempt under that key is refused until the window has passed, even one with
the right password, so a guesser cannot tell a right guess from a refusal. The counters live in the default
cache: Redis when REDIS_URL is set, so every process counts together; else this process's memory, which is
enough for the embedded default because it is one process.

Logins are counted through Django's auth signals and refused by `LoginThrottle`, an authentication backend placed
before ModelBackend, so the admin's login form is covered too; `LoginView` answers a locked-out login page with
429 and says how long to wait. The JSON API counts invalid bearer tokens per address (tasks/api.py).

Behind a reverse proxy the address is REMOTE_ADDR as Daphne sees it: run Daphne with `--proxy-headers`, and
have the proxy overwrite (not append to) X-Forwarded-For.
"""

import hashlib
import logging
import math
import time

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import user_logged_in, user_login_failed
from django.contrib.auth import views as auth_views
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.dispatch import receiver

logger = logging.getLogger(__name__)


def clock():
    return time.time()  # a function, so that tests can move time forward


class Limit:
    def __init__(self, name, setting):
        self.name = name
        self.setting = setting

    @property
    def limit(self):
        return settings.COMFYHUB[self.setting]

    @property
    def window(self):
        return settings.COMFYHUB["LOCKOUT_SECONDS"]

    def keys(self, ident):
        digest = hashlib.sha256(ident.encode("utf-8", "surrogatepass")).hexdigest()[:40]
        base = f"ratelimit:{self.name}:{digest}"
        return f"{base}:since", f"{base}:count"

    def retry_after(self, ident):
        """Seconds until an attempt under `ident` is allowed again; 0 when it is allowed now."""
        if not ident:
            return 0
        since_key, count_key = self.keys(ident)
        try:
            values = cache.get_many([since_key, count_key])
        except Exception:
            # Locking every user out while the cache is down would be worse than a few unthrottled guesses.
            logger.warning("rate limit %s: the cache does not answer; letting the attempt through", self.name)
            return 0
        since, count = values.get(since_key), values.get(count_key)
        if since is None or count is None or count < self.limit:
            return 0
        return max(0, math.ceil(since + self.window - clock()))

    def fail(self, ident):
        """Count one failure; returns the count in the current window (0 when the cache does not answer)."""
        if not ident:
            return 0
        since_key, count_key = self.keys(ident)
        now, window = clock(), self.window
        try:
            since = cache.get(since_key)
            if since is not None and now - since >= window:
                cache.delete_many([since_key, count_key])  # the cache has not expired it yet; the window has
                since = None
            if since is None:
                # add() only sets what is missing: two first failures at once cannot reset each other's count.
                cache.add(since_key, now, window)
                cache.add(count_key, 0, window)
            try:
                return cache.incr(count_key)
            except ValueError:  # expired between add() and incr()
                cache.set(count_key, 1, window)
                return 1
        except Exception:
            logger.warning("rate limit %s: the cache does not answer; failure not counted", self.name)
            return 0

    def reset(self, ident):
        if not ident:
            return
        try:
            cache.delete_many(list(self.keys(ident)))
        except Exception:
            logger.warning("rate limit %s: the cache does not answer; counter not reset", self.name)


LOGIN_BY_USERNAME = Limit("login-username", "LOGIN_FAILURES_PER_USERNAME")
LOGIN_BY_ADDRESS = Limit("login-address", "LOGIN_FAILURES_PER_ADDRESS")
TOKEN_BY_ADDRESS = Limit("token-address", "TOKEN_FAILURES_PER_ADDRESS")


def client_address(request):
    return request.META.get("REMOTE_ADDR") or ""


def username_key(username):
    return str(username or "").strip().casefold()


def login_wait(request, username):
    """Seconds the login of `username` from this request's address must wait; 0 when it may go ahead."""
    return max(
        LOGIN_BY_USERNAME.retry_after(username_key(username)),
        LOGIN_BY_ADDRESS.retry_after(client_address(request)),
    )


def wait_message(seconds):
    minutes = math.ceil(seconds / 60)
    return f"Too many failed attempts. Wait {minutes} minute{'s' if minutes != 1 else ''} and try again."


class LoginThrottle:
    """
    First in AUTHENTICATION_BACKENDS: stops the chain (PermissionDenied) while the login is locked out.
    It has no get_user() on purpose: it never logs anyone in, so sessions never name it as their backend.
    """

    def authenticate(self, request, username=None, **credentials):
        if request is not None and login_wait(request, username):
            raise PermissionDenied
        return None  # let the next backend check the password

    async def aauthenticate(self, request, username=None, **credentials):
        return await sync_to_async(self.authenticate)(request, username, **credentials)


# Connected when this module is imported, which authenticate() does first: it loads every backend.
@receiver(user_login_failed, dispatch_uid="comfyhub.ratelimit.count_failed_login")
def count_failed_login(sender, credentials, request=None, **kwargs):
    if request is None:
        return
    LOGIN_BY_USERNAME.fail(username_key(credentials.get("username")))
    LOGIN_BY_ADDRESS.fail(client_address(request))


@receiver(user_logged_in, dispatch_uid="comfyhub.ratelimit.forget_failed_logins")
def forget_failed_logins(sender, request, user, **kwargs):
    # Only the username's counter: an address's failures may be someone else's guesses from the same network.
    LOGIN_BY_USERNAME.reset(username_key(user.get_username()))


class LoginView(auth_views.LoginView):
    """Django's login page, answering 429 with how long to wait while the username or address is locked out."""

    def post(self, request, *args, **kwargs):
        username = request.POST.get("username", "")
        wait = login_wait(request, username)
        if not wait:
            return super().post(request, *args, **kwargs)
        form = self.get_form_class()(request, initial={"username": username[:150]})
        response = self.render_to_response(self.get_context_data(form=form, locked_out=wait_message(wait)))
        response.status_code = 429
        response["Retry-After"] = str(wait)
        return response
