"""Give an API key a new webhook signing secret and print it once."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from api.models import ApiKey
from api.services.webhooks import new_secret


class Command(BaseCommand):
    help = "Give the named API key a new webhook secret (Standard Webhooks, whsec_...) and print it once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="the key's name (as given to create_api_key)")

    def handle(self, *args: Any, **options: Any) -> None:
        keys = list(ApiKey.objects.filter(name=options["name"], revoked_at__isnull=True))
        if not keys:
            raise CommandError(f"no active API key is named {options['name']!r}")
        if len(keys) > 1:
            raise CommandError(f"{len(keys)} active keys are named {options['name']!r}; revoke the extra ones first")
        key = keys[0]
        key.webhook_secret = new_secret()
        key.save(update_fields=["webhook_secret"])
        self.stderr.write(
            "Deliveries are signed with this secret from now on (retries of older messages too). It is shown only now:"
        )
        self.stdout.write(key.webhook_secret)
