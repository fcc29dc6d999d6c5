"""Scheduler decision-time benchmark: ``decide()`` on a snapshot of 100k queued requests.

    python -m loadgen.bench_decide --queued 100000 --workers 80 \\
        --policies qlm,qlm:fair_share=false,fcfs

A policy entry is a policy's name, optionally followed by options as ``:name=value``
(each value read as JSON, else as text): ``qlm:fair_share=false`` is qlm without fair
share. Results are keyed by the entry as written.

The cluster is the paper's: 3/8 of the workers on A10-24GB and 5/8 on A100-80GB
(30 + 50 at 80 workers), each worker one instance of one of the three models
(Mistral-7B, Vicuna-13B, Llama-70B, round robin) on as many GPUs as its profile
needs; a worker keeps the other models it could serve asleep. Queued requests are
spread over 3 models × 3 classes × ``--windows`` arrival windows (a few hundred
groups).

Between two measured decisions the queue moves as in a live system: time advances by
``--step-s``, ``--churn`` groups lose their head requests (pulled) and as many gain
new arrivals, so per-group summaries must be brought up to date for those groups.
Workers are full but for ``--free-slots`` of room each. The first
decision of a fresh policy instance (nothing memoised) is reported separately as
``cold_ms``. Every policy sees the same sequence of snapshots, in the same process.

Garbage collection: the queue (100k requests) is long-lived, and a full collection walks
all of it (well over 100 ms on a small machine) wherever it happens to trip. Each policy
starts from a collected heap (``gc.collect()`` before its cold decision), so that none
inherits the collection debt that building the queue (or the policy before it) left;
``gc_full_collections`` / ``gc_full_ms`` count the full collections that still ran
inside its timed decisions and the wall time they took.

``forecast_*`` (the subject policy): what the scheduler service does after writing the
virtual queues, outside ``decide()``: every group's forecast on the queue the decision
gave it (:class:`qlm.core.forecast.Forecaster`), timed after each decision;
``forecast_cold_ms`` is the first (every group's sums computed afresh).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import numpy as np

from loadgen.results import write_json
from qlm.core.errors import InvalidInput
from qlm.core.estimator import RWTEstimator
from qlm.core.forecast import Forecaster
from qlm.core.perf import ProfileBook
from qlm.core.policies import PolicyContext, make_policy
from qlm.core.pulls import DEFAULT_EXPECTED_OUTPUT_TOKENS
from qlm.core.types import (
    SLO,
    Decision,
    GroupKey,
    QueueSnapshot,
    Request,
    RequestGroup,
    RunningRequest,
    SLOClass,
    WorkerView,
    group_requests,
)

#: The top-level keys this program writes into its JSON (loadgen.results).
RESULT_KEYS: Final = frozenset({
    "churn_groups_per_decision", "command", "free_slots_per_worker", "gc_freeze", "groups",
    "machine", "policies", "queued", "ratio_to", "running", "target_p99_ms", "workers",
})

MODELS = ("mistral-7b", "vicuna-13b", "llama-70b")
CLASSES = (SLOClass.INTERACTIVE, SLOClass.BATCH_1, SLOClass.BATCH_2)
RESULT_PATH = Path("docs/results/bench_decide.json")


def build_workers(num_workers: int, free_slots: int, now: float, profiles: ProfileBook,
                  rng: np.random.Generator) -> tuple[WorkerView, ...]:
    """Workers whose batch is full but for ``free_slots`` requests' worth of room (the
    room completions freed since the last decision: with 100k requests queued, any
    larger room would have been filled by the previous decision's pulls)."""
    num_a10 = round(num_workers * 3 / 8)
    workers = []
    for i in range(num_workers):
        gpu = "A10-24GB" if i < num_a10 else "A100-80GB"
        model = MODELS[i % len(MODELS)]
        prof = profiles.get(model, gpu)
        asleep = tuple(m for m in MODELS if profiles.get(m, gpu).num_gpus <= prof.num_gpus)
        prompt, max_tokens = 512, 1024
        reservation = prompt + DEFAULT_EXPECTED_OUTPUT_TOKENS
        batch = max(0, min(prof.max_batch_size, prof.kv_capacity_tokens // reservation)
                    - free_slots)
        reqs = tuple(
            RunningRequest(
                Request(f"run-{i}-{j}", model, prompt, max_tokens, SLOClass.BATCH_2,
                        SLO.for_class(SLOClass.BATCH_2), now - 30.0,
                        num_generated=int(rng.integers(0, 300))),
                started_at=now - 10.0, first_token_at=now - 9.0)
            for j in range(batch))
        workers.append(WorkerView(f"w{i:03d}", gpu, asleep, model, prof.kv_capacity_tokens,
                                  prof.max_batch_size, reqs, num_gpus=prof.num_gpus))
    return tuple(workers)


def build_queue(num_queued: int, windows: int, window_s: float, now: float,
                rng: np.random.Generator) -> tuple[RequestGroup, ...]:
    start = now - windows * window_s
    arrivals = np.sort(rng.uniform(start, now, num_queued))
    models = rng.integers(0, len(MODELS), num_queued)
    classes = rng.choice(len(CLASSES), num_queued, p=[0.3, 0.3, 0.4])
    prompts = rng.integers(16, 2048, num_queued)
    outputs = rng.integers(16, 1024, num_queued)
    reqs = [
        Request(f"q{i}", MODELS[models[i]], int(prompts[i]), int(outputs[i]),
                CLASSES[classes[i]], SLO.for_class(CLASSES[classes[i]]), float(arrivals[i]))
        for i in range(num_queued)
    ]
    return group_requests(reqs, window_s)


def churn(snapshot: QueueSnapshot, step: int, num_churn: int, step_s: float,
          window_s: float) -> QueueSnapshot:
    """The next snapshot: time advances, ``num_churn`` groups lose heads, as many gain tails."""
    groups = list(snapshot.groups)
    now = snapshot.now + step_s
    n = len(groups)
    for k in range(num_churn):
        i = (step * num_churn + k) % n
        g = groups[i]
        if g.size > 2:
            groups[i] = RequestGroup(g.key, g.requests[1:])
        j = (i + n // 2) % n
        g = groups[j]
        new = replace(g.requests[-1], id=f"{g.requests[-1].id}+{step}")
        groups[j] = RequestGroup(g.key, (*g.requests, new))
    return QueueSnapshot(now, tuple(groups), snapshot.workers)


def _pct(values: list[float], q: float) -> float:
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


def policy_entry(entry: str) -> tuple[str, dict[str, Any]]:
    """``name[:option=value]...`` as (policy name, options); InvalidInput names a bad one."""
    name, sep, rest = entry.partition(":")
    options: dict[str, Any] = {}
    # Options are split at a colon followed by the next option's name and "=" (a JSON
    # value may hold colons of its own).
    for pair in re.split(r":(?=[A-Za-z_]\w*=)", rest) if sep else ():
        key, _, text = pair.partition("=")
        if not re.fullmatch(r"[A-Za-z_]\w*", key) or "=" not in pair:
            raise InvalidInput("policies", f"{entry!r}: expected name:option=value, got {pair!r}")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    return name, options


class FullCollections:
    """The full (oldest-generation) garbage collections while active (``with``): each
    one's wall time in :attr:`seconds`."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._started = 0.0

    @property
    def count(self) -> int:
        return len(self.seconds)

    @property
    def ms(self) -> float:
        return sum(self.seconds) * 1e3

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds.append(time.perf_counter() - self._started)

    def __enter__(self) -> FullCollections:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


def time_policy(entry: str, snapshots: Sequence[QueueSnapshot], ctx: PolicyContext,
                forecaster: Forecaster | None = None) -> dict[str, Any]:
    name, options = policy_entry(entry)
    policy = make_policy(name, **options)
    gc.collect()  # start from a collected heap: no debt left by building the queue
    t0 = time.perf_counter()
    decision = policy.decide(snapshots[0], ctx)
    cold_ms = (time.perf_counter() - t0) * 1e3
    extra: dict[str, Any] = {}
    if forecaster is not None:
        t0 = time.perf_counter()
        forecaster.forecast(snapshots[0], orders_of(decision))
        extra["forecast_cold_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
    times = []
    cpu_times = []  # CPU time of this thread: steadier than wall time on a shared machine
    forecast_times = []
    full = FullCollections()
    for snap in snapshots[1:]:
        with full:
            t0, c0 = time.perf_counter(), time.thread_time()
            decision = policy.decide(snap, ctx)
            times.append((time.perf_counter() - t0) * 1e3)
            cpu_times.append((time.thread_time() - c0) * 1e3)
        if forecaster is not None:
            t0 = time.perf_counter()
            forecaster.forecast(snap, orders_of(decision))
            forecast_times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    cpu_times.sort()
    if forecast_times:
        forecast_times.sort()
        extra.update(forecast_p50_ms=round(statistics.median(forecast_times), 3),
                     forecast_p99_ms=_pct(forecast_times, 0.99))
    return {
        "iterations": len(times),
        "cold_ms": round(cold_ms, 3),
        "p50_ms": round(statistics.median(times), 3),
        "p99_ms": round(times[min(len(times) - 1, int(0.99 * len(times)))], 3),
        "max_ms": round(times[-1], 3),
        "mean_ms": round(statistics.fmean(times), 3),
        "cpu_p50_ms": round(statistics.median(cpu_times), 3),
        "cpu_p99_ms": round(cpu_times[min(len(cpu_times) - 1, int(0.99 * len(cpu_times)))], 3),
        "cpu_max_ms": round(cpu_times[-1], 3),
        "gc_full_collections": full.count,
        "gc_full_ms": round(full.ms, 3),
        **extra,
    }


def orders_of(decision: Decision) -> dict[str, tuple[GroupKey, ...]]:
    return {place.worker_id: place.order for place in decision.placements}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadgen.bench_decide", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=80)
    parser.add_argument("--free-slots", type=int, default=4,
                        help="room per worker (requests) left by completions since the last "
                             "decision; the rest of its batch is full")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.freeze() after building the queue: full collections then "
                             "skip it (what a scheduler process could do with the queue "
                             "it loaded at start)")
    parser.add_argument("--windows", type=int, default=34,
                        help="arrival windows (groups = 3 models × 3 classes × windows)")
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--policy", default="qlm")
    parser.add_argument("--policies", default=None,
                        help="comma list; the first is the subject, the rest its references; "
                             "an entry may set options: qlm:fair_share=false")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--reference-iterations", type=int, default=30)
    parser.add_argument("--churn", type=int, default=5)
    parser.add_argument("--step-s", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULT_PATH)
    args = parser.parse_args(argv)
    names = [p.strip() for p in (args.policies or args.policy).split(",") if p.strip()]
    try:  # every entry valid before the queue is built
        for entry in names:
            name, options = policy_entry(entry)
            make_policy(name, **options)
    except InvalidInput as exc:
        parser.error(str(exc))

    rng = np.random.default_rng(args.seed)
    profiles = ProfileBook.load()
    now = 10_000.0
    workers = build_workers(args.workers, args.free_slots, now, profiles, rng)
    groups = build_queue(args.queued, args.windows, args.window_s, now, rng)
    snapshots = [QueueSnapshot(now, groups, workers)]
    for step in range(max(args.iterations, args.reference_iterations)):
        snapshots.append(churn(snapshots[-1], step, args.churn, args.step_s, args.window_s))
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    ctx = PolicyContext(profiles)
    results: dict[str, Any] = {}
    for i, name in enumerate(names):
        n = args.iterations if i == 0 else args.reference_iterations
        forecaster = Forecaster(RWTEstimator(profiles)) if i == 0 else None
        results[name] = time_policy(name, snapshots[: n + 1], ctx, forecaster)
        r = results[name]
        print(f"{name:10s} cold {r['cold_ms']:9.2f} ms  p50 {r['p50_ms']:9.2f} ms  "
              f"p99 {r['p99_ms']:9.2f} ms  ({r['iterations']} decisions)")
        print(f"{'  cpu':10s} {'':17s}p50 {r['cpu_p50_ms']:9.2f} ms  p99 {r['cpu_p99_ms']:9.2f} ms"
              f"  (full collections: {r['gc_full_collections']}, {r['gc_full_ms']:.0f} ms)")
        if forecaster is not None:
            print(f"{'  forecast':10s} cold {r['forecast_cold_ms']:9.2f} ms  "
                  f"p50 {r['forecast_p50_ms']:9.2f} ms  p99 {r['forecast_p99_ms']:9.2f} ms")
    subject = names[0]
    ratios = {ref: {"p50": round(results[subject]["p50_ms"] / results[ref]["p50_ms"], 3),
                    "p99": round(results[subject]["p99_ms"] / results[ref]["p99_ms"], 3)}
              for ref in names[1:]}
    for ref, ratio in ratios.items():
        print(f"{subject}/{ref}: p50 ×{ratio['p50']}, p99 ×{ratio['p99']}")
    report = {
        "command": "python -m loadgen.bench_decide " + " ".join(sys.argv[1:] if argv is None
                                                                else argv),
        "queued": snapshots[0].num_queued,
        "groups": len(groups),
        "workers": len(workers),
        "running": sum(w.batch_size for w in workers),
        "free_slots_per_worker": args.free_slots,
        "gc_freeze": args.gc_freeze,
        "churn_groups_per_decision": args.churn,
        "machine": {"python": platform.python_version(), "cpu": platform.processor()
                    or platform.machine(), "cpus_allowed": sorted(os.sched_getaffinity(0)),
                    "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        "target_p99_ms": 10.0,
        "policies": results,
        "ratio_to": ratios,
    }
    write_json(args.out, report, RESULT_KEYS)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
