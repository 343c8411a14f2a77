from django.core.management.base import BaseCommand, CommandError

from api.auth import api_key_revoke
from api.models import ApiKey


class Command(BaseCommand):
    help = "Revoke API keys by name, id or key prefix; list keys with --list."

    def add_arguments(self, parser):  # noqa: ANN001, ANN201
        parser.add_argument("keys", nargs="*", help="key name, numeric id, or the key's first characters")
        parser.add_argument("--list", action="store_true", help="list keys (never the keys themselves)")

    def handle(self, *args, keys: list[str], list: bool, **options) -> None:  # noqa: A002, ANN002, ANN003
        if list:
            for row in ApiKey.objects.all():
                state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "active"
                self.stdout.write(f"{row.pk}\t{row.prefix}…\t{row.name}\t{'staff' if row.is_staff else ''}\t{state}")
            return
        if not keys:
            raise CommandError("name at least one key to revoke (or --list)")
        for ident in keys:
            rows = ApiKey.objects.filter(name=ident) | ApiKey.objects.filter(prefix=ident[:12])
            if ident.isdigit():
                rows = rows | ApiKey.objects.filter(pk=int(ident))
            rows = rows.distinct()
            if not rows:
                raise CommandError(f"no API key matches {ident!r}")
            for row in rows:
                api_key_revoke(api_key=row)
                self.stdout.write(f"revoked key #{row.pk} {row.name}")
