"""
The tasks app's models, one module per noun: workflow.py, task.py (the state machine), events.py (its trail),
affinity.py, files.py (outputs and uploads), assets.py (the v2 API's files), tokens.py and webhooks.py. Everything
is importable from tasks.models.
"""

from tasks.models.affinity import affinity_keys, graph_digest, release_affinity
from tasks.models.assets import Asset, blake3_of
from tasks.models.events import TaskEvent, update_and_record
from tasks.models.files import DOWNLOAD_TYPE, INLINE_TYPES, TaskOutput, Upload, output_path, upload_path
from tasks.models.task import (
    ACTIVE_STATUSES,
    ON_SERVER_STATUSES,
    STATUS_FILTERS,
    TERMINAL_STATUSES,
    Task,
    TaskQuerySet,
    TaskStatus,
    binding,
)
from tasks.models.tokens import ApiToken, hash_token
from tasks.models.webhooks import (
    DeliveryStatus,
    WebhookDelivery,
    new_secret,
    record_webhook,
    webhook_url_problem,
)
from tasks.models.workflow import PreviewMethod, Workflow

__all__ = [
    "ACTIVE_STATUSES",
    "DOWNLOAD_TYPE",
    "INLINE_TYPES",
    "ON_SERVER_STATUSES",
    "STATUS_FILTERS",
    "TERMINAL_STATUSES",
    "ApiToken",
    "Asset",
    "DeliveryStatus",
    "Task",
    "TaskEvent",
    "TaskOutput",
    "TaskQuerySet",
    "TaskStatus",
    "Upload",
    "WebhookDelivery",
    "PreviewMethod",
    "Workflow",
    "affinity_keys",
    "binding",
    "blake3_of",
    "update_and_record",
    "graph_digest",
    "hash_token",
    "output_path",
    "new_secret",
    "record_webhook",
    "release_affinity",
    "upload_path",
    "webhook_url_problem",
]
