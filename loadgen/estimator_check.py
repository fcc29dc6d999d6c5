"""Check the RWT estimator against a small continuous-batching replay of one worker.

A worker serves a queue of groups in order, as the simulator does: at each step
boundary it admits the queue head while batch slots, KV reservations
(prompt + expected output) and the prefill budget allow (the shared step model's
:func:`qlm.sim.batching.admit_prefix`), prefills the admitted prompts in one
prefill-first step (which emits their first tokens), then runs one decode step for
every running sequence; between models it drains, sleeps and wakes.
True output lengths are drawn from the same log-normal the estimator assumes; the
estimator never sees them. Reported: R² and mean error of predicted vs realised wait
(time to first token) per request, for one-model and two-model queues.

Usage (from the repository root)::

    python -m loadgen.estimator_check [--seeds 5] [--gpu A100-80GB]
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qlm.core.estimator import (
    DEFAULT_OUTPUT_STATS,
    PREFILL_TOKENS_PER_STEP,
    LengthStats,
    RWTEstimator,
)
from qlm.core.perf import PerfProfile, ProfileBook
from qlm.core.pulls import kv_reservation
from qlm.core.types import SLO, GroupKey, Request, RequestGroup, SLOClass, WorkerView
from qlm.sim.batching import admit_prefix, prefill_step_s


@dataclass
class _Seq:
    remaining: int
    context: int
    reservation: int


def replay(book: ProfileBook, gpu: str, order: Sequence[RequestGroup],
           true_lengths: dict[str, int], first_model: str) -> dict[str, float]:
    """First-token time of every request when one worker serves ``order`` from t = 0."""
    queue = [r for g in order for r in g.requests]
    head, now, active = 0, 0.0, first_model
    running: list[_Seq] = []
    started: dict[str, float] = {}
    while head < len(queue) or running:
        profile = book.get(active, gpu)
        if head < len(queue) and queue[head].model != active and not running:
            nxt = book.get(queue[head].model, gpu)
            now += profile.sleep_s + nxt.wake_s
            active, profile = queue[head].model, nxt
        admitted = _admit(profile, queue, head, running, active)
        if admitted:  # one prefill-first step; it emits every admitted request's first token
            now += prefill_step_s(profile, sum(r.prompt_tokens for r in admitted))
            for r in admitted:
                started[r.id] = now
                length = min(true_lengths[r.id], r.max_tokens)
                running.append(_Seq(length - 1, r.prompt_tokens + 1, kv_reservation(r)))
            head += len(admitted)
        running = [s for s in running if s.remaining > 0]
        if not running:
            continue
        now += profile.decode_step_s(len(running), sum(s.context for s in running))
        for s in running:
            s.remaining -= 1
            s.context += 1
    return started


def _admit(profile: PerfProfile, queue: Sequence[Request], head: int, running: list[_Seq],
           active: str) -> list[Request]:
    same_model = itertools.takewhile(lambda r: r.model == active, queue[head:])
    candidates = list(same_model)
    count = admit_prefix(
        ((kv_reservation(r), r.prompt_tokens) for r in candidates),
        profile.max_batch_size - len(running),
        profile.kv_capacity_tokens - sum(s.reservation for s in running),
        PREFILL_TOKENS_PER_STEP,
    )
    return candidates[:count]


def scenario(rng: np.random.Generator, models: Sequence[str], num_groups: int,
             stats: LengthStats) -> tuple[list[RequestGroup], dict[str, int]]:
    groups, lengths = [], {}
    mu, s = stats.lognormal
    for w in range(num_groups):
        model = models[w % len(models)] if len(models) > 1 and rng.random() < 0.5 else models[0]
        n = int(rng.integers(1, 200))
        requests = []
        for i in range(n):
            rid = f"{w}-{i}"
            prompt = int(np.clip(rng.lognormal(6.5, 0.8), 8, 4000))
            requests.append(Request(rid, model, prompt, 1024, SLOClass.BATCH_1, SLO(60.0), 0.0))
            lengths[rid] = max(1, int(rng.lognormal(mu, s)))
        groups.append(RequestGroup(GroupKey(model, SLOClass.BATCH_1, w), tuple(requests)))
    return groups, lengths


def r_squared(predicted: np.ndarray, realised: np.ndarray) -> float:
    residual = float(((realised - predicted) ** 2).sum())
    total = float(((realised - realised.mean()) ** 2).sum())
    return 1.0 - residual / total


def check(book: ProfileBook, gpu: str, models: Sequence[str], seed: int, num_groups: int
          ) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    groups, lengths = scenario(rng, models, num_groups, DEFAULT_OUTPUT_STATS)
    profile = book.get(models[0], gpu)
    worker = WorkerView("w", gpu, tuple(models), models[0], profile.kv_capacity_tokens,
                        profile.max_batch_size)
    waits = RWTEstimator(book).queue_waits(worker, groups, 0.0)
    started = replay(book, gpu, groups, lengths, models[0])
    predicted, realised = [], []
    for g, w in zip(groups, waits, strict=True):
        for j, r in enumerate(g.requests):
            fraction = j / (g.size - 1) if g.size > 1 else 0.0
            predicted.append(w.at_fraction(fraction).mean_s)
            realised.append(started[r.id])
    p, y = np.array(predicted), np.array(realised)
    return r_squared(p, y), float((p - y).mean()), float(np.abs(p - y).mean())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--gpu", default="A100-80GB")
    parser.add_argument("--groups", type=int, default=30)
    args = parser.parse_args(argv)
    book = ProfileBook.load()
    print("| queue | seed | R² | mean error s | mean abs error s |")
    print("|---|---|---|---|---|")
    for models in (("mistral-7b",), ("vicuna-13b",), ("mistral-7b", "vicuna-13b")):
        for seed in range(args.seeds):
            r2, bias, mae = check(book, args.gpu, models, seed, args.groups)
            print(f"| {'+'.join(models)} on {args.gpu} | {seed} | {r2:.4f} | {bias:+.2f} "
                  f"| {mae:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
