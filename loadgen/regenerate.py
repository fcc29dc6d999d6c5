"""Regenerate at HEAD every result in docs/results/ that the CPU can make (``make results``).

    python -m loadgen.regenerate [--quick] [--only NAME,...] [--jobs N] [--list]

Each step runs the program that measured the result, with the command recorded in the
result, and writes where the result lives; then :mod:`loadgen.headline` rebuilds the
headline table of docs/results/README.md from the simulator summaries. ``--quick`` is
for checking that every step still runs: each step at a small size (two rates of each
sweep, 300 requests, few iterations), written under ``out/results-quick/`` instead of
docs/results/ (the headline goes to ``out/results-quick/headline.md``). ``--only`` runs the named
steps (``--list`` shows them, with the results this does not regenerate and why).

Steps run one after the other (each already uses ``--jobs`` processes where it can).
The full run takes hours on a 2-core machine (the simulator sweeps dominate): run it
on a quiet host, and ``--only`` to refresh one result.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path("docs/results")
QUICK_OUT = Path("out/results-quick")
PY = "python -m"
POLICIES = "qlm,fcfs,edf,shepherd,priority"


@dataclass(frozen=True)
class Step:
    """One result: ``name`` (for ``--only``), how long it takes on 2 cores, the command
    of the full run and of the quick one (``{out}``: the results folder, ``{jobs}``)."""

    name: str
    cost: str
    full: str
    quick: str
    #: Write the command's stdout to this file (relative to ``{out}``), e.g. a table.
    stdout_to: str | None = None


def _sim(name: str, args: str, out: str, cost: str) -> Step:
    full = f"{PY} loadgen.sim {args} --jobs {{jobs}} --no-records --out {{out}}/{out}"
    quick = (f"{PY} loadgen.sim {args} --quick --num-requests 300 --jobs {{jobs}} --no-records "
             f"--out {{out}}/{out}")
    return Step(name, cost, full, quick)


STEPS: tuple[Step, ...] = (
    *(_sim(f"qlm-{w}", f"--workload {w} --policies {POLICIES}", f"qlm/{w}", cost)
      for w, cost in (("WA", "5 min"), ("WB", "8 min"), ("WC", "10 min"))),
    _sim("qlm-WB_paper", "--workload WB --cluster paper --rates 533.333,1066.667 "
         "--policies qlm,fcfs,edf", "qlm/WB_paper", "7 min"),
    *(_sim(f"sim-chunked-{w}", f"--workload {w}", f"sim/chunked/{w}", cost)
      for w, cost in (("WA", "5 min"), ("WB", "8 min"), ("WC", "10 min"))),
    *(_sim(f"sim-whole-{w}", f"--workload {w} --prefill-mode whole", f"sim/{w}", cost)
      for w, cost in (("WA", "5 min"), ("WB", "8 min"), ("WC", "10 min"))),
    _sim("tpot-WA", "--workload WA --rates 160,320,640 --policies "
         "qlm,fcfs,edf,shepherd,priority,static,vllm-swap --tpot-slo-s 0.04",
         "sim_tpot/WA", "6 min"),
    *(Step(f"estimator-check-{gpu}", "10 s",
           f"{PY} loadgen.estimator_check --seeds {seeds} --gpu {gpu}",
           f"{PY} loadgen.estimator_check --seeds 1 --groups 10 --gpu {gpu}",
           stdout_to=f"estimator_check/{gpu}.md")
      for gpu, seeds in (("A100-80GB", 5), ("A10-24GB", 2), ("H100-80GB", 2))),
    Step("bench-decide", "3 min",
         f"{PY} loadgen.bench_decide --queued 100000 --workers 80 "
         "--policies qlm,qlm:fair_share=false,fcfs,edf,shepherd --iterations 300 "
         "--reference-iterations 300 --out {out}/bench_decide.json",
         f"{PY} loadgen.bench_decide --queued 2000 --workers 8 "
         "--policies qlm,qlm:fair_share=false,fcfs --iterations 5 --reference-iterations 3 "
         "--out {out}/bench_decide.json"),
    Step("bench-decide-gc-freeze", "3 min",
         f"{PY} loadgen.bench_decide --queued 100000 --workers 80 "
         "--policies qlm,edf,fcfs,shepherd --iterations 300 --reference-iterations 30 "
         "--gc-freeze --out {out}/bench_decide_gc_freeze.json",
         f"{PY} loadgen.bench_decide --queued 2000 --workers 8 --policies qlm "
         "--iterations 5 --gc-freeze --out {out}/bench_decide_gc_freeze.json"),
    *(Step(f"bench-decide-workers-{w}", "2 min",
           f"{PY} loadgen.bench_decide --queued 100000 --workers {w} --policies qlm "
           f"--iterations 60 --out {{out}}/bench_decide_workers_{w}.json",
           f"{PY} loadgen.bench_decide --queued 2000 --workers {w // 10} --policies qlm "
           f"--iterations 3 --out {{out}}/bench_decide_workers_{w}.json")
      for w in (80, 320, 1280)),
    Step("bench-estimator", "2 min",
         f"{PY} loadgen.bench_estimator --queued 100000 --workers 80 --rounds 10 "
         "--queries 50 --out {out}/bench_estimator.json",
         f"{PY} loadgen.bench_estimator --queued 2000 --workers 8 --rounds 2 "
         "--queries 5 --out {out}/bench_estimator.json"),
    Step("bench-scheduler", "5 min",
         f"{PY} loadgen.bench_scheduler --queued 100000 --workers 80 --steps 20 "
         "--policies 'qlm;qlm:fair_share=false;fcfs' --out {out}/bench_scheduler.json",
         f"{PY} loadgen.bench_scheduler --queued 2000 --workers 8 --steps 2 "
         "--policies 'qlm;qlm:fair_share=false;fcfs' --out {out}/bench_scheduler.json"),
    Step("bench-scheduler-1m", "30 min",
         f"{PY} loadgen.bench_scheduler --queued 1000000 --workers 80 --steps 20 "
         "--policies 'qlm;qlm:fair_share=false;fcfs' --out {out}/bench_scheduler_1m.json",
         f"{PY} loadgen.bench_scheduler --queued 5000 --workers 8 --steps 2 "
         "--policies 'qlm;qlm:fair_share=false;fcfs' --out {out}/bench_scheduler_1m.json"),
    Step("bench-scheduler-workers-1280", "5 min",
         f"{PY} loadgen.bench_scheduler --queued 100000 --workers 1280 --steps 10 "
         "--policies qlm --out {out}/bench_scheduler_workers_1280.json",
         f"{PY} loadgen.bench_scheduler --queued 2000 --workers 32 --steps 2 "
         "--policies qlm --out {out}/bench_scheduler_workers_1280.json"),
    Step("profile-step", "5 min",
         f"{PY} loadgen.profile_step --queued 100000 --workers 80 --steps 20 "
         "--policies 'qlm;qlm:fair_share=false;fcfs' --out {out}/profile_step.json",
         f"{PY} loadgen.profile_step --queued 2000 --workers 8 --steps 2 "
         "--policies 'qlm;fcfs' --out {out}/profile_step.json"),
    Step("bench-store", "2 min", f"{PY} loadgen.bench_store --out {{out}}/bench_store.json",
         f"{PY} loadgen.bench_store --requests 500 --repeat 1 --out {{out}}/bench_store.json"),
    Step("bench-redis-memory", "2 min",
         f"{PY} loadgen.bench_redis_memory --out {{out}}/bench_redis_memory.json",
         f"{PY} loadgen.bench_redis_memory --requests 2000 "
         "--out {out}/bench_redis_memory.json"),
    Step("bench-bus", "2 min", f"{PY} loadgen.bench_bus --out {{out}}/bench_bus.json",
         f"{PY} loadgen.bench_bus --records 2000 --out {{out}}/bench_bus.json"),
    Step("bench-worker", "1 min",
         f"{PY} loadgen.bench_worker --requests 200 --warmup 20 --out {{out}}/bench_worker.json",
         f"{PY} loadgen.bench_worker --requests 20 --warmup 5 --out {{out}}/bench_worker.json"),
    Step("bench-worker-ab", "2 min",
         f"{PY} loadgen.bench_worker --ab-rounds 2 --requests 150 --warmup 20 "
         "--out {out}/bench_worker_ab.json",
         f"{PY} loadgen.bench_worker --ab-rounds 1 --requests 10 --warmup 2 "
         "--out {out}/bench_worker_ab.json"),
    Step("predict-check", "8 min",
         f"{PY} loadgen.predict_check --jobs {{jobs}} --out {{out}}/predict/after.json",
         f"{PY} loadgen.predict_check --workloads WA --traces synthetic,code "
         "--num-requests 300 --jobs {jobs} --out {out}/predict/after.json"),
    Step("demo", "4 min", f"{PY} loadgen.demo --dir .qlm/demo --out {{out}}/demo",
         f"{PY} loadgen.demo --sim-only --num-requests 100 --dir .qlm/demo "
         "--out {out}/demo"),
)

#: Results in docs/results/ this does not regenerate, and why.
NOT_REGENERATED: tuple[tuple[str, str], ...] = (
    ("gpu/*", "measured on an H100/H200 with vLLM (loadgen/gpu/, docs/results/gpu/README.md)"),
    ("gpu/sim_check/*", "simulator runs of the GPU notes, each pinned to the commit and "
                        "policy options they compared (before/defaults/burst/now)"),
    ("runtime_check/before, after", "a before/after comparison of two past commits"),
    ("step_round2/*", "bench_scheduler runs of main's code and of the second round of step "
                      "work beside it, the same afternoon as bench_scheduler.json"),
    ("qlm/WB_paper/summary_qlm_default.json", "qlm alone on the paper cluster with the "
                                              "options of its day; qlm-WB_paper has the "
                                              "three policies at HEAD"),
    ("bench_submit*.json, bench_http*.json", "need ghz and wrk (Go / apt), pinned cores of "
                                             "a quiet host; each file records one host "
                                             "condition (quiet, loaded, niced, pinned)"),
    ("bench_bus_replicated.json", "three Kafka brokers on the host (--brokers 1,3)"),
    ("bench_store_append.json, bench_redis_memory_{bulk,listpack}.json",
     "variants of bench-store and bench-redis-memory kept for the comparison in the README"),
    ("fuzz_edge.json", "10,000 inputs of each kind: about 10 minutes, the Kafka half waits "
                       "for every dead letter (CI runs it small)"),
    ("outage_redis_120s.json", "a slow test with Redis stopped for 120 s (make it with "
                               "QLM_TEST_OUTAGE_S=120 QLM_OUTAGE_RESULT=...)"),
    ("predict/before*.json, predict/after_refresh.json, predict/demo_before/*, "
     "predict/demo_main/*, predict/demo_after/*, predict/bench_decide_*.json, "
     "predict/demo/*",
     "the predicted-wait comparisons: main's code before each change (refreshed "
     "forecasts, then the head prefill stream) beside the code after it, for the "
     "simulator, make demo and bench_decide (the demo step regenerates demo/, the "
     "predict-check step predict/after.json)"),
    ("poison_records.json, kill_under_load.json", "written by their tests on real servers "
                                                  "(QLM_POISON_RESULT=..., QLM_KILL_RESULT=...; "
                                                  "the commands are in the files)"),
    ("demo.md, */README.md", "commentary, written by people from the results"),
)


def _command(step: Step, quick: bool, out: Path, jobs: int) -> str:
    return (step.quick if quick else step.full).format(out=out, jobs=jobs)


def run_step(step: Step, quick: bool, out: Path, jobs: int) -> float:
    """Run one step from the repository root; its seconds. CalledProcessError if it fails."""
    command = _command(step, quick, out, jobs)
    print(f"== {step.name}: {command}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    argv = [sys.executable, *shlex.split(command.removeprefix("python"))]
    if step.stdout_to is None:
        subprocess.run(argv, cwd=ROOT, check=True)
    else:
        target = ROOT / out / step.stdout_to
        target.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, text=True)
        target.write_text(f"`{command}`\n\n{done.stdout}")
    return time.perf_counter() - started


def selected(only: str | None) -> list[Step]:
    if not only:
        return list(STEPS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {s.name: s for s in STEPS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--only: unknown step(s) {', '.join(unknown)}; "
                         f"known: {', '.join(known)}")
    return [known[n] for n in names]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadgen.regenerate",
                                description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"every step small, into {QUICK_OUT}/ (checks that each still runs)")
    p.add_argument("--only", help="comma-separated step names (--list shows them)")
    p.add_argument("--jobs", type=int, default=2, help="simulations in parallel processes")
    p.add_argument("--list", action="store_true", help="show the steps and what is not redone")
    args = p.parse_args(argv)
    steps = selected(args.only)
    out = QUICK_OUT if args.quick else RESULTS
    if args.list:
        for step in steps:
            print(f"{step.name:<28} {step.cost:>7}  {_command(step, args.quick, out, args.jobs)}")
        print("\nnot regenerated:")
        for what, why in NOT_REGENERATED:
            print(f"  {what}: {why}")
        return 0
    timings: list[tuple[str, float]] = []
    for step in steps:
        timings.append((step.name, run_step(step, args.quick, out, args.jobs)))
    headline = [sys.executable, "-m", "loadgen.headline", "--results", str(out)]
    if args.quick:
        headline += ["--write", str(out / "headline.md")]
    subprocess.run(headline, cwd=ROOT, check=True)
    for name, seconds in timings:
        print(f"{name:<28} {seconds:8.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
