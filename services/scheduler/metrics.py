"""Prometheus metrics of the scheduler (one registry per instance, so tests can run two)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from qlm.aio import LAG_BUCKETS

DECISION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class SchedulerMetrics:
    """``qlm_scheduler_*``: decisions and their time per phase, queue depth per class and
    model, LSO commands, rejections, requeued leases, leadership, the policy state kept."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "qlm_scheduler_decisions_total", "Scheduling steps by outcome "
            "(applied: leader wrote it; skipped: not leader; failed)", ["policy", "outcome"],
            registry=r)
        self.decision_seconds = Histogram(
            "qlm_scheduler_decision_seconds", "Time of a scheduling step by phase "
            "(snapshot: Redis read; decide: the policy; apply: Redis + Kafka writes; total)",
            ["phase"], buckets=DECISION_BUCKETS, registry=r)
        self.loop_lag = Histogram(
            "qlm_scheduler_event_loop_lag_seconds",
            "How late the process's event loop ran a 0.1 s timer (decisions wait as long)",
            buckets=LAG_BUCKETS, registry=r)
        self.queue_depth = Gauge(
            "qlm_scheduler_queue_depth", "Queued requests by class and model",
            ["slo_class", "model"], registry=r)
        self.num_groups = Gauge("qlm_scheduler_groups", "Queued request groups", registry=r)
        self.num_workers = Gauge("qlm_scheduler_workers", "Live workers", registry=r)
        self.evictions = Counter(
            "qlm_scheduler_evictions_total", "Requests named in evict commands", ["worker"],
            registry=r)
        self.swaps = Counter(
            "qlm_scheduler_swaps_total", "Model swap commands", ["worker", "to_model"],
            registry=r)
        self.rejections = Counter(
            "qlm_scheduler_rejections_total", "Queued requests rejected by the policy",
            registry=r)
        self.requeued = Counter(
            "qlm_scheduler_requeued_total", "Requests whose lease expired, by new state",
            ["state"], registry=r)
        self.is_leader = Gauge(
            "qlm_scheduler_is_leader", "1 while this replica holds the leader lease", registry=r)
        self.fence = Gauge("qlm_scheduler_fence", "Fencing token of the current term",
                           registry=r)
        self.state_saves = Counter(
            "qlm_scheduler_policy_state_saves_total", "Saves of the policy's state "
            "(fair-share counters) to Redis by this replica while it led", registry=r)
        self.state_restores = Counter(
            "qlm_scheduler_policy_state_restores_total", "Policy state read on taking the "
            "lease, by outcome (restored; kept: this replica saved it last, its own is "
            "newer; none: nothing saved; invalid: malformed, ignored)", ["outcome"],
            registry=r)
        self.correction = Gauge(
            "qlm_scheduler_correction_factor", "Decode-time factor of the profiles in use "
            "(--online-correction)", ["model", "gpu"], registry=r)
