"""The policy contract (docstring of qlm/core/policies/base.py), over every registered policy."""

from __future__ import annotations

import random

import pytest

from qlm.core.errors import InvalidInput
from qlm.core.perf import PerfProfile, ProfileBook
from qlm.core.policies import PolicyContext, make_policy, policy_names
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

BASELINES = ("fcfs", "edf", "priority")
#: The deployments people run (qlm/core/policies/static.py, vllm_swap.py).
DEPLOYED = ("static", "vllm-swap")
MODELS = ("small", "mid", "big")
GPUS = ("gA", "gB")


def profile(model: str, gpu: str) -> PerfProfile:
    num_gpus = 2 if model == "big" else 1
    return PerfProfile(
        model=model, gpu=gpu, num_gpus=num_gpus, prefill_tokens=(1, 4096),
        prefill_seconds=(0.002, 0.5 if gpu == "gA" else 1.0), decode_base_s=0.02,
        decode_per_seq_s=1e-4, decode_per_ctx_token_s=1e-7, kv_capacity_tokens=6000,
        max_batch_size=8, sleep_s=0.5, wake_s=1.0, cold_load_s=20.0,
    )


# "mid" has no profile on gB: placing or swapping it there breaks the contract.
PROFILES = ProfileBook.of(
    [profile(m, g) for m in MODELS for g in GPUS if not (m == "mid" and g == "gB")]
)


def make_request(rng: random.Random, i: int, now: float) -> Request:
    slo_class = rng.choice([SLOClass.INTERACTIVE, SLOClass.BATCH_1, SLOClass.BATCH_2])
    max_tokens = rng.choice([64, 512, 2048])
    return Request(
        id=f"q{i}", model=rng.choice(MODELS), prompt_tokens=rng.randint(10, 900),
        max_tokens=max_tokens, slo_class=slo_class, slo=SLO.for_class(slo_class),
        arrival_at=now - rng.uniform(0, 90), num_generated=rng.choice([0, 0, 0, 7]),
    )


def make_worker(rng: random.Random, i: int, now: float) -> WorkerView:
    gpu = GPUS[i % 2]
    num_gpus = 2 if i % 3 == 0 else 1
    servable = [
        m for m in MODELS if PROFILES.has(m, gpu) and PROFILES.get(m, gpu).num_gpus <= num_gpus
    ]
    active = rng.choice(servable)
    state = rng.choice(["idle", "busy", "full", "swapping"])
    running: list[RunningRequest] = []
    if state in ("busy", "full"):
        for k in range(8 if state == "full" else rng.randint(1, 4)):
            r = Request(f"run{i}-{k}", active, rng.randint(10, 300), 512, SLOClass.BATCH_2,
                        SLO.for_class(SLOClass.BATCH_2), now - 50,
                        num_generated=rng.randint(0, 100))
            running.append(RunningRequest(r, now - 10, now - 9))
    swapping = state == "swapping"
    return WorkerView(
        id=f"w{i}", gpu=gpu, models=tuple(sorted({active, *rng.sample(servable, 1)})),
        active_model=None if swapping else active, kv_capacity_tokens=6000, max_batch_size=8,
        running=tuple(running), num_gpus=num_gpus,
        swapping_until=now + 3 if swapping else None, swapping_to=active if swapping else None,
    )


def make_snapshot(seed: int) -> QueueSnapshot:
    rng = random.Random(seed)
    now = 1000.0
    requests = [make_request(rng, i, now) for i in range(rng.randint(0, 60))]
    workers = tuple(make_worker(rng, i, now) for i in range(rng.randint(1, 5)))
    return QueueSnapshot(now=now, groups=group_requests(requests, 10.0), workers=workers)


SNAPSHOTS = [make_snapshot(seed) for seed in range(12)]


@pytest.fixture(scope="module", params=policy_names())
def policy_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_baselines_are_registered() -> None:
    assert set(BASELINES) | set(DEPLOYED) <= set(policy_names())


def decide(name: str, snapshot: QueueSnapshot) -> Decision:
    return make_policy(name).decide(snapshot, PolicyContext(PROFILES))


