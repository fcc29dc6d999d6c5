"""The default qlm policy's decisions on seeded workloads with several tenants (fair share
binding) equal the decisions recorded in ``tests/data/qlm_decisions_golden.json``.

The record was made by the code before the decision path was made incremental (fair
share's counters brought up to date per changed worker, cheaper slots, ...): those changes
must not change one decision. Each decision is kept as the SHA-256 of its ``repr`` (every
placement, pull, eviction, swap, rejection and batch cap, floats at full precision), so a
test failure names the first decision that differs.

A change that is meant to change decisions regenerates the record
(``QLM_WRITE_GOLDEN=1 python -m pytest -q tests/unit/test_policy_qlm_golden.py``) and
says why in its commit.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qlm.core.perf import ProfileBook
from qlm.core.policies import PolicyContext, make_policy
from qlm.core.policies.qlm import QlmPolicy
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
from qlm.sim import simulate
from qlm.workloads import cluster_for, plan_requests, with_tenants

GOLDEN = Path(__file__).parent.parent / "data" / "qlm_decisions_golden.json"
WRITE = os.environ.get("QLM_WRITE_GOLDEN") == "1"
#: The heuristic alone (the MILP's wall-clock backstop would make a record depend on the
#: machine's load); every other option at its default.
OPTIONS: dict[str, Any] = {"milp_max_cells": 0}


def digest(decision: Decision) -> str:
    return hashlib.sha256(repr(decision).encode()).hexdigest()[:16]


def recording(policy: QlmPolicy, out: list[str]) -> QlmPolicy:
    """``policy`` with every decision's digest appended to ``out``."""
    decide = policy.decide

    def decide_and_record(snapshot: QueueSnapshot, ctx: PolicyContext) -> Decision:
        decision = decide(snapshot, ctx)
        out.append(digest(decision))
        return decision

    policy.decide = decide_and_record  # type: ignore[method-assign]
    return policy


def counters_state(policy: QlmPolicy) -> dict[str, Any]:
    state = policy.counters.to_state()  # the counters, not what a restart needs besides
    return json.loads(json.dumps({k: state[k] for k in ("counters", "last_left")}))


# ------------------------------------------------------------------ workloads
def sim_run(workload: str, rate: float, num_requests: int, num_workers: int) -> dict[str, Any]:
    """The simulator on the first ``num_workers`` workers of the workload's mini cluster,
    three tenants of unequal weight."""
    plan = with_tenants(plan_requests(workload, num_requests, np.random.default_rng(3)),
                        {"a": 1, "b": 3, "c": 8}, seed=3)
    policy = make_policy("qlm", **OPTIONS)
    assert isinstance(policy, QlmPolicy)
    digests: list[str] = []
    result = simulate(plan.jobs_at(rate), cluster_for(workload, "mini")[:num_workers],
                      ProfileBook.load(),
                      recording(policy, digests), seed=3)
    return {"decisions": digests, "counters": counters_state(policy),
            "attainment": round(result.metrics.slo_attainment, 12),
            "evictions": result.metrics.evictions}


MODELS = ("mistral-7b", "vicuna-13b")
CLASSES = (SLOClass.INTERACTIVE, SLOClass.BATCH_1, SLOClass.BATCH_2)
TENANTS = ("t0", "t1", "t2", "t3")


