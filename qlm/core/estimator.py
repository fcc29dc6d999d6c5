"""Request waiting-time (RWT) estimator: how long each group waits at each queue position.

The estimator never reads a request's true output length. Each request's remaining
output ``R`` is random: the model's output length ``L`` follows a log-normal with the
model's :class:`LengthStats` mean and standard deviation, truncated at ``max_tokens``
and conditioned on what the request already generated::

    R = min(L, max_tokens) − g   given L > g        (g = num_generated)

whose mean and variance come in closed form from the log-normal's partial moments
(no approximation beyond the log-normal shape itself). The decode work of ``n``
requests is then Normal(Σ E[R], Σ Var[R]) by the central limit theorem (less the
first token of each fresh request, which its prefill emits), and time is work divided
by the throughput Θ = B / step(B) of the worker's steady batch B:
B = min(max batch, KV capacity // mean admission reservation of
:func:`qlm.core.pulls.kv_reservation`), step(B) at B sequences each holding its
prompt + ρ tokens (ρ = E[R²]/2E[R]: long requests stay longer in a batch).

Queue model of a worker (``queue_waits``), in seconds from ``now``:

* a *segment* is a run of adjacent work of one model: the running requests, then
  queued groups of the same model. Inside a segment, with cumulative work ``T`` ahead
  of group k (decode of everything ahead at each group's own Θ, plus the prefills of
  the queued groups ahead), group k's first request starts at
  ``max(last start of group k−1, T − credit)`` (groups start in queue order), where
  ``credit = (B−1)·ρ·τ`` is the work still in flight in the other B−1 slots when a
  slot frees (ρ is also the renewal-equilibrium residual; τ = step/B, seconds per
  token);
* a group's prefill, in the engine's ``prefill_mode`` (:func:`_prefill_timing`):
  ``chunked`` (the default, vLLM's, the simulator's and the simulated engine's) uses the
  one step model :mod:`qlm.sim.batching` — each prompt's chunks of at most the step
  budget less the B−1 decoding tokens add ``mixed_step_s − decode_step_s`` to their
  steps (:func:`chunked_work_s`), and a request's first token comes after its chunks'
  mixed steps plus the output latency (:func:`qlm.sim.batching.chunked_first_token_s`),
  after ASYNC_ADMISSION_STEPS of the current decode step when it starts at once on a busy
  worker without fitting its free slots (those that fit: below); ``whole`` costs one
  fixed cost per admission step (λ = B/E[R] completions per step, so about
  n·(1 − e^−λ)/λ admissions, at least Σ tokens / 8192) plus every prompt's marginal
  prefill (:func:`admission_prefill_s`);
* the **head of a worker's active model** under chunked prefill: the queued groups that fit
  its free batch slots and KV headroom (the pull, :func:`qlm.core.pulls.plan_pulls`, by
  each group's mean reservation) are admitted at its next step boundary, not when slots
  free; their prompts follow the prompts being prefilled (running requests without a
  first token) in one FIFO stream that fills every step's token budget, so a request's
  first token is the end of the step that holds its last prompt token, shared with the
  prompts around it (:func:`qlm.sim.batching.chunked_stream_first_token_s`). The next
  boundary comes from the step clock (:func:`qlm.sim.batching.chunked_step_clock`):
  replayed from the admissions of the prompts being prefilled, else decode steps from the
  latest first token, else half a decode step away; a request queued after the step under
  way began joins a step later (asynchronous scheduling). An idle worker admits at once.
  This is the light-load regime, where waits are one admission and a prefill: sharing a
  step with a 4,000-token prompt, or waiting for the one being prefilled, is most of them;
* between segments of different models the worker drains: the segment ends at
  ``max(T, latest (last start of a group + longest in-flight residual · step at half
  the batch))``, the longest residual being the m/(m+1) quantile of the equilibrium
  residual for m requests in flight; then it swaps: ``sleep_s`` of the outgoing model
  + ``wake_s`` of the incoming one if it is resident on the worker
  (``worker.models``), else its ``cold_load_s``;
* the wait of group k also includes the prefill of its own first request (its first
  token; on an idle worker, the shared first admission of up to 8,192 tokens);
  ``spread_s`` says how much later the group's last request starts.

The variance of a wait is the sum of the decode variances ahead (swap and prefill
times are taken as exact). Online correction: one factor per (model, gpu) multiplies
decode step times; :meth:`RWTEstimator.with_observation` moves it by an EWMA of
observed/predicted. Output lengths: per model, or per (model, class) when known
(:meth:`RWTEstimator.with_learned_stats`, learned from finished requests by
:class:`qlm.core.forecast.LengthLearner`).

Pure: no I/O, no clock. Per-group sums are memoised by group identity (groups are
frozen), so evaluating a whole order costs O(number of groups) after the first call.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist
from types import MappingProxyType
from typing import Final

import numpy as np
from scipy.special import ndtr

from qlm.core.errors import InvalidInput
from qlm.core.perf import PerfProfile, ProfileBook
from qlm.core.pulls import kv_reservations
from qlm.core.types import Request, RequestGroup, SLOClass, WorkerView

_STANDARD_NORMAL: Final = NormalDist()

#: EWMA weight of one observation in the online correction.
CORRECTION_ALPHA: Final = 0.3
#: The correction factor on decode time stays within these bounds.
CORRECTION_MIN: Final = 0.25
CORRECTION_MAX: Final = 4.0
#: Prompt tokens one admission (prefill step) takes at most: vLLM's default
#: max_num_batched_tokens, and the simulator's max_prefill_tokens.
PREFILL_TOKENS_PER_STEP: Final = 8192
#: The engine's prefill models (:data:`qlm.sim.batching.PREFILL_MODES`, named here too:
#: qlm.sim imports the policies, which import this module).
PREFILL_MODES: Final = ("whole", "chunked")
#: Memoised groups kept before the memo starts afresh.
_MEMO_LIMIT: Final = 50_000


# ------------------------------------------------------------------ lengths
@dataclass(frozen=True, slots=True)
class LengthStats:
    """Output-length distribution of one model (tokens): mean and standard deviation.

    The estimator treats it as a log-normal with these moments (exactly ``mean`` when
    ``std`` is 0).
    """

    mean: float
    std: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and self.mean > 0):
            raise InvalidInput("output_stats.mean", f"must be finite and > 0, got {self.mean!r}")
        if not (math.isfinite(self.std) and self.std >= 0):
            raise InvalidInput("output_stats.std", f"must be finite and >= 0, got {self.std!r}")

    @classmethod
    def from_samples(cls, lengths: Iterable[float]) -> LengthStats:
        """Mean and (population) standard deviation of observed output lengths."""
        values = np.asarray(list(lengths), dtype=float)
        if values.size == 0:
            raise InvalidInput("lengths", "needs at least one sample")
        if not np.all(np.isfinite(values)) or np.any(values <= 0):
            raise InvalidInput("lengths", "every length must be a finite number > 0")
        return cls(float(values.mean()), float(values.std()))

    @property
    def lognormal(self) -> tuple[float, float]:
        """(μ, σ) of log L for the log-normal with this mean and std."""
        s2 = math.log1p((self.std / self.mean) ** 2)
        return math.log(self.mean) - s2 / 2.0, math.sqrt(s2)

    def remaining_moments(self, max_tokens: np.ndarray, generated: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray]:
        """Mean and variance of R = min(L, max_tokens) − generated, given L > generated."""
        cap = np.asarray(max_tokens, dtype=float)
        done = np.asarray(generated, dtype=float)
        left = np.maximum(cap - done, 0.0)
        if self.std == 0.0:
            mean = np.clip(np.minimum(self.mean, cap) - done, 0.0, None)
            return mean, np.zeros_like(mean)
        mu, s = self.lognormal
        log_cap = np.log(np.maximum(cap, 1e-300))
        started = done > 0
        log_done = np.log(np.where(started, done, 1.0))

        def below(log_x: np.ndarray, k: int) -> np.ndarray:  # Φ((ln x − μ − k s²)/s)
            return np.asarray(ndtr((log_x - mu - k * s * s) / s))

        p_over_cap = 1.0 - below(log_cap, 0)
        p_alive = np.where(started, 1.0 - below(log_done, 0), 1.0)
        moments = []
        for k in (1, 2):
            scale = math.exp(k * mu + k * k * s * s / 2.0)
            lower = np.where(started, below(log_done, k), 0.0)
            partial = scale * np.clip(below(log_cap, k) - lower, 0.0, None)
            moments.append((partial + cap**k * p_over_cap) / np.maximum(p_alive, 1e-300))
        first, second = moments
        mean = first - done
        var = second - first * first
        hopeless = p_alive < 1e-12  # far beyond the tail: fall back to uniform on [0, left]
        mean = np.where(hopeless, left / 2.0, mean)
        var = np.where(hopeless, left * left / 12.0, var)
        return np.clip(mean, 0.0, left), np.clip(var, 0.0, None)

    def quantile_tokens(self, q: float) -> float:
        """The q-quantile of L (untruncated)."""
        if self.std == 0.0:
            return self.mean
        mu, s = self.lognormal
        return math.exp(mu + s * _STANDARD_NORMAL.inv_cdf(q))

    def residual_quantile_tokens(self, q: float, max_tokens: float) -> float:
        """The q-quantile of the equilibrium residual of X = min(L, max_tokens).

        A request caught in flight at a random moment has residual output with CDF
        F(x) = E[min(X, x)] / E[X] (renewal theory); solved for x by bisection.
        """
        return _residual_quantile(self, q, float(max_tokens))


@functools.lru_cache(maxsize=4096)
def _residual_quantile(stats: LengthStats, q: float, max_tokens: float) -> float:
    if stats.std == 0.0:
        return q * min(stats.mean, max_tokens)
    zero = np.zeros(1)
    whole = float(stats.remaining_moments(np.array([max_tokens]), zero)[0][0])
    lo, hi = 0.0, max_tokens
    for _ in range(30):
        mid = (lo + hi) / 2.0
        if float(stats.remaining_moments(np.array([mid]), zero)[0][0]) < q * whole:
            lo = mid
        else:
            hi = mid
    return hi


#: ShareGPT-like chat output lengths: mean 338 tokens (ShareGPT's mean output in the vLLM
#: paper, 5.8× Alpaca's 58.45), std 300 (coefficient of variation 0.89, log-normal σ 0.77;
#: no ShareGPT copy is available here, so the spread is the usual heavy-tailed chat shape,
#: between the Azure conversation trace's 0.77 and an exponential's 1.0). See docs/profiles.md.
DEFAULT_OUTPUT_STATS: Final = LengthStats(mean=338.0, std=300.0)
#: Fitted to GeneratedTokens of loadgen/traces/azure_llm_2023_conv.csv (19,366 rows).
AZURE_CONV_OUTPUT_STATS: Final = LengthStats(mean=211.1, std=162.9)


# ------------------------------------------------------------------ waits
@dataclass(frozen=True, slots=True)
class WaitEstimate:
    """A group's wait, Normal(mean_s, std_s²) by the central limit theorem.

    ``mean_s``/``std_s`` are the wait of the group's first request (until its first
    token). ``spread_s`` (>= 0) is how much later, on average, the group's last request
    starts; requests in between are taken to start evenly over that spread.
    """

    mean_s: float
    std_s: float
    spread_s: float = 0.0

    def quantile(self, q: float) -> float:
        """The q-quantile of the first request's wait, clipped at >= 0."""
        if not 0.0 < q < 1.0:
            raise InvalidInput("q", f"must be in (0, 1), got {q}")
        if self.std_s == 0.0:
            return max(0.0, self.mean_s)
        return max(0.0, self.mean_s + self.std_s * _STANDARD_NORMAL.inv_cdf(q))

    def p_within(self, seconds: float) -> float:
        """P(W <= seconds) for the first request's wait W (0 for negative seconds)."""
        if seconds < 0.0:
            return 0.0
        if self.std_s == 0.0:
            return 1.0 if self.mean_s <= seconds else 0.0
        return float(ndtr((seconds - self.mean_s) / self.std_s))

    def at_fraction(self, fraction: float) -> WaitEstimate:
        """The wait of the request ``fraction`` (0 = first, 1 = last) into the group."""
        return WaitEstimate(self.mean_s + fraction * self.spread_s, self.std_s)


