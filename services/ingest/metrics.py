"""Prometheus metrics of the ingest service (one registry per process).

``qlm_ingest_*``: submits by result (:data:`services.ingest.plane.SubmitResult`), class, model and
source; the time the plane took per submit; the predicted wait of each submit the
estimator answered for; queued requests per class and model, refreshed from Redis
every few seconds (:meth:`IngestMetrics.refresh_queue_depth`).
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from qlm.core.types import SLOClass
from services.ingest.plane import Prediction, SubmitResult, SubmitSource

SUBMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)


class IngestMetrics:
    """The ingest plane's :class:`~services.ingest.plane.SubmitObserver`, and the queue-depth
    gauge."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.submits = Counter(
            "qlm_ingest_submits_total", "Submits by result (admitted, duplicate, "
            "rejected-invalid, rejected-capacity, failed), class, model and source "
            "(grpc, kafka); class and model are 'unknown' for input that did not parse",
            ["result", "slo_class", "model", "source"], registry=r)
        self.submit_seconds = Histogram(
            "qlm_ingest_submit_seconds", "Time of one submit in ingest (validation, "
            "prediction, Redis enqueue, event hand-off), by source and result",
            ["source", "result"], buckets=SUBMIT_BUCKETS, registry=r)
        self.predicted_wait = Histogram(
            "qlm_ingest_predicted_wait_seconds", "The estimator's mean predicted wait at "
            "submit, by class (submits it answered for)", ["slo_class"],
            buckets=WAIT_BUCKETS, registry=r)
        self.queue_depth = Gauge(
            "qlm_ingest_queue_depth", "Queued requests by class and model (from Redis, "
            "refreshed periodically)", ["slo_class", "model"], registry=r)
        self._depth_labels: set[tuple[str, str]] = set()
        self._series: dict[tuple[str, str, str, str], tuple[Counter, Histogram]] = {}
        self._wait_series: dict[str, Histogram] = {}

    def on_submit(self, source: SubmitSource, result: SubmitResult, slo_class: str,
                  model: str, seconds: float, prediction: Prediction | None) -> None:
        submits, submit_seconds = self._submit_series(source, result, slo_class, model)
        submits.inc()
        submit_seconds.observe(seconds)
        if prediction is not None and prediction.known:
            wait = self._wait_series.get(slo_class)
            if wait is None:
                wait = self._wait_series[slo_class] = self.predicted_wait.labels(slo_class)
            wait.observe(prediction.wait_mean_s)

    def _submit_series(self, source: SubmitSource, result: SubmitResult, slo_class: str,
                       model: str) -> tuple[Counter, Histogram]:
        """The labelled series a submit updates, looked up once per label set (``labels()``
        takes a lock and builds a key on every call)."""
        key = (source, result, slo_class, model)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = (
                self.submits.labels(result, slo_class, model, source),
                self.submit_seconds.labels(source, result),
            )
        return series

    def refresh_queue_depth(self, depths: Mapping[tuple[str, SLOClass], int]) -> None:
        """Set the gauge to ``depths`` ((model, class) → queued); pairs no longer queued
        go to 0."""
        labels = {(slo_class.value, model): n for (model, slo_class), n in depths.items()}
        for gone in self._depth_labels - labels.keys():
            self.queue_depth.labels(*gone).set(0)
        for pair, n in labels.items():
            self.queue_depth.labels(*pair).set(n)
        self._depth_labels |= labels.keys()
