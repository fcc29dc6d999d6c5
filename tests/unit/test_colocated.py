"""Workers that share a GPU (the workers file's ``device``): the qlm policy's co-location
caps (``colocated_loose_batch``, ``colocated_pause_share``), in a decision and in the
simulator, and the roster."""

from __future__ import annotations

from dataclasses import replace

import pytest

from qlm.core.errors import InvalidInput
from qlm.core.perf import ProfileBook
from qlm.core.policies import PolicyContext, make_policy
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
from qlm.roster import view_of, workers_from
from qlm.sim import SimConfig, simulate
from qlm.sim.cluster import Job, WorkerSpec

BIG, SMALL, GPU = "mistral-7b", "qwen2.5-1.5b", "H100-80GB"
BOOK = ProfileBook.load()


def _request(rid: str, model: str, slo_class: SLOClass, at: float = 0.0) -> Request:
    return Request(rid, model, 200, 300, slo_class, SLO.for_class(slo_class), at)


def _worker(wid: str, model: str, running: tuple[RunningRequest, ...] = (),
            device: str | None = "card0", kv_tokens: int | None = None) -> WorkerView:
    p = BOOK.get(model, GPU)
    return WorkerView(wid, GPU, (model,), model, kv_tokens or p.kv_capacity_tokens,
                      p.max_batch_size, running, device=device)


def _running(rid: str, model: str, slo_class: SLOClass) -> RunningRequest:
    return RunningRequest(_request(rid, model, slo_class), 0.0, 0.1)


def _caps(workers: tuple[WorkerView, ...], queued: tuple[Request, ...], now: float = 1.0,
          **options: object) -> dict[str, int | None]:
    snapshot = QueueSnapshot(now, group_requests(queued, 1.0), workers)
    decision = make_policy("qlm", **options).decide(snapshot, PolicyContext(BOOK))
    return {c.worker_id: c.max_batch_size for c in decision.batch_caps}


def _thin(loose_batch: int) -> dict[str, float]:
    """The thinning cap alone (the pause off)."""
    return {"colocated_loose_batch": loose_batch, "colocated_pause_share": 0}


#: The big model's worker serves interactive work, its KV pool full (one request reserving
#: 200 + 300 tokens of a 500-token pool); the small one's has a batch job queued and two
#: interactive requests of its own queued too.
CHAT = (_running("i0", BIG, SLOClass.INTERACTIVE),)
FULL = 500
QUEUED = (*(_request(f"b{k}", SMALL, SLOClass.BATCH_2, 0.5) for k in range(300)),
          *(_request(f"j{k}", SMALL, SLOClass.INTERACTIVE, 0.9) for k in range(2)))
LIMIT = BOOK.get(SMALL, GPU).max_batch_size


def test_beside_a_full_interactive_worker_one_admits_its_own_interactive_work_and_a_few_more(
        ) -> None:
    workers = (_worker("big", BIG, CHAT, kv_tokens=FULL), _worker("small", SMALL))
    batch_only = QUEUED[:300]
    assert _caps(workers, batch_only, **_thin(16)) == {"big": None, "small": 16}
    # its own interactive requests, queued and running, come on top
    assert _caps(workers, QUEUED, **_thin(16))["small"] == 2 + 16
    mine = tuple(_running(f"s{k}", SMALL, SLOClass.INTERACTIVE) for k in range(5))
    workers = (_worker("big", BIG, CHAT, kv_tokens=FULL), _worker("small", SMALL, mine))
    caps = _caps(workers, QUEUED, **_thin(16))
    assert caps["small"] == 5 + 2 + 16
    # the big one is beside interactive work too, but that worker's pool is almost empty:
    # it may fill its batch (no cap)
    assert caps["big"] is None


def test_the_cap_opens_as_the_interactive_workers_pool_empties() -> None:
    for reserved_share in (1.0, 0.5, 0.25):
        workers = (_worker("big", BIG, CHAT, kv_tokens=round(FULL / reserved_share)),
                   _worker("small", SMALL))
        cap = _caps(workers, QUEUED[:300], **_thin(8))["small"]
        assert cap == 8 + int((1 - reserved_share) ** 2 * (LIMIT - 8))


