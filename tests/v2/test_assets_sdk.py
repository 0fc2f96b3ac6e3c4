"""The official comfy-sdk pointed at the hub with a comfyhub token: its asset handles upload, dedup and delete here."""

import httpx
import pytest
from comfy_sdk import Comfy

from tasks.models import ApiToken, Asset
from tasks.v2.refs import resolve_asset_refs
from tests.v2.test_assets import png

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def hub_url(live_server, monkeypatch):
    monkeypatch.setenv("COMFY_BASE_URL", live_server.url)
    return live_server.url


def test_the_sdk_uploads_once_and_finds_its_own_bytes_again(hub_url, alice, bob):
    data = png(colour=(9, 90, 180))
    token = ApiToken.issue(alice)[1]
    with Comfy(api_key=token) as client:
        asset = client.assets.from_bytes(data, filename="photo.png")
        asset_id = asset.commit()
        assert asset.created_new is True
        again = client.assets.from_bytes(data, filename="again.png")
        assert again.commit() == asset_id  # found by hash, nothing uploaded twice
        assert again.created_new is False
        reference = asset.as_reference()
        url = asset.get_download_url().url
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": reference}}}
    _, images = resolve_asset_refs(alice, graph)
    assert len(images) == 1
    reply = httpx.get(url, headers={"Authorization": f"Bearer {token}", "Range": "bytes=0-7"})
    assert reply.status_code == 206
    assert reply.content == data[:8]

    with Comfy(api_key=ApiToken.issue(bob)[1]) as client:
        theirs = client.assets.from_bytes(data, filename="photo.png")
        assert theirs.commit() != asset_id
        assert theirs.created_new is True
        theirs.delete()
    assert list(Asset.objects.values_list("owner__username", flat=True)) == ["alice"]
