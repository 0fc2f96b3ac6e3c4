"""Operator endpoints: the staff pool dashboard, Prometheus metrics, and the load balancer's health probes."""

import asyncio
import hmac
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth.decorators import login_not_required, login_required
from django.db import connection
from django.http import Http404, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from django_htmx.http import reselect, reswap, retarget
from prometheus_client import CONTENT_TYPE_LATEST

from comfyhub.ratelimit import count_wrong_token
from ops.dashboard import dashboard
from ops.metrics import exposition
from tasks import storage

logger = logging.getLogger(__name__)

READY_TIMEOUT = 2.0  # seconds each readiness check may take; a load balancer's probe usually allows a few
# The storage probe's own thread. Not the thread of sync views (sync_to_async's default): a bucket that hangs
# would stall every page of this process behind it. Not the event loop's shared pool either: one hung probe per
# load balancer tick would soon fill it (asyncio resolves host names there). One thread: while a probe hangs,
# the next ones wait behind it and answer "timeout" without starting another.
_storage_probes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="readyz-storage")


@require_GET
@login_required
@never_cache
def ops_dashboard(request):
    if not request.user.is_staff:
        raise Http404  # the page's existence is none of a normal user's business
    context = dashboard()
    if request.htmx:
        # An htmx re-read (say, catching up after a reconnect) gets the body only, swapped in place: replacing
        # the wrapper that holds /ws/ops/ would close that socket and open another.
        response = render(request, "ops/dashboard.html#ops-body", context)
        return reswap(retarget(reselect(response, "#ops-body"), "#ops-body"), "outerHTML")
    return render(request, "ops/dashboard.html", context)


def may_read_metrics(request):
    """A staff session, or the bearer token set in COMFYHUB_METRICS_TOKEN (none when it is empty)."""
    token = settings.COMFYHUB.get("METRICS_TOKEN", "")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if token and scheme.lower() == "bearer":
        # The right token always passes, like a valid API token: a flood of wrong ones from the scraper's network
        # must not blind the monitoring (in production the token has at least 32 characters: it cannot be
        # guessed). Wrong ones count against the address like wrong API tokens; past the limit they are not
        # counted any more until the window passes.
        if hmac.compare_digest(given.strip().encode(), token.encode()):
            return True
        count_wrong_token(request)
        return False
    return request.user.is_authenticated and request.user.is_staff


@require_GET
@login_not_required
@never_cache
def metrics(request):
    if not may_read_metrics(request):
        raise Http404  # like a page that does not exist: a scanner learns nothing
    return HttpResponse(exposition(), content_type=CONTENT_TYPE_LATEST)


@require_GET
@login_not_required
@never_cache
def healthz(request):
    """The process answers. Nothing else is checked, so a database outage does not get every process killed."""
    return HttpResponse("ok", content_type="text/plain; charset=utf-8")


@require_GET
@login_not_required
@never_cache
async def readyz(request):
    """
    Whether this process can serve: its database answers, its channel layer carries a message and its file store
    (MEDIA_ROOT or the bucket) answers. 503 names each part that failed, "error" or "timeout"; the log says why.
    """
    checks = {
        "database": sync_to_async(ping_database)(),
        "channel_layer": ping_channel_layer(),
        "storage": sync_to_async(storage.ping, thread_sensitive=False, executor=_storage_probes)(),
    }
    results = await asyncio.gather(*(check(name, probe) for name, probe in checks.items()))
    body = dict(zip(checks, results, strict=True))
    return JsonResponse(body, status=200 if all(result == "ok" for result in results) else 503)


async def check(name, probe):
    try:
        await asyncio.wait_for(probe, timeout=READY_TIMEOUT)
    except TimeoutError:
        logger.warning("readiness: %s did not answer within %.1f s", name, READY_TIMEOUT)
        return "timeout"
    except Exception as exc:
        # The reason goes to the log, not to an anonymous caller.
        logger.warning("readiness: %s failed: %s: %s", name, type(exc).__name__, exc, exc_info=True)
        return "error"
    return "ok"


def ping_database():
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


# One channel per layer and event loop, reused by every probe: the pub/sub layer subscribes to each new channel and
# unsubscribes only when a receive is cancelled, so a channel per probe would pile up subscriptions.
_ping_channels = {}


async def ping_channel_layer():
    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("no channel layer is configured")
    key = (id(layer), id(asyncio.get_running_loop()))
    if key not in _ping_channels:
        # The default prefix: channels_redis' core layer reads a process's own channels one prefix at a time.
        _ping_channels[key] = (asyncio.Lock(), await layer.new_channel())
    lock, channel = _ping_channels[key]
    async with lock:
        nonce = secrets.token_hex(8)
        try:
            await layer.send(channel, {"type": "readyz.ping", "nonce": nonce})
            while (await layer.receive(channel)).get("nonce") != nonce:
                pass  # the answer to an earlier probe that timed out
        except BaseException:
            _ping_channels.pop(key, None)  # a cancelled receive leaves the channel: the next probe makes another
            raise
