"""
Failed logins lock a username out from the address they came from, not everywhere (django-axes, comfyhub/lockout.py):
an attacker guessing Carol's password cannot keep Carol out. One address is also capped across usernames, so
credential stuffing stops all the same. The login page and the admin's share the lockout.
"""

import re
from datetime import timedelta

import pytest
from axes.models import AccessAttempt
from django.db.models import F
from django.test import Client

from tests.conftest import make_user
from tests.security.test_production_settings import run

pytestmark = pytest.mark.django_db

HOME, AWAY = "10.1.0.1", "10.2.0.2"


@pytest.fixture(autouse=True)
def fast_hashing(settings):
    # Every login checks a password; the default hasher takes a quarter of a second on purpose.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def carol(db):
    return make_user("carol")


def password(user):
    return f"{user.username}-pass-123"


def log_in(address, username, pw, path="/accounts/login/", client=None):
    client = client or Client(REMOTE_ADDR=address)
    return client, client.post(path, {"username": username, "password": pw})


def logged_in(client):
    return client.get("/").status_code == 200


def later(seconds):
    """Every failure recorded happened `seconds` earlier (axes counts from the attempt rows' times)."""
    AccessAttempt.objects.update(attempt_time=F("attempt_time") - timedelta(seconds=seconds))


def fail(address, username, times, path="/accounts/login/"):
    return [log_in(address, username, "wrong", path)[1].status_code for _ in range(times)]


def test_failures_from_one_address_do_not_lock_the_user_out_elsewhere(carol, settings):
    assert settings.COMFYHUB["LOGIN_FAILURES_PER_USERNAME_AND_ADDRESS"] == 5
    # Four failures are ordinary mistakes; the fifth locks the username out from this address at once.
    assert fail(HOME, "carol", 5) == [200, 200, 200, 200, 429]
    browser, reply = log_in(HOME, "carol", password(carol))
    assert reply.status_code == 429, "the right password is refused too while locked"
    assert not logged_in(browser)
    # Carol from anywhere else is not affected.
    browser, reply = log_in(AWAY, "carol", password(carol))
    assert reply.status_code == 302 and logged_in(browser)


def test_the_lockout_page_says_how_long_to_wait(carol):
    fail(HOME, "carol", 5)
    _, reply = log_in(HOME, "carol", password(carol))
    page = reply.content.decode()
    assert reply.status_code == 429
    assert "Too many failed attempts. Wait 5 minutes and try again." in page
    assert 295 <= int(reply["Retry-After"]) <= 300
    assert '<form method="post" action="/accounts/login/">' in page  # the login page, to try again later
    later(200)
    _, reply = log_in(HOME, "carol", password(carol))
    assert reply.status_code == 429 and 95 <= int(reply["Retry-After"]) <= 100
    assert "Wait 2 minutes" in reply.content.decode()


def test_the_lock_ends_after_the_cool_off(carol):
    fail(HOME, "carol", 5)
    later(299)
    assert log_in(HOME, "carol", password(carol))[1].status_code == 429
    later(2)
    browser, reply = log_in(HOME, "carol", password(carol))
    assert reply.status_code == 302 and logged_in(browser)


def test_attempts_while_locked_do_not_extend_the_lock(carol):
    fail(HOME, "carol", 5)
    later(250)
    assert fail(HOME, "carol", 10) == [429] * 10
    later(51)
    assert log_in(HOME, "carol", password(carol))[1].status_code == 302


def test_usernames_are_counted_whatever_their_case(carol):
    assert fail(HOME, "Carol", 2) + fail(HOME, " carol", 2) + fail(HOME, "CAROL", 1) == [200] * 4 + [429]
    assert log_in(HOME, "carol", password(carol))[1].status_code == 429


def test_one_address_is_capped_across_usernames(carol, settings):
    limit = settings.COMFYHUB["LOGIN_FAILURES_PER_ADDRESS"]
    assert limit == 20
    replies = [log_in(HOME, f"nobody-{n}", "wrong")[1].status_code for n in range(limit)]
    assert replies == [200] * (limit - 1) + [429]
    _, reply = log_in(HOME, "carol", password(carol))
    assert reply.status_code == 429 and "Too many failed attempts" in reply.content.decode()
    # Carol herself, from another address, is not locked out by that.
    assert log_in(AWAY, "carol", password(carol))[1].status_code == 302
    later(301)
    assert log_in(HOME, "carol", password(carol))[1].status_code == 302


def test_a_success_forgets_only_that_usernames_failures(carol):
    # 4 + 4 failures around a success never reach 5.
    for _ in range(2):
        fail(HOME, "carol", 4)
        browser, reply = log_in(HOME, "carol", password(carol))
        assert reply.status_code == 302
        browser.logout()
    # A stuffer who owns an account cannot wipe the address's count by logging into it between guesses.
    mallory = make_user("mallory")
    for n in range(19):
        log_in(HOME, f"victim-{n}", "wrong")
    assert log_in(HOME, "mallory", password(mallory))[1].status_code == 302
    assert log_in(HOME, "victim-19", "wrong")[1].status_code == 429


def test_the_admin_login_is_locked_out_the_same_way(db):
    olivia = make_user("olivia", is_staff=True)
    assert fail(HOME, "olivia", 4, "/admin/login/") == [200] * 4
    # The admin's and the site's login count together: the fifth failure, on the site's page, locks both.
    assert fail(HOME, "olivia", 1) == [429]
    browser, reply = log_in(HOME, "olivia", password(olivia), "/admin/login/?next=/admin/")
    assert reply.status_code == 429 and "Too many failed attempts" in reply.content.decode()
    assert re.search(r'name="next" value="/admin/"', reply.content.decode())
    assert browser.get("/admin/").status_code == 302  # not logged in
    # From another address the admin logs in.
    browser, reply = log_in(AWAY, "olivia", password(olivia), "/admin/login/?next=/admin/")
    assert reply.status_code == 302 and browser.get("/admin/").status_code == 200


def test_attempts_are_rows_operators_can_see(carol):
    fail(HOME, "carol", 3)
    attempt = AccessAttempt.objects.get()
    assert (attempt.username, attempt.ip_address, attempt.failures_since_start) == ("carol", HOME, 3)
    assert "wrong" not in attempt.post_data  # axes masks the password


def test_the_old_per_username_setting_is_refused_by_name():
    result = run("-c", "import django; django.setup()", COMFYHUB_LOGIN_FAILURES_PER_USERNAME="5")
    assert result.returncode != 0
    assert "COMFYHUB_LOGIN_FAILURES_PER_USERNAME_AND_ADDRESS" in result.stderr, result.stderr[-2000:]
