"""Workloads for the simulator: arrivals, lengths, class and model mixes, clusters.

Generators are pure functions of a ``numpy.random.Generator``; traces (every public
format the loader knows, :mod:`qlm.traces`) are read at the edge and passed in as rows.

**Lengths (ShareGPT-like).** Prompt and output tokens are log-normal::

    prompt ~ LogNormal(mu=4.59, sigma=0.99)  → mean ≈ 161, median ≈ 98, clipped to [4, 4096]
    output ~ LogNormal(mu=5.45, sigma=0.86)  → mean ≈ 336, median ≈ 233, clipped to [4, 2048]

The means are the published ShareGPT means (161 prompt / 338 output tokens, as used
by the vLLM paper); the dispersions σ are fitted (MLE of log-lengths) on the Azure
LLM 2023 conversation trace (prompt σ = 0.99, output σ = 0.86; its own fitted
means are μ = 6.63 / 5.02, i.e. longer prompts and shorter outputs than ShareGPT),
because the raw ShareGPT data is not available offline.

**Arrivals.** Poisson (exponential gaps, never capped) or bursty gamma gaps with
coefficient of variation ``cv > 1`` (shape 1/cv²). Jobs are generated once at unit
rate and time-scaled to each target rate, so every rate and every policy sees the
same requests in the same order.

**Workloads** (SLOs on TTFT: interactive 20 s, batch-1 60 s, batch-2 1 h):

* ``WA`` — one model (mistral-7b), 50% interactive, 25% batch-1, 25% batch-2.
* ``WB`` — three models (mistral-7b, vicuna-13b, llama-70b), batch only (70%
  batch-1, 30% batch-2); model popularity shifts in three equal phases (the hot
  model takes 60% of each phase), and workers start with one resident model each,
  so serving the shifting demand needs model swaps (cold loads the first time).
* ``WC`` — one model (mistral-7b), mega-prompts of 3,000–4,000 tokens (uniform),
  class mix of WA.

Any of them with a TPOT target on its interactive requests (``tpot_slo_s`` of
:meth:`RequestPlan.jobs_at`; ``python -m loadgen.sim --tpot-slo-s``).

**Clusters.** ``cluster_for(workload, preset)`` with presets (A10-24GB, A100-80GB
GPUs): ``paper`` (30, 50), ``small`` (3, 5), ``mini`` (1, 2; for WB 1, 5). WA/WC: one
single-GPU worker per GPU, all mistral-7b. WB: A10s are single-GPU mistral-7b
workers (vicuna-13b needs two A10s, llama-70b eight); the A100s form one 4-GPU
instance per five A100s (llama-70b needs tensor parallelism 4, at least one),
and the rest are single-GPU workers alternating vicuna-13b / mistral-7b. Every
worker starts with only its active model resident, and the 4-GPU instances start
on vicuna-13b: no worker serves llama-70b, the first phase's hot model, until a
policy swaps one (a cold load, 95 s); afterwards a model that slept on a worker
wakes in about a second.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final

import numpy as np

from qlm.core.errors import InvalidInput
from qlm.core.types import DEFAULT_TENANT, SLO, Request, SLOClass
from qlm.sim.cluster import Job, WorkerSpec
from qlm.traces import TraceRow, slice_trace

MISTRAL: Final = "mistral-7b"
VICUNA: Final = "vicuna-13b"
LLAMA: Final = "llama-70b"
A10: Final = "A10-24GB"
A100: Final = "A100-80GB"
#: max_tokens of generated requests: the client's cap, not the true length.
DEFAULT_MAX_TOKENS: Final = 2048


# ================================================================ lengths
@dataclass(frozen=True, slots=True)
class LengthModel:
    """Log-normal prompt and output lengths (tokens), clipped."""

    prompt_mu: float
    prompt_sigma: float
    output_mu: float
    output_sigma: float
    prompt_min: int = 4
    prompt_max: int = 4096
    output_min: int = 4
    output_max: int = DEFAULT_MAX_TOKENS


SHAREGPT: Final = LengthModel(prompt_mu=4.59, prompt_sigma=0.99, output_mu=5.45, output_sigma=0.86)


def sample_lengths(
    rng: np.random.Generator, n: int, model: LengthModel = SHAREGPT
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (prompt, output) token counts."""
    prompts = rng.lognormal(model.prompt_mu, model.prompt_sigma, n)
    outputs = rng.lognormal(model.output_mu, model.output_sigma, n)
    return (
        np.clip(np.rint(prompts), model.prompt_min, model.prompt_max).astype(np.int64),
        np.clip(np.rint(outputs), model.output_min, model.output_max).astype(np.int64),
    )


