"""The one continuous-batching step model: pure step maths shared by every engine model.

Used by the discrete-event simulator (:mod:`qlm.sim.engine`, in segments of steps), the
worker's simulated engine (:mod:`qlm.engine.simulated`, on a clock) and the GPU
fidelity harness's step-level reference (``loadgen/gpu/step_model.py``, one step per
event), so that all three mean the same by a step:

* **admission** (:func:`admit_prefix`): a FIFO prefix of the waiting requests, while a
  batch slot is free and each one's KV need fits (what a KV need is, each caller says:
  the scheduler's reservation in the simulator, the context held in an engine), and, for
  a whole prefill, while its prompt fits the step's token budget (the first always may);
* **chunked prefill** (:func:`plan_chunks`, :func:`mixed_step_s`,
  :func:`output_latency_s`): vLLM's token budget per step, decode first; what the RWT
  estimator asks of it (:func:`chunked_first_token_s`, :func:`chunked_prefill_work_s`):
  when a prompt's first token comes and how much time its chunks add to the steps;
* **whole prefill** (:func:`plan_prefill`, :func:`prefill_step_s`): admitted requests
  prefill in one step while the running batch waits;
* **decode segments** (:func:`decode_segment_s`, :func:`decode_steps_within`,
  :func:`decode_steps`): k steps of a fixed batch in closed form (below);
* **KV state swap** (:func:`kv_copy_s`): a copy over PCIe instead of a recompute;
* **TPOT** (:func:`steady_step_s`, :func:`tpot_batch_cap`): the mean step of a batch held
  at a size, and the largest size whose mean step meets a time-per-output-token target.

A decode step advances every running request by one token and takes
``decode_step_s(B, ctx) = base + per_seq·B + per_ctx·ctx`` where ``ctx`` is the
batch's total KV context. With B requests and ``ctx0`` tokens at the start, step
``i`` (0-based) holds ``ctx0 + B·i`` tokens, so k steps take::

    T(k) = k·(base + per_seq·B + per_ctx·ctx0) + per_ctx·B·k(k−1)/2

The simulator advances a worker by whole segments of steps (until the next
completion, KV exhaustion or interruption) instead of one event per step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from qlm.core.perf import PerfProfile

#: Bytes of KV state per token when a profile does not say (Mistral-7B: 32 layers ×
#: 8 KV heads × 128 dims × K and V × 2 bytes fp16).
DEFAULT_KV_BYTES_PER_TOKEN: Final[int] = 32 * 8 * 128 * 2 * 2


# ---------------------------------------------------------------- admission
def admit_prefix(
    candidates: Iterable[tuple[int, int]], free_slots: int, kv_free: int,
    budget: int | None = None,
) -> int:
    """How many of ``candidates`` (each ``(kv_need, prefill_tokens)``, in queue order) one
    step admits: a FIFO prefix while a batch slot is free and the KV need fits what is
    left of ``kv_free``; with a ``budget``, every admission after the first must also
    fit its prefill tokens in what is left of it (the first always may). Pure."""
    count = 0
    for kv_need, tokens in candidates:
        if free_slots <= 0 or kv_need > kv_free or (
            budget is not None and count and tokens > budget
        ):
            break
        count += 1
        free_slots -= 1
        kv_free -= kv_need
        if budget is not None:
            budget -= tokens
    return count


@dataclass(frozen=True, slots=True)
class PrefillPlan:
    """Which waiting requests one prefill step admits (by position) and its context tokens."""

    positions: tuple[int, ...]
    context_tokens: int


def plan_prefill(
    waiting_context: Iterable[int],
    num_running: int,
    running_context: int,
    profile: PerfProfile,
    max_prefill_tokens: int,
) -> PrefillPlan:
    """An engine's whole-prefill admission: the FIFO prefix of waiting requests (their
    context tokens) one prefill admits (:func:`admit_prefix`; a request needs its
    context plus one new token of KV cache). At least one request when it fits the batch
    and the KV cache; then more while the prefill budget, free batch slots and KV
    capacity last. Pure."""
    waiting = list(waiting_context)
    count = admit_prefix(
        ((tokens + 1, tokens) for tokens in waiting),
        profile.max_batch_size - num_running,
        profile.kv_capacity_tokens - running_context - num_running,
        max_prefill_tokens,
    )
    return PrefillPlan(tuple(range(count)), sum(waiting[:count]))


def prefill_step_s(profile: PerfProfile, recompute_tokens: int, restore_s: float = 0.0) -> float:
    """Seconds of one whole-prefill step: the recomputed context's prefill plus the KV
    restores (:func:`kv_copy_s`) of requests whose state comes back from CPU memory."""
    return profile.prefill_s(recompute_tokens) + restore_s


def kv_copy_s(profile: PerfProfile, tokens: int, pcie_gb_s: float) -> float:
    """Seconds to copy ``tokens`` of KV state between GPU and CPU memory (one way)."""
    bytes_per_token = int(profile.notes.get("kv_bytes_per_token", DEFAULT_KV_BYTES_PER_TOKEN))
    return tokens * bytes_per_token / (pcie_gb_s * 1e9)


# ---------------------------------------------------------------- decode segments


def decode_segment_s(profile: PerfProfile, batch: int, ctx0: int, steps: int) -> float:
    """Seconds of ``steps`` decode steps of ``batch`` requests holding ``ctx0`` tokens."""
    if steps <= 0 or batch <= 0:
        return 0.0
    first = profile.decode_step_s(batch, ctx0)
    return steps * first + profile.decode_per_ctx_token_s * batch * steps * (steps - 1) / 2


def decode_steps_within(profile: PerfProfile, batch: int, ctx0: int, elapsed_s: float) -> int:
    """The number of whole decode steps finished ``elapsed_s`` after the segment began."""
    if elapsed_s <= 0 or batch <= 0:
        return 0
    a = profile.decode_per_ctx_token_s * batch / 2
    b = profile.decode_step_s(batch, ctx0) - a
    k = int((-b + math.sqrt(b * b + 4 * a * elapsed_s)) / (2 * a)) if a > 0 else int(elapsed_s / b)
    while k > 0 and decode_segment_s(profile, batch, ctx0, k) > elapsed_s:
        k -= 1
    while decode_segment_s(profile, batch, ctx0, k + 1) <= elapsed_s:
        k += 1
    return k


def decode_steps(
    profile: PerfProfile,
    batch: int,
    context_tokens: int,
    min_remaining_tokens: int,
    max_segment_s: float = math.inf,
) -> int:
    """Steps of the next decode segment: to the next completion, before the KV cache
    overflows (context + one token each step), and within ``max_segment_s``; at least one."""
    steps = min(min_remaining_tokens, (profile.kv_capacity_tokens - context_tokens) // batch)
    if max_segment_s < math.inf:
        steps = min(steps, decode_steps_within(profile, batch, context_tokens, max_segment_s))
    return max(1, steps)


# ---------------------------------------------------------------- chunked prefill
#: Engine models: ``whole`` prefills admitted requests in one step while the running batch
#: waits; ``chunked`` mixes prompt chunks into decode steps like vLLM ≥ 0.6 (see below).
PREFILL_MODES = ("whole", "chunked")


def output_latency_s(profile: PerfProfile) -> float:
    """``L``: what a single request's TTFT measures beyond GPU work (front-end, IPC,
    sampling): the smallest profiled prefill time minus one decode step at batch 1.
    In the chunked model every token reaches the client ``L`` after its step ends."""
    tokens = profile.prefill_tokens[0]
    return max(0.0, profile.prefill_s(tokens) - profile.decode_step_s(1, tokens))


def mixed_step_s(
    profile: PerfProfile, num_decoding: int, decode_context: int, prefill_tokens: int,
    latency_s: float | None = None,
) -> float:
    """Seconds of one chunked step: ``num_decoding`` requests holding ``decode_context``
    tokens decode one token each and ``prefill_tokens`` prompt tokens are prefilled.

    = ``decode_step_s(B, ctx)`` + the chunk's marginal work ``prefill_s(n) − L`` (less
    the decode step's fixed cost ``base`` when something decodes: it is paid once);
    ``latency_s``: ``L`` (:func:`output_latency_s`) when the caller has it already."""
    decode = profile.decode_step_s(num_decoding, decode_context)
    if prefill_tokens <= 0:
        return decode
    if latency_s is None:
        latency_s = output_latency_s(profile)
    chunk = profile.prefill_s(prefill_tokens) - latency_s
    if num_decoding > 0:
        chunk -= profile.decode_base_s
    return decode + max(0.0, chunk)


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """One chunked step: prompt tokens for each request already prefilling (in order) and
    for each newly admitted one (a FIFO prefix of the candidates)."""

    continuing: tuple[int, ...]
    admitted: tuple[int, ...]

    @property
    def prefill_tokens(self) -> int:
        return sum(self.continuing) + sum(self.admitted)


def plan_chunks(
    max_batched_tokens: int,
    num_decoding: int,
    prefilling_remaining: Sequence[int],
    candidate_tokens: Iterable[int],
) -> ChunkPlan:
    """vLLM's token budget for one step: every decoding request takes one token, then the
    requests already prefilling take chunks in order, then candidates (prompt tokens still
    to prefill; 0 for a KV restore) are admitted while budget is left. Pure."""
    budget = max_batched_tokens - num_decoding
    continuing = []
    for remaining in prefilling_remaining:
        take = min(remaining, max(0, budget))
        continuing.append(take)
        budget -= take
    admitted = []
    for tokens in candidate_tokens:
        if budget <= 0:
            break
        take = min(tokens, budget)
        admitted.append(take)
        budget -= take
    return ChunkPlan(tuple(continuing), tuple(admitted))


#: Steps a request queued while a chunked engine is busy waits before its first chunk,
#: on average: asynchronous scheduling plans a step when the previous one begins, so it
#: waits the rest of the current step (half of one) and the whole next one.
ASYNC_ADMISSION_STEPS: Final = 1.5


def chunk_sizes(prompt_tokens: int, max_batched_tokens: int, num_decoding: int) -> list[int]:
    """The chunks a prompt is prefilled in when it is the only prompt of its steps and
    ``num_decoding`` requests decode alongside (each takes one token of the budget)."""
    per_step = max(1, max_batched_tokens - num_decoding)
    full, rest = divmod(max(0, prompt_tokens), per_step)
    return [per_step] * full + ([rest] if rest else [])


def chunked_first_token_s(
    profile: PerfProfile, prompt_tokens: int, num_decoding: int, decode_context: int,
    max_batched_tokens: int, shared_tokens: int = 0,
) -> float:
    """Seconds from a request's admission to its first token under chunked prefill: the
    mixed steps (:func:`mixed_step_s`) that prefill its chunks next to ``num_decoding``
    decoding requests holding ``decode_context`` tokens, then the output latency. Its
    last step also carries ``shared_tokens`` of other prompts admitted with it (up to the
    budget), as :func:`plan_chunks` fills a step. Pure."""
    chunks = chunk_sizes(prompt_tokens, max_batched_tokens, num_decoding) or [0]
    per_step = max(1, max_batched_tokens - num_decoding)
    total = 0.0
    for index, chunk in enumerate(chunks):
        tokens = chunk if index < len(chunks) - 1 else min(per_step, chunk + shared_tokens)
        total += mixed_step_s(profile, num_decoding, decode_context, tokens)
    return total + output_latency_s(profile)


def chunked_stream_first_token_s(
    profile: PerfProfile, num_decoding: int, decode_context: int, positions: Sequence[int],
    total_tokens: int, max_batched_tokens: int, first_step_tokens: int | None = None,
) -> list[float]:
    """Seconds from a step boundary until the first token of each prompt whose last token
    is at ``positions`` (cumulative prompt tokens, oldest first) of the ``total_tokens``
    prompt tokens a chunked engine has to prefill from that boundary on, next to
    ``num_decoding`` requests holding ``decode_context`` tokens.

    :func:`plan_chunks` fills every step's budget (``max_batched_tokens`` less one token per
    decoding request) with the oldest prompt tokens first, so the steps are full until the
    stream runs out, and a prompt's first token comes at the end of the step that holds
    its last token (:func:`mixed_step_s`, the last step carrying whatever is left of the
    stream, later prompts too) plus the output latency. ``first_step_tokens`` caps the
    first step (a busy engine plans a step when the previous one begins: prompts queued
    after that wait for the next one); it is ``min(budget, total_tokens)`` when None.
    Three step times, then arithmetic per position (a few positions per call). Pure."""
    per_step = max(1, max_batched_tokens - num_decoding)
    first = min(per_step, total_tokens) if first_step_tokens is None else min(
        per_step, max(0, first_step_tokens), total_tokens)
    rest = total_tokens - first  # tokens after the first step: full steps, then the rest
    num_later = -(-rest // per_step)
    latency = output_latency_s(profile)
    first_s = mixed_step_s(profile, num_decoding, decode_context, first, latency) + latency
    full_s = mixed_step_s(profile, num_decoding, decode_context, per_step, latency)
    final_s = mixed_step_s(profile, num_decoding, decode_context,
                           rest - (num_later - 1) * per_step, latency) if num_later else 0.0
    out = []
    for position in positions:
        # steps after the first one that this position needs (0: it is in the first step)
        later = 0 if position <= first else min(-(-(position - first) // per_step), num_later)
        out.append(first_s if later <= 0 else
                   first_s + (later - 1) * full_s + (final_s if later >= num_later else full_s))
    return out


#: Decode steps since the last known step boundary within which
#: :func:`chunked_step_clock` still counts the steps of a decoding engine (past that the
#: step under way is unknown: it is taken to be half done).
DECODE_CLOCK_STEPS: Final = 8


def chunked_step_clock(
    profile: PerfProfile, num_decoding: int, decode_context: int,
    admissions: Sequence[tuple[float, int]], now: float, max_batched_tokens: int,
    last_boundary_at: float | None = None,
) -> tuple[float, float, int] | None:
    """Where a chunked engine's steps stand at ``now``: (start of the step under way, its
    end, prompt tokens still to prefill after it), or None when unknown.

    From the prompts it is prefilling, ``admissions`` (admitted at, prompt tokens) of each,
    oldest first: each was admitted at a step boundary and its chunks come in that order
    (:func:`plan_chunks`), so the steps are replayed from the oldest admission at the budget
    of :func:`chunked_stream_first_token_s`. Once they are done (or with none), the engine
    decodes in steps of ``decode_step_s`` from the last boundary known, the end of the last
    prompt step or ``last_boundary_at`` (e.g. where a request's first token came), for at
    most DECODE_CLOCK_STEPS steps. Pure."""
    per_step = max(1, max_batched_tokens - num_decoding)
    at = admissions[0][0] if admissions else -math.inf
    left, index = 0, 0
    while index < len(admissions) or left > 0:
        while index < len(admissions) and admissions[index][0] <= at + 1e-9:
            left += admissions[index][1]
            index += 1
        if left <= 0:
            at = admissions[index][0]
            continue
        take = min(per_step, left)
        end = at + mixed_step_s(profile, num_decoding, decode_context, take)
        if end > now:
            return at, end, left - take
        at, left = end, left - take
    if last_boundary_at is not None:
        at = max(at, last_boundary_at)
    step = profile.decode_step_s(num_decoding, decode_context)
    if not (math.isfinite(at) and step > 0 and 0 <= now - at < DECODE_CLOCK_STEPS * step):
        return None
    began_at = at + step * math.floor((now - at) / step)
    return began_at, began_at + step, 0


def chunked_prefill_work_s(profile: PerfProfile, prompt_tokens: int, num_decoding: int,
                           max_batched_tokens: int) -> float:
    """Seconds a prompt's chunks add to the steps of a batch where ``num_decoding``
    requests decode: Σ over its chunks of ``mixed_step_s − decode_step_s`` (the decode
    step's own time is the batch's, counted once). Pure."""
    decode = profile.decode_step_s(num_decoding, 0)
    return sum(mixed_step_s(profile, num_decoding, 0, chunk) - decode
               for chunk in chunk_sizes(prompt_tokens, max_batched_tokens, num_decoding))


# ---------------------------------------------------------------- TPOT
def steady_step_s(
    profile: PerfProfile, batch: int, mean_prompt_tokens: float, mean_output_tokens: float
) -> float:
    """Mean seconds per step of a batch held at ``batch`` requests of ``mean_prompt_tokens``
    prompts and ``mean_output_tokens`` outputs: what a running request's time per output
    token averages to.

    Each step is a decode step of the batch at its mean context (prompt + half the output)
    plus, amortised, the prompt work of the requests that replace finished ones: a request
    is prefilled once in ``mean_output_tokens`` steps, so ``batch / mean_output_tokens``
    prompts per step, each costing its chunk's marginal work (:func:`mixed_step_s`). Pure."""
    if batch <= 0:
        return 0.0
    context = int(batch * (mean_prompt_tokens + mean_output_tokens / 2.0))
    decode = profile.decode_step_s(batch, context)
    chunk = mixed_step_s(profile, batch, context, max(1, round(mean_prompt_tokens))) - decode
    return decode + batch / max(1.0, mean_output_tokens) * chunk


def tpot_batch_cap(
    profile: PerfProfile, tpot_s: float, mean_prompt_tokens: float, mean_output_tokens: float
) -> int:
    """The largest batch (at most ``profile.max_batch_size``) whose :func:`steady_step_s`
    is within ``tpot_s``: how many requests a worker may hold while one with that TPOT
    target decodes. 0 when even a batch of one is too slow (no worker of this profile can
    meet the target). Pure; the step grows with the batch, so a binary search."""
    if steady_step_s(profile, 1, mean_prompt_tokens, mean_output_tokens) > tpot_s:
        return 0
    low, high = 1, profile.max_batch_size
    while low < high:
        mid = (low + high + 1) // 2
        if steady_step_s(profile, mid, mean_prompt_tokens, mean_output_tokens) <= tpot_s:
            low = mid
        else:
            high = mid - 1
    return low
