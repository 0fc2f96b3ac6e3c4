"""The task and its state machine: every transition a conditional UPDATE that says whether it won, with its event."""

import contextlib
import uuid

from django.conf import settings
from django.db import connection, models, transaction
from django.db.models import F, Q
from django.utils import timezone

from servers.models import Server, StalePrompt
from servers.wake import notify_work
from tasks.fields import JSONField
from tasks.models.affinity import release_affinity
from tasks.models.events import TaskEvent, update_and_record
from tasks.models.status import (  # noqa: F401  (re-exported: the task's states belong with it)
    ACTIVE_STATUSES,
    ON_SERVER_STATUSES,
    STATUS_FILTERS,
    TERMINAL_STATUSES,
    TaskQuerySet,
    TaskStatus,
)
from tasks.models.webhooks import EVENT_TYPES, MAX_URL_LENGTH, record_webhook


def binding(server, prompt_id, attempts=None):
    """What binding a task to `server` under `prompt_id` writes (Task.bind, and the claim in one statement)."""
    return {
        "server": server, "prompt_id": prompt_id, "client_id": server.client_id, "submitted_at": timezone.now(),
        "accepted_at": None, "started_at": None, "progress": 0.0,
        "attempts": F("attempts") + 1 if attempts is None else attempts, "waiting_reason": "",
    }  # fmt: skip