def _arrival_at(request: Request) -> float:
    return request.arrival_at


# ------------------------------------------------------------------ per-group sums
@dataclass(frozen=True, slots=True)
class GroupWork:
    """Sums over one group's requests that every wait needs (GPU-independent)."""

    model: str
    size: int
    out_mean_tokens: float     # Σ E[R]
    out_var_tokens: float      # Σ Var[R]
    decode_tokens: float       # Σ E[R] less the first tokens that prefills emit
    residual_tokens: float     # ρ = Σ E[R²] / (2 Σ E[R]), renewal-equilibrium residual
    mean_context: float        # mean KV tokens of a request in a running batch
    mean_reservation: float    # mean KV tokens admission reserves (qlm.core.pulls)
    tail_cap_tokens: float     # most output any request may still produce
    head_prompt_tokens: int    # the first request's prefill (its own TTFT)
    prompt_tokens: np.ndarray  # every request's prefill tokens (prompt + generated), in order
    prompt_cum_tokens: np.ndarray  # their running sum (a prefill stream's positions)
    deadlines_at: np.ndarray   # every request's deadline, in group order


def _request_fields(requests: Sequence[Request]) -> np.ndarray:
    """(prompt tokens, max tokens, generated) of each request, one row each."""
    return np.array([(r.prompt_tokens, r.max_tokens, r.num_generated) for r in requests],
                    dtype=float).reshape(-1, 3)


