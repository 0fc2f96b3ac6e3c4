"""
Login lockout through django-axes, keyed so that an attacker cannot lock a user out.

Two limits, both within COMFYHUB_LOCKOUT_SECONDS of the latest failure that counts:
- a username from one address (LOGIN_FAILURES_PER_USERNAME_AND_ADDRESS, 5): guessing Carol's password from one
  place locks Carol out of that place only; she still logs in from anywhere else;
- one address whatever the usernames (LOGIN_FAILURES_PER_ADDRESS, 20): credential stuffing, one guess per
  username, is stopped all the same. Higher, because several people may share an address behind a NAT.
While either holds, every login of that username from that address (or every login from that address) is refused,
the right password too, so a guesser cannot tell a right guess from a refusal.

Axes (AxesStandaloneBackend first in AUTHENTICATION_BACKENDS, AxesMiddleware) covers every login that goes through
django.contrib.auth.authenticate: the login page and the admin's. Attempts are rows in the database
(AxesDatabaseHandler): every Daphne process sees the same counts, and operators see and delete them in the admin
("Axes" section) or with `manage.py axes_reset`.

Axes compares all its lockout parameter sets with one limit (AXES_FAILURE_LIMIT). Our two sets need two limits,
so axes counts only the pair (AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]) and `LockoutHandler`
adds the address cap, counted over the same attempt rows. A side effect we want: a successful login forgets only
that pair's failures (AXES_RESET_ON_SUCCESS), so an attacker who owns one account cannot wipe the address's count
by logging into it between guesses.

The address is REMOTE_ADDR as Daphne sees it: behind a reverse proxy run Daphne with `--proxy-headers` and have
the proxy overwrite (not append to) X-Forwarded-For.
"""

import math
from datetime import timedelta

from axes.attempts import get_cool_off_threshold
from axes.handlers.database import AxesDatabaseHandler
from axes.helpers import get_client_username, get_failure_limit
from axes.models import AccessAttempt
from django.conf import settings
from django.contrib.auth.forms import AuthenticationForm
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme

from comfyhub.ratelimit import client_address, wait_message


def failure_limit(request, credentials):
    """AXES_FAILURE_LIMIT: failed logins of one username from one address."""
    return settings.COMFYHUB["LOGIN_FAILURES_PER_USERNAME_AND_ADDRESS"]


def cool_off(request):
    """AXES_COOLOFF_TIME: how long a failure counts, from the latest one of its username and address."""
    return timedelta(seconds=settings.COMFYHUB["LOCKOUT_SECONDS"])


def username_key(request, credentials):
    """AXES_USERNAME_CALLABLE: "Carol" and "carol " are one username to count, whatever the database's collation."""
    if credentials is not None and credentials.get("username") is not None:
        username = credentials["username"]
    else:
        username = getattr(request, "POST", {}).get("username")
    return str(username).strip().casefold()[:255] if username is not None else None


class LockoutHandler(AxesDatabaseHandler):
    def get_failures(self, request, credentials=None):
        """The pair's failures; as many as its limit when the address has used up its own cap (see above)."""
        failures = super().get_failures(request, credentials)
        if address_failures(request) >= settings.COMFYHUB["LOGIN_FAILURES_PER_ADDRESS"]:
            return max(failures, get_failure_limit(request, credentials))
        return failures


def recent_attempts(request):
    return AccessAttempt.objects.filter(
        ip_address=request.axes_ip_address, attempt_time__gte=get_cool_off_threshold(request)
    )


def address_failures(request):
    if not request.axes_ip_address:
        return 0
    return sum(recent_attempts(request).values_list("failures_since_start", flat=True))


def retry_after(request, credentials):
    """Seconds until a login of this username from this address is allowed again (at least 1 while locked)."""
    if not request.axes_ip_address:
        return 0
    rows = list(
        recent_attempts(request).order_by("-attempt_time").values("username", "failures_since_start", "attempt_time")
    )
    username = get_client_username(request, credentials)
    # An attempt row stops counting LOCKOUT_SECONDS after its latest failure, so a limit holds until the row
    # that brought the newest failures up to it stops counting.
    ends = [
        lock_end([row for row in rows if row["username"] == username], failure_limit(request, credentials)),
        lock_end(rows, settings.COMFYHUB["LOGIN_FAILURES_PER_ADDRESS"]),
    ]
    now = timezone.now()
    return max([0, *(math.ceil((end - now).total_seconds()) for end in ends if end is not None)])


def lock_end(rows, limit):
    counted = 0
    for row in rows:
        counted += row["failures_since_start"]
        if counted >= limit:
            return row["attempt_time"] + cool_off(None)
    return None


def lockout_response(request, original_response=None, credentials=None):
    """AXES_LOCKOUT_CALLABLE: the login page (for the admin's login too), 429, saying how long to wait."""
    wait = max(1, retry_after(request, credentials))
    next_url = request.POST.get("next") or request.GET.get("next") or ""
    if not url_has_allowed_host_and_scheme(next_url, allowed_hosts={request.get_host()}):
        next_url = ""
    if not next_url and request.path.startswith(reverse("admin:index")):
        next_url = reverse("admin:index")
    username = (credentials or {}).get("username") or request.POST.get("username", "")
    form = AuthenticationForm(request, initial={"username": str(username)[:150]})
    context = {"form": form, "next": next_url, "locked_out": wait_message(wait)}
    response = render(request, "registration/login.html", context, status=429)
    response["Retry-After"] = str(wait)
    return response


def client_ip(request):
    """AXES_CLIENT_IP_CALLABLE: the same address the token limit counts (and never one a client wrote itself)."""
    return client_address(request) or None