class Task(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="tasks")
    workflow = models.ForeignKey(
        "tasks.Workflow", null=True, blank=True, on_delete=models.SET_NULL, related_name="tasks"
    )
    inputs = JSONField(default=dict, blank=True)
    graph = JSONField(help_text="The resolved graph sent to ComfyUI.")
    # [{"node": id, "input": name, "upload": upload id}]: images copied to the task's server before the prompt.
    image_inputs = JSONField(default=list, blank=True)
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)  # noqa: DJ001  (NULL: no key, not unique)
    # SHA-256 of the canonical body that came with the key (v1: the JSON body; v2: its graph and labels): the same
    # key with another body is refused, not answered with a task that does something else. Empty on tasks stored
    # before it was kept (v1 lets any body match those).
    idempotency_body = models.CharField(max_length=64, blank=True, editable=False)
    priority = models.IntegerField(default=0)
    # The labels an integrator gave the job (v2 `metadata`): string keys and values, returned and filtered on.
    metadata = JSONField(default=dict, blank=True)
    # Where its news is posted (task.queued, .started, .succeeded, ...), signed with the secret of the token it
    # came with: its own URL, or that token's default. Blank: no webhooks.
    webhook_url = models.CharField(max_length=MAX_URL_LENGTH, blank=True)
    webhook_token = models.ForeignKey(
        "tasks.ApiToken", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    status = models.CharField(max_length=16, choices=TaskStatus.choices, default=TaskStatus.QUEUED)
    progress = models.FloatField(default=0.0)
    # The running node, its step and nodes done, as the live path last wrote them (at most once a second).
    progress_detail = JSONField(default=dict, blank=True, editable=False)
    # Bound before anything is sent to ComfyUI; never changed while the task is on that server.
    server = models.ForeignKey(Server, null=True, blank=True, on_delete=models.PROTECT, related_name="tasks")
    prompt_id = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001  (NULL: not bound)
    client_id = models.CharField(max_length=64, blank=True)
    attempts = models.PositiveIntegerField(default=0)

    created_at = models.DateTimeField(default=timezone.now)
    submitted_at = models.DateTimeField(null=True, blank=True)
    accepted_at = models.DateTimeField(
        null=True, blank=True, help_text="When the server confirmed the prompt."
    )
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    last_event_at = models.DateTimeField(default=timezone.now)

    error = models.TextField(blank=True)
    error_kind = models.CharField(max_length=40, blank=True)
    error_details = JSONField(default=dict, blank=True)
    # Why a queued task is not being sent anywhere (no capable server online, user limit), shown to its owner.
    waiting_reason = models.CharField(max_length=300, blank=True)
    # Identical graphs of one user are pinned to one server while pending: ComfyUI answers them from its cache.
    graph_hash = models.CharField(max_length=64, blank=True, db_index=True)

    objects = TaskQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        permissions = [("submit_raw_graph", "Can submit raw ComfyUI graphs")]
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="task_unique_idempotency_key",
            ),
        ]
        indexes = [
            models.Index(
                fields=["status", "server"],
                name="task_active_idx",
                condition=Q(status__in=["queued", "submitted", "running"]),
            ),
            # What each supervisor's backlog reads on every pass: queued tasks with a new event (servers/backlog.py).
            models.Index(fields=["last_event_at"], name="task_queued_idx", condition=Q(status="queued")),
            models.Index(fields=["server", "prompt_id"], name="task_prompt_idx"),
            models.Index(fields=["owner", "-created_at"], name="task_owner_idx"),
            # /metrics and the pool dashboard look at what started or finished in the last hours.
            models.Index(fields=["status", "finished_at"], name="task_finished_idx"),
            models.Index(fields=["started_at"], name="task_started_idx"),
        ]

    def __str__(self):
        return f"task {self.pk} ({self.status})"

    @property
    def is_active(self):
        return self.status in ACTIVE_STATUSES

    @property
    def is_terminal(self):
        return self.status in TERMINAL_STATUSES

    @property
    def percent(self):
        """Whole percent for progress bars: 100 only once the task has succeeded."""
        if self.status == TaskStatus.SUCCEEDED:
            return 100
        return min(int(self.progress * 100), 99)

    @property
    def elapsed(self):
        """Time since the task was created, or from creation to its end."""
        return (self.finished_at or timezone.now()) - self.created_at

    # --- transitions --------------------------------------------------------------------------------------
    # Each is a conditional UPDATE; a count of 0 means another worker (or another signal for the same
    # task) got there first, and the caller must treat the transition as already done by someone else.

    def _transition(
        self, kind, allowed, to_status=None, *, match_prompt=True, message="", detail=None, when=None, **fields
    ):
        now = timezone.now()
        changes = {"last_event_at": now, **fields}
        if to_status is not None:
            changes["status"] = to_status
        rows = Task.objects.filter(pk=self.pk, status__in=allowed)
        if when is not None:
            rows = rows.filter(when)
        if match_prompt:
            rows = rows.filter(prompt_id=self.prompt_id)
        old_server_id, old_prompt_id, from_status = self.server_id, self.prompt_id, self.status
        server = changes.get("server")
        event = TaskEvent(
            task_id=self.pk,
            kind=kind,
            from_status=from_status,
            to_status=changes.get("status", self.status),
            server_id=(server.pk if server is not None else None) or self.server_id or old_server_id,
            prompt_id=changes.get("prompt_id") or self.prompt_id or old_prompt_id or "",
            message=message,
            detail=detail or {},
        )
        computed = [key for key, value in changes.items() if hasattr(value, "resolve_expression")]
        # One statement on PostgreSQL needs no transaction of its own; two do. No savepoint: inside a caller's
        # transaction (a claim, storing outputs) a failure here fails that too.
        alone = connection.vendor == "postgresql" and not computed
        with contextlib.nullcontext() if alone else transaction.atomic(savepoint=False):
            won = update_and_record(rows, changes, event)
            if won:
                for key, value in changes.items():
                    setattr(self, key, value)
                event.task = self
                if computed:
                    self.refresh_from_db(fields=computed)  # F("attempts") + 1: what the row holds now
        if won:
            from tasks.progress import emit_task_update

            if self.status in TERMINAL_STATUSES:
                transaction.on_commit(lambda: release_affinity(self))
            transaction.on_commit(lambda: emit_task_update(self))
            if self.webhook_url and kind in EVENT_TYPES:
                # An INSERT only for tasks with a webhook, once the transition (and its outputs) committed.
                transaction.on_commit(lambda: record_webhook(self, kind))
        return won

    def bind(self, server, prompt_id, attempts=None):
        """queued → submitted on `server` with a hub-chosen prompt_id, before anything is sent. `attempts`: the new
        count when the caller read the row under the claim's lock (else the row's own, counted up)."""
        return self._transition(
            "submitted", [TaskStatus.QUEUED], TaskStatus.SUBMITTED, match_prompt=False,
            message=f"bound to {server.name}", **binding(server, prompt_id, attempts),
        )  # fmt: skip

    def unbind(self, reason):
        """submitted → queued when the prompt certainly never reached the server: the attempt does not count."""
        return self._transition(
            "unbound",
            [TaskStatus.SUBMITTED],
            TaskStatus.QUEUED,
            message=reason,
            detail={"server": self.server.name if self.server else None},
            server=None,
            prompt_id=None,
            submitted_at=None,
            attempts=F("attempts") - 1,
        )

    def mark_accepted(self, number=None):
        # Once: the POST reply and the websocket's start race, and "running" already implies "accepted".
        return self._transition(
            "accepted",
            ON_SERVER_STATUSES,
            when=Q(accepted_at__isnull=True),
            accepted_at=timezone.now(),
            detail={"number": number},
            message="in the server's queue",
        )

    def mark_running(self, source="websocket"):
        return self._transition(
            "running",
            [TaskStatus.SUBMITTED],
            TaskStatus.RUNNING,
            message=f"started ({source})",
            started_at=timezone.now(),
            accepted_at=self.accepted_at or timezone.now(),
        )

    def set_progress(self, progress, detail=None):
        """A hint only: never 1.0 before completion, never backwards while running; `detail` for the step line."""
        progress = max(0.0, min(progress, 0.99))
        fields = {"progress": progress, "last_event_at": timezone.now()}
        if detail is not None:
            fields["progress_detail"] = detail
        updated = Task.objects.filter(
            pk=self.pk, prompt_id=self.prompt_id, status__in=ON_SERVER_STATUSES, progress__lte=progress
        ).update(**fields)
        if updated:
            self.progress = progress
            if detail is not None:
                self.progress_detail = detail
        return bool(updated)

    def mark_succeeded(self, source):
        return self._transition(
            "succeeded",
            ON_SERVER_STATUSES,
            TaskStatus.SUCCEEDED,
            message=f"finished ({source})",
            progress=1.0,
            finished_at=timezone.now(),
        )

    def mark_failed(self, kind, message, details=None, *, match_prompt=True):
        return self._transition(
            "failed",
            ACTIVE_STATUSES,
            TaskStatus.FAILED,
            match_prompt=match_prompt,
            message=message,
            detail=details or {},
            error=message,
            error_kind=kind,
            error_details=details or {},
            finished_at=timezone.now(),
        )

    def mark_cancelled(self, message="cancelled", *, match_prompt=True):
        return self._transition(
            "cancelled",
            ACTIVE_STATUSES,
            TaskStatus.CANCELLED,
            match_prompt=match_prompt,
            message=message,
            finished_at=timezone.now(),
        )

    def requeue(self, reason, *, stale=False):
        """
        The server lost the task (restart) or went away with it: send it again, up to the attempt limit, then
        fail it. With `stale`, the prompt left on the server is remembered (see move()).
        """
        limit = settings.COMFYHUB["MAX_ATTEMPTS"]
        server, prompt_id = self.server, self.prompt_id
        if stale and server is not None and prompt_id:
            StalePrompt.objects.get_or_create(server=server, prompt_id=prompt_id, defaults={"task": self})
        if self.attempts >= limit:
            return self.mark_failed(
                "lost", f"{reason}; gave up after {self.attempts} attempts", {"attempts": self.attempts}
            )
        return self._transition(
            "requeued",
            ON_SERVER_STATUSES,
            TaskStatus.QUEUED,
            message=reason,
            detail={"attempts": self.attempts, "server": self.server.name if self.server else None},
            server=None,
            prompt_id=None,
            submitted_at=None,
            accepted_at=None,
            started_at=None,
            progress=0.0,
        )

    def move(self, reason):
        """
        submitted (not started) → queued, away from a server that went offline: it will go to another one. The
        prompt left behind is remembered so that it is deleted there, and its result ignored, when it comes back.
        """
        if self.started_at is not None:
            return False  # it may have run there: only requeue() (which counts the attempt) may take it away
        server, prompt_id = self.server, self.prompt_id
        with transaction.atomic():
            won = self._transition(
                "moved",
                [TaskStatus.SUBMITTED],
                TaskStatus.QUEUED,
                message=reason,
                detail={"server": server.name if server else None, "prompt_id": prompt_id},
                server=None,
                prompt_id=None,
                submitted_at=None,
                accepted_at=None,
                progress=0.0,
                attempts=F("attempts") - 1,
            )
            if won and server is not None:
                StalePrompt.objects.get_or_create(server=server, prompt_id=prompt_id, defaults={"task": self})
        return won

    def retry(self, by=""):
        """failed or cancelled → queued, as new: an operator's decision to run it again."""
        return self._transition(
            "retried",
            [TaskStatus.FAILED, TaskStatus.CANCELLED],
            TaskStatus.QUEUED,
            match_prompt=False,
            message=f"sent back to the queue{f' by {by}' if by else ''}",
            server=None,
            prompt_id=None,
            submitted_at=None,
            accepted_at=None,
            started_at=None,
            finished_at=None,
            cancel_requested_at=None,
            progress=0.0,
            attempts=0,
            error="",
            error_kind="",
            error_details={},
        )

    def request_cancel(self):
        """Cancel now if still in the hub; otherwise ask the server's supervisor to remove or interrupt it."""
        if self.status == TaskStatus.QUEUED:
            # Only a task the database still has queued ends here: one a supervisor sent meanwhile is on a server,
            # and cancelling it in the hub alone would leave its prompt running there.
            finished = {"finished_at": timezone.now()}
            if self._transition("cancelled", (TaskStatus.QUEUED,), TaskStatus.CANCELLED, match_prompt=False,
                                message="cancelled before it was sent", **finished):
                return True
            self.refresh_from_db(fields=["status", "server", "prompt_id"])
        if self.status not in ON_SERVER_STATUSES:
            return False
        updated = Task.objects.filter(
            pk=self.pk, status__in=ON_SERVER_STATUSES, cancel_requested_at__isnull=True
        ).update(cancel_requested_at=timezone.now())
        if updated:
            self.record("cancel_requested", "cancel requested")
            transaction.on_commit(lambda: notify_work(cancel=True))
        return True

    def record(self, kind, message="", detail=None, *, server=None, prompt_id=None, touch=True):
        """
        Append an event that does not change the status (reconnects, reconciliations, ignored results). An event
        about another server's copy of the task names that server and prompt, and (touch=False) is not news of
        the task itself, so it does not make a stuck task look alive.
        """
        if touch:
            Task.objects.filter(pk=self.pk).update(last_event_at=timezone.now())
        return TaskEvent.objects.create(
            task=self,
            kind=kind,
            from_status=self.status,
            to_status=self.status,
            server_id=server.pk if server is not None else self.server_id,
            prompt_id=prompt_id if prompt_id is not None else self.prompt_id or "",
            message=message,
            detail=detail or {},
        )
