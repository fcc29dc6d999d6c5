"""Per-request records and the metrics of one run."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from qlm.core.types import DEFAULT_TENANT, SLOClass


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What happened to one request. ``None`` times: it never got that far.

    ``rejected``: dropped by the policy after it was queued (an SLO miss); ``refused``:
    turned away at admission because it fits no worker (never queued; not an SLO miss,
    counted apart). ``predicted_first_token_at`` is the first prediction made for the
    request after it arrived (``predicted_at`` when), ``last_predicted_first_token_at``
    the last one made before its first token (``last_predicted_at`` when), if the run had
    a forecaster.
    ``tpot_slo_s``: the request's time-per-output-token target, if any; it is met when the
    request finished and its mean time per output token after the first (:attr:`tpot_s`)
    is within it.
    """

    id: str
    model: str
    slo_class: str
    arrival_at: float
    deadline_at: float
    prompt_tokens: int
    output_tokens: int
    started_at: float | None
    first_token_at: float | None
    finished_at: float | None
    worker_id: str | None
    num_evictions: int
    rejected: bool
    predicted_at: float | None = None
    predicted_first_token_at: float | None = None
    refused: bool = False
    last_predicted_at: float | None = None
    last_predicted_first_token_at: float | None = None
    tenant: str = DEFAULT_TENANT
    tpot_slo_s: float | None = None

    @property
    def met_slo(self) -> bool:
        """The TTFT SLO: the first token came by the deadline."""
        return self.first_token_at is not None and self.first_token_at <= self.deadline_at

    @property
    def met_tpot(self) -> bool:
        """The TPOT target, if any: finished with a mean time per output token within it
        (a one-token output has none to miss). True without a target."""
        if self.tpot_slo_s is None:
            return True
        if self.finished_at is None:
            return False
        tpot = self.tpot_s
        return tpot is None or tpot <= self.tpot_slo_s

    @property
    def met_both(self) -> bool:
        """TTFT and TPOT both met (the TTFT SLO alone without a TPOT target)."""
        return self.met_slo and self.met_tpot

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrival_at

    @property
    def tpot_s(self) -> float | None:
        if self.finished_at is None or self.first_token_at is None or self.output_tokens < 2:
            return None
        return (self.finished_at - self.first_token_at) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@dataclass(frozen=True, slots=True)