@pytest.mark.parametrize("index", range(len(SNAPSHOTS)))
def test_contract(policy_name: str, index: int) -> None:
    snapshot = SNAPSHOTS[index]
    before = repr(snapshot)
    decision = decide(policy_name, snapshot)
    assert repr(snapshot) == before, "decide() must not change its input"

    # pure: the same inputs give the same decision (a fresh instance, too)
    assert decide(policy_name, snapshot) == decision

    workers = {w.id: w for w in snapshot.workers}
    groups = {g.key: g for g in snapshot.groups}

    # every queued group at most once, only where a profile for its model exists
    placed = [k for p in decision.placements for k in p.order]
    assert len(placed) == len(set(placed)), "a group placed twice"
    for place in decision.placements:
        assert place.worker_id in workers
        for key in place.order:
            assert key in groups, f"placed a group that is not queued: {key}"
            assert PROFILES.has(key.model, workers[place.worker_id].gpu)

    # pulls: queued requests only, each once, within free slots and KV capacity
    queued = {r.id: r for g in snapshot.groups for r in g.requests}
    pulled = [rid for p in decision.pulls for rid in p.request_ids]
    assert len(pulled) == len(set(pulled)), "a request pulled twice"
    for pull in decision.pulls:
        worker = workers[pull.worker_id]
        assert all(rid in queued for rid in pull.request_ids)
        assert worker.batch_size + len(pull.request_ids) <= worker.max_batch_size
        kv = worker.kv_used_tokens + sum(queued[rid].context_tokens for rid in pull.request_ids)
        assert kv <= worker.kv_capacity_tokens
        assert all(queued[rid].model == worker.active_model for rid in pull.request_ids)

    # evictions name requests running on that worker; swaps name servable models
    for evict in decision.evictions:
        running = {r.request.id for r in workers[evict.worker_id].running}
        assert evict.request_id in running
    for swap in decision.swaps:
        assert PROFILES.has(swap.to_model, workers[swap.worker_id].gpu)
    for reject in decision.rejections:
        assert reject.request_id in queued


@pytest.mark.parametrize("name", (*BASELINES, "static"))
def test_baselines_keep_work_on_workers_that_serve_its_model(name: str) -> None:
    for snapshot in SNAPSHOTS:
        decision = decide(name, snapshot)
        workers = {w.id: w for w in snapshot.workers}
        swapping_to = {s.worker_id: s.to_model for s in decision.swaps}
        for place in decision.placements:
            w = workers[place.worker_id]
            serving = swapping_to.get(w.id) or w.swapping_to or w.active_model
            assert all(k.model == serving for k in place.order)


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_swap_only_idle_workers(name: str) -> None:
    for snapshot in SNAPSHOTS:
        workers = {w.id: w for w in snapshot.workers}
        for swap in decide(name, snapshot).swaps:
            w = workers[swap.worker_id]
            assert not w.running and w.swapping_until is None
            assert w.active_model not in {g.model for g in snapshot.groups}


def unservable_snapshot(with_servable: bool) -> QueueSnapshot:
    """Only one-GPU gB workers: "mid" has no profile on gB and "big" needs two GPUs, so no
    worker can serve their groups (the A10 / Vicuna-13B case)."""
    now = 1000.0
    plan = [("mid", SLOClass.BATCH_1), ("big", SLOClass.INTERACTIVE), ("mid", SLOClass.BATCH_2)]
    if with_servable:
        plan += [("small", SLOClass.BATCH_2), ("small", SLOClass.INTERACTIVE)]
    requests = [Request(f"u{i}", m, 100, 256, c, SLO.for_class(c), now - 5 - i)
                for i, (m, c) in enumerate(plan)]
    busy = RunningRequest(Request("run-u", "small", 50, 512, SLOClass.BATCH_2,
                                  SLO.for_class(SLOClass.BATCH_2), now - 50), now - 10, now - 9)
    workers = (WorkerView("w0", "gB", ("small",), "small", 6000, 8, (), num_gpus=1),
               WorkerView("w1", "gB", ("small", "big"), "small", 6000, 8, (busy,),
                          num_gpus=1))
    return QueueSnapshot(now=now, groups=group_requests(requests, 10.0), workers=workers)


UNSERVABLE = [unservable_snapshot(False), unservable_snapshot(True)]


@pytest.mark.parametrize("index", range(len(UNSERVABLE)))
def test_contract_with_unservable_groups(policy_name: str, index: int) -> None:
    """A group no worker can serve never fails a decision and is never placed or pulled."""
    snapshot = UNSERVABLE[index]
    decision = decide(policy_name, snapshot)
    placed = {k.model for p in decision.placements for k in p.order}
    assert placed <= {"small"}
    queued = {r.id: r for g in snapshot.groups for r in g.requests}
    assert all(queued[rid].model == "small" for p in decision.pulls for rid in p.request_ids)
    assert all(s.to_model == "small" for s in decision.swaps)
    if index == 1:
        assert "small" in placed, "the servable groups are still planned"


@pytest.mark.parametrize("name", (*BASELINES, *DEPLOYED))
def test_an_option_a_baseline_does_not_take_is_named(name: str) -> None:
    with pytest.raises(InvalidInput) as err:
        make_policy(name, no_such_option=1)
    assert err.value.field == "policy-options"
    assert "no_such_option" in err.value.problem


def test_every_registered_policy_is_selectable_everywhere() -> None:
    """The services' settings, the estimator's queue order and the local stack name the
    same policies as the registry."""
    from typing import get_args

    from qlm.core.policies.base import order_key
    from qlm.localstack.services import POLICIES
    from services.estimator.settings import EstimatorSettings
    from services.scheduler.settings import SchedulerSettings

    names = set(policy_names())
    for settings in (SchedulerSettings, EstimatorSettings):
        assert set(get_args(settings.model_fields["policy"].annotation)) == names
    assert {name for name in names if callable(order_key(name))} == names
    assert set(POLICIES) == names