def _work_of(requests: Sequence[Request], model: str, stats: LengthStats) -> GroupWork:
    fields = _request_fields(requests)
    prompt, cap, done = fields[:, 0].astype(np.int64), fields[:, 1], fields[:, 2]
    deadlines = np.fromiter((r.deadline_at for r in requests), float, len(requests))
    mean, var = stats.remaining_moments(cap, done)
    total = float(mean.sum())
    second = float((var + mean * mean).sum())
    residual = second / (2.0 * total) if total > 0 else 0.0
    held = prompt + done
    fresh = (done == 0).astype(float)  # their first token comes out of the prefill
    return GroupWork(
        model=model,
        size=len(requests),
        out_mean_tokens=total,
        out_var_tokens=float(var.sum()),
        decode_tokens=float(np.clip(mean - fresh, 0.0, None).sum()),
        residual_tokens=residual,
        # In a running batch long requests stay longer: the mean output generated so far
        # by a request caught in the batch is the equilibrium age ρ, not E[R]/2.
        mean_context=float(held.mean()) + residual,
        mean_reservation=float(kv_reservations(fields[:, 0], cap, done).mean()),
        tail_cap_tokens=float((cap - done).max()),
        head_prompt_tokens=int(held[0]),
        prompt_tokens=held.astype(np.int64),
        prompt_cum_tokens=np.cumsum(held.astype(np.int64)),
        deadlines_at=deadlines,
    )


def _prefill_many(profile: PerfProfile, tokens: np.ndarray) -> np.ndarray:
    """``profile.prefill_s`` over an array (piecewise-linear, linear beyond the ends)."""
    xs = np.asarray(profile.prefill_tokens, dtype=float)
    ys = np.asarray(profile.prefill_seconds, dtype=float)
    t = tokens.astype(float)
    inside = np.interp(t, xs, ys)
    lo_slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
    hi_slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    out = np.where(t < xs[0], ys[0] + lo_slope * (t - xs[0]), inside)
    out = np.where(t > xs[-1], ys[-1] + hi_slope * (t - xs[-1]), out)
    return np.where(t <= 0, 0.0, np.clip(out, 0.0, None))


def admission_prefill_s(profile: PerfProfile, tokens: np.ndarray, batch: int,
                        mean_output_tokens: float) -> float:
    """Prefill time of admitting requests with ``tokens`` to prefill each, at steady batch.

    Admissions are prefill-first steps of at most PREFILL_TOKENS_PER_STEP tokens at a
    step boundary. In a full batch of ``batch`` requests of mean output μ, λ = batch/μ
    requests finish per decode step, so a step boundary admits on average λ/(1 − e^−λ)
    requests (Poisson completions, at least one). Each admission pays the fixed cost
    once (the smallest tabulated prefill) plus every prompt's marginal prefill::

        fixed · max(1, n·(1 − e^−λ)/λ, Σ tokens / PREFILL_TOKENS_PER_STEP) + Σ (prefill(p) − fixed)
    """
    if tokens.size == 0:
        return 0.0
    fixed = profile.prefill_seconds[0]
    marginal = float(np.clip(_prefill_many(profile, tokens) - fixed, 0.0, None).sum())
    rate = batch / max(mean_output_tokens, 1.0)
    per_request = -math.expm1(-rate) / rate
    admissions = max(1.0, tokens.size * per_request, float(tokens.sum()) / PREFILL_TOKENS_PER_STEP)
    return fixed * admissions + marginal


