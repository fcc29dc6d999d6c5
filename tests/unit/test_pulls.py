"""The backpressure pull (qlm.core.pulls.plan_pulls): slots, KV reservations, prefill cap."""

from __future__ import annotations

from qlm.core.perf import PerfProfile
from qlm.core.pulls import kv_reservation, pending_prefill_tokens, plan_pulls
from qlm.core.types import (
    SLO,
    GroupKey,
    Request,
    RequestGroup,
    RunningRequest,
    SLOClass,
    WorkerView,
)


def profile(kv_tokens: int = 1_000_000, max_batch: int = 64) -> PerfProfile:
    return PerfProfile(
        model="m", gpu="g", num_gpus=1, prefill_tokens=(1, 4096),
        prefill_seconds=(0.01, 0.4), decode_base_s=0.02, decode_per_seq_s=1e-4,
        decode_per_ctx_token_s=0.0, kv_capacity_tokens=kv_tokens, max_batch_size=max_batch,
        sleep_s=0.5, wake_s=1.0, cold_load_s=20.0,
    )


def request(rid: str, prompt: int, num_generated: int = 0) -> Request:
    return Request(rid, "m", prompt, 200, SLOClass.INTERACTIVE, SLO(2.0), 0.0,
                   num_generated=num_generated)


def worker(running: tuple[RunningRequest, ...] = (), kv_tokens: int = 1_000_000) -> WorkerView:
    return WorkerView("w", "g", ("m",), "m", kv_tokens, 64, running)


def queue(*requests: Request) -> tuple[RequestGroup, ...]:
    return (RequestGroup(GroupKey("m", SLOClass.INTERACTIVE, 0), tuple(requests)),)


def test_without_a_cap_a_burst_is_pulled_whole() -> None:
    burst = queue(*(request(f"r{i}", 4000) for i in range(10)))
    assert len(plan_pulls(worker(), burst, profile())) == 10


def test_the_cap_stops_a_burst_at_the_prompt_tokens_waiting_for_prefill() -> None:
    burst = queue(*(request(f"r{i}", 4000) for i in range(10)))
    assert plan_pulls(worker(), burst, profile(), prefill_cap_tokens=10_000) == ("r0", "r1")


def test_one_request_is_admitted_when_nothing_waits_even_over_the_cap() -> None:
    big = queue(request("big", 30_000), request("next", 10))
    assert plan_pulls(worker(), big, profile(), prefill_cap_tokens=10_000) == ("big",)


def test_requests_past_their_first_token_do_not_count_against_the_cap() -> None:
    decoding = RunningRequest(request("d", 9000, num_generated=5), 0.0, first_token_at=1.0)
    waiting = RunningRequest(request("p", 6000), 0.5, first_token_at=None)
    w = worker((decoding, waiting))
    assert pending_prefill_tokens(w) == 6000
    q = queue(request("a", 3000), request("b", 3000))
    assert plan_pulls(w, q, profile(), prefill_cap_tokens=10_000) == ("a",)


def test_the_cap_keeps_strict_order() -> None:
    """A small request behind one that does not fit under the cap waits too."""
    waiting = RunningRequest(request("p", 8000), 0.5)
    q = queue(request("large", 5000), request("small", 100))
    assert plan_pulls(worker((waiting,)), q, profile(), prefill_cap_tokens=10_000) == ()


def test_kv_headroom_still_binds_under_a_generous_cap() -> None:
    q = queue(*(request(f"r{i}", 1000) for i in range(5)))
    room = 2 * kv_reservation(q[0].requests[0]) + 1
    assert len(plan_pulls(worker(kv_tokens=room), q, profile(kv_tokens=room),
                          prefill_cap_tokens=1_000_000)) == 2


def test_kv_reservations_of_many_is_kv_reservation_of_each() -> None:
    import numpy as np

    from qlm.core.pulls import kv_reservation, kv_reservations

    rows = [(100, 50, 0), (100, 1000, 0), (7, 1000, 600), (3000, 20, 19), (1, 1, 0)]
    requests = [Request(f"r{i}", "m", p, cap, SLOClass.BATCH_1, SLO(60.0), 0.0,
                        num_generated=done) for i, (p, cap, done) in enumerate(rows)]
    fields = np.array(rows, dtype=float)
    for expected in (338, 10, 2000):
        many = kv_reservations(fields[:, 0], fields[:, 1], fields[:, 2], expected)
        assert many.tolist() == [kv_reservation(r, expected) for r in requests]
