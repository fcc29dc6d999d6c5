"""The simulated engine: continuous batching that follows a performance profile in real time.

It runs the model of :mod:`qlm.sim.engine` (the discrete-event simulator) on a clock
instead of an event queue, with the same step model (:mod:`qlm.sim.batching`: admission,
chunk plan, step times, decode segments, KV copies):

* **prefill** by ``prefill_mode``: ``chunked`` (the default, vLLM's; see below) or
  ``whole``, prefill-first: at a step boundary, requests waiting in the engine
  are prefilled together in one step (FIFO, at least one, at most
  ``max_prefill_tokens`` context tokens, within free batch slots and the KV cache)
  while the running batch waits; the step takes ``prefill_s(sum of context tokens)``
  (a resumed request recomputes prompt + kept output) and emits each admitted
  request's first new token. One request alone: TTFT = ``prefill_s(prompt)``.
* **decode segments**: otherwise every running request advances by one token per
  step of ``decode_step_s(batch, context)``; a segment of k steps lasts
  ``decode_segment_s`` and ends at the next completion, when the KV cache would
  overflow, after ``max_segment_s`` of wall time (so tokens stream), or at the next
  step boundary when a request is added or aborted.
* **KV overflow**: when the running context + one token each would exceed the KV
  capacity, the latest admitted request is preempted back to the waiting list
  (progress kept, recomputed by prefill), like vLLM.
* **KV state swap**: ``abort(id, keep_kv=True)`` copies the request's KV state to CPU
  memory (the engine stalls ``tokens × bytes per token / PCIe bandwidth`` at its next
  step boundary); when the request is added again with the same context, the copy
  back replaces its prefill and it rejoins the batch without a new token, as in the
  simulator.
* **model swap**: ``sleep(model)`` takes ``sleep_s``, ``wake(model)`` ``wake_s`` of
  the model's profile (every model given to the engine is resident).

With ``prefill_mode="chunked"`` (vLLM's engine; :data:`qlm.sim.batching.PREFILL_MODES`)
prefill is not a step of its own: every step has a budget of ``max_prefill_tokens``
tokens, one per decoding request first, then prompt chunks of the requests being
prefilled (in admission order), then newly admitted ones; it takes
:func:`~qlm.sim.batching.mixed_step_s`. A request added while the engine is busy joins
one step late (asynchronous scheduling: a step is planned when the previous one
begins), and every chunk reaches its stream :func:`~qlm.sim.batching.output_latency_s`
after its step. The simulator's ``prefill_mode="chunked"`` is the same model.

While the engine is busy, each step starts where the previous one was due to end, not
when the event loop got round to it: the modelled GPU keeps its pace (tokens are only
emitted late) as long as the loop lags by less than ``max_lag_s``.

Output of a model without a checkpoint stops at ``max_tokens`` (no end-of-sequence is
modelled; ``ignore_eos`` is implied) and its token ids are fake but deterministic. A model
given a :class:`~qlm.engine.text.TextModel` (its workers-file entry names a checkpoint
directory) serves real text with :mod:`qlm.engine.text`, as the vLLM engine does: text
and chat prompts are encoded with its tokenizer and chat template (the prompt's real
token count then drives the timing), and the "model" repeats its prompt: output token
``i`` is the ``i``-th of the prompt's non-special tokens followed by an EOS id, over and
over (:func:`echo_script`; without the EOS under ``ignore_eos``), detokenized
incrementally, ended by the EOS (``"stop"``), a stop string (``"stop"``) or
``max_tokens`` (``"length"``). ``time_scale`` > 1 runs faster than
the real GPU (10: ten times faster); all reported times (stats) are engine seconds,
i.e. what the real GPU would take. The clock is injected (the loop's by default).
"""

from __future__ import annotations

