"""Where a scheduler step's time goes: :mod:`loadgen.bench_scheduler` with timers around
the parts of the step (wall time of each call, per policy, the cold first step left out).

    python -m loadgen.profile_step --queued 100000 --workers 80 --steps 20 \\
        --policies "qlm;qlm:fair_share=false;fcfs" --out docs/results/profile_step.json

Takes the arguments of :mod:`loadgen.bench_scheduler` (its own JSON is not written; the
bench's phase figures are repeated under ``bench``). The parts, each the wall time of
its calls in one step (p50 / p99 over the steps, and the mean per step):

* ``requeue_expired``; ``snapshot_script`` (the round trip of ``snapshot.lua`` and its
  JSON decoding); ``log_fold`` / ``sizes_check`` / ``records_fold`` / ``groups`` (the
  mirror: :mod:`qlm.store.mirror`); ``record_reads`` (records of ids new to a group or to
  running); ``running_fold`` / ``running_by_worker`` (the running requests);
* ``decide`` (in its thread), ``applier`` (:func:`qlm.runtime.apply.apply`, pure),
  ``set_virtual_queues`` (the script), ``apply_total`` (all of the step's apply:
  also rejections and the LSO commands' Kafka acknowledgements);
* ``gc_full`` / ``gc_young``: the garbage collector's passes during the steps.

The timers add a little to every call; the bench's own figures (``bench``) come from
the same run.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

import qlm.store.mirror as mirror_module
import qlm.store.store as store_module
import services.scheduler.loop as loop_module
from loadgen import bench_scheduler
from loadgen.results import emit

RESULT_KEYS: Final = frozenset({"bench", "benchmark", "command", "date_utc", "machine", "parts"})


class Spans:
    """Wall times of the parts, per policy (the loops in the order the bench makes them)."""

    def __init__(self) -> None:
        self.loops: list[object] = []
        self.current: int | None = None  # the loop whose (timed) step runs now
        self.times: list[dict[str, list[float]]] = []
        self._gc_started_at = 0.0

    def record(self, part: str, seconds: float) -> None:
        if self.current is not None:
            self.times[self.current][part].append(seconds)

    def timed_sync(self, owner: Any, name: str, part: str) -> None:
        original: Callable[..., Any] = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.record(part, time.perf_counter() - started)

        setattr(owner, name, timed)

    def timed_async(self, owner: Any, name: str, part: str) -> None:
        original: Callable[..., Any] = getattr(owner, name)

        @functools.wraps(original)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                self.record(part, time.perf_counter() - started)

        setattr(owner, name, timed)

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started_at = time.perf_counter()
        else:
            part = "gc_full" if info["generation"] == 2 else "gc_young"
            self.record(part, time.perf_counter() - self._gc_started_at)

    def install(self) -> None:
        store, mirror = store_module.RedisQueueStore, mirror_module.QueueMirror
        running, loop = store_module._RunningRequests, loop_module.SchedulingLoop
        self.timed_async(store, "requeue_expired", "requeue_expired")
        self.timed_async(store, "_membership", "snapshot_script")
        self.timed_async(store, "_read_records", "record_reads")
        self.timed_async(store, "set_virtual_queues", "set_virtual_queues")
        self.timed_sync(mirror, "apply", "log_fold")
        self.timed_sync(mirror, "agrees", "sizes_check")
        self.timed_sync(mirror, "fill", "records_fold")
        self.timed_sync(mirror, "groups", "groups")
        self.timed_sync(running, "fold", "running_fold")
        self.timed_sync(running, "by_worker", "running_by_worker")
        self.timed_sync(loop_module, "apply", "applier")
        self.timed_sync(loop_module, "decide", "decide")
        self.timed_async(loop, "apply", "apply_total")
        step = loop.step

        @functools.wraps(step)
        async def timed_step(loop_self: Any) -> Any:
            if loop_self not in self.loops:  # a new policy: its first step is cold
                self.loops.append(loop_self)
                self.times.append(defaultdict(list))
                return await step(loop_self)
            self.current = self.loops.index(loop_self)
            started = time.perf_counter()
            try:
                return await step(loop_self)
            finally:
                self.record("step", time.perf_counter() - started)
                self.current = None

        loop.step = timed_step  # type: ignore[assignment,method-assign]
        gc.callbacks.append(self.on_gc)

    def parts(self, index: int) -> dict[str, dict[str, float]]:
        times = self.times[index]
        num_steps = max(1, len(times["step"]))
        return {
            part: {"p50_ms": round(float(np.percentile(values, 50)) * 1e3, 2),
                   "p99_ms": round(float(np.percentile(values, 99)) * 1e3, 2),
                   "mean_per_step_ms": round(sum(values) * 1e3 / num_steps, 2),
                   "calls": len(values)}
            for part, values in sorted(times.items(), key=lambda kv: -sum(kv[1]))
        }


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    out = None
    if "--out" in args:
        at = args.index("--out")
        out = Path(args[at + 1])
        del args[at : at + 2]
    spans = Spans()
    spans.install()
    load_at_start = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="qlm-profile-step-") as tmp:
        bench_out = Path(tmp) / "bench.json"
        bench_scheduler.main([*args, "--out", str(bench_out)])
        bench = json.loads(bench_out.read_text())
    specs = list(bench["policies"])
    result = {
        "benchmark": "where a scheduler step's wall time goes (bench_scheduler with timers "
                     "around its parts; the cold first step of each policy left out)",
        "command": "python -m loadgen.profile_step " + shlex.join(
            list(argv) if argv is not None else sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1m_at_start": load_at_start},
        "bench": {spec: {"ms": bench["policies"][spec]["ms"],
                         "cpu_ms_per_step": bench["policies"][spec]["cpu_ms_per_step"]}
                  for spec in specs},
        "parts": {spec: spans.parts(i) for i, spec in enumerate(specs)},
    }
    emit(result, out, shown=result["parts"], keys=RESULT_KEYS)


if __name__ == "__main__":
    main()