def snapshots(steps: int, seed: int) -> Iterator[QueueSnapshot]:
    """A queue that moves between decisions as in the decision-time benchmark, with four
    tenants, and workers whose running requests make progress, finish, are replaced, and
    sometimes move to another worker keeping their progress (an eviction and a resume)."""
    rng = np.random.default_rng(seed)
    profiles = ProfileBook.load()
    now = 1_000.0
    queued: list[Request] = []
    next_id = 0

    def new_request(at: float) -> Request:
        nonlocal next_id
        next_id += 1
        slo_class = CLASSES[int(rng.choice(3, p=[0.3, 0.3, 0.4]))]
        tenant = TENANTS[int(rng.choice(4, p=[0.55, 0.25, 0.15, 0.05]))]
        return Request(f"{tenant}/q{next_id}", MODELS[int(rng.integers(2))],
                       int(rng.integers(16, 2048)), int(rng.integers(16, 1024)), slo_class,
                       SLO.for_class(slo_class), at, tenant=tenant)

    for at in np.sort(rng.uniform(now - 200.0, now, 3000)):
        queued.append(new_request(float(at)))
    gpus = ("A10-24GB", "A100-80GB")
    workers: list[dict[str, Any]] = []
    for i in range(12):
        gpu, model = gpus[i % 2], MODELS[(i // 2) % 2]
        prof = profiles.get(model, gpu)
        workers.append({"id": f"w{i:02d}", "gpu": gpu, "model": model, "prof": prof,
                        "running": []})
    for w in workers:  # each starts with some of the oldest queued requests of its model
        mine = [r for r in queued if r.model == w["model"]][:int(rng.integers(4, 24))]
        for r in mine:
            queued.remove(r)
            w["running"].append(RunningRequest(r, now - 5.0, now - 4.0))
    views: dict[str, tuple[RunningRequest, ...]] = {}
    for step in range(steps):
        now += 0.5
        for w in workers:
            if rng.random() < 0.4:
                continue  # this worker's running set is unchanged (the same tuple)
            kept = []
            for rr in w["running"]:
                r = rr.request
                done = min(r.max_tokens, r.num_generated + int(rng.integers(0, 40)))
                if done >= r.max_tokens or rng.random() < 0.05:
                    continue  # finished
                kept.append(RunningRequest(
                    Request(r.id, r.model, r.prompt_tokens, r.max_tokens, r.slo_class, r.slo,
                            r.arrival_at, tenant=r.tenant, num_generated=done),
                    rr.started_at, rr.first_token_at))
            room = max(0, 24 - len(kept))
            pulled = [r for r in queued if r.model == w["model"]][:int(rng.integers(0, room + 1))]
            for r in pulled:
                queued.remove(r)
                kept.append(RunningRequest(r, now, None if r.num_generated == 0 else now))
            w["running"] = kept
            views.pop(w["id"], None)
        if step % 3 == 2:  # one request moves to another worker of its model, progress kept
            src, dst = rng.choice(len(workers), 2, replace=False)
            a, b = workers[int(src)], workers[int(dst)]
            if a["running"] and a["model"] == b["model"]:
                moved = a["running"].pop()
                b["running"].append(RunningRequest(moved.request, now, moved.first_token_at))
                views.pop(a["id"], None)
                views.pop(b["id"], None)
        if step % 4 == 1:  # one evicted back to the queue, resumed later with its progress
            w = workers[int(rng.integers(len(workers)))]
            if w["running"]:
                queued.append(w["running"].pop(0).request)
                views.pop(w["id"], None)
        queued.extend(new_request(now - float(rng.uniform(0, 0.5)))
                      for _ in range(int(rng.integers(0, 30))))
        out = []
        for w in workers:
            running = views.setdefault(w["id"], tuple(w["running"]))
            prof = w["prof"]
            out.append(WorkerView(w["id"], w["gpu"], MODELS, w["model"],
                                  prof.kv_capacity_tokens, prof.max_batch_size, running,
                                  num_gpus=prof.num_gpus))
        yield QueueSnapshot(now, group_requests(queued, 10.0), tuple(out))


def snapshot_run(steps: int, seed: int) -> dict[str, Any]:
    policy = make_policy("qlm", **OPTIONS)
    assert isinstance(policy, QlmPolicy)
    ctx = PolicyContext(ProfileBook.load())
    digests = [digest(policy.decide(snap, ctx)) for snap in snapshots(steps, seed)]
    return {"decisions": digests, "counters": counters_state(policy)}


RUNS: dict[str, Callable[[], dict[str, Any]]] = {
    # one A10 under 400 req/s: late and hopeless groups, fair order binding everywhere
    "sim_WA_rate400_1worker": lambda: sim_run("WA", 400.0, 1000, 1),
    # one A10 at 4 req/s: evictions and resumed requests (the counters' departed memo)
    "sim_WA_rate4_1worker": lambda: sim_run("WA", 4.0, 1200, 1),
    # three models on six workers: model swaps
    "sim_WB_rate20_6workers": lambda: sim_run("WB", 20.0, 400, 6),
    "snapshots_4tenants_seed5": lambda: snapshot_run(40, 5),
}


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    if WRITE:
        return {}
    data: dict[str, Any] = json.loads(GOLDEN.read_text())
    return data


@pytest.mark.parametrize("name", sorted(RUNS))
def test_decisions_equal_the_record(name: str, golden: dict[str, Any]) -> None:
    got = RUNS[name]()
    if WRITE:
        record = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        record[name] = got
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        return
    want = golden[name]
    assert len(got["decisions"]) == len(want["decisions"])
    for i, (a, b) in enumerate(zip(got["decisions"], want["decisions"], strict=True)):
        assert a == b, f"{name}: decision {i} differs from the record"
    assert got == want
