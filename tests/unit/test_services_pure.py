"""The pure parts of the estimator, scheduler and admission: no servers.

Worker roster liveness, LSO command building and the repeat cooldown, virtual queue
orders for gone workers (through the shared applier), PredictWait's best worker and
admission, EstimateBatch's monotonicity, and the admission rules' parser.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from qlm.bus.records import Event, Telemetry
from qlm.core.errors import InvalidInput, NotFound
from qlm.core.estimator import RWTEstimator
from qlm.core.perf import ProfileBook
from qlm.core.types import (
    SLO,
    BatchCap,
    Decision,
    Evict,
    GroupKey,
    Place,
    QueueSnapshot,
    Request,
    RequestGroup,
    RunningRequest,
    SLOClass,
    Swap,
)
from qlm.estimator_plane import (
    GroupSummary,
    WaitQuery,
    WorkerSummary,
    estimate_batch,
    predict_wait,
)
from qlm.roster import WorkerInfo, WorkerRoster, view_of, workers_from
from qlm.runtime.apply import apply
from services.ingest.plane import AdmissionRules
from services.scheduler.loop import CommandMemory, StoreEffects, lso_commands, worker_states

PROFILES = ProfileBook.load()
MODEL, GPU = "mistral-7b", "A100-80GB"


def _telemetry(worker: str, at: float, model: str | None = MODEL) -> Telemetry:
    return Telemetry(worker=worker, gpu=GPU, at=at, model=model, batch_size=1,
                     kv_used_fraction=0.1, step_time_predicted_s=0.02,
                     step_time_observed_s=0.02)


# ------------------------------------------------------------------ roster
def test_a_worker_silent_while_others_report_drops_out() -> None:
    roster = WorkerRoster(workers_from({"workers": [
        {"id": "a", "gpu": GPU, "models": [MODEL]},
        {"id": "b", "gpu": GPU, "models": [MODEL, "vicuna-13b"]}]}), timeout_s=5, started_at=100)
    assert [w.id for w in roster.live()] == ["a", "b"]
    roster.on_telemetry(_telemetry("a", 104))
    assert [w.id for w in roster.live()] == ["a", "b"]  # b's start grace: 100 + 5
    roster.on_telemetry(_telemetry("a", 106))
    assert [w.id for w in roster.live()] == ["a"]  # b never reported
    roster.on_event(Event(type="started", request_id="r", model=MODEL, slo_class="batch-1",
                          at=112, arrival_at=100, worker="b"))
    assert [w.id for w in roster.live()] == ["b"]  # a went silent while b spoke


def test_when_nobody_reports_every_worker_keeps_its_standing() -> None:
    roster = WorkerRoster(workers_from({"workers": [
        {"id": "a", "gpu": GPU, "models": [MODEL]}]}), timeout_s=5, started_at=100)
    roster.on_telemetry(_telemetry("a", 101))
    # The bus goes quiet (Kafka down): bus time stands still, the worker stays live.
    assert [w.id for w in roster.views(10_000.0, PROFILES)] == ["a"]


def test_telemetry_introduces_workers_and_tracks_the_awake_model() -> None:
    roster = WorkerRoster(timeout_s=0)
    roster.on_telemetry(_telemetry("new", 1.0))
    roster.on_telemetry(_telemetry("new", 2.0, model="vicuna-13b"))
    (view,) = roster.views(10.0, PROFILES)
    assert view.active_model == "vicuna-13b" and set(view.models) == {MODEL, "vicuna-13b"}
    assert view.kv_capacity_tokens == PROFILES.get("vicuna-13b", GPU).kv_capacity_tokens


def test_a_worker_without_any_profile_has_no_view() -> None:
    assert view_of(WorkerInfo("x", "TPU", (MODEL,), MODEL), PROFILES) is None


def test_workers_file_errors_name_the_entry() -> None:
    with pytest.raises(InvalidInput, match=r"workers\[1\]\.models"):
        workers_from({"workers": [{"id": "a", "gpu": GPU, "models": [MODEL]},
                                  {"id": "b", "gpu": GPU, "models": []}]})
    with pytest.raises(InvalidInput, match="unique"):
        workers_from({"workers": [{"id": "a", "gpu": GPU, "models": [MODEL]}] * 2})


# ------------------------------------------------------------------ scheduler apply
def test_lso_commands_group_evictions_per_worker_and_carry_the_fence() -> None:
    decision = Decision(
        evictions=(Evict("w0", "r1", "room"), Evict("w0", "r2", "room", state_swap=True),
                   Evict("w1", "r3")),
        swaps=(Swap("w2", "vicuna-13b"),))
    commands = lso_commands(decision, fence=7, numbers=iter(range(1, 10)), issued_at=5.0)
    assert [(c.type, c.worker, c.request_ids, c.keep_kv) for c in commands] == [
        ("evict", "w0", ("r1", "r2"), True), ("evict", "w1", ("r3",), False),
        ("swap", "w2", (), False)]
    assert [c.command_id for c in commands] == ["7-1", "7-2", "7-3"]


def test_batch_caps_become_cap_commands_and_reach_the_effects() -> None:
    decision = Decision(batch_caps=(BatchCap("w0", 40), BatchCap("w1", None)))
    commands = lso_commands(decision, fence=3, numbers=iter(range(1, 10)), issued_at=5.0)
    assert [(c.type, c.worker, c.max_batch_size) for c in commands] == [
        ("cap", "w0", 40), ("cap", "w1", None)]
    view = view_of(WorkerInfo("w0", GPU, (MODEL,), MODEL), PROFILES)
    assert view is not None
    effects = StoreEffects()
    invalid = apply(Decision(batch_caps=(BatchCap("w0", 40), BatchCap("gone", 8))),
                    QueueSnapshot(0.0, (), (view,)), PROFILES, effects)
    assert effects.caps == {"w0": 40}
    assert invalid == 1  # a cap for a worker not in the snapshot


def test_the_same_command_is_not_repeated_within_the_cooldown() -> None:
    memory = CommandMemory(cooldown_s=5.0)
    decision = Decision(evictions=(Evict("w0", "r1"),), swaps=(Swap("w1", MODEL),))
    assert memory.fresh(decision, 0.0) == decision
    assert memory.fresh(decision, 4.9).evictions == ()
    assert memory.fresh(decision, 4.9).swaps == ()
    assert memory.fresh(decision, 5.1) == decision


def test_workers_that_are_gone_get_an_empty_queue() -> None:
    key = GroupKey(MODEL, SLOClass.BATCH_1, 0)
    view = view_of(WorkerInfo("live", GPU, (MODEL,), MODEL), PROFILES)
    assert view is not None
    snapshot = QueueSnapshot(0.0, (), (view,))
    effects = StoreEffects()
    apply(Decision(placements=(Place("live", (key,)),)), snapshot, PROFILES, effects,
          ["live", "gone"])
    orders = effects.orders
    assert orders == {"live": (key,), "gone": ()}


def test_the_worker_state_log_counts_running_work_by_class_and_names_the_lane_head() -> None:
    def running(rid: str, slo_class: SLOClass, started: float, first: float | None
                ) -> RunningRequest:
        r = Request(rid, MODEL, 500, 100, slo_class, SLO.for_class(slo_class), 0.0)
        return RunningRequest(r, started, first)

    idle = view_of(WorkerInfo("idle", GPU, (MODEL,), MODEL), PROFILES)
    assert idle is not None
    busy = replace(idle, id="busy", running=(
        running("a", SLOClass.BATCH_1, 1.0, 1.5), running("b", SLOClass.BATCH_1, 3.0, 1.5),
        running("c", SLOClass.INTERACTIVE, 4.0, None)))
    head = _group(2)
    snapshot = QueueSnapshot(5.0, (head,), (busy, idle))
    decision = Decision(placements=(Place("busy", (head.key,)), Place("idle", ())),
                        evictions=(Evict("busy", "a", "slo"),),
                        batch_caps=(BatchCap("busy", 40), BatchCap("idle", None)))
    (view,) = worker_states(snapshot, decision)  # the idle worker, with no lane: no line
    # b runs again after an eviction (its first token predates its start); c prefills
    assert view["running"] == {"batch-1": 1, "batch-1/resumed": 1, "interactive": 1}
    assert view["prefilling"] == 1 and view["evictions"] == 1
    assert view["kv_reserved_tokens"] == 3 * (500 + 100)  # max_tokens 100 < the expected 338
    assert view["lane_head"] == str(head.key) and view["lane_head_size"] == 2
    assert view["batch_cap"] == 40


# ------------------------------------------------------------------ estimator plane
def _group(n: int, slo_class: SLOClass = SLOClass.INTERACTIVE, prompt: int = 1000,
           window: int = 0, arrival_at: float = 0.0) -> RequestGroup:
    return RequestGroup(GroupKey(MODEL, slo_class, window), tuple(
        Request(f"q{window}-{i}", MODEL, prompt, 1000, slo_class, SLO.for_class(slo_class),
                arrival_at) for i in range(n)))


def test_predict_wait_picks_the_least_loaded_worker_and_refuses_hopeless_interactive() -> None:
    estimator = RWTEstimator(PROFILES)
    idle = view_of(WorkerInfo("idle", GPU, (MODEL,), MODEL), PROFILES)
    busy = view_of(WorkerInfo("busy", GPU, (MODEL,), MODEL), PROFILES)
    assert idle is not None and busy is not None
    backlog = _group(3000)
    snapshot = QueueSnapshot(1.0, (backlog,), (busy, idle), {"busy": (backlog.key,)})
    query = WaitQuery(MODEL, SLOClass.INTERACTIVE, 500, 200)
    answer = predict_wait(estimator, snapshot, query, 0.05)
    assert answer.best_worker_id == "idle" and answer.admit and answer.p_meet_slo > 0.99

    crowded = QueueSnapshot(1.0, (backlog,), (busy,), {"busy": (backlog.key,)})
    refused = predict_wait(estimator, crowded, query, 0.05)
    assert not refused.admit and refused.retry_after_s > 0 and refused.wait_mean_s > 20
    batch = predict_wait(estimator, crowded, WaitQuery(MODEL, SLOClass.BATCH_1, 500, 200), 0.05)
    assert batch.admit and batch.p_meet_slo < 0.05  # batch is always admitted
    # A group with a later deadline does not stand ahead of a new interactive request.
    later = _group(3000, SLOClass.BATCH_2, window=1)
    relaxed = QueueSnapshot(1.0, (later,), (busy,), {"busy": (later.key,)})
    assert predict_wait(estimator, relaxed, query, 0.05).admit


def test_predict_wait_without_workers_admits_and_unknown_models_are_not_found() -> None:
    estimator = RWTEstimator(PROFILES)
    empty = QueueSnapshot(0.0, (), ())
    answer = predict_wait(estimator, empty, WaitQuery(MODEL, SLOClass.INTERACTIVE, 5, 5), 0.05)
    assert answer.admit and answer.best_worker_id == ""
    with pytest.raises(NotFound):
        predict_wait(estimator, empty, WaitQuery("nope", SLOClass.INTERACTIVE, 5, 5), 0.05)
    with pytest.raises(InvalidInput, match="prompt_tokens"):
        WaitQuery(MODEL, SLOClass.INTERACTIVE, 0, 5)


def test_running_work_counts_in_predict_wait() -> None:
    estimator = RWTEstimator(PROFILES)
    base = view_of(WorkerInfo("w", GPU, (MODEL,), MODEL), PROFILES)
    assert base is not None
    running = tuple(RunningRequest(r, 0.0) for r in _group(base.max_batch_size, window=9).requests)
    from dataclasses import replace

    full = replace(base, running=running)
    query = WaitQuery(MODEL, SLOClass.INTERACTIVE, 500, 200)
    idle_wait = predict_wait(estimator, QueueSnapshot(0.0, (), (base,)), query, 0.05).wait_mean_s
    full_wait = predict_wait(estimator, QueueSnapshot(0.0, (), (full,)), query, 0.05).wait_mean_s
    assert full_wait > idle_wait


def test_estimate_batch_head_wait_grows_with_running_work_and_swaps_cost() -> None:
    estimator = RWTEstimator(PROFILES)
    groups = [GroupSummary("g", MODEL, 10, 10 * 500, 10 * 300)]
    limit = PROFILES.get(MODEL, GPU).max_batch_size
    workers = [
        WorkerSummary("idle", GPU, MODEL),
        WorkerSummary("full", GPU, MODEL, (), 100_000, limit),
        WorkerSummary("other", GPU, "vicuna-13b", ("vicuna-13b", MODEL)),
        WorkerSummary("cold", GPU, "vicuna-13b", ("vicuna-13b",)),
    ]
    out = estimate_batch(estimator, groups, workers)
    idle, full, other, cold = out.head_wait_mean_s[0]
    assert idle < full and idle < other < cold  # a wake is cheaper than a cold load
    assert out.service_mean_s[0, 2] > out.service_mean_s[0, 0]
    assert out.head_wait_std_s[0, 1] > 0 and out.head_wait_std_s[0, 0] == 0
    with pytest.raises(InvalidInput, match="num_requests"):
        GroupSummary("bad", MODEL, 0, 1, 1)


# ------------------------------------------------------------------ admission rules
def test_admission_rules_parse() -> None:
    assert AdmissionRules.parse("").rejects(SLOClass.INTERACTIVE)
    rules = AdmissionRules.parse("interactive=queue, custom=reject")
    assert not rules.rejects(SLOClass.INTERACTIVE) and rules.rejects(SLOClass.CUSTOM)
    assert not rules.rejects(SLOClass.BATCH_1)
    with pytest.raises(InvalidInput, match="always queued"):
        AdmissionRules.parse("batch-1=reject")
    with pytest.raises(InvalidInput, match="unknown class"):
        AdmissionRules.parse("vip=reject")
    with pytest.raises(InvalidInput, match="expected reject or queue"):
        AdmissionRules.parse("interactive=drop")


# ------------------------------------------------------------------ scheduler corrections
def test_online_correction_rebuilds_the_profiles_only_when_a_factor_moved() -> None:
    from qlm.core.corrections import CorrectedProfiles

    book = CorrectedProfiles(PROFILES, min_change=0.1)
    assert book.book() is PROFILES
    heartbeat = _telemetry("w", 1.0).model_copy(update={"step_time_predicted_s": 0.0,
                                                         "step_time_observed_s": 0.0})
    assert not book.on_telemetry(heartbeat)
    slow = _telemetry("w", 2.0).model_copy(update={"step_time_observed_s": 0.04})  # 2× slower
    for _ in range(20):
        assert book.on_telemetry(slow)
    corrected = book.book()
    factor = book.factors[(MODEL, GPU)]
    assert 1.9 < factor <= 2.0
    base, now = PROFILES.get(MODEL, GPU), corrected.get(MODEL, GPU)
    assert now.decode_step_s(8, 4000) == pytest.approx(base.decode_step_s(8, 4000) * factor)
    assert now.prefill_s(1000) == base.prefill_s(1000)  # only decode is corrected
    assert corrected.get("vicuna-13b", GPU) == PROFILES.get("vicuna-13b", GPU)
    book.on_telemetry(slow)  # a small further move: the same book (policy memos survive)
    assert book.book() is corrected


def test_which_groups_stay_ahead_follows_the_schedulers_policy() -> None:
    estimator = RWTEstimator(PROFILES)
    busy = view_of(WorkerInfo("busy", GPU, (MODEL,), MODEL), PROFILES)
    assert busy is not None
    relaxed = _group(3000, SLOClass.BATCH_2, window=1, arrival_at=0.0)  # arrived first
    snapshot = QueueSnapshot(1.0, (relaxed,), (busy,), {"busy": (relaxed.key,)})
    interactive = WaitQuery(MODEL, SLOClass.INTERACTIVE, 500, 200)
    batch = WaitQuery(MODEL, SLOClass.BATCH_1, 500, 200)

    def wait(query: WaitQuery, policy: str) -> float:
        return predict_wait(estimator, snapshot, query, 0.05, policy=policy).wait_mean_s

    assert wait(interactive, "qlm") < 5 < wait(interactive, "fcfs")  # fcfs: it waits behind
    assert wait(interactive, "edf") == wait(interactive, "qlm")
    assert wait(interactive, "priority") < 5 < wait(batch, "priority")
    with pytest.raises(InvalidInput, match="policy"):
        predict_wait(estimator, snapshot, interactive, 0.05, policy="lifo")


def test_the_estimator_plane_learns_output_lengths_from_finished_events() -> None:
    from qlm.core.forecast import MIN_LENGTH_SAMPLES
    from qlm.estimator_plane import EstimatorPlane

    plane = EstimatorPlane(RWTEstimator(PROFILES), WorkerRoster(timeout_s=0), None)
    before = plane.estimator.output_stats(MODEL, SLOClass.INTERACTIVE)
    for i in range(MIN_LENGTH_SAMPLES):
        plane.on_event(Event(type="finished", request_id=f"r{i}", model=MODEL,
                             slo_class="interactive", at=10.0, arrival_at=1.0, worker="w",
                             num_output_tokens=28))
    learned = plane.estimator.output_stats(MODEL, SLOClass.INTERACTIVE)
    assert before.mean != 28.0 and learned.mean == pytest.approx(28.0)


def test_the_scheduler_freezes_the_heap_once_enough_queued_requests_were_read() -> None:
    import gc

    from services.scheduler.loop import HeapFreezer

    never = HeapFreezer(0)
    never.after_step(10**9)
    assert never.num_freezes == 0
    freezer = HeapFreezer(every_records=100)
    try:
        freezer.after_step(99)  # the snapshots read 99 requests so far: not yet
        assert freezer.num_freezes == 0
        freezer.after_step(100)
        assert freezer.num_freezes == 1 and gc.get_freeze_count() > 0
        freezer.after_step(150)  # 50 since the last freeze
        assert freezer.num_freezes == 1
        freezer.after_step(200)
        assert freezer.num_freezes == 2
    finally:
        gc.unfreeze()  # give the test process's objects back to the collector
