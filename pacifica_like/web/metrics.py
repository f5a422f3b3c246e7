"""Prometheus metrics: what the service counts per request, and what it reads at scrape time.

Two kinds of numbers, kept apart because they live in different places:

* per-request counters and histograms (requests, bytes, latency, rejected
  uploads) are kept by each process with ``prometheus_client``. Under uWSGI
  every worker writes its own file in the multiprocess directory
  (``PROMETHEUS_MULTIPROC_DIR``) and a scrape, whichever worker answers it,
  sums every file, so totals are exact however requests were spread;
* backend values (tape drive counters, recalls in flight, fixity results) are
  read from the backend's shared state (its catalog) when ``/metrics`` is
  scraped, through ``Backend.metrics_snapshot()``; no process keeps copies.

prometheus_client decides on multiprocess mode when it is first imported, from
``PROMETHEUS_MULTIPROC_DIR``; ``pacifica_like.wsgi`` sets that in the uWSGI
master before anything imports this module (``prepare_metrics_dir``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from pacifica_like.core.errors import (
    ArchiveError,
    Conflict,
    DigestMismatch,
    FileNotInArchive,
    Forbidden,
    IncompleteUpload,
    InsufficientStorage,
    InvalidRequest,
    MethodDisabled,
    StorageUnavailable,
    UnsupportedMediaType,
)
from pacifica_like.storage.contract import MetricSample

log = logging.getLogger("pacifica_like.error")

PREFIX = "pacifica_like_"
#: Request latency buckets (seconds): a 4 KiB GET takes about 0.15 ms, a 1 GiB upload seconds.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip
#: Why an upload (PUT, PATCH) was refused, most specific class first.
REJECTION_REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (DigestMismatch, "digest_mismatch"),
    (IncompleteUpload, "short_body"),
    (Conflict, "write_once_conflict"),
    (InsufficientStorage, "storage_full"),
    (Forbidden, "forbidden"),
    (FileNotInArchive, "not_found"),
    (UnsupportedMediaType, "unsupported_media_type"),
    (MethodDisabled, "method_not_allowed"),
    (StorageUnavailable, "storage_unavailable"),
    (InvalidRequest, "bad_request"),
    (ArchiveError, "server_error"),
)

SampleSource = Callable[[], Iterable[MetricSample]]


def rejection_reason(error: BaseException | None, status: int) -> str:
    """Name why an upload was refused, from the exception (or, lacking one, the status)."""
    if error is not None:
        for kind, reason in REJECTION_REASONS:
            if isinstance(error, kind):
                return reason
    return "bad_request" if status < 500 else "server_error"


def identify_processes_by(process_identifier: Callable[[], int]) -> None:
    """Name each process's metric files by ``process_identifier()`` instead of its pid.

    prometheus_client's escape hatch for servers that number their workers
    (``MultiProcessValue``; its docs say the identifier must be unique among
    live processes, which uWSGI's worker ids are). A respawned worker then goes
    on counting in its predecessor's file instead of adding one, and no update
    pays for a getpid() system call. Call before any metric exists.
    """
    values.ValueClass = values.MultiProcessValue(process_identifier)


def multiprocess_mode() -> bool:
    """True when prometheus_client keeps values in per-process files (decided at its import).

    prometheus_client has no public flag for this; the value class it chose
    (``values.ValueClass``) is what every metric is built with, so it is the truth.
    """
    return values.ValueClass is not values.MutexValue


class _Series:
    """The metric children of one (endpoint, method), looked up once and reused."""

    __slots__ = ("by_status", "duration", "received", "sent")

    def __init__(self, metrics: Metrics, endpoint: str, method: str) -> None:
        self.by_status: dict[int, Counter] = {}
        self.received = metrics.received.labels(endpoint, method)
        self.sent = metrics.sent.labels(endpoint, method)
        self.duration = metrics.duration.labels(endpoint, method)


class Metrics:
    """The service's metrics, recorded per request and rendered for ``GET /metrics``.

    ``sources`` are called at every scrape for backend values (each returning
    MetricSample values); one that fails is logged and reported by
    ``pacifica_like_backend_metrics_up 0`` instead of failing the scrape.
    """

    def __init__(
        self, sources: Sequence[tuple[str, SampleSource]] = (), info: dict[str, str] | None = None
    ) -> None:
        own = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            PREFIX + "http_requests",
            "HTTP requests answered, by endpoint, method and status.",
            ["endpoint", "method", "status"],
            registry=own,
        )
        self.received = Counter(
            PREFIX + "http_received_bytes",
            "Request body bytes read (uploads).",
            ["endpoint", "method"],
            registry=own,
        )
        self.sent = Counter(
            PREFIX + "http_sent_bytes",
            "Response body bytes handed to the server.",
            ["endpoint", "method"],
            registry=own,
        )
        self.duration = Histogram(
            PREFIX + "http_request_duration_seconds",
            "Time from receiving a request to handing over the last byte of the answer.",
            ["endpoint", "method"],
            buckets=LATENCY_BUCKETS,
            registry=own,
        )
        self.rejected = Counter(
            PREFIX + "uploads_rejected",
            "Uploads (PUT, PATCH) refused, by reason; nothing was stored for any of them.",
            ["method", "reason"],
            registry=own,
        )
        self._series: dict[tuple[str, str], _Series] = {}
        self.multiprocess = multiprocess_mode()
        if self.multiprocess:
            # Every process's files, read at each scrape; our own values are among them.
            self.registry = CollectorRegistry(auto_describe=False)
            MultiProcessCollector(self.registry)
        else:
            self.registry = own
        self.registry.register(ScrapeTimeCollector(sources, info or {}))

    def record(
        self,
        endpoint: str,
        method: str,
        status: int,
        received: int,
        sent: int,
        seconds: float,
        error: BaseException | None = None,
    ) -> None:
        """Count one answered request; ``method`` must be one of a bounded set (label cardinality)."""
        series = self._series.get((endpoint, method))
        if series is None:
            series = self._series.setdefault((endpoint, method), _Series(self, endpoint, method))
        counter = series.by_status.get(status)
        if counter is None:
            counter = series.by_status.setdefault(status, self.requests.labels(endpoint, method, str(status)))
        counter.inc()
        if received:
            series.received.inc(received)
        if sent:
            series.sent.inc(sent)
        series.duration.observe(seconds)
        if status >= 400 and endpoint == "file" and method in ("PUT", "PATCH"):
            self.rejected.labels(method, rejection_reason(error, status)).inc()

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """Render every metric in the format the scraper asked for; return (body, content type)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class ScrapeTimeCollector(Collector):
    """Metrics read when a scrape happens: backend samples, build info, whether the backend answered."""

    def __init__(self, sources: Sequence[tuple[str, SampleSource]], info: dict[str, str]) -> None:
        self._sources = list(sources)
        self._info = info

    def collect(self) -> Iterator[Metric]:
        """Yield one family per sample name, plus ``backend_metrics_up`` per source."""
        if self._info:
            info = GaugeMetricFamily(
                PREFIX + "build_info", "Version and backend of this server.", labels=list(self._info)
            )
            info.add_metric(list(self._info.values()), 1)
            yield info
        up = GaugeMetricFamily(
            PREFIX + "backend_metrics_up",
            "1 if the source's values could be read at this scrape.",
            labels=["source"],
        )
        families: dict[str, Metric] = {}
        for name, source in self._sources:
            try:
                samples = list(source())
            except Exception as exc:  # a scrape must still answer with the per-request metrics
                log.warning("metrics source %s failed: %s", name, exc, exc_info=exc)
                up.add_metric([name], 0)
                continue
            up.add_metric([name], 1)
            for sample in samples:
                family = families.get(sample.name)
                if family is None:
                    kind = CounterMetricFamily if sample.kind == "counter" else GaugeMetricFamily
                    family = kind(PREFIX + sample.name, sample.help, labels=[k for k, _ in sample.labels])
                    families[sample.name] = family
                family.add_metric([v for _, v in sample.labels], sample.value)
        yield up
        yield from families.values()
