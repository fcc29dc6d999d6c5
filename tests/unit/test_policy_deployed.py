"""The deployments people run: ``static`` (a fixed split of the workers over the models)
and ``vllm-swap`` (FCFS across models, swapping on demand). Pure policy logic: snapshots
built by hand, decisions checked field by field."""

from __future__ import annotations

from dataclasses import replace

import pytest

from qlm.core.errors import InvalidInput
from qlm.core.perf import PerfProfile, ProfileBook
from qlm.core.policies import PolicyContext, make_policy
from qlm.core.policies.static import apportion
from qlm.core.types import (
    SLO,
    Decision,
    QueueSnapshot,
    Request,
    RunningRequest,
    SLOClass,
    WorkerView,
    group_requests,
)

NOW = 1000.0


def profile(model: str) -> PerfProfile:
    return PerfProfile(
        model=model, gpu="g", num_gpus=1, prefill_tokens=(1, 4096), prefill_seconds=(0.002, 0.5),
        decode_base_s=0.02, decode_per_seq_s=1e-4, decode_per_ctx_token_s=1e-7,
        kv_capacity_tokens=60_000, max_batch_size=16, sleep_s=0.5, wake_s=1.0, cold_load_s=20.0,
    )


PROFILES = ProfileBook.of([profile(m) for m in ("a", "b", "c")])
CTX = PolicyContext(PROFILES)


def worker(wid: str, model: str | None, running: int = 0) -> WorkerView:
    jobs = tuple(
        RunningRequest(Request(f"run-{wid}-{k}", model or "a", 100, 512, SLOClass.BATCH_2,
                               SLO.for_class(SLOClass.BATCH_2), NOW - 50), NOW - 10, NOW - 9)
        for k in range(running)
    )
    return WorkerView(wid, "g", ("a", "b", "c"), model, 60_000, 16, jobs)


def snapshot(workers: list[WorkerView], queued: list[tuple[str, float]]) -> QueueSnapshot:
    """``queued``: (model, seconds before now) per request, one group each (10 s windows)."""
    requests = [
        Request(f"q{i}", model, 200, 256, SLOClass.BATCH_1, SLO.for_class(SLOClass.BATCH_1),
                NOW - ago)
        for i, (model, ago) in enumerate(queued)
    ]
    return QueueSnapshot(NOW, group_requests(requests, 10.0), tuple(workers))


def after(snap: QueueSnapshot, decision: Decision) -> QueueSnapshot:
    """The snapshot once the decision's swaps are done (running requests went back)."""
    to = {s.worker_id: s.to_model for s in decision.swaps}
    workers = tuple(
        replace(w, active_model=to[w.id], running=()) if w.id in to else w for w in snap.workers
    )
    return replace(snap, workers=workers)


def served(decision: Decision, snap: QueueSnapshot) -> dict[str, str | None]:
    to = {s.worker_id: s.to_model for s in decision.swaps}
    return {w.id: to.get(w.id, w.active_model) for w in snap.workers}


# ------------------------------------------------------------------ static
def test_apportion_gives_every_weighted_model_a_worker_then_largest_remainder() -> None:
    assert apportion(4, {"a": 3.0, "b": 1.0}) == {"a": 3, "b": 1}
    assert apportion(3, {"a": 100.0, "b": 1.0, "c": 1.0}) == {"a": 1, "b": 1, "c": 1}
    assert apportion(2, {"a": 1.0, "b": 2.0, "c": 3.0}) == {"c": 1, "b": 1, "a": 0}
    assert apportion(5, {"a": 1.0, "b": 0.0}) == {"a": 5}
    assert sum(apportion(7, {"a": 1.0, "b": 1.0, "c": 1.0}).values()) == 7


def test_static_with_shares_splits_once_and_never_swaps_again() -> None:
    policy = make_policy("static", shares={"a": 3, "b": 1})
    snap = snapshot([worker(f"w{i}", "b", running=1 if i < 2 else 0) for i in range(4)],
                    [("a", 30), ("b", 20)])
    decision = policy.decide(snap, CTX)
    models = served(decision, snap)
    assert sorted(models.values()) == ["a", "a", "a", "b"]
    assert models["w0"] == "b", "a busy worker keeps its model when the plan allows"
    settled = after(snap, decision)
    # later: the queue is all "b" now, and still the split does not move
    later = snapshot(list(settled.workers), [("b", 5), ("b", 3), ("b", 1)])
    assert policy.decide(later, CTX).swaps == ()
    assert policy.decide(settled, CTX).swaps == ()


