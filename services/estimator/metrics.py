"""Prometheus metrics of the estimator (one registry per instance)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
ERROR_BUCKETS = (-600, -120, -60, -20, -10, -5, -2, -1, -0.5, 0, 0.5, 1, 2, 5, 10, 20, 60,
                 120, 600)


class EstimatorMetrics:
    """``qlm_estimator_*``: predicted vs realised waits, corrections, answers."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.wait = Histogram(
            "qlm_estimator_wait_seconds", "Wait until the first token: predicted at admission "
            "and realised (requests with both)", ["kind", "slo_class"], buckets=WAIT_BUCKETS,
            registry=r)
        self.wait_error = Histogram(
            "qlm_estimator_wait_error_seconds", "Realised minus predicted wait",
            ["slo_class"], buckets=ERROR_BUCKETS, registry=r)
        self.corrections = Counter(
            "qlm_estimator_corrections_total", "Telemetry windows applied to the correction",
            ["model", "gpu"], registry=r)
        self.correction = Gauge(
            "qlm_estimator_correction_factor", "Current factor on decode time",
            ["model", "gpu"], registry=r)
        self.predictions = Counter(
            "qlm_estimator_predictions_total", "PredictWait answers", ["slo_class", "admit"],
            registry=r)

    def on_correction(self, model: str, gpu: str, factor: float) -> None:
        self.corrections.labels(model, gpu).inc()
        self.correction.labels(model, gpu).set(factor)

    def on_realised(self, slo_class: str, predicted_s: float, realised_s: float) -> None:
        self.wait.labels("predicted", slo_class).observe(predicted_s)
        self.wait.labels("realised", slo_class).observe(realised_s)
        self.wait_error.labels(slo_class).observe(realised_s - predicted_s)
