"""qlm vs FCFS vs bare vLLM on one GPU: two co-resident models, a mixed interactive + batch replay.

Single process. What runs, per variant, on the same requests (same arrivals and token
counts; prompt token ids are drawn per variant so no variant hits another's prefix cache):

* **qlm**: the scheduling core in-process. An in-memory queue (requests grouped by
  model, class and arrival window like the store does), one in-process worker per
  engine, and the ``qlm`` policy's ``decide()`` (the same code the scheduler service
  runs) on every new group, every completion or eviction, and every ``tick_s``
  (coalesced to at most one decision per ``min_decision_interval_s``; ``decide`` runs
  in a thread so streaming continues). The decision is carried out by the applier the
  simulator and the scheduler service use (:func:`qlm.runtime.apply.apply`; this
  harness's :class:`InProcessStack` implements its effects): placements become the
  workers' virtual queues, evictions abort the running request keeping its progress
  and requeue it (re-admission re-prefills prompt + kept tokens, prefix caching on),
  rejections end queued requests, swaps are invalid (each engine holds one model); a
  worker pulls from the head of its virtual queue with
  :func:`qlm.core.pulls.plan_pulls` (the worker service's backpressure) after every
  decision and whenever a request ends or gets its first token.
* **fcfs**: the same machinery with the ``fcfs`` policy (groups in arrival order,
  least-loaded dispatch, no preemption beyond the engine's own).
* **bare**: every request goes to its model's engine at its arrival time; vLLM's own
  scheduler (FCFS waiting queue, preemption on KV shortage) does the rest.
* **<policy>+opts** (e.g. ``qlm+opts``): the policy with ``--qlm-options`` as its
  options.
* **<policy>+corr** (e.g. ``qlm+corr``, ``qlm+opts+corr``): the policy plans with
  profiles corrected online from the engines' observed step times (every second, the
  scheduler service's ``--online-correction``), e.g. when two engines share one GPU and
  each runs slower than its profile.

In-process workers (qlm, fcfs) pull with the worker service's prefill cap
(``--prefill-cap``, see :func:`qlm.core.pulls.plan_pulls`): at most that many context
tokens admitted but not yet prefilled, so a burst is not queued inside vLLM, where no
later decision can reorder it, ahead of tighter requests that arrive after it.

The engines are :class:`qlm.engine.vllm_engine.VllmEngine` (vLLM ``AsyncLLM``
in-process, one per model, both awake, each with a share of the GPU and sleep mode
on), or :class:`qlm.engine.simulated.SimulatedEngine` (``--engine sim``, no GPU: for
checking the harness's logic on any machine). Redis and Kafka are not used: the
queue, the scheduler loop and the workers are the in-process stand-ins described above.

After the replays, on the vLLM engines: evict + re-admission cost (prefix caching on),
model swap by sleep/wake (one model asleep, the other woken) and a cold restart.

Workload: rows of a trace slice (``common.write_slice_csv``) at ``--speedup`` are the
interactive requests; every ``--second-model-every``-th goes to the second model. At
``--batch-at-s`` a batch job arrives at once: ``--num-batch`` requests per model with
the slice's token counts (shuffled), class ``batch-1`` on the first model and
``batch-2`` on the second.

GPU host::

    python3 -m loadgen.gpu.qlm_vs_fcfs --slice .stage/azure_conv_0_400.csv --out $OUT
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np

from loadgen.gpu.common import (
    HOST_DEVICE,
    MODEL_SHAPES,
    TraceRequest,
    device_facts,
    gpu_used_gib,
    percentile,
    read_slice_csv,
    write_json,
)
from qlm.core.corrections import CorrectedProfiles
from qlm.core.errors import InvalidInput, NotFound
from qlm.core.perf import PROFILE_DIR, PerfProfile, ProfileBook
from qlm.core.policies import PolicyContext, make_policy
from qlm.core.policies.base import check_policy_options, options_from_json
from qlm.core.pulls import DEFAULT_PREFILL_CAP_TOKENS, ordered_groups, plan_pulls
from qlm.core.types import (
    SLO,
    GroupKey,
    QueueSnapshot,
    Request,
    RequestGroup,
    RunningRequest,
    SLOClass,
    WorkerView,
    group_key_for,
)
from qlm.engine.base import Engine, EngineRequest, OutputChunk
from qlm.runtime.apply import apply

#: The top-level keys this program writes into its JSON (checked against the committed
#: results by tests/unit/test_results_keys.py).
RESULT_KEYS: Final = frozenset({
    "args", "command", "device", "engine", "engine_start", "error", "kv_capacity_tokens",
    "side_measurements", "skipped", "slos_s", "total_s", "variants", "vllm_version",
    "workload",
})

VARIANTS = ("bare", "fcfs", "qlm")
#: Longest wait for an aborted request's stream to end.
EVICT_STREAM_END_S = 5.0
#: How often ``+corr`` variants fold engine step times in (the workers' telemetry period).
CORRECTION_WINDOW_S = 1.0


# ------------------------------------------------------------------ workload
@dataclass(frozen=True, slots=True)
class Workload:
    requests: tuple[Request, ...]
    slos: Mapping[str, float]
    description: Mapping[str, Any]


def build_workload(args: argparse.Namespace,
                   slice_rows: Sequence[TraceRequest] | None = None) -> Workload:
    """Interactive requests from the slice's arrivals, plus a batch job per model
    (``slice_rows``: the slice itself instead of reading ``args.slice``)."""
    all_rows = list(slice_rows) if slice_rows is not None else read_slice_csv(Path(args.slice))
    rows = all_rows[: args.num_interactive]
    first, second = args.models.split(",")
    slos = {SLOClass.INTERACTIVE.value: args.interactive_slo_s,
            SLOClass.BATCH_1.value: args.batch1_slo_s, SLOClass.BATCH_2.value: args.batch2_slo_s}
    requests: list[Request] = []
    for i, row in enumerate(rows):
        model = second if args.second_model_every and i % args.second_model_every == 0 else first
        requests.append(Request(
            f"i{i}", model, row.prompt_tokens, row.output_tokens, SLOClass.INTERACTIVE,
            SLO(args.interactive_slo_s), round(args.warmup_s + row.arrival_s / args.speedup, 6)))
    rng = np.random.default_rng(args.seed)
    for model, cls, slo_s in ((first, SLOClass.BATCH_1, args.batch1_slo_s),
                              (second, SLOClass.BATCH_2, args.batch2_slo_s)):
        picks = rng.permutation(len(all_rows))[: args.num_batch]
        for j, k in enumerate(picks):
            row = all_rows[int(k)]
            requests.append(Request(
                f"b{model[:4]}{j}", model, row.prompt_tokens, row.output_tokens, cls,
                SLO(slo_s), round(args.warmup_s + args.batch_at_s + j * 1e-4, 6)))
    requests.sort(key=lambda r: (r.arrival_at, r.id))
    description = {
        "interactive": f"{Path(args.slice).name} rows 0..{len(rows) - 1} at "
                       f"{args.speedup}x; every {args.second_model_every}th to {second}, "
                       f"the rest to {first}",
        "batch": f"{args.num_batch} per model at t={args.batch_at_s}s (slice token counts, "
                 f"shuffled): batch-1 on {first}, batch-2 on {second}",
        "num_requests": len(requests),
        "output_tokens": sum(r.max_tokens for r in requests),
        "by_model_class": _count_by(requests),
    }
    return Workload(tuple(requests), slos, description)


def _count_by(requests: Sequence[Request]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in requests:
        key = f"{r.model}|{r.slo_class.value}"
        out[key] = out.get(key, 0) + 1
    return out


def draw_prompts(requests: Sequence[Request], seed: int) -> dict[str, tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    out = {}
    for r in requests:
        vocab = int(MODEL_SHAPES[r.model]["vocab_size"]) if r.model in MODEL_SHAPES else 32000
        out[r.id] = tuple(rng.integers(100, vocab - 100, size=r.prompt_tokens).tolist())
    return out


# ------------------------------------------------------------------ outcomes
@dataclass(eq=False)
class Outcome:
    """What one request saw, seconds on the variant's clock (0 = replay start)."""

    request: Request
    token_ids: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    finished_at: float | None = None
    num_evictions: int = 0
    error: str | None = None

    @property
    def num_generated(self) -> int:
        return len(self.token_ids)


