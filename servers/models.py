import uuid
from datetime import timedelta

from django.db import IntegrityError, models, transaction
from django.utils import timezone


def new_client_id():
    return f"comfyhub-{uuid.uuid4().hex}"


class ServerState(models.TextChoices):
    UNKNOWN = "unknown", "unknown"
    """Not connected yet since the hub started watching it."""
    ONLINE = "online", "online"
    """The upstream websocket is open and the server answers."""
    OFFLINE = "offline", "offline"
    """The last connection attempt or request failed; see last_error."""
    DISABLED = "disabled", "disabled"
    """An operator switched it off: no new work, no connection."""


class ServerQuerySet(models.QuerySet):
    def enabled(self):
        return self.filter(enabled=True)

    def available(self):
        """Servers that may take new work right now."""
        return self.filter(enabled=True, state=ServerState.ONLINE)


class Server(models.Model):
    name = models.SlugField(max_length=64, unique=True)
    base_url = models.URLField("base URL", max_length=300, help_text="For example http://10.0.0.5:8188")
    enabled = models.BooleanField(default=True)
    state = models.CharField(max_length=16, choices=ServerState.choices, default=ServerState.UNKNOWN, editable=False)
    state_changed_at = models.DateTimeField(null=True, blank=True, editable=False)
    max_in_flight = models.PositiveIntegerField(
        default=2, help_text="Tasks sent to this server at once: the running one plus those waiting in its queue."
    )
    # One stable clientId per server, so that a reconnect keeps receiving the messages of jobs already queued.
    client_id = models.CharField(max_length=64, default=new_client_id, unique=True, editable=False)
    last_seen = models.DateTimeField(null=True, blank=True, editable=False)
    last_error = models.TextField(blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = ServerQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    @property
    def url(self):
        return self.base_url.rstrip("/")

    def set_state(self, state, error=None):
        """Record the connection state; returns True when it changed."""
        now = timezone.now()
        fields = {"last_seen": now} if state == ServerState.ONLINE else {}
        if error is not None:
            fields["last_error"] = error[:2000]
        changed = Server.objects.filter(pk=self.pk).exclude(state=state).update(
            state=state, state_changed_at=now, **fields
        )
        if not changed and fields:
            Server.objects.filter(pk=self.pk).update(**fields)
        for key, value in fields.items():
            setattr(self, key, value)
        if changed:
            self.state, self.state_changed_at = state, now
        return bool(changed)

    def touch(self):
        self.last_seen = timezone.now()
        Server.objects.filter(pk=self.pk).update(last_seen=self.last_seen)


class LockPurpose(models.TextChoices):
    UPSTREAM = "upstream", "upstream socket ownership"
    """Which worker process holds a server's upstream websocket and submits its tasks."""
    AFFINITY = "affinity", "affinity"
    """Pins a user's related steps to one server while they are pending."""


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
    def release(cls, purpose, key, owner):
        return cls.objects.filter(purpose=purpose, key=key, owner=owner).delete()[0] > 0