def first_admission_tokens(tokens: np.ndarray, free_slots: int) -> int:
    """Tokens prefilled with the first request when a group is admitted into free slots.

    Whole requests in order, up to ``free_slots`` and PREFILL_TOKENS_PER_STEP tokens (the
    first request always).
    """
    sums = np.cumsum(tokens[:max(1, free_slots)])
    fit = int(np.searchsorted(sums, PREFILL_TOKENS_PER_STEP, side="right"))
    return int(sums[max(fit, 1) - 1])


@dataclass(frozen=True, slots=True)
class _Timing:
    """One group on one worker: uncorrected decode seconds and exact seconds."""

    decode_s: float        # E[decode work] · τ
    decode_var_s2: float   # Var[decode work] · τ²
    credit_s: float        # (B−1)·ρ·τ
    tail_s: float          # longest in-flight residual · step at half the batch
    prefill_s: float       # prefill of all its requests
    head_prefill_s: float  # prefill of its first request, admitted alone
    bulk_prefill_s: float  # prefill of its first request, admitted into free slots


def kv_capacity_for(worker: WorkerView, profile: PerfProfile) -> int:
    """KV tokens the worker has for ``profile.model``: its own figure for the active model,
    else no more than the model's profile allows (the view describes the active model)."""
    if profile.model == worker.active_model:
        return worker.kv_capacity_tokens
    return min(worker.kv_capacity_tokens, profile.kv_capacity_tokens)


