import argparse

from django.core.management.base import BaseCommand
from django.db import transaction

from api.auth import api_key_create


def _quota(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of bytes, got {raw!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (unlimited) or more bytes, got {value}")
    return value


class Command(BaseCommand):
    help = "Create an API key and print it once (only its hash is stored)."

    def add_arguments(self, parser):  # noqa: ANN001, ANN201
        parser.add_argument("name", help="who or what the key is for")
        parser.add_argument("--staff", action="store_true", help="the key sees and deletes every key's results")
        parser.add_argument(
            "--quota-bytes",
            type=_quota,
            default=None,
            help="bytes of images and inputs the key may keep stored (0: unlimited; default: STORAGE_QUOTA_BYTES)",
        )

    def handle(self, *args, name: str, staff: bool, quota_bytes: int | None, **options) -> None:  # noqa: ANN002, ANN003
        with transaction.atomic():
            row, key = api_key_create(name=name, is_staff=staff)
            if quota_bytes is not None:
                row.storage_quota_bytes = quota_bytes
                row.save(update_fields=["storage_quota_bytes"])
        quota = {None: "", 0: ", no storage quota"}.get(quota_bytes, f", storage quota {quota_bytes} bytes")
        self.stderr.write(
            f"Created API key #{row.pk} '{row.name}'{' (staff)' if staff else ''}{quota}. It is shown only once:"
        )
        self.stdout.write(key)
        self.stderr.write(
            f"Its webhook signing secret (Standard Webhooks; manage.py rotate_webhook_secret makes a new one): "
            f"{row.webhook_secret}"
        )
