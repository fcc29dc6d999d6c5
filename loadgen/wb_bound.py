"""What no schedule can beat on a simulated workload: an upper bound on SLO attainment and
a lower bound on the makespan (so an upper bound on throughput), from the profiles.

    python -m loadgen.wb_bound [--workload WB] [--rates 40,80] [--seeds 0,1]
        [--cluster mini] [--num-requests N] [--slot-s 2] [--out FILE]

The requests are those of ``python -m loadgen.sim`` (same workload, seed, rate, cluster);
requests refused at admission (they fit no worker) are left out, as the simulator does.
Every bound holds for any policy under the simulator's engine model (the profiles'
linear step times, chunked prefill), so a measured ratio that needs more than a bound
allows is out of reach, not a tuning problem.

**When a worker can serve a model** (``ready_at``): at once for its active model; a model
it holds asleep after the active one sleeps and it wakes; any other after a cold load.
A model that only one worker can serve (llama-70b on WB's 4-GPU instance) costs that
worker its swap-in time whatever else it does.

**Attainment bound.** A request can meet its TTFT deadline only if some worker able to
serve it gives its first token in time when it does nothing else: ``max(arrival,
ready_at) + prefill_s(prompt) ≤ deadline``. The bound counts every such request as met
(``attainment_bound``, over the admitted requests); ``surely_missed`` the others, per
model.

**Makespan bound** (``makespan_bound_s``, first arrival → last finish), the larger of:

* ``solo_floor_s``: every request alone at batch 1 on its fastest worker from
  ``max(arrival, ready_at)``: its prefill then its decode steps (a larger batch only
  makes each step longer);
* ``fluid_floor_s``: a time-indexed linear programme (``scipy.optimize.linprog``, HiGHS)
  in slots of ``--slot-s`` seconds: the requests arriving in a slot may be split
  fractionally over the workers able to serve them and over that slot and later ones;
  a worker gives at most the slot's length to models it is ready for, and in all at most
  the horizon less the swap-in of the models only it serves; the smallest number of slots
  for which the programme is feasible gives the floor (the last infeasible one). Each
  request's work on a worker is a lower bound on the time it adds there: decode
  ``per_seq·out + per_ctx·C + base·steps`` with ``C = prompt·out + out(out−1)/2`` (the
  context its steps hold) and its share of the steps no fewer than the larger of
  ``out / max_batch`` and ``C / kv_capacity`` (every step holds at most the batch limit
  and at most the KV cache), plus its prompt's chunk work ``prefill_s(prompt) − L −
  base`` (:func:`qlm.sim.batching.mixed_step_s`; a chunk that shares a step with others
  costs no less, the profiles' prefill intercept being below ``base + L``). No swap
  back and forth, no tail of a shrinking batch, no admission limit is charged: the
  floor is optimistic.

``throughput_bound_rps`` = admitted requests / makespan bound. Also per rate: each
model's work (seconds) on each worker shape that can serve it (``work_s``) and its
ready times, which show where the floor comes from.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import coo_matrix, vstack

from loadgen.results import emit
from qlm.core.fit import refusal, serving_limits
from qlm.core.perf import PerfProfile, ProfileBook
from qlm.sim.batching import decode_segment_s, output_latency_s
from qlm.sim.cluster import Job, WorkerSpec
from qlm.workloads import WORKLOADS, cluster_for, plan_requests

RESULT_KEYS = frozenset({"workload", "cluster", "num_requests", "slot_s", "runs", "wall_s",
                         "command"})
DEFAULT_RATES = (40.0, 80.0)


def ready_at(profiles: ProfileBook, worker: WorkerSpec, model: str) -> float:
    """Seconds from the start until ``worker`` can serve ``model`` (see the docstring)."""
    if model == worker.active_model:
        return 0.0
    sleep = profiles.get(worker.active_model, worker.gpu).sleep_s
    return sleep + profiles.get(model, worker.gpu).swap_in_s(model in worker.models)


def can_run(profiles: ProfileBook, worker: WorkerSpec, job: Job) -> bool:
    """Whether ``worker`` can serve ``job`` (profile, GPU count, sequence limit)."""
    r = job.request
    limits = serving_limits(profiles, r.model, [(worker.gpu, worker.num_gpus)])
    return bool(limits) and refusal(r.model, r.prompt_tokens, r.max_tokens, limits) is None


def chunk_work_s(profile: PerfProfile, prompt: int) -> float:
    """What a prompt's chunk adds to a decode step (:func:`mixed_step_s` less the step)."""
    return max(0.0, profile.prefill_s(prompt) - output_latency_s(profile)
               - profile.decode_base_s)


def work_s(profile: PerfProfile, prompt: int, out: int) -> float:
    """A lower bound on the seconds one request adds to a worker's busy time."""
    ctx = prompt * out + out * (out - 1) / 2.0
    steps = max(out / profile.max_batch_size, ctx / profile.kv_capacity_tokens)
    return (profile.decode_per_seq_s * out + profile.decode_per_ctx_token_s * ctx
            + profile.decode_base_s * steps + chunk_work_s(profile, prompt))


