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