def test_the_pause_admits_only_own_interactive_work_while_the_neighbour_is_that_full() -> None:
    for reserved_share, expected in ((1.0, 2), (0.5, 2), (0.49, None), (0.25, None)):
        workers = (_worker("big", BIG, CHAT, kv_tokens=round(FULL / reserved_share)),
                   _worker("small", SMALL))
        # the two interactive requests queued on the small model, nothing of the batch job
        assert _caps(workers, QUEUED, colocated_pause_share=0.5)["small"] == expected
    # below the share, the thin cap applies where it is set
    workers = (_worker("big", BIG, CHAT, kv_tokens=FULL * 4), _worker("small", SMALL))
    both = {"colocated_pause_share": 0.5, "colocated_loose_batch": 8}
    assert _caps(workers, QUEUED, **both)["small"] == 2 + 8 + int(0.75 ** 2 * (LIMIT - 8))
    # its own running interactive requests are never held back
    mine = tuple(_running(f"s{k}", SMALL, SLOClass.INTERACTIVE) for k in range(5))
    workers = (_worker("big", BIG, CHAT, kv_tokens=FULL), _worker("small", SMALL, mine))
    assert _caps(workers, QUEUED, colocated_pause_share=0.5)["small"] == 5 + 2


def test_the_pause_lifts_for_loose_work_short_of_slack_and_beside_batch_only_work() -> None:
    workers = (_worker("big", BIG, CHAT, kv_tokens=FULL), _worker("small", SMALL))
    ttft = SLO.for_class(SLOClass.BATCH_2).ttft_s
    assert _caps(workers, QUEUED, now=0.5 + ttft * 0.6, colocated_pause_share=0.5)["small"] is None
    batch_only = (_running("b-big", BIG, SLOClass.BATCH_1),)
    workers = (_worker("big", BIG, batch_only, kv_tokens=FULL), _worker("small", SMALL))
    assert _caps(workers, QUEUED, colocated_pause_share=0.5)["small"] is None


@pytest.mark.parametrize("devices", [(None, None), ("card0", "card1"), ("card0", None)])
def test_workers_on_cards_of_their_own_get_no_cap(devices: tuple[str | None, str | None]
                                                  ) -> None:
    workers = (_worker("big", BIG, CHAT, devices[0], kv_tokens=FULL),
               _worker("small", SMALL, (), devices[1]))
    assert _caps(workers, QUEUED, colocated_loose_batch=8) == {"big": None, "small": None}


def test_no_cap_by_default_or_without_interactive_work_beside() -> None:
    workers = (_worker("big", BIG, CHAT, kv_tokens=FULL), _worker("small", SMALL))
    assert _caps(workers, QUEUED) == {"big": None, "small": None}  # off by default
    assert _caps(workers, QUEUED, colocated_pause_share=0.3) == {"big": None, "small": 2}
    batch_only = (_running("b-big", BIG, SLOClass.BATCH_1),)
    workers = (_worker("big", BIG, batch_only, kv_tokens=FULL), _worker("small", SMALL))
    assert _caps(workers, QUEUED, colocated_loose_batch=8)["small"] is None


def test_loose_work_short_of_slack_lifts_the_cap() -> None:
    workers = (_worker("big", BIG, CHAT, kv_tokens=FULL), _worker("small", SMALL))
    ttft = SLO.for_class(SLOClass.BATCH_2).ttft_s
    # 0.4 of its SLO left before the batch job's earliest deadline (< 0.5): no cap
    assert _caps(workers, QUEUED, now=0.5 + ttft * 0.6, colocated_loose_batch=8)["small"] is None
    assert _caps(workers, QUEUED, now=0.5 + ttft * 0.4, **_thin(8))["small"] == 2 + 8