# =============================================================== arrivals
def poisson_arrivals(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    """Arrival times (s, first at its gap after 0) of a Poisson process of ``rate`` req/s."""
    _check_rate(rate)
    return np.cumsum(rng.exponential(1.0 / rate, n))


def gamma_arrivals(rng: np.random.Generator, n: int, rate: float, cv: float) -> np.ndarray:
    """Bursty arrivals: gamma gaps of mean 1/rate and coefficient of variation ``cv``."""
    _check_rate(rate)
    if not cv > 0:
        raise InvalidInput("cv", f"must be > 0, got {cv}")
    shape = 1.0 / (cv * cv)
    return np.cumsum(rng.gamma(shape, 1.0 / (rate * shape), n))


def _check_rate(rate: float) -> None:
    if not (math.isfinite(rate) and rate > 0):
        raise InvalidInput("rate", f"must be a finite number > 0, got {rate}")


def pick(rng: np.random.Generator, n: int, weights: Mapping[str, float]) -> list[str]:
    """``n`` labels drawn with the given (unnormalised) weights."""
    labels = list(weights)
    p = np.array([weights[k] for k in labels], dtype=float)
    if len(labels) == 0 or (p < 0).any() or p.sum() <= 0:
        raise InvalidInput("weights", "need at least one label and non-negative weights")
    return [labels[i] for i in rng.choice(len(labels), size=n, p=p / p.sum())]


def unit_rate_times(times: np.ndarray) -> np.ndarray:
    """Times rescaled so the mean arrival rate is 1 req/s (n arrivals over n seconds)."""
    n = len(times)
    span = float(times[-1] - times[0]) if n > 1 else 0.0
    if span <= 0:
        return np.arange(n, dtype=float)
    return (times - times[0]) * (n - 1) / span


# =============================================================== workloads
@dataclass(frozen=True, slots=True)
class RequestPlan:
    """Requests at unit rate: arrival times (mean 1 req/s) plus everything else fixed."""

    unit_times: np.ndarray
    prompts: np.ndarray
    outputs: np.ndarray
    models: tuple[str, ...]
    classes: tuple[SLOClass, ...]
    #: Each request's tenant (empty: every request the default tenant's).
    tenants: tuple[str, ...] = ()

    def jobs_at(
        self, rate: float, max_tokens: int = DEFAULT_MAX_TOKENS, prefix: str = "r",
        tpot_slo_s: float | None = None,
    ) -> tuple[Job, ...]:
        """The requests arriving at mean ``rate`` req/s (times divided by ``rate``); with
        tenants, request ids are ``<tenant>/<id>`` as the services make them; with
        ``tpot_slo_s``, interactive requests carry that TPOT target (:func:`tpot_slo_for`)."""
        _check_rate(rate)
        jobs = []
        for i in range(len(self.unit_times)):
            output = int(self.outputs[i])
            tenant = self.tenants[i] if self.tenants else DEFAULT_TENANT
            request = Request(
                id=f"{tenant}/{prefix}{i:06d}" if self.tenants else f"{prefix}{i:06d}",
                tenant=tenant,
                model=self.models[i],
                prompt_tokens=int(self.prompts[i]),
                max_tokens=max(max_tokens, output),
                slo_class=self.classes[i],
                slo=tpot_slo_for(self.classes[i], tpot_slo_s),
                arrival_at=float(self.unit_times[i]) / rate,
            )
            jobs.append(Job(request, output))
        return tuple(jobs)


def tpot_slo_for(slo_class: SLOClass, tpot_slo_s: float | None) -> SLO:
    """The class's SLO, with the TPOT target ``tpot_slo_s`` on interactive requests (the
    workload variant with TPOT targets: chat users read tokens as they stream; batch
    classes only need their first token by the deadline and the whole answer eventually)."""
    slo = SLO.for_class(slo_class)
    if tpot_slo_s is None or slo_class is not SLOClass.INTERACTIVE:
        return slo
    return SLO.of(slo.ttft_s, tpot_slo_s)


WA_CLASSES: Final = {
    SLOClass.INTERACTIVE.value: 0.5,
    SLOClass.BATCH_1.value: 0.25,
    SLOClass.BATCH_2.value: 0.25,
}
WB_CLASSES: Final = {SLOClass.BATCH_1.value: 0.7, SLOClass.BATCH_2.value: 0.3}
WB_MODELS: Final = (MISTRAL, VICUNA, LLAMA)
WORKLOADS: Final = ("WA", "WB", "WC")


def plan_requests(
    workload: str,
    num_requests: int,
    rng: np.random.Generator,
    trace: Sequence[TraceRow] | None = None,
    bursty_cv: float | None = None,
) -> RequestPlan:
    """The requests of ``workload`` at unit rate.

    With ``trace``, arrival times and lengths come from the trace (sliced to
    ``num_requests``; WC keeps its 3–4k prompts); otherwise Poisson (or gamma with
    ``bursty_cv``) arrivals and ShareGPT-like lengths.
    """
    if workload not in WORKLOADS:
        expected = ", ".join(WORKLOADS)
        raise InvalidInput("workload", f"unknown {workload!r}; expected one of {expected}")
    if num_requests <= 0:
        raise InvalidInput("num_requests", f"must be > 0, got {num_requests}")
    if trace is not None:
        rows = slice_trace(trace, num_requests)
        n = len(rows)
        times = unit_rate_times(np.array([r.arrival_s for r in rows]))
        prompts = np.array([r.context_tokens for r in rows], dtype=np.int64)
        outputs = np.array([r.generated_tokens for r in rows], dtype=np.int64)
    else:
        n = num_requests
        if bursty_cv:
            times = gamma_arrivals(rng, n, 1.0, bursty_cv)
        else:
            times = poisson_arrivals(rng, n, 1.0)
        prompts, outputs = sample_lengths(rng, n)
    if workload == "WC":
        prompts = rng.integers(3000, 4001, n)
    if workload == "WB":
        models = _phased_models(rng, n)
        classes = pick(rng, n, WB_CLASSES)
    else:
        models = [MISTRAL] * n
        classes = pick(rng, n, WA_CLASSES)
    return RequestPlan(times, prompts, outputs, tuple(models), tuple(SLOClass(c) for c in classes))


def parse_tenants(text: str) -> dict[str, float]:
    """Tenants and their shares of the traffic, ``NAME:SHARE,...`` (``light:1,heavy:10``:
    heavy sends 10× light's requests); InvalidInput naming ``tenants`` otherwise."""
    shares: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        name, sep, share = part.partition(":")
        try:
            value = float(share)
        except ValueError:
            value = math.nan
        if not sep or not name or "/" in name or not (math.isfinite(value) and value > 0):
            raise InvalidInput("tenants", f"expected NAME:SHARE (share > 0), got {part!r}")
        if name in shares:
            raise InvalidInput("tenants", f"tenant {name!r} named twice")
        shares[name] = value
    if not shares:
        raise InvalidInput("tenants", "name at least one tenant")
    return shares


def with_tenants(plan: RequestPlan, shares: Mapping[str, float], seed: int) -> RequestPlan:
    """``plan`` with each request's tenant drawn with these shares (independent Poisson
    streams when the arrivals are Poisson). Drawn from their own generator (``seed``), so
    the requests themselves are those of the plan without tenants."""
    rng = np.random.default_rng([seed, 0x7E4A47])
    tenants = tuple(pick(rng, len(plan.unit_times), shares))
    return replace(plan, tenants=tenants)


def only_tenants(jobs: Sequence[Job], tenants: Sequence[str]) -> tuple[Job, ...]:
    """The jobs of these tenants (e.g. one tenant's traffic alone, the same requests)."""
    keep = set(tenants)
    return tuple(j for j in jobs if j.request.tenant in keep)


def _phased_models(rng: np.random.Generator, n: int) -> list[str]:
    """WB's model of each request: three equal phases, each with one hot model (60%)."""
    models: list[str] = []
    bounds = np.linspace(0, n, len(WB_MODELS) + 1).astype(int)
    for phase, hot in enumerate((LLAMA, VICUNA, MISTRAL)):
        size = int(bounds[phase + 1] - bounds[phase])
        weights = {m: (0.6 if m == hot else 0.2) for m in WB_MODELS}
        models.extend(pick(rng, size, weights))
    return models


#: Cluster presets: (A10 GPUs, A100 GPUs). ``paper`` is the QLM paper's cluster.
CLUSTERS: Final = {"mini": (1, 2), "small": (3, 5), "paper": (30, 50)}
#: WB needs a 4-GPU A100 instance for llama-70b, so its ``mini`` has 5 A100s.
WB_CLUSTERS: Final = {"mini": (1, 5), "small": (3, 5), "paper": (30, 50)}


def cluster_for(workload: str, cluster: str = "mini") -> tuple[WorkerSpec, ...]:
    """Workers of ``workload`` on a preset cluster (see the module docstring)."""
    if cluster not in CLUSTERS:
        raise InvalidInput("cluster", f"unknown {cluster!r}; expected one of {', '.join(CLUSTERS)}")
    num_a10, num_a100 = (WB_CLUSTERS if workload == "WB" else CLUSTERS)[cluster]
    workers = [WorkerSpec(f"a10-{i:02d}", A10, MISTRAL, (MISTRAL,)) for i in range(num_a10)]
    if workload != "WB":
        workers += [WorkerSpec(f"a100-{i:02d}", A100, MISTRAL, (MISTRAL,)) for i in range(num_a100)]
        return tuple(workers)
    num_quads = max(1, num_a100 // 5)
    workers += [
        WorkerSpec(f"a100x4-{i:02d}", A100, VICUNA, (VICUNA,), num_gpus=4)
        for i in range(num_quads)
    ]
    for i in range(max(1, num_a100 - 4 * num_quads)):
        model = VICUNA if i % 2 == 0 else MISTRAL
        workers.append(WorkerSpec(f"a100-{i:02d}", A100, model, (model,)))
    return tuple(workers)
