"""The discrete-event simulator: event order, determinism, and hand-computable scenarios."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import pytest

from qlm.core.perf import PerfProfile, ProfileBook
from qlm.core.policies import PolicyContext, make_policy, policy_names
from qlm.core.types import (
    SLO,
    Decision,
    Evict,
    Place,
    QueueSnapshot,
    Request,
    SLOClass,
)
from qlm.sim import Job, SimConfig, WorkerSpec, simulate
from qlm.sim.batching import PREFILL_MODES, decode_segment_s, decode_steps_within
from qlm.sim.events import Arrival, Boundary, Decide, EventQueue, Tick
from qlm.workloads import cluster_for, plan_requests

PREFILL_S_PER_TOKEN = 0.001
STEP_S = 0.02


def profile(model: str = "m1", gpu: str = "g", *, sleep_s: float = 1.5, wake_s: float = 2.5,
            cold_load_s: float = 30.0, max_batch: int = 8, per_ctx: float = 0.0,
            kv_bytes_per_token: int = 1_000_000) -> PerfProfile:
    """Prefill linear through 0 (1 ms/token), constant decode steps of 20 ms."""
    return PerfProfile(
        model=model, gpu=gpu, num_gpus=1, prefill_tokens=(1, 8192),
        prefill_seconds=(PREFILL_S_PER_TOKEN, 8192 * PREFILL_S_PER_TOKEN),
        decode_base_s=STEP_S, decode_per_seq_s=0.0, decode_per_ctx_token_s=per_ctx,
        kv_capacity_tokens=100_000, max_batch_size=max_batch, sleep_s=sleep_s, wake_s=wake_s,
        cold_load_s=cold_load_s, notes={"kv_bytes_per_token": kv_bytes_per_token},
    )


def job(rid: str, model: str = "m1", *, at: float = 0.0, prompt: int = 100, output: int = 50,
        slo_class: SLOClass = SLOClass.BATCH_1) -> Job:
    request = Request(rid, model, prompt, 1000, slo_class, SLO.for_class(slo_class), at)
    return Job(request, output)


EXACT = SimConfig(min_decision_interval_s=0.0, pcie_gb_s=1.0)


# ------------------------------------------------------------------ events
def test_events_pop_by_time_then_rank_then_push_order() -> None:
    q = EventQueue()
    q.push(1.0, Decide())
    q.push(1.0, Arrival(7))
    q.push(1.0, Boundary("w", 1))
    q.push(0.5, Tick())
    q.push(1.0, Arrival(3))
    q.push(1.0, Boundary("v", 2))
    popped = [q.pop() for _ in range(len(q))]
    assert [at for at, _ in popped] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert [e for _, e in popped][1:] == [
        Boundary("w", 1), Boundary("v", 2), Arrival(7), Arrival(3), Decide()
    ]


def test_decode_steps_within_inverts_segment_time() -> None:
    p = profile(per_ctx=1e-6)
    for steps in (1, 2, 17, 300):
        t = decode_segment_s(p, 5, 1000, steps)
        assert decode_steps_within(p, 5, 1000, t) == steps
        assert decode_steps_within(p, 5, 1000, t - 1e-9) == steps - 1


# -------------------------------------------------------------- determinism
@pytest.mark.parametrize("prefill_mode", PREFILL_MODES)
def test_same_seed_gives_identical_summary_and_records(prefill_mode: str) -> None:
    plan = plan_requests("WA", 300, np.random.default_rng(5))
    jobs = plan.jobs_at(60.0)
    profiles = ProfileBook.load()
    workers = cluster_for("WA", "mini")
    config = SimConfig(prefill_mode=prefill_mode)
    first = simulate(jobs, workers, profiles, make_policy("edf"), config, seed=5)
    second = simulate(jobs, workers, profiles, make_policy("edf"), config, seed=5)
    # (no timer: decision times are NaN, so compare the serialised summaries)
    assert json.dumps(first.metrics.to_dict()) == json.dumps(second.metrics.to_dict())
    assert first.records == second.records
    assert first.metrics.num_finished == 300


def test_same_seed_gives_identical_workload() -> None:
    a = plan_requests("WB", 200, np.random.default_rng(9)).jobs_at(3.0)
    b = plan_requests("WB", 200, np.random.default_rng(9)).jobs_at(3.0)
    c = plan_requests("WB", 200, np.random.default_rng(10)).jobs_at(3.0)
    assert a == b
    assert a != c


# ------------------------------------------------------- hand-computed runs
def test_one_request_on_idle_worker_ttft_is_its_prefill() -> None:
    j = job("a", at=2.0, prompt=300, output=11)
    result = simulate([j], [WorkerSpec("w", "g", "m1", ("m1",))], ProfileBook.of([profile()]),
                      make_policy("fcfs"), EXACT)
    rec = result.records[0]
    assert rec.first_token_at == pytest.approx(2.0 + 300 * PREFILL_S_PER_TOKEN)
    # the prefill emits token 1; ten decode steps emit the other ten
    assert rec.finished_at == pytest.approx(2.0 + 0.3 + 10 * STEP_S)
    assert rec.met_slo
    assert result.metrics.gpu_util == pytest.approx(1.0)


@pytest.mark.parametrize("resident, swap_in_s", [(True, 2.5), (False, 30.0)])
def test_model_swap_costs_sleep_plus_wake_or_cold_load(resident: bool, swap_in_s: float) -> None:
    models = ("m1", "m2") if resident else ("m1",)
    profiles = ProfileBook.of([profile("m1", sleep_s=1.5), profile("m2", wake_s=2.5)])
    result = simulate([job("b", "m2", at=1.0, prompt=200, output=1)],
                      [WorkerSpec("w", "g", "m1", models)], profiles, make_policy("fcfs"), EXACT)
    rec = result.records[0]
    assert result.metrics.swaps == 1
    assert rec.first_token_at == pytest.approx(1.0 + 1.5 + swap_in_s + 0.2)


@dataclass(frozen=True)
class EvictOnce:
    """Places every group on worker ``w``; evicts request ``a`` at the first decision in
    [5 s, 6 s) if it has been running since before 5 s."""

    state_swap: bool = False
    name: ClassVar[str] = "evict-once"

    def decide(self, snapshot: QueueSnapshot, ctx: PolicyContext) -> Decision:
        evictions = tuple(
            Evict("w", r.request.id, "test", self.state_swap)
            for w in snapshot.workers
            for r in w.running
            if r.request.id == "a" and 5.0 <= snapshot.now < 6.0 and r.started_at < 5.0
        )
        return Decision(placements=(Place("w", tuple(g.key for g in snapshot.groups)),),
                        evictions=evictions)


@pytest.mark.parametrize("prefill_mode", PREFILL_MODES)
@pytest.mark.parametrize("state_swap", [False, True])
def test_eviction_keeps_progress(state_swap: bool, prefill_mode: str) -> None:
    """Alone on the worker, a chunked step is the whole prefill (this profile's output
    latency is 0), so both engine models give the same times."""
    prompt, output = 1000, 1000
    result = simulate([job("a", prompt=prompt, output=output)],
                      [WorkerSpec("w", "g", "m1", ("m1",))], ProfileBook.of([profile()]),
                      EvictOnce(state_swap), replace(EXACT, prefill_mode=prefill_mode))
    rec = result.records[0]
    assert rec.num_evictions == 1
    first_token_at = prompt * PREFILL_S_PER_TOKEN  # 1.0 s
    assert rec.first_token_at == pytest.approx(first_token_at)
    # The tick at t=5 asks for the eviction; it happens at the next step boundary.
    steps_by_5 = int((5.0 - first_token_at) / STEP_S + 1e-9)
    evicted_at = first_token_at + (steps_by_5 + 1) * STEP_S
    generated = 1 + steps_by_5 + 1
    context = prompt + generated
    if state_swap:  # 1 MB/token over 1 GB/s, out then back in; no token from a restore
        resume_at = evicted_at + 2 * context * 1e-3
        left = output - generated
    else:  # recompute prompt + generated; that prefill emits the next token
        resume_at = evicted_at + context * PREFILL_S_PER_TOKEN
        left = output - generated - 1
    assert rec.finished_at == pytest.approx(resume_at + left * STEP_S)
    restarted_at = resume_at + first_token_at + (output - 1) * STEP_S
    assert rec.finished_at < restarted_at


def test_priority_preempts_batch_for_interactive_and_batch_resumes() -> None:
    jobs = [job("a", prompt=100, output=500, slo_class=SLOClass.BATCH_2),
            job("i", at=1.005, prompt=100, output=5, slo_class=SLOClass.INTERACTIVE)]
    result = simulate(jobs, [WorkerSpec("w", "g", "m1", ("m1",))],
                      ProfileBook.of([profile(max_batch=1)]), make_policy("priority"), EXACT)
    a, i = result.records
    assert a.num_evictions == 1 and result.metrics.evictions == 1
    # a: first token at 0.1; 45 steps done by 1.005, evicted at the next boundary (1.02)
    # holding 1 + 46 = 47 generated tokens; i: prefill 0.1 s, 4 steps.
    assert i.first_token_at == pytest.approx(1.12)
    assert i.finished_at == pytest.approx(1.20)
    # a resumes: recompute prefill of 100 + 47 tokens (emits token 48), then 452 steps
    assert a.finished_at == pytest.approx(1.20 + 0.147 + 452 * STEP_S)


def test_fcfs_serves_in_arrival_order_on_a_one_slot_worker() -> None:
    jobs = [job(f"r{k}", at=0.01 * k, output=20) for k in range(4)]
    result = simulate(jobs, [WorkerSpec("w", "g", "m1", ("m1",))],
                      ProfileBook.of([profile(max_batch=1)]), make_policy("fcfs"), EXACT)
    starts = [r.started_at for r in result.records]
    assert all(s is not None for s in starts)
    assert starts == sorted(starts)  # type: ignore[type-var]


def test_utilisation_counts_gpus_of_multi_gpu_workers() -> None:
    quad = PerfProfile(
        model="big", gpu="g", num_gpus=4, prefill_tokens=(1, 8192), prefill_seconds=(0.001, 8.192),
        decode_base_s=STEP_S, decode_per_seq_s=0.0, decode_per_ctx_token_s=0.0,
        kv_capacity_tokens=100_000, max_batch_size=8, sleep_s=1, wake_s=1, cold_load_s=10,
    )
    workers = [
        WorkerSpec("q", "g", "big", ("big",), num_gpus=4), WorkerSpec("s", "g", "m1", ("m1",))
    ]
    result = simulate([job("x", "big", output=11)], workers,
                      ProfileBook.of([quad, profile()]), make_policy("fcfs"), EXACT)
    # the quad is busy the whole makespan, the single idles: 4 of 5 GPUs busy
    assert result.metrics.gpu_util == pytest.approx(4 / 5)


def test_unservable_swap_is_counted_not_applied() -> None:
    @dataclass(frozen=True)
    class BadSwap:
        name: ClassVar[str] = "bad"

        def decide(self, snapshot: QueueSnapshot, ctx: PolicyContext) -> Decision:
            from qlm.core.types import Swap

            return Decision(swaps=(Swap("w", "nope"),))

    result = simulate([job("a", output=2)], [WorkerSpec("w", "g", "m1", ("m1",))],
                      ProfileBook.of([profile()]), BadSwap(), SimConfig(horizon_s=5.0))
    assert result.metrics.swaps == 0
    assert result.metrics.invalid_actions > 0
    assert result.metrics.slo_attainment == 0.0  # never placed, never served


def test_the_snapshot_reads_the_queue_in_the_store_order() -> None:
    """Groups by earliest deadline then key text, requests by deadline then id: the
    order of the Redis store's sorted sets (qlm.core.queue), whatever the arrival order."""
    from qlm.core.queue import group_order_key, request_order_key
    from qlm.sim import Simulation

    jobs = [job("late-batch", at=0.0, slo_class=SLOClass.BATCH_2),
            job("b", at=0.2, slo_class=SLOClass.INTERACTIVE),
            job("a", at=0.2, slo_class=SLOClass.INTERACTIVE),
            job("early", at=0.1, slo_class=SLOClass.BATCH_1)]
    sim = Simulation(jobs, [WorkerSpec("w", "g", "m1", ("m1",))], ProfileBook.of([profile()]),
                     make_policy("fcfs"), EXACT)
    for index in range(len(jobs)):
        sim.on_arrival(Arrival(index))
    groups = sim.snapshot().groups
    assert [r.id for g in groups for r in g.requests] == ["a", "b", "early", "late-batch"]
    assert list(groups) == sorted(groups, key=group_order_key)
    assert all(list(g.requests) == sorted(g.requests, key=request_order_key) for g in groups)


