"""
The storage figures of /metrics: bytes kept by kind, the per-user quota, and how close the fullest user is to it.
Three grouped queries (one per kind of file, summed by owner), whatever the number of users and files.
"""

from collections import defaultdict

from django.db.models import Sum
from prometheus_client.core import GaugeMetricFamily

from tasks.models import Asset, TaskOutput, Upload
from tasks.quota import quota_bytes

KINDS = ("outputs", "uploads", "assets")


def bytes_by_owner():
    """{kind: {owner id: bytes}}: outputs of each owner's tasks, their uploads, the assets they sent."""
    rows = {
        "outputs": TaskOutput.objects.values_list("task__owner_id"),
        "uploads": Upload.objects.values_list("owner_id"),
        # An output's asset shares the output's file: counting it would count those bytes twice.
        "assets": Asset.objects.uploaded().values_list("owner_id"),
    }
    return {kind: dict(query.order_by().annotate(Sum("size"))) for kind, query in rows.items()}


def storage_families():
    by_kind = bytes_by_owner()
    used = GaugeMetricFamily(
        "comfyhub_storage_used_bytes",
        "Bytes kept in hub storage for all users: outputs of tasks, uploaded images, assets sent to the v2 API.",
        labels=["kind"],
    )
    for kind in KINDS:
        used.add_metric([kind], sum(size or 0 for size in by_kind[kind].values()))
    yield used
    quota = quota_bytes()
    yield GaugeMetricFamily(
        "comfyhub_storage_quota_bytes", "Bytes one user may keep (COMFYHUB_USER_STORAGE_BYTES; 0: no limit).", quota
    )
    per_user = defaultdict(int)
    for sizes in by_kind.values():
        for owner, size in sizes.items():
            per_user[owner] += size or 0
    largest = max(per_user.values(), default=0)
    yield GaugeMetricFamily(
        "comfyhub_storage_user_max_quota_ratio",
        "The largest share of the quota one user takes (1: full; more: queued work took them over; 0: no quota).",
        largest / quota if quota else 0.0,
    )
    yield GaugeMetricFamily(
        "comfyhub_storage_users_over_quota",
        "Users at or over the quota, whose new tasks and uploads are refused (0 without a quota).",
        sum(1 for size in per_user.values() if size >= quota) if quota else 0,
    )
