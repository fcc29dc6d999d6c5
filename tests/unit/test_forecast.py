"""Forecasts of queued groups (the predicted wait a user reads), learned output lengths,
and the simulator's record of the last prediction before a request started."""

from __future__ import annotations

import pytest
from test_estimator import BOOK, EXACT, group, worker
from test_sim import job, profile

from qlm.core.errors import InvalidInput
from qlm.core.estimator import DEFAULT_OUTPUT_STATS, LengthStats, RWTEstimator
from qlm.core.forecast import (
    MIN_LENGTH_SAMPLES,
    Forecaster,
    GroupForecast,
    LengthLearner,
    forecast_groups,
)
from qlm.core.perf import ProfileBook
from qlm.core.policies import make_policy
from qlm.core.types import QueueSnapshot, SLOClass
from qlm.sim import SimConfig, WorkerSpec, simulate
from qlm.sim.metrics import wait_prediction_r2


# ------------------------------------------------------------------ one group's forecast
def test_a_request_reads_its_group_forecast_at_its_place() -> None:
    f = GroupForecast("w", made_at=10.0, first_token_at=12.0, spread_s=9.0, std_s=1.0, size=10)
    assert f.first_token_at_for(0) == 12.0
    assert f.first_token_at_for(9) == 21.0
    # three of the ten were pulled since: the head now was fourth when it was made
    assert f.first_token_at_for(0, size_now=7) == pytest.approx(15.0)
    assert f.first_token_at_for(50) == 21.0  # clipped to the group
    assert GroupForecast("w", 0.0, 1.0, 0.0, 0.0, 1).first_token_at_for(3, 9) == 1.0


def test_forecast_json_round_trip_and_errors_name_the_field() -> None:
    f = GroupForecast("w-1", 1.5, 2.5, 0.25, 0.125, 3)
    assert GroupForecast.from_json(f.to_json()) == f
    with pytest.raises(InvalidInput, match="forecast"):
        GroupForecast.from_json('{"worker": "w"}')
    with pytest.raises(InvalidInput, match="forecast"):
        GroupForecast.from_json("not json")
    with pytest.raises(InvalidInput, match=r"forecast\.size"):
        GroupForecast("w", 0.0, 1.0, 0.0, 0.0, 0)
    with pytest.raises(InvalidInput, match=r"forecast\.first_token_at"):
        GroupForecast("w", 0.0, float("nan"), 0.0, 0.0, 1)


# ------------------------------------------------------------------ every group's
def test_forecasts_are_the_estimator_waits_on_the_queues_just_written() -> None:
    est = RWTEstimator(BOOK, EXACT)
    a, b, c = group("a", 5, 1), group("b", 3, 2), group("a", 2, 3)
    w = worker()
    snap = QueueSnapshot(100.0, (a, b, c), (w,))
    forecasts = forecast_groups(est, snap, {"w": (c.key, a.key, b.key), "gone": (a.key,)})
    waits = est.queue_waits(w, [c, a, b], 100.0)
    assert set(forecasts) == {a.key, b.key, c.key}
    for g, wait in zip((c, a, b), waits, strict=True):
        f = forecasts[g.key]
        assert (f.worker_id, f.made_at, f.size) == ("w", 100.0, g.size)
        assert f.first_token_at == pytest.approx(100.0 + wait.mean_s)
        assert f.spread_s == pytest.approx(wait.spread_s)
    # the same queue reordered: the group moved back is forecast later
    later = forecast_groups(est, snap, {"w": (a.key, b.key, c.key)})
    assert later[c.key].first_token_at > forecasts[c.key].first_token_at


# ------------------------------------------------------------------ learned lengths
def test_output_lengths_are_learned_per_model_and_class_once_there_are_enough() -> None:
    learner = LengthLearner()
    est = RWTEstimator(BOOK)
    for _ in range(MIN_LENGTH_SAMPLES - 1):
        learner.observe("a", SLOClass.INTERACTIVE, 30)
    assert learner.refit(est) is est  # too few yet
    learner.observe("a", SLOClass.INTERACTIVE, 30)
    for _ in range(2 * MIN_LENGTH_SAMPLES):
        learner.observe("a", SLOClass.BATCH_1, 90)
    learned = learner.refit(est)
    assert learned.output_stats("a", SLOClass.INTERACTIVE).mean == pytest.approx(30.0)
    assert learned.output_stats("a", SLOClass.INTERACTIVE).std == pytest.approx(0.0)
    assert learned.output_stats("a", SLOClass.BATCH_1).mean == pytest.approx(90.0)
    assert learned.output_stats("a").mean == pytest.approx(70.0)  # the model's, all classes
    assert learned.output_stats("a", SLOClass.BATCH_2).mean == pytest.approx(70.0)
    assert learned.output_stats("b") == DEFAULT_OUTPUT_STATS  # nothing seen of b
    assert learned.prefill_mode == est.prefill_mode
    learner.observe("a", SLOClass.BATCH_1, 90)
    assert learner.refit(learned) is learned  # grew by less than REFIT_GROWTH


def test_learned_lengths_change_the_forecast_and_survive_new_profiles() -> None:
    forecaster = Forecaster(RWTEstimator(BOOK))
    ahead, behind = group("a", 200, 1), group("a", 5, 2)
    snap = QueueSnapshot(0.0, (ahead, behind), (worker(),))
    orders = {"w": (ahead.key, behind.key)}
    before = forecaster.forecast(snap, orders)[behind.key]
    for _ in range(MIN_LENGTH_SAMPLES):
        forecaster.on_finished("a", SLOClass.BATCH_1, 10)  # far shorter than the default
    after = forecaster.forecast(snap, orders)[behind.key]
    assert after.first_token_at < before.first_token_at / 5
    forecaster.use_profiles(ProfileBook.of(BOOK.profiles.values()))
    assert forecaster.estimator.output_stats("a", SLOClass.BATCH_1).mean == pytest.approx(10.0)


# ------------------------------------------------------------------ the simulator's record
def test_the_simulator_records_the_last_prediction_before_the_first_token() -> None:
    jobs = [job(f"r{k}", at=0.05 * k, output=40) for k in range(12)]
    book = ProfileBook.of([profile(max_batch=2)])
    result = simulate(jobs, [WorkerSpec("w", "g", "m1", ("m1",))], book, make_policy("fcfs"),
                      SimConfig(min_decision_interval_s=0.0),
                      forecaster=Forecaster(RWTEstimator(book, {"m1": LengthStats(40.0, 0.0)})))
    predicted = [r for r in result.records if r.last_predicted_at is not None]
    # a request that joined a group and was pulled before any decision has none
    assert len(predicted) >= len(jobs) // 2
    refreshed = 0
    for r in predicted:
        assert r.first_token_at is not None and r.predicted_at is not None
        assert r.predicted_at <= r.last_predicted_at <= r.first_token_at
        refreshed += r.last_predicted_at > r.predicted_at
    assert refreshed > 0  # the queue drained: later decisions refreshed the predictions
    r2, n = wait_prediction_r2(result.records)
    assert n == len(predicted) and r2 > 0.9
