"""The estimator's chunked-prefill estimate: the step model of qlm.sim.batching, reused."""

from __future__ import annotations

import numpy as np
import pytest
from test_estimator import BOOK, EXACT, MU, PROMPT, closed_form_step, group, profile, worker

from qlm.core.errors import InvalidInput
from qlm.core.estimator import PREFILL_MODES, RWTEstimator, chunked_work_s
from qlm.core.types import RunningRequest
from qlm.sim import batching
from qlm.sim.batching import (
    ASYNC_ADMISSION_STEPS,
    chunk_sizes,
    chunked_first_token_s,
    chunked_prefill_work_s,
    mixed_step_s,
    output_latency_s,
)

P = profile("a")


def test_both_modules_name_the_same_prefill_modes() -> None:
    assert PREFILL_MODES == batching.PREFILL_MODES
    with pytest.raises(InvalidInput, match="prefill_mode"):
        RWTEstimator(BOOK, prefill_mode="eager")
    with pytest.raises(InvalidInput, match="max_batched_tokens"):
        RWTEstimator(BOOK, max_batched_tokens=0)


def test_a_prompt_is_cut_into_budget_sized_chunks_less_the_decode_tokens() -> None:
    assert chunk_sizes(100, 8192, 10) == [100]
    assert chunk_sizes(20_000, 8192, 192) == [8000, 8000, 4000]
    assert chunk_sizes(16_000, 8192, 192) == [8000, 8000]
    assert chunk_sizes(0, 8192, 0) == []


def test_first_token_of_a_short_prompt_is_one_mixed_step_then_the_output_latency() -> None:
    got = chunked_first_token_s(P, 500, 10, 10 * 300, 8192)
    assert got == pytest.approx(mixed_step_s(P, 10, 3000, 500) + output_latency_s(P))
    # alone on an idle engine, it shares its step with the prompts admitted with it
    shared = chunked_first_token_s(P, 500, 0, 0, 8192, shared_tokens=1500)
    assert shared == pytest.approx(mixed_step_s(P, 0, 0, 2000) + output_latency_s(P))
    capped = chunked_first_token_s(P, 500, 0, 0, 8192, shared_tokens=50_000)
    assert capped == pytest.approx(mixed_step_s(P, 0, 0, 8192) + output_latency_s(P))


def test_first_token_of_a_long_prompt_waits_for_every_chunk() -> None:
    got = chunked_first_token_s(P, 20_000, 192, 192 * 500, 8192)
    steps = sum(mixed_step_s(P, 192, 192 * 500, c) for c in (8000, 8000, 4000))
    assert got == pytest.approx(steps + output_latency_s(P))
    assert got > chunked_first_token_s(P, 4000, 192, 192 * 500, 8192)


def test_prefill_work_is_each_chunk_beyond_its_decode_step() -> None:
    one = chunked_prefill_work_s(P, 500, 10, 8192)
    assert one == pytest.approx(P.prefill_s(500) - output_latency_s(P) - P.decode_base_s)
    # the vectorised sum the estimator uses agrees with the step model, prompt by prompt
    prompts = np.array([1, 16, 500, 8000, 8182, 8183, 20_000, 40_000])
    for decoding in (0, 1, 63):
        expected = sum(chunked_prefill_work_s(P, int(t), decoding, 8192) for t in prompts)
        assert chunked_work_s(P, prompts, decoding, 8192) == pytest.approx(expected)
    assert chunked_work_s(P, np.array([], dtype=np.int64), 5) == 0.0


def test_chunked_estimate_of_a_head_group_on_an_idle_worker() -> None:
    est = RWTEstimator(BOOK, EXACT)  # chunked is the default, as in the simulator
    assert est.prefill_mode == "chunked"
    g = group("a", 10)
    wait = est.queue_waits(worker(), [g], 0.0)[0]
    # its first request starts at once, in the first step with the other nine prompts
    assert wait.mean_s == pytest.approx(
        chunked_first_token_s(P, PROMPT, 0, 0, 8192, shared_tokens=9 * PROMPT))
    whole = RWTEstimator(BOOK, EXACT, prefill_mode="whole").queue_waits(worker(), [g], 0.0)[0]
    assert whole.mean_s == pytest.approx(P.prefill_s(10 * PROMPT))


def test_chunked_service_time_adds_the_chunks_not_a_prefill_step_per_admission() -> None:
    est = RWTEstimator(BOOK, EXACT)
    n = 100
    service = est.group_service(worker(), group("a", n))
    decode = n * (MU - 1) * closed_form_step(64) / 64
    prefill = n * chunked_prefill_work_s(P, PROMPT, 63, 8192)
    assert service.mean_s == pytest.approx(decode + prefill)


def test_a_request_queued_on_a_busy_worker_waits_for_its_admission_step() -> None:
    est = RWTEstimator(BOOK, EXACT)
    running = tuple(RunningRequest(r, 0.0, 0.1) for r in group("a", 4, window=9).requests)
    busy = worker(running=running)
    queued = group("a", 1, window=1)
    # four requests run and 60 slots are free: it starts now, after the admission delay
    wait = est.queue_waits(busy, [queued], 0.0)[0]
    step = P.decode_step_s(4, sum(r.request.context_tokens for r in running))
    head = chunked_first_token_s(P, PROMPT, 63, int(63 * (PROMPT + MU / 2)), 8192)
    assert wait.mean_s == pytest.approx(ASYNC_ADMISSION_STEPS * step + head)
    whole = RWTEstimator(BOOK, EXACT, prefill_mode="whole").queue_waits(busy, [queued], 0.0)[0]
    assert whole.mean_s == pytest.approx(P.prefill_s(PROMPT))