def solo_s(profile: PerfProfile, prompt: int, out: int) -> float:
    """Seconds from admission to the last token of a request alone at batch 1."""
    return profile.prefill_s(prompt) + decode_segment_s(profile, 1, prompt + 1, out - 1)


def fluid_feasible(num_slots: int, slot_s: float, release: np.ndarray, work: np.ndarray,
                   ready: np.ndarray, reserved_s: np.ndarray) -> bool:
    """Whether the buckets (``release[b]``: first slot; ``work[b, w]``: seconds on worker w,
    inf where it cannot run) can all be served within ``num_slots`` slots (see the
    module docstring)."""
    num_buckets, num_workers = work.shape
    horizon = num_slots * slot_s
    cols: list[tuple[int, int, int]] = []  # (bucket, worker, slot)
    for b in range(num_buckets):
        for w in range(num_workers):
            if not math.isfinite(work[b, w]):
                continue
            first = max(int(release[b]), int(ready[b, w] // slot_s))
            cols.extend((b, w, k) for k in range(first, num_slots))
    if not cols:
        return num_buckets == 0
    c = np.array(cols)
    n = len(cols)
    # Σ_{w,k} z[b,w,k] = 1 per bucket
    a_eq = coo_matrix((np.ones(n), (c[:, 0], np.arange(n))), shape=(num_buckets, n))
    # per (worker, slot): Σ_b z·work ≤ the slot's usable length; per worker: ≤ horizon − reserved
    coef = work[c[:, 0], c[:, 1]]
    rows = c[:, 1] * num_slots + c[:, 2]
    usable = np.full(num_workers * num_slots, slot_s)
    for b in range(num_buckets):  # a slot a worker is only partly ready in
        for w in range(num_workers):
            if math.isfinite(work[b, w]) and ready[b, w] > 0:
                k = int(ready[b, w] // slot_s)
                if k < num_slots:
                    usable[w * num_slots + k] = min(usable[w * num_slots + k],
                                                    (k + 1) * slot_s - ready[b, w])
    a_slot = coo_matrix((coef, (rows, np.arange(n))), shape=(num_workers * num_slots, n))
    a_total = coo_matrix((coef, (c[:, 1], np.arange(n))), shape=(num_workers, n))
    a_ub = vstack([a_slot, a_total]).tocsr()
    b_ub = np.concatenate([usable, np.maximum(0.0, horizon - reserved_s)])
    res = linprog(np.zeros(n), A_ub=a_ub, b_ub=b_ub, A_eq=a_eq.tocsr(), b_eq=np.ones(num_buckets),
                  bounds=(0, None), method="highs")
    return bool(res.status == 0)


def bound(jobs: Sequence[Job], workers: Sequence[WorkerSpec], profiles: ProfileBook,
          slot_s: float) -> dict[str, Any]:
    """The bounds of the module docstring for ``jobs`` on ``workers``."""
    limits = {m: serving_limits(profiles, m, [(w.gpu, w.num_gpus) for w in workers])
              for m in {j.request.model for j in jobs}}
    admitted = [j for j in jobs if refusal(j.request.model, j.request.prompt_tokens,
                                           j.request.max_tokens, limits[j.request.model]) is None]
    t0 = min(j.request.arrival_at for j in jobs)
    models = sorted({j.request.model for j in admitted})
    ready = {(m, w.id): ready_at(profiles, w, m) for m in models for w in workers
             if profiles.has(m, w.gpu) and profiles.get(m, w.gpu).num_gpus <= w.num_gpus}
    # swap-in a worker pays whatever it does: the models only it can serve
    reserved = {w.id: 0.0 for w in workers}
    for m in models:
        capable = [w for w in workers if (m, w.id) in ready]
        if len(capable) == 1:
            reserved[capable[0].id] += ready[(m, capable[0].id)]
    met = 0
    missed: dict[str, int] = {m: 0 for m in models}
    solo_floor = 0.0
    for j in admitted:
        r = j.request
        best_first, best_end = math.inf, math.inf
        for w in workers:
            key = (r.model, w.id)
            if key not in ready or not can_run(profiles, w, j):
                continue
            p = profiles.get(r.model, w.gpu)
            start = max(r.arrival_at, t0 + ready[key])
            best_first = min(best_first, start + p.prefill_s(r.prompt_tokens))
            best_end = min(best_end, start + solo_s(p, r.prompt_tokens, j.output_tokens))
        if best_first <= r.deadline_at:
            met += 1
        else:
            missed[r.model] += 1
        solo_floor = max(solo_floor, best_end - t0)
    # buckets: (model, arrival slot); work per worker
    buckets: dict[tuple[str, int], np.ndarray] = {}
    for j in admitted:
        r = j.request
        k = int((r.arrival_at - t0) // slot_s)
        row = buckets.setdefault((r.model, k), np.zeros(len(workers)))
        for wi, w in enumerate(workers):
            if (r.model, w.id) not in ready or not can_run(profiles, w, j):
                row[wi] = math.inf
            else:
                row[wi] += work_s(profiles.get(r.model, w.gpu), r.prompt_tokens,
                                  j.output_tokens)
    keys = sorted(buckets, key=lambda mk: (mk[1], mk[0]))
    work = np.array([buckets[k] for k in keys]).reshape(len(keys), len(workers))
    release = np.array([k for _, k in keys])
    ready_arr = np.array([[ready.get((m, w.id), math.inf) for w in workers] for m, _ in keys])
    reserved_arr = np.array([reserved[w.id] for w in workers])
    low = int(release.max(initial=0))  # no slot for the last arrivals: infeasible
    high = max(low + 1, math.ceil(solo_floor / slot_s))
    while not fluid_feasible(high, slot_s, release, work, ready_arr, reserved_arr):
        low, high = high, high * 2
    while high - low > 1:  # invariant: low infeasible (or trivially short), high feasible
        mid = (low + high) // 2
        if fluid_feasible(mid, slot_s, release, work, ready_arr, reserved_arr):
            high = mid
        else:
            low = mid
    fluid_floor = low * slot_s
    makespan = max(solo_floor, fluid_floor)
    per_model_work: dict[str, dict[str, float]] = {}
    for m in models:
        for w in workers:
            if (m, w.id) in ready:
                p = profiles.get(m, w.gpu)
                total = sum(work_s(p, j.request.prompt_tokens, j.output_tokens)
                            for j in admitted if j.request.model == m)
                per_model_work.setdefault(m, {})[w.id] = round(total, 2)
    return {
        "num_admitted": len(admitted),
        "attainment_bound": round(met / len(admitted), 4) if admitted else 1.0,
        "surely_missed": missed,
        "makespan_bound_s": round(makespan, 2),
        "throughput_bound_rps": round(len(admitted) / makespan, 3),
        "solo_floor_s": round(solo_floor, 2),
        "fluid_floor_s": round(fluid_floor, 2),
        "ready_at_s": {f"{m}@{w}": round(t, 2) for (m, w), t in sorted(ready.items())},
        "reserved_s": {w: round(t, 2) for w, t in reserved.items()},
        "work_s": per_model_work,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadgen.wb_bound",
                                description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="WB", choices=WORKLOADS)
    p.add_argument("--rates", default=",".join(f"{r:g}" for r in DEFAULT_RATES))
    p.add_argument("--seeds", default="0")
    p.add_argument("--cluster", default="mini")
    p.add_argument("--num-requests", type=int)
    p.add_argument("--slot-s", type=float, default=2.0,
                   help="slot of the fluid programme (s): smaller is tighter and slower")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    import sys

    from loadgen.sim import NUM_REQUESTS, parse_rates
    from qlm.core.errors import InvalidInput

    args = parse_args(argv)
    rates = parse_rates(args.rates)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds: not a comma-separated list of integers: {args.seeds!r}"
                         ) from None
    if not seeds:
        raise SystemExit("--seeds: name at least one seed")
    if not args.slot_s > 0:
        raise SystemExit(f"--slot-s: must be > 0, got {args.slot_s}")
    num_requests = args.num_requests or NUM_REQUESTS[args.workload]
    try:
        workers = cluster_for(args.workload, args.cluster)
    except InvalidInput as e:
        raise SystemExit(str(e)) from None
    profiles = ProfileBook.load()
    started = time.perf_counter()
    runs: list[Mapping[str, Any]] = []
    for seed in seeds:
        plan = plan_requests(args.workload, num_requests, np.random.default_rng(seed))
        for rate in rates:
            result = bound(plan.jobs_at(rate), workers, profiles, args.slot_s)
            runs.append({"seed": seed, "rate": rate, **result})
            print(f"  {args.workload} seed={seed} rate={rate:g}: attainment ≤ "
                  f"{result['attainment_bound']:.3f}, makespan ≥ {result['makespan_bound_s']:.1f}"
                  f" s, throughput ≤ {result['throughput_bound_rps']:.2f} req/s",
                  file=sys.stderr)
    out = {"workload": args.workload, "cluster": args.cluster, "num_requests": num_requests,
           "slot_s": args.slot_s, "runs": runs,
           "wall_s": round(time.perf_counter() - started, 1),
           "command": "python -m loadgen.wb_bound " + " ".join(
               argv if argv is not None else sys.argv[1:])}
    emit(out, args.out, shown={"runs": [{k: r[k] for k in (
        "seed", "rate", "attainment_bound", "makespan_bound_s", "throughput_bound_rps")}
        for r in runs]}, keys=RESULT_KEYS)


if __name__ == "__main__":
    main()
