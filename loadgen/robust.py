"""Every policy on every workload × trace × loaded rate × seed: is the default qlm policy
at least as good as every baseline everywhere?

    python -m loadgen.robust run --cells WA:none:320,WA:conv:40 [--seeds 0,1,2,3,4]
        [--policies qlm,fcfs,...] [--num-requests N] [--rerun qlm] [--budget-s S]
        [--out docs/results/robust]
    python -m loadgen.robust table [--out docs/results/robust]

A *cell* is ``WORKLOAD:TRACE:RATE`` (``all``: :func:`grid`; ``TRACE``: ``none`` for the
workload's synthetic lengths and Poisson arrivals, or one of :data:`TRACES`, the traces
shipped in ``loadgen/traces/``: arrivals and lengths from the trace, see
:func:`qlm.workloads.plan_requests`). Each (cell, seed, policy) is one simulation (as
:func:`loadgen.sim.run_one` runs it, less the wait predictor: the ``mini`` cluster,
chunked engine model, the policy's default options), written at once to
``OUT/runs/<cell>_n<N>_s<seed>_<policy>.json``, so a sweep that stops can be resumed: a
run whose file exists is skipped unless its policy is named in ``--rerun`` (the policy
under change; the baselines do not change with it). ``--budget-s`` stops starting new
runs after that many seconds, ``--run-timeout-s`` gives up a run that takes longer;
``--jobs`` runs that many simulations in parallel processes; ``--only-loaded`` runs a
cell and seed only where fcfs's run of it (made before) fell below 0.7 attainment (the
loaded rates).

``table`` reads every run file and writes ``OUT/summary.json`` and ``OUT/summary.md``:
per cell and policy, the mean and spread (min–max) over the seeds that ran of SLO
attainment, per-class attainment, throughput (req/s and tok/s) and evictions; per cell,
whether qlm's mean is ≥ every baseline's (and by how much it trails where not), the
seeds each policy ran, and for WB the ratios qlm ÷ edf (attainment), qlm ÷ static and
qlm ÷ fcfs (throughput).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loadgen.results import write_json
from loadgen.sim import NUM_REQUESTS, RATES, Task
from qlm.core.errors import InvalidInput
from qlm.core.perf import ProfileBook
from qlm.core.policies import make_policy, policy_names
from qlm.sim import SimConfig, simulate
from qlm.workloads import WORKLOADS

TRACE_DIR = Path(__file__).resolve().parent / "traces"
TRACES: Mapping[str, str] = {
    "conv": "azure_llm_2023_conv.csv",
    "code": "azure_llm_2023_code.csv",
    "mooncake": "mooncake_conversation_trace.jsonl.gz",
}
BASELINES = ("fcfs", "edf", "shepherd", "priority", "static", "vllm-swap")
DEFAULT_POLICIES = ("qlm", *BASELINES)
DEFAULT_OUT = Path("docs/results/robust")
#: A cell is loaded where fcfs's attainment is below this.
LOADED_BELOW = 0.7
#: Keys of one run's JSON (``OUT/runs/*.json``) and of ``OUT/summary.json``.
RESULT_KEYS = frozenset({
    "workload", "trace", "rate", "seed", "policy", "num_requests", "slo_attainment",
    "slo_attainment_by_class", "throughput_rps", "throughput_tok_s", "evictions",
    "evicted_requests", "swaps", "num_rejected", "makespan_s", "decision_ms_p99", "wall_s",
    "command", "cells"})


def parse_cell(text: str) -> tuple[str, str, float]:
    parts = text.split(":")
    if len(parts) != 3:
        raise InvalidInput("cells", f"{text!r}: expected WORKLOAD:TRACE:RATE")
    workload, trace, rate_text = parts
    if workload not in WORKLOADS:
        raise InvalidInput("cells", f"{text!r}: unknown workload {workload!r}")
    if trace != "none" and trace not in TRACES:
        raise InvalidInput("cells", f"{text!r}: unknown trace {trace!r} "
                                    f"(none, {', '.join(TRACES)})")
    try:
        rate = float(rate_text)
    except ValueError:
        raise InvalidInput("cells", f"{text!r}: rate is not a number") from None
    if not rate > 0:
        raise InvalidInput("cells", f"{text!r}: rate must be > 0")
    return workload, trace, rate


def grid() -> list[tuple[str, str, float]]:
    """Every workload × trace (synthetic first, Mooncake's long prompts last) × the
    workload's rate sweep (:data:`loadgen.sim.RATES`)."""
    return [(w, t, float(r)) for t in ("none", *TRACES) for w in WORKLOADS for r in RATES[w]]


def cell_name(workload: str, trace: str, rate: float) -> str:
    return f"{workload}_{trace}_{rate:g}"


def run_path(out: Path, cell: str, num_requests: int, seed: int, policy: str) -> Path:
    return out / "runs" / f"{cell}_n{num_requests}_s{seed}_{policy}.json"


class RunTimeout(Exception):
    """A run took longer than ``--run-timeout-s``."""


def _alarm(signum: int, frame: Any) -> None:
    raise RunTimeout


def run_cell_within(timeout_s: float, *item: Any) -> dict[str, Any] | None:
    """:func:`run_cell`, or None if it takes longer than ``timeout_s`` (0: no limit)."""
    if timeout_s <= 0:
        return run_cell(*item)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return run_cell(*item)
    except RunTimeout:
        return None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_cell(workload: str, trace: str, rate: float, seed: int, policy: str,
             num_requests: int) -> dict[str, Any]:
    trace_path = TRACE_DIR / TRACES[trace] if trace != "none" else None
    task = Task(workload, policy, rate, seed, num_requests, "mini", trace_path, None,
                config=SimConfig())
    # as loadgen.sim.run_one, without the wait predictor (its R² is not reported here,
    # and predicting every request's wait takes about as long as the policy's decisions)
    started = time.perf_counter()
    result = simulate(task.jobs(), task.workers(), ProfileBook.load(),
                      make_policy(policy), task.config, seed=seed, timer=time.perf_counter)
    wall_s = time.perf_counter() - started
    m = result.metrics
    return {
        "workload": workload, "trace": trace, "rate": rate, "seed": seed, "policy": policy,
        "num_requests": num_requests,
        "slo_attainment": round(m.slo_attainment, 6),
        "slo_attainment_by_class": {k: round(v, 6) for k, v in m.slo_attainment_by_class.items()},
        "throughput_rps": round(m.throughput_rps, 4),
        "throughput_tok_s": round(m.throughput_tok_s, 2),
        "evictions": m.evictions,
        "evicted_requests": sum(1 for r in result.records if r.num_evictions),
        "swaps": m.swaps,
        "num_rejected": m.num_rejected,
        "makespan_s": round(m.makespan_s, 2),
        "decision_ms_p99": round(m.decision_ms_p99, 3),
        "wall_s": round(wall_s, 2),
    }


def _loaded(fcfs_run: Path) -> bool:
    """Whether fcfs's run of this cell and seed exists and fell below 0.7 attainment."""
    if not fcfs_run.exists():
        return False
    return bool(json.loads(fcfs_run.read_text())["slo_attainment"] < LOADED_BELOW)


def cmd_run(args: argparse.Namespace) -> int:
    cells = grid() if args.cells == "all" else [
        parse_cell(c) for c in args.cells.split(",") if c.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in policy_names()]
    if unknown:
        raise InvalidInput("policies", f"not registered: {', '.join(unknown)}")
    if args.jobs < 1:
        raise InvalidInput("jobs", "must be >= 1")
    rerun = {p.strip() for p in args.rerun.split(",") if p.strip()}
    command = "python -m loadgen.robust " + " ".join(sys.argv[1:])
    todo = []
    for seed in seeds:  # seed-major: a sweep cut short has every cell at its first seeds
        for workload, trace, rate in cells:
            n = args.num_requests or NUM_REQUESTS[workload]
            cell = cell_name(workload, trace, rate)
            if args.only_loaded and not _loaded(run_path(args.out, cell, n, seed, "fcfs")):
                continue
            for policy in policies:
                path = run_path(args.out, cell, n, seed, policy)
                if not path.exists() or policy in rerun:
                    todo.append((workload, trace, rate, seed, policy, n))
    deadline = time.perf_counter() + args.budget_s if args.budget_s else None

    def save(record: dict[str, Any] | None) -> None:
        if record is None:
            print(f"a run took longer than {args.run_timeout_s:g} s: not recorded", flush=True)
            return
        record["command"] = command
        cell = cell_name(record["workload"], record["trace"], record["rate"])
        path = run_path(args.out, cell, record["num_requests"], record["seed"], record["policy"])
        write_json(path, record, RESULT_KEYS, indent=1)
        print(f"{cell} n={record['num_requests']} seed {record['seed']} "
              f"{record['policy']:<9} SLO {record['slo_attainment']:.3f} "
              f"({record['wall_s']:.0f} s)", flush=True)

    if args.jobs == 1:
        for item in todo:
            if deadline is not None and time.perf_counter() > deadline:
                print(f"budget of {args.budget_s:g} s spent: stopping", flush=True)
                return 0
            save(run_cell_within(args.run_timeout_s, *item))
        return 0
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        pending: set[Future[dict[str, Any] | None]] = set()
        queue = list(reversed(todo))
        while queue or pending:
            while queue and len(pending) < args.jobs and (
                    deadline is None or time.perf_counter() < deadline):
                pending.add(pool.submit(run_cell_within, args.run_timeout_s, *queue.pop()))
            if not pending:
                print(f"budget of {args.budget_s:g} s spent: stopping", flush=True)
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                save(future.result())
    return 0


def _stats(values: Sequence[float]) -> dict[str, float]:
    xs = np.asarray(values, dtype=float)
    return {"mean": round(float(xs.mean()), 4), "min": round(float(xs.min()), 4),
            "max": round(float(xs.max()), 4)}


def summarise(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per cell (workload, trace, rate, requests): per policy, statistics over the seeds
    that every policy of the cell ran (so that means compare like with like)."""
    cells: dict[str, dict[str, dict[int, Mapping[str, Any]]]] = {}
    for r in records:
        key = f"{cell_name(r['workload'], r['trace'], r['rate'])}_n{r['num_requests']}"
        cells.setdefault(key, {}).setdefault(r["policy"], {})[r["seed"]] = r
    out: dict[str, Any] = {}
    for key in sorted(cells):
        by_policy = cells[key]
        common = sorted(set.intersection(*(set(s) for s in by_policy.values())))
        if not common:
            continue
        first = next(iter(by_policy.values()))[common[0]]
        entry: dict[str, Any] = {
            "workload": first["workload"], "trace": first["trace"], "rate": first["rate"],
            "num_requests": first["num_requests"], "seeds": common, "policies": {}}
        for policy, runs in sorted(by_policy.items()):
            rs = [runs[s] for s in common]
            classes = sorted({c for r in rs for c in r["slo_attainment_by_class"]})
            entry["policies"][policy] = {
                "slo_attainment": _stats([r["slo_attainment"] for r in rs]),
                "slo_attainment_by_class": {
                    c: _stats([r["slo_attainment_by_class"].get(c, float("nan")) for r in rs])
                    for c in classes},
                "throughput_rps": _stats([r["throughput_rps"] for r in rs]),
                "throughput_tok_s": _stats([r["throughput_tok_s"] for r in rs]),
                "evictions": _stats([r["evictions"] for r in rs]),
                "evicted_requests": _stats([r.get("evicted_requests", 0) for r in rs]),
            }
        pol = entry["policies"]
        if "qlm" in pol:
            qlm = pol["qlm"]["slo_attainment"]["mean"]
            base = {p: v["slo_attainment"]["mean"] for p, v in pol.items() if p != "qlm"}
            if base:
                best = max(base, key=lambda p: base[p])
                entry["best_baseline"] = best
                entry["qlm_minus_best_baseline"] = round(qlm - base[best], 4)
                entry["qlm_at_least_every_baseline"] = qlm >= base[best] - 1e-9
            if "fcfs" in pol:
                entry["loaded"] = pol["fcfs"]["slo_attainment"]["mean"] < LOADED_BELOW
            ratios = {}
            if "edf" in pol and pol["edf"]["slo_attainment"]["mean"] > 0:
                ratios["attainment_qlm_over_edf"] = round(
                    qlm / pol["edf"]["slo_attainment"]["mean"], 4)
            for b in ("static", "fcfs"):
                if b in pol and pol[b]["throughput_rps"]["mean"] > 0:
                    ratios[f"throughput_qlm_over_{b}"] = round(
                        pol["qlm"]["throughput_rps"]["mean"] / pol[b]["throughput_rps"]["mean"], 4)
            entry["ratios"] = ratios
        out[key] = entry
    return out


def markdown(summary: Mapping[str, Any]) -> str:
    lines = ["| cell | seeds | loaded | qlm | best baseline | qlm − best | per class (qlm) | "
             "evictions (qlm) | ratios |", "|---|---|---|---|---|---|---|---|---|"]
    for key, e in summary.items():
        pol = e["policies"]
        if "qlm" not in pol:
            continue
        q = pol["qlm"]
        best = e.get("best_baseline")
        b = pol[best]["slo_attainment"] if best else None

        def s(x: Mapping[str, float]) -> str:
            return f"{x['mean']:.3f} ({x['min']:.3f}–{x['max']:.3f})"

        classes = ", ".join(f"{c} {v['mean']:.3f}"
                            for c, v in q["slo_attainment_by_class"].items())
        ratios = ", ".join(f"{k.replace('_qlm_over_', ' ÷')} {v:.2f}"
                           for k, v in e.get("ratios", {}).items())
        lines.append(
            f"| {key} | {','.join(map(str, e['seeds']))} | {'yes' if e.get('loaded') else 'no'} "
            f"| {s(q['slo_attainment'])} | {best} {s(b) if b else '—'} "
            f"| {e.get('qlm_minus_best_baseline', 0):+.3f} | {classes} "
            f"| {q['evictions']['mean']:.0f} | {ratios} |")
    lines.append("")
    lines.append("Every policy, mean over the seeds (attainment):")
    lines.append("")
    names = sorted({p for e in summary.values() for p in e["policies"]},
                   key=lambda p: (p != "qlm", p))
    lines.append("| cell | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for key, e in summary.items():
        row = [f"{e['policies'][p]['slo_attainment']['mean']:.3f}" if p in e["policies"] else "—"
               for p in names]
        lines.append(f"| {key} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def cmd_table(args: argparse.Namespace) -> int:
    records = [json.loads(p.read_text()) for p in sorted((args.out / "runs").glob("*.json"))]
    summary = summarise(records)
    write_json(args.out / "summary.json",
               {"command": "python -m loadgen.robust " + " ".join(sys.argv[1:]),
                "cells": summary}, RESULT_KEYS, indent=1)
    (args.out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadgen.robust",
                                description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the cells (resumable)")
    r.add_argument("--cells", required=True,
                   help="WORKLOAD:TRACE:RATE,... or 'all' (every workload × trace × rate)")
    r.add_argument("--seeds", default="0")
    r.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    r.add_argument("--num-requests", type=int, help="default: the workload's (loadgen.sim)")
    r.add_argument("--rerun", default="", help="policies whose existing runs are redone")
    r.add_argument("--budget-s", type=float, default=0.0,
                   help="start no run after this many seconds (0: no limit)")
    r.add_argument("--jobs", type=int, default=1, help="simulations in parallel processes")
    r.add_argument("--run-timeout-s", type=float, default=0.0,
                   help="give up a run after this many seconds (0: no limit)")
    r.add_argument("--only-loaded", action="store_true",
                   help="only cells and seeds whose fcfs run (done before) is below 0.7")
    r.add_argument("--out", type=Path, default=DEFAULT_OUT)
    t = sub.add_parser("table", help="summarise the runs")
    t.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    try:
        return cmd_run(args) if args.command == "run" else cmd_table(args)
    except (InvalidInput, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
