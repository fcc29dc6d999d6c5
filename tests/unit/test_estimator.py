"""RWT estimator: closed-form cases, truncated moments, swaps, SLO probability, correction."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest

from qlm.core.errors import InvalidInput, NotFound
from qlm.core.estimator import (
    CORRECTION_MAX,
    DEFAULT_OUTPUT_STATS,
    LengthStats,
    RWTEstimator,
    WaitEstimate,
    steady_batch,
)
from qlm.core.perf import PerfProfile, ProfileBook
from qlm.core.pulls import DEFAULT_EXPECTED_OUTPUT_TOKENS
from qlm.core.types import (
    SLO,
    GroupKey,
    Request,
    RequestGroup,
    RunningRequest,
    SLOClass,
    WorkerView,
)

GPU = "G"
BASE, PER_SEQ, PER_CTX = 0.01, 1e-4, 1e-7
PREFILL_FIXED, PREFILL_PER_TOKEN = 0.005, 1e-5
SLEEP, WAKE, COLD = 0.5, 1.0, 30.0
MU = 200.0  # deterministic output length in the closed-form cases
PROMPT = 100


def profile(model: str, **overrides: float) -> PerfProfile:
    fields = dict(
        model=model, gpu=GPU, num_gpus=1,
        prefill_tokens=(16, 8192),
        prefill_seconds=(PREFILL_FIXED + 16 * PREFILL_PER_TOKEN,
                         PREFILL_FIXED + 8192 * PREFILL_PER_TOKEN),
        decode_base_s=BASE, decode_per_seq_s=PER_SEQ, decode_per_ctx_token_s=PER_CTX,
        kv_capacity_tokens=100_000, max_batch_size=64,
        sleep_s=SLEEP, wake_s=WAKE, cold_load_s=COLD,
    )
    fields.update(overrides)
    return PerfProfile(**fields)  # type: ignore[arg-type]


BOOK = ProfileBook.of([profile("a"), profile("b")])
EXACT = {"a": LengthStats(MU, 0.0), "b": LengthStats(MU, 0.0)}


def group(model: str, n: int, window: int = 0, *, prompt: int = PROMPT, max_tokens: int = 1000,
          arrival_at: float = 0.0, ttft_s: float = 60.0) -> RequestGroup:
    requests = tuple(
        Request(f"{model}-{window}-{i}", model, prompt, max_tokens, SLOClass.BATCH_1,
                SLO(ttft_s), arrival_at)
        for i in range(n)
    )
    return RequestGroup(GroupKey(model, SLOClass.BATCH_1, window), requests)


def worker(active: str | None = "a", models: tuple[str, ...] = ("a", "b"),
           running: tuple[RunningRequest, ...] = (), **kw: object) -> WorkerView:
    return WorkerView("w", GPU, models, active, 100_000, 64, running, **kw)  # type: ignore[arg-type]


def prefill(tokens: int) -> float:
    return PREFILL_FIXED + PREFILL_PER_TOKEN * tokens


def closed_form_step(batch: int) -> float:
    """Step time at the steady batch of identical requests: context prompt + μ/2."""
    return BASE + PER_SEQ * batch + PER_CTX * batch * (PROMPT + MU / 2)


def group_prefill(n: int, batch: int = 64) -> float:
    """Fixed cost per admission (λ = B/μ completions per step) plus n marginal prefills."""
    fixed = prefill(16)
    rate = batch / MU
    admissions = max(1.0, n * -math.expm1(-rate) / rate, n * PROMPT / 8192)
    return fixed * admissions + n * (prefill(PROMPT) - fixed)


def decode_tokens(n: int) -> float:
    """The prefill emits each request's first token; decode makes the other μ − 1."""
    return n * (MU - 1)


# ------------------------------------------------------------------ lengths
def test_truncated_moments_match_sampling() -> None:
    stats = LengthStats(338.0, 300.0)
    mu, s = stats.lognormal
    draws = np.random.default_rng(7).lognormal(mu, s, 2_000_000)
    for cap, done in ((4096, 0), (512, 0), (1024, 400)):
        alive = draws[draws > done]
        sample = np.minimum(alive, cap) - done
        mean, var = stats.remaining_moments(np.array([cap]), np.array([done]))
        assert mean[0] == pytest.approx(sample.mean(), rel=0.01)
        assert var[0] == pytest.approx(sample.var(), rel=0.02)


