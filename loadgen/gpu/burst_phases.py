"""How fast each model decoded, phase by phase, in a GPU replay: from its result alone.

The replays of ``loadgen.gpu.stack_replay`` and ``loadgen.gpu.qlm_vs_fcfs`` put two
models on one GPU as two engines. What one engine runs slows the other's steps, and no
profile (measured one engine at a time) or policy sees it. This reads a result's
per-request rows (id, arrival, first token, finish, output tokens, evictions) and
reports, per run:

* for each model and each window of interactive arrivals (``--window-s``): how many
  arrived, how many missed the interactive SLO, their mean time per output token after
  the first (TPOT), and their mean residency on the worker from first token to finish;
* at each sampled time (``--every-s``), the batch requests of each model between their
  first token and their finish, those never evicted apart from the others (an evicted
  request's row keeps its first token, so while it waits in the queue it cannot be told
  from a running one here: the saved logs can, ``loadgen.gpu.stack_timeline``).

::

    python -m loadgen.gpu.burst_phases docs/results/gpu/h100_stack_replay_head_400.json.gz \\
        --out docs/results/gpu/h100_burst_phases_head_400.json

Request ids say what a request is (``loadgen.gpu.qlm_vs_fcfs.build_workload``): ``i<k>``
interactive, on the second model when k is a multiple of ``second_model_every``;
``b<first 4 letters of the model><j>`` batch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from loadgen.gpu.common import RequestTiming, read_json
from loadgen.gpu.stack_timeline import topic_payloads
from loadgen.results import emit
from qlm.core.errors import InvalidInput

#: The top-level keys this program writes into its JSON (loadgen.results).
RESULT_KEYS: Final = frozenset({"result", "command", "window_s", "every_s", "runs",
                                "worker_states", "engine_states"})

#: One request row of a result: id, arrival, first token, finish, output tokens, evictions.
Row = Sequence[Any]


def model_of(request_id: str, models: Sequence[str], second_every: int) -> str:
    """The model a request of the replay went to, from its id."""
    first, second = models
    if request_id.startswith("i"):
        k = int(request_id[1:])
        return second if second_every and k % second_every == 0 else first
    for model in models:
        if request_id.startswith("b" + model[:4]):
            return model
    raise InvalidInput("requests", f"{request_id!r}: not an id of the replay's workload")


def by_model(rows: Sequence[Row], models: Sequence[str], second_every: int
             ) -> dict[str, list[Row]]:
    """The rows of each model (:func:`model_of`), in their order."""
    out: dict[str, list[Row]] = {model: [] for model in models}
    for r in rows:
        out[model_of(str(r[0]), models, second_every)].append(r)
    return out


def decode_windows(rows: Sequence[Row], models: Sequence[str], second_every: int,
                   slo_s: float, window_s: float) -> dict[str, list[dict[str, Any]]]:
    """Per model, per window of interactive arrivals: count, misses, mean TPOT (ms) and
    mean residency from first token to finish (s) of those that finished."""
    out: dict[str, list[dict[str, Any]]] = {}
    interactive = [r for r in rows if str(r[0]).startswith("i")]
    end = max((float(r[1]) for r in interactive), default=0.0)
    for model, model_rows in by_model(interactive, models, second_every).items():
        windows = []
        for k in range(int(end // window_s) + 1):
            lo, hi = k * window_s, (k + 1) * window_s
            mine = [r for r in model_rows if lo <= float(r[1]) < hi]
            if not mine:
                continue
            done = [r for r in mine if r[2] is not None and r[3] is not None and r[4] > 1]
            tpot = [RequestTiming(r[1], r[2], r[3], r[4]).tpot_s or 0.0 for r in done]
            windows.append({
                "arrivals_s": [lo, hi], "num": len(mine),
                "missed": sum(1 for r in mine if r[2] is None or r[2] - r[1] > slo_s),
                "tpot_ms": round(1000 * sum(tpot) / len(tpot), 1) if tpot else None,
                "residency_s": (round(sum(r[3] - r[2] for r in done) / len(done), 2)
                                if done else None),
            })
        out[model] = windows
    return out


def batch_between(rows: Sequence[Row], models: Sequence[str], second_every: int,
                  every_s: float) -> list[dict[str, Any]]:
    """At each sampled time, per model, the batch requests between first token and finish:
    ``never_evicted`` and ``evicted`` (running again or waiting in the queue)."""
    batch = [r for r in rows if str(r[0]).startswith("b") and r[2] is not None]
    end = max((float(r[3]) for r in batch if r[3] is not None), default=0.0)
    mine = by_model(batch, models, second_every)
    samples = []
    for k in range(int(end // every_s) + 1):
        t = k * every_s
        at: dict[str, Any] = {"t_s": t}
        for model, model_rows in mine.items():
            live = [r for r in model_rows
                    if r[2] <= t < (r[3] if r[3] is not None else math.inf)]
            at[model] = {"never_evicted": sum(1 for r in live if not r[5]),
                         "evicted": sum(1 for r in live if r[5])}
        samples.append(at)
    return samples


def read_log(path: Path) -> str:
    """A scheduler log: the file itself, or ``services/scheduler.log`` inside a logs
    archive (``.tar.gz``, as the GPU runs bring them back)."""
    if not tarfile.is_tarfile(path):
        return path.read_text()
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            if member.name.endswith("services/scheduler.log"):
                extracted = archive.extractfile(member)
                if extracted is not None:
                    return extracted.read().decode()
    raise InvalidInput("scheduler_log", f"{path}: no services/scheduler.log in the archive")


def _state_lines(log_lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The scheduler's ``worker_state`` records, in the log's order."""
    for line in log_lines:
        if '"worker_state"' not in line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short when the service stopped
        if record.get("event") == "worker_state":
            yield record


