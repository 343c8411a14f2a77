from django.core.management.base import BaseCommand

from api.auth import api_key_create


class Command(BaseCommand):
    help = "Create an API key and print it once (only its hash is stored)."

    def add_arguments(self, parser):  # noqa: ANN001, ANN201
        parser.add_argument("name", help="who or what the key is for")
        parser.add_argument("--staff", action="store_true", help="the key sees and deletes every key's results")

    def handle(self, *args, name: str, staff: bool, **options) -> None:  # noqa: ANN002, ANN003
        row, key = api_key_create(name=name, is_staff=staff)
        self.stderr.write(
            f"Created API key #{row.pk} '{row.name}'{' (staff)' if staff else ''}. It is shown only once:"
        )
        self.stdout.write(key)
        self.stderr.write(
            f"Its webhook signing secret (Standard Webhooks; manage.py rotate_webhook_secret makes a new one): "
            f"{row.webhook_secret}"
        )