# ------------------------------------------------------------------ admission limits
@pytest.mark.parametrize("policy_name", policy_names())
def test_a_request_that_fits_no_worker_is_refused_at_arrival_not_missed(
        policy_name: str) -> None:
    """Prompt + max_tokens (1,000 here) beyond every worker's max_model_len or KV cache:
    refused when it arrives (qlm.core.fit, the services' check), counted apart per class,
    never queued; the others are served and the run ends with them (no ticking on to the
    horizon for a request nobody can start)."""
    short = replace(profile(), max_model_len=1500)
    small_kv = replace(profile(gpu="h"), kv_capacity_tokens=1800)
    jobs = [job("fits", prompt=400), job("fits-late", at=0.5, prompt=700),
            job("too-long", at=0.1, prompt=900),  # 1,900: beyond both workers' 1,500 / 1,800
            job("no-room", at=0.2, prompt=2000, slo_class=SLOClass.INTERACTIVE)]
    workers = [WorkerSpec("w", "g", "m1", ("m1",)), WorkerSpec("v", "h", "m1", ("m1",))]
    result = simulate(jobs, workers, ProfileBook.of([short, small_kv]),
                      make_policy(policy_name), EXACT)
    by_id = {r.id: r for r in result.records}
    assert [rid for rid, r in by_id.items() if r.refused] == ["too-long", "no-room"]
    # 1,700 tokens fits only v's 1,800-token KV cache: admitted (which worker runs it is the
    # policy's choice; no policy reads per-worker limits yet)
    assert not by_id["fits-late"].refused
    for rid in ("too-long", "no-room"):
        assert by_id[rid].started_at is None and by_id[rid].worker_id is None
        assert not by_id[rid].rejected
    m = result.metrics
    assert (m.num_refused, dict(m.num_refused_by_class)) == (2, {"interactive": 1, "batch-1": 1})
    assert m.slo_attainment == 1.0 and dict(m.slo_attainment_by_class) == {"batch-1": 1.0}
    assert m.num_finished == 2
    assert m.num_decisions < 50  # a stuck request would tick to the 6 h horizon


