"""TPOT targets: the batch cap from a profile, placement, the cap in the simulator, the
attainment reported."""

from __future__ import annotations

import pytest

from qlm.core.perf import ProfileBook
from qlm.core.policies import PolicyContext, make_policy
from qlm.core.policies.planning import TPOT_HEADROOM
from qlm.core.types import (
    SLO,
    BatchCap,
    QueueSnapshot,
    Request,
    RunningRequest,
    SLOClass,
    WorkerView,
    group_requests,
)
from qlm.sim import SimConfig, simulate
from qlm.sim.batching import steady_step_s, tpot_batch_cap
from qlm.sim.cluster import Job, WorkerSpec
from qlm.sim.metrics import summarise

MODEL, A10, A100 = "mistral-7b", "A10-24GB", "A100-80GB"
BOOK = ProfileBook.load()


def test_cap_is_the_largest_batch_whose_steady_step_meets_the_target() -> None:
    p = BOOK.get(MODEL, A10)
    for target in (0.03, 0.04, 0.06):
        cap = tpot_batch_cap(p, target, 161, 338)
        assert 0 < cap < p.max_batch_size
        assert steady_step_s(p, cap, 161, 338) <= target < steady_step_s(p, cap + 1, 161, 338)
    assert tpot_batch_cap(p, 0.03, 161, 338) < tpot_batch_cap(p, 0.06, 161, 338)
    assert tpot_batch_cap(p, p.decode_base_s / 2, 161, 338) == 0  # not even one request
    assert tpot_batch_cap(p, 10.0, 161, 338) == p.max_batch_size
    # longer prompts cost more prefill per step: a smaller batch meets the same target
    assert tpot_batch_cap(p, 0.06, 2000, 338) < tpot_batch_cap(p, 0.06, 161, 338)


def _request(rid: str, slo_class: SLOClass, tpot_s: float | None, at: float = 0.0,
             prompt: int = 161) -> Request:
    slo = SLO.for_class(slo_class)
    return Request(rid, MODEL, prompt, 400, slo_class, SLO(slo.ttft_s, tpot_s), at)


def _worker(wid: str, gpu: str, running: tuple[RunningRequest, ...] = ()) -> WorkerView:
    p = BOOK.get(MODEL, gpu)
    return WorkerView(wid, gpu, (MODEL,), MODEL, p.kv_capacity_tokens, p.max_batch_size,
                      running)


def test_placement_refuses_a_worker_where_even_one_request_misses_the_target() -> None:
    # 25 ms: the A10's decode step alone at batch 1 is 27 ms, the A100 meets it
    target = 0.025
    assert tpot_batch_cap(BOOK.get(MODEL, A10), TPOT_HEADROOM * target, 161, 338) == 0
    assert tpot_batch_cap(BOOK.get(MODEL, A100), TPOT_HEADROOM * target, 161, 338) > 0
    busy = tuple(RunningRequest(_request(f"b{i}", SLOClass.BATCH_2, None), 0.0, 0.0)
                 for i in range(200))  # the A100 is busy: without TPOT it would go to the A10
    tight = tuple(_request(f"i{i}", SLOClass.INTERACTIVE, target, 1.0) for i in range(3))
    loose = tuple(_request(f"j{i}", SLOClass.INTERACTIVE, None, 1.0) for i in range(3))
    workers = (_worker("a10", A10), _worker("a100", A100, busy))
    policy = make_policy("qlm")
    for requests, where in ((tight, "a100"), (loose, "a10")):
        snapshot = QueueSnapshot(2.0, group_requests(requests, 1.0), workers)
        decision = policy.decide(snapshot, PolicyContext(BOOK))
        assert {p.worker_id for p in decision.placements if p.order} == {where}


def test_the_cap_goes_to_the_worker_whose_head_group_or_running_requests_have_a_target() -> None:
    target = 0.06
    p = BOOK.get(MODEL, A10)
    expected = tpot_batch_cap(p, TPOT_HEADROOM * target, 161, 338)
    assert 0 < expected < p.max_batch_size
    running = (RunningRequest(_request("r", SLOClass.INTERACTIVE, target), 0.0, 0.0),)
    snapshot = QueueSnapshot(1.0, (), (_worker("w0", A10, running), _worker("w1", A10)))
    decision = make_policy("qlm").decide(snapshot, PolicyContext(BOOK))
    assert set(decision.batch_caps) == {BatchCap("w0", expected), BatchCap("w1", None)}
    # fcfs knows nothing of TPOT: no cap
    assert make_policy("fcfs").decide(snapshot, PolicyContext(BOOK)).batch_caps == ()


