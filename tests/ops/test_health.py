"""/healthz and /readyz, the load balancer's probes: open to anyone, GET only, and honest about what failed."""

import pytest

from tests.ops.conftest import browser


def test_healthz_answers_ok_without_touching_the_database():
    # No database fixture: any query would fail the test.
    reply = browser().get("/healthz")
    assert reply.status_code == 200
    assert reply.content == b"ok"
    assert "no-cache" in reply["Cache-Control"]


@pytest.mark.django_db
def test_readyz_reports_the_database_and_the_channel_layer():
    reply = browser().get("/readyz")
    assert reply.status_code == 200
    assert reply.json() == {"database": "ok", "channel_layer": "ok"}


@pytest.mark.django_db
def test_readyz_is_503_naming_the_channel_layer_when_it_is_unreachable(settings):
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": ["redis://127.0.0.1:1/0"]}}
    }
    reply = browser().get("/readyz")
    assert reply.status_code == 503
    assert reply.json() == {"database": "ok", "channel_layer": "error"}


@pytest.mark.django_db
def test_the_probes_take_only_get():
    for path in ["/healthz", "/readyz"]:
        assert browser().post(path).status_code == 405