def summarise(outcomes: Sequence[Outcome], slos: Mapping[str, float]) -> dict[str, Any]:
    """Per class: attainment, TTFT p50/p99; overall: output tok/s over the makespan."""
    by_class: dict[str, Any] = {}
    for cls in sorted({o.request.slo_class.value for o in outcomes}):
        mine = [o for o in outcomes if o.request.slo_class.value == cls]
        ttfts = [o.first_token_at - o.request.arrival_at for o in mine
                 if o.first_token_at is not None]
        met = sum(1 for o in mine if o.first_token_at is not None
                  and o.first_token_at - o.request.arrival_at <= slos[cls])
        by_class[cls] = {
            "num_requests": len(mine),
            "num_finished": sum(1 for o in mine if o.finished_at is not None),
            "slo_ttft_s": slos[cls],
            "slo_attainment": round(met / len(mine), 4),
            "ttft_p50_s": round(percentile(ttfts, 50), 4),
            "ttft_p99_s": round(percentile(ttfts, 99), 4),
            "ttft_max_s": round(max(ttfts), 4) if ttfts else math.nan,
            "num_evicted": sum(1 for o in mine if o.num_evictions),
        }
    by_model_class: dict[str, Any] = {}
    for o in outcomes:
        key = f"{o.request.model}|{o.request.slo_class.value}"
        row = by_model_class.setdefault(key, [0, 0])
        row[1] += 1
        row[0] += int(o.first_token_at is not None and o.first_token_at - o.request.arrival_at
                      <= slos[o.request.slo_class.value])
    start = min(o.request.arrival_at for o in outcomes)
    finish_times = [o.finished_at for o in outcomes if o.finished_at is not None]
    end = max(finish_times, default=start)
    tokens = sum(o.num_generated for o in outcomes)
    return {
        "classes": by_class,
        "attainment_by_model_class": {k: round(m / n, 4) for k, (m, n) in
                                      sorted(by_model_class.items())},
        "num_requests": len(outcomes),
        "num_finished": len(finish_times),
        "num_exact_length": sum(1 for o in outcomes if o.num_generated == o.request.max_tokens),
        "output_tokens": tokens,
        "makespan_s": round(end - start, 3),
        "output_tok_per_s": round(tokens / (end - start), 1) if end > start else math.nan,
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
    }