import asyncio
import math
import zlib
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from qlm.aio import cancel_and_wait
from qlm.core.errors import InvalidInput, NotFound
from qlm.core.perf import PerfProfile
from qlm.engine.base import EngineRequest, EngineStats, FinishReason, OutputChunk, Progress
from qlm.engine.clock import Clock, LoopClock
from qlm.engine.text import OutputText, TextModel, tokenized
from qlm.sim.batching import (
    PREFILL_MODES,
    PrefillPlan,
    admit_prefix,
    decode_segment_s,
    decode_steps,
    decode_steps_within,
    kv_copy_s,
    mixed_step_s,
    output_latency_s,
    plan_chunks,
    plan_prefill,
    prefill_step_s,
)
from qlm.sim.cluster import SimConfig

#: Prompt tokens one prefill step admits at most (the simulator's default).
DEFAULT_MAX_PREFILL_TOKENS = SimConfig().max_prefill_tokens
#: Longest decode segment in wall seconds before its tokens are emitted.
DEFAULT_MAX_SEGMENT_S = 0.05
#: Wall seconds of event-loop lag a busy engine makes up for (see the module docstring).
DEFAULT_MAX_LAG_S = 0.25
#: Evicted requests whose KV state the engine remembers keeping in CPU memory.
MAX_KV_ON_CPU = 10_000
FAKE_VOCAB_SIZE = 32000


@dataclass(eq=False)
class _Seq:
    request: EngineRequest
    num_generated: int
    token_ids: list[int]
    outbox: asyncio.Queue[OutputChunk] = field(default_factory=asyncio.Queue)
    prefilled: bool = False
    restore: bool = False  # its KV state comes back from CPU memory instead of a prefill
    aborted: bool = False
    base_token: int = 0
    added_at: float = 0.0  # on the clock: when it joined the waiting list
    prefill_need: int = 0  # chunked: tokens its prefill computes (0: a KV restore)
    prefill_done: int = 0  # chunked: of which done
    delivery: asyncio.Task[None] | None = None  # the latest delayed chunk (chunked)
    output: OutputText | None = None  # a model with a tokenizer: its text and stops
    script: tuple[int, ...] = ()  # ... and the token ids it repeats (echo_script)

    @property
    def context_tokens(self) -> int:
        return self.request.prompt_tokens + self.num_generated

    @property
    def remaining_tokens(self) -> int:
        return self.request.max_tokens - self.num_generated


def echo_script(text: TextModel, prompt_ids: tuple[int, ...], ignore_eos: bool) -> tuple[int, ...]:
    """The ids a simulated model with a tokenizer repeats: the prompt's non-special ids,
    then its lowest EOS id (left out under ``ignore_eos`` unless nothing else is left)."""
    body = tuple(t for t in prompt_ids if t not in text.special_ids)
    eos = (min(text.eos_token_ids),)
    return body if body and ignore_eos else body + eos


def fake_token_id(base: int, index: int) -> int:
    """The simulated output token at position ``index`` of a request (deterministic)."""
    return (base + index * 7919) % FAKE_VOCAB_SIZE


#: Words the simulated engine "generates": a client reading its output sees text, not ids.
_FAKE_WORDS: Final = (
    "the", "queue", "serves", "every", "request", "before", "its", "deadline", "and",
    "a", "GPU", "runs", "tokens", "in", "batches", "while", "interactive", "work",
    "waits", "less", "than", "batch", "jobs", "of", "many", "models", "share", "one",
    "scheduler", "that", "orders", "groups", "by", "expected", "attainment", "so",
    "more", "users", "meet", "their", "SLO", "with", "fewer", "swaps", "evictions",
    "keep", "progress", "when", "KV", "cache", "fills", "up", "prefill", "decode",
    "time", "per", "output", "token", "is", "measured", "on", "real", "hardware",
    "today.",
)


def fake_token_text(token_id: int) -> str:
    """The text of a simulated output token: a word and the space before it."""
    return " " + _FAKE_WORDS[token_id % len(_FAKE_WORDS)]


