"""
Invalid API bearer tokens are counted per address; past the limit the invalid ones get 429 with Retry-After until
the window has passed. A valid token is never refused, whatever else came from its address. (Login lockout:
test_lockout.py.)

The counters live in the configured cache (Redis in the PostgreSQL + Redis pass, where they outlive the test
run), so each test uses its own addresses.
"""

import secrets

import pytest
from django.test import Client

from comfyhub import ratelimit
from tests.conftest import ApiClient

pytestmark = pytest.mark.django_db


def address():
    return f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"


@pytest.fixture
def later(monkeypatch):
    """Move the limiter's clock past the lockout window."""

    def move(seconds):
        now = ratelimit.clock()
        monkeypatch.setattr(ratelimit, "clock", lambda: now + seconds)

    return move


def test_invalid_tokens_from_an_address_get_429_after_the_limit(alice, later, settings):
    limit = settings.COMFYHUB["TOKEN_FAILURES_PER_ADDRESS"]
    guesser = address()
    wrong = Client(HTTP_AUTHORIZATION="Bearer ch_not-a-token", REMOTE_ADDR=guesser)
    for _ in range(limit):
        assert wrong.get("/api/v1/tasks").status_code == 401
    reply = wrong.get("/api/v1/tasks")
    assert reply.status_code == 429
    assert reply.json()["error"]["code"] == "too_many_attempts"
    assert 290 <= int(reply["Retry-After"]) <= 300
    # Other addresses are not affected, and the lock ends with its window.
    elsewhere = Client(HTTP_AUTHORIZATION="Bearer ch_not-a-token", REMOTE_ADDR=address())
    assert elsewhere.get("/api/v1/tasks").status_code == 401
    later(301)
    assert wrong.get("/api/v1/tasks").status_code == 401


def test_a_valid_token_works_from_an_address_that_sent_many_invalid_ones(alice, settings):
    shared = address()  # a NAT: a guesser and an integrator behind one address
    wrong = Client(HTTP_AUTHORIZATION="Bearer ch_not-a-token", REMOTE_ADDR=shared)
    replies = [wrong.get("/api/v1/tasks").status_code for _ in range(50)]
    assert replies.count(401) == settings.COMFYHUB["TOKEN_FAILURES_PER_ADDRESS"] and replies[-1] == 429
    good = ApiClient(alice)
    assert good.client.get("/api/v1/tasks", REMOTE_ADDR=shared).status_code == 200
    assert good.post("/api/v1/tasks", {"workflow": "nope"}, REMOTE_ADDR=shared).status_code != 429
    assert wrong.get("/api/v1/tasks").status_code == 429  # the invalid ones are still refused


def test_the_right_metrics_token_passes_after_many_wrong_ones(settings):
    settings.COMFYHUB = {**settings.COMFYHUB, "METRICS_TOKEN": "a-long-random-scrape-token-0123456789"}
    shared = address()
    wrong = Client(HTTP_AUTHORIZATION="Bearer nope", REMOTE_ADDR=shared)
    assert {wrong.get("/metrics").status_code for _ in range(30)} == {404}
    right = Client(HTTP_AUTHORIZATION="Bearer a-long-random-scrape-token-0123456789", REMOTE_ADDR=shared)
    assert right.get("/metrics").status_code == 200


def test_valid_tokens_are_never_counted(alice, settings):
    good = ApiClient(alice)
    user_address = address()
    for _ in range(settings.COMFYHUB["TOKEN_FAILURES_PER_ADDRESS"] + 5):
        assert good.client.get("/api/v1/tasks", REMOTE_ADDR=user_address).status_code == 200


def test_a_cache_that_does_not_answer_lets_tokens_through(alice, monkeypatch):
    """Refusing every client while Redis is down would be worse than a few uncounted invalid tokens."""

    class Broken:
        def __getattr__(self, name):
            raise ConnectionError("the cache is down")

    monkeypatch.setattr(ratelimit, "cache", Broken())
    guesser = address()
    wrong = Client(HTTP_AUTHORIZATION="Bearer ch_not-a-token", REMOTE_ADDR=guesser)
    assert {wrong.get("/api/v1/tasks").status_code for _ in range(25)} == {401}
    assert ApiClient(alice).client.get("/api/v1/tasks", REMOTE_ADDR=guesser).status_code == 200
