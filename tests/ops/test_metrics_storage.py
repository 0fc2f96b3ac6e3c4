"""/metrics' storage figures: bytes by kind over all users, the quota, and how close the fullest user is to it."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tasks.models import Asset, Task, TaskOutput, Upload
from tests.conftest import make_user
from tests.ops.test_metrics import samples, scrape, token  # noqa: F401  (token: the scraper's fixture)

pytestmark = pytest.mark.django_db


def output(owner, workflow, size):
    task = Task.objects.create(owner=owner, workflow=workflow, graph=workflow.graph)
    made = TaskOutput.objects.create(
        task=task, node_id="9", filename="x.png", content_type="image/png", size=size, sha256="0" * 64,
        file=f"outputs/{task.pk}/x.png",
    )  # fmt: skip
    return made


def upload(owner, size):
    return Upload.objects.create(
        owner=owner, original_name="a.png", content_type="image/png", size=size, sha256="0" * 64, width=1, height=1,
        file="uploads/a.png",
    )  # fmt: skip


def asset(owner, size, of_output=None):
    return Asset.objects.create(
        owner=owner, blake3=f"{Asset.objects.count():064x}", sha256="0" * 64, size=size, content_type="image/png",
        file="assets/a.png", output=of_output,
    )  # fmt: skip


@pytest.fixture
def stored(alice, bob, workflows):
    """alice: 3000 + 500 + 200 = 3700 bytes; bob: 1000 + 100 = 1100; carol: nothing."""
    fast = workflows["fast"]
    first = output(alice, fast, 1000)
    output(alice, fast, 2000)
    asset(alice, 1000, of_output=first)  # an output's asset: the output's own bytes, not counted again
    upload(alice, 500)
    asset(alice, 200)
    output(bob, fast, 1000)
    upload(bob, 100)
    make_user("carol")


def storage_lines(text):
    return sorted(line for line in samples(text) if line.startswith("comfyhub_storage_"))


def test_storage_figures_without_a_quota(token, stored):  # noqa: F811
    assert storage_lines(scrape(token).content.decode()) == [
        'comfyhub_storage_quota_bytes 0',
        'comfyhub_storage_used_bytes{kind="assets"} 200',
        'comfyhub_storage_used_bytes{kind="outputs"} 4000',
        'comfyhub_storage_used_bytes{kind="uploads"} 600',
        'comfyhub_storage_user_max_quota_ratio 0',
        'comfyhub_storage_users_over_quota 0',
    ]


def test_storage_figures_against_a_quota(token, stored, settings):  # noqa: F811
    settings.COMFYHUB = {**settings.COMFYHUB, "USER_STORAGE_BYTES": 1100}
    lines = storage_lines(scrape(token).content.decode())
    assert "comfyhub_storage_quota_bytes 1100" in lines
    # alice takes 3700 of 1100; bob exactly 1100, which counts as at the quota.
    assert f"comfyhub_storage_user_max_quota_ratio {3700 / 1100}" in lines
    assert "comfyhub_storage_users_over_quota 2" in lines
    settings.COMFYHUB = {**settings.COMFYHUB, "USER_STORAGE_BYTES": 7400}
    lines = storage_lines(scrape(token).content.decode())
    assert "comfyhub_storage_user_max_quota_ratio 0.5" in lines
    assert "comfyhub_storage_users_over_quota 0" in lines


def test_storage_figures_on_an_empty_hub(token, settings):  # noqa: F811
    settings.COMFYHUB = {**settings.COMFYHUB, "USER_STORAGE_BYTES": 1000}
    lines = storage_lines(scrape(token).content.decode())
    assert 'comfyhub_storage_used_bytes{kind="outputs"} 0' in lines
    assert "comfyhub_storage_user_max_quota_ratio 0" in lines and "comfyhub_storage_users_over_quota 0" in lines


def test_the_storage_figures_cost_the_same_queries_however_many_users(token, stored, workflows):  # noqa: F811
    with CaptureQueriesContext(connection) as small:
        scrape(token)
    for number in range(6):
        user = make_user(f"user{number}")
        output(user, workflows["fast"], 10)
        upload(user, 10)
        asset(user, 10)
    with CaptureQueriesContext(connection) as big:
        scrape(token)
    assert len(big) == len(small)