def _tpot_run(policy: str, target: float) -> list[tuple[str, float | None, bool]]:
    """One A100 (batch-2 work with no target) and a stream of interactive requests with a
    TPOT target: (class, realised TPOT, target met) per finished request."""
    jobs = []
    for i in range(1000):  # 25 batch requests a second keep ~250 decoding at once
        jobs.append(Job(_request(f"b{i:04d}", SLOClass.BATCH_2, None, 0.04 * i), 390))
    for i in range(40):
        jobs.append(Job(_request(f"i{i:03d}", SLOClass.INTERACTIVE, target, 10.0 + 0.5 * i), 200))
    result = simulate(jobs, (WorkerSpec("a100", A100, MODEL, (MODEL,)),), BOOK,
                      make_policy(policy), SimConfig())
    return [(r.slo_class, r.tpot_s, r.met_tpot) for r in result.records
            if r.finished_at is not None]


def test_a_tpot_bound_request_decodes_within_its_target_where_the_cap_applies() -> None:
    target = 0.025
    capped = [(t, met) for c, t, met in _tpot_run("qlm", target) if c == "interactive"]
    uncapped = [(t, met) for c, t, met in _tpot_run("fcfs", target) if c == "interactive"]
    assert len(capped) == len(uncapped) == 40
    assert all(met for _, met in capped)
    assert max(t for t, _ in capped if t is not None) <= target
    # without the cap the batch requests' batch makes the same requests miss
    assert all(not met for _, met in uncapped)


def test_tpot_and_combined_attainment_are_reported_per_class() -> None:
    from qlm.sim.metrics import RequestRecord

    def rec(rid: str, cls: str, first: float | None, end: float | None,
            tpot: float | None) -> RequestRecord:
        return RequestRecord(rid, MODEL, cls, 0.0, 10.0, 10, 11, 0.0, first, end, "w", 0,
                             False, tpot_slo_s=tpot)

    records = [
        rec("a", "interactive", 1.0, 1.5, 0.1),   # TTFT met, TPOT 0.05: both met
        rec("b", "interactive", 1.0, 3.0, 0.1),   # TPOT 0.2: missed
        rec("c", "interactive", 12.0, 12.5, 0.1),  # TTFT missed, TPOT met
        rec("d", "interactive", None, None, 0.1),  # never served: both missed
        rec("e", "batch-2", 1.0, 50.0, None),     # no target: TTFT alone
    ]
    m = summarise(records, busy_gpu_s=1.0, num_gpus=1, swaps=0, evictions=0, decision_s=[])
    assert m.tpot_attainment == pytest.approx(2 / 4)
    assert m.tpot_attainment_by_class == {"interactive": pytest.approx(0.5)}
    assert m.combined_attainment == pytest.approx(2 / 5)
    assert m.combined_attainment_by_class["interactive"] == pytest.approx(1 / 4)
    assert m.combined_attainment_by_class["batch-2"] == 1.0
    assert m.slo_attainment == pytest.approx(3 / 5)


@pytest.mark.parametrize("policy", ["shepherd", "edf", "fcfs"])
def test_baselines_ignore_tpot_targets(policy: str) -> None:
    busy = tuple(RunningRequest(_request(f"b{i}", SLOClass.BATCH_2, None), 0.0, 0.0)
                 for i in range(200))
    workers = (_worker("a10", A10), _worker("a100", A100, busy))

    def decide(tpot: float | None) -> object:
        requests = tuple(_request(f"i{i}", SLOClass.INTERACTIVE, tpot, 1.0) for i in range(3))
        snapshot = QueueSnapshot(2.0, group_requests(requests, 1.0), workers)
        return make_policy(policy).decide(snapshot, PolicyContext(BOOK)).placements

    assert decide(0.025) == decide(None)