# ------------------------------------------------------------------ clock
class ReplayClock:
    def __init__(self) -> None:
        self.start_at = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.start_at

    async def sleep_until(self, at: float) -> None:
        delay = at - self.now()
        if delay > 0:
            await asyncio.sleep(delay)


def engine_request(request: Request, prompt: tuple[int, ...], outcome: Outcome) -> EngineRequest:
    return EngineRequest(
        request.id, request.model, request.prompt_tokens, request.max_tokens,
        prompt_token_ids=prompt, num_generated=outcome.num_generated,
        generated_token_ids=tuple(outcome.token_ids), ignore_eos=True)


async def consume(stream: Any, outcome: Outcome, clock: ReplayClock,
                  on_first_output: Callable[[], None] | None = None) -> str | None:
    """Stream to the end; returns the finish reason. ``on_first_output`` is called when
    the first tokens of this admission arrive (its prefill is done)."""
    reason: str | None = None
    first = True
    async for chunk in stream:
        assert isinstance(chunk, OutputChunk)
        if chunk.token_ids:
            if outcome.first_token_at is None:
                outcome.first_token_at = clock.now()
            outcome.token_ids.extend(chunk.token_ids)
            if first and on_first_output is not None:
                first = False
                on_first_output()
        reason = chunk.finish_reason
    if reason in ("length", "stop"):
        outcome.finished_at = clock.now()
    return reason


# ------------------------------------------------------------------ bare
async def run_bare(engines: Mapping[str, Engine], workload: Workload,
                   prompts: Mapping[str, tuple[int, ...]], timeout_s: float) -> dict[str, Any]:
    """Every request straight to its model's engine at its arrival."""
    clock = ReplayClock()
    outcomes = {r.id: Outcome(r) for r in workload.requests}

    async def one(request: Request) -> None:
        await clock.sleep_until(request.arrival_at)
        outcome = outcomes[request.id]
        try:
            await consume(engines[request.model].add(
                engine_request(request, prompts[request.id], outcome)), outcome, clock)
        except Exception as error:
            outcome.error = repr(error)[:300]

    tasks = [asyncio.create_task(one(r)) for r in workload.requests]
    _done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    timed_out = bool(pending)
    for task in pending:
        task.cancel()
    if timed_out:
        await _abort_all(engines)
    return {"outcomes": list(outcomes.values()), "timed_out": timed_out,
            "evictions": 0, "swaps": 0}


async def _abort_all(engines: Mapping[str, Engine]) -> None:
    for engine in engines.values():
        live = getattr(engine, "_live", None) or getattr(engine, "_seqs", None) or {}
        for rid in list(live):
            with contextlib.suppress(NotFound):
                await engine.abort(rid)


# ------------------------------------------------------------------ in-process (qlm / fcfs)
@dataclass(eq=False)
class _Run:
    request: Request
    started_at: float
    task: asyncio.Task[None] | None = None
    evicting: bool = False


@dataclass(eq=False)
class _Worker:
    id: str
    model: str
    engine: Engine
    profile: PerfProfile
    kv_capacity_tokens: int
    max_batch_size: int
    order: tuple[GroupKey, ...] = ()
    running: dict[str, _Run] = field(default_factory=dict)
    batch_cap: int | None = None


