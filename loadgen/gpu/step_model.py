"""A step-level model of one vLLM engine (v1 scheduler), driven by a measured profile.

It is the reference the simulator's ``prefill_mode="chunked"`` is checked against (one
step per event, no segments, no policy): what the simulator must model to reproduce real
vLLM within 10 %:
vLLM 0.25 does **chunked prefill mixed into decode steps** with **asynchronous
scheduling**, and a first token reaches the client a fixed latency after its step.

* Every step serves all decoding requests (one token each) plus prompt chunks of
  waiting/partially prefilled requests, FCFS, up to ``max_num_batched_tokens`` tokens.
* Step time = ``decode_step_s(B, ctx)`` of the decoding requests + the prefill chunk's
  marginal cost ``prefill_s(n) − L − base`` (``prefill_s(n) − L`` when nothing decodes).
* ``L`` (output latency) = the profile's smallest prefill time minus one decode step at
  batch 1: what a single-request TTFT measures beyond GPU work (front-end, IPC, sampling).
  Every token reaches the client ``L`` after its step ends.
* Asynchronous scheduling: while the engine is busy, step ``k+1`` is scheduled when step
  ``k`` starts, so a request that arrives during step ``k`` joins step ``k+2`` at the earliest.
* Admission is FCFS while running requests < ``max_batch_size``, their KV tokens fit
  ``kv_capacity_tokens`` (no preemption: the replays here stay far below capacity) and
  the step's token budget has room for a chunk.

Every step is planned by the step model the simulator and the simulated engine share
(:mod:`qlm.sim.batching`: :func:`~qlm.sim.batching.admit_prefix`,
:func:`~qlm.sim.batching.plan_chunks`, :func:`~qlm.sim.batching.mixed_step_s`); this
module only drives it one step per event. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from qlm.core.errors import InvalidInput
from qlm.core.perf import PerfProfile
from qlm.sim.batching import admit_prefix, mixed_step_s, output_latency_s, plan_chunks

from .common import RequestTiming, TraceRequest


@dataclass(slots=True)
class _Live:
    index: int
    prompt_tokens: int
    output_tokens: int
    prefilled: int = 0
    generated: int = 0

    @property
    def decoding(self) -> bool:
        return self.prefilled >= self.prompt_tokens

    @property
    def kv_tokens(self) -> int:
        return self.prefilled + self.generated


@dataclass(frozen=True, slots=True)
class StepModel:
    """One engine: ``profile`` plus vLLM's scheduling knobs."""

    profile: PerfProfile
    max_num_batched_tokens: int = 8192
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens <= 0:
            raise InvalidInput("max_num_batched_tokens", "must be > 0")

    @property
    def output_latency_s(self) -> float:
        """``L``: single-request TTFT of the shortest measured prompt beyond one decode step
        (:func:`qlm.sim.batching.output_latency_s`, shared with the simulator)."""
        return output_latency_s(self.profile)

    def step_s(self, num_decoding: int, decode_context: int, prefill_tokens: int) -> float:
        """Seconds of one step: the decode batch plus a prefill chunk of ``prefill_tokens``
        (:func:`qlm.sim.batching.mixed_step_s`, shared with the simulator)."""
        return mixed_step_s(self.profile, num_decoding, decode_context, prefill_tokens)

    def run(self, requests: Sequence[TraceRequest]) -> list[RequestTiming]:
        """Serve ``requests`` (open loop); timings in the requests' order."""
        if not requests:
            raise InvalidInput("requests", "must not be empty")
        order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
        arrivals = deque(order)
        waiting: deque[_Live] = deque()
        running: list[_Live] = []
        first_at: dict[int, float] = {}
        finish_at: dict[int, float] = {}
        now = scheduled_at = requests[order[0]].arrival_s
        latency = self.output_latency_s
        while arrivals or waiting or running:
            # Requests visible to this step's scheduling: with async scheduling, those that
            # arrived before the previous step began (the engine was busy since then).
            visible_until = scheduled_at if (self.async_scheduling and running) else now
            while arrivals and requests[arrivals[0]].arrival_s <= visible_until:
                i = arrivals.popleft()
                waiting.append(_Live(i, requests[i].prompt_tokens, requests[i].output_tokens))
            if not waiting and not running:
                now = scheduled_at = max(now, requests[arrivals[0]].arrival_s)
                continue
            chunks = self._plan_step(waiting, running)
            decoding = [r for r in running if r.decoding]
            duration = self.step_s(len(decoding), sum(r.kv_tokens for r in decoding),
                                   sum(take for _, take in chunks))
            scheduled_at, now = now, now + duration
            for r in decoding:
                r.generated += 1
            for r, take in chunks:
                r.prefilled += take
                if r.decoding:
                    r.generated += 1
                    first_at[r.index] = now + latency
            for r in [r for r in running if r.generated >= r.output_tokens]:
                finish_at[r.index] = now + latency
                running.remove(r)
        return [RequestTiming(requests[i].arrival_s, first_at[i], finish_at[i],
                              requests[i].output_tokens) for i in range(len(requests))]

    def _plan_step(self, waiting: deque[_Live], running: list[_Live]) -> list[tuple[_Live, int]]:
        """Admit from ``waiting`` into ``running`` and return the step's prompt chunks:
        requests already prefilling first, then the admitted ones (shared step model)."""
        decoding = [r for r in running if r.decoding]
        prefilling = [r for r in running if not r.decoding]
        num_fit = admit_prefix(
            ((r.prompt_tokens, r.prompt_tokens) for r in waiting),
            self.profile.max_batch_size - len(running),
            self.profile.kv_capacity_tokens - sum(r.prompt_tokens + r.generated for r in running),
        )
        plan = plan_chunks(self.max_num_batched_tokens, len(decoding),
                           [r.prompt_tokens - r.prefilled for r in prefilling],
                           (waiting[i].prompt_tokens for i in range(num_fit)))
        admitted = [waiting.popleft() for _ in plan.admitted]
        running.extend(admitted)
        return [(r, take) for r, take in zip(prefilling, plan.continuing, strict=True) if take
                ] + list(zip(admitted, plan.admitted, strict=True))
