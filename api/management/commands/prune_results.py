from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from api.services.retention import prune


def _days(raw: str) -> float:
    import argparse

    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of days, got {raw!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of days above 0, got {raw!r}")
    return value


class Command(BaseCommand):
    help = (
        "Delete finished generations (succeeded, failed, cancelled) older than N days, rows and files "
        "together. Queued and running jobs are never touched."
    )

    def add_arguments(self, parser):  # noqa: ANN001, ANN201
        parser.add_argument(
            "--days", type=_days, default=None, help="age in days since the job finished (default: RESULTS_TTL_DAYS)"
        )
        parser.add_argument("--dry-run", action="store_true", help="only report what would be deleted")

    def handle(self, *args, days: float | None, dry_run: bool, **options) -> None:  # noqa: ANN002, ANN003
        days = days if days is not None else settings.RESULTS_TTL_DAYS
        if not days:
            raise CommandError("give --days N, or set RESULTS_TTL_DAYS")
        report = prune(older_than_days=days, dry_run=dry_run)
        self.stdout.write(report.describe())
