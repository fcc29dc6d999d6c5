"""The qlm global scheduler and the SHEPHERD-style planner on small hand-made cases."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from qlm.core.perf import PerfProfile, ProfileBook
from qlm.core.policies import PolicyContext, make_policy
from qlm.core.policies.qlm import Plan, QlmPolicy, heuristic_plan, milp_plan, plan_evictions
from qlm.core.types import (
    SLO,
    Decision,
    QueueSnapshot,
    Request,
    RequestGroup,
    RunningRequest,
    SLOClass,
    WorkerView,
    group_requests,
)


def profile(model: str, gpu: str, *, decode_base_s: float = 0.02, wake_s: float = 5.0,
            max_batch: int = 16) -> PerfProfile:
    return PerfProfile(
        model=model, gpu=gpu, num_gpus=1, prefill_tokens=(1, 4096),
        prefill_seconds=(0.01, 0.4), decode_base_s=decode_base_s, decode_per_seq_s=1e-4,
        decode_per_ctx_token_s=0.0, kv_capacity_tokens=1_000_000, max_batch_size=max_batch,
        sleep_s=0.5, wake_s=wake_s, cold_load_s=20.0,
    )


def request(rid: str, model: str, arrival_at: float, ttft_s: float,
            slo_class: SLOClass = SLOClass.CUSTOM, max_tokens: int = 100,
            num_generated: int = 0) -> Request:
    return Request(rid, model, 100, max_tokens, slo_class, SLO(ttft_s), arrival_at,
                   num_generated=num_generated)


def worker(wid: str, models: tuple[str, ...], active: str | None, *, gpu: str = "g",
           running: tuple[RunningRequest, ...] = (), max_batch: int = 16) -> WorkerView:
    return WorkerView(wid, gpu, models, active, 1_000_000, max_batch, running)


def attainment(policy: QlmPolicy, snapshot: QueueSnapshot, ctx: PolicyContext,
               orders: list[list[int]]) -> float:
    pc = policy.planning_context(snapshot, ctx, policy.options_for(ctx))
    total = sum(g.size for g in pc.stats)
    return pc.score(orders) / total


#: Short outputs (mean 100 tokens): a drain before a swap takes ~2.4 s more.
SHORT_OUTPUTS = {"output_stats": {"*": (100.0, 10.0)}}


def interleaved_deadlines(deadlines: tuple[float, ...] = (10.0, 12.0, 14.0, 16.0)
                          ) -> tuple[QueueSnapshot, ProfileBook]:
    """Two models on one worker, deadlines alternating A, B, A, B; a swap costs ~8 s
    (5.5 s of sleep and wake, ~2.4 s for the longest request to drain).

    EDF serves A, B, A, B (three swaps) and the last B group misses; serving both A
    groups first needs one swap and meets every deadline.
    """
    book = ProfileBook.of([profile("A", "g"), profile("B", "g")])
    reqs = []
    for window, (model, deadline) in enumerate(zip("ABAB", deadlines, strict=True)):
        reqs += [request(f"{model}{window}-{i}", model, float(window), deadline - window)
                 for i in range(4)]
    snap = QueueSnapshot(0.0, group_requests(reqs, 1.0), (worker("w0", ("A", "B"), "A"),))
    return snap, book


def test_milp_groups_by_model_where_edf_misses_because_of_swaps() -> None:
    snap, book = interleaved_deadlines()
    ctx = PolicyContext(book, {"milp_time_limit_s": 10.0, **SHORT_OUTPUTS})
    policy = QlmPolicy()
    pc = policy.planning_context(snap, ctx, policy.options_for(ctx))
    plan = milp_plan(pc, 10.0, 100)
    assert isinstance(plan, Plan) and plan.mode == "milp"
    models = [pc.stats[g].model for g in plan.orders[0]]
    assert models == ["A", "A", "B", "B"]  # one swap, not three
    edf = sorted(range(4), key=lambda g: pc.stats[g].earliest_deadline_at)
    assert [pc.stats[g].model for g in edf] == ["A", "B", "A", "B"]
    assert attainment(policy, snap, ctx, [list(plan.orders[0])]) > 0.99
    assert attainment(policy, snap, ctx, [edf]) < 0.8
    # the heuristic gets there too: the last A group, lost in deadline order, is settled
    # work that its step 6 puts with the first one
    heuristic = heuristic_plan(pc, policy.options_for(ctx))
    assert [pc.stats[g].model for g in heuristic.orders[0]] == ["A", "A", "B", "B"]


def test_decision_places_every_group_once_and_pulls_only_the_head_model() -> None:
    snap, book = interleaved_deadlines()
    decision = make_policy("qlm").decide(snap, PolicyContext(book, SHORT_OUTPUTS))
    order = decision.order_for("w0")
    assert sorted(order) == sorted(g.key for g in snap.groups)
    pulled = [rid for p in decision.pulls for rid in p.request_ids]
    assert pulled and all(rid.startswith("A") for rid in pulled)


def random_instance(seed: int) -> tuple[QueueSnapshot, ProfileBook]:
    rng = random.Random(seed)
    book = ProfileBook.of([profile(m, g, decode_base_s=rng.uniform(0.02, 0.06))
                           for m in ("A", "B") for g in ("fast", "slow")])
    reqs = []
    for window in range(rng.randint(3, 5)):
        model = rng.choice("AB")
        ttft = rng.uniform(3.0, 25.0)
        reqs += [request(f"r{window}-{i}", model, float(window), ttft)
                 for i in range(rng.randint(2, 12))]
    workers = (worker("w0", ("A", "B"), "A", gpu="fast"),
               worker("w1", ("A", "B"), "B", gpu="slow"))
    return QueueSnapshot(5.0, group_requests(reqs, 1.0), workers), book


@pytest.mark.parametrize("seed", range(5))
def test_heuristic_is_close_to_the_milp_on_small_instances(seed: int) -> None:
    snap, book = random_instance(seed)
    ctx = PolicyContext(book, {"milp_time_limit_s": 10.0})
    policy = QlmPolicy()
    pc, best = policy.plan(snap, ctx)
    from qlm.core.policies.qlm import heuristic_plan, milp_plan

    exact = milp_plan(pc, 10.0)
    assert not isinstance(exact, str)
    heuristic = heuristic_plan(pc, QlmPolicy().options_for(ctx))
    total = sum(g.size for g in pc.stats)
    assert heuristic.value / total >= exact.value / total - 0.1
    assert best.value >= max(exact.value, heuristic.value) - 1e-3
    placed = sorted(g for order in best.orders for g in order)
    assert placed == list(range(len(pc.stats)))


def test_milp_with_no_time_falls_back_to_the_heuristic() -> None:
    # deadlines so tight that the heuristic falls short of the bound: the MILP is tried
    snap, book = interleaved_deadlines((8.0, 9.0, 10.0, 11.0))
    ctx = PolicyContext(book, {"milp_time_limit_s": 0.0, **SHORT_OUTPUTS})
    pc, plan = QlmPolicy().plan(snap, ctx)
    assert plan.mode.startswith("heuristic (milp:")
    assert sorted(plan.orders[0]) == list(range(len(pc.stats)))
    decision = QlmPolicy().decide(snap, ctx)
    assert len(decision.order_for("w0")) == len(snap.groups)


def test_group_goes_only_where_its_model_has_a_profile() -> None:
    book = ProfileBook.of([profile("A", "big"), profile("B", "big"), profile("B", "small")])
    reqs = [request(f"a{i}", "A", 0.0, 30.0) for i in range(3)]
    reqs += [request(f"b{i}", "B", 0.0, 30.0) for i in range(3)]
    workers = (worker("s0", ("B",), "B", gpu="small"), worker("s1", ("B",), "B", gpu="small"),
               worker("b0", ("A", "B"), "B", gpu="big"))
    snap = QueueSnapshot(0.0, group_requests(reqs, 1.0), workers)
    decision = make_policy("qlm").decide(snap, PolicyContext(book))
    for place in decision.placements:
        if place.worker_id != "b0":
            assert all(key.model == "B" for key in place.order)
    assert any(key.model == "A" for key in decision.order_for("b0"))


def busy_worker(interactive_running: bool = True) -> WorkerView:
    """A full worker (4 slots) of long batch requests, one interactive among them."""
    running = [
        RunningRequest(request(f"batch{i}", "A", -100.0, 3600.0, SLOClass.BATCH_2,
                               max_tokens=2000, num_generated=10 + i),
                       started_at=-50.0, first_token_at=-49.0)
        for i in range(3)
    ]
    if interactive_running:
        running.append(RunningRequest(request("inter-run", "A", -1.0, 20.0,
                                              SLOClass.INTERACTIVE, max_tokens=2000),
                                      started_at=-0.5, first_token_at=-0.4))
    else:
        running.append(RunningRequest(request("batch3", "A", -100.0, 3600.0, SLOClass.BATCH_2,
                                              max_tokens=2000), started_at=-50.0))
    return worker("w0", ("A",), "A", running=tuple(running), max_batch=4)


def slow_book() -> ProfileBook:
    # 4 slots at ~40 tokens/s in all: a running request's ~330 tokens take ~30 s.
    return ProfileBook.of([profile("A", "g", decode_base_s=0.1, max_batch=4)])


def interactive_group(ttft_s: float, n: int = 2) -> tuple[RequestGroup, ...]:
    reqs = [request(f"i{k}", "A", 0.0, ttft_s, SLOClass.INTERACTIVE) for k in range(n)]
    return group_requests(reqs, 1.0)


def test_evicts_batch_work_when_an_interactive_group_would_miss() -> None:
    snap = QueueSnapshot(0.0, interactive_group(20.0), (busy_worker(),))
    decision = make_policy("qlm").decide(snap, PolicyContext(slow_book()))
    evicted = [e.request_id for e in decision.evictions]
    assert len(evicted) == 2  # exactly the two slots the group needs
    assert all(rid.startswith("batch") for rid in evicted)
    # least progress among equal slack goes first: all have passed their first token
    assert evicted == ["batch0", "batch1"]
    assert all(e.worker_id == "w0" and not e.state_swap for e in decision.evictions)


def test_evicts_for_the_groups_behind_the_head_of_a_burst() -> None:
    """A burst of two interactive groups on a full worker: the slot that the finishing
    interactive request frees covers one group, not both. Evictions sized by the head
    group alone (``evict_lookahead_groups=1``) wait until the other one is the head, by
    when its slack is spent; with the lookahead (the default) they provide for both now."""
    running = list(busy_worker(interactive_running=False).running[:3])
    running.append(RunningRequest(request("inter-run", "A", -1.0, 20.0, SLOClass.INTERACTIVE,
                                          max_tokens=12, num_generated=10),
                                  started_at=-0.5, first_token_at=-0.4))
    full = worker("w0", ("A",), "A", running=tuple(running), max_batch=4)
    reqs = [request("i0", "A", 0.0, 20.0, SLOClass.INTERACTIVE)]
    reqs += [request(f"j{k}", "A", 1.5, 20.0, SLOClass.INTERACTIVE) for k in range(2)]
    snap = QueueSnapshot(0.0, group_requests(reqs, 1.0), (full,))
    lookahead = QlmPolicy(evict_lookahead_groups=8)
    decision = lookahead.decide(snap, PolicyContext(slow_book()))
    assert [e.request_id for e in decision.evictions] == ["batch0", "batch1"]
    assert {e.reason for e in decision.evictions} <= {f"slo:{g.key}" for g in snap.groups}
    head_only = QueueSnapshot(0.0, group_requests(reqs[:1], 1.0), (full,))
    assert lookahead.decide(head_only, PolicyContext(slow_book())).evictions == ()
    # the default looks ahead; head-only provides for the first group alone
    assert make_policy("qlm").decide(snap, PolicyContext(slow_book())).evictions == \
        decision.evictions
    head_group = QlmPolicy(evict_lookahead_groups=1)
    assert len(head_group.decide(snap, PolicyContext(slow_book())).evictions) == 1


def test_a_request_resumed_after_an_eviction_is_not_evicted_again() -> None:
    """Anti-churn: batch0 and batch1 were evicted once already (their first token came
    before their current start); the group's two slots come from the others, and when
    only resumed requests are left to take, none is taken."""
    running = [RunningRequest(request(f"batch{i}", "A", -100.0, 3600.0, SLOClass.BATCH_2,
                                      max_tokens=2000, num_generated=10 + i),
                              started_at=-5.0 if i < 2 else -50.0, first_token_at=-49.0)
               for i in range(4)]
    full = worker("w0", ("A",), "A", running=tuple(running), max_batch=4)
    snap = QueueSnapshot(0.0, interactive_group(20.0), (full,))
    decision = make_policy("qlm").decide(snap, PolicyContext(slow_book()))
    assert [e.request_id for e in decision.evictions] == ["batch2", "batch3"]
    all_resumed = worker("w0", ("A",), "A", max_batch=4, running=tuple(
        RunningRequest(rr.request, -5.0, rr.first_token_at) for rr in running))
    snap = QueueSnapshot(0.0, interactive_group(20.0), (all_resumed,))
    assert make_policy("qlm").decide(snap, PolicyContext(slow_book())).evictions == ()


def test_one_decision_evicts_at_most_its_budget() -> None:
    """``evict_budget`` caps the evictions of one decision over all workers (the rest wait
    for the next decision): no cluster-wide thrash, and no decision slowed by thousands."""
    snap = QueueSnapshot(0.0, interactive_group(20.0), (busy_worker(),))
    full = make_policy("qlm").decide(snap, PolicyContext(slow_book())).evictions
    assert len(full) == 2
    capped = QlmPolicy(evict_budget=1).decide(snap, PolicyContext(slow_book())).evictions
    assert capped == full[:1]
    assert QlmPolicy(evict_budget=0).decide(snap, PolicyContext(slow_book())).evictions == ()


def test_the_eviction_lookahead_stops_at_a_group_it_cannot_bring_in_on_time() -> None:
    """Behind a head group, evictions provide only for groups that the evicted slots can
    still serve on time: a 3-request group behind a 2-request head needs more than the
    4-slot batch together with it, and a group whose prompts cannot be prefilled before
    its deadline is not provided for either (the overload case: it misses anyway)."""
    full = busy_worker(interactive_running=False)
    head = [request(f"i{k}", "A", 0.0, 20.0, SLOClass.INTERACTIVE) for k in range(2)]
    policy = QlmPolicy()
    ctx = PolicyContext(slow_book())

    def evictions(reqs: list[Request]) -> list[str]:
        """Evictions for the lane: the head group, then the other (in deadline order)."""
        snap = QueueSnapshot(0.0, group_requests(reqs, 1.0), (full,))
        pc = policy.planning_context(snap, ctx, policy.options)
        order = tuple(sorted(range(len(pc.stats)), key=lambda g: pc.stats[g].key.window))
        plan = Plan((order,), 0.0, "given")
        return [e.request_id for e in plan_evictions(pc, plan, policy.options)]

    assert evictions(head) == ["batch0", "batch1"]
    fits = head + [request(f"j{k}", "A", 1.5, 20.0, SLOClass.INTERACTIVE) for k in range(2)]
    assert len(evictions(fits)) == 4  # both groups fit the batch: provided for together
    too_many = head + [request(f"j{k}", "A", 1.5, 20.0, SLOClass.INTERACTIVE) for k in range(3)]
    assert evictions(too_many) == ["batch0", "batch1"]
    # 2 × 40k-token prompts take ~7.7 s to prefill: due at 7.5 s, they cannot be met
    unreachable = head + [Request(f"j{k}", "A", 40_000, 100, SLOClass.INTERACTIVE, SLO(6.5), 1.0)
                          for k in range(2)]
    assert evictions(unreachable) == ["batch0", "batch1"]


def test_evictions_count_the_decode_time_that_prompts_ahead_take() -> None:
    """Two 40k-token prompts take ~7.8 s to prefill, nearly all of their 8 s SLO: the
    running interactive request two tokens from its end frees no slot in time, because
    vLLM mixes those prompt chunks into its decode steps. With ``evict_prefill_aware``
    (the default) both slots come from batch work."""
    running = list(busy_worker(interactive_running=False).running[:3])
    running.append(RunningRequest(request("inter-run", "A", -1.0, 20.0, SLOClass.INTERACTIVE,
                                          max_tokens=12, num_generated=10),
                                  started_at=-0.5, first_token_at=-0.4))
    full = worker("w0", ("A",), "A", running=tuple(running), max_batch=4)
    long_prompts = [Request(f"i{k}", "A", 40_000, 100, SLOClass.INTERACTIVE, SLO(8.0), 0.0)
                    for k in range(2)]
    snap = QueueSnapshot(0.0, group_requests(long_prompts, 1.0), (full,))
    aware = make_policy("qlm").decide(snap, PolicyContext(slow_book()))  # the default
    assert [e.request_id for e in aware.evictions] == ["batch0", "batch1"]
    plain = QlmPolicy(evict_prefill_aware=False, evict_rate_credit=1.0).decide(
        snap, PolicyContext(slow_book()))
    assert [e.request_id for e in plain.evictions] == ["batch0"]


def test_the_head_group_is_provided_for_only_as_far_as_its_prompts_can_be_prefilled() -> None:
    """A 40k-token prompt takes ~3.9 s to prefill: of two due at 6 s only the first can be
    ready in time, so one slot is freed for the group, not two; due at 3 s neither can,
    and nothing is evicted (each eviction would pay a re-prefill for a miss)."""
    full = busy_worker(interactive_running=False)

    def evictions(ttft_s: float) -> list[str]:
        reqs = [Request(f"i{k}", "A", 40_000, 100, SLOClass.INTERACTIVE, SLO(ttft_s), 0.0)
                for k in range(2)]
        snap = QueueSnapshot(0.0, group_requests(reqs, 1.0), (full,))
        decision = make_policy("qlm").decide(snap, PolicyContext(slow_book()))
        return [e.request_id for e in decision.evictions]

    assert evictions(8.0) == ["batch0", "batch1"]
    assert evictions(6.0) == ["batch0"]
    assert evictions(3.0) == []


def test_a_late_group_goes_ahead_of_groups_with_slack_not_of_tight_ones() -> None:
    """A group whose deadlines have all passed counts 0 wherever it goes; placed last it
    would wait for the whole batch backlog. It goes ahead of the batch job, which can
    absorb the delay, and behind (or, given slack, ahead of) the in-time interactive
    group."""
    book = ProfileBook.of([profile("A", "g")])

    def order_with(interactive_ttft_s: float) -> list[str]:
        reqs = [request(f"late{k}", "A", -5.0, 2.0, SLOClass.INTERACTIVE) for k in range(2)]
        reqs += [request(f"i{k}", "A", 0.0, interactive_ttft_s, SLOClass.INTERACTIVE)
                 for k in range(2)]
        reqs += [request(f"b{k}", "A", -2.0, 3600.0, SLOClass.BATCH_1) for k in range(40)]
        snap = QueueSnapshot(0.0, group_requests(reqs, 1.0), (worker("w0", ("A",), "A"),))
        decision = QlmPolicy(**options).decide(snap, PolicyContext(book))
        return [f"{k.slo_class.value}@{k.window:g}" for k in decision.placements[0].order]

    options: dict[str, Any] = {}  # the default: late_insert_budget 300
    assert order_with(1.0) == ["interactive@0", "interactive@-5", "batch-1@-2"]
    assert order_with(30.0) == ["interactive@-5", "interactive@0", "batch-1@-2"]
    options = {"late_insert_budget": 0}  # no budget: last
    assert order_with(1.0) == ["interactive@0", "batch-1@-2", "interactive@-5"]


def test_no_eviction_when_nothing_is_at_risk() -> None:
    ctx = PolicyContext(slow_book())
    relaxed = QueueSnapshot(0.0, interactive_group(300.0), (busy_worker(),))
    assert make_policy("qlm").decide(relaxed, ctx).evictions == ()
    free = worker("w0", ("A",), "A", running=busy_worker().running[:2], max_batch=4)
    roomy = QueueSnapshot(0.0, interactive_group(20.0), (free,))
    assert make_policy("qlm").decide(roomy, ctx).evictions == ()
    disabled = QueueSnapshot(0.0, interactive_group(20.0), (busy_worker(),))
    assert QlmPolicy(evict=False).decide(disabled, ctx).evictions == ()


def test_eviction_can_keep_kv_state_when_copying_is_cheaper() -> None:
    base = profile("A", "g", decode_base_s=0.1, max_batch=4)
    book = ProfileBook.of([PerfProfile.from_json({**base.to_json(),
                                                  "notes": {"kv_bytes_per_token": 1000}})])
    snap = QueueSnapshot(0.0, interactive_group(20.0), (busy_worker(),))
    decision = QlmPolicy(kv_state_swap=True).decide(snap, PolicyContext(book))
    assert decision.evictions and all(e.state_swap for e in decision.evictions)


def test_swaps_a_drained_worker_to_its_head_groups_model() -> None:
    book = ProfileBook.of([profile("A", "g"), profile("B", "g")])
    snap = QueueSnapshot(0.0, group_requests([request("b0", "B", 0.0, 30.0)], 1.0),
                         (worker("w0", ("A", "B"), "A"),))
    decision = make_policy("qlm").decide(snap, PolicyContext(book))
    assert [(s.worker_id, s.to_model) for s in decision.swaps] == [("w0", "B")]
    assert decision.pulls == ()


def test_memoised_summaries_do_not_change_decisions() -> None:
    snap, book = random_instance(3)
    ctx = PolicyContext(book)
    warm = QlmPolicy()
    warm.decide(snap, ctx)
    g = snap.groups[0]
    moved = (RequestGroup(g.key, g.requests[1:]),) if g.size > 1 else ()
    later = QueueSnapshot(snap.now + 1.0, moved + snap.groups[1:], snap.workers)
    assert warm.decide(later, ctx) == QlmPolicy().decide(later, ctx)


def test_shepherd_preempts_for_a_group_that_would_miss() -> None:
    running = tuple(
        RunningRequest(request(f"run{i}", "A", -10.0, 3600.0, SLOClass.BATCH_2,
                               max_tokens=2000, num_generated=i), started_at=-5.0)
        for i in range(4))
    busy = worker("w0", ("A",), "A", running=running, max_batch=4)
    snap = QueueSnapshot(0.0, interactive_group(20.0, n=10), (busy,))
    decision = make_policy("shepherd").decide(snap, PolicyContext(slow_book()))
    assert sorted(e.request_id for e in decision.evictions) == ["run0", "run1", "run2", "run3"]


def test_shepherd_does_not_preempt_when_the_group_meets_its_deadline_anyway() -> None:
    snap = QueueSnapshot(0.0, interactive_group(300.0, n=8), (busy_worker(),))
    decision = make_policy("shepherd").decide(snap, PolicyContext(slow_book()))
    assert decision.evictions == ()


def test_shepherd_ignores_swap_costs_when_planning() -> None:
    snap, book = interleaved_deadlines()
    decision = make_policy("shepherd").decide(snap, PolicyContext(book))
    models = [key.model for key in decision.order_for("w0")]
    assert models == ["A", "B", "A", "B"]  # deadline/goodput order, swaps not priced


@pytest.mark.parametrize("seed", range(3))
def test_pulls_are_the_shared_backpressure_pulls(seed: int) -> None:
    from dataclasses import replace

    from qlm.core.pulls import with_pulls

    snap, book = random_instance(seed)
    decision = make_policy("qlm").decide(snap, PolicyContext(book))
    assert with_pulls(replace(decision, pulls=()), snap, book).pulls == decision.pulls


def test_incremental_group_summaries_equal_fresh_ones() -> None:
    from qlm.core.policies.planning import GroupStatsCache, output_stats_from, summarise_group

    stats = output_stats_from({})
    reqs = tuple(request(f"r{i}", "A", 0.01 * i, 20.0 + i % 3, max_tokens=50 + 40 * i)
                 for i in range(40))
    key = group_requests(reqs, 1.0)[0].key
    cache = GroupStatsCache()
    cache.refresh([RequestGroup(key, reqs[:30])], stats)
    for later in (reqs[5:30], reqs[7:40], reqs[7:39], (reqs[0], *reqs[8:40])):
        group = RequestGroup(key, later)
        [got] = cache.refresh([group], stats)
        want = summarise_group(group, 0, stats)
        assert got.size == want.size and got.deadline_points == want.deadline_points
        assert got.out_mean_total == pytest.approx(want.out_mean_total, rel=1e-12)
        assert got.out_var_total == pytest.approx(want.out_var_total, rel=1e-12)
        assert got.mean_prompt == pytest.approx(want.mean_prompt, rel=1e-12)


def test_spare_versatile_keeps_the_only_worker_of_a_model_for_it() -> None:
    """Model A fits both GPUs, L only "big". With time to spare, A goes to the A-only worker
    even though "big" is idle now; without the option it takes the earliest-draining one."""
    book = ProfileBook.of([profile("A", "small"), profile("A", "big"), profile("L", "big")])
    busy = tuple(RunningRequest(request(f"run{i}", "A", -5.0, 1e4), -5.0, -4.0)
                 for i in range(4))
    small = WorkerView("w-small", "small", ("A",), "A", 1_000_000, 16, busy)
    big = WorkerView("w-big", "big", ("A", "L"), "A", 1_000_000, 16, ())
    reqs = [request(f"a{i}", "A", 0.0, 3600.0) for i in range(4)]
    reqs += [request(f"l{i}", "L", 0.5, 3600.0) for i in range(4)]
    snap = QueueSnapshot(1.0, group_requests(reqs, 10.0), (small, big))
    ctx = PolicyContext(book, {"milp_max_cells": 0})

    def models_on(decision: Decision, worker_id: str) -> list[str]:
        place = next(p for p in decision.placements if p.worker_id == worker_id)
        return [k.model for k in place.order]

    spared = QlmPolicy(spare_versatile=True).decide(snap, ctx)
    assert models_on(spared, "w-small") == ["A"] and models_on(spared, "w-big") == ["L"]
    plain = QlmPolicy().decide(snap, ctx)  # off by default
    assert "A" in models_on(plain, "w-big")


def test_eviction_is_sized_by_the_kv_room_a_pull_would_find() -> None:
    """Free batch slots but no KV headroom (the reservations fill it): the interactive
    group can start only if batch work leaves, as plan_pulls would admit none of it."""
    running = tuple(
        RunningRequest(request(f"batch{i}", "A", -100.0, 3600.0, SLOClass.BATCH_2,
                               max_tokens=2000, num_generated=10 + i),
                       started_at=-50.0, first_token_at=-49.0)
        for i in range(3))
    reserved = 3 * (100 + 338)  # prompt + the expected-output reservation of each
    full_kv = WorkerView("w0", "g", ("A",), "A", reserved + 150, 16, running)
    book = ProfileBook.of([profile("A", "g", decode_base_s=0.1, max_batch=16)])
    snap = QueueSnapshot(0.0, interactive_group(20.0), (full_kv,))
    decision = make_policy("qlm").decide(snap, PolicyContext(book))
    assert [e.request_id for e in decision.evictions] == ["batch0", "batch1"]


def settled_backlog(batch2_ttft_s: float) -> tuple[QueueSnapshot, ProfileBook]:
    """One worker on model A, twelve groups alternating A, B (arrival windows 0..11) of
    batch-2 requests due ``batch2_ttft_s`` after arrival: with an hour every group is met
    with slack in any order; the planner's deadline order alone swaps eleven times."""
    book = ProfileBook.of([profile("A", "g"), profile("B", "g")])
    reqs = [request(f"{'AB'[w % 2]}{w}-{i}", "AB"[w % 2], float(w), batch2_ttft_s,
                    SLOClass.BATCH_2) for w in range(12) for i in range(3)]
    snap = QueueSnapshot(12.0, group_requests(reqs, 1.0), (worker("w0", ("A", "B"), "A"),))
    return snap, book


