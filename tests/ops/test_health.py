"""/healthz and /readyz, the load balancer's probes: open to anyone, GET only, and honest about what failed."""

import logging
import socket
import time

import pytest
from botocore.config import Config

from comfyhub.object_storage import storages_setting
from ops import views
from tests.ops.conftest import browser

EVERYTHING_UP = {"database": "ok", "channel_layer": "ok", "storage": "ok"}


def use_bucket(settings, env, **options):
    """The hub's files in the bucket `env` names (Django's setting_changed makes default_storage follow)."""
    storages = storages_setting(env)
    storages["default"]["OPTIONS"].update(options)
    settings.STORAGES = storages


def test_healthz_answers_ok_without_touching_the_database():
    # No database fixture: any query would fail the test.
    reply = browser().get("/healthz")
    assert reply.status_code == 200
    assert reply.content == b"ok"
    assert "no-cache" in reply["Cache-Control"]


@pytest.mark.django_db
def test_readyz_reports_the_database_the_channel_layer_and_the_storage():
    reply = browser().get("/readyz")
    assert reply.status_code == 200
    assert reply.json() == EVERYTHING_UP


@pytest.mark.django_db
def test_readyz_is_503_naming_the_channel_layer_when_it_is_unreachable(settings):
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": ["redis://127.0.0.1:1/0"]}}
    }
    reply = browser().get("/readyz")
    assert reply.status_code == 503
    assert reply.json() == {**EVERYTHING_UP, "channel_layer": "error"}


@pytest.mark.django_db
def test_readyz_is_503_naming_the_storage_when_media_root_is_a_file(settings, tmp_path, caplog):
    settings.MEDIA_ROOT = tmp_path / "media-is-a-file"
    settings.MEDIA_ROOT.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="ops.views"):
        reply = browser().get("/readyz")
    assert reply.status_code == 503
    assert reply.json() == {**EVERYTHING_UP, "storage": "error"}
    assert "media-is-a-file" not in reply.content.decode()  # the reason is for the log, not for the caller
    [logged] = [record.getMessage() for record in caplog.records if "readiness: storage" in record.getMessage()]
    assert logged.startswith("readiness: storage failed: FileExistsError") and "media-is-a-file" in logged


@pytest.mark.django_db
def test_readyz_is_200_with_a_bucket_that_answers(settings, seaweed):
    use_bucket(settings, seaweed.env)
    reply = browser().get("/readyz")
    assert reply.status_code == 200, reply.content
    assert reply.json() == EVERYTHING_UP


@pytest.mark.django_db
@pytest.mark.parametrize(
    "wrong", [{"COMFYHUB_S3_BUCKET": "no-such-bucket"}, {"COMFYHUB_S3_SECRET_ACCESS_KEY": "not-the-secret"}]
)
def test_readyz_is_503_naming_the_storage_when_the_bucket_refuses(settings, seaweed, caplog, wrong):
    use_bucket(settings, {**seaweed.env, **wrong})
    with caplog.at_level(logging.WARNING, logger="ops.views"):
        reply = browser().get("/readyz")
    assert reply.status_code == 503
    assert reply.json() == {**EVERYTHING_UP, "storage": "error"}
    assert any("readiness: storage failed: ClientError" in record.getMessage() for record in caplog.records)


@pytest.fixture
def silent_endpoint():
    """An S3 endpoint that takes connections and never answers a request (a hung bucket behind a firewall)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # the kernel completes the handshakes; nobody ever reads
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.django_db
def test_readyz_answers_in_time_naming_the_storage_when_the_bucket_hangs(settings, monkeypatch, silent_endpoint):
    monkeypatch.setattr(views, "READY_TIMEOUT", 0.5)
    # The bucket client would wait 3 s; then it gives up, so the hung probe's thread ends with the test.
    hang = Config(connect_timeout=1, read_timeout=3, retries={"total_max_attempts": 1})
    hung = {
        "COMFYHUB_S3_BUCKET": "hub",
        "COMFYHUB_S3_ENDPOINT_URL": silent_endpoint,
        "COMFYHUB_S3_ACCESS_KEY_ID": "key",
        "COMFYHUB_S3_SECRET_ACCESS_KEY": "secret",
    }
    use_bucket(settings, hung, client_config=hang)
    try:
        for _ in range(2):  # the second arrives while the first one's probe still hangs
            started = time.monotonic()
            reply = browser().get("/readyz")
            assert time.monotonic() - started < 1.5, "a probe waits READY_TIMEOUT for the storage, not the client's 3 s"
            assert reply.status_code == 503
            assert reply.json() == {**EVERYTHING_UP, "storage": "timeout"}
    finally:
        views._storage_probes.submit(lambda: None).result(timeout=10)  # the hung probe has given up


@pytest.mark.django_db
def test_the_probes_take_only_get():
    for path in ["/healthz", "/readyz"]:
        assert browser().post(path).status_code == 405