class InProcessStack:
    """The in-process scheduler + workers (see the module docstring); its effect methods
    (``set_virtual_queues`` … ``pull``) are :class:`qlm.runtime.apply.Effects`."""

    def __init__(self, policy_name: str, engines: Mapping[str, Engine], gpu: str,
                 profiles: ProfileBook, workload: Workload,
                 prompts: Mapping[str, tuple[int, ...]], args: argparse.Namespace) -> None:
        base, *tags = policy_name.split("+")
        self.policy = make_policy(base)
        options = options_from_json(args.qlm_options, "qlm-options") if "opts" in tags else {}
        check_policy_options(base, options)  # a bad option fails before any engine starts
        #: ``+corr``: plan with profiles corrected online from the engines' step times,
        #: as the scheduler service does with ``--online-correction``.
        self.corrections = CorrectedProfiles(profiles) if "corr" in tags else None
        self.corrected_at = 0.0
        self.last_steps: dict[str, tuple[int, float, float]] = {}
        self.options = options
        #: The worker's prefill cap (:func:`qlm.core.pulls.plan_pulls`; 0: none).
        self.prefill_cap = int(args.prefill_cap)
        self.ctx = PolicyContext(profiles, options)
        self.window_s = float(getattr(self.policy, "group_window_s", args.group_window_s))
        self.workload = workload
        self.prompts = prompts
        self.args = args
        self.clock = ReplayClock()
        self.outcomes = {r.id: Outcome(r) for r in workload.requests}
        self.queued: dict[GroupKey, dict[str, Request]] = {}
        self.workers: dict[str, _Worker] = {}
        for model, engine in engines.items():
            kv = _kv_capacity(engine, profiles.get(model, gpu))
            self.workers[f"w-{model}"] = _Worker(
                f"w-{model}", model, engine, profiles.get(model, gpu), kv, args.max_num_seqs)
        self.trigger = asyncio.Event()
        self.num_open = len(workload.requests)
        self.all_done = asyncio.Event()
        self.num_evictions = 0
        self.num_swaps = 0
        self.num_invalid = 0
        self.num_corrections = 0
        self.num_stuck_streams = 0
        self.evict_tasks: set[asyncio.Task[None]] = set()
        self.decide_s: list[float] = []
        self.last_decide_at = -math.inf

    # ---------------------------------------------------------------- queue
    def _enqueue(self, request: Request) -> None:
        key = group_key_for(request, self.window_s)
        self.queued.setdefault(key, {})[request.id] = request

    def _dequeue(self, request_id: str) -> Request | None:
        request = self.outcomes[request_id].request
        key = group_key_for(request, self.window_s)
        group = self.queued.get(key)
        if group is None or request_id not in group:
            return None
        queued = group.pop(request_id)
        if not group:
            del self.queued[key]
        return queued

    def _group(self, key: GroupKey) -> RequestGroup:
        reqs = sorted(self.queued[key].values(), key=lambda r: (r.arrival_at, r.id))
        return RequestGroup(key, tuple(reqs))

    def _view(self, w: _Worker) -> WorkerView:
        running = []
        for rid, run in w.running.items():
            outcome = self.outcomes[rid]
            progress = min(outcome.num_generated, run.request.max_tokens)
            request = replace(run.request, num_generated=progress)
            running.append(RunningRequest(request, run.started_at, outcome.first_token_at))
        return WorkerView(w.id, w.profile.gpu, (w.model,), w.model, w.kv_capacity_tokens,
                          w.max_batch_size, tuple(running), batch_cap=w.batch_cap,
                          device=HOST_DEVICE)

    # ---------------------------------------------------------------- run
    async def run(self, timeout_s: float) -> dict[str, Any]:
        self.clock = ReplayClock()
        tasks = [asyncio.create_task(self._arrivals()), asyncio.create_task(self._decisions()),
                 asyncio.create_task(self._ticks())]
        try:
            await asyncio.wait_for(self.all_done.wait(), timeout_s)
            timed_out = False
        except TimeoutError:
            timed_out = True
        for task in tasks:
            task.cancel()
        if timed_out:
            await _abort_all({w.model: w.engine for w in self.workers.values()})
        return {
            "outcomes": list(self.outcomes.values()), "timed_out": timed_out,
            "evictions": self.num_evictions, "swaps": self.num_swaps,
            "invalid_actions": self.num_invalid, "stuck_streams": self.num_stuck_streams,
            "num_decisions": len(self.decide_s),
            "corrections": (None if self.corrections is None else
                            {"|".join(k): round(f, 3) for k, f in
                             self.corrections.estimator.corrections.items()}),
            "num_profile_rebuilds": self.num_corrections,
            "decide_s_p50": round(percentile(self.decide_s, 50), 5),
            "decide_s_p99": round(percentile(self.decide_s, 99), 5),
            "decide_s_max": round(max(self.decide_s, default=0.0), 5),
        }

    async def _arrivals(self) -> None:
        for request in self.workload.requests:
            await self.clock.sleep_until(request.arrival_at)
            self._enqueue(request)
            self.trigger.set()
            self._pull_all()

    async def _ticks(self) -> None:
        while True:
            await asyncio.sleep(self.args.tick_s)
            self._correct()
            self.trigger.set()

    def _correct(self) -> None:
        """Once per :data:`CORRECTION_WINDOW_S`: fold each engine's mean step time over the
        window (observed, and predicted by its profile) into the corrected profiles."""
        now = self.clock.now()
        if self.corrections is None or now - self.corrected_at < CORRECTION_WINDOW_S:
            return
        self.corrected_at = now
        for w in self.workers.values():
            stats = w.engine.stats()
            steps, predicted, observed = (stats.num_steps, stats.step_time_predicted_s,
                                          stats.step_time_observed_s)
            last = self.last_steps.get(w.id, (0, 0.0, 0.0))
            self.last_steps[w.id] = (steps, predicted, observed)
            num = steps - last[0]
            if num > 0:
                self.corrections.observe(w.model, w.profile.gpu, (predicted - last[1]) / num,
                                         (observed - last[2]) / num)
        book = self.corrections.book()
        if book is not self.ctx.profiles:
            self.ctx = PolicyContext(book, self.options)
            self.num_corrections += 1

    async def _decisions(self) -> None:
        while True:
            await self.trigger.wait()
            wait_s = self.last_decide_at + self.args.min_decision_interval_s - self.clock.now()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            self.trigger.clear()
            if not self.queued and not any(w.running for w in self.workers.values()):
                continue
            now = self.clock.now()
            self.last_decide_at = now
            snapshot = QueueSnapshot(
                now=now, groups=tuple(self._group(k) for k in sorted(self.queued)),
                workers=tuple(self._view(w) for w in self.workers.values()),
                virtual_queues={w.id: w.order for w in self.workers.values()})
            started = time.perf_counter()
            decision = await asyncio.to_thread(self.policy.decide, snapshot, self.ctx)
            self.decide_s.append(time.perf_counter() - started)
            self.num_invalid += apply(decision, snapshot, self.ctx.profiles, self)

    # ---------------------------------------------------------------- effects
    # Decided on a snapshot while requests ran on: an action found stale is counted.
    def set_virtual_queues(self, orders: Mapping[str, tuple[GroupKey, ...]]) -> None:
        for worker_id, order in orders.items():
            self.workers[worker_id].order = order

    def reject(self, request_id: str, reason: str) -> None:
        if self._dequeue(request_id) is None:
            self.num_invalid += 1  # started since the snapshot
            return
        self.outcomes[request_id].error = f"rejected: {reason}"[:300]
        self._closed()

    def evict(self, worker_id: str, request_id: str, state_swap: bool, reason: str) -> None:
        w = self.workers[worker_id]
        run = w.running.get(request_id)
        if run is None:
            self.num_invalid += 1  # ended since the snapshot
            return
        if not run.evicting:
            run.evicting = True
            task = asyncio.create_task(self._evict(w, request_id))
            self.evict_tasks.add(task)
            task.add_done_callback(self.evict_tasks.discard)

    def swap(self, worker_id: str, to_model: str) -> None:
        self.num_invalid += 1  # each worker holds one model: nothing to swap to

    def keep_model(self, worker_id: str) -> None:
        """Nothing pending to withdraw: this harness never swaps."""

    def cap_batch(self, worker_id: str, max_batch_size: int | None) -> None:
        self.workers[worker_id].batch_cap = max_batch_size  # the pull honours it

    def pull(self, worker_id: str) -> None:
        self._pull(self.workers[worker_id])

    # ---------------------------------------------------------------- worker side
    def _pull_all(self) -> None:
        for w in self.workers.values():
            self._pull(w)

    def _pull(self, w: _Worker) -> None:
        """The worker's backpressure pull from the head of its virtual queue."""
        if not w.order or any(run.evicting for run in w.running.values()):
            return
        groups = {k: self._group(k) for k in w.order if k in self.queued}
        if not groups:
            return
        for rid in plan_pulls(self._view(w), ordered_groups(w.order, groups), w.profile,
                              prefill_cap_tokens=self.prefill_cap):
            self._start(w, rid)

    def _start(self, w: _Worker, request_id: str) -> bool:
        request = self._dequeue(request_id)
        if request is None:
            return False
        if request.model != w.model:
            self._enqueue(request)
            return False
        outcome = self.outcomes[request_id]
        try:
            stream = w.engine.add(engine_request(request, self.prompts[request_id], outcome))
        except InvalidInput as error:
            outcome.error = repr(error)[:300]
            self._closed()
            return True
        run = _Run(request, self.clock.now())
        w.running[request_id] = run
        run.task = asyncio.create_task(self._serve(w, run, stream))
        return True

    async def _serve(self, w: _Worker, run: _Run, stream: Any) -> None:
        outcome = self.outcomes[run.request.id]

        def on_prefilled() -> None:  # the cap has room again
            if self.prefill_cap > 0:
                self._pull(w)

        try:
            reason = await consume(stream, outcome, self.clock, on_prefilled)
        except Exception as error:
            outcome.error = repr(error)[:300]
            reason = "error"
        if reason != "abort":
            w.running.pop(run.request.id, None)
            self._closed()
            self._pull(w)
            self.trigger.set()

    async def _evict(self, w: _Worker, request_id: str) -> None:
        run = w.running[request_id]
        try:
            await w.engine.abort(request_id)
        except NotFound:
            run.evicting = False
            return  # it finished first
        if run.task is not None:
            try:  # the stream ends with an "abort" chunk; do not hang on one that does not
                await asyncio.wait_for(asyncio.shield(run.task), EVICT_STREAM_END_S)
            except TimeoutError:
                run.task.cancel()
                self.num_stuck_streams += 1
        w.running.pop(request_id, None)
        outcome = self.outcomes[request_id]
        if outcome.num_generated >= run.request.max_tokens:
            outcome.finished_at = self.clock.now()
            self._closed()
        else:
            outcome.num_evictions += 1
            self.num_evictions += 1
            self._enqueue(replace(run.request, num_generated=outcome.num_generated))
        self._pull(w)
        self.trigger.set()

    def _closed(self) -> None:
        self.num_open -= 1
        if self.num_open <= 0:
            self.all_done.set()


