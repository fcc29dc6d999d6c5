"""The GPU burst replay (``loadgen.gpu.qlm_vs_fcfs`` / ``loadgen.gpu.stack_replay``) in the
simulator: a proxy to check a policy change against before spending GPU time on it.

    python -m loadgen.sim_burst [--variants qlm,fcfs,qlm+burst] [--seeds 0,1,2]
        [--slowdown 2.0] [--starts 0,400] [--out FILE]

The same 1,000 requests as on the GPU (:func:`loadgen.gpu.qlm_vs_fcfs.build_workload` on
rows 0–399 of the Azure 2023 conversation trace, cut as ``python -m loadgen.gpu.common
--count 400`` cuts them): interactive requests at 3× the trace's speed, every 4th on
qwen2.5-1.5b, the rest on mistral-7b, SLO 2 s; at t = 2.5 s a batch job of 300 requests
per model (batch-1 on mistral-7b, 60 s; batch-2 on qwen2.5-1.5b, 120 s). ``--seeds``
draw the batch job's token counts (the GPU runs used seed 0).

Workers: one H100 holding both models awake, as two workers (one per model) with the
measured H100 profiles and the KV pools the engines reported on the H100 (mistral-7b
152,896 tokens, qwen2.5-1.5b 1,105,200 at ``gpu_memory_utilization=0.42``). Two engines
sharing one GPU run slower than their profiles: the simulated engines' decode steps are
``--slowdown`` times the profile's, while the policy plans with the profiles as measured.
The default 2.0 makes fcfs match the H100 runs: interactive attainment 0.253 and 5,009
output tok/s here against 0.248 and 5,328–5,350 measured (runs 8–10); at 1.12 (the
online correction's factor for mistral-7b) fcfs meets 0.660 and qlm needs no eviction.
Chunked prefill, the harness's decision cadence (tick 0.25 s, at most one decision per
50 ms).

Variants: a policy name (its default options), or ``<policy>+burst`` with the *burst*
options profile of the GPU runs (:data:`BURST_OPTIONS`). Writes one JSON with per-class
attainment, interactive TTFT p50/p99, throughput and evictions per variant and seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from loadgen.gpu.burst_phases import decode_windows
from loadgen.gpu.common import HOST_DEVICE, load_trace_slice
from loadgen.gpu.qlm_vs_fcfs import build_workload
from loadgen.gpu.qlm_vs_fcfs import parse_args as harness_args
from loadgen.results import write_json
from qlm.core.corrections import corrected
from qlm.core.errors import InvalidInput
from qlm.core.perf import ProfileBook
from qlm.core.policies import make_policy
from qlm.core.types import SLOClass
from qlm.sim import SimConfig, simulate
from qlm.sim.cluster import Job, WorkerSpec

TRACE = Path(__file__).resolve().parent / "traces" / "azure_llm_2023_conv.csv"
GPU = "H100-80GB"
#: KV pools the vLLM engines reported on the H100 (docs/results/gpu/README.md, runs 8–10).
KV_TOKENS: Mapping[str, int] = {"mistral-7b": 152_896, "qwen2.5-1.5b": 1_105_200}
#: The *burst* options profile that the GPU runs needed before the defaults covered it.
BURST_OPTIONS: Mapping[str, Any] = {
    "hopeless_p": 0, "displace_below_p": 0, "evict_rate_credit": 0.5,
    "evict_lookahead_groups": 32, "evict_prefill_aware": True, "late_insert_budget": 300}
#: The replay's shape as the GPU harness defines it (models, which interactive requests
#: go to the second, their SLO): the same for every seed.
HARNESS = harness_args([])
#: Keys of the JSON this writes.
RESULT_KEYS = frozenset({"slowdown", "colocation_slowdown", "interactive_only", "seeds",
                         "starts", "kv_tokens", "policy_options", "runs", "command"})


def scenario(seed: int, slowdown: float, start: int = 0,
             kv_tokens: Mapping[str, int] = KV_TOKENS, interactive_only: bool = False
             ) -> tuple[list[Job], list[WorkerSpec], ProfileBook, ProfileBook]:
    """(jobs, workers, engine profiles, planning profiles) of the GPU burst replay on
    rows ``start .. start+399`` of the trace, each model's worker with the KV pool
    ``kv_tokens`` gives it; ``interactive_only`` leaves the batch jobs out (what the
    interactive stream alone asks of the card: a bound for the runs with them)."""
    args = harness_args(["--seed", str(seed)])
    # as `python -m loadgen.gpu.common --start START --count 400` cuts them
    rows = load_trace_slice(TRACE, start, 400, 1.0, 16384)
    workload = build_workload(args, rows)
    models = args.models.split(",")
    base = ProfileBook.load()
    planning = [replace(base.get(m, GPU), kv_capacity_tokens=kv_tokens[m]) for m in models]
    engine = [corrected(p, slowdown) for p in planning]
    jobs = [Job(r, r.max_tokens) for r in workload.requests
            if not interactive_only or r.slo_class is SLOClass.INTERACTIVE]
    workers = [WorkerSpec(f"w-{m}", GPU, m, (m,), device=HOST_DEVICE) for m in models]
    return jobs, workers, ProfileBook.of(engine), ProfileBook.of(planning)


def run_variant(variant: str, seed: int, slowdown: float, start: int = 0,
                kv_tokens: Mapping[str, int] = KV_TOKENS,
                options: Mapping[str, Any] | None = None,
                colocation_slowdown: float = 0.0, interactive_only: bool = False
                ) -> dict[str, Any]:
    """One variant: ``options`` go to every qlm variant, over its profile's."""
    name, _, profile = variant.partition("+")
    if profile not in ("", "burst"):
        raise InvalidInput("variants", f"{variant!r}: the only profile is '+burst'")
    jobs, workers, engine, planning = scenario(seed, slowdown, start, kv_tokens,
                                               interactive_only)
    given = dict(BURST_OPTIONS) if profile else {}
    if name == "qlm":
        given.update(options or {})
    policy = make_policy(name, **given)
    config = SimConfig(tick_s=0.25, min_decision_interval_s=0.05, group_window_s=1.0,
                       colocation_slowdown=colocation_slowdown)
    started = time.perf_counter()
    result = simulate(jobs, workers, engine, policy, config, seed=seed,
                      planning_profiles=planning)
    m = result.metrics
    rows = [[r.id, r.arrival_at, r.first_token_at, r.finished_at, r.output_tokens,
             r.num_evictions] for r in result.records]
    interactive = [r for r in result.records if r.slo_class == "interactive"]
    ttft = [r.first_token_at - r.arrival_at if r.first_token_at is not None else np.inf
            for r in interactive]
    return {
        "variant": variant, "seed": seed, "slice_start": start,
        "slo_attainment": round(m.slo_attainment, 4),
        "slo_attainment_by_class": {k: round(v, 4) for k, v in m.slo_attainment_by_class.items()},
        "interactive_ttft_p50_s": round(float(np.percentile(ttft, 50)), 3),
        "interactive_ttft_p99_s": round(float(np.percentile(ttft, 99)), 3),
        "interactive_ttft_max_s": round(float(max(ttft)), 3),
        "throughput_tok_s": round(m.throughput_tok_s, 1),
        "makespan_s": round(m.makespan_s, 2),
        "evictions": m.evictions,
        "evicted_requests": sum(1 for r in result.records if r.num_evictions),
        # each model's interactive decode pace per 8 s of arrivals, as burst_phases reads
        # the GPU replays
        "interactive_decode": decode_windows(rows, HARNESS.models.split(","),
                                             HARNESS.second_model_every,
                                             HARNESS.interactive_slo_s, 8.0),
        "wall_s": round(time.perf_counter() - started, 2),
    }


