import uuid
from datetime import timedelta
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.db import IntegrityError, models, transaction
from django.utils import timezone


def check_base_url(url):
    """ComfyUI servers usually live on bare host names (http://gpu-box:8188), which URLValidator refuses."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError:
        raise ValidationError(f"{url!r} is not a valid URL.") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError(f"{url!r} is not an http:// or https:// URL.")
    if parts.query or parts.fragment:
        raise ValidationError(f"{url!r} must be a base URL without a query or fragment.")


def new_client_id():
    return f"comfyhub-{uuid.uuid4().hex}"


class ServerState(models.TextChoices):
    UNKNOWN = "unknown", "unknown"
    """Not connected yet since the hub started watching it."""
    ONLINE = "online", "online"
    """The upstream websocket is open and the server answers."""
    DEGRADED = "degraded", "degraded"
    """It answers, but not well: the websocket is down while HTTP works, or probes fail or are slow."""
    OFFLINE = "offline", "offline"
    """Unreachable; see state_reason. After the failover delay its waiting tasks move to other servers."""
    DRAINING = "draining", "draining"
    """An operator is taking it out: no new work; what it has runs to the end."""
    DISABLED = "disabled", "disabled"
    """An operator switched it off: no new work, no connection."""


ACCEPTING_STATES = (ServerState.ONLINE, ServerState.DEGRADED)


class ServerQuerySet(models.QuerySet):
    def enabled(self):
        return self.filter(enabled=True)

    def available(self):
        """Servers that may take new work right now."""
        return self.filter(enabled=True, draining=False, state__in=ACCEPTING_STATES)

    def drain(self):
        """Send these servers no new work; what they have runs to the end. Returns how many were selected."""
        return self._set_draining(True)

    def undrain(self):
        """Let these servers take new work again. Returns how many were selected."""
        return self._set_draining(False)

    def _set_draining(self, draining):
        from tasks.progress import emit_ops_update

        count = self.update(draining=draining)
        # The supervisors read the flag on their next step; open dashboards are told now.
        transaction.on_commit(emit_ops_update)
        return count


class Server(models.Model):
    name = models.SlugField(max_length=64, unique=True)
    base_url = models.CharField(
        "base URL", max_length=300, validators=[check_base_url], help_text="For example http://10.0.0.5:8188"
    )
    enabled = models.BooleanField(default=True)
    state = models.CharField(
        max_length=16, choices=ServerState.choices, default=ServerState.UNKNOWN, editable=False
    )
    state_changed_at = models.DateTimeField(null=True, blank=True, editable=False)
    state_reason = models.CharField(max_length=300, blank=True, editable=False)
    draining = models.BooleanField(
        default=False, help_text="Take no new work; let the work already sent finish (then disable it)."
    )
    weight = models.FloatField(
        default=1.0,
        help_text="Relative speed: a server twice as fast as the others gets 2. Dispatch divides load by it.",
    )
    pipeline_depth = models.PositiveIntegerField(
        default=2,
        help_text="Tasks kept on this server in normal dispatch: the running one plus the next, so it never idles.",
    )
    max_in_flight = models.PositiveIntegerField(
        default=3,
        help_text=(
            "Hard limit of tasks sent to this server at once. Above the pipeline depth, only the first task of a "
            "user who has nothing running may use it, sent to the front of the server's queue."
        ),
    )
    # One stable clientId per server, so that a reconnect keeps receiving the messages of jobs already queued.
    client_id = models.CharField(max_length=64, default=new_client_id, unique=True, editable=False)
    last_seen = models.DateTimeField(null=True, blank=True, editable=False)
    last_error = models.TextField(blank=True, editable=False)
    # What the last probe saw: how many prompts of other clients wait in its queue, which node classes and
    # model files it has (from /object_info), and a fingerprint of /system_stats that changes when it restarts.
    foreign_queue = models.PositiveIntegerField(default=0, editable=False)
    capabilities = models.JSONField(default=dict, blank=True, editable=False)
    capabilities_at = models.DateTimeField(null=True, blank=True, editable=False)
    fingerprint = models.CharField(max_length=64, blank=True, editable=False)
    last_probe_at = models.DateTimeField(null=True, blank=True, editable=False)
    comfyui_version = models.CharField(max_length=40, blank=True, editable=False)
    previews = models.BooleanField(
        default=True,
        help_text=(
            "Ask for sampler previews. Off sends preview_method none to servers 0.5 and later; a 0.3 server sends "
            "previews only when started with --preview-method, and the hub drops them when this is off."
        ),
    )
    created_at = models.DateTimeField(auto_now_add=True)

    objects = ServerQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    @property
    def url(self):
        return self.base_url.rstrip("/")

    @property
    def effective_depth(self):
        return max(1, min(self.pipeline_depth, self.max_in_flight))

    def set_state(self, state, reason=None, **also):
        """
        Record the state with its reason (and the fields in `also`); a change is also written to the server's
        trail. True when it changed.
        """
        now = timezone.now()
        if state in ACCEPTING_STATES and self.draining:
            state = ServerState.DRAINING
        fields = {"last_seen": now} if state in (*ACCEPTING_STATES, ServerState.DRAINING) else {}
        if reason is not None:
            fields["state_reason"] = reason[:300]
            if state not in ACCEPTING_STATES and reason:
                fields["last_error"] = reason[:2000]
        fields.update(also)
        # The usual case, a probe finding the state it knew: one statement, conditional on the row's state.
        if fields and Server.objects.filter(pk=self.pk, state=state).update(**fields):
            for key, value in fields.items():
                setattr(self, key, value)
            return False
        # One transaction: a reader never sees the new state without its trail entry.
        with transaction.atomic():
            # The row, not this object: another process may have changed the state since this one was loaded.
            old = Server.objects.filter(pk=self.pk).values_list("state", flat=True).first() or self.state
            changed = (
                Server.objects.filter(pk=self.pk)
                .exclude(state=state)
                .update(state=state, state_changed_at=now, **fields)
            )
            if not changed and fields:
                Server.objects.filter(pk=self.pk).update(**fields)
            if changed:
                ServerEvent.objects.create(
                    server=self, kind="state", from_state=old, to_state=state, message=reason or ""
                )
                from tasks.progress import emit_ops_update

                transaction.on_commit(emit_ops_update)
        for key, value in fields.items():
            setattr(self, key, value)
        if changed:
            self.state, self.state_changed_at = state, now
        return bool(changed)

    def record(self, kind, message="", detail=None):
        """Append to the server's trail without a state change (restarts, failovers, probes that found something)."""
        from tasks.progress import emit_ops_update

        event = ServerEvent.objects.create(
            server=self, kind=kind, from_state=self.state, to_state=self.state, message=message, detail=detail or {}
        )
        transaction.on_commit(emit_ops_update)
        return event

    def touch(self):
        self.last_seen = timezone.now()
        Server.objects.filter(pk=self.pk).update(last_seen=self.last_seen)


