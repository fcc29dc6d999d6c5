"""A queued group that no worker can serve (no profile for its model on any GPU there)
must not stop the qlm policy's exact planner: it is left unplaced, the others are planned."""

from __future__ import annotations

from qlm.core.perf import PerfProfile, ProfileBook
from qlm.core.policies import PolicyContext
from qlm.core.policies.qlm import QlmPolicy, milp_plan
from qlm.core.types import SLO, QueueSnapshot, Request, SLOClass, WorkerView, group_requests


def profile(model: str) -> PerfProfile:
    return PerfProfile(
        model=model, gpu="g", num_gpus=1, prefill_tokens=(1, 4096),
        prefill_seconds=(0.01, 0.4), decode_base_s=0.02, decode_per_seq_s=1e-4,
        decode_per_ctx_token_s=0.0, kv_capacity_tokens=1_000_000, max_batch_size=16,
        sleep_s=0.5, wake_s=5.0, cold_load_s=20.0,
    )


def test_milp_plans_around_a_group_no_worker_can_serve() -> None:
    book = ProfileBook.of([profile("A"), profile("B")])
    reqs = [Request(f"{m}{w}-{i}", m, 100, 100, SLOClass.CUSTOM, SLO(d - w), float(w))
            for w, (m, d) in enumerate([("A", 10.0), ("B", 12.0), ("C", 13.0), ("A", 14.0)])
            for i in range(3)]
    worker = WorkerView("w0", "g", ("A", "B"), "A", 1_000_000, 16, ())
    snap = QueueSnapshot(0.0, group_requests(reqs, 1.0), (worker,))
    ctx = PolicyContext(book, {"milp_time_limit_s": 10.0, "output_stats": {"*": (100.0, 10.0)}})
    pc, _ = QlmPolicy().plan(snap, ctx)
    exact = milp_plan(pc, 10.0)
    assert not isinstance(exact, str), exact
    placed = {pc.stats[g].model for order in exact.orders for g in order}
    assert "C" not in placed and placed == {"A", "B"}
    QlmPolicy().decide(snap, ctx)  # the whole decision goes through too


def test_reject_unservable_names_the_model() -> None:
    book = ProfileBook.of([profile("A")])
    reqs = [Request(f"{m}-{i}", m, 100, 100, SLOClass.CUSTOM, SLO(20.0), 0.0)
            for m in ("A", "C") for i in range(2)]
    worker = WorkerView("w0", "g", ("A",), "A", 1_000_000, 16, ())
    snap = QueueSnapshot(1.0, group_requests(reqs, 1.0), (worker,))
    for options in ({"milp_max_cells": 0}, {"milp_max_cells": 100}):
        kept = QlmPolicy(**options).decide(snap, PolicyContext(book))
        assert kept.rejections == ()  # default: stays queued, unplaced
        decision = QlmPolicy(reject_unservable=True, **options).decide(snap, PolicyContext(book))
        assert {(r.request_id, r.reason) for r in decision.rejections} == {
            ("C-0", "no worker can serve model C"), ("C-1", "no worker can serve model C")}
        assert {k.model for p in decision.placements for k in p.order} == {"A"}


def test_milp_alone_with_only_unservable_groups() -> None:
    book = ProfileBook.of([profile("A")])
    reqs = [Request(f"C-{i}", "C", 100, 100, SLOClass.CUSTOM, SLO(20.0), 0.0) for i in range(2)]
    worker = WorkerView("w0", "g", ("A",), "A", 1_000_000, 16, ())
    snap = QueueSnapshot(1.0, group_requests(reqs, 1.0), (worker,))
    ctx = PolicyContext(book)
    pc, _ = QlmPolicy().plan(snap, ctx)
    assert milp_plan(pc, 10.0) == "no profile"
    assert QlmPolicy(milp_max_cells=100).decide(snap, ctx).placements[0].order == ()