def _kv_capacity(engine: Engine, profile: PerfProfile) -> int:
    reader = getattr(engine, "kv_capacity_tokens", None)
    if callable(reader):
        value = int(reader())
        if value > 0:
            return value
    return profile.kv_capacity_tokens


# ------------------------------------------------------------------ engines
def load_profiles(models: Sequence[str], gpu: str, sim_kv_tokens: Mapping[str, int]
                  ) -> ProfileBook:
    book = ProfileBook.load(PROFILE_DIR)
    profiles = []
    for m in models:
        p = book.get(m, gpu)
        if m in sim_kv_tokens:
            p = replace(p, kv_capacity_tokens=sim_kv_tokens[m])
        profiles.append(p)
    return ProfileBook.of(profiles)


async def make_engines(args: argparse.Namespace, models: Sequence[str], profiles: ProfileBook,
                       timings: dict[str, Any]) -> dict[str, Engine]:
    """One engine per model, all awake. vLLM: later models start while the first sleeps."""
    engines: dict[str, Engine] = {}
    if args.engine == "sim":
        from qlm.engine.simulated import SimulatedEngine

        for m in models:
            sim = SimulatedEngine([profiles.get(m, args.gpu)], time_scale=args.sim_time_scale)
            await sim.start()
            engines[m] = sim
        return engines
    from qlm.engine.vllm_engine import VllmEngine, VllmOptions

    options = VllmOptions(gpu_memory_utilization=args.gpu_memory_utilization,
                          max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                          load_format="dummy")
    for i, m in enumerate(models):
        if i > 0:  # start the next one while the others sleep (the tested co-resident path)
            for prev in models[:i]:
                started = time.perf_counter()
                await engines[prev].sleep(prev)
                timings[f"first sleep {prev}"] = round(time.perf_counter() - started, 3)
        started = time.perf_counter()
        vllm_engine = VllmEngine(args.gpu, [m], options, {m: profiles.get(m, args.gpu)})
        await vllm_engine.start()
        engines[m] = vllm_engine
        timings[f"start {m}"] = round(time.perf_counter() - started, 3)
        if i > 0:
            for prev in models[:i]:
                started = time.perf_counter()
                await engines[prev].wake(prev)
                timings[f"wake {prev}"] = round(time.perf_counter() - started, 3)
    for m in models:
        timings[f"kv_capacity_tokens {m}"] = _kv_capacity(engines[m], profiles.get(m, args.gpu))
    timings["gpu_used_gib_both_awake"] = gpu_used_gib()
    return engines


