"""Experiment runner: every policy on the same requests, over a sweep of rates.

    python -m loadgen.sim --workload {WA,WB,WC} [--trace FILE [--trace-format F]]
        [--policies qlm,fcfs,...]
        [--rates r1,r2,...] [--seed N] [--quick] [--cluster mini|small|paper]
        [--workers-file F] [--models m1,m2] [--num-requests N] [--tenants a:1,b:10]
        [--tpot-slo-s S] --out DIR

``--workers-file`` takes the cluster from a workers file (``docker/workers.*.yaml``, first
model awake) instead of ``--cluster``; ``--models`` (with ``--trace``) builds the requests
as ``make demo`` does (:func:`loadgen.plan.build_plan`: the workload's class mix drawn
first, then the models in equal shares, prompts cut to the model's length limit,
``max_tokens`` = the trace's output), so that the simulator runs exactly the demo's
requests on the demo's workers.

Writes ``DIR/summary.json`` (schema below), ``DIR/records.csv.gz`` (one row per
request, policy and rate: arrival, start, first token, finish, worker, predicted
first token) and ``DIR/attainment.png`` (SLO attainment vs rate, overall and per
class); prints a table. ``summary.json``::

    {"workload": str, "rates": [..], "policies": {name: {
        "slo_attainment": [per rate], "slo_attainment_by_class": {cls: [..]},
        "throughput_rps": [..], "throughput_tok_s": [..], "ttft_p99_s": [..],
        "gpu_util": [..], "swaps": [..], "evictions": [..], "decision_ms_p99": [..],
        "slo_attainment_by_tenant": {tenant: [..]} (with --tenants),
        ... extra per-rate lists: ttft_p50_s, tpot_p50_s, tpot_p99_s, decision_ms_p50,
        num_decisions, invalid_actions, num_refused, num_refused_by_class {cls: [..]},
        wait_r2, wall_s}},
     "cluster": .., "workers": [..], "num_requests": .., "seed": .., "quick": .., "command": ..}

``--tpot-slo-s S`` gives interactive requests a TPOT target of S seconds per output token
(the workload variant with TPOT targets); each entry then also has ``tpot_attainment``
(over the requests with a target: finished with mean time per output token after the
first ≤ S) and ``combined_attainment`` (TTFT and TPOT both met; TTFT alone for requests
without a target), overall and per class (``*_by_class``).

``num_refused`` counts the requests refused at admission because they fit no worker of
the cluster (prompt + ``max_tokens`` beyond every ``max_model_len`` / KV cache of the
workers able to serve the model: :mod:`qlm.core.fit`, the services' check); they are
not SLO misses, and ``slo_attainment`` is over the other requests.

``wait_r2`` is the R² of the last predicted wait a request had before its first token
against the realised one, both from arrival (:func:`qlm.sim.metrics.wait_prediction_r2`):
the forecasts the scheduler service makes, refreshed at every decision from the virtual
queues it wrote (:class:`qlm.core.forecast.Forecaster`, learning output lengths from
finished requests).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadgen.plan import build_plan, estimator_forecaster, sim_workers
from loadgen.report import markdown_table, policy_entry, print_table
from loadgen.results import write_json
from qlm.core.errors import InvalidInput
from qlm.core.perf import ProfileBook
from qlm.core.policies import make_policy, policy_names
from qlm.core.policies.base import options_from_json
from qlm.sim import RunResult, SimConfig, simulate
from qlm.sim.batching import PREFILL_MODES
from qlm.sim.cluster import Job, WorkerSpec
from qlm.sim.metrics import wait_prediction_r2
from qlm.traces import TRACE_FORMATS, check_format, load_trace
from qlm.workloads import (
    CLUSTERS,
    WB_CLUSTERS,
    WORKLOADS,
    cluster_for,
    only_tenants,
    parse_tenants,
    plan_requests,
    with_tenants,
)

DEFAULT_POLICIES = ("qlm", "fcfs", "edf", "shepherd", "priority")
#: The top-level keys of ``summary.json`` (loadgen.results; each policy's entry has
#: loadgen.report.ENTRY_KEYS).
RESULT_KEYS = frozenset({
    "workload", "rates", "policies", "cluster", "models", "workers", "num_requests", "seed",
    "prefill_mode", "tpot_slo_s", "policy_options", "tenants", "quick", "trace",
    "trace_format", "wall_s",
    "command",
})
#: Rate sweeps (req/s) on the ``mini`` cluster, chosen so that fcfs goes from ~1.0
#: attainment to well below 0.7; other clusters scale them by their GPU count.
RATES: Mapping[str, tuple[float, ...]] = {
    "WA": (20, 40, 80, 160, 320, 640),
    "WB": (2.5, 5, 10, 20, 40, 80),
    "WC": (2, 4, 6, 8, 12, 16),
}
#: --quick: one light and one heavy rate of each sweep.
QUICK_RATES: Mapping[str, tuple[float, ...]] = {
    "WA": (40, 320),
    "WB": (5, 40),
    "WC": (3, 8),
}
#: Requests per run on the ``mini`` cluster. 3,500 is the paper's trace length; WA
#: needs twice that on 3 GPUs: even all at once, 3,500 ShareGPT-like requests drain
#: in about two minutes there, which caps every wait near the 60 s SLO.
NUM_REQUESTS: Mapping[str, int] = {"WA": 7000, "WB": 3500, "WC": 3500}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadgen.sim", description=__doc__.split("\n")[0])
    p.add_argument("--workload", required=True, choices=WORKLOADS)
    p.add_argument("--trace", type=Path,
                   help="trace file (Azure 2023/2024 or BurstGPT CSV, Mooncake JSONL; .gz too)")
    p.add_argument("--trace-format", choices=("auto", *TRACE_FORMATS), default="auto",
                   help="the trace's format (default: detected from its header / first record)")
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    p.add_argument("--policy-options", default="{}",
                   help="JSON object of options for every policy named, e.g. "
                        "'{\"evict_rate_credit\": 0.5}' (each policy's: docs/scheduler.md)")
    p.add_argument("--rates", help="comma-separated req/s (default: the workload's sweep)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="two rates of the sweep (< 2 min)")
    p.add_argument("--cluster", choices=sorted(CLUSTERS), default="mini")
    p.add_argument("--workers-file", type=Path, help="cluster from a workers YAML instead")
    p.add_argument("--models", help="comma-separated models in equal shares (needs --trace)")
    p.add_argument("--num-requests", type=int)
    p.add_argument("--bursty-cv", type=float, help="gamma arrivals with this CV instead of Poisson")
    p.add_argument("--tenants", help="tenants and their traffic shares, e.g. light:1,heavy:10 "
                                     "(attainment per tenant in the summary)")
    p.add_argument("--jobs", type=int, default=2, help="simulations run in parallel processes")
    p.add_argument("--no-records", action="store_true", help="skip records.csv.gz")
    p.add_argument("--tick-s", type=float, default=SimConfig().tick_s,
                   help="period of the scheduler's tick (virtual s)")
    p.add_argument("--decision-interval-s", type=float, default=SimConfig().min_decision_interval_s,
                   help="decisions closer than this are coalesced (virtual s)")
    p.add_argument("--group-window-s", type=float, default=SimConfig().group_window_s,
                   help="arrival window of a request group (s)")
    p.add_argument("--prefill-mode", choices=PREFILL_MODES, default=SimConfig().prefill_mode,
                   help="engine model: vLLM's chunked prefill or whole prefill first")
    p.add_argument("--tpot-slo-s", type=float,
                   help="TPOT target (s per output token) of the interactive requests: the "
                        "workload variant with TPOT targets (not with --models)")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def parse_rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InvalidInput("rates", f"not a comma-separated list of numbers: {text!r}") from None
    if not rates or any(not r > 0 for r in rates):
        raise InvalidInput("rates", "need at least one rate, each > 0")
    return rates


def check_policies(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    known = policy_names()
    missing = [n for n in names if n not in known]
    if not names:
        raise InvalidInput("policies", "empty")
    if missing:
        raise InvalidInput(
            "policies",
            f"not registered: {', '.join(missing)} (registered: {', '.join(known)})",
        )
    return names


def cluster_scale(workload: str, cluster: str) -> float:
    """GPUs of ``cluster`` over GPUs of ``mini`` for this workload (rates and requests scale)."""
    table = WB_CLUSTERS if workload == "WB" else CLUSTERS
    a10, a100 = table[cluster]
    base_a10, base_a100 = table["mini"]
    return (a10 + a100) / (base_a10 + base_a100)


# ================================================================== runs
@dataclass(frozen=True)
class Run:
    policy: str
    rate: float
    result: RunResult
    wall_s: float
    wait_r2: float


@dataclass(frozen=True)
class Task:
    workload: str
    policy: str
    rate: float
    seed: int
    num_requests: int
    cluster: str
    trace_path: Path | None
    bursty_cv: float | None
    workers_file: Path | None = None
    models: tuple[str, ...] = ()
    config: SimConfig = field(default_factory=SimConfig)
    policy_options: Mapping[str, Any] = field(default_factory=dict)
    trace_format: str | None = None
    #: Tenants and their traffic shares (empty: every request the default tenant's).
    tenants: Mapping[str, float] = field(default_factory=dict)
    #: Run only these tenants' requests (empty: all).
    only_tenants: tuple[str, ...] = ()
    tpot_slo_s: float | None = None

    def workers(self) -> tuple[WorkerSpec, ...]:
        if self.workers_file is not None:
            return sim_workers(self.workers_file)
        return cluster_for(self.workload, self.cluster)

    def jobs(self) -> tuple[Job, ...]:
        """The requests at ``rate`` (rebuilt from the seed: identical in every process)."""
        if self.models:
            if self.trace_path is None:
                raise InvalidInput("models", "needs --trace")
            return build_plan(self.trace_path, self.num_requests, self.rate, self.models,
                              self.seed, trace_format=self.trace_format).jobs
        trace = (load_trace(self.trace_path, self.trace_format, limit=self.num_requests)
                 if self.trace_path else None)
        plan = plan_requests(self.workload, self.num_requests, np.random.default_rng(self.seed),
                             trace=trace, bursty_cv=self.bursty_cv)
        if self.tenants:
            plan = with_tenants(plan, self.tenants, self.seed)
        jobs = plan.jobs_at(self.rate, tpot_slo_s=self.tpot_slo_s)
        return only_tenants(jobs, self.only_tenants) if self.only_tenants else jobs


def run_one(task: Task) -> Run:
    """One simulation. Rebuilds the (seeded, hence identical) requests in this process."""
    profiles = ProfileBook.load()
    jobs = task.jobs()
    started = time.perf_counter()
    result = simulate(
        jobs, task.workers(), profiles,
        make_policy(task.policy, **task.policy_options), task.config, seed=task.seed,
        timer=time.perf_counter,
        forecaster=estimator_forecaster(profiles),
    )
    r2, _ = wait_prediction_r2(result.records)
    return Run(task.policy, task.rate, result, time.perf_counter() - started, r2)


def run_all(tasks: Sequence[Task], jobs: int, on_run: Any = None) -> list[Run]:
    """Run ``tasks`` on ``jobs`` processes (1: in this process); results in task order."""
    if jobs <= 1:
        runs = []
        for task in tasks:
            runs.append(run_one(task))
            if on_run is not None:
                on_run(runs[-1])
        return runs
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_one, task): i for i, task in enumerate(tasks)}
        done: dict[int, Run] = {}
        for future in as_completed(futures):
            done[futures[future]] = future.result()
            if on_run is not None:
                on_run(done[futures[future]])
    return [done[i] for i in range(len(tasks))]


def summary_of(
    workload: str, rates: Sequence[float], policies: Sequence[str], runs: Sequence[Run],
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    by = {(r.policy, r.rate): r for r in runs}
    out: dict[str, Any] = {"workload": workload, "rates": list(rates), "policies": {}}
    for name in policies:
        out["policies"][name] = policy_entry([
            (by[(name, rate)].result.metrics, by[(name, rate)].wait_r2, by[(name, rate)].wall_s)
            for rate in rates
        ])
    out.update(extra)
    return out


def write_records(path: Path, runs: Sequence[Run]) -> None:
    fields = (
        "policy", "rate", "id", "model", "slo_class", "arrival_at", "deadline_at",
        "prompt_tokens", "output_tokens", "started_at", "first_token_at", "finished_at",
        "worker_id", "num_evictions", "rejected", "refused", "predicted_at",
        "predicted_first_token_at", "last_predicted_at", "last_predicted_first_token_at",
        "tenant", "tpot_slo_s",
    )
    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for run in runs:
            for rec in run.result.records:
                d = rec.to_dict()
                w.writerow([run.policy, run.rate, *(d[k] for k in fields[2:])])


def plot(path: Path, summary: Mapping[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = summary["rates"]
    policies = summary["policies"]
    classes = sorted({c for p in policies.values() for c in p["slo_attainment_by_class"]})
    panels = ["overall", *classes]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for k, (name, p) in enumerate(policies.items()):
            ys = p["slo_attainment"] if panel == "overall" else p["slo_attainment_by_class"].get(
                panel, [None] * len(rates)
            )
            # distinct marker and dash per policy: equal curves (e.g. fcfs and priority
            # without interactive traffic) stay visible
            ax.plot(rates, [np.nan if y is None else y for y in ys], label=name,
                    marker="os^Dv*"[k % 6], linestyle=("-", "--", ":", "-.")[k % 4],
                    markersize=7 - k, alpha=0.85)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(rates, [f"{r:g}" for r in rates])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("arrival rate (req/s)")
        ax.set_title(f"{summary['workload']}: {panel}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("SLO attainment")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        policies = check_policies(args.policies)
        policy_options = options_from_json(args.policy_options)
        for name in policies:
            make_policy(name, **policy_options)  # fail early on an unknown option
        scale = cluster_scale(args.workload, args.cluster)
        if args.rates:
            rates = parse_rates(args.rates)
        else:
            base = (QUICK_RATES if args.quick else RATES)[args.workload]
            rates = tuple(round(r * scale, 6) for r in base)
        num_requests = args.num_requests or round(NUM_REQUESTS[args.workload] * scale)
        started = time.perf_counter()

        def progress(run: Run) -> None:
            m = run.result.metrics
            print(f"  {args.workload} rate={run.rate:g} {run.policy:<9} "
                  f"SLO={m.slo_attainment:.3f} ({run.wall_s:.1f}s)", file=sys.stderr, flush=True)

        trace_format = check_format(args.trace_format)
        models = tuple(m.strip() for m in (args.models or "").split(",") if m.strip())
        if models and (args.workload != "WA" or args.trace is None):
            raise InvalidInput("models", "needs --workload WA (the demo's class mix) and --trace")
        if args.tpot_slo_s is not None:
            if not (math.isfinite(args.tpot_slo_s) and args.tpot_slo_s > 0):
                raise InvalidInput("tpot-slo-s", f"must be a finite number > 0, got "
                                                 f"{args.tpot_slo_s}")
            if models:
                raise InvalidInput("tpot-slo-s", "not with --models (the demo's requests)")
        tenants = parse_tenants(args.tenants) if args.tenants else {}
        if tenants and models:
            raise InvalidInput("tenants", "cannot be combined with --models")
        config = SimConfig(tick_s=args.tick_s, group_window_s=args.group_window_s,
                           min_decision_interval_s=args.decision_interval_s,
                           prefill_mode=args.prefill_mode)
        tasks = [
            Task(args.workload, name, rate, args.seed, num_requests, args.cluster,
                 args.trace, args.bursty_cv, args.workers_file, models, config, policy_options,
                 trace_format, tenants, tpot_slo_s=args.tpot_slo_s)
            for rate in rates
            for name in policies
        ]
        workers = tasks[0].workers()  # fail early on a bad workers file
        if args.trace:
            load_trace(args.trace, trace_format, limit=num_requests)  # fail early on a bad trace
        runs = run_all(tasks, args.jobs, on_run=progress)
    except InvalidInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = summary_of(args.workload, rates, policies, runs, {
        "cluster": args.workers_file.name if args.workers_file else args.cluster,
        "models": list(models) or None,
        "workers": [f"{w.id}:{w.gpu}x{w.num_gpus}:{w.active_model}" for w in workers],
        "num_requests": num_requests,
        "seed": args.seed,
        "prefill_mode": args.prefill_mode,
        "tpot_slo_s": args.tpot_slo_s,
        "policy_options": policy_options or None,
        "tenants": tenants or None,
        "quick": args.quick,
        "trace": str(args.trace) if args.trace else None,
        "trace_format": args.trace_format if args.trace else None,
        "wall_s": round(time.perf_counter() - started, 2),
        "command": "python -m loadgen.sim " + " ".join(sys.argv[1:] if argv is None else argv),
    })
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "summary.json", summary, RESULT_KEYS, indent=1)
    (args.out / "summary.md").write_text(markdown_table(summary))
    if not args.no_records:
        write_records(args.out / "records.csv.gz", runs)
    plot(args.out / "attainment.png", summary)
    print_table(summary)
    print(f"wrote {args.out}/summary.json ({summary['wall_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
