"""Fair share: the virtual token counters (pure), the fair order, how the qlm policy uses
them, and, in the simulator, that a light tenant keeps its attainment beside a heavy one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qlm.core.errors import InvalidInput
from qlm.core.fairness import Flow, TokenWeights, VirtualTokenCounters, fair_order
from qlm.core.perf import ProfileBook
from qlm.core.policies import PolicyContext, make_policy
from qlm.core.policies.base import StatefulPolicy, policy_state, restore_policy_state
from qlm.core.policies.qlm import QlmPolicy
from qlm.core.types import (
    SLO,
    GroupKey,
    QueueSnapshot,
    Request,
    RunningRequest,
    SLOClass,
    WorkerView,
    group_requests,
)
from qlm.sim import Job, simulate
from qlm.workloads import cluster_for, only_tenants, parse_tenants, plan_requests, with_tenants

INT = SLOClass.INTERACTIVE
B = SLOClass.BATCH_1


def req(rid: str, tenant: str, *, at: float = 0.0, prompt: int = 100, generated: int = 0,
        slo_class: SLOClass = INT, model: str = "m") -> Request:
    return Request(f"{tenant}/{rid}", model, prompt, 500, slo_class, SLO.for_class(slo_class),
                   at, tenant=tenant, num_generated=generated)


def worker(*running: Request) -> WorkerView:
    return WorkerView("w", "g", ("m",), "m", 100_000, 64,
                      tuple(RunningRequest(r, 0.0, None) for r in running))


def snapshot(queued: list[Request], running: list[Request], now: float = 1.0) -> QueueSnapshot:
    return QueueSnapshot(now, group_requests(queued, 1.0), (worker(*running),))


# ------------------------------------------------------------------ counters
def test_running_requests_are_charged_prompt_once_and_output_as_it_grows() -> None:
    c = VirtualTokenCounters(TokenWeights(input=1.0, output=2.0))
    c.observe(snapshot([], [req("1", "a", prompt=100, generated=0)]))
    assert c.counter((INT, "a")) == 100
    c.observe(snapshot([], [req("1", "a", prompt=100, generated=10)]))
    assert c.counter((INT, "a")) == 100 + 2 * 10
    c.observe(snapshot([], [req("1", "a", prompt=100, generated=10)]))  # same view again
    assert c.counter((INT, "a")) == 120
    assert c.counter((INT, "b")) == 0


def test_a_request_no_snapshot_saw_is_charged_whole_when_it_finishes() -> None:
    c = VirtualTokenCounters(TokenWeights(input=1.0, output=2.0))
    c.on_finished("a/1", (INT, "a"), 100, 30)  # started and ended between two decisions
    assert c.counter((INT, "a")) == 100 + 2 * 30
    c.on_finished("a/1", (INT, "a"), 100, 30)  # the same event again (a replayed record)
    assert c.counter((INT, "a")) == 160


def test_a_finished_request_is_charged_only_what_its_snapshots_did_not_see() -> None:
    c = VirtualTokenCounters(TokenWeights(input=1.0, output=2.0))
    c.observe(snapshot([], [req("1", "a", prompt=100, generated=10)]))
    assert c.counter((INT, "a")) == 100 + 2 * 10
    c.on_finished("a/1", (INT, "a"), 100, 25)
    assert c.counter((INT, "a")) == 100 + 2 * 25
    # a snapshot read before the finish, observed after it, charges nothing more
    c.observe(snapshot([], [req("1", "a", prompt=100, generated=20)]))
    c.observe(snapshot([], []))
    assert c.counter((INT, "a")) == 150
    with pytest.raises(InvalidInput, match="tokens"):
        c.on_finished("a/2", (INT, "a"), -1, 0)


def test_an_evicted_request_is_not_charged_twice_when_it_resumes() -> None:
    c = VirtualTokenCounters(TokenWeights(input=1.0, output=1.0))
    c.observe(snapshot([], [req("1", "a", prompt=50, generated=30)]))
    assert c.counter((INT, "a")) == 80
    c.observe(snapshot([req("1", "a", prompt=50, generated=30)], []))  # evicted: queued
    c.observe(snapshot([], [req("1", "a", prompt=50, generated=35)]))  # resumed
    assert c.counter((INT, "a")) == 85


def recount(views: list[list[tuple[Request, ...]]], weights: TokenWeights) -> dict[Flow, float]:
    """What the counters must hold after observing each worker set of ``views`` in turn,
    counted from scratch: a request is charged its prompt when first seen and every output
    token it shows beyond the most it showed before (whatever worker it runs on, however
    often it left and came back)."""
    counters: dict[Flow, float] = {}
    shown: dict[str, int] = {}
    for workers in views:
        for running in workers:
            for r in running:
                flow = (r.slo_class, r.tenant)
                before = shown.get(r.id)
                if before is None:
                    counters[flow] = counters.get(flow, 0.0) + weights.cost(r.prompt_tokens,
                                                                            r.num_generated)
                elif r.num_generated > before:
                    counters[flow] = counters.get(flow, 0.0) + weights.cost(
                        0, r.num_generated - before)
                shown[r.id] = max(before or 0, r.num_generated)
    return counters


@pytest.mark.parametrize("seed", range(6))
def test_incremental_counters_equal_a_recount_as_requests_progress_move_and_resume(
        seed: int) -> None:
    """The counters read only the workers whose tuple of running requests changed; on a
    random run (requests progress, finish, move to another worker, leave and resume,
    workers come and go, and most workers keep their tuple from one snapshot to the next)
    they equal a recount over every request of every snapshot."""
    rng = np.random.default_rng(seed)
    weights = TokenWeights(1.0, 2.0)
    c = VirtualTokenCounters(weights)
    workers: dict[str, tuple[Request, ...]] = {f"w{i}": () for i in range(5)}
    tuples: dict[str, tuple[RunningRequest, ...]] = {}
    parked: list[Request] = []  # evicted: they resume later with their progress
    seen: list[list[tuple[Request, ...]]] = []
    next_id = 0
    for _ in range(60):
        for wid in list(workers):
            if rng.random() < 0.6:
                continue  # unchanged: the same tuple object again
            running = []
            for r in workers[wid]:
                roll = rng.random()
                if roll < 0.1:
                    continue  # finished
                if roll < 0.2:
                    parked.append(r)  # evicted
                    continue
                done = min(r.max_tokens, r.num_generated + int(rng.integers(0, 30)))
                running.append(req(r.id.split("/")[1], r.tenant, prompt=r.prompt_tokens,
                                   generated=done, slo_class=r.slo_class))
            while parked and rng.random() < 0.3:
                running.append(parked.pop(int(rng.integers(len(parked)))))  # resumed
            for _ in range(int(rng.integers(0, 4))):
                next_id += 1
                running.append(req(str(next_id), ("a", "b", "c")[int(rng.integers(3))],
                                   prompt=int(rng.integers(1, 300)),
                                   slo_class=(INT, B)[int(rng.integers(2))]))
            workers[wid] = tuple(running)
            tuples.pop(wid, None)
        if rng.random() < 0.2 and len(workers) > 1:  # one moves to another worker
            a, b = rng.choice(sorted(workers), 2, replace=False)
            if workers[a]:
                workers[b] = (*workers[b], workers[a][-1])
                workers[a] = workers[a][:-1]
                tuples.pop(a, None)
                tuples.pop(b, None)
        if rng.random() < 0.05:  # a worker leaves (its requests back to the queue)
            gone = sorted(workers)[int(rng.integers(len(workers)))]
            parked.extend(workers.pop(gone))
            tuples.pop(gone, None)
            workers[f"w{next_id}x"] = ()
        views = tuple(
            WorkerView(wid, "g", ("m",), "m", 100_000, 64, tuples.setdefault(
                wid, tuple(RunningRequest(r, 0.0, None) for r in running)))
            for wid, running in workers.items())
        c.observe(QueueSnapshot(1.0, (), views))
        seen.append(list(workers.values()))
        assert c.counters() == recount(seen, weights)
        c.observe(QueueSnapshot(1.0, (), views))  # the same snapshot again: nothing more
        assert c.counters() == recount(seen, weights)


def test_a_newly_backlogged_tenant_is_lifted_to_the_least_backlogged_counter() -> None:
    c = VirtualTokenCounters()
    c.charge((INT, "a"), 1000)
    c.charge((INT, "b"), 400)
    c.set_backlogged([(INT, "a"), (INT, "b")])
    c.set_backlogged([(INT, "a"), (INT, "b"), (INT, "idle")])
    assert c.counter((INT, "idle")) == 400  # idle time banks no credit
    c.set_backlogged([(INT, "a"), (INT, "b"), (INT, "idle"), (B, "idle")])
    assert c.counter((B, "idle")) == 0  # another class: its own backlog (none before)


def test_a_tenant_above_the_minimum_keeps_its_counter_when_it_comes_back() -> None:
    c = VirtualTokenCounters()
    c.charge((INT, "a"), 100)
    c.charge((INT, "b"), 900)
    c.set_backlogged([(INT, "a")])
    c.set_backlogged([(INT, "a"), (INT, "b")])
    assert c.counter((INT, "b")) == 900


def test_with_no_backlog_a_returning_tenant_is_lifted_to_the_last_one_that_left() -> None:
    c = VirtualTokenCounters()
    c.charge((INT, "a"), 700)
    c.set_backlogged([(INT, "a")])
    c.set_backlogged([])
    c.set_backlogged([(INT, "b")])
    assert c.counter((INT, "b")) == 700


def test_state_round_trips_and_bad_state_is_named() -> None:
    c = VirtualTokenCounters()
    c.charge((INT, "a"), 10, 5)
    c.charge((B, "b"), 3)
    c.set_backlogged([(INT, "a")])
    c.set_backlogged([])
    back = VirtualTokenCounters.from_state(c.to_state())
    assert back.counters() == c.counters()
    assert back.to_state() == c.to_state()
    with pytest.raises(InvalidInput, match=r"fair_share\.counters\.interactive\.a"):
        VirtualTokenCounters.from_state({"counters": {"interactive": {"a": "x"}}})
    with pytest.raises(InvalidInput, match="unknown SLO class"):
        VirtualTokenCounters.from_state({"counters": {"gold": {}}})


def test_weights_are_checked() -> None:
    with pytest.raises(InvalidInput, match=r"weights\.output"):
        TokenWeights(1.0, -1.0)


# ------------------------------------------------------------------ fair order
def test_fair_order_interleaves_by_counter_after_each_unit() -> None:
    items = [("heavy", 10.0), ("heavy", 10.0), ("heavy", 10.0), ("light", 10.0)]
    assert fair_order(items, {"heavy": 0.0, "light": 0.0}) == [0, 3, 1, 2]
    # light far ahead: heavy catches up first
    assert fair_order(items, {"heavy": 0.0, "light": 15.0}) == [0, 1, 3, 2]


def test_a_small_unit_does_not_wait_behind_a_large_one_of_a_tenant_slightly_behind() -> None:
    items = [("heavy", 1000.0), ("light", 10.0)]
    assert fair_order(items, {"heavy": 0.0, "light": 5.0}) == [1, 0]


# ------------------------------------------------------------------ group keys
@pytest.mark.parametrize("key", [
    GroupKey("m", INT, 3), GroupKey("a|b", B, -2, "t|x%"), GroupKey("a|b", B, 5),
    GroupKey("m", SLOClass.CUSTOM, 7, "light"),
])
def test_group_keys_round_trip_through_text(key: GroupKey) -> None:
    assert GroupKey.parse(str(key)) == key


def test_default_tenant_group_text_is_unchanged_and_other_tenants_have_their_own() -> None:
    assert str(GroupKey("m", INT, 3)) == "m|interactive|3"
    groups = group_requests([req("1", "a"), req("2", "b"), req("3", "a")], 1.0)
    assert [(g.key.tenant, g.size) for g in groups] == [("a", 2), ("b", 1)]


# ------------------------------------------------------------------ the policy
def profiles() -> ProfileBook:
    return ProfileBook.load()


def test_the_policy_serves_the_tenant_with_the_least_counter_first() -> None:
    policy = make_policy("qlm")
    ctx = PolicyContext(profiles())
    heavy_running = [req(f"r{i}", "heavy", model="mistral-7b", generated=200)
                     for i in range(8)]
    queued = [req(f"q{i}", "heavy", at=0.2, model="mistral-7b") for i in range(30)]
    queued.append(req("q0", "light", at=0.9, model="mistral-7b"))
    snap = QueueSnapshot(1.0, group_requests(queued, 1.0), (
        WorkerView("w", "A100-80GB", ("mistral-7b",), "mistral-7b", 100_000, 8,
                   tuple(RunningRequest(r, 0.0, 0.1) for r in heavy_running)),))
    order = policy.decide(snap, ctx).placements[0].order
    assert order[0].tenant == "light"
    unfair = make_policy("qlm", fair_share=False).decide(snap, ctx).placements[0].order
    assert unfair[0].tenant == "heavy"  # deadline order without fair share


def test_a_restored_policy_goes_on_where_the_saved_one_stopped() -> None:
    """What a scheduler restart does: the leader's state saved as JSON, a fresh policy
    restores it and decides as the leader would have; a fresh one that does not restore
    it has forgotten the heavy tenant's service and serves it first."""
    ctx = PolicyContext(profiles())

    def snap(now: float, running: list[Request], queued: list[Request]) -> QueueSnapshot:
        return QueueSnapshot(now, group_requests(queued, 1.0), (
            WorkerView("w", "A100-80GB", ("mistral-7b",), "mistral-7b", 100_000, 64,
                       tuple(RunningRequest(r, 0.0, 0.1) for r in running)),))

    heavy = [req(f"r{i}", "heavy", model="mistral-7b", generated=200) for i in range(30)]
    light_queued = [req(f"q{i}", "light", at=0.9, model="mistral-7b") for i in range(10)]
    heavy_queued = [req(f"q{i}", "heavy", at=0.2, model="mistral-7b") for i in range(2)]
    leader = make_policy("qlm")
    leader.decide(snap(1.0, heavy, light_queued + heavy_queued), ctx)
    saved = json.loads(json.dumps(policy_state(leader)))  # what Redis keeps

    # later: 29 of the heavy requests ended, one still runs and made 50 tokens more
    still = [req("r0", "heavy", model="mistral-7b", generated=250)]
    later = snap(2.0, still, light_queued + heavy_queued)
    restored, forgetful = make_policy("qlm"), make_policy("qlm")
    assert restore_policy_state(restored, saved)
    assert isinstance(restored, QlmPolicy) and isinstance(leader, QlmPolicy)
    assert restored.counters.counters() == leader.counters.counters()
    decided = leader.decide(later, ctx)
    assert restored.decide(later, ctx) == decided
    assert restored.state() == leader.state()  # r0's prompt and output not charged again
    assert decided.placements[0].order[0].tenant == "light"
    assert forgetful.decide(later, ctx).placements[0].order[0].tenant == "heavy"