def parse_kv_tokens(text: str) -> dict[str, int]:
    """``mistral-7b=120000,...`` → {model: tokens}; InvalidInput naming the bad item."""
    out: dict[str, int] = {}
    for item in (i.strip() for i in text.split(",") if i.strip()):
        model, sep, value = item.partition("=")
        if not sep or model not in KV_TOKENS:
            raise InvalidInput("kv_tokens", f"{item!r}: expected MODEL=TOKENS with MODEL one "
                               f"of {sorted(KV_TOKENS)}")
        if not value.isdecimal() or int(value) <= 0:
            raise InvalidInput("kv_tokens", f"{item!r}: TOKENS must be a positive integer")
        out[model] = int(value)
    return out


def parse_options(text: str) -> dict[str, Any]:
    """``--policy-options``: a JSON object; InvalidInput otherwise."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput("policy_options", f"not JSON: {exc}") from None
    if not isinstance(options, dict):
        raise InvalidInput("policy_options", "must be a JSON object")
    return options


def _ints(field: str, text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InvalidInput(field, f"not a comma-separated list of integers: {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadgen.sim_burst",
                                description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="qlm,qlm+burst,fcfs")
    p.add_argument("--seeds", default="0")
    p.add_argument("--slowdown", type=float, default=2.0,
                   help="simulated decode steps take this times the profile's")
    p.add_argument("--starts", default="0",
                   help="first trace row of each 400-row slice (the GPU runs: 0)")
    p.add_argument("--kv-tokens", default="",
                   help="MODEL=TOKENS,...: a worker's KV pool other than the H100's")
    p.add_argument("--policy-options", default="{}",
                   help="options of every qlm variant (JSON object), over its profile's")
    p.add_argument("--colocation-slowdown", type=float, default=0.0,
                   help="the two engines slow each other: a step takes 1 + this × the "
                        "other's batch share times its (slowed) profile's (SimConfig)")
    p.add_argument("--interactive-only", action="store_true",
                   help="leave the batch jobs out: the interactive stream alone")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    try:
        seeds = _ints("seeds", args.seeds)
        starts = _ints("starts", args.starts)
        kv_tokens = {**KV_TOKENS, **parse_kv_tokens(args.kv_tokens)}
        options = parse_options(args.policy_options)
        if not args.slowdown > 0:
            raise InvalidInput("slowdown", "must be > 0")
        if not args.colocation_slowdown >= 0:
            raise InvalidInput("colocation_slowdown", "must be >= 0")
    except InvalidInput as exc:  # nothing has run
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runs = []
    try:
        for start, seed in ((a, b) for a in starts for b in seeds):
            for variant in (v.strip() for v in args.variants.split(",") if v.strip()):
                run = run_variant(variant, seed, args.slowdown, start, kv_tokens, options,
                                  args.colocation_slowdown, args.interactive_only)
                runs.append(run)
                print(f"rows {start}+400 seed {seed} {variant:<12} interactive "
                      f"{run['slo_attainment_by_class'].get('interactive', 1.0):.3f} "
                      f"(p99 {run['interactive_ttft_p99_s']} s) overall "
                      f"{run['slo_attainment']:.3f} {run['throughput_tok_s']:.0f} tok/s "
                      f"evictions {run['evictions']}", flush=True)
    except (InvalidInput, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = {"slowdown": args.slowdown, "colocation_slowdown": args.colocation_slowdown,
           "interactive_only": args.interactive_only,
           "seeds": seeds, "starts": starts,
           "kv_tokens": kv_tokens, "policy_options": options, "runs": runs,
           "command": "python -m loadgen.sim_burst "
                      + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.out:
        write_json(args.out, out, RESULT_KEYS, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
