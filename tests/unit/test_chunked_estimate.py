"""The estimator's chunked-prefill estimate: the step model of qlm.sim.batching, reused."""

from __future__ import annotations

import numpy as np
import pytest
from test_estimator import BOOK, EXACT, MU, PROMPT, closed_form_step, group, profile, worker

from qlm.core.errors import InvalidInput
from qlm.core.estimator import PREFILL_MODES, RWTEstimator, chunked_work_s
from qlm.core.types import SLO, Request, RunningRequest, SLOClass
from qlm.sim import batching
from qlm.sim.batching import (
    DECODE_CLOCK_STEPS,
    chunk_sizes,
    chunked_first_token_s,
    chunked_prefill_work_s,
    chunked_step_clock,
    chunked_stream_first_token_s,
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


def _replay_first_tokens(prompts: list[int], num_decoding: int,
                         first_step_tokens: int | None = None) -> list[float]:
    """Each prompt's first token, from a step boundary, by replaying plan_chunks step by
    step (prompts all admitted at once, oldest first; the first step's budget capped)."""
    remaining = list(prompts)
    done: dict[int, float] = {}
    at = 0.0
    while len(done) < len(prompts):
        budget = 8192
        if first_step_tokens is not None and at == 0.0:
            budget = min(budget, first_step_tokens + num_decoding)
        waiting = [i for i in range(len(prompts)) if i not in done]
        plan = batching.plan_chunks(budget, num_decoding, [remaining[i] for i in waiting], [])
        at += mixed_step_s(P, num_decoding, 1000, plan.prefill_tokens)
        for i, take in zip(waiting, plan.continuing, strict=True):
            remaining[i] -= take
            if remaining[i] == 0:
                done[i] = at + output_latency_s(P)
    return [done[i] for i in range(len(prompts))]


@pytest.mark.parametrize("prompts", [[100, 200, 50], [5000, 4000, 3000, 100], [20_000, 10],
                                     [8182, 1, 8183]])
@pytest.mark.parametrize("decoding", [0, 10])
def test_a_prefill_stream_gives_each_prompt_the_end_of_the_step_holding_its_last_token(
        prompts: list[int], decoding: int) -> None:
    positions = [int(x) for x in np.cumsum(prompts)]
    got = np.array(chunked_stream_first_token_s(P, decoding, 1000, positions, positions[-1],
                                                8192))
    assert got == pytest.approx(_replay_first_tokens(prompts, decoding))
    # the first step sees the first prompt only: the others start a step later
    capped = np.array(chunked_stream_first_token_s(P, decoding, 1000, positions, positions[-1],
                                                   8192, first_step_tokens=prompts[0]))
    assert capped == pytest.approx(_replay_first_tokens(prompts, decoding, prompts[0]))
    # the first prompt, alone in its step, is sooner; the others later
    assert capped[0] <= got[0] + 1e-12 and (capped[1:] >= got[1:] - 1e-12).all()


def test_a_prefill_stream_with_nothing_visible_first_runs_a_decode_step() -> None:
    got = chunked_stream_first_token_s(P, 4, 1000, [500], 500, 8192, first_step_tokens=0)
    assert got[0] == pytest.approx(P.decode_step_s(4, 1000) + mixed_step_s(P, 4, 1000, 500)
                                   + output_latency_s(P))


def test_the_step_clock_replays_the_prompts_being_prefilled() -> None:
    step = mixed_step_s(P, 2, 1000, 8190)
    # one 20,000-token prompt admitted at 10.0 next to 2 decoding requests: steps of 8,190
    assert chunked_step_clock(P, 2, 1000, [(10.0, 20_000)], 10.0 + 0.5 * step, 8192) == (
        pytest.approx(10.0), pytest.approx(10.0 + step), 20_000 - 8190)
    second = chunked_step_clock(P, 2, 1000, [(10.0, 20_000)], 10.0 + 1.5 * step, 8192)
    assert second == (pytest.approx(10.0 + step), pytest.approx(10.0 + 2 * step),
                      20_000 - 2 * 8190)
    # a prompt admitted at the second boundary joins the stream there
    joined = chunked_step_clock(P, 2, 1000, [(10.0, 20_000), (10.0 + step, 5000)],
                                10.0 + 1.5 * step, 8192)
    assert joined is not None and joined[2] == 25_000 - 2 * 8190
    last = mixed_step_s(P, 2, 1000, 20_000 - 2 * 8190)
    assert chunked_step_clock(P, 2, 1000, [(10.0, 20_000)], 10.0 + 2 * step + last + 0.1,
                              8192) is None  # done long ago
    assert chunked_step_clock(P, 2, 1000, [], 10.0, 8192) is None
    # then it decodes: steps counted from the last boundary known, for a few steps only
    decode = P.decode_step_s(2, 1000)
    done_at = 10.0 + 2 * step + last
    assert chunked_step_clock(P, 2, 1000, [(10.0, 20_000)], done_at + 2.5 * decode, 8192) == (
        pytest.approx(done_at + 2 * decode), pytest.approx(done_at + 3 * decode), 0)
    assert chunked_step_clock(P, 2, 1000, [], 5.0 + 0.5 * decode, 8192, 5.0) == (
        pytest.approx(5.0), pytest.approx(5.0 + decode), 0)
    assert chunked_step_clock(P, 2, 1000, [], 5.0 + (DECODE_CLOCK_STEPS + 1) * decode, 8192,
                              5.0) is None


def _decoding(n: int) -> tuple[RunningRequest, ...]:
    return tuple(RunningRequest(r, 0.0, 0.1) for r in group("a", n, window=9).requests)


def test_a_request_queued_on_a_busy_worker_joins_at_the_next_step_boundary() -> None:
    est = RWTEstimator(BOOK, EXACT)
    running = _decoding(4)
    busy = worker(running=running)
    context = sum(r.request.context_tokens for r in running)
    half = 0.5 * P.decode_step_s(4, context)  # the step under way, half done on average
    # 60 slots are free; queued before the step under way began, it is in the next one
    seen = group("a", 1, window=1, arrival_at=-1.0)
    wait = est.queue_waits(busy, [seen], 0.0)[0]
    assert wait.mean_s == pytest.approx(half + mixed_step_s(P, 4, context, PROMPT)
                                        + output_latency_s(P))
    # queued just now, the next step was planned without it: one more (decode) step
    fresh = est.queue_waits(busy, [group("a", 1, window=1, arrival_at=0.0)], 0.0)[0]
    assert fresh.mean_s == pytest.approx(wait.mean_s + P.decode_step_s(4, context))
    whole = RWTEstimator(BOOK, EXACT, prefill_mode="whole").queue_waits(busy, [seen], 0.0)[0]
    assert whole.mean_s == pytest.approx(P.prefill_s(PROMPT))


def test_groups_that_fit_the_free_slots_share_the_prefill_steps_in_queue_order() -> None:
    est = RWTEstimator(BOOK, EXACT)
    running = _decoding(4)
    context = sum(r.request.context_tokens for r in running)
    half = 0.5 * P.decode_step_s(4, context)
    first = group("a", 2, window=1, prompt=3000, arrival_at=-1.0)
    second = group("a", 3, window=2, prompt=2000, arrival_at=-1.0)
    a, b = est.queue_waits(worker(running=running), [first, second], 0.0)
    # 12,000 prompt tokens: the first step holds 8,188 of them (both of the first group's
    # prompts and most of the second's), the next step the rest
    one = mixed_step_s(P, 4, context, 8188)
    two = one + mixed_step_s(P, 4, context, 12_000 - 8188)
    latency = output_latency_s(P)
    assert a.mean_s == pytest.approx(half + one + latency)
    assert a.spread_s == pytest.approx(0.0)
    assert b.mean_s == pytest.approx(half + one + latency)
    assert b.mean_s + b.spread_s == pytest.approx(half + two + latency)


def test_a_request_queued_behind_prompts_being_prefilled_waits_for_them() -> None:
    est = RWTEstimator(BOOK, EXACT)
    running = _decoding(2)
    context = sum(r.request.context_tokens for r in running)
    long = Request("long", "a", 20_000, 100, SLOClass.BATCH_1, SLO(60.0), 0.0)
    busy = worker(running=(*running, RunningRequest(long, 10.0, None)))
    step = mixed_step_s(P, 2, context, 8190)
    now = 10.0 + 0.25 * step  # in the long prompt's first step
    queued = group("a", 1, window=1, arrival_at=9.0)
    wait = est.queue_waits(busy, [queued], now)[0]
    # it joins at the step's end, behind the long prompt's 11,810 tokens left
    left = 20_000 - 8190
    expected = (10.0 + step - now) + step + mixed_step_s(P, 2, context, left - 8190 + PROMPT)
    assert wait.mean_s == pytest.approx(expected + output_latency_s(P))