def test_a_malformed_state_is_named_and_the_counters_are_kept() -> None:
    policy = make_policy("qlm")
    assert isinstance(policy, QlmPolicy)
    policy.counters.charge((INT, "a"), 10)
    before = policy.state()
    for bad, field_name in (
        ("not an object", "state"),
        ({"fair_share": []}, "fair_share"),
        ({"fair_share": {"counters": {"interactive": {"a": "x"}}}},
         "fair_share.counters.interactive.a"),
        ({"fair_share": {"backlogged": {"interactive": "a"}}}, "fair_share.backlogged.interactive"),
        ({"fair_share": {"charged": {"r1": -1}}}, "fair_share.charged.r1"),
        ({"fair_share": {"last_left": []}}, "fair_share.last_left"),
    ):
        with pytest.raises(InvalidInput) as raised:
            policy.restore(bad)
        assert raised.value.field == field_name
        assert policy.state() == before


def test_policies_without_state_save_and_restore_nothing() -> None:
    fcfs = make_policy("fcfs")
    assert not isinstance(fcfs, StatefulPolicy)
    assert policy_state(fcfs) is None
    assert not restore_policy_state(fcfs, {"fair_share": {}})
    assert isinstance(make_policy("qlm"), StatefulPolicy)


def test_parse_tenants_names_the_field() -> None:
    assert parse_tenants("light:1,heavy:10") == {"light": 1.0, "heavy": 10.0}
    for bad in ("light", "light:0", "a:1,a:2", ":1", "x/y:1"):
        with pytest.raises(InvalidInput, match="tenants"):
            parse_tenants(bad)


# ------------------------------------------------------------------ simulator
def test_simulator_light_tenant_keeps_its_attainment_beside_a_heavy_one() -> None:
    """One A10 worker overloaded by a tenant sending 10x another's requests (WA's class
    mix): without fair share the light tenant misses with the crowd; with it, it stays
    within 5 points of its attainment alone. The heuristic plans alone (the MILP's
    wall-clock backstop would make the runs depend on the machine's load)."""
    plan = with_tenants(plan_requests("WA", 1000, np.random.default_rng(0)),
                        {"light": 1, "heavy": 10}, seed=0)
    jobs = plan.jobs_at(400.0)
    workers = cluster_for("WA", "mini")[:1]
    book = profiles()

    def light(jobs_run: tuple[Job, ...], fair: bool) -> float:
        policy = make_policy("qlm", fair_share=fair, milp_max_cells=0)
        result = simulate(jobs_run, workers, book, policy, seed=0)
        return result.metrics.slo_attainment_by_tenant["light"]

    alone = light(only_tenants(jobs, ["light"]), True)
    without = light(jobs, False)
    with_fair = light(jobs, True)
    assert without < alone - 0.1  # the scenario is one where the light tenant suffers
    assert with_fair >= alone - 0.05