def test_static_without_shares_keeps_the_deployment_whatever_the_queue() -> None:
    policy = make_policy("static")
    snap = snapshot([worker("w0", "a"), worker("w1", "b")],
                    [("a", 50), ("a", 40), ("a", 30), ("a", 20), ("b", 10)])
    decision = policy.decide(snap, CTX)
    assert decision.swaps == ()
    for place in decision.placements:
        model = snap.worker(place.worker_id).active_model
        assert all(k.model == model for k in place.order), "FCFS within each deployment"


def test_static_gives_a_model_with_no_worker_one_from_a_model_with_two() -> None:
    policy = make_policy("static")
    snap = snapshot([worker("w0", "a", running=2), worker("w1", "a"), worker("w2", "b")],
                    [("a", 30), ("c", 20), ("b", 10)])
    decision = policy.decide(snap, CTX)
    assert [(s.worker_id, s.to_model) for s in decision.swaps] == [("w1", "c")]
    assert policy.decide(after(snap, decision), CTX).swaps == ()


def test_static_never_takes_the_last_worker_of_a_model_with_work() -> None:
    policy = make_policy("static")
    snap = snapshot([worker("w0", "a", running=1), worker("w1", "b")],
                    [("a", 30), ("c", 20), ("b", 10)])
    decision = policy.decide(snap, CTX)
    assert decision.swaps == ()
    assert all(k.model != "c" for p in decision.placements for k in p.order)


@pytest.mark.parametrize(
    "shares, field",
    [
        ({}, "options.shares"),
        ([1, 2], "options.shares"),
        ({"a": -1}, "options.shares.a"),
        ({"a": "many"}, "options.shares.a"),
        ({"a": float("nan")}, "options.shares.a"),
        ({"a": 0, "b": 0}, "options.shares"),
    ],
)
def test_static_bad_shares_name_the_field(shares: object, field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        make_policy("static", shares=shares)
    assert err.value.field == field


# --------------------------------------------------------------- vllm-swap
def test_vllm_swap_idle_worker_swaps_to_the_fcfs_head_even_with_its_model_queued() -> None:
    snap = snapshot([worker("w0", "a")], [("b", 30), ("a", 20), ("a", 10)])
    decision = make_policy("vllm-swap").decide(snap, CTX)
    assert [(s.worker_id, s.to_model) for s in decision.swaps] == [("w0", "b")]
    assert decision.pulls == ()
    # fcfs serves the queued work of its model instead
    assert make_policy("fcfs").decide(snap, CTX).swaps == ()


def test_vllm_swap_busy_worker_swaps_at_once() -> None:
    snap = snapshot([worker("w0", "a", running=3)], [("b", 30), ("a", 20)])
    decision = make_policy("vllm-swap").decide(snap, CTX)
    assert [(s.worker_id, s.to_model) for s in decision.swaps] == [("w0", "b")]
    assert decision.pulls == ()


def test_vllm_swap_drain_first_lets_the_batch_finish() -> None:
    snap = snapshot([worker("w0", "a", running=3)], [("b", 30), ("a", 20)])
    decision = make_policy("vllm-swap", drain_first=True).decide(snap, CTX)
    assert decision.swaps == (), "running requests finish first"
    assert decision.pulls == (), "nothing is admitted past the head of the queue"
    order = {p.worker_id: p.order for p in decision.placements}["w0"]
    assert [k.model for k in order] == ["b", "a"]


def test_vllm_swap_sends_each_group_to_the_worker_that_starts_it_first() -> None:
    snap = snapshot([worker("w0", "a"), worker("w1", "b")], [("a", 30), ("b", 20)])
    decision = make_policy("vllm-swap").decide(snap, CTX)
    assert decision.swaps == ()
    queues = {p.worker_id: [k.model for k in p.order] for p in decision.placements}
    assert queues == {"w0": ["a"], "w1": ["b"]}
    assert {p.worker_id for p in decision.pulls} == {"w0", "w1"}


def test_vllm_swap_thrashes_where_models_interleave() -> None:
    """One worker, models alternating in arrival order: each change of model in its queue
    is a swap (serve the head group, decide again)."""
    policy = make_policy("vllm-swap")
    snap = snapshot([worker("w0", "a")], [("b", 40), ("a", 30), ("b", 20), ("a", 10)])
    swaps = []
    while snap.groups:
        decision = policy.decide(snap, CTX)
        swaps += [s.to_model for s in decision.swaps]
        snap = after(snap, decision)
        head = min(snap.groups, key=lambda g: g.first_arrival_at)
        snap = replace(snap, groups=tuple(g for g in snap.groups if g is not head))
    assert swaps == ["b", "a", "b", "a"]