def test_lognormal_has_the_requested_moments() -> None:
    mean, var = DEFAULT_OUTPUT_STATS.remaining_moments(np.array([1e9]), np.array([0.0]))
    assert mean[0] == pytest.approx(338.0, rel=1e-6)
    assert math.sqrt(var[0]) == pytest.approx(300.0, rel=1e-4)


def test_remaining_never_exceeds_max_tokens_left() -> None:
    stats = LengthStats(338.0, 300.0)
    cap = np.array([10.0, 1000.0, 1000.0, 1000.0])
    done = np.array([0.0, 999.0, 1000.0, 990.0])
    mean, var = stats.remaining_moments(cap, done)
    assert np.all(mean <= cap - done) and np.all(mean >= 0) and np.all(var >= 0)
    assert mean[2] == 0.0


def test_length_stats_validation_and_fit() -> None:
    with pytest.raises(InvalidInput) as err:
        LengthStats(0.0, 1.0)
    assert err.value.field == "output_stats.mean"
    with pytest.raises(InvalidInput):
        LengthStats(10.0, -1.0)
    fitted = LengthStats.from_samples([100, 200, 300])
    assert fitted.mean == 200.0 and fitted.std == pytest.approx(math.sqrt(20000 / 3))
    with pytest.raises(InvalidInput):
        LengthStats.from_samples([10, -1])


# ------------------------------------------------------------------ closed forms
def test_group_service_of_identical_requests() -> None:
    """n requests, output μ each, steady batch B: n·(μ−1)·step(B)/B decode + their prefills."""
    est = RWTEstimator(BOOK, EXACT, prefill_mode="whole")
    n = 10
    batch = steady_batch(worker(), BOOK.get("a", GPU), PROMPT + MU)
    assert batch == 64  # max_batch_size binds (KV would allow 100,000 / 300 = 333)
    service = est.group_service(worker(), group("a", n))
    assert service.mean_s == pytest.approx(
        decode_tokens(n) * closed_form_step(64) / 64 + group_prefill(n))
    assert service.std_s == 0.0


def test_steady_batch_is_limited_by_kv_capacity() -> None:
    """Admission reserves prompt + expected output (qlm.core.pulls): 3,000 // 438 = 6."""
    small = WorkerView("w", GPU, ("a",), "a", 3_000, 64)
    est = RWTEstimator(BOOK, EXACT, prefill_mode="whole")
    reservation = PROMPT + DEFAULT_EXPECTED_OUTPUT_TOKENS
    assert steady_batch(small, BOOK.get("a", GPU), reservation) == 6
    service = est.group_service(small, group("a", 20))
    step = BASE + PER_SEQ * 6 + PER_CTX * 6 * (PROMPT + MU / 2)
    assert service.mean_s == pytest.approx(decode_tokens(20) * step / 6 + group_prefill(20, 6))


def test_variance_scales_with_n_sigma_squared() -> None:
    stats = LengthStats(300.0, 150.0)
    est = RWTEstimator(BOOK, {"a": stats})
    one = est.group_service(worker(), group("a", 50, max_tokens=100_000))
    two = est.group_service(worker(), group("a", 100, max_tokens=100_000))
    assert two.std_s**2 == pytest.approx(2 * one.std_s**2, rel=1e-9)
    # std = sqrt(n)·σ·τ with τ = step/B seconds per token (truncation negligible here); a
    # request in the batch holds prompt + its equilibrium age E[L²]/2E[L] = 187.5 tokens
    per_token = BOOK.get("a", GPU).decode_step_s(64, int(64 * (PROMPT + 187.5))) / 64
    assert one.std_s == pytest.approx(math.sqrt(50) * 150.0 * per_token, rel=1e-3)


def test_head_group_on_idle_worker_waits_only_for_its_prefill() -> None:
    """Free slots: the first admission prefills 10 prompts together (<= 8192 tokens)."""
    est = RWTEstimator(BOOK, EXACT, prefill_mode="whole")
    (wait,) = est.queue_waits(worker(), [group("a", 10)], now=100.0)
    assert wait.mean_s == pytest.approx(prefill(10 * PROMPT))
    assert wait.std_s == 0.0