async def warm_up(engines: Mapping[str, Engine], seed: int) -> None:
    rng = np.random.default_rng(seed)
    tasks = []
    for m, engine in engines.items():
        for i in range(8):
            n = 64 + 256 * i
            vocab = int(MODEL_SHAPES[m]["vocab_size"]) if m in MODEL_SHAPES else 32000
            ids = tuple(rng.integers(100, vocab - 100, size=n).tolist())
            outcome = Outcome(Request(f"warm-{m}-{i}", m, n, 16, SLOClass.BATCH_2,
                                      SLO(60.0), 0.0))
            req = EngineRequest(f"warm-{m}-{i}", m, n, 16, prompt_token_ids=ids, ignore_eos=True)
            tasks.append(consume(engine.add(req), outcome, ReplayClock()))
    await asyncio.gather(*tasks)


# ------------------------------------------------------------------ side measurements
async def time_stream(engine: Engine, request: EngineRequest) -> dict[str, Any]:
    started = time.perf_counter()
    first: float | None = None
    n = 0
    async for chunk in engine.add(request):
        if chunk.token_ids and first is None:
            first = time.perf_counter() - started
        n += len(chunk.token_ids)
    return {"ttft_s": round(first, 5) if first is not None else None,
            "total_s": round(time.perf_counter() - started, 5), "num_new_tokens": n}


async def measure_evict(engine: Engine, model: str, prompt_tokens: int, keep_tokens: int,
                        repeats: int, seed: int) -> dict[str, Any]:
    """Abort a request after ``keep_tokens``, resume it; against a fresh prefill of the
    same context length (no cache hit) and a fresh request of the prompt alone."""
    vocab = int(MODEL_SHAPES[model]["vocab_size"]) if model in MODEL_SHAPES else 32000
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(repeats):
        ids = tuple(rng.integers(100, vocab - 100, size=prompt_tokens).tolist())
        max_tokens = keep_tokens * 2
        req = EngineRequest(f"ev{k}", model, prompt_tokens, max_tokens, prompt_token_ids=ids,
                            ignore_eos=True)
        stream = engine.add(req)
        got: list[int] = []
        async for chunk in stream:
            got.extend(chunk.token_ids)
            if len(got) >= keep_tokens:
                break
        started = time.perf_counter()
        progress = await engine.abort(req.request_id)
        abort_s = time.perf_counter() - started
        async for chunk in stream:  # the abort chunk may carry tokens
            got.extend(chunk.token_ids)
        kept = len(got)
        resumed_req = req.resumed(replace(progress, num_generated=kept, token_ids=tuple(got)))
        resumed = await time_stream(engine, resumed_req)
        ctx = prompt_tokens + kept
        fresh_ids = tuple(rng.integers(100, vocab - 100, size=ctx).tolist())
        fresh_ctx = await time_stream(engine, EngineRequest(
            f"evfresh{k}", model, ctx, 8, prompt_token_ids=fresh_ids, ignore_eos=True))
        rows.append({
            "abort_s": round(abort_s, 5), "kept_tokens": kept,
            "resumed_ttft_s": resumed["ttft_s"],
            "resumed_total_tokens": kept + resumed["num_new_tokens"],
            "fresh_same_context_ttft_s": fresh_ctx["ttft_s"],
            "exact_length": kept + resumed["num_new_tokens"] == max_tokens,
        })
    return {"model": model, "prompt_tokens": prompt_tokens, "keep_tokens": keep_tokens,
            "rows": rows,
            "median_abort_s": _median(r["abort_s"] for r in rows),
            "median_readmit_ttft_s": _median(r["resumed_ttft_s"] for r in rows),
            "median_fresh_same_context_ttft_s": _median(
                r["fresh_same_context_ttft_s"] for r in rows)}