def steady_batch(worker: WorkerView, profile: PerfProfile, reservation_tokens: float) -> int:
    """min(max batch, how many requests of this size the KV cache holds), at least 1."""
    by_kv = int(kv_capacity_for(worker, profile) // max(reservation_tokens, 1.0))
    return max(1, min(worker.max_batch_size, profile.max_batch_size, by_kv))


def chunked_work_s(profile: PerfProfile, tokens: np.ndarray, num_decoding: int,
                   max_batched_tokens: int = PREFILL_TOKENS_PER_STEP) -> float:
    """Σ over prompts of :func:`qlm.sim.batching.chunked_prefill_work_s` (vectorised): the
    time the prompts' chunks add to the steps of a batch of ``num_decoding`` decoding."""
    if tokens.size == 0:
        return 0.0
    from qlm.sim.batching import output_latency_s  # qlm.sim imports the policies: not at load

    per_step = max(1, max_batched_tokens - num_decoding)
    paid_by_decode = output_latency_s(profile) + (profile.decode_base_s if num_decoding else 0.0)
    full, rest = np.divmod(tokens.astype(np.int64), per_step)

    def marginal(x: np.ndarray) -> np.ndarray:
        return np.where(x > 0, np.clip(_prefill_many(profile, x) - paid_by_decode, 0.0, None), 0.0)

    whole_chunk = float(marginal(np.array([per_step]))[0])
    return float((full * whole_chunk).sum() + marginal(rest).sum())


def _prefill_timing(work: GroupWork, profile: PerfProfile, batch: int, mean_output: float,
                    prefill_mode: str, max_batched_tokens: int) -> tuple[float, float, float]:
    """(all prefills, first token of the head admitted alone, first token of the head
    admitted into free slots) of a group at steady batch ``batch``, in the engine's
    prefill mode: ``whole`` prefills admitted prompts in steps of their own; ``chunked``
    (vLLM's default) mixes them into decode steps (:mod:`qlm.sim.batching`'s step model),
    the first step filled to its budget by the prompts admitted with the head."""
    if prefill_mode == "whole":
        first_tokens = first_admission_tokens(work.prompt_tokens, batch)
        return (admission_prefill_s(profile, work.prompt_tokens, batch, mean_output),
                profile.prefill_s(work.head_prompt_tokens), profile.prefill_s(first_tokens))
    from qlm.sim.batching import chunked_first_token_s  # see chunked_work_s

    decoding = batch - 1
    context = int(decoding * work.mean_context)
    head = chunked_first_token_s(profile, work.head_prompt_tokens, decoding, context,
                                 max_batched_tokens)
    admitted = int(work.prompt_cum_tokens[min(batch, work.size) - 1])
    bulk = chunked_first_token_s(profile, work.head_prompt_tokens, 0, 0, max_batched_tokens,
                                 shared_tokens=admitted - work.head_prompt_tokens)
    return chunked_work_s(profile, work.prompt_tokens, decoding, max_batched_tokens), head, bulk


def _timing(work: GroupWork, worker: WorkerView, profile: PerfProfile,
            stats: LengthStats, prefill_mode: str = "chunked",
            max_batched_tokens: int = PREFILL_TOKENS_PER_STEP) -> _Timing:
    batch = steady_batch(worker, profile, work.mean_reservation)
    step = profile.decode_step_s(batch, int(batch * work.mean_context))
    per_token = step / batch
    in_flight = max(1, min(batch, work.size))
    # The longest of the requests in flight when the last one starts (median of the max
    # of `in_flight` equilibrium residuals).
    tail_tokens = stats.residual_quantile_tokens(in_flight / (in_flight + 1.0),
                                                 work.tail_cap_tokens)
    half = max(1, in_flight // 2)
    mean_output = work.out_mean_tokens / work.size
    prefill, head, bulk = _prefill_timing(work, profile, batch, mean_output, prefill_mode,
                                          max_batched_tokens)
    return _Timing(
        decode_s=work.decode_tokens * per_token,
        decode_var_s2=work.out_var_tokens * per_token * per_token,
        credit_s=(batch - 1) * work.residual_tokens * per_token,
        tail_s=tail_tokens * profile.decode_step_s(half, int(half * work.mean_context)),
        prefill_s=prefill,
        head_prefill_s=head,
        bulk_prefill_s=bulk,
    )


class _Memo:
    """Group sums by group identity (the group is kept alive, so its id stays its own)."""

    __slots__ = ("fields", "running", "streams", "timings", "works")

    def __init__(self) -> None:
        self.works: dict[int, tuple[RequestGroup, GroupWork]] = {}
        self.timings: dict[tuple[int, str, int, int, bool], tuple[RequestGroup, _Timing]] = {}
        self.running: dict[tuple[object, ...], tuple[object, tuple[_Segment, float]]] = {}
        self.fields: dict[int, tuple[object, _RunningFields]] = {}
        self.streams: dict[tuple[object, ...], list[float]] = {}

    def trim(self) -> None:
        if len(self.works) > _MEMO_LIMIT:
            self.works.clear()
        if len(self.timings) > _MEMO_LIMIT:
            self.timings.clear()
        if len(self.running) > _MEMO_LIMIT:
            self.running.clear()
        if len(self.fields) > _MEMO_LIMIT:
            self.fields.clear()
        if len(self.streams) > _MEMO_LIMIT:
            self.streams.clear()


@dataclass(frozen=True, slots=True)
class _Segment:
    """Work of one model run back to back on a worker (see the module docstring).

    Times are seconds from ``start_s``. Groups start in queue order: ``started_s`` is
    when the last request of the latest group started, ``drain_s`` the latest expected
    finish of the requests in flight at any group's last start.
    """

    model: str | None
    start_s: float
    ahead_s: float = 0.0          # T: decode + prefill seconds ahead
    ahead_var_s2: float = 0.0
    credit_s: float = 0.0         # in-flight work of the group just ahead, seconds
    started_s: float = 0.0
    drain_s: float = 0.0

    def next_start_s(self) -> float:
        """When the next queued group's first request starts."""
        return max(self.started_s, self.ahead_s - self.credit_s)

    def end_s(self) -> float:
        """When everything in the segment has finished (before a swap)."""
        return self.start_s + max(self.ahead_s, self.drain_s)


@dataclass(frozen=True, slots=True)
class _HeadStream:
    """The chunked prefill stream at the head of a worker's active model (see the module
    docstring): when its next step boundary comes and what is still to prefill then."""

    profile: PerfProfile
    num_decoding: int         # running requests past their prefill
    decode_context: int       # the KV tokens they hold
    boundary_s: float         # seconds from now to the next step boundary (0: idle worker)
    visible_until: float      # requests queued by then join at that boundary, later a step on
    backlog_tokens: int       # prompt tokens of the requests being prefilled left by then
    free_slots: int
    kv_headroom: float


@dataclass(frozen=True, slots=True)
class _RunningFields:
    """What the head stream needs of a worker's running requests (memoised per view)."""

    num_decoding: int
    decode_context: int
    num_running: int
    running_context: int
    reserved_tokens: float
    admissions: tuple[tuple[float, int], ...]  # (started at, prompt tokens) being prefilled
    last_first_token_at: float | None          # the latest first token of one of them


# ------------------------------------------------------------------ estimator
class RWTEstimator:
    """Waiting-time distributions of request groups on workers. Immutable and pure."""

    def __init__(self, profiles: ProfileBook,
                 output_stats: Mapping[str, LengthStats] | None = None,
                 corrections: Mapping[tuple[str, str], float] | None = None,
                 default_output_stats: LengthStats = DEFAULT_OUTPUT_STATS, *,
                 class_stats: Mapping[tuple[str, SLOClass], LengthStats] | None = None,
                 prefill_mode: str = "chunked",
                 max_batched_tokens: int = PREFILL_TOKENS_PER_STEP) -> None:
        if prefill_mode not in PREFILL_MODES:
            raise InvalidInput("prefill_mode", f"must be one of {', '.join(PREFILL_MODES)}, "
                               f"got {prefill_mode!r}")
        if max_batched_tokens <= 0:
            raise InvalidInput("max_batched_tokens", f"must be > 0, got {max_batched_tokens}")
        self.prefill_mode = prefill_mode
        self.max_batched_tokens = max_batched_tokens
        self._profiles = profiles
        self._stats: Mapping[str, LengthStats] = MappingProxyType(dict(output_stats or {}))
        self._class_stats: Mapping[tuple[str, SLOClass], LengthStats] = MappingProxyType(
            dict(class_stats or {}))
        for key, factor in (corrections or {}).items():
            if not (math.isfinite(factor) and factor > 0):
                raise InvalidInput(f"corrections.{key[0]}@{key[1]}", f"must be > 0, got {factor}")
        self._corrections: Mapping[tuple[str, str], float] = MappingProxyType(
            {k: min(CORRECTION_MAX, max(CORRECTION_MIN, float(v)))
             for k, v in (corrections or {}).items()})
        self._default_stats = default_output_stats
        self._memo = _Memo()

    # ------------------------------------------------------------ accessors
    @property
    def profiles(self) -> ProfileBook:
        return self._profiles

    @property
    def corrections(self) -> Mapping[tuple[str, str], float]:
        """Current factor on decode time per (model, gpu); absent means 1.0."""
        return self._corrections

    def correction(self, model: str, gpu: str) -> float:
        return self._corrections.get((model, gpu), 1.0)

    def output_stats(self, model: str, slo_class: SLOClass | None = None) -> LengthStats:
        """The output lengths of ``model``'s requests (of ``slo_class`` when known for it)."""
        if slo_class is not None:
            known = self._class_stats.get((model, slo_class))
            if known is not None:
                return known
        return self._stats.get(model, self._default_stats)

    def with_profiles(self, profiles: ProfileBook) -> RWTEstimator:
        """The same estimator over other performance profiles."""
        return self._clone(profiles=profiles)

    def _clone(self, *, stats: Mapping[str, LengthStats] | None = None,
               class_stats: Mapping[tuple[str, SLOClass], LengthStats] | None = None,
               corrections: Mapping[tuple[str, str], float] | None = None,
               profiles: ProfileBook | None = None) -> RWTEstimator:
        return RWTEstimator(
            self._profiles if profiles is None else profiles,
            self._stats if stats is None else stats,
            self._corrections if corrections is None else corrections, self._default_stats,
            class_stats=self._class_stats if class_stats is None else class_stats,
            prefill_mode=self.prefill_mode, max_batched_tokens=self.max_batched_tokens)

    def group_work(self, group: RequestGroup) -> GroupWork:
        """The group's GPU-independent sums (memoised by identity)."""
        hit = self._memo.works.get(id(group))
        if hit is not None and hit[0] is group:
            return hit[1]
        work = _work_of(group.requests, group.model,
                        self.output_stats(group.model, group.slo_class))
        self._memo.trim()
        self._memo.works[id(group)] = (group, work)
        return work

    def _timing_of(self, worker: WorkerView, group: RequestGroup) -> _Timing:
        key = (id(group), worker.gpu, worker.kv_capacity_tokens, worker.max_batch_size,
               group.model == worker.active_model)
        hit = self._memo.timings.get(key)
        if hit is not None and hit[0] is group:
            return hit[1]
        profile = self._profiles.get(group.model, worker.gpu)
        timing = _timing(self.group_work(group), worker, profile,
                         self.output_stats(group.model, group.slo_class), self.prefill_mode,
                         self.max_batched_tokens)
        self._memo.timings[key] = (group, timing)
        return timing

    # ------------------------------------------------------------ contract
    def group_service(self, worker: WorkerView, group: RequestGroup) -> WaitEstimate:
        """Time the group occupies the worker: its decode at the steady batch + its prefills."""
        timing = self._timing_of(worker, group)
        factor = self.correction(group.model, worker.gpu)
        return WaitEstimate(timing.decode_s * factor + timing.prefill_s,
                            math.sqrt(timing.decode_var_s2) * factor)

    def queue_waits(self, worker: WorkerView, order: Sequence[RequestGroup], now: float
                    ) -> tuple[WaitEstimate, ...]:
        """Each group's wait (until its first request's first token) at its place in ``order``.

        Counted from ``now``: the worker's pending swap (``swapping_until``), the remaining
        work of ``worker.running``, the work of the groups ahead, model swaps between
        adjacent groups of different models, and the group's own first prefill. While
        ``active_model`` is None and a swap is under way, the swap is taken to bring the
        head group's model when that model is resident. Raises NotFound when a group's
        model has no profile on this worker's GPU.
        """
        start = max(0.0, (worker.swapping_until or now) - now)
        segment = self._running_segment(worker, start)
        past_var = 0.0
        resident = set(worker.models)
        if segment.model is not None:
            resident.add(segment.model)
        swapping_in = worker.active_model is None and worker.swapping_until is not None
        running_model = segment.model if worker.running else None
        admit_delay = self._admission_delay_s(worker) if worker.running else 0.0
        immediate = self._immediate_first_tokens(worker, order, now)
        waits: list[WaitEstimate] = []
        for index, group in enumerate(order):
            if group.model != segment.model:
                arrives_by_swap = index == 0 and swapping_in and group.model in resident
                swap = 0.0 if arrives_by_swap else self._swap_s(worker, segment.model, group.model,
                                                                group.model in resident)
                past_var += segment.ahead_var_s2
                segment = _Segment(group.model, segment.end_s() + swap)
                resident.add(group.model)
            timing = self._timing_of(worker, group)
            factor = self.correction(group.model, worker.gpu)
            first_s, last_s = self._starts_in(segment, timing, factor, group.size)
            admitted = immediate.get(index)
            if admitted is not None:
                # it finds free slots: admitted at the next step boundary, its first tokens
                # where its prompts come in the head's prefill stream
                head_s, last_token_s, whole = admitted
                first_s, last_s = 0.0, (0.0 if whole else last_s)
                spread = last_token_s - head_s if whole else max(last_s, last_token_s - head_s)
                waits.append(WaitEstimate(head_s, math.sqrt(past_var), spread))
            else:
                var = past_var + (segment.ahead_var_s2 if first_s > 0 else 0.0)
                # Its first token: its own prefill once it starts, or, when it finds free
                # slots, the prefill of the first admission it shares with its group-mates.
                # On an idle worker (nothing ahead in its segment) it is in the first
                # admission; else its own prefill joins a running batch once it starts.
                joins_batch = first_s > 0.0 or segment.ahead_s > 0.0
                first_token_s = (max(first_s + timing.head_prefill_s, timing.bulk_prefill_s)
                                 if joins_batch else timing.bulk_prefill_s)
                if first_s <= 0.0 and group.model == running_model:
                    first_token_s += admit_delay  # it joins the running batch when it may
                waits.append(WaitEstimate(segment.start_s + first_token_s,
                                          math.sqrt(var), last_s - first_s))
            segment = _Segment(
                model=segment.model,
                start_s=segment.start_s,
                ahead_s=segment.ahead_s + timing.decode_s * factor + timing.prefill_s,
                ahead_var_s2=segment.ahead_var_s2 + timing.decode_var_s2 * factor * factor,
                credit_s=timing.credit_s * factor,
                started_s=last_s,
                drain_s=max(segment.drain_s, last_s + timing.tail_s * factor),
            )
        return tuple(waits)

    def p_meet_slo(self, group: RequestGroup, wait: WaitEstimate, now: float) -> float:
        """Expected fraction of the group's requests whose deadline_at >= now + W.

        Request j of n (group order) waits Normal(mean_s + spread_s·j/(n−1), std_s²).
        """
        deadlines = self.group_work(group).deadlines_at
        n = deadlines.size
        offsets = wait.spread_s * np.arange(n) / (n - 1) if n > 1 else np.zeros(1)
        slack = deadlines - now - (wait.mean_s + offsets)
        if wait.std_s == 0.0:
            return float(np.mean(slack >= 0.0))
        return float(np.mean(ndtr(slack / wait.std_s)))

    def with_observation(self, model: str, gpu: str, predicted_s: float, observed_s: float
                         ) -> RWTEstimator:
        """A new estimator whose (model, gpu) decode-time factor moves toward observed/predicted.

        ``predicted_s`` must be what *this* estimator predicted (its correction included):
        factor ← clamp(factor · (1 + α·(observed/predicted − 1))), α = CORRECTION_ALPHA, so
        the factor settles where predictions match observations.
        """
        if not (math.isfinite(predicted_s) and predicted_s > 0):
            raise InvalidInput("predicted_s", f"must be a finite number > 0, got {predicted_s!r}")
        if not (math.isfinite(observed_s) and observed_s >= 0):
            raise InvalidInput("observed_s", f"must be a finite number >= 0, got {observed_s!r}")
        ratio = min(CORRECTION_MAX, max(CORRECTION_MIN, observed_s / predicted_s))
        factor = self.correction(model, gpu) * (1.0 + CORRECTION_ALPHA * (ratio - 1.0))
        corrections = dict(self._corrections)
        corrections[(model, gpu)] = min(CORRECTION_MAX, max(CORRECTION_MIN, factor))
        clone = self._clone(corrections=corrections)
        clone._memo = self._memo  # timings are stored uncorrected: safe to share
        return clone

    def with_output_stats(self, model: str, stats: LengthStats) -> RWTEstimator:
        """A new estimator that uses ``stats`` for ``model``'s output lengths."""
        merged = dict(self._stats)
        merged[model] = stats
        return self._clone(stats=merged)

    def with_learned_stats(self, model_stats: Mapping[str, LengthStats],
                           class_stats: Mapping[tuple[str, SLOClass], LengthStats]
                           ) -> RWTEstimator:
        """A new estimator with these output lengths per model and per (model, class)
        (learned from finished requests, :class:`qlm.core.forecast.LengthLearner`) on top
        of the ones it has."""
        return self._clone(stats={**self._stats, **model_stats},
                           class_stats={**self._class_stats, **class_stats})

    # ------------------------------------------------------------ internals
    def _swap_s(self, worker: WorkerView, from_model: str | None, to_model: str,
                resident: bool) -> float:
        sleep = 0.0
        if from_model is not None and self._profiles.has(from_model, worker.gpu):
            sleep = self._profiles.get(from_model, worker.gpu).sleep_s
        return sleep + self._profiles.get(to_model, worker.gpu).swap_in_s(resident)

    def _immediate_first_tokens(self, worker: WorkerView, order: Sequence[RequestGroup],
                                now: float) -> dict[int, tuple[float, float, bool]]:
        """The groups at the head of ``order`` that the worker admits at its next step
        boundary, because they fit its free batch slots and KV headroom (the pull,
        :func:`qlm.core.pulls.plan_pulls`, with each group's mean reservation), under
        chunked prefill: by index in ``order``, (first token of its first request, first
        token of its last admitted one, whether all of it was admitted), seconds from
        ``now``. Their prompts follow those being prefilled in one FIFO stream
        (:func:`qlm.sim.batching.chunked_stream_first_token_s`); a request queued after the
        step under way began joins a step later. Per group, O(1) each."""
        stream = self._head_stream(worker, now)
        if stream is None:
            return {}
        from qlm.sim.batching import chunked_stream_first_token_s  # see chunked_work_s

        entries: list[tuple[int, bool]] = []
        positions: list[int] = []
        queued = visible = 0
        seen = True  # every request so far was queued before the step under way began
        free, room = stream.free_slots, stream.kv_headroom
        for index, group in enumerate(order):
            if group.model != worker.active_model or free <= 0:
                break
            work = self.group_work(group)
            count = min(group.size, free, int(room // max(work.mean_reservation, 1.0)))
            if count <= 0:
                break
            if seen:
                num_seen = bisect.bisect_right(group.requests, stream.visible_until, hi=count,
                                               key=_arrival_at)
                visible = queued + (int(work.prompt_cum_tokens[num_seen - 1]) if num_seen else 0)
                seen = num_seen == count
            positions += [queued + int(work.prompt_cum_tokens[0]),
                          queued + int(work.prompt_cum_tokens[count - 1])]
            entries.append((index, count == group.size))
            queued += int(work.prompt_cum_tokens[count - 1])
            free -= count
            room -= count * work.mean_reservation
            if count < group.size:
                break
        if not entries:
            return {}
        backlog = stream.backlog_tokens
        key = (stream.profile.key, stream.num_decoding, stream.decode_context, backlog,
               visible, *positions)
        times = self._memo.streams.get(key)
        if times is None:  # the same head stream as at the last decision, mostly
            times = chunked_stream_first_token_s(
                stream.profile, stream.num_decoding, stream.decode_context,
                [backlog + x for x in positions], backlog + queued, self.max_batched_tokens,
                first_step_tokens=backlog + visible)
            self._memo.trim()
            self._memo.streams[key] = times
        at = stream.boundary_s
        return {index: (at + times[2 * i], at + times[2 * i + 1], whole)
                for i, (index, whole) in enumerate(entries)}

    def _head_stream(self, worker: WorkerView, now: float) -> _HeadStream | None:
        """The prefill stream at the head of the worker's active model (chunked prefill, not
        swapping); None otherwise. The next step boundary: on an idle worker now; while
        prompts are being prefilled, where their admissions put the step clock
        (:func:`qlm.sim.batching.chunked_step_clock`); while it only decodes, half a decode
        step away on average (a request queued by the step's start joins then)."""
        model = worker.active_model
        if (self.prefill_mode != "chunked" or model is None
                or worker.swapping_until is not None):
            return None
        from qlm.sim.batching import chunked_step_clock, output_latency_s  # see chunked_work_s

        profile = self._profiles.get(model, worker.gpu)
        fields = self._running_fields(worker, profile)
        free = min(worker.batch_limit, profile.max_batch_size) - fields.num_running
        room = (min(worker.kv_capacity_tokens, profile.kv_capacity_tokens)
                - fields.reserved_tokens)
        if not worker.running:
            return _HeadStream(profile, 0, 0, 0.0, now, 0, free, room)
        last = fields.last_first_token_at
        clock = chunked_step_clock(
            profile, fields.num_decoding, fields.decode_context, fields.admissions, now,
            self.max_batched_tokens, None if last is None else last - output_latency_s(profile))
        if clock is None:
            half = 0.5 * profile.decode_step_s(fields.num_running, fields.running_context)
            half *= self.correction(model, worker.gpu)
            return _HeadStream(profile, fields.num_decoding, fields.decode_context, half,
                               now - half, 0, free, room)
        began_at, ends_at, backlog = clock
        return _HeadStream(profile, fields.num_decoding, fields.decode_context,
                           max(0.0, ends_at - now), began_at, backlog, free, room)

    def _running_fields(self, worker: WorkerView, profile: PerfProfile) -> _RunningFields:
        """:class:`_RunningFields` of ``worker.running``, memoised by its identity."""
        hit = self._memo.fields.get(id(worker.running))
        if hit is not None and hit[0] is worker.running:
            return hit[1]
        running = worker.running
        if running:
            fields = _request_fields([r.request for r in running])
            prompt, cap, done = fields[:, 0], fields[:, 1], fields[:, 2]
            held = prompt + done
            first = np.array([r.first_token_at for r in running], dtype=float)  # NaN: none
            decoding = ~np.isnan(first)
            admissions = tuple(sorted((r.started_at, r.request.context_tokens)
                                      for r in running if r.first_token_at is None))
            value = _RunningFields(int(decoding.sum()), int(held[decoding].sum()),
                                   len(running), int(held.sum()),
                                   float(kv_reservations(prompt, cap, done).sum()), admissions,
                                   float(first[decoding].max()) if decoding.any() else None)
        else:
            value = _RunningFields(0, 0, 0, 0, 0.0, (), None)
        self._memo.trim()
        self._memo.fields[id(running)] = (running, value)
        return value

    def _running_segment(self, worker: WorkerView, start_s: float) -> _Segment:
        """The segment of the requests running now (their remaining decode only)."""
        if not worker.running:
            return _Segment(worker.active_model, start_s)
        return replace(self._running_work(worker)[0], start_s=start_s)

    def _admission_delay_s(self, worker: WorkerView) -> float:
        """How long a request queued now waits for admission into the worker's running
        batch under chunked prefill: ASYNC_ADMISSION_STEPS of its current decode step."""
        if self.prefill_mode != "chunked" or not worker.running:
            return 0.0
        return self._running_work(worker)[1]

    def _running_work(self, worker: WorkerView) -> tuple[_Segment, float]:
        """The running requests' segment (from 0) and the admission delay they cause,
        memoised by the identity of ``worker.running`` (views are reused while nothing
        runs differently). Arrays of the requests' fields, one pass over them."""
        model = worker.active_model or worker.running[0].request.model
        factor = self.correction(model, worker.gpu)  # the memo is shared with clones
        key = (id(worker.running), model, worker.gpu, worker.max_batch_size,
               worker.kv_capacity_tokens, factor)
        hit = self._memo.running.get(key)
        if hit is not None and hit[0] is worker.running:
            return hit[1]
        requests = [r.request for r in worker.running]
        profile = self._profiles.get(model, worker.gpu)
        stats = self.output_stats(model)
        fields = _request_fields(requests)
        prompt, cap, done = fields[:, 0], fields[:, 1], fields[:, 2]
        held = prompt + done
        mean, var = stats.remaining_moments(cap, done)
        batch = steady_batch(worker, profile, float(kv_reservations(prompt, cap, done).mean()))
        context = float((held + mean / 2.0).mean())
        per_token = profile.decode_step_s(batch, int(batch * context)) / batch * factor
        tail_tokens = float(np.max(np.minimum(mean + np.sqrt(var), cap - done)))
        size = len(requests)
        tail_step = profile.decode_step_s(max(1, size // 2), int(max(1, size // 2) * context))
        segment = _Segment(
            model=model,
            start_s=0.0,
            ahead_s=float(mean.sum()) * per_token,
            ahead_var_s2=float(var.sum()) * per_token * per_token,
            credit_s=(batch - 1) * float(mean.mean()) * per_token,
            drain_s=tail_tokens * tail_step * factor,
        )
        from qlm.sim.batching import ASYNC_ADMISSION_STEPS  # see chunked_work_s

        delay = ASYNC_ADMISSION_STEPS * profile.decode_step_s(size, int(held.sum())) * factor
        self._memo.trim()
        self._memo.running[key] = (worker.running, (segment, delay))
        return segment, delay

    @staticmethod
    def _starts_in(segment: _Segment, timing: _Timing, factor: float, size: int
                   ) -> tuple[float, float]:
        """When the group's first and last requests start, from the segment's start."""
        first = segment.next_start_s()
        if size == 1:
            return first, first
        # The last request starts once the rest of its group is ahead of it too.
        own = (timing.decode_s * factor + timing.prefill_s) * (size - 1) / size
        return first, max(first, segment.ahead_s + own - timing.credit_s * factor)