def model_changes(models: list[str]) -> int:
    return sum(1 for a, b in itertools.pairwise(models) if a != b)


def test_settled_work_of_one_model_is_served_in_one_run() -> None:
    snap, book = settled_backlog(3600.0)
    ctx = PolicyContext(book, {"milp_max_cells": 0, **SHORT_OUTPUTS})
    policy = QlmPolicy()
    pc, plan = policy.plan(snap, ctx)
    models = [pc.stats[gi].model for gi in plan.orders[0]]
    assert models == ["A"] * 6 + ["B"] * 6  # the active model first: one swap, not eleven
    assert model_changes(models) == 1
    # each model's groups keep their deadline order
    windows = [pc.stats[gi].key.window for gi in plan.orders[0]]
    assert windows == [0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11]
    assert attainment(policy, snap, ctx, [list(plan.orders[0])]) == pytest.approx(1.0)


def test_a_swap_that_serves_a_deadline_is_kept() -> None:
    # on A, with A's work due in an hour and one B group due 7 s from now: putting A's
    # work together first (no swap now) would make the B group miss, so B goes first
    book = ProfileBook.of([profile("A", "g"), profile("B", "g")])
    reqs = [request(f"A{w}-{i}", "A", float(w), 3600.0, SLOClass.BATCH_2)
            for w in (0, 2, 3) for i in range(3)]
    reqs += [request(f"B1-{i}", "B", 1.0, 10.0, SLOClass.BATCH_1) for i in range(3)]
    snap = QueueSnapshot(4.0, group_requests(reqs, 1.0), (worker("w0", ("A", "B"), "A"),))
    ctx = PolicyContext(book, {"milp_max_cells": 0, **SHORT_OUTPUTS})
    policy = QlmPolicy()
    pc, plan = policy.plan(snap, ctx)
    assert pc.stats[plan.orders[0][0]].model == "B"
    assert attainment(policy, snap, ctx, [list(plan.orders[0])]) == pytest.approx(1.0)


def test_the_model_fewest_workers_serve_goes_first_in_a_settled_stretch() -> None:
    # w0 serves A and B, w1 only A (and is busy): on w0, B's settled work, which only w0
    # can do, goes before A's, which w1 can take over at a later decision
    book = ProfileBook.of([profile("A", "g"), profile("B", "g"), profile("A", "h")])
    reqs = [request(f"{'BA'[w % 2]}{w}-{i}", "BA"[w % 2], float(w), 3600.0,
                    SLOClass.BATCH_2) for w in range(8) for i in range(3)]
    busy = tuple(RunningRequest(request(f"r{i}", "A", 0.0, 3600.0, SLOClass.BATCH_2,
                                        max_tokens=2000), 0) for i in range(16))
    snap = QueueSnapshot(8.0, group_requests(reqs, 1.0), (
        worker("w0", ("A", "B"), "A"),
        worker("w1", ("A",), "A", gpu="h", running=busy)))
    ctx = PolicyContext(book, {"milp_max_cells": 0, **SHORT_OUTPUTS})
    pc, plan = QlmPolicy().plan(snap, ctx)
    models = [pc.stats[gi].model for gi in plan.orders[0]]
    assert models[0] == "B"
    assert model_changes(models) <= 1
