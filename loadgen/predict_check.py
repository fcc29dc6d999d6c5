"""How far a user can trust the predicted wait: R² of predicted vs realised wait in the
simulator, per workload, request source (synthetic or a shipped trace), policy and rate.

    python -m loadgen.predict_check [--workloads WA,WB,WC] [--traces synthetic,conv,code]
        [--policies qlm,fcfs] [--num-requests 1500] [--seed 0] [--jobs 2]
        --out docs/results/predict/after.json

Each run is :func:`loadgen.sim.run_one` (the simulator with the RWT estimator's
forecasts, :func:`loadgen.plan.estimator_forecaster`) at the workload's two ``--quick``
rates. Per run it reports, over requests that got a first token:

* ``r2_last``: the **last prediction made before the request started** (the one a user
  reading GetRequest just before the start saw), as a wait from arrival
  (``predicted_first_token_at − arrival``) against the realised wait from arrival
  (``first_token_at − arrival``). When the simulator records only one prediction per
  request (the code before predictions were refreshed), that one is the last.
* ``r2_first``: the first prediction after arrival, the same way (the prediction made at
  admission, as ``make demo`` measured before).
* ``r2_from_prediction``: the last prediction, with both waits counted from the moment it
  was made (how well it forecast the time still to go).
* ``mae_s``: mean absolute error of ``r2_last``'s pairs (seconds);
* ``errors``: where the squared error of ``r2_last`` lies, by what the records show of
  each request's start on its worker (first matching case): ``later_arrivals`` (a
  request that arrived after its last prediction started on its worker before its first
  token, so it shared its prefill steps or went ahead of it: no prediction made before
  that arrival could know it), ``behind_prefill`` (when its last prediction was made,
  or at its start, another request there was prefilling), ``co_admitted`` (started at
  the same instant as another), ``alone``; for each the requests, their share of the
  squared error and the mean error (predicted − realised, seconds).

Writes one JSON (``--out``) with every run and the command that made it.
``--compare BEFORE AFTER`` prints the markdown table of two such files side by side
(``docs/results/README.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loadgen.results import write_json
from loadgen.sim import QUICK_RATES, Task
from qlm.sim.cluster import SimConfig
from qlm.sim.metrics import RequestRecord

#: The top-level keys of the JSON this writes (loadgen.results).
RESULT_KEYS = frozenset({"runs", "num_requests", "seed", "wall_s", "command"})

REPO_ROOT = Path(__file__).resolve().parent.parent
TRACES = {
    "synthetic": None,
    "conv": REPO_ROOT / "loadgen" / "traces" / "azure_llm_2023_conv.csv",
    "code": REPO_ROOT / "loadgen" / "traces" / "azure_llm_2023_code.csv",
    "mooncake": REPO_ROOT / "loadgen" / "traces" / "mooncake_conversation_trace.jsonl.gz",
}


def _r2(pred: np.ndarray, real: np.ndarray) -> float | None:
    if real.size < 2:
        return None
    ss_tot = float(np.sum((real - real.mean()) ** 2))
    if ss_tot <= 0:
        return None
    return round(1.0 - float(np.sum((real - pred) ** 2)) / ss_tot, 4)


def _last(r: RequestRecord) -> tuple[float | None, float | None]:
    at = getattr(r, "last_predicted_at", None)
    if at is None:
        return r.predicted_at, r.predicted_first_token_at
    return at, getattr(r, "last_predicted_first_token_at", None)


def accuracy(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """The figures of the module docstring over one run's records."""
    first, last, remaining = [], [], []
    for r in records:
        if r.first_token_at is None or r.predicted_first_token_at is None:
            continue
        first.append((r.predicted_first_token_at - r.arrival_at, r.first_token_at - r.arrival_at))
        at, predicted = _last(r)
        if at is None or predicted is None:
            continue
        last.append((predicted - r.arrival_at, r.first_token_at - r.arrival_at))
        remaining.append((predicted - at, r.first_token_at - at))
    f, la, re = (np.array(x, dtype=float).reshape(-1, 2) for x in (first, last, remaining))
    return {
        "n": int(la.shape[0]),
        "r2_last": _r2(la[:, 0], la[:, 1]),
        "r2_first": _r2(f[:, 0], f[:, 1]),
        "r2_from_prediction": _r2(re[:, 0], re[:, 1]),
        "mae_s": round(float(np.mean(np.abs(la[:, 0] - la[:, 1]))), 3) if la.size else None,
        "realised_wait_mean_s": round(float(la[:, 1].mean()), 3) if la.size else None,
        "errors": error_cases(records),
    }


#: The cases of ``errors``, in the order they are matched.
ERROR_CASES = ("later_arrivals", "behind_prefill", "co_admitted", "alone")