def test_in_the_simulator_the_batch_job_beside_a_full_interactive_worker_is_held_back(
        ) -> None:
    """A batch job on the small model's worker and a stream of interactive requests that
    fills the big one's (small) KV pool, one card: while the stream lasts, far fewer batch
    requests run at once than without the cap, and all are served."""
    jobs = [Job(_request(f"b{k:03d}", SMALL, SLOClass.BATCH_2, 0.5), 300) for k in range(600)]
    jobs += [Job(_request(f"i{k:03d}", BIG, SLOClass.INTERACTIVE, 0.25 * k), 200)
             for k in range(80)]
    book = ProfileBook.of([replace(BOOK.get(BIG, GPU), kv_capacity_tokens=4000),
                           BOOK.get(SMALL, GPU)])
    workers = (WorkerSpec("big", GPU, BIG, (BIG,), device="card0"),
               WorkerSpec("small", GPU, SMALL, (SMALL,), device="card0"))

    def most_batch_at_once(policy_options: dict[str, int], until: float) -> int:
        result = simulate(jobs, workers, book, make_policy("qlm", **policy_options),
                          SimConfig(tick_s=0.25), seed=0)
        spans = [(r.started_at, r.finished_at) for r in result.records
                 if r.slo_class == "batch-2"]
        assert all(s is not None and f is not None for s, f in spans)  # all served
        # sampled once the stream has filled the pool; a finish is recorded after the
        # engine's output latency (ms): a request finishing within 50 ms had its slot freed
        times = [3.0 + 0.25 * k for k in range(int((until - 3.0) / 0.25))]
        return max(sum(1 for s, f in spans if s is not None and f is not None
                       and s <= t < f - 0.05) for t in times)

    off = most_batch_at_once({"colocated_pause_share": 0}, 6.0)
    held = most_batch_at_once({"colocated_loose_batch": 8, "colocated_pause_share": 0}, 6.0)
    assert held <= 100  # 8, opened by what is free
    assert off > 2 * held
    assert most_batch_at_once({"colocated_pause_share": 0.3}, 6.0) < held  # paused
    assert most_batch_at_once({}, 6.0) == off  # off by default


def test_the_workers_file_names_a_device_and_the_view_carries_it() -> None:
    workers = workers_from({"workers": [
        {"id": "a", "gpu": GPU, "models": [BIG], "device": "host1:0"},
        {"id": "b", "gpu": GPU, "models": [SMALL]}]})
    views = [view_of(w, BOOK) for w in workers]
    assert [v.device for v in views if v is not None] == ["host1:0", None]
    with pytest.raises(InvalidInput, match=r"workers\[0\]\.device"):
        workers_from({"workers": [{"id": "a", "gpu": GPU, "models": [BIG], "device": 3}]})
    assert BatchCap("a", None).max_batch_size is None


def test_in_the_simulator_engines_of_one_card_slow_each_other_by_the_setting() -> None:
    """One request on the big model's worker finishes later while a batch job runs on the
    small model's worker of the same card, by the configured slowdown; not on cards of
    their own, nor without the setting."""
    alone = [Job(_request("i0", BIG, SLOClass.INTERACTIVE, 0.0), 200)]
    busy = alone + [Job(_request(f"b{k:03d}", SMALL, SLOClass.BATCH_2, 0.0), 300)
                    for k in range(128)]

    def decode_s(jobs: list[Job], kappa: float, devices: tuple[str | None, str | None]
                 ) -> float:
        workers = (WorkerSpec("big", GPU, BIG, (BIG,), device=devices[0]),
                   WorkerSpec("small", GPU, SMALL, (SMALL,), device=devices[1]))
        result = simulate(jobs, workers, BOOK, make_policy("fcfs"),
                          SimConfig(tick_s=0.25, colocation_slowdown=kappa), seed=0)
        (r,) = (r for r in result.records if r.id == "i0")
        assert r.finished_at is not None and r.first_token_at is not None
        return r.finished_at - r.first_token_at

    card = ("card0", "card0")
    base = decode_s(alone, 1.0, card)
    assert decode_s(busy, 0.0, card) == pytest.approx(base)
    assert decode_s(busy, 1.0, ("card0", "card1")) == pytest.approx(base)
    # 128 of the small model's 256 slots busy: a share of 0.5, so about 1.5 x (the batch
    # job's first steps are prompt chunks, then decode at 128)
    slowed = decode_s(busy, 1.0, card)
    assert 1.3 * base < slowed < 1.6 * base
    with pytest.raises(InvalidInput, match="colocation_slowdown"):
        SimConfig(colocation_slowdown=-1.0)
