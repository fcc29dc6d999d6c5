"""What the demo and the experiment runner share: the requests, the workers, the forecaster.

* :func:`build_plan` (:class:`DemoPlan`): trace rows at a mean rate, with classes (WA
  mix) and models drawn by a seed, prompts cut to the model's length limit;
* :func:`sim_workers`: a workers file as the simulator's worker specs;
* :func:`estimator_forecaster`: the predicted first-token times refreshed at every
  decision, as the scheduler service makes them (the simulator's ``wait_r2``).

``loadgen.demo`` and ``loadgen.sim`` both import this module and not each other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qlm.core.errors import InvalidInput
from qlm.core.estimator import RWTEstimator
from qlm.core.forecast import Forecaster
from qlm.core.perf import ProfileBook
from qlm.core.types import SLO, Request, SLOClass
from qlm.roster import read_workers_file
from qlm.sim.cluster import Job, WorkerSpec
from qlm.traces import load_trace, slice_trace
from qlm.workloads import WA_CLASSES, pick, unit_rate_times


# ===================================================================== plan
@dataclass(frozen=True)
class DemoPlan:
    """The demo's requests (paper seconds) and how they were chosen."""

    jobs: tuple[Job, ...]
    trace: str
    start: int
    rate: float
    seed: int

    @property
    def span_s(self) -> float:
        return max((j.request.arrival_at for j in self.jobs), default=0.0)


def build_plan(
    trace_path: Path, num_requests: int, rate: float, models: Sequence[str], seed: int = 0,
    start: int = 0, profiles: ProfileBook | None = None, trace_format: str | None = None,
) -> DemoPlan:
    """``num_requests`` trace rows from ``start`` at mean ``rate`` req/s, with classes
    (WA mix) and models (equal shares) drawn by ``seed``. Prompts are cut so that prompt
    + output fits the model's ``max_model_len`` (the smallest over the GPUs profiled).
    The trace may be in any format :mod:`qlm.traces` reads (``trace_format``, else
    detected)."""
    if not (math.isfinite(rate) and rate > 0):
        raise InvalidInput("rate", f"must be a finite number > 0, got {rate}")
    if not models:
        raise InvalidInput("models", "need at least one model")
    profiles = profiles or ProfileBook.load()
    limits = {}
    for model in models:
        lens = [profiles.get(model, gpu).max_model_len for gpu in profiles.gpus
                if profiles.has(model, gpu)]
        if not lens:
            raise InvalidInput("models", f"no performance profile for {model!r}")
        limits[model] = min(lens)
    rows = slice_trace(load_trace(trace_path, trace_format, limit=start + num_requests),
                       num_requests, start)
    rng = np.random.default_rng(seed)
    classes = pick(rng, len(rows), WA_CLASSES)
    chosen = pick(rng, len(rows), {m: 1.0 for m in models})
    times = unit_rate_times(np.array([r.arrival_s for r in rows])) / rate
    jobs = []
    for i, row in enumerate(rows):
        slo_class, model = SLOClass(classes[i]), chosen[i]
        output = max(1, min(row.generated_tokens, limits[model] // 2))
        prompt = max(1, min(row.context_tokens, limits[model] - output))
        request = Request(
            id=f"d{i:05d}", model=model, prompt_tokens=prompt, max_tokens=output,
            slo_class=slo_class, slo=SLO.for_class(slo_class), arrival_at=float(times[i]),
        )
        jobs.append(Job(request, output))
    return DemoPlan(tuple(jobs), str(trace_path), start, rate, seed)


def sim_workers(workers_file: Path) -> tuple[WorkerSpec, ...]:
    """The workers of a workers file as the simulator's specs (first model awake)."""
    return tuple(WorkerSpec(w.id, w.gpu, w.models[0], w.models)
                 for w in read_workers_file(workers_file))



# ============================================================== forecaster
def estimator_forecaster(profiles: ProfileBook) -> Forecaster:
    """The forecaster the scheduler service runs: the RWT estimator (chunked prefill, as
    the simulator's default engine) learning output lengths from finished requests."""
    return Forecaster(RWTEstimator(profiles))
