"""Fair share between tenants in the simulator: a light tenant alone, then beside a heavy
tenant sending 10× its requests, with the qlm policy's fair share off and on.

    python -m loadgen.bench_fair [--rates 320,640,1280] [--seeds 0,1,2] [--jobs 2]
        [--out docs/results/bench_fair.json]

Workload WA (mistral-7b; interactive, batch-1, batch-2) on the ``mini`` cluster, 7,000
requests, each request's tenant drawn light:heavy = 1:10 (so both tenants send every
class). Per rate and seed, three simulations on the same requests: ``alone`` (only the
light tenant's requests), ``off`` and ``on`` (both tenants, ``fair_share`` false / true).
Writes per run the attainment of each tenant (overall and per class), of each class and
overall, and per rate the means over the seeds; the target is the light tenant within
5 points of its attainment alone with fair share on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadgen.results import write_json
from loadgen.sim import NUM_REQUESTS, Task, parse_rates, run_all
from qlm.sim import SimConfig

#: The top-level keys of the JSON this program writes (loadgen.results).
RESULT_KEYS = frozenset({"what", "tenants", "rates", "seeds", "num_requests", "cluster",
                         "summary", "runs", "wall_s", "command"})
TENANTS = {"light": 1.0, "heavy": 10.0}
MODES = ("alone", "off", "on")


def task(rate: float, seed: int, mode: str) -> Task:
    return Task("WA", "qlm", rate, seed, NUM_REQUESTS["WA"], "mini", None, None,
                config=SimConfig(), policy_options={"fair_share": mode != "off"},
                tenants=TENANTS, only_tenants=("light",) if mode == "alone" else ())


def mean(values: Sequence[float]) -> float:
    return round(sum(values) / len(values), 4)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadgen.bench_fair",
                                description=__doc__.split("\n")[0])
    p.add_argument("--rates", default="320,640,1280")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("docs/results/bench_fair.json"))
    args = p.parse_args(argv)
    rates = parse_rates(args.rates)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    tasks = [task(rate, seed, mode) for rate in rates for seed in seeds for mode in MODES]
    started = time.perf_counter()
    runs = run_all(tasks, args.jobs)
    rows: list[dict[str, Any]] = []
    for t, run in zip(tasks, runs, strict=True):
        m = run.result.metrics
        mode = "alone" if t.only_tenants else ("on" if t.policy_options["fair_share"] else "off")
        rows.append({
            "rate": t.rate, "seed": t.seed, "mode": mode, "num_requests": m.num_requests,
            "slo_attainment": round(m.slo_attainment, 4),
            "by_class": {c: round(v, 4) for c, v in m.slo_attainment_by_class.items()},
            "by_tenant": {k: round(v, 4) for k, v in m.slo_attainment_by_tenant.items()},
            "by_tenant_class": {k: {c: round(v, 4) for c, v in cls.items()}
                                for k, cls in m.slo_attainment_by_tenant_class.items()},
        })
        light = m.slo_attainment_by_tenant["light"]
        print(f"rate={t.rate:g} seed={t.seed} {mode:<5} light={light:.3f}"
              f" overall={m.slo_attainment:.3f}", file=sys.stderr)
    summary: dict[str, Any] = {}
    for rate in rates:
        mine = [r for r in rows if r["rate"] == rate]

        def of(mode: str, pick: Any, rows: list[dict[str, Any]] = mine) -> float:
            return mean([pick(r) for r in rows if r["mode"] == mode])

        entry: dict[str, Any] = {
            f"light_{mode}": of(mode, lambda r: r["by_tenant"]["light"]) for mode in MODES}
        for mode in ("off", "on"):
            entry[f"heavy_{mode}"] = of(mode, lambda r: r["by_tenant"]["heavy"])
            entry[f"overall_{mode}"] = of(mode, lambda r: r["slo_attainment"])
            for c in ("interactive", "batch-1", "batch-2"):
                entry[f"{c}_{mode}"] = of(mode, lambda r, c=c: r["by_class"][c])
        entry["light_on_minus_alone"] = round(entry["light_on"] - entry["light_alone"], 4)
        entry["light_off_minus_alone"] = round(entry["light_off"] - entry["light_alone"], 4)
        summary[f"{rate:g}"] = entry
    out = {
        "what": "light tenant's SLO attainment alone and beside a 10x heavier tenant, qlm "
                "fair share off/on (WA, mini cluster, means over seeds)",
        "tenants": TENANTS, "rates": list(rates), "seeds": seeds,
        "num_requests": NUM_REQUESTS["WA"], "cluster": "mini",
        "summary": summary, "runs": rows,
        "wall_s": round(time.perf_counter() - started, 1),
        "command": "python -m loadgen.bench_fair " + " ".join(
            sys.argv[1:] if argv is None else argv),
    }
    print(json.dumps(summary, indent=1))
    write_json(args.out, out, RESULT_KEYS, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
