"""Fair share: the virtual token counters (pure), the fair order, how the qlm policy uses
them, and, in the simulator, that a light tenant keeps its attainment beside a heavy one."""

from __future__ import annotations

import numpy as np
import pytest

from qlm.core.errors import InvalidInput
from qlm.core.fairness import TokenWeights, VirtualTokenCounters, fair_order
from qlm.core.perf import ProfileBook
from qlm.core.policies import PolicyContext, make_policy
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


def test_an_evicted_request_is_not_charged_twice_when_it_resumes() -> None:
    c = VirtualTokenCounters(TokenWeights(input=1.0, output=1.0))
    c.observe(snapshot([], [req("1", "a", prompt=50, generated=30)]))
    assert c.counter((INT, "a")) == 80
    c.observe(snapshot([req("1", "a", prompt=50, generated=30)], []))  # evicted: queued
    c.observe(snapshot([], [req("1", "a", prompt=50, generated=35)]))  # resumed
    assert c.counter((INT, "a")) == 85


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
