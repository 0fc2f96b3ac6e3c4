"""The account page: API tokens made, listed and revoked by their owner; password change; the logout message."""

import re

import pytest
from django.test import Client

from tasks.models import ApiToken

pytestmark = pytest.mark.django_db

SECRET = re.compile(r"ch_[A-Za-z0-9_-]{20,}")
NEW_PASSWORD = "a-much-longer-pass-7"


def browser(user, **kwargs):
    client = Client(**kwargs)
    client.force_login(user)
    return client


def api_status(token):
    """What the API answers a program that sends this token."""
    return Client(HTTP_AUTHORIZATION=f"Bearer {token}").get("/api/v1/tasks").status_code


def create_token(client, name="render script"):
    reply = client.post("/account/tokens/", {"name": name})
    assert reply.status_code == 201, reply.content.decode()
    secrets = set(SECRET.findall(reply.content.decode()))
    assert len(secrets) == 1, secrets
    return reply, secrets.pop()


def test_the_username_in_the_top_bar_opens_the_account_page(alice):
    page = browser(alice).get("/").content.decode()
    assert re.search(r'<a href="/account/"[^>]*>alice</a>', page)
    reply = browser(alice).get("/account/")
    assert reply.status_code == 200
    assert "API tokens" in reply.content.decode()
    assert 'href="/accounts/password_change/"' in reply.content.decode()


def test_the_account_page_needs_a_login():
    reply = Client().get("/account/")
    assert reply.status_code == 302 and reply["Location"].startswith("/accounts/login/?next=/account/")


def test_a_new_token_is_shown_once_and_opens_the_api(alice):
    client = browser(alice)
    reply, secret = create_token(client, name="render script")
    page = reply.content.decode()
    assert "shown this once" in page
    assert "no-store" in reply["Cache-Control"]  # no cache or back button keeps the secret
    token = ApiToken.objects.get(user=alice)
    assert token.name == "render script" and secret.startswith(token.prefix)

    again = client.get("/account/").content.decode()
    assert secret not in again and not SECRET.search(again)
    row = re.search(rf'<tr id="token-{token.pk}">(.*?)</tr>', again, re.S).group(1)
    assert "render script" in row and f"{token.prefix}…" in row and "never" in row
    assert api_status(secret) == 200


def test_the_list_shows_when_a_token_was_last_used(alice):
    client = browser(alice)
    _, secret = create_token(client)
    api_status(secret)
    token = ApiToken.objects.get(user=alice)
    row = re.search(rf'<tr id="token-{token.pk}">(.*?)</tr>', client.get("/account/").content.decode(), re.S)
    assert token.last_used_at.strftime("%Y-%m-%d %H:%M") in row.group(1)
    assert "never" not in row.group(1)


def test_a_token_needs_a_name(alice):
    reply = browser(alice).post("/account/tokens/", {"name": "  "})
    assert reply.status_code == 400
    assert "This field is required." in reply.content.decode()
    assert not SECRET.search(reply.content.decode())
    assert not ApiToken.objects.exists()


def test_revoking_a_token_stops_it_opening_the_api(alice):
    client = browser(alice)
    _, secret = create_token(client)
    kept_reply, kept = create_token(client, name="kept")
    token = ApiToken.objects.get(name="render script")
    reply = client.post(f"/account/tokens/{token.pk}/revoke", follow=True)
    assert reply.redirect_chain == [("/account/", 302)]
    page = reply.content.decode()
    assert f"Token render script ({token.prefix}…) revoked" in page
    assert f'id="token-{token.pk}"' not in page
    assert api_status(secret) == 401
    assert api_status(kept) == 200


def test_revoking_takes_a_post_with_its_csrf_token(alice):
    _, secret = create_token(browser(alice))
    token = ApiToken.objects.get()
    assert browser(alice).get(f"/account/tokens/{token.pk}/revoke").status_code == 405
    assert browser(alice, enforce_csrf_checks=True).post(f"/account/tokens/{token.pk}/revoke").status_code == 403
    assert api_status(secret) == 200


def test_another_users_token_is_a_404_and_stays(alice, bob):
    _, secret = create_token(browser(alice), name="alice's script")
    token = ApiToken.objects.get()
    bob_client = browser(bob)
    assert bob_client.post(f"/account/tokens/{token.pk}/revoke").status_code == 404
    assert ApiToken.objects.filter(pk=token.pk).exists()
    assert api_status(secret) == 200
    assert "alice&#x27;s script" not in bob_client.get("/account/").content.decode()
    assert bob_client.post("/account/tokens/999999/revoke").status_code == 404


def test_changing_the_password(alice):
    client = browser(alice)
    form = client.get("/accounts/password_change/")
    assert form.status_code == 200
    assert 'aria-label="Main"' in form.content.decode()  # the site's page, not the admin's
    reply = client.post(
        "/accounts/password_change/",
        {"old_password": "alice-pass-123", "new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD},
        follow=True,
    )
    assert reply.redirect_chain == [("/accounts/password_change/done/", 302)]
    assert "Your password has been changed" in reply.content.decode()
    assert client.get("/account/").status_code == 200  # this browser stays logged in
    alice.refresh_from_db()
    assert alice.check_password(NEW_PASSWORD) and not alice.check_password("alice-pass-123")


def test_a_wrong_old_password_changes_nothing(alice):
    reply = browser(alice).post(
        "/accounts/password_change/",
        {"old_password": "wrong", "new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD},
    )
    assert reply.status_code == 200
    assert "Your old password was entered incorrectly" in reply.content.decode()
    alice.refresh_from_db()
    assert alice.check_password("alice-pass-123")


def test_logging_out_says_so_on_the_login_page(alice):
    client = browser(alice)
    reply = client.post("/accounts/logout/", follow=True)
    assert reply.redirect_chain == [("/accounts/login/", 302)]  # LOGOUT_REDIRECT_URL
    page = reply.content.decode()
    assert page.count("You have been logged out.") == 1
    assert 'name="username"' in page
    assert "You have been logged out." not in client.get("/accounts/login/").content.decode()  # once only


def test_logging_out_without_a_redirect_shows_the_logged_out_page_once(alice, settings):
    settings.LOGOUT_REDIRECT_URL = None
    reply = browser(alice).post("/accounts/logout/")
    assert reply.status_code == 200
    page = reply.content.decode()
    assert "<h1>Logged out</h1>" in page
    assert page.count("You have been logged out.") == 1
    assert 'href="/accounts/login/"' in page
