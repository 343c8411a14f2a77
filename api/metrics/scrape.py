"""One scrape: the files of every process that shares the metrics folder, added up, and the
gauges read from the database at that moment."""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from . import files

log = logging.getLogger("api.metrics")


class QueueCollector:
    """Queue depth and running jobs, counted in the job table when scraped: right however many
    web processes, workers and machines there are."""

    def collect(self) -> Iterator[Metric]:
        from django.db import DatabaseError
        from django.db.models import Count

        from ..models import Generation, Status

        try:
            counts = dict(
                Generation.objects.filter(status__in=[Status.QUEUED, Status.RUNNING])
                .order_by()
                .values_list("status")
                .annotate(n=Count("pk"))
            )
        except DatabaseError:
            log.warning("metrics: the job table can't be read; queue gauges left out of this scrape", exc_info=True)
            return
        yield GaugeMetricFamily(
            "sd_queue_depth", "Jobs queued, waiting for a worker.", value=counts.get(Status.QUEUED, 0)
        )
        yield GaugeMetricFamily("sd_jobs_running", "Jobs running on a worker.", value=counts.get(Status.RUNNING, 0))


class OwnFilesCollector:
    """Only the files of one kind of process on this host: what a worker serves on its own port
    (WORKER_METRICS_PORT), so nothing is counted twice when web processes share its folder."""

    def __init__(self, folder: Path, tag: str) -> None:
        self.pattern = os.path.join(folder, f"*_{tag}.{files.host()}.*.db")

    def collect(self) -> Iterator[Metric]:
        return iter(MultiProcessCollector.merge(glob.glob(self.pattern), accumulate=True))


# The text format every Prometheus version reads (the metric names need no UTF-8 escaping).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


def render_all() -> tuple[bytes, str]:
    """The web server's /metrics: every process's files, and the database gauges."""
    from . import recording  # this process's own files, made if they weren't yet

    recording.sample()
    folder = files.ensure_prepared()
    collectors = CollectorRegistry()
    MultiProcessCollector(collectors, path=str(folder))
    collectors.register(QueueCollector())
    return generate_latest(collectors), CONTENT_TYPE


def render_own(folder: Path, tag: str) -> tuple[bytes, str]:
    collectors = CollectorRegistry()
    collectors.register(OwnFilesCollector(folder, tag))
    return generate_latest(collectors), CONTENT_TYPE