def _median(values: Any) -> float:
    xs = [v for v in values if v is not None]
    return round(percentile(xs, 50), 5)


async def measure_swaps(engines: Mapping[str, Engine], models: Sequence[str], rounds: int,
                        seed: int) -> list[dict[str, Any]]:
    """Sleep the second model; then per round swap first→second and back (sleep + wake),
    each followed by one request on the woken model."""
    first, second = models
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    await engines[second].sleep(second)
    rows.append({"step": f"sleep {second}", "s": round(time.perf_counter() - started, 4)})
    rng = np.random.default_rng(seed)
    for r in range(rounds):
        for src, dst in ((first, second), (second, first)):
            t0 = time.perf_counter()
            await engines[src].sleep(src)
            t1 = time.perf_counter()
            await engines[dst].wake(dst)
            t2 = time.perf_counter()
            vocab = int(MODEL_SHAPES[dst]["vocab_size"]) if dst in MODEL_SHAPES else 32000
            ids = tuple(rng.integers(100, vocab - 100, size=512).tolist())
            out = await time_stream(engines[dst], EngineRequest(
                f"sw{r}{dst}", dst, 512, 32, prompt_token_ids=ids, ignore_eos=True))
            rows.append({"step": f"swap {src} -> {dst} (round {r})",
                         "sleep_s": round(t1 - t0, 4), "wake_s": round(t2 - t1, 4),
                         "swap_s": round(t2 - t0, 4), "first_request_ttft_s": out["ttft_s"],
                         "gpu_used_gib": gpu_used_gib()})
    return rows


async def measure_cold_restart(engines: dict[str, Engine], model: str, args: argparse.Namespace,
                               profiles: ProfileBook) -> dict[str, Any]:
    """Shut the model's engine down and start it again (compile cache warm), then serve."""
    started = time.perf_counter()
    await engines[model].close()
    close_s = time.perf_counter() - started
    if args.engine == "sim":
        from qlm.engine.simulated import SimulatedEngine

        engine: Any = SimulatedEngine([profiles.get(model, args.gpu)])
    else:
        from qlm.engine.vllm_engine import VllmEngine, VllmOptions

        await asyncio.sleep(2.0)  # let the engine process release its GPU memory
        options = VllmOptions(gpu_memory_utilization=args.gpu_memory_utilization,
                              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                              load_format="dummy")
        engine = VllmEngine(args.gpu, [model], options, {model: profiles.get(model, args.gpu)})
    started = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - started
    vocab = int(MODEL_SHAPES[model]["vocab_size"]) if model in MODEL_SHAPES else 32000
    ids = tuple(np.random.default_rng(1).integers(100, vocab - 100, size=512).tolist())
    out = await time_stream(engine, EngineRequest("cold0", model, 512, 32, prompt_token_ids=ids,
                                                  ignore_eos=True))
    engines[model] = engine
    return {"model": model, "shutdown_s": round(close_s, 3), "start_s": round(start_s, 3),
            "first_request_ttft_s": out["ttft_s"],
            "restart_total_s": round(close_s + 2.0 * (args.engine != "sim") + start_s
                                     + (out["ttft_s"] or 0), 3)}


# ------------------------------------------------------------------ main
def table(result: Mapping[str, Any]) -> str:
    lines = ["variant | class | SLO s | attainment | TTFT p50 / p99 s | evicted | tok/s"]
    for name, v in result["variants"].items():
        s = v["summary"]
        for cls, c in s["classes"].items():
            lines.append(f"{name} | {cls} | {c['slo_ttft_s']} | {c['slo_attainment']:.3f} | "
                         f"{c['ttft_p50_s']:.3f} / {c['ttft_p99_s']:.3f} | {c['num_evicted']} | "
                         f"{s['output_tok_per_s']}")
    return "\n".join(lines)


