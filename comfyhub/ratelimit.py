"""
Failure counters in Django's cache that slow down bearer-token guessing (logins: comfyhub/lockout.py, axes).

A `Limit` allows `limit` failures per key (an address) within a window counted from the first of them. A valid
token is always let through: it is checked first, and only invalid ones are counted and, once an address has used
up its failures, answered 429 until the window has passed. So a client's valid token is never refused because of
someone else's guesses from the same address. The counters live in the default cache: Redis when REDIS_URL is
set, so every process counts together; else this process's memory, which is enough for the embedded default
because it is one process.

Behind a reverse proxy the address is REMOTE_ADDR as Daphne sees it: run Daphne with `--proxy-headers`, and
have the proxy overwrite (not append to) X-Forwarded-For.
"""

import hashlib
import logging
import math
import time

from django.conf import settings
from django.core.cache import cache

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


TOKEN_BY_ADDRESS = Limit("token-address", "TOKEN_FAILURES_PER_ADDRESS")


def client_address(request):
    return request.META.get("REMOTE_ADDR") or ""


def count_wrong_token(request):
    """
    Count a wrong API token against the client's address. Returns the seconds the address must still wait (0: not
    refused yet). Once it is refused, more wrong tokens are not counted: the window ends when the answer says.
    """
    address = client_address(request)
    wait = TOKEN_BY_ADDRESS.retry_after(address)
    if not wait:
        TOKEN_BY_ADDRESS.fail(address)
    return wait


def wait_message(seconds):
    minutes = math.ceil(seconds / 60)
    return f"Too many failed attempts. Wait {minutes} minute{'s' if minutes != 1 else ''} and try again."