def test_second_group_waits_for_the_first_minus_in_flight_work() -> None:
    """wait₂ = (n·(μ−1)·τ + prefills₁) − (B−1)·ρ·τ + prefill, ρ = μ/2 for fixed lengths."""
    est = RWTEstimator(BOOK, EXACT, prefill_mode="whole")
    n = 500
    first, second = est.queue_waits(worker(), [group("a", n, 0), group("a", 5, 1)], now=0.0)
    per_token = closed_form_step(64) / 64
    ahead = decode_tokens(n) * per_token + group_prefill(n)
    credit = 63 * (MU / 2) * per_token
    assert first.mean_s == pytest.approx(prefill(64 * PROMPT))
    assert second.mean_s == pytest.approx(ahead - credit + prefill(PROMPT))


def test_a_small_group_ahead_leaves_free_slots() -> None:
    est = RWTEstimator(BOOK, EXACT, prefill_mode="whole")
    _, second = est.queue_waits(worker(), [group("a", 3, 0), group("a", 5, 1)], now=0.0)
    assert second.mean_s == pytest.approx(prefill(5 * PROMPT))


def test_model_swap_adds_sleep_and_wake() -> None:
    order = [group("a", 200, 0), group("b", 5, 1)]
    no_swap_cost = ProfileBook.of([profile("a", sleep_s=0.0, wake_s=0.0, cold_load_s=0.0),
                                   profile("b", sleep_s=0.0, wake_s=0.0, cold_load_s=0.0)])
    whole = {"prefill_mode": "whole"}
    free = RWTEstimator(no_swap_cost, EXACT, **whole).queue_waits(worker(), order, 0.0)[1]
    paid = RWTEstimator(BOOK, EXACT, prefill_mode="whole").queue_waits(worker(), order, 0.0)[1]
    assert paid.mean_s - free.mean_s == pytest.approx(SLEEP + WAKE)
    cold = RWTEstimator(BOOK, EXACT, **whole).queue_waits(worker(models=("a",)), order, 0.0)[1]
    assert cold.mean_s - free.mean_s == pytest.approx(SLEEP + COLD)


def test_swap_waits_for_the_segment_to_drain() -> None:
    """Before a swap the whole segment ahead finishes: no in-flight credit."""
    est = RWTEstimator(BOOK, EXACT, prefill_mode="whole")
    n = 500
    per_token = closed_form_step(64) / 64
    ahead = decode_tokens(n) * per_token + group_prefill(n)
    swapped = est.queue_waits(worker(), [group("a", n, 0), group("b", 5, 1)], 0.0)[1]
    assert swapped.mean_s >= ahead + SLEEP + WAKE + prefill(PROMPT) - 1e-9


def test_idle_worker_wakes_the_head_model_without_sleeping_anything() -> None:
    est = RWTEstimator(BOOK, EXACT, prefill_mode="whole")
    (wait,) = est.queue_waits(worker(active=None), [group("b", 5)], 0.0)
    assert wait.mean_s == pytest.approx(WAKE + prefill(5 * PROMPT))


def test_pending_swap_counts_from_now() -> None:
    est = RWTEstimator(BOOK, EXACT, prefill_mode="whole")
    busy = worker(active=None, swapping_until=12.0)
    (wait,) = est.queue_waits(busy, [group("b", 5)], now=10.0)
    assert wait.mean_s == pytest.approx(2.0 + prefill(5 * PROMPT))


def test_running_requests_delay_the_queue() -> None:
    est = RWTEstimator(BOOK, EXACT, prefill_mode="whole")
    running = tuple(
        RunningRequest(replace(r, num_generated=50), started_at=0.0)
        for r in group("a", 64, 9).requests
    )
    idle = est.queue_waits(worker(), [group("a", 5)], 0.0)[0]
    busy = est.queue_waits(worker(running=running), [group("a", 5)], 0.0)[0]
    assert busy.mean_s > idle.mean_s
    # 64 running with 150 tokens left each; the head group starts when the first finishes
    assert busy.mean_s < 150 * BOOK.get("a", GPU).decode_step_s(64, 64 * 300) + 1.0


def test_unknown_model_on_this_gpu_is_not_found() -> None:
    with pytest.raises(NotFound):
        RWTEstimator(BOOK).queue_waits(worker(), [group("zzz", 2)], 0.0)


