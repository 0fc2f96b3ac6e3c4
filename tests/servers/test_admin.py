"""The server admin as an operator reads it: being drained is news, not being drained is not an error."""

import pytest
from django.test import Client

from servers.models import Server

pytestmark = pytest.mark.django_db


def test_a_server_not_draining_is_not_shown_as_an_error(admin_user):
    Server.objects.create(name="gpu-a", base_url="http://gpu-a.internal:8188")
    Server.objects.create(name="gpu-b", base_url="http://gpu-b.internal:8188", draining=True)
    client = Client()
    client.force_login(admin_user)
    page = client.get("/admin/servers/server/").content.decode()
    assert '<td class="field-draining_shown">no</td>' in page
    assert '<td class="field-draining_shown">yes</td>' in page
    assert "icon-no.svg" not in page  # both are enabled: no red cross anywhere in the list
