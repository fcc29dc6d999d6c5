"""Closed-form continuous batching: the time of k decode steps of a fixed batch.

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

from qlm.core.perf import PerfProfile


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
    profile: PerfProfile, num_decoding: int, decode_context: int, prefill_tokens: int
) -> float:
    """Seconds of one chunked step: ``num_decoding`` requests holding ``decode_context``
    tokens decode one token each and ``prefill_tokens`` prompt tokens are prefilled.

    = ``decode_step_s(B, ctx)`` + the chunk's marginal work ``prefill_s(n) − L`` (less
    the decode step's fixed cost ``base`` when something decodes: it is paid once)."""
    decode = profile.decode_step_s(num_decoding, decode_context)
    if prefill_tokens <= 0:
        return decode
    chunk = profile.prefill_s(prefill_tokens) - output_latency_s(profile)
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