async def _main(args: argparse.Namespace, result: dict[str, Any], save: Any) -> None:
    t_start = time.perf_counter()

    def elapsed() -> float:
        return time.perf_counter() - t_start

    models = args.models.split(",")
    sim_kv = {m: args.sim_kv_tokens for m in models} if args.engine == "sim" else {}
    profiles = load_profiles(models, args.gpu, sim_kv)
    workload = build_workload(args)
    result["workload"] = dict(workload.description)
    result["slos_s"] = dict(workload.slos)
    if args.engine == "vllm":
        import vllm

        result["vllm_version"] = vllm.__version__
    timings: dict[str, Any] = {}
    result["engine_start"] = timings
    engines = await make_engines(args, models, profiles, timings)
    result["kv_capacity_tokens"] = {m: _kv_capacity(engines[m], profiles.get(m, args.gpu))
                                    for m in models}
    print("ENGINES", timings, f"at {elapsed():.1f}s", flush=True)
    save()
    await warm_up(engines, args.seed)
    for index, name in enumerate(args.variants.split(",")):
        if elapsed() > args.budget_s - args.variant_timeout_s:
            result["skipped"].append(f"variant {name}: time budget")
            continue
        prompts = draw_prompts(workload.requests, args.seed + 1000 * (index + 1))
        started = time.perf_counter()
        if name == "bare":
            raw = await run_bare(engines, workload, prompts, args.variant_timeout_s)
        else:
            stack = InProcessStack(name, engines, args.gpu, profiles, workload, prompts, args)
            raw = await stack.run(args.variant_timeout_s)
        outcomes = raw.pop("outcomes")
        result["variants"][name] = {
            "summary": summarise(outcomes, workload.slos), **raw,
            "wall_s": round(time.perf_counter() - started, 2),
            "requests": [[o.request.id, o.request.arrival_at, o.first_token_at and
                          round(o.first_token_at, 4), o.finished_at and round(o.finished_at, 4),
                          o.num_generated, o.num_evictions] for o in outcomes],
        }
        print("VARIANT", name, json.dumps(result["variants"][name]["summary"]), raw,
              f"at {elapsed():.1f}s", flush=True)
        save()
        await asyncio.sleep(1.0)
    print(table(result), flush=True)
    side: dict[str, Any] = {}
    result["side_measurements"] = side
    if not args.side:
        steps: list[tuple[str, float, Any]] = []
    else:
        steps = [
            ("evict_readmit", 40, lambda: measure_evict(
                engines[models[0]], models[0], args.evict_prompt_tokens,
                args.evict_keep_tokens, 3, args.seed)),
            ("swaps", 30, lambda: measure_swaps(engines, models, 2, args.seed)),
            ("cold_restart", args.cold_restart_need_s,
             lambda: measure_cold_restart(engines, models[0], args, profiles)),
        ]
    for name, need_s, measure in steps:
        if elapsed() > args.budget_s - need_s:
            result["skipped"].append(f"{name}: time budget")
            continue
        try:
            side[name] = await measure()
        except Exception as error:
            side[name] = {"error": "".join(traceback.format_exception(error))[-2000:]}
        print(name.upper(), side[name], flush=True)
        save()
    for engine in engines.values():
        try:
            await engine.close()
        except Exception as error:
            print("close failed:", repr(error), flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=("vllm", "sim"), default="vllm")
    p.add_argument("--models", default="mistral-7b,qwen2.5-1.5b")
    p.add_argument("--gpu", default="H100-80GB", help="profile GPU label")
    p.add_argument("--slice", default=".stage/azure_conv_0_400.csv")
    p.add_argument("--num-interactive", type=int, default=400)
    p.add_argument("--speedup", type=float, default=3.0)
    p.add_argument("--second-model-every", type=int, default=4)
    p.add_argument("--num-batch", type=int, default=300, help="batch requests per model")
    p.add_argument("--batch-at-s", type=float, default=2.0)
    p.add_argument("--warmup-s", type=float, default=0.5, help="first arrival at this time")
    p.add_argument("--interactive-slo-s", type=float, default=2.0)
    p.add_argument("--batch1-slo-s", type=float, default=60.0)
    p.add_argument("--batch2-slo-s", type=float, default=120.0)
    p.add_argument("--variants", default="bare,fcfs,qlm",
                   help="bare, or a policy name; <policy>+opts runs it with --qlm-options")
    p.add_argument("--qlm-options", default='{"hopeless_p": 0.0}',
                   help="policy options (JSON) of the <policy>+opts variants")
    p.add_argument("--prefill-cap", type=int, default=DEFAULT_PREFILL_CAP_TOKENS,
                   help="in-process variants: the worker's cap on admitted, not yet prefilled "
                        "context tokens per engine (0: none, the behaviour before)")
    p.add_argument("--no-side", dest="side", action="store_false",
                   help="skip the evict / swap / cold restart measurements")
    p.add_argument("--code-version", default="", help="recorded as given (e.g. a git commit)")
    p.add_argument("--group-window-s", type=float, default=1.0)
    p.add_argument("--tick-s", type=float, default=0.25)
    p.add_argument("--min-decision-interval-s", type=float, default=0.05)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.42)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--sim-time-scale", type=float, default=1.0,
                   help="--engine sim: x times faster than the profile (below 1: slower, "
                        "like two engines sharing one GPU)")
    p.add_argument("--sim-kv-tokens", type=int, default=120_000)
    p.add_argument("--variant-timeout-s", type=float, default=90.0)
    p.add_argument("--budget-s", type=float, default=540.0)
    p.add_argument("--cold-restart-need-s", type=float, default=60.0)
    p.add_argument("--evict-prompt-tokens", type=int, default=2048)
    p.add_argument("--evict-keep-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-results"))
    p.add_argument("--name", default="qlm_vs_fcfs")
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "device": device_facts(), "engine": args.engine,
        "command": " ".join(["python3 -m loadgen.gpu.qlm_vs_fcfs", *sys.argv[1:]]),
        "args": vars(args), "variants": {}, "skipped": [], "error": None,
    }

    def save() -> None:
        write_json(out / f"{args.name}.json", result)

    started = time.time()
    try:
        asyncio.run(_main(args, result, save))
    except BaseException as error:  # keep what was measured, say what broke
        result["error"] = "".join(traceback.format_exception(error))[-4000:]
        traceback.print_exc()
    result["total_s"] = round(time.time() - started, 1)
    save()
    print("DONE", "ok" if result["error"] is None else "FAILED", result["total_s"], flush=True)
    return 0 if result["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