# ------------------------------------------------------------------ ordering
@pytest.mark.parametrize("seed", range(6))
def test_a_group_further_back_never_waits_less(seed: int) -> None:
    rng = np.random.default_rng(seed)
    est = RWTEstimator(BOOK)
    others = [group(str(rng.choice(["a", "b"])), int(rng.integers(1, 300)), w,
                    prompt=int(rng.integers(10, 3000)), max_tokens=int(rng.integers(20, 2000)))
              for w in range(1, 40)]
    running = tuple(RunningRequest(r, started_at=0.0) for r in group("a", 30, 99).requests)
    target = group(str(rng.choice(["a", "b"])), int(rng.integers(1, 100)), 0)
    previous = -1.0
    for position in range(len(others) + 1):
        order = [*others[:position], target, *others[position:]]
        wait = est.queue_waits(worker(running=running), order, 0.0)[position]
        assert wait.mean_s >= previous - 1e-9
        previous = wait.mean_s


def test_waits_along_one_model_queue_do_not_decrease() -> None:
    est = RWTEstimator(BOOK)
    order = [group("a", n, w) for w, n in enumerate([1, 300, 2, 2, 80, 1, 500])]
    means = [w.mean_s for w in est.queue_waits(worker(), order, 0.0)]
    assert means == sorted(means)


# ------------------------------------------------------------------ SLO probability
def test_p_meet_slo_is_the_normal_cdf_at_the_deadline() -> None:
    est = RWTEstimator(BOOK)
    g = group("a", 10, arrival_at=0.0, ttft_s=60.0)
    wait = WaitEstimate(mean_s=40.0, std_s=8.0)
    now = 5.0
    expected = 0.5 * (1 + math.erf((60.0 - now - 40.0) / (8.0 * math.sqrt(2))))
    assert est.p_meet_slo(g, wait, now) == pytest.approx(expected)
    assert wait.p_within(55.0) == pytest.approx(expected)


def test_p_meet_slo_averages_over_the_spread_of_the_group() -> None:
    est = RWTEstimator(BOOK)
    g = group("a", 3, ttft_s=60.0)
    wait = WaitEstimate(mean_s=40.0, std_s=0.0, spread_s=40.0)  # starts at 40, 60, 80 s
    assert est.p_meet_slo(g, wait, 0.0) == pytest.approx(2 / 3)


def test_wait_quantiles() -> None:
    wait = WaitEstimate(10.0, 2.0)
    assert wait.quantile(0.5) == pytest.approx(10.0)
    assert wait.quantile(0.975) == pytest.approx(10.0 + 1.959964 * 2.0, rel=1e-6)
    assert WaitEstimate(1.0, 5.0).quantile(0.01) == 0.0
    assert wait.p_within(-1.0) == 0.0
    with pytest.raises(InvalidInput):
        wait.quantile(1.0)


# ------------------------------------------------------------------ correction
def test_correction_moves_the_mean_toward_observations() -> None:
    est = RWTEstimator(BOOK, EXACT, prefill_mode="whole")
    g = group("a", 100)
    predicted = est.group_service(worker(), g).mean_s
    observed = 2.0 * predicted
    means = [predicted]
    for _ in range(30):
        guess = est.group_service(worker(), g).mean_s
        est = est.with_observation("a", GPU, predicted_s=guess, observed_s=observed)
        means.append(est.group_service(worker(), g).mean_s)
    assert all(b > a for a, b in itertools.pairwise(means) if a < observed * 0.999)
    assert means[-1] == pytest.approx(observed, rel=0.02)
    assert est.correction("b", GPU) == 1.0  # other (model, gpu) pairs untouched


def test_correction_is_clamped_and_validated() -> None:
    est = RWTEstimator(BOOK)
    for _ in range(50):
        est = est.with_observation("a", GPU, predicted_s=1.0, observed_s=1000.0)
    assert est.correction("a", GPU) == CORRECTION_MAX
    with pytest.raises(InvalidInput) as err:
        est.with_observation("a", GPU, predicted_s=0.0, observed_s=1.0)
    assert err.value.field == "predicted_s"
    with pytest.raises(InvalidInput):
        est.with_observation("a", GPU, predicted_s=1.0, observed_s=float("nan"))


def test_with_output_stats_changes_only_that_model() -> None:
    est = RWTEstimator(BOOK, EXACT, prefill_mode="whole")
    longer = est.with_output_stats("a", LengthStats(2 * MU, 0.0))
    g = group("a", 100)
    assert longer.group_service(worker(), g).mean_s > est.group_service(worker(), g).mean_s
    assert longer.output_stats("b") == EXACT["b"]
    assert est.output_stats("a") == EXACT["a"]  # the original is unchanged