class RunMetrics:
    num_requests: int
    num_finished: int
    num_rejected: int
    #: Requests refused at admission (fit no worker); attainment is over the others.
    num_refused: int
    num_refused_by_class: Mapping[str, int]
    slo_attainment: float
    slo_attainment_by_class: Mapping[str, float]
    throughput_rps: float
    throughput_tok_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    #: Over admitted requests with a TPOT target (NaN when none has one).
    tpot_attainment: float
    tpot_attainment_by_class: Mapping[str, float]
    #: Over admitted requests: TTFT and (where set) TPOT both met.
    combined_attainment: float
    combined_attainment_by_class: Mapping[str, float]
    gpu_util: float
    swaps: int
    evictions: int
    decision_ms_p50: float
    decision_ms_p99: float
    num_decisions: int
    makespan_s: float
    invalid_actions: int = 0
    #: Per tenant (only when the run had more than the default tenant), then per class.
    slo_attainment_by_tenant: Mapping[str, float] = field(default_factory=dict)
    slo_attainment_by_tenant_class: Mapping[str, Mapping[str, float]] = field(
        default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["slo_attainment_by_class"] = dict(self.slo_attainment_by_class)
        d["tpot_attainment_by_class"] = dict(self.tpot_attainment_by_class)
        d["combined_attainment_by_class"] = dict(self.combined_attainment_by_class)
        d["num_refused_by_class"] = dict(self.num_refused_by_class)
        d["slo_attainment_by_tenant"] = dict(self.slo_attainment_by_tenant)
        d["slo_attainment_by_tenant_class"] = {
            t: dict(v) for t, v in self.slo_attainment_by_tenant_class.items()}
        return d


@dataclass(frozen=True)
class RunResult:
    metrics: RunMetrics
    records: tuple[RequestRecord, ...]
    decision_s: tuple[float, ...] = field(default=())


def summarise(
    records: Sequence[RequestRecord],
    *,
    busy_gpu_s: float,
    num_gpus: int,
    swaps: int,
    evictions: int,
    decision_s: Sequence[float],
    invalid_actions: int = 0,
) -> RunMetrics:
    """Metrics of a run from its records. Unserved and rejected requests miss their SLO;
    requests refused at admission are counted apart (``num_refused``, per class) and left
    out of the attainment, which is over the admitted requests.

    Throughput and utilisation are over the makespan (first arrival → last finish).
    TTFT/TPOT percentiles are over the requests that got a first token / finished. TPOT
    attainment is over the admitted requests that have a TPOT target (missed when not
    finished); combined attainment over all admitted ones (:attr:`RequestRecord.met_both`).
    """
    n = len(records)
    admitted = [r for r in records if not r.refused]
    finished = [r for r in records if r.finished_at is not None]
    start = min((r.arrival_at for r in records), default=0.0)
    end = max((r.finished_at for r in finished if r.finished_at is not None), default=start)
    makespan = max(end - start, 1e-9)
    order = [c.value for c in SLOClass]
    by_class: dict[str, list[bool]] = {}
    refused_by_class: dict[str, int] = {}
    for r in records:
        if r.refused:
            refused_by_class[r.slo_class] = refused_by_class.get(r.slo_class, 0) + 1
        else:
            by_class.setdefault(r.slo_class, []).append(r.met_slo)
    with_tpot = [r for r in admitted if r.tpot_slo_s is not None]
    ttfts = [t for r in records if (t := r.ttft_s) is not None]
    tpots = [t for r in records if (t := r.tpot_s) is not None]
    ms = [1000 * s for s in decision_s]
    by_tenant: dict[str, dict[str, list[bool]]] = {}
    for r in records:
        if not r.refused:
            by_tenant.setdefault(r.tenant, {}).setdefault(r.slo_class, []).append(r.met_slo)
    if set(by_tenant) <= {DEFAULT_TENANT}:
        by_tenant = {}
    return RunMetrics(
        num_requests=n,
        num_finished=len(finished),
        num_rejected=sum(r.rejected for r in records),
        num_refused=n - len(admitted),
        num_refused_by_class={c: refused_by_class[c] for c in sorted(
            refused_by_class, key=order.index)},
        slo_attainment=(sum(r.met_slo for r in admitted) / len(admitted) if admitted
                        else float("nan")),
        slo_attainment_by_class={
            c: sum(v) / len(v)
            for c, v in sorted(by_class.items(), key=lambda kv: order.index(kv[0]))
        },
        tpot_attainment=_share(with_tpot, lambda r: r.met_tpot),
        tpot_attainment_by_class=_by_class(with_tpot, lambda r: r.met_tpot, order),
        combined_attainment=_share(admitted, lambda r: r.met_both),
        combined_attainment_by_class=_by_class(admitted, lambda r: r.met_both, order),
        throughput_rps=len(finished) / makespan,
        throughput_tok_s=sum(r.output_tokens for r in finished) / makespan,
        ttft_p50_s=_pct(ttfts, 50),
        ttft_p99_s=_pct(ttfts, 99),
        tpot_p50_s=_pct(tpots, 50),
        tpot_p99_s=_pct(tpots, 99),
        gpu_util=busy_gpu_s / (num_gpus * makespan) if num_gpus else 0.0,
        swaps=swaps,
        evictions=evictions,
        decision_ms_p50=_pct(ms, 50),
        decision_ms_p99=_pct(ms, 99),
        num_decisions=len(ms),
        makespan_s=makespan,
        invalid_actions=invalid_actions,
        slo_attainment_by_tenant={
            t: sum(sum(v) for v in cls.values()) / sum(len(v) for v in cls.values())
            for t, cls in sorted(by_tenant.items())
        },
        slo_attainment_by_tenant_class={
            t: {c: sum(v) / len(v)
                for c, v in sorted(cls.items(), key=lambda kv: order.index(kv[0]))}
            for t, cls in sorted(by_tenant.items())
        },
    )


def _share(records: Sequence[RequestRecord], met: Callable[[RequestRecord], bool]) -> float:
    return sum(met(r) for r in records) / len(records) if records else float("nan")


def _by_class(records: Sequence[RequestRecord], met: Callable[[RequestRecord], bool],
              order: Sequence[str]) -> dict[str, float]:
    by_class: dict[str, list[RequestRecord]] = {}
    for r in records:
        by_class.setdefault(r.slo_class, []).append(r)
    return {c: _share(v, met) for c, v in sorted(by_class.items(),
                                                 key=lambda kv: order.index(kv[0]))}


def wait_prediction_r2(records: Sequence[RequestRecord]) -> tuple[float, int]:
    """R² of the last prediction made before a request's first token against the
    realised wait, both counted from arrival (the wait a user reading the prediction
    just before the start was told vs the one they had), and n."""
    pairs = [
        (r.last_predicted_first_token_at - r.arrival_at, r.first_token_at - r.arrival_at)
        for r in records
        if r.last_predicted_first_token_at is not None and r.first_token_at is not None
    ]
    if len(pairs) < 2:
        return float("nan"), len(pairs)
    pred = np.array([p for p, _ in pairs])
    real = np.array([o for _, o in pairs])
    ss_res = float(np.sum((real - pred) ** 2))
    ss_tot = float(np.sum((real - real.mean()) ** 2))
    return (1 - ss_res / ss_tot if ss_tot > 0 else float("nan")), len(pairs)
