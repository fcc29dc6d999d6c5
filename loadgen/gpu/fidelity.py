"""Simulator fidelity: replay the requests real vLLM served through the simulator and compare.

Input: a replay JSON written on the GPU host by ``replay_vllm`` / ``profile_vllm`` (every
request's arrival, prompt and output tokens, and what vLLM did with it). The same requests
go, with the measured profile of the same model and GPU, through

* ``simulator`` / ``simulator_whole``: :func:`qlm.sim.simulate`, one worker, the ``fcfs``
  policy (vLLM's own order, no qlm), decisions not coalesced (vLLM schedules at every
  step), with ``prefill_mode="chunked"`` (vLLM's engine model, the default) and
  ``prefill_mode="whole"`` (whole prefill first, the batch waits);
* ``step_model``: :class:`loadgen.gpu.step_model.StepModel`, a step-level model of vLLM's
  scheduler (chunked prefill mixed into decode steps, asynchronous scheduling).

All sides are summarised by the same function (:func:`loadgen.gpu.common.latency_summary`):
TTFT p50/p99, TPOT p50/p99, output tokens per second; the relative error of each is
reported against a 10 % target.

Usage (from the repository root)::

    python3 -m loadgen.gpu.fidelity docs/results/gpu/h100_replay_mistral-7b.json.gz \
        --out docs/results/gpu/fidelity.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from loadgen.gpu.common import read_json
from qlm.core.errors import InvalidInput
from qlm.core.perf import PROFILE_DIR, ProfileBook
from qlm.core.policies import make_policy
from qlm.core.types import SLO, Request, SLOClass
from qlm.sim import Job, SimConfig, WorkerSpec, simulate

from .common import RequestTiming, TraceRequest, gpu_label, latency_summary, write_json
from .step_model import StepModel

#: The top-level keys this program writes into its JSON (checked against the committed
#: results by tests/unit/test_results_keys.py).
RESULT_KEYS: Final = frozenset({
    "command", "device", "gpu", "model", "policy", "profile_source", "runs", "sides",
    "target_rel_error", "vllm_version",
})

COMPARED = ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "output_tok_per_s")
TARGET_REL_ERROR = 0.10


def jobs_of(records: Sequence[Mapping[str, Any]], model: str) -> list[Job]:
    """The replayed requests as simulator jobs (true output length = tokens vLLM produced)."""
    jobs = []
    for i, r in enumerate(records):
        request = Request(
            id=f"r{i:06d}", model=model, prompt_tokens=int(r["prompt_tokens"]),
            max_tokens=int(r["max_tokens"]), slo_class=SLOClass.INTERACTIVE,
            slo=SLO.for_class(SLOClass.INTERACTIVE), arrival_at=float(r["arrival_s"]))
        jobs.append(Job(request, output_tokens=int(r["output_tokens"])))
    return jobs


def simulated_timings(jobs: Sequence[Job], gpu: str, profiles: ProfileBook,
                      max_prefill_tokens: int, prefill_mode: str) -> list[RequestTiming]:
    """Run the jobs on one simulated worker; the timings of every request that finished."""
    model = jobs[0].request.model
    worker = WorkerSpec(id="gpu0", gpu=gpu, active_model=model, models=(model,))
    # Bare vLLM schedules at every step: decisions are not coalesced.
    config = SimConfig(max_prefill_tokens=max_prefill_tokens, horizon_s=3600.0,
                       min_decision_interval_s=0.0, prefill_mode=prefill_mode)
    result = simulate(jobs, [worker], profiles, make_policy("fcfs"), config)
    timings = []
    for rec in result.records:
        if rec.first_token_at is None or rec.finished_at is None:
            continue
        timings.append(RequestTiming(rec.arrival_at, rec.first_token_at, rec.finished_at,
                                     rec.output_tokens))
    return timings


def step_model_timings(records: Sequence[Mapping[str, Any]],
                       model: StepModel) -> list[RequestTiming]:
    return model.run([TraceRequest(float(r["arrival_s"]), int(r["prompt_tokens"]),
                                   int(r["output_tokens"])) for r in records])


def compare(real: Mapping[str, float], simulated: Mapping[str, float]) -> dict[str, Any]:
    """Relative error (simulated − real) / real per metric, and whether it is within target."""
    rows = {}
    for key in COMPARED:
        r, s = float(real[key]), float(simulated[key])
        err = (s - r) / r if r else math.nan
        rows[key] = {"real": r, "simulated": s, "rel_error": round(err, 4),
                     "within_target": abs(err) <= TARGET_REL_ERROR}
    return rows


def fidelity(replay_file: Mapping[str, Any], profiles: ProfileBook) -> dict[str, Any]:
    """Every replay of one replay file compared with its simulation."""
    model = str(replay_file["model"])
    gpu = gpu_label(str(replay_file["device"].get("name", "")))
    profile = profiles.get(model, gpu)
    budget = int(replay_file["engine_settings"]["max_num_batched_tokens"])
    runs = []
    for replay in replay_file["replays"]:
        records = replay["requests"]
        real = latency_summary([RequestTiming(r["arrival_s"], r["first_token_s"], r["finish_s"],
                                              r["output_tokens"]) for r in records])
        jobs = jobs_of(records, model)
        sides = {
            "simulator": simulated_timings(jobs, gpu, profiles, budget, "chunked"),
            "simulator_whole": simulated_timings(jobs, gpu, profiles, budget, "whole"),
            "step_model": step_model_timings(records, StepModel(profile, budget)),
        }
        run: dict[str, Any] = {"speedup": replay["speedup"], "slice": replay["slice"],
                               "num_requests": len(records), "real": real}
        for side, timings in sides.items():
            rows = compare(real, latency_summary(timings))
            run[side] = {"num_finished": len(timings), "comparison": rows,
                         "all_within_target": all(r["within_target"] for r in rows.values())}
        runs.append(run)
    return {
        "model": model, "gpu": gpu, "device": replay_file["device"],
        "vllm_version": replay_file["vllm_version"], "profile_source": profile.source,
        "policy": "fcfs", "target_rel_error": TARGET_REL_ERROR,
        "sides": {"simulator": "qlm.sim.simulate, prefill_mode=chunked",
                  "simulator_whole": "qlm.sim.simulate, prefill_mode=whole",
                  "step_model": "loadgen.gpu.step_model.StepModel"},
        "runs": runs,
    }


SIDES = ("simulator", "simulator_whole", "step_model")


def print_table(result: Mapping[str, Any]) -> None:
    print(f"{result['model']}@{result['gpu']} ({result['profile_source']})")
    print(f"{'speedup':>7} {'metric':>16} {'real':>10} "
          + " ".join(f"{side:>20}" for side in SIDES))
    for run in result["runs"]:
        for key in COMPARED:
            cells = []
            for side in SIDES:
                row = run[side]["comparison"][key]
                mark = " " if row["within_target"] else "!"
                cells.append(f"{row['simulated']:>10.4f} {row['rel_error'] * 100:>+7.1f}%{mark}")
            print(f"{run['speedup']:>7} {key:>16} {run['real'][key]:>10.4f} " + " ".join(cells))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("replay", type=Path, nargs="+",
                        help="replay JSON files from the GPU host (same model and GPU)")
    parser.add_argument("--profiles", type=Path, default=PROFILE_DIR)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    book = ProfileBook.load(args.profiles)
    result: dict[str, Any] = {}
    for path in args.replay:
        try:
            one = fidelity(read_json(path), book)
        except (OSError, EOFError, json.JSONDecodeError, KeyError) as exc:
            raise InvalidInput("replay", f"{path}: {exc!r}") from None
        for run in one["runs"]:
            run["replay_file"] = path.name
        if not result:
            result = one
        elif (one["model"], one["gpu"]) != (result["model"], result["gpu"]):
            raise InvalidInput("replay", f"{path}: {one['model']}@{one['gpu']} differs from "
                               f"{result['model']}@{result['gpu']}")
        else:
            result["runs"].extend(one["runs"])
    result["command"] = " ".join(["python3 -m loadgen.gpu.fidelity",
                                  *(sys.argv[1:] if argv is None else argv)])
    print_table(result)
    if args.out:
        write_json(args.out, result)
    return 0 if all(run["simulator"]["all_within_target"] for run in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
