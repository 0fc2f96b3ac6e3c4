"""The demo hub (`serve --demo`) says what it is on every page, and where a newcomer finds the staff pages."""

import pytest
from django.test import Client

from tasks import demo

pytestmark = pytest.mark.django_db


@pytest.fixture
def demo_hub(monkeypatch):
    monkeypatch.setattr(demo, "_serving", True)


def test_the_login_page_of_the_demo_hub_gives_the_demo_login_and_how_to_get_staff(demo_hub):
    page = Client().get("/accounts/login/").content.decode()
    assert 'id="demo-banner"' in page
    assert "the GPUs are simulated" in page
    assert "<code>demo</code> / <code>demo-password</code>" in page
    assert "manage.py createsuperuser" in page
    assert "<code>/ops/</code>" in page and "<code>/admin/</code>" in page


def test_a_staff_user_gets_links_to_the_staff_pages(demo_hub, admin_user):
    client = Client()
    client.force_login(admin_user)
    page = client.get("/").content.decode()
    assert '<a href="/ops/">/ops/</a>' in page and '<a href="/admin/">/admin/</a>' in page
    assert "demo-password" not in page


def test_a_hub_that_is_not_the_demo_has_no_banner(alice):
    client = Client()
    client.force_login(alice)
    assert 'id="demo-banner"' not in client.get("/").content.decode()
    assert 'id="demo-banner"' not in Client().get("/accounts/login/").content.decode()
