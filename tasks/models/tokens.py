import hashlib
import secrets
from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone

from tasks.models.webhooks import MAX_URL_LENGTH, new_secret, webhook_url_problem

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
    # The webhook URL of the tasks submitted with this token that name none, and the secret that signs every
    # webhook of those tasks (made when a URL is first set, shown once).
    webhook_url = models.CharField(max_length=MAX_URL_LENGTH, blank=True)
    webhook_secret = models.CharField(max_length=100, blank=True, editable=False)

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
        token = cls.authenticate_token(plain)
        return token.user if token is not None else None

    @classmethod
    def authenticate_token(cls, plain):
        """The token row of an active user's `plain` token (its use noted), or None."""
        token = cls.objects.select_related("user").filter(key_hash=hash_token(plain)).first()
        if token is None or not token.user.is_active:
            return None
        token.touch()
        return token

    def set_webhook_url(self, url):
        """
        Set the default webhook URL (blank: none) and save. Returns the signing secret when this made one (the
        first URL set): the caller shows it once. Raises ValueError with the problem of a bad URL.
        """
        if url:
            problem = webhook_url_problem(url)
            if problem:
                raise ValueError(f"The webhook URL {problem}.")
        made = None
        if url and not self.webhook_secret:
            self.webhook_secret = made = new_secret()
        self.webhook_url = url or ""
        self.save(update_fields=["webhook_url", "webhook_secret"])
        return made

    def touch(self, now=None):
        """Note the token's use, at most once a minute: a write on every request would cost more than the request."""
        now = now or timezone.now()
        if self.last_used_at is None or now - self.last_used_at >= LAST_USED_RESOLUTION:
            # Conditional: of the requests of one minute in any process, one writes.
            ApiToken.objects.filter(pk=self.pk).filter(
                models.Q(last_used_at__isnull=True) | models.Q(last_used_at__lte=now - LAST_USED_RESOLUTION)
            ).update(last_used_at=now)
            self.last_used_at = now