def error_cases(records: Sequence[RequestRecord]) -> dict[str, dict[str, float]]:
    """``errors`` of the module docstring: the last prediction's squared error by case."""
    rows = [r for r in records if r.first_token_at is not None and r.started_at is not None
            and _last(r)[1] is not None]
    case = np.full(len(rows), len(ERROR_CASES) - 1)
    by_worker: dict[str | None, list[int]] = {}
    for i, r in enumerate(rows):
        by_worker.setdefault(r.worker_id, []).append(i)
    for members in by_worker.values():
        start = np.array([rows[i].started_at for i in members], dtype=float)
        first = np.array([rows[i].first_token_at for i in members], dtype=float)
        arrival = np.array([rows[i].arrival_at for i in members], dtype=float)
        told = np.array([_last(rows[i])[0] for i in members], dtype=float)
        other = ~np.eye(len(members), dtype=bool)
        matches = (
            other & (arrival[None, :] > told[:, None]) & (start[None, :] < first[:, None]),
            other & (((start[None, :] <= told[:, None]) & (first[None, :] > told[:, None]))
                     | ((start[None, :] < start[:, None]) & (first[None, :] > start[:, None]))),
            other & (start[None, :] == start[:, None]),
        )
        mine = np.full(len(members), len(ERROR_CASES) - 1)
        for index in reversed(range(len(matches))):
            mine = np.where(matches[index].any(axis=1), index, mine)
        case[members] = mine
    error = np.array([float(_last(r)[1] or 0.0) - float(r.first_token_at or 0.0) for r in rows])
    squared = error * error
    total = float(squared.sum()) or 1.0
    return {name: {"n": int((case == k).sum()),
                   "sse_share": round(float(squared[case == k].sum()) / total, 4),
                   "mean_error_s": round(float(error[case == k].mean()), 4)
                   if (case == k).any() else 0.0}
            for k, name in enumerate(ERROR_CASES)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadgen.predict_check",
                                description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default="WA,WB,WC")
    p.add_argument("--traces", default="synthetic,conv,code",
                   help=f"comma-separated, of {', '.join(TRACES)}")
    p.add_argument("--policies", default="qlm,fcfs")
    p.add_argument("--rates", help="comma-separated req/s for every workload "
                                   "(default: each workload's --quick rates)")
    p.add_argument("--num-requests", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def compare(before_path: Path, after_path: Path) -> str:
    """A markdown table: R² of the last prediction (and of the first) before and after."""
    def index(path: Path) -> dict[tuple[str, str, str, float], dict[str, Any]]:
        return {(r["workload"], r["trace"], r["policy"], r["rate"]): r
                for r in json.loads(path.read_text())["runs"]}

    before, after = index(before_path), index(after_path)
    lines = ["| workload | trace | policy | rate | n | R² before | R² after | R² first after "
             "| MAE s before | MAE s after |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, a in after.items():
        b = before.get(key, {})
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]:g} | {a['n']} "
                     f"| {b.get('r2_last')} | **{a['r2_last']}** | {a['r2_first']} "
                     f"| {b.get('mae_s')} | {a['mae_s']} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from loadgen.sim import run_all

    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--compare":
        if len(argv) != 3:
            print("error: --compare needs BEFORE AFTER", file=sys.stderr)
            return 2
        print(compare(Path(argv[1]), Path(argv[2])), end="")
        return 0
    args = parse_args(argv)
    names = [t.strip() for t in args.traces.split(",") if t.strip()]
    unknown = [t for t in names if t not in TRACES]
    if unknown:
        print(f"error: traces: unknown {', '.join(unknown)} (known: {', '.join(TRACES)})",
              file=sys.stderr)
        return 2
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    tasks, labels = [], []
    for workload in workloads:
        rates = ([float(x) for x in args.rates.split(",")] if args.rates
                 else list(QUICK_RATES[workload]))
        for trace in names:
            for rate in rates:
                for policy in policies:
                    tasks.append(Task(workload, policy, rate, args.seed, args.num_requests,
                                      "mini", TRACES[trace], None, config=SimConfig()))
                    labels.append((workload, trace))
    started = time.perf_counter()

    def progress(run: Any) -> None:
        print(f"  {run.policy} rate={run.rate:g} r2={accuracy(run.result.records)['r2_last']} "
              f"({run.wall_s:.1f}s)", file=sys.stderr, flush=True)

    runs = run_all(tasks, args.jobs, on_run=progress)
    rows = []
    for (workload, trace), task, run in zip(labels, tasks, runs, strict=True):
        rows.append({"workload": workload, "trace": trace, "policy": task.policy,
                     "rate": task.rate,
                     "slo_attainment": round(run.result.metrics.slo_attainment, 4),
                     **accuracy(run.result.records)})
    out = {
        "runs": rows,
        "num_requests": args.num_requests,
        "seed": args.seed,
        "wall_s": round(time.perf_counter() - started, 1),
        "command": "python -m loadgen.predict_check " + " ".join(argv),
    }
    write_json(args.out, out, RESULT_KEYS, indent=1)
    print(f"{'workload':<8} {'trace':<10} {'policy':<6} {'rate':>6} {'n':>5} "
          f"{'R² last':>8} {'R² first':>8} {'R² rem':>8} {'MAE s':>8}")
    for r in rows:
        print(f"{r['workload']:<8} {r['trace']:<10} {r['policy']:<6} {r['rate']:>6g} {r['n']:>5} "
              f"{r['r2_last']!s:>8} {r['r2_first']!s:>8} {r['r2_from_prediction']!s:>8} "
              f"{r['mae_s']!s:>8}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
