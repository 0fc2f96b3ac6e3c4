"""With COMFYHUB_PRODUCTION set, the settings refuse to start unsafe and turn on HTTPS-only cookies and HSTS."""

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GOOD_KEY = secrets.token_urlsafe(50)
SHOW = (
    "import json, django; from django.conf import settings; django.setup(); print(json.dumps({name: "
    "getattr(settings, name) for name in ('DEBUG', 'SESSION_COOKIE_SECURE', 'CSRF_COOKIE_SECURE', "
    "'SECURE_SSL_REDIRECT', 'SECURE_HSTS_SECONDS', 'SECURE_REDIRECT_EXEMPT')}))"
)


def run(*args, **env):
    """Python in a fresh process with only these settings variables (and the test database's) set."""
    base = {
        k: v for k, v in os.environ.items()
        if not k.startswith("COMFYHUB_") and k not in ("DEBUG", "SECRET_KEY", "ALLOWED_HOSTS")
    }
    base["DJANGO_SETTINGS_MODULE"] = "comfyhub.settings"
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({"DEBUG": "true", "SECRET_KEY": GOOD_KEY}, "DEBUG must be false"),
        ({}, "SECRET_KEY must be a random string of at least 32 characters"),
        ({"SECRET_KEY": "comfyhub-embedded-default-not-for-production"}, "not the embedded default"),
        ({"SECRET_KEY": "short-but-not-empty"}, "at least 32 characters"),
        ({"SECRET_KEY": "a" * 64}, "at least 32 characters"),
        ({"SECRET_KEY": GOOD_KEY, "ALLOWED_HOSTS": "*"}, "ALLOWED_HOSTS must name the hub's hosts"),
        ({"SECRET_KEY": GOOD_KEY, "COMFYHUB_METRICS_TOKEN": "scrape"}, "COMFYHUB_METRICS_TOKEN must be empty or"),
    ],
    ids=["debug", "no-key", "embedded-key", "short-key", "one-letter-key", "any-host", "short-metrics-token"],
)
def test_production_refuses_to_start_unsafe(env, complaint):
    result = run("-c", "import django; django.setup()", COMFYHUB_PRODUCTION="true", **env)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and complaint in result.stderr, result.stderr[-2000:]


def test_production_turns_on_https_only_cookies_hsts_and_the_redirect():
    result = run("-c", SHOW, COMFYHUB_PRODUCTION="1", SECRET_KEY=GOOD_KEY, ALLOWED_HOSTS="hub.example.org")
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    assert values["DEBUG"] is False
    assert values["SESSION_COOKIE_SECURE"] is True and values["CSRF_COOKIE_SECURE"] is True
    assert values["SECURE_SSL_REDIRECT"] is True and values["SECURE_HSTS_SECONDS"] >= 3600
    # The load balancer's probes and the scraper talk to Daphne over plain HTTP.
    assert set(values["SECURE_REDIRECT_EXEMPT"]) == {"^healthz$", "^readyz$", "^metrics$"}


def test_djangos_deploy_check_has_nothing_to_say_about_what_production_sets():
    result = run(
        "manage.py", "check", "--deploy", COMFYHUB_PRODUCTION="true", SECRET_KEY=GOOD_KEY,
        ALLOWED_HOSTS="hub.example.org",
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    # SSL redirect, HSTS, secret key, secure session and CSRF cookies, DEBUG, ALLOWED_HOSTS.
    for check in ("W004", "W008", "W009", "W012", "W016", "W018", "W020"):
        assert f"security.{check}" not in output, output


def test_the_embedded_default_still_starts_without_any_of_it():
    result = run("-c", SHOW)
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    assert values["SESSION_COOKIE_SECURE"] is False and values["SECURE_SSL_REDIRECT"] is False
