"""The predicted wait a user sees, refreshed at every scheduling decision.

After each decision the virtual queues it wrote give every queued group its place on a
worker; the RWT estimator (:meth:`RWTEstimator.queue_waits`) turns each worker's queue
into the first-token time of each group's first request and the spread to its last.
That is one :class:`GroupForecast` per group (per group, not per request: at 100k queued
the scheduler writes hundreds of forecasts, not 100k). A request's prediction, read at
any time, is its group's forecast at its place in the group
(:meth:`GroupForecast.first_token_at_for`).

:class:`Forecaster` is what the scheduler service and the simulator both run: the
estimator, with output-length statistics learned from finished requests
(:class:`LengthLearner`, per model and per (model, class)) instead of assumed
constants, so that trace replays are predicted as well as synthetic workloads.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeVar

from qlm.core.errors import InvalidInput, NotFound
from qlm.core.estimator import LengthStats, RWTEstimator
from qlm.core.perf import ProfileBook
from qlm.core.types import GroupKey, QueueSnapshot, RequestGroup, SLOClass

K = TypeVar("K")

#: Finished requests of a model (or model and class) before their lengths replace the
#: default statistics.
MIN_LENGTH_SAMPLES: Final = 10
#: The learned statistics are refitted when the samples grew by this fraction (the
#: estimator's memo of group sums starts afresh on every refit).
REFIT_GROWTH: Final = 0.1


@dataclass(frozen=True, slots=True)
class GroupForecast:
    """A group's predicted first tokens as of ``made_at``, on ``worker_id``.

    ``first_token_at``: the first token of the group's first queued request (absolute
    time, the caller's clock); ``spread_s``: how much later its last request's comes
    (requests in between evenly); ``std_s``: standard deviation of the wait; ``size``:
    queued requests of the group when the forecast was made.
    """

    worker_id: str
    made_at: float
    first_token_at: float
    spread_s: float
    std_s: float
    size: int

    def __post_init__(self) -> None:
        for name in ("made_at", "first_token_at", "spread_s", "std_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value)):
                raise InvalidInput(f"forecast.{name}", f"must be a finite number, got {value!r}")
        if self.spread_s < 0 or self.std_s < 0:
            raise InvalidInput("forecast", "spread_s and std_s must be >= 0")
        if not (isinstance(self.size, int) and self.size >= 1):
            raise InvalidInput("forecast.size", f"must be an integer >= 1, got {self.size!r}")

    def first_token_at_for(self, rank: int, size_now: int | None = None) -> float:
        """Predicted first token of the request at ``rank`` (0 = head) among the
        ``size_now`` queued requests of its group. Requests pulled since the forecast
        were ahead of it: its place when the forecast was made is
        ``rank + size − size_now`` (clipped to the group)."""
        place = rank + (self.size - size_now if size_now is not None else 0)
        place = min(max(place, 0), self.size - 1)
        if self.size == 1:
            return self.first_token_at
        return self.first_token_at + self.spread_s * place / (self.size - 1)

    def to_json(self) -> str:
        return json.dumps({"worker": self.worker_id, "at": self.made_at,
                           "first": self.first_token_at, "spread": self.spread_s,
                           "std": self.std_s, "n": self.size}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> GroupForecast:
        try:
            data = json.loads(text)
            return cls(str(data["worker"]), float(data["at"]), float(data["first"]),
                       float(data["spread"]), float(data["std"]), int(data["n"]))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InvalidInput):
                raise
            raise InvalidInput("forecast", f"malformed: {exc}") from None


def forecast_groups(estimator: RWTEstimator, snapshot: QueueSnapshot,
                    orders: Mapping[str, Sequence[GroupKey]]) -> dict[GroupKey, GroupForecast]:
    """Every queued group's forecast on the worker whose virtual queue (``orders``, as the
    decision on ``snapshot`` wrote them) holds it first. Groups of a model the worker has
    no profile for, and workers not in the snapshot, get none."""
    by_key = {g.key: g for g in snapshot.groups}
    workers = {w.id: w for w in snapshot.workers}
    now = snapshot.now
    out: dict[GroupKey, GroupForecast] = {}
    for worker_id, order in orders.items():
        worker = workers.get(worker_id)
        if worker is None:
            continue
        queue: list[RequestGroup] = [by_key[k] for k in order if k in by_key and k not in out]
        if not queue:
            continue
        try:
            waits = estimator.queue_waits(worker, queue, now)
        except NotFound:
            continue
        for group, wait in zip(queue, waits, strict=True):
            out[group.key] = GroupForecast(worker_id, now, now + wait.mean_s, wait.spread_s,
                                           wait.std_s, group.size)
    return out


@dataclass
class _Moments:
    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    fitted_count: int = 0

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.total_sq += value * value

    def stats(self) -> LengthStats:
        mean = self.total / self.count
        var = max(0.0, self.total_sq / self.count - mean * mean)
        return LengthStats(mean, math.sqrt(var))


@dataclass
class LengthLearner:
    """Output lengths of finished requests, per model and per (model, class)."""

    min_samples: int = MIN_LENGTH_SAMPLES
    _by_model: dict[str, _Moments] = field(default_factory=dict)
    _by_class: dict[tuple[str, SLOClass], _Moments] = field(default_factory=dict)

    def observe(self, model: str, slo_class: SLOClass, num_output_tokens: int) -> None:
        if num_output_tokens <= 0:
            return
        self._by_model.setdefault(model, _Moments()).add(float(num_output_tokens))
        self._by_class.setdefault((model, slo_class), _Moments()).add(float(num_output_tokens))

    def refit(self, estimator: RWTEstimator, everything: bool = False) -> RWTEstimator:
        """``estimator`` with every statistic that has ``min_samples`` and grew by
        REFIT_GROWTH since its last fit (``everything``: every one that has
        ``min_samples``) replaced; the same estimator when none did."""
        model_stats = _grown(self._by_model, self.min_samples, everything)
        class_stats = _grown(self._by_class, self.min_samples, everything)
        if not model_stats and not class_stats:
            return estimator
        return estimator.with_learned_stats(model_stats, class_stats)


def _grown(table: Mapping[K, _Moments], min_samples: int, everything: bool
           ) -> dict[K, LengthStats]:
    """The statistics of ``table`` due for a (re)fit; marks them fitted."""
    out: dict[K, LengthStats] = {}
    for key, moments in table.items():
        grown = moments.count >= moments.fitted_count * (1 + REFIT_GROWTH)
        if moments.count < min_samples or not (grown or everything):
            continue
        moments.fitted_count = moments.count
        out[key] = moments.stats()
    return out


class Forecaster:
    """The estimator the forecasts come from, learning output lengths as requests finish."""

    def __init__(self, estimator: RWTEstimator, learner: LengthLearner | None = None) -> None:
        self.estimator = estimator
        self.learner = learner or LengthLearner()

    def on_finished(self, model: str, slo_class: SLOClass, num_output_tokens: int) -> None:
        self.learner.observe(model, slo_class, num_output_tokens)

    def use_profiles(self, profiles: ProfileBook) -> None:
        """Forecast from ``profiles`` (e.g. the online-corrected ones) from now on,
        keeping the estimator's settings and every learned length."""
        if profiles is self.estimator.profiles:
            return
        self.estimator = self.learner.refit(self.estimator.with_profiles(profiles),
                                            everything=True)

    def forecast(self, snapshot: QueueSnapshot, orders: Mapping[str, Sequence[GroupKey]]
                 ) -> dict[GroupKey, GroupForecast]:
        self.estimator = self.learner.refit(self.estimator)
        return forecast_groups(self.estimator, snapshot, orders)
