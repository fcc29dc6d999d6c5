"""The incremental paths of the planners (what the simulator's speed rests on) give
exactly what recomputing from scratch gives: a group summary moved to a new index, a
lane walked again from a changed state, qlm's local search against its plain form."""

from __future__ import annotations

import random
from dataclasses import fields, replace

import pytest

from qlm.core.policies import PolicyContext
from qlm.core.policies.planning import (
    CostModel,
    GroupStats,
    Lane,
    _reindexed,
    lane_value,
    rewalk,
    state_before,
    walk,
)
from qlm.core.policies.qlm import QlmPolicy
from qlm.core.policies.qlm.heuristic import _improve
from qlm.core.types import GroupKey, SLOClass
from tests.unit.test_policy_qlm import random_instance


def test_a_summary_moved_to_a_new_index_differs_only_in_its_index() -> None:
    stats = GroupStats(GroupKey("m", SLOClass.BATCH_1, 3, "t"), "m", 1, 4, 100.5, 800.0,
                       90.0, 200.0, (1.0, 2.0), 1.0, 2.0, 60.0, 0.05)
    assert [f.name for f in fields(GroupStats)] == [  # a new field must be copied too
        "key", "model", "index", "size", "mean_prompt", "out_mean_total", "out_var_total",
        "mean_output", "deadline_points", "earliest_deadline_at", "latest_deadline_at",
        "ttft_s", "tpot_s"]
    assert _reindexed(stats, 7) == replace(stats, index=7)


def lanes_of(seed: int) -> tuple[CostModel, list[Lane], list[list[int]], QlmPolicy, object]:
    snap, book = random_instance(seed)
    ctx = PolicyContext(book, {})
    policy = QlmPolicy()
    pc = policy.planning_context(snap, ctx, policy.options_for(ctx))
    rng = random.Random(seed)
    orders = []
    for lane in pc.fresh_lanes():
        order = [gi for gi in range(len(pc.stats)) if pc.cost.service(gi, lane.index)]
        rng.shuffle(order)
        orders.append(order)
    return pc.cost, pc.fresh_lanes(), orders, policy, pc


@pytest.mark.parametrize("seed", range(8))
def test_a_walk_resumed_from_a_changed_state_is_a_fresh_walk(seed: int) -> None:
    cost, lanes, orders, _, _ = lanes_of(seed)
    for lane, order in zip(lanes, orders, strict=True):
        slots = walk(cost, lane, order)
        for i in range(len(order) - 1):
            swapped = [*order[:i], order[i + 1], order[i], *order[i + 2:]]
            expected = walk(cost, lane, swapped)
            pair = expected[i:i + 2]
            after = state_before(cost, lane, swapped, expected, i + 2)
            fresh, kept_from = rewalk(cost, lane, order, slots, i + 2, after)
            assert [*expected[:i], *pair, *fresh, *slots[kept_from:]] == expected


def plain_improve(pc, lanes, budget: int) -> None:  # type: ignore[no-untyped-def]
    """The local search as it was written first: a whole walk per trial."""
    cost = pc.cost
    for lane in lanes:
        if len(lane.order) < 2 or budget <= 0:
            continue
        slots = walk(cost, lane, lane.order)
        if all(s.p_meet > 0.99 or s.p_meet < 0.01 for s in slots):
            continue
        current = lane.order
        value = lane_value(cost, lane, current, pc.weights)
        improved = True
        while improved and budget > 0:
            improved = False
            for i in range(len(current) - 1):
                if budget <= 0:
                    break
                if pc.fair_before(current[i], current[i + 1]):
                    continue
                trial = [*current[:i], current[i + 1], current[i], *current[i + 2:]]
                budget -= 1
                v = lane_value(cost, lane, trial, pc.weights)
                if v > value + 1e-9:
                    current, value, improved = trial, v, True
        if current is not lane.order:
            lane.reset(current, cost)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("budget", [3, 400])
def test_the_local_search_finds_what_whole_walks_find(seed: int, budget: int) -> None:
    cost, _, orders, _, pc = lanes_of(seed)
    incremental, plain = pc.fresh_lanes(), pc.fresh_lanes()  # type: ignore[attr-defined]
    for lanes in (incremental, plain):
        for lane, order in zip(lanes, orders, strict=True):
            lane.reset(list(order), cost)
    _improve(pc, incremental, budget)  # type: ignore[arg-type]
    plain_improve(pc, plain, budget)
    assert [lane.order for lane in incremental] == [lane.order for lane in plain]
    assert [lane.end_at for lane in incremental] == [lane.end_at for lane in plain]