class ServerEvent(models.Model):
    """Append-only trail of a server: state changes with their reason, restarts, failovers."""

    server = models.ForeignKey(Server, on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(default=timezone.now, db_index=True)
    kind = models.CharField(max_length=40)
    from_state = models.CharField(max_length=16, blank=True)
    to_state = models.CharField(max_length=16, blank=True)
    message = models.TextField(blank=True)
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-at", "-pk"]

    def __str__(self):
        return f"{self.server}: {self.kind} {self.from_state}→{self.to_state}"


class StalePrompt(models.Model):
    """
    A prompt this hub left on a server it moved the task away from (failover). When the server comes back the
    prompt is deleted from its queue, and a result it produced anyway is ignored and recorded on the task.
    """

    server = models.ForeignKey(Server, on_delete=models.CASCADE, related_name="stale_prompts")
    prompt_id = models.CharField(max_length=64)
    task = models.ForeignKey("tasks.Task", on_delete=models.CASCADE, related_name="stale_prompts")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["server", "prompt_id"], name="stale_prompt_unique")]

    def __str__(self):
        return f"{self.prompt_id} on {self.server}"


class LockPurpose(models.TextChoices):
    UPSTREAM = "upstream", "upstream socket ownership"
    """Which worker process holds a server's upstream websocket and submits its tasks."""
    AFFINITY = "affinity", "affinity"
    """Pins a user's related steps to one server while they are pending."""
    WORKER = "worker", "worker presence"
    """A supervisor process that runs, renewed every tick: the workers split the servers between them."""


def upstream_key(server_pk):
    """The key of the lease that says which worker process follows a server."""
    return f"server:{server_pk}"


class Lock(models.Model):
    """A lock is a row: whoever holds an unexpired row with the key owns it; an expired row may be taken over."""

    purpose = models.CharField(max_length=16, choices=LockPurpose.choices)
    key = models.CharField(max_length=200)
    owner = models.CharField(max_length=200)
    server = models.ForeignKey(Server, null=True, blank=True, on_delete=models.CASCADE, related_name="locks")
    acquired_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["purpose", "key"], name="lock_unique_purpose_key")]

    def __str__(self):
        return f"{self.purpose}:{self.key} held by {self.owner}"

    @classmethod
    def acquire(cls, purpose, key, owner, ttl, server=None):
        """Take or renew the lock; returns True when `owner` holds it afterwards."""
        now = timezone.now()
        expires = now + timedelta(seconds=ttl)
        # Renew our own lock, or take over one whose holder stopped renewing it.
        renewed = (
            cls.objects.filter(purpose=purpose, key=key)
            .filter(models.Q(owner=owner) | models.Q(expires_at__lt=now))
            .update(owner=owner, expires_at=expires, server=server)
        )
        if renewed:
            return True
        try:
            with transaction.atomic():
                cls.objects.create(
                    purpose=purpose, key=key, owner=owner, server=server, acquired_at=now, expires_at=expires
                )
        except IntegrityError:
            return False  # someone else holds it
        return True

    @classmethod
    def held(cls, purpose, key, owner, margin=0.0):
        """The lock's row while `owner` holds it for at least `margin` more seconds; empty otherwise."""
        until = timezone.now() + timedelta(seconds=margin)
        return cls.objects.filter(purpose=purpose, key=key, owner=owner, expires_at__gt=until)

    @classmethod
    def release(cls, purpose, key, owner):
        return cls.objects.filter(purpose=purpose, key=key, owner=owner).delete()[0] > 0
