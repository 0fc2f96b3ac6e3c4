from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from tasks.models import ApiToken


class Command(BaseCommand):
    help = (
        "Create an API token for a user and print it (it is shown only once). With --webhook-url, the webhook "
        "signing secret follows on a second line (shown only once too)."
    )

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="", help="A label to recognise the token by")
        parser.add_argument(
            "--webhook-url", default="", help="Where the news of tasks submitted with this token is posted"
        )

    def handle(self, username, name, webhook_url, **options):
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"There is no user {username!r}.")
        if not user.is_active:
            raise CommandError(f"User {username!r} is inactive.")
        token, plain = ApiToken.issue(user, name=name)
        secret = None
        if webhook_url:
            try:
                secret = token.set_webhook_url(webhook_url)
            except ValueError as exc:
                token.delete()
                raise CommandError(str(exc)) from None
        self.stdout.write(plain)
        if secret:
            self.stdout.write(secret)
