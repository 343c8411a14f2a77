"""``manage.py preload_models``: download (into the HF cache) and load models before serving."""

from __future__ import annotations

import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from backend.errors import EngineError
from backend.manager import get_manager


class Command(BaseCommand):
    help = (
        "Load models now: downloads hub models into the Hugging Face cache (HF_HOME) on first use, then "
        "loads them on the configured device, printing each load time. Exits non-zero naming any model "
        "that failed. Without --models or --all it loads PRELOAD_MODELS."
    )
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--models", nargs="+", metavar="ID", help="catalogue ids to load (see GET /api/models/)")
        group.add_argument("--all", action="store_true", help="every model in the catalogue")

    def handle(self, *args: Any, models: list[str] | None, all: bool, **options: Any) -> None:  # noqa: A002 - the option's name
        manager = get_manager()
        if all:
            wanted = [spec.id for spec in manager.available()]
        elif models:
            wanted = list(dict.fromkeys(models))
        elif settings.PRELOAD_MODELS:
            wanted = list(settings.PRELOAD_MODELS)
        else:
            raise CommandError("say which models: --models ID [ID ...], --all, or set PRELOAD_MODELS")
        unknown = [m for m in wanted if m not in manager.catalog]
        if unknown:
            raise CommandError(
                f"not in the catalogue: {', '.join(unknown)}; valid ids: {', '.join(sorted(manager.catalog))}"
            )

        try:
            plan = manager.device_plan()
        except EngineError as exc:
            raise CommandError(f"can't load anything: {exc.message}") from None
        self.stdout.write(f"device {plan.device}, {plan.dtype}; MAX_LOADED_MODELS={manager.config.max_loaded_models}")
        if len(wanted) > manager.config.max_loaded_models:
            self.stdout.write(
                f"note: {len(wanted)} models but MAX_LOADED_MODELS={manager.config.max_loaded_models}: the earlier ones are "
                "unloaded again here (they stay in the download cache)"
            )

        failed: list[str] = []
        for model_id in wanted:
            started = time.perf_counter()
            try:
                model = manager.get(model_id)
            except EngineError as exc:
                failed.append(model_id)
                self.stderr.write(
                    f"{model_id}: FAILED after {time.perf_counter() - started:.2f}s ({exc.code}): {exc.message}"
                )
                continue
            weights = f", {model.variant} weights" if model.variant else ""
            self.stdout.write(
                f"{model_id}: loaded in {model.load_seconds:.2f}s ({model.plan.device}, {model.plan.dtype}{weights})"
            )
        if failed:
            raise CommandError(f"{len(failed)} of {len(wanted)} model(s) failed to load: {', '.join(failed)}")
        self.stdout.write(f"all {len(wanted)} model(s) loaded")
