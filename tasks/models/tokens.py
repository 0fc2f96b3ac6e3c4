import hashlib
import secrets
from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone

LAST_USED_RESOLUTION = timedelta(minutes=1)


def hash_token(token):
    return hashlib.sha256(token.encode()).hexdigest()


class ApiToken(models.Model):
    """A bearer token for the JSON API; only its hash is stored."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=12, editable=False)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)

    def __str__(self):
        return f"{self.prefix}… ({self.user})"

    @classmethod
    def issue(cls, user, name=""):
        """Create a token and return (token row, the plain token shown once)."""
        plain = "ch_" + secrets.token_urlsafe(32)
        token = cls.objects.create(user=user, name=name, prefix=plain[:10], key_hash=hash_token(plain))
        return token, plain

    @classmethod
    def authenticate(cls, plain):
        token = cls.objects.select_related("user").filter(key_hash=hash_token(plain)).first()
        if token is None or not token.user.is_active:
            return None
        token.touch()
        return token.user

    def touch(self, now=None):
        """Note the token's use, at most once a minute: a write on every request would cost more than the request."""
        now = now or timezone.now()
        if self.last_used_at is None or now - self.last_used_at >= LAST_USED_RESOLUTION:
            # Conditional: of the requests of one minute in any process, one writes.
            ApiToken.objects.filter(pk=self.pk).filter(
                models.Q(last_used_at__isnull=True) | models.Q(last_used_at__lte=now - LAST_USED_RESOLUTION)
            ).update(last_used_at=now)
            self.last_used_at = now