class SimulatedEngine:
    """An :class:`~qlm.engine.base.Engine` without a GPU (see the module docstring).

    ``profiles``: one per model this engine holds, all of one GPU type.
    ``active_model``: awake at start (default: the first profile's model).
    """

    def __init__(
        self,
        profiles: Iterable[PerfProfile],
        *,
        active_model: str | None = None,
        clock: Clock | None = None,
        time_scale: float = 1.0,
        max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
        max_segment_s: float = DEFAULT_MAX_SEGMENT_S,
        max_lag_s: float = DEFAULT_MAX_LAG_S,
        pcie_gb_s: float = SimConfig().pcie_gb_s,
        prefill_mode: str = SimConfig().prefill_mode,
        text_models: Mapping[str, TextModel] | None = None,
    ) -> None:
        by_model = {p.model: p for p in profiles}
        if not by_model:
            raise InvalidInput("profiles", "at least one profile is needed")
        gpus = {p.gpu for p in by_model.values()}
        if len(gpus) != 1:
            raise InvalidInput("profiles", f"must all be of one GPU type, got {sorted(gpus)}")
        if not time_scale > 0:
            raise InvalidInput("time_scale", f"must be > 0, got {time_scale}")
        if max_prefill_tokens <= 0:
            raise InvalidInput("max_prefill_tokens", f"must be > 0, got {max_prefill_tokens}")
        if not max_segment_s > 0:
            raise InvalidInput("max_segment_s", f"must be > 0, got {max_segment_s}")
        if prefill_mode not in PREFILL_MODES:
            raise InvalidInput("prefill_mode", f"must be one of {PREFILL_MODES}, "
                               f"got {prefill_mode!r}")
        first = next(iter(by_model))
        active = first if active_model is None else active_model
        if active not in by_model:
            raise InvalidInput("active_model", f"{active!r} is not one of {sorted(by_model)}")
        self._profiles: Mapping[str, PerfProfile] = by_model
        self._texts = dict(text_models or {})
        for model in self._texts:
            if model not in by_model:
                raise InvalidInput("text_models", f"{model!r} is not one of {sorted(by_model)}")
        self._gpu = gpus.pop()
        self._active: str | None = active
        self._clock: Clock = clock or LoopClock()
        self.time_scale = float(time_scale)
        self.max_prefill_tokens = max_prefill_tokens
        self.max_segment_s = max_segment_s
        self.max_lag_s = max_lag_s
        self.pcie_gb_s = pcie_gb_s
        self.prefill_mode = prefill_mode
        self._chunked = prefill_mode == "chunked"
        self._last_step_at = 0.0  # on the clock: when the latest step began
        self._deliveries: set[asyncio.Task[None]] = set()
        self._stall_s = 0.0
        self._kv_on_cpu: dict[str, int] = {}
        self._busy_until: float | None = None
        self._last_end_at = 0.0
        self._observed_from = 0.0
        self._seqs: dict[str, _Seq] = {}
        self._waiting: list[_Seq] = []
        self._running: list[_Seq] = []
        self._changed = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._swapping = False
        self._num_steps = 0
        self._observed_s = 0.0
        self._predicted_s = 0.0
        self._num_output_tokens = 0
        self._num_swaps = 0

    # ---------------------------------------------------------------- identity
    @property
    def gpu(self) -> str:
        return self._gpu

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self._profiles)

    @property
    def active_model(self) -> str | None:
        return None if self._swapping else self._active

    def profile(self, model: str) -> PerfProfile:
        try:
            return self._profiles[model]
        except KeyError:
            known = sorted(self._profiles)
            raise InvalidInput("model", f"{model!r} is not one of {known}") from None

    def kv_copy_s(self, model: str, tokens: int) -> float:
        """Seconds to copy ``tokens`` of KV state between GPU and CPU (as the simulator)."""
        return kv_copy_s(self.profile(model), tokens, self.pcie_gb_s)

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"sim-engine-{self._gpu}")

    async def close(self) -> None:
        for request_id in list(self._seqs):
            self._end(self._seqs[request_id], "abort")
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
        if self._deliveries:  # chunks still on their way (at most one output latency)
            await asyncio.gather(*self._deliveries, return_exceptions=True)

    # ---------------------------------------------------------------- requests
    def add(self, request: EngineRequest) -> AsyncIterator[OutputChunk]:
        if self._task is None:
            raise InvalidInput("engine", "not started")
        if self.active_model is None or request.model != self.active_model:
            raise InvalidInput(
                "model", f"{request.model!r} is not the active model ({self.active_model!r})"
            )
        if request.request_id in self._seqs:
            raise InvalidInput("request_id", f"{request.request_id!r} is already running")
        text = self._texts.get(request.model)
        output = None
        if text is not None:
            request = tokenized(request, text)
            output = text.output(stop=request.stop, ignore_eos=request.ignore_eos,
                                 kept_ids=request.generated_token_ids,
                                 kept_text=request.generated_text)
        capacity = self.profile(request.model).kv_capacity_tokens
        if request.prompt_tokens + request.max_tokens > capacity:
            raise InvalidInput(
                "max_tokens",
                f"prompt {request.prompt_tokens} + max_tokens {request.max_tokens} "
                f"exceeds the KV capacity of {capacity} tokens",
            )
        seq = _Seq(
            request=request,
            num_generated=request.num_generated,
            token_ids=list(request.generated_token_ids),
            base_token=zlib.crc32(request.request_id.encode()),
            added_at=self._clock.now(),
            output=output,
        )
        if text is not None:
            seq.script = echo_script(text, request.prompt_token_ids or (), request.ignore_eos)
        kept = self._kv_on_cpu.pop(request.request_id, None)
        seq.restore = request.num_generated > 0 and kept == request.context_tokens
        self._seqs[request.request_id] = seq
        self._waiting.append(seq)
        self._changed.set()
        return _drain(seq.outbox)

    async def abort(self, request_id: str, keep_kv: bool = False) -> Progress:
        seq = self._seqs.get(request_id)
        if seq is None:
            raise NotFound("request", request_id)
        progress = Progress(request_id, seq.num_generated, tuple(seq.token_ids))
        if keep_kv and seq.prefilled and self._active is not None:
            while len(self._kv_on_cpu) >= MAX_KV_ON_CPU:  # forget the oldest
                self._kv_on_cpu.pop(next(iter(self._kv_on_cpu)))
            self._kv_on_cpu[request_id] = seq.context_tokens
            self._stall_s += self.kv_copy_s(self._active, seq.context_tokens)
        self._end(seq, "abort")
        self._changed.set()
        return progress

    # ---------------------------------------------------------------- model swap
    async def sleep(self, model: str) -> None:
        profile = self.profile(model)
        if self._active != model or self._swapping:
            raise InvalidInput("model", f"{model!r} is not awake")
        if self._seqs:
            raise InvalidInput(
                "model", f"{model!r} still has {len(self._seqs)} requests; abort them first"
            )
        self._swapping = True
        self._num_swaps += 1
        await self._idle.wait()
        stall_s, self._stall_s = self._stall_s, 0.0  # KV copies still under way come first
        self._kv_on_cpu.clear()
        await self._pause(stall_s + profile.sleep_s)
        self._active = None
        self._swapping = False

    async def wake(self, model: str) -> None:
        profile = self.profile(model)
        if self._active is not None or self._swapping:
            raise InvalidInput("model", f"{self._active!r} is awake; put it to sleep first")
        self._swapping = True
        try:
            await self._pause(profile.wake_s)
        finally:
            self._swapping = False
        self._active = model
        self._changed.set()

    async def swap(self, to_model: str) -> None:
        """Sleep the active model (if any), then wake ``to_model``: the profile's
        ``sleep_s + wake_s``, one after the other, as the simulator prices a swap."""
        self.profile(to_model)
        current = self._active
        if current == to_model:
            return
        if current is not None:
            await self.sleep(current)
        await self.wake(to_model)

    async def _pause(self, engine_s: float) -> None:
        await self._clock.sleep_until(self._clock.now() + engine_s / self.time_scale)

    # ---------------------------------------------------------------- stats
    def stats(self) -> EngineStats:
        model = self.active_model
        capacity = self._profiles[model].kv_capacity_tokens if model else 0
        return EngineStats(
            active_model=model,
            batch_size=len(self._running),
            num_waiting=len(self._waiting),
            kv_used_tokens=sum(s.context_tokens for s in self._running),
            kv_capacity_tokens=capacity,
            num_steps=self._num_steps,
            step_time_observed_s=self._observed_s,
            step_time_predicted_s=self._predicted_s,
            num_output_tokens=self._num_output_tokens,
            num_swaps=self._num_swaps,
        )

    # ---------------------------------------------------------------- the loop
    async def _run(self) -> None:
        while True:
            busy = self._waiting or self._running or self._stall_s > 0
            if self._active is None or self._swapping or not busy:
                self._busy_until = None
                self._idle.set()
                self._changed.clear()
                await self._changed.wait()
                continue
            self._idle.clear()
            profile = self._profiles[self._active]
            if self._stall_s > 0:  # KV state of evicted requests is copied out first
                await self._stall()
                continue
            self._preempt_overflow(profile)
            if self._chunked:
                if not await self._chunked_step(profile):  # nothing fits: wait for a change
                    self._busy_until = None
                    self._idle.set()
                    self._changed.clear()
                    await self._changed.wait()
                continue
            plan = plan_prefill(
                (s.context_tokens for s in self._waiting),
                len(self._running),
                sum(s.context_tokens for s in self._running),
                profile,
                self.max_prefill_tokens,
            )
            if plan.positions:
                await self._prefill(profile, plan)
            elif self._running:
                await self._decode(profile)
            else:  # nothing fits: wait for a change (an abort frees room)
                self._busy_until = None
                self._idle.set()
                self._changed.clear()
                await self._changed.wait()

    def _preempt_overflow(self, profile: PerfProfile) -> None:
        while self._running and (
            sum(s.context_tokens for s in self._running) + len(self._running)
            > profile.kv_capacity_tokens
        ):
            seq = self._running.pop()
            seq.prefilled = False
            seq.prefill_done = 0
            seq.added_at = self._clock.now()
            self._waiting.insert(0, seq)

    async def _prefill(self, profile: PerfProfile, plan: PrefillPlan) -> None:
        batch = [self._waiting[i] for i in plan.positions]
        del self._waiting[: len(batch)]
        self._running.extend(batch)
        recompute = sum(s.context_tokens for s in batch if not s.restore)
        restore_s = sum(self.kv_copy_s(profile.model, s.context_tokens) for s in batch if s.restore)
        predicted = prefill_step_s(profile, recompute, restore_s)
        started_at = self._step_start()
        await self._clock.sleep_until(started_at + predicted / self.time_scale)
        self._account(1, predicted, started_at)
        for seq in batch:
            seq.prefilled = True
            if seq.restore:  # back from CPU memory: it rejoins the batch, no token yet
                seq.restore = False
            else:  # a prefill emits the next token
                self._emit(seq, 1)

    async def _chunked_step(self, profile: PerfProfile) -> bool:
        """One chunked step (or a decode segment when nothing is to prefill); False if
        there is nothing to run."""
        decoding = [s for s in self._running if s.prefilled]
        prefilling = [s for s in self._running if not s.prefilled]
        # asynchronous scheduling: a busy engine planned this step when the last one began
        visible_until = self._last_step_at if self._running else math.inf
        visible = []
        for seq in self._waiting:
            if seq.added_at > visible_until:
                break
            visible.append(seq)
        deferred = len(visible) < len(self._waiting)
        num_fit = admit_prefix(
            ((s.context_tokens + 1, s.context_tokens) for s in visible),
            profile.max_batch_size - len(self._running),
            profile.kv_capacity_tokens - sum(s.context_tokens for s in self._running)
            - len(self._running),
        )
        candidates = visible[:num_fit]
        plan = plan_chunks(
            self.max_prefill_tokens,
            len(decoding),
            [s.prefill_need - s.prefill_done for s in prefilling],
            (0 if s.restore else s.context_tokens for s in candidates),
        )
        admitted = candidates[: len(plan.admitted)]
        del self._waiting[: len(admitted)]
        for seq in admitted:
            seq.prefill_need = 0 if seq.restore else seq.context_tokens
            seq.prefill_done = 0
            self._running.append(seq)
        chunks = [*zip(prefilling, plan.continuing, strict=True),
                  *zip(admitted, plan.admitted, strict=True)]
        if chunks:
            restore_s = sum(
                self.kv_copy_s(profile.model, s.context_tokens) for s in admitted if s.restore
            )
            await self._mixed_step(profile, decoding, chunks, restore_s)
            return True
        if decoding:
            await self._decode(profile, max_steps=1 if deferred else None)
            return True
        return False

    async def _mixed_step(
        self,
        profile: PerfProfile,
        decoding: list[_Seq],
        chunks: list[tuple[_Seq, int]],
        restore_s: float,
    ) -> None:
        context = sum(s.context_tokens for s in decoding)
        prefill_tokens = sum(take for _, take in chunks)
        predicted = mixed_step_s(profile, len(decoding), context, prefill_tokens) + restore_s
        started_at = self._step_start()
        self._last_step_at = started_at
        await self._clock.sleep_until(started_at + predicted / self.time_scale)
        self._account(1, predicted, started_at)
        for seq in decoding:
            if not seq.aborted:
                self._emit(seq, 1)
        for seq, take in chunks:
            seq.prefill_done += take
            if seq.aborted or seq.prefill_done < seq.prefill_need:
                continue
            seq.prefilled = True
            if seq.restore:  # back from CPU memory: it rejoins the batch, no token yet
                seq.restore = False
            else:  # the last chunk emits the next token
                self._emit(seq, 1)

    async def _stall(self) -> None:
        stall_s, self._stall_s = self._stall_s, 0.0
        started_at = self._step_start()
        await self._clock.sleep_until(started_at + stall_s / self.time_scale)
        self._busy_until = started_at + stall_s / self.time_scale
        self._last_end_at = self._clock.now()

    async def _decode(self, profile: PerfProfile, max_steps: int | None = None) -> None:
        batch = list(self._running)
        ctx0 = sum(s.context_tokens for s in batch)
        steps = decode_steps(
            profile,
            len(batch),
            ctx0,
            min(s.remaining_tokens for s in batch),
            self.max_segment_s * self.time_scale,
        )
        if max_steps is not None:
            steps = min(steps, max_steps)
        started_at = self._step_start()
        segment_s = decode_segment_s(profile, len(batch), ctx0, steps)
        self._changed.clear()
        if await self._wait_until_or_changed(started_at + segment_s / self.time_scale):
            elapsed = (self._clock.now() - started_at) * self.time_scale
            steps = min(steps, decode_steps_within(profile, len(batch), ctx0, elapsed) + 1)
            segment_s = decode_segment_s(profile, len(batch), ctx0, steps)
            await self._clock.sleep_until(started_at + segment_s / self.time_scale)
        self._account(steps, segment_s, started_at)
        last_step_s = decode_segment_s(profile, len(batch), ctx0, steps - 1)
        self._last_step_at = started_at + last_step_s / self.time_scale
        for seq in batch:
            if not seq.aborted:
                self._emit(seq, steps)

    async def _wait_until_or_changed(self, end_at: float) -> bool:
        """Wait until ``end_at`` on the clock; True if a change came first."""
        timer = asyncio.ensure_future(self._clock.sleep_until(end_at))
        change = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait({timer, change}, return_when=asyncio.FIRST_COMPLETED)
            interrupted = not timer.done()
        finally:
            for future in (timer, change):
                future.cancel()
        return interrupted

    def _step_start(self) -> float:
        """When the next step starts on the clock: right where the previous one was due
        to end while the engine stays busy (so that event-loop lag does not slow the
        modelled GPU down), else now."""
        now = self._clock.now()
        if self._busy_until is not None and now - self._busy_until <= self.max_lag_s:
            self._observed_from = self._last_end_at
            return min(now, self._busy_until)
        self._observed_from = now
        return now

    def _account(self, steps: int, predicted_s: float, started_at: float) -> None:
        """Count ``steps`` that started at ``started_at`` (clock) and were predicted to take
        ``predicted_s`` engine seconds. Observed time runs from the end of the previous
        step (while busy) to now, so lag is counted once, not again by every step."""
        now = self._clock.now()
        self._busy_until = started_at + predicted_s / self.time_scale
        self._num_steps += steps
        self._predicted_s += predicted_s
        self._observed_s += max(0.0, now - self._observed_from) * self.time_scale
        self._last_end_at = now

    # ---------------------------------------------------------------- output
    def _emit(self, seq: _Seq, num_tokens: int) -> None:
        if seq.aborted:
            return
        count = min(num_tokens, seq.remaining_tokens)
        start = seq.num_generated
        text = ""
        reason: FinishReason | None = None
        if seq.output is None:  # no tokenizer: a word per simulated token, for readers
            new = tuple(fake_token_id(seq.base_token, i) for i in range(start, start + count))
            text = "".join(map(fake_token_text, new))
        else:
            script = seq.script
            delta = seq.output.feed([script[i % len(script)] for i in range(start, start + count)])
            new, text, reason = delta.token_ids, delta.text, delta.finish_reason
        seq.token_ids.extend(new)
        seq.num_generated += len(new)
        self._num_output_tokens += len(new)
        if reason is None and seq.num_generated >= seq.request.max_tokens:
            reason = "length"
            text += seq.output.flush() if seq.output is not None else ""
        done = reason is not None
        chunk = OutputChunk(seq.request.request_id, new, seq.num_generated, text,
                            finish_reason=reason)
        latency = output_latency_s(self._profiles[seq.request.model]) if self._chunked else 0.0
        self._deliver(seq, chunk, latency)
        if done:
            self._forget(seq)

    def _end(self, seq: _Seq, reason: FinishReason) -> None:
        held = seq.output.flush() if seq.output is not None else ""
        self._deliver(seq, OutputChunk(seq.request.request_id, (), seq.num_generated, held,
                                       finish_reason=reason), 0.0)
        self._forget(seq)

    def _deliver(self, seq: _Seq, chunk: OutputChunk, delay_s: float) -> None:
        """Put ``chunk`` on the request's stream ``delay_s`` engine seconds from now,
        after every chunk sent before it."""
        previous = seq.delivery
        if delay_s <= 0 and (previous is None or previous.done()):
            seq.outbox.put_nowait(chunk)
            return
        at = self._clock.now() + delay_s / self.time_scale

        async def later() -> None:
            await self._clock.sleep_until(at)
            if previous is not None:
                await previous
            seq.outbox.put_nowait(chunk)

        task = asyncio.create_task(later())
        seq.delivery = task
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    def _forget(self, seq: _Seq) -> None:
        seq.aborted = True
        self._seqs.pop(seq.request.request_id, None)
        if seq in self._running:
            self._running.remove(seq)
        if seq in self._waiting:
            self._waiting.remove(seq)


async def _drain(outbox: asyncio.Queue[OutputChunk]) -> AsyncIterator[OutputChunk]:
    while True:
        chunk = await outbox.get()
        yield chunk
        if chunk.finished:
            return
