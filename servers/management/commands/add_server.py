from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from servers.models import Server, check_base_url


class Command(BaseCommand):
    help = "Add a ComfyUI server to the pool, or update the one with that name (idempotent)."

    def add_arguments(self, parser):
        parser.add_argument("name", help="A short name: letters, digits, - and _")
        parser.add_argument("url", help="The server's base URL, e.g. http://10.0.0.5:8188")
        parser.add_argument(
            "--max-in-flight",
            type=int,
            default=None,
            help="Most tasks sent to it at once (default 3: a pipeline of 2 plus one front slot)",
        )
        parser.add_argument("--disabled", action="store_true", help="Add it switched off")

    def handle(self, name, url, max_in_flight, disabled, **options):
        try:
            check_base_url(url)
        except ValidationError as exc:
            raise CommandError(exc.messages[0]) from None
        if max_in_flight is not None and max_in_flight < 1:
            raise CommandError("--max-in-flight must be at least 1.")
        server = Server(name=name, base_url=url)
        try:
            server.clean_fields(exclude=["client_id", "base_url"])
        except ValidationError as exc:
            raise CommandError(
                "; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())
            ) from None
        fields = {"base_url": url.rstrip("/"), "enabled": not disabled}
        if max_in_flight is not None:
            fields["max_in_flight"] = max_in_flight
        server, created = Server.objects.update_or_create(name=name, defaults=fields)
        verb = "Added" if created else "Updated"
        self.stdout.write(
            f"{verb} server {server.name} at {server.base_url} (max in flight {server.max_in_flight})."
        )