def first_state_at(log_lines: Iterable[str]) -> float | None:
    """When the log's first ``worker_state`` line was written (its ``now``), if any: the
    zero of the seconds of :func:`worker_states` and :func:`engine_states`."""
    return next((float(r["now"]) for r in _state_lines(log_lines)), None)


def worker_states(log_lines: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """The scheduler's ``worker_state`` lines (``--log-worker-state``), per worker and
    whole second since the log's first such line: the most requests running of each
    class, the most KV reserved, its capacity, the lane head's class and size (the last of
    the second), the evictions sent and the batch cap."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    start: float | None = None
    for record in _state_lines(log_lines):
        now = float(record["now"])
        start = now if start is None else start
        second = int(now - start)
        at = out.setdefault(str(record["worker"]), {}).setdefault(
            second, {"t_s": second, "running": {}, "kv_reserved_tokens": 0, "evictions": 0})
        for cls, n in record["running"].items():
            at["running"][cls] = max(at["running"].get(cls, 0), int(n))
        at["kv_reserved_tokens"] = max(at["kv_reserved_tokens"], int(record["kv_reserved_tokens"]))
        at["kv_capacity_tokens"] = record["kv_capacity_tokens"]
        head = record.get("lane_head")
        at["lane_head_class"] = head.split("|")[1] if head else None
        at["lane_head_size"] = record.get("lane_head_size", 0)
        at["evictions"] += int(record.get("evictions", 0))
        at["batch_cap"] = record.get("batch_cap")
    return {worker: [seconds[k] for k in sorted(seconds)] for worker, seconds in out.items()}


def engine_states(telemetry: Iterable[Mapping[str, Any]], start: float
                  ) -> dict[str, list[dict[str, Any]]]:
    """The workers' ``qlm.telemetry`` records (one per worker and telemetry window), per
    worker and whole second since ``start`` (records before it are left out): the engine's
    largest batch and largest number of requests it holds unscheduled, the largest share
    of its KV blocks in use, its steps, and their mean time (ms; None in a second without
    steps)."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    step_s: dict[tuple[str, int], float] = {}
    for record in telemetry:
        at = float(record["at"]) - start
        if at < 0:
            continue
        worker, second = str(record["worker"]), int(at)
        row = out.setdefault(worker, {}).setdefault(second, {
            "t_s": second, "batch_size": 0, "num_waiting": 0, "kv_used_fraction": 0.0,
            "num_steps": 0, "step_ms": None})
        row["batch_size"] = max(row["batch_size"], int(record.get("batch_size", 0)))
        row["num_waiting"] = max(row["num_waiting"], int(record.get("num_waiting", 0)))
        row["kv_used_fraction"] = max(row["kv_used_fraction"],
                                      round(float(record.get("kv_used_fraction", 0.0)), 4))
        steps = int(record.get("num_steps", 0))
        if steps > 0:
            row["num_steps"] += steps
            key = (worker, second)
            step_s[key] = step_s.get(key, 0.0) + steps * float(record["step_time_observed_s"])
            row["step_ms"] = round(1000.0 * step_s[key] / row["num_steps"], 2)
    return {worker: [seconds[k] for k in sorted(seconds)] for worker, seconds in out.items()}


def phases(result: Mapping[str, Any], window_s: float, every_s: float
           ) -> dict[str, dict[str, Any]]:
    """Both reports for every run (variant) of ``result``."""
    args = result.get("args") or {}
    try:
        models = str(args["models"]).split(",")
        second_every = int(args["second_model_every"])
        slo_s = float(args["interactive_slo_s"])
    except KeyError as missing:
        raise InvalidInput("args", f"the result records no {missing}: not a GPU replay's "
                           "result") from None
    if len(models) != 2:
        raise InvalidInput("args.models", f"{args['models']!r}: expected two models")
    runs = {}
    for name, run in (result.get("variants") or {}).items():
        rows = run.get("requests")
        if not isinstance(rows, list):
            raise InvalidInput(f"variants.{name}.requests", "missing: a result without rows")
        runs[name] = {
            "interactive_decode": decode_windows(rows, models, second_every, slo_s, window_s),
            "batch_between_first_token_and_finish": batch_between(rows, models,
                                                                  second_every, every_s),
        }
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadgen.gpu.burst_phases",
                                description=__doc__.splitlines()[0])
    p.add_argument("result", type=Path, help="a replay's result (.json or .json.gz)")
    p.add_argument("--window-s", type=float, default=8.0,
                   help="width of the windows of interactive arrivals (s)")
    p.add_argument("--every-s", type=float, default=2.0,
                   help="spacing of the batch samples (s)")
    p.add_argument("--scheduler-log", type=Path,
                   help="the scheduler's log of the run (services/scheduler.log, or a logs "
                        "archive holding it), with --log-worker-state: its view per worker "
                        "and second; from an archive, also the engines' own (qlm.telemetry)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    try:
        if not (args.window_s > 0 and args.every_s > 0):
            raise InvalidInput("window_s/every_s", "must be > 0")
        runs = phases(read_json(args.result), args.window_s, args.every_s)
        states = engines = None
        if args.scheduler_log:
            lines = read_log(args.scheduler_log).splitlines()
            states = worker_states(lines)
            start = first_state_at(lines)
            if tarfile.is_tarfile(args.scheduler_log) and start is not None:
                telemetry = [p for _, p in topic_payloads(args.scheduler_log, "qlm.telemetry")]
                engines = engine_states(telemetry, start) if telemetry else None
    except (InvalidInput, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = {"result": str(args.result), "window_s": args.window_s, "every_s": args.every_s,
           "runs": runs,
           **({"worker_states": states} if states is not None else {}),
           **({"engine_states": engines} if engines is not None else {}),
           "command": "python -m loadgen.gpu.burst_phases "
                      + " ".join(sys.argv[1:] if argv is None else argv)}
    shown = {name: run["interactive_decode"] for name, run in runs.items()}
    emit(out, args.out, shown, keys=RESULT_KEYS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
