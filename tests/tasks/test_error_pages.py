"""Error pages: the site's look and navigation for people, JSON for programs under /api/."""

import uuid

import pytest
from django.test import Client

pytestmark = pytest.mark.django_db

NAV = '<nav aria-label="Main">'


def browser(user):
    # A real 500 is answered, not raised into the test; DEBUG is off under pytest-django, as in production.
    client = Client(raise_request_exception=False)
    client.force_login(user)
    return client


def test_a_missing_page_is_a_404_with_the_navigation(alice):
    reply = browser(alice).get("/no-such-page/")
    assert reply.status_code == 404
    page = reply.content.decode()
    assert "<h1>Page not found</h1>" in page and "<code>/no-such-page/</code>" in page
    assert NAV in page and 'href="/account/"' in page
    assert "comfyhub.css" in page


def test_another_users_task_gets_the_same_404_page(alice, bob):
    reply = browser(bob).get(f"/tasks/{uuid.uuid4()}/")
    assert reply.status_code == 404
    assert "<h1>Page not found</h1>" in reply.content.decode()


def test_an_api_404_stays_json(alice):
    reply = browser(alice).get("/api/v1/no-such-thing")
    assert reply.status_code == 404
    assert reply["Content-Type"] == "application/json"
    assert reply.json()["error"]["code"] == "not_found"


@pytest.mark.urls("tests.tasks.error_urls")
def test_a_server_error_shows_the_styled_page_without_internals(alice):
    reply = browser(alice).get("/broken/")
    assert reply.status_code == 500
    page = reply.content.decode()
    assert "<h1>Something went wrong</h1>" in page
    assert NAV in page and 'href="/account/"' in page
    assert "a bug in a view" not in page and "Traceback" not in page


@pytest.mark.urls("tests.tasks.error_urls")
def test_a_server_error_under_the_api_is_json(alice):
    reply = browser(alice).get("/api/v1/broken")
    assert reply.status_code == 500
    assert reply.json()["error"]["code"] == "server_error"
    assert "a bug in a view" not in reply.content.decode()


@pytest.mark.urls("tests.tasks.error_urls")
def test_the_error_page_still_renders_when_the_request_cannot_be_drawn(alice, monkeypatch):
    # The running count comes from the database: when that is what broke, the page is drawn without the request.
    def database_down(user):
        raise RuntimeError("database down")

    monkeypatch.setattr("tasks.consumers.task_counts", database_down)
    reply = browser(alice).get("/broken/")
    assert reply.status_code == 500
    page = reply.content.decode()
    assert "<h1>Something went wrong</h1>" in page and "comfyhub.css" in page
    assert NAV not in page  # no user without the request: no navigation, but no second failure either
