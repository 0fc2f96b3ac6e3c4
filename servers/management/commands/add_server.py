from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.core.validators import URLValidator

from servers.models import Server


class Command(BaseCommand):
    help = "Add a ComfyUI server to the pool, or update the one with that name (idempotent)."

    def add_arguments(self, parser):
        parser.add_argument("name", help="A short name: letters, digits, - and _")
        parser.add_argument("url", help="The server's base URL, e.g. http://10.0.0.5:8188")
        parser.add_argument("--max-in-flight", type=int, default=None, help="Tasks sent to it at once (default 2)")
        parser.add_argument("--disabled", action="store_true", help="Add it switched off")

    def handle(self, name, url, max_in_flight, disabled, **options):
        try:
            URLValidator(schemes=["http", "https"])(url)
        except ValidationError:
            raise CommandError(f"{url!r} is not an http:// or https:// URL.") from None
        if max_in_flight is not None and max_in_flight < 1:
            raise CommandError("--max-in-flight must be at least 1.")
        server = Server(name=name, base_url=url)
        try:
            server.clean_fields(exclude=["client_id"])
        except ValidationError as exc:
            raise CommandError("; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())) from None
        fields = {"base_url": url.rstrip("/"), "enabled": not disabled}
        if max_in_flight is not None:
            fields["max_in_flight"] = max_in_flight
        server, created = Server.objects.update_or_create(name=name, defaults=fields)
        verb = "Added" if created else "Updated"
        self.stdout.write(f"{verb} server {server.name} at {server.base_url} (max in flight {server.max_in_flight}).")
