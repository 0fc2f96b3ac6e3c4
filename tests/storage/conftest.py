import pytest

from comfyhub.object_storage import storages_setting


@pytest.fixture
def bucket(seaweed, settings, tmp_path):
    """The hub's files in that server's bucket for this test; MEDIA_ROOT points at a folder that must stay empty."""
    settings.STORAGES = storages_setting(seaweed.env)
    return seaweed


def objects(seaweed, prefix=""):
    """{key: bytes} of the bucket's objects under `prefix`."""
    client = seaweed.client()
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=seaweed.bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            found[item["Key"]] = client.get_object(Bucket=seaweed.bucket, Key=item["Key"])["Body"].read()
    return found
