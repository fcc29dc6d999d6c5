"""Prometheus metrics of the worker service (one registry per process, labelled by worker)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from qlm.aio import LAG_BUCKETS


@dataclass
class WorkerMetrics:
    """Batch size, KV use, throughput, outcomes, SLO attainment at the first token, swaps
    and step times of each worker."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.loop_lag = Histogram(
            "qlm_worker_event_loop_lag_seconds",
            "How late the process's event loop ran a 0.1 s timer (pulls wait as long)",
            buckets=LAG_BUCKETS, registry=r,
        )
        self.batch_size = Gauge(
            "qlm_worker_batch_size", "Requests running in the engine", ["worker"], registry=r
        )
        self.num_waiting = Gauge(
            "qlm_worker_waiting_requests", "Requests admitted but not yet prefilled",
            ["worker"], registry=r,
        )
        self.kv_used = Gauge(
            "qlm_worker_kv_used_fraction", "KV cache in use (0..1)", ["worker"], registry=r
        )
        self.output_tokens = Counter(
            "qlm_worker_output_tokens", "Output tokens streamed", ["worker", "model"], registry=r
        )
        self.tokens_per_s = Gauge(
            "qlm_worker_output_tokens_per_second", "Output tokens/s over the last telemetry window",
            ["worker"], registry=r,
        )
        self.requests = Counter(
            "qlm_worker_requests", "Requests that left the worker, by outcome",
            ["worker", "outcome"], registry=r,
        )
        self.pulled = Counter("qlm_worker_pulled_requests", "Requests pulled", ["worker"],
                              registry=r)
        self.swaps = Counter("qlm_worker_model_swaps", "Model swaps", ["worker"], registry=r)
        self.lso_rejected = Counter(
            "qlm_worker_lso_rejected", "LSO commands dropped: fencing token not the current "
            "scheduler term's", ["worker"], registry=r)
        self.swap_seconds = Histogram(
            "qlm_worker_model_swap_seconds", "Wall time of a model swap", ["worker"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=r,
        )
        self.step_seconds = Gauge(
            "qlm_worker_step_seconds", "Mean engine step time over the last telemetry window",
            ["worker", "kind"], registry=r,
        )
        self.first_tokens = Counter(
            "qlm_worker_first_tokens", "Requests whose first token this worker streamed, "
            "by whether it came before the request's TTFT deadline (slo: met / missed): "
            "SLO attainment = met / (met + missed)",
            ["worker", "model", "slo_class", "slo"], registry=r,
        )
        self.active_model = Gauge(
            "qlm_worker_active_model", "1 for the model that is awake", ["worker", "model"],
            registry=r,
        )
