"""The simulated engine follows its performance profile exactly (virtual clock)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qlm.core.errors import InvalidInput, NotFound
from qlm.core.perf import PerfProfile, ProfileBook
from qlm.core.policies.base import make_policy
from qlm.core.types import SLO, Request, SLOClass
from qlm.engine.base import EngineRequest, OutputChunk
from qlm.engine.clock import VirtualClock
from qlm.engine.simulated import SimulatedEngine
from qlm.sim import Job, SimConfig, WorkerSpec, simulate
from qlm.sim.batching import decode_segment_s, plan_prefill


def profile(model: str = "m", **overrides: object) -> PerfProfile:
    fields: dict[str, object] = {
        "model": model,
        "gpu": "G",
        "num_gpus": 1,
        "prefill_tokens": (1, 1000, 10000),
        "prefill_seconds": (0.01, 0.1, 1.0),
        "decode_base_s": 0.01,
        "decode_per_seq_s": 0.001,
        "decode_per_ctx_token_s": 1e-6,
        "kv_capacity_tokens": 100_000,
        "max_batch_size": 64,
        "sleep_s": 2.0,
        "wake_s": 0.5,
        "cold_load_s": 60.0,
    }
    fields.update(overrides)
    return PerfProfile(**fields)  # type: ignore[arg-type]


def request(rid: str, prompt: int = 500, max_tokens: int = 20, model: str = "m") -> EngineRequest:
    return EngineRequest(rid, model, prompt_tokens=prompt, max_tokens=max_tokens)


async def collect(
    clock: VirtualClock, stream: AsyncIterator[OutputChunk]
) -> list[tuple[float, OutputChunk]]:
    return [(clock.now(), chunk) async for chunk in stream]


@pytest.fixture
async def clock() -> VirtualClock:
    return VirtualClock()


async def started(
    clock: VirtualClock, *profiles: PerfProfile, **options: object
) -> SimulatedEngine:
    engine = SimulatedEngine(profiles or (profile(),), clock=clock, **options)  # type: ignore[arg-type]
    await engine.start()
    return engine


async def test_one_request_ttft_is_its_prefill_and_decode_follows_the_profile(
    clock: VirtualClock,
) -> None:
    p = profile()
    engine = await started(clock, p)
    chunks = await collect(clock, engine.add(request("a", prompt=500, max_tokens=20)))
    await engine.close()
    first_at, first = chunks[0]
    assert first_at == pytest.approx(p.prefill_s(500))
    assert first.token_ids and first.num_generated == 1
    finish_at, last = chunks[-1]
    assert last.finish_reason == "length"
    assert last.num_generated == 20
    assert sum(len(c.token_ids) for _, c in chunks) == 20
    # 19 decode steps of one request whose context grows from 501 tokens.
    assert finish_at == pytest.approx(p.prefill_s(500) + decode_segment_s(p, 1, 501, 19))
    assert finish_at - first_at == pytest.approx(
        sum(p.decode_step_s(1, 501 + i) for i in range(19))
    )


async def test_requests_added_together_share_one_prefill_and_decode_steps(
    clock: VirtualClock,
) -> None:
    p = profile()
    engine = await started(clock, p, max_segment_s=1e-6)  # emit after every step
    a, b = engine.add(request("a", 300, 3)), engine.add(request("b", 200, 3))
    got = await asyncio.gather(collect(clock, a), collect(clock, b))
    await engine.close()
    prefill = p.prefill_s(500)
    for chunks in got:
        assert chunks[0][0] == pytest.approx(prefill)
        times = [t for t, c in chunks for _ in c.token_ids]
        assert times[1] == pytest.approx(prefill + p.decode_step_s(2, 502))
        two_steps = p.decode_step_s(2, 502) + p.decode_step_s(2, 504)
        assert times[2] == pytest.approx(prefill + two_steps)
    stats = engine.stats()
    assert stats.num_steps == 3  # one prefill + two decode steps
    assert stats.num_output_tokens == 6
    assert stats.step_time_observed_s == pytest.approx(stats.step_time_predicted_s)


async def test_abort_keeps_progress_and_resume_continues_it(clock: VirtualClock) -> None:
    p = profile()
    engine = await started(clock, p)
    stream = engine.add(request("a", prompt=500, max_tokens=1000))
    seen: list[int] = []
    async for chunk in stream:
        seen.extend(chunk.token_ids)
        if len(seen) >= 10:
            break
    progress = await engine.abort("a")
    assert progress.num_generated == len(seen) >= 10
    assert progress.token_ids == tuple(seen)
    rest = [c async for c in stream]
    assert rest[-1].finish_reason == "abort"
    with pytest.raises(NotFound):
        await engine.abort("a")
    assert engine.stats().batch_size == 0

    resumed = request("a", prompt=500, max_tokens=1000).resumed(progress)
    assert resumed.context_tokens == 500 + len(seen)
    t0 = clock.now()
    chunks = await collect(clock, engine.add(resumed))
    await engine.close()
    # The abort cut the decode segment at its next step boundary; then re-admission
    # recomputes prompt + kept output and generates only the rest.
    g = len(seen)
    assert chunks[0][0] - t0 == pytest.approx(p.decode_step_s(1, 500 + g) + p.prefill_s(500 + g))
    assert chunks[0][1].num_generated == len(seen) + 1
    assert chunks[-1][1].num_generated == 1000
    assert sum(len(c.token_ids) for _, c in chunks) == 1000 - len(seen)


async def test_kv_state_swap_stalls_then_restores_instead_of_prefilling(
    clock: VirtualClock,
) -> None:
    p = profile(notes={"kv_bytes_per_token": 1_000_000})
    engine = await started(clock, p, max_segment_s=1e-6, pcie_gb_s=25.0)
    stream = engine.add(request("a", prompt=500, max_tokens=100))
    async for chunk in stream:
        if chunk.num_generated >= 10:
            break
    t0 = clock.now()
    progress = await engine.abort("a", keep_kv=True)
    _ = [c async for c in stream]
    ctx = 500 + progress.num_generated
    copy_s = engine.kv_copy_s("m", ctx)
    assert copy_s == pytest.approx(ctx * 1_000_000 / 25e9)
    chunks = await collect(clock, engine.add(request("a", 500, 100).resumed(progress)))
    await engine.close()
    # the cut step, the copy out (stall), the copy back instead of a prefill (no token),
    # then the resumed request's first decode step
    expected = p.decode_step_s(1, ctx) + copy_s + copy_s + p.decode_step_s(1, ctx)
    assert chunks[0][0] - t0 == pytest.approx(expected)
    assert chunks[0][1].num_generated == progress.num_generated + 1
    assert chunks[-1][1].num_generated == 100


async def test_swap_takes_sleep_plus_wake_and_only_the_active_model_runs(
    clock: VirtualClock,
) -> None:
    a, b = profile("A", sleep_s=3.0, wake_s=0.25), profile("B", sleep_s=1.0, wake_s=0.75)
    engine = await started(clock, a, b)
    assert engine.active_model == "A"
    with pytest.raises(InvalidInput, match="active model"):
        engine.add(request("x", model="B"))
    stream = engine.add(request("y", model="A", max_tokens=1000))
    with pytest.raises(InvalidInput, match="abort them first"):
        await engine.sleep("A")
    await engine.abort("y")
    _ = [c async for c in stream]
    t0 = clock.now()
    await engine.swap("B")
    assert clock.now() - t0 == pytest.approx(a.sleep_s + b.wake_s)
    assert engine.active_model == "B"
    chunks = await collect(clock, engine.add(request("z", model="B", prompt=100, max_tokens=1)))
    assert chunks[-1][1].finish_reason == "length"
    with pytest.raises(InvalidInput, match="put it to sleep first"):
        await engine.wake("A")
    await engine.close()


async def test_time_scale_runs_faster_but_reports_engine_seconds(clock: VirtualClock) -> None:
    p = profile()
    engine = await started(clock, p, time_scale=10.0)
    chunks = await collect(clock, engine.add(request("a", prompt=1000, max_tokens=5)))
    await engine.close()
    assert chunks[0][0] == pytest.approx(p.prefill_s(1000) / 10)
    assert engine.stats().step_time_predicted_s == pytest.approx(
        p.prefill_s(1000) + decode_segment_s(p, 1, 1001, 4)
    )
    assert engine.stats().step_time_observed_s == pytest.approx(
        engine.stats().step_time_predicted_s
    )


async def test_long_segments_stream_in_pieces_without_changing_the_timing(
    clock: VirtualClock,
) -> None:
    p = profile()
    engine = await started(clock, p, max_segment_s=0.05)
    chunks = await collect(clock, engine.add(request("a", prompt=100, max_tokens=200)))
    await engine.close()
    assert len(chunks) > 10  # streamed, not one burst at the end
    assert chunks[-1][0] == pytest.approx(p.prefill_s(100) + decode_segment_s(p, 1, 101, 199))


async def test_kv_overflow_preempts_the_latest_request_keeping_its_progress(
    clock: VirtualClock,
) -> None:
    p = profile(kv_capacity_tokens=1000)
    engine = await started(clock, p)
    a = engine.add(request("a", prompt=400, max_tokens=300))
    b = engine.add(request("b", prompt=400, max_tokens=300))
    got = await asyncio.gather(collect(clock, a), collect(clock, b))
    await engine.close()
    for chunks in got:
        assert chunks[-1][1].num_generated == 300
        assert sum(len(c.token_ids) for _, c in chunks) == 300
    assert engine.stats().num_steps > 300  # b was recomputed after a finished


class LaggyClock(VirtualClock):
    """Every wake-up comes ``lag_s`` late, like an event loop under load."""

    def __init__(self, lag_s: float) -> None:
        super().__init__()
        self.lag_s = lag_s

    async def sleep_until(self, at: float) -> None:
        await super().sleep_until(at + self.lag_s)


async def test_loop_lag_delays_tokens_but_not_the_modelled_gpu() -> None:
    p = profile()
    clock = LaggyClock(lag_s=0.004)
    engine = await started(clock, p, max_segment_s=0.02)  # ~25 segments for 200 tokens
    chunks = await collect(clock, engine.add(request("a", prompt=100, max_tokens=200)))
    await engine.close()
    ideal = p.prefill_s(100) + decode_segment_s(p, 1, 101, 199)
    assert len(chunks) > 20
    assert ideal < chunks[-1][0] <= ideal + 0.004 + 1e-9  # late by one lag, not by 20 of them
    stats = engine.stats()
    assert stats.step_time_predicted_s == pytest.approx(ideal)
    assert stats.step_time_observed_s == pytest.approx(chunks[-1][0])  # lag counted once


def test_prefill_plan_respects_budget_slots_and_kv() -> None:
    p = profile(max_batch_size=3, kv_capacity_tokens=2000)
    assert plan_prefill([700, 700, 700], 0, 0, p, 8192).positions == (0, 1)  # KV
    assert plan_prefill([100, 100, 100], 1, 100, p, 8192).positions == (0, 1)  # slots
    assert plan_prefill([300, 300], 0, 0, p, 400).positions == (0,)  # budget
    assert plan_prefill([900], 0, 0, p, 10).positions == (0,)  # at least one


def test_rejects_bad_requests_and_settings() -> None:
    with pytest.raises(InvalidInput, match="time_scale"):
        SimulatedEngine([profile()], time_scale=0)
    with pytest.raises(InvalidInput, match="one GPU type"):
        SimulatedEngine([profile("a"), profile("b", gpu="H")])
    with pytest.raises(InvalidInput, match="num_generated"):
        EngineRequest("r", "m", prompt_tokens=1, max_tokens=2, num_generated=2)


@pytest.mark.parametrize(
    ("prefill_mode", "budget"), [("whole", 8192), ("chunked", 8192), ("chunked", 700)]
)
async def test_agrees_with_the_discrete_event_simulator(
    clock: VirtualClock, prefill_mode: str, budget: int
) -> None:
    """The same arrivals on one worker: first-token and finish times match the simulator
    (chunked with a small budget: long prompts take several steps)."""
    p = profile(gpu="G")
    arrivals = [(0.0, 300, 40), (0.05, 800, 25), (0.31, 120, 60), (0.9, 2000, 10), (1.0, 50, 5),
                (1.0, 1500, 30), (1.013, 10, 3), (1.2, 4000, 12), (1.2005, 64, 50)]
    jobs = [
        Job(Request(f"r{i}", "m", prompt, out, SLOClass.INTERACTIVE, SLO(20.0), at), out)
        for i, (at, prompt, out) in enumerate(arrivals)
    ]
    sim = simulate(
        jobs, [WorkerSpec("w", "G", "m", ("m",))], ProfileBook.of([p]), make_policy("fcfs"),
        SimConfig(tick_s=0.01, group_window_s=0.01, min_decision_interval_s=0.0,
                  max_prefill_tokens=budget, prefill_mode=prefill_mode),
    )
    expected = {r.id: (r.first_token_at, r.finished_at) for r in sim.records}

    engine = await started(clock, p, max_prefill_tokens=budget, prefill_mode=prefill_mode)

    async def one(i: int, at: float, prompt: int, out: int) -> tuple[float, float]:
        await clock.sleep_until(at)
        chunks = await collect(clock, engine.add(request(f"r{i}", prompt, out)))
        return chunks[0][0], chunks[-1][0]

    got = await asyncio.gather(*(one(i, *a) for i, a in enumerate(arrivals)))
    await engine.close()
    for i, (first_at, finish_at) in enumerate(got):
        want_first, want_finish = expected[f"r{i}"]
        assert want_first is not None and want_finish is not None
        assert math.isclose(first_at, want_first, abs_tol=1e-9), f"r{i} first token"
        assert math.isclose(finish_at, want_finish, abs_tol=1e-9), f"r{i} finish"


async def test_a_model_with_a_checkpoint_serves_text_timed_by_its_real_prompt(
    clock: VirtualClock, tiny_checkpoint: Path,
) -> None:
    from qlm.engine.text import TextModel

    text = TextModel.load(tiny_checkpoint)
    p = profile()
    engine = await started(clock, p, text_models={"m": text})
    prompt = "Köln 🙂 and the queue. STOP here"
    ids = text.encode(prompt)
    chunks = await collect(clock, engine.add(EngineRequest(
        "t", "m", prompt_tokens=3, max_tokens=200, prompt_text=prompt, stop=("STOP",))))
    first_at, _ = chunks[0]
    assert first_at == pytest.approx(p.prefill_s(len(ids)))  # the real count, not the 3 given
    assert "".join(c.text for _, c in chunks) == "Köln 🙂 and the queue. "
    assert chunks[-1][1].finish_reason == "stop"
    # aborted: the text held back for a possible stop string comes with the abort
    stream = engine.add(EngineRequest("u", "m", prompt_tokens=3, max_tokens=500,
                                      prompt_text="abc ab", stop=("ab!",), ignore_eos=True))
    got = [await anext(stream)]
    while sum(len(c.token_ids) for c in got) < 7:
        got.append(await anext(stream))
    await engine.abort("u")
    got += [c async for c in stream]
    assert got[-1].finish_reason == "abort"
    ids = [t for c in got for t in c.token_ids]
    assert "".join(c.text for c in got) == text.decode(ids)  # nothing held back is lost
    assert text.decode(ids).startswith("abc ababc")
    with pytest.raises(InvalidInput, match="text_models"):
        SimulatedEngine([p], clock=clock, text_models={"x": text})
    await engine.close()
