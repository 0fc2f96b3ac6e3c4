"""
Failed logins and invalid API tokens are counted per username and per address; past the limit every attempt is
refused, the right password too, until the window has passed.

The counters live in the configured cache (Redis in the PostgreSQL + Redis pass, where they outlive the test
run), so each test uses its own usernames and addresses.
"""

import secrets

import pytest
from django.test import Client

from comfyhub import ratelimit
from tests.conftest import ApiClient, make_user

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fast_hashing(settings):
    # Every login checks a password; the default hasher takes a quarter of a second on purpose.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def address():
    return f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"


@pytest.fixture
def carol(db):
    """A user with a name of her own in every run: the counters may outlive the test database."""
    return make_user(f"carol-{secrets.token_hex(4)}")


def password(user):
    return f"{user.username}-pass-123"


def log_in(client, username, pw, path="/accounts/login/"):
    return client.post(path, {"username": username, "password": pw})


def logged_in(client):
    return client.get("/").status_code == 200


@pytest.fixture
def later(monkeypatch):
    """Move the limiter's clock past the lockout window."""

    def move(seconds):
        now = ratelimit.clock()
        monkeypatch.setattr(ratelimit, "clock", lambda: now + seconds)

    return move


def test_five_failures_lock_the_username_even_for_the_right_password(carol, settings):
    assert settings.COMFYHUB["LOGIN_FAILURES_PER_USERNAME"] == 5
    browser = Client(REMOTE_ADDR=address())
    for _ in range(5):
        reply = log_in(browser, carol.username, "wrong")
        assert reply.status_code == 200 and "did not match" in reply.content.decode()
    reply = log_in(browser, carol.username, password(carol))
    assert reply.status_code == 429
    assert "Too many failed attempts. Wait 5 minutes and try again." in reply.content.decode()
    assert 290 <= int(reply["Retry-After"]) <= 300
    assert not logged_in(browser)
    # The username is locked wherever the attempt comes from.
    elsewhere = Client(REMOTE_ADDR=address())
    assert log_in(elsewhere, carol.username, password(carol)).status_code == 429
    assert not logged_in(elsewhere)


def test_the_lock_ends_when_the_window_passes(carol, later):
    browser = Client(REMOTE_ADDR=address())
    for _ in range(5):
        log_in(browser, carol.username, "wrong")
    assert log_in(browser, carol.username, password(carol)).status_code == 429
    later(299)
    assert log_in(browser, carol.username, password(carol)).status_code == 429
    later(301)
    assert log_in(browser, carol.username, password(carol)).status_code == 302
    assert logged_in(browser)


def test_an_address_is_locked_after_many_failures_whatever_the_usernames(carol, settings):
    limit = settings.COMFYHUB["LOGIN_FAILURES_PER_ADDRESS"]
    guesser = address()
    browser = Client(REMOTE_ADDR=guesser)
    for n in range(limit):
        assert log_in(browser, f"nobody-{n}-{secrets.token_hex(3)}", "wrong").status_code == 200
    reply = log_in(browser, carol.username, password(carol))
    assert reply.status_code == 429 and "Too many failed attempts" in reply.content.decode()
    # Carol herself, from another address, is not locked out by that.
    assert log_in(Client(REMOTE_ADDR=address()), carol.username, password(carol)).status_code == 302


def test_successful_logins_do_not_count(carol):
    browser = Client(REMOTE_ADDR=address())
    for _ in range(8):
        assert log_in(browser, carol.username, password(carol)).status_code == 302
        browser.logout()
    # A success forgets the username's earlier failures: 4 + 4 failures around it never reach 5.
    for _ in range(2):
        for _ in range(4):
            log_in(browser, carol.username, "wrong")
        assert log_in(browser, carol.username, password(carol)).status_code == 302
        browser.logout()


def test_the_admin_login_is_limited_too(settings):
    staff = make_user(f"olivia-{secrets.token_hex(4)}", is_staff=True)
    browser = Client(REMOTE_ADDR=address())
    for _ in range(5):
        assert log_in(browser, staff.username, "wrong", "/admin/login/").status_code == 200
    reply = log_in(browser, staff.username, password(staff), "/admin/login/")
    assert reply.status_code == 200  # the admin's own form, with its own error
    assert browser.get("/admin/").status_code == 302  # not logged in


def test_invalid_api_tokens_lock_the_address(alice, later, settings):
    limit = settings.COMFYHUB["TOKEN_FAILURES_PER_ADDRESS"]
    guesser = address()
    wrong = Client(HTTP_AUTHORIZATION="Bearer ch_not-a-token", REMOTE_ADDR=guesser)
    for _ in range(limit):
        assert wrong.get("/api/v1/tasks").status_code == 401
    good = ApiClient(alice)
    reply = good.client.get("/api/v1/tasks", REMOTE_ADDR=guesser)
    assert reply.status_code == 429
    assert reply.json()["error"]["code"] == "too_many_attempts" and int(reply["Retry-After"]) > 0
    # Other addresses are not affected, and the lock ends with its window.
    assert good.client.get("/api/v1/tasks", REMOTE_ADDR=address()).status_code == 200
    later(301)
    assert good.client.get("/api/v1/tasks", REMOTE_ADDR=guesser).status_code == 200


def test_valid_tokens_are_never_counted(alice, settings):
    good = ApiClient(alice)
    user_address = address()
    for _ in range(settings.COMFYHUB["TOKEN_FAILURES_PER_ADDRESS"] + 5):
        assert good.client.get("/api/v1/tasks", REMOTE_ADDR=user_address).status_code == 200


def test_a_cache_that_does_not_answer_lets_logins_through(carol, monkeypatch):
    """Locking everyone out while Redis is down would be worse than a few unthrottled guesses."""

    class Broken:
        def __getattr__(self, name):
            raise ConnectionError("the cache is down")

    monkeypatch.setattr(ratelimit, "cache", Broken())
    browser = Client(REMOTE_ADDR=address())
    for _ in range(6):
        log_in(browser, carol.username, "wrong")
    assert log_in(browser, carol.username, password(carol)).status_code == 302