def test_a_long_context_wb_replay_refuses_what_fits_no_worker_and_ends() -> None:
    """The Mooncake trace (prompts up to 126k tokens) as WB: requests for vicuna and llama
    (max_model_len 4,096) beyond it, and mistral's beyond 32,768, are refused; the
    simulation ends with the last served request instead of at its horizon."""
    from pathlib import Path

    from qlm.core.fit import refusal, serving_limits
    from qlm.traces import load_trace

    trace = load_trace(Path(__file__).resolve().parents[2]
                       / "loadgen/traces/mooncake_conversation_trace.jsonl.gz", limit=150)
    jobs = plan_requests("WB", 150, np.random.default_rng(0), trace=trace).jobs_at(5.0)
    workers = cluster_for("WB")
    book = ProfileBook.load()
    expected = {j.request.id for j in jobs if refusal(
        j.request.model, j.request.prompt_tokens, j.request.max_tokens,
        serving_limits(book, j.request.model, [(w.gpu, w.num_gpus) for w in workers]))}
    assert 0 < len(expected) < len(jobs)
    for name in ("qlm", "fcfs"):
        result = simulate(jobs, workers, book, make_policy(name), SimConfig())
        assert {r.id for r in result.records if r.refused} == expected
        assert result.metrics.num_finished == len(jobs) - len(expected)
        last_arrival = max(j.request.arrival_at for j in jobs)
        assert result.metrics.makespan_s < last_arrival + 3600  # horizon: 6 h after it
