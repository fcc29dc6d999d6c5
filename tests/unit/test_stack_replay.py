"""The stack replay's pure parts: the workers it names, the worker command lines it builds
(checked against the worker's own settings), its outcomes and its budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadgen.demo import StackRun, Tracked
from loadgen.gpu import qlm_vs_fcfs
from loadgen.gpu.qlm_vs_fcfs import summarise
from loadgen.gpu.stack_replay import (
    STOP_RESERVE_S,
    Budget,
    WorkerPorts,
    logged_kv_tokens,
    outcomes_of,
    parse_args,
    replays,
    samples_since,
    slice_workloads,
    variant_name,
    worker_argv,
    workers_yaml,
    write_profiles,
)
from qlm.core.errors import Unavailable
from qlm.core.perf import ProfileBook
from qlm.core.types import SLO, Request, SLOClass
from qlm.roster import read_workers_file
from qlm.sim.cluster import Job
from services.common.settings import load_settings
from services.worker.settings import WorkerSettings


def test_workload_flags_default_to_the_harness_defaults() -> None:
    ours, harness = parse_args([]), qlm_vs_fcfs.parse_args([])
    for flag in ("models", "gpu", "slice", "num_interactive", "speedup", "second_model_every",
                 "num_batch", "batch_at_s", "warmup_s", "interactive_slo_s", "batch1_slo_s",
                 "batch2_slo_s", "group_window_s", "tick_s", "seed", "gpu_memory_utilization",
                 "max_model_len", "sim_kv_tokens"):
        assert getattr(ours, flag) == getattr(harness, flag), flag
    assert ours.replay_timeout_s == harness.variant_timeout_s


def test_one_worker_per_model_in_the_workers_file(tmp_path: Path) -> None:
    path = tmp_path / "workers.yaml"
    path.write_text(workers_yaml(["mistral-7b", "qwen2.5-1.5b"], "H100-80GB"))
    workers = read_workers_file(path)
    assert [(w.id, w.gpu, w.models) for w in workers] == [
        ("w-mistral-7b", "H100-80GB", ("mistral-7b",)),
        ("w-qwen2.5-1.5b", "H100-80GB", ("qwen2.5-1.5b",))]


@pytest.mark.parametrize("engine", ["vllm", "sim"])
def test_worker_argv_is_what_the_worker_service_accepts(engine: str) -> None:
    args = parse_args(["--engine", engine, "--gpu-memory-utilization", "0.3",
                       "--enforce-eager"])
    argv = worker_argv(args, "qwen2.5-1.5b", WorkerPorts(5001, 5002), "redis://127.0.0.1:1/0",
                       "127.0.0.1:2", Path("/tmp/profiles"))
    assert argv[1:3] == ["-m", "services.worker"]
    settings = load_settings(WorkerSettings, argv[3:])
    assert (settings.engine, settings.worker_id, settings.models) == (
        engine, "w-qwen2.5-1.5b", ["qwen2.5-1.5b"])
    assert (settings.health_port, settings.metrics_port) == (5001, 5002)
    assert settings.profiles_dir == Path("/tmp/profiles")
    if engine == "vllm":
        assert settings.vllm_gpu_memory_utilization == 0.3
        assert settings.vllm_enforce_eager is True
        assert settings.vllm_max_model_len == args.max_model_len
    else:
        assert settings.vllm_gpu_memory_utilization is None


def test_kv_capacity_is_set_for_the_named_models_on_the_gpu_only(tmp_path: Path) -> None:
    book = ProfileBook.load(write_profiles(tmp_path, "H100-80GB", {"mistral-7b": 1234}))
    assert book.get("mistral-7b", "H100-80GB").kv_capacity_tokens == 1234
    shipped = ProfileBook.load()
    for model, gpu in (("mistral-7b", "A100-80GB"), ("qwen2.5-1.5b", "H100-80GB")):
        assert book.get(model, gpu).kv_capacity_tokens == \
            shipped.get(model, gpu).kv_capacity_tokens
    unchanged = ProfileBook.load(write_profiles(tmp_path / "b", "H100-80GB", {}))
    assert unchanged.get("mistral-7b", "H100-80GB").kv_capacity_tokens == \
        shipped.get("mistral-7b", "H100-80GB").kv_capacity_tokens


def test_kv_capacity_is_read_from_the_last_line_vllm_logs() -> None:
    log = ("(EngineCore pid=7) INFO [kv_cache_utils.py:2146] GPU KV cache size: 1,234 tokens\n"
           "noise\nINFO GPU KV cache size: 155,248 tokens\nINFO Maximum concurrency ...\n")
    assert logged_kv_tokens(log) == 155_248
    assert logged_kv_tokens("INFO starting\n") is None


def _tracked(rid: str, cls: SLOClass, arrival: float, max_tokens: int, **seen: object) -> Tracked:
    request = Request(rid, "m", 10, max_tokens, cls, SLO(2.0 if cls is SLOClass.INTERACTIVE
                                                         else 60.0), arrival)
    return Tracked(Job(request, max_tokens), f"run-{rid}", **seen)  # type: ignore[arg-type]


def test_outcomes_count_from_the_replay_start_and_take_the_larger_token_count() -> None:
    t0 = 1000.0
    tracked = {t.request_id: t for t in (
        # interactive: streamed to the client, met (TTFT 1.5 s from its arrival at 0.5 s)
        _tracked("i0", SLOClass.INTERACTIVE, 0.5, 8, first_token_at=t0 + 2.0,
                 finished_at=t0 + 3.0, terminal="streamed", num_streamed_tokens=8),
        # batch: tokens known from the finished event only; evicted once
        _tracked("b0", SLOClass.BATCH_1, 2.0, 5, first_token_at=t0 + 70.0,
                 finished_at=t0 + 80.0, terminal="finished", num_output_tokens=5,
                 num_evictions=1),
        # failed and rejected requests have no finish time
        _tracked("b1", SLOClass.BATCH_1, 2.0, 5, terminal="failed", finished_at=t0 + 9.0),
        _tracked("i1", SLOClass.INTERACTIVE, 1.0, 4, rejected=True),
    )}
    run = StackRun("qlm", tracked, t0=t0, time_scale=1.0)
    outcomes = {o.request.id: o for o in outcomes_of(run)}
    assert (outcomes["i0"].first_token_at, outcomes["i0"].finished_at) == (2.0, 3.0)
    assert outcomes["i0"].num_generated == 8 and outcomes["b0"].num_generated == 5
    assert outcomes["b0"].num_evictions == 1
    assert outcomes["b1"].finished_at is None and outcomes["b1"].error == "ended failed"
    assert outcomes["i1"].error == "rejected"
    summary = summarise(list(outcomes.values()), {"interactive": 2.0, "batch-1": 60.0})
    assert summary["classes"]["interactive"]["slo_attainment"] == 0.5
    assert summary["classes"]["batch-1"]["slo_attainment"] == 0.0  # TTFT 68 s > 60 s
    assert summary["num_exact_length"] == 2
    assert summary["num_finished"] == 2


def test_budget_caps_waits_and_refuses_when_spent() -> None:
    budget = Budget(started_at=100.0, budget_s=STOP_RESERVE_S + 60.0)
    assert budget.within(300.0, "x", now=110.0) == pytest.approx(50.0)
    assert budget.within(10.0, "x", now=110.0) == 10.0
    with pytest.raises(Unavailable, match="budget"):
        budget.within(10.0, "the replay", now=160.0)


def test_our_flags_are_enough_for_the_harness_workload(tmp_path: Path) -> None:
    slice_csv = tmp_path / "slice.csv"
    slice_csv.write_text("arrival_s,prompt_tokens,output_tokens\n0.0,10,5\n1.5,20,6\n3.0,30,7\n")
    args = parse_args(["--slice", str(slice_csv), "--num-batch", "2",
                       "--second-model-every", "2"])
    workload = qlm_vs_fcfs.build_workload(args)
    classes = [r.slo_class.value for r in workload.requests]
    assert classes.count("interactive") == 3 and classes.count("batch-1") == 2


def test_each_slice_is_replayed_repeat_times_back_to_back(tmp_path: Path) -> None:
    rows = "arrival_s,prompt_tokens,output_tokens\n0.0,10,5\n0.5,20,6\n"
    for name in ("a.csv", "b.csv"):
        (tmp_path / name).write_text(rows)
    a, b = str(tmp_path / "a.csv"), str(tmp_path / "b.csv")
    args = parse_args(["--slice", f"{a},{b}", "--repeat", "2", "--num-batch", "1"])
    workloads = slice_workloads(args)
    assert list(workloads) == [a, b]
    assert "a.csv" in workloads[a].description["interactive"]
    order = [(name, label) for name, label, _ in replays(workloads, args.repeat, "qlm")]
    assert order == [("stack-qlm a run 1", a), ("stack-qlm a run 2", a),
                     ("stack-qlm b run 1", b), ("stack-qlm b run 2", b)]
    assert variant_name("qlm", a, 1, single=True) == "stack-qlm"
    assert variant_name("qlm", a, 1) == "stack-qlm a run 1"
    one = {a: workloads[a]}
    assert [name for name, _, _ in replays(one, 1, "qlm")] == ["stack-qlm"]
    # --interactive-only-first: each slice's stream alone first, then the runs, every
    # name apart (the single-run name too)
    alone = slice_workloads(parse_args(["--slice", a, "--num-batch", "1"]), interactive_only=True)
    assert all(r.slo_class.value == "interactive" for r in alone[a].requests)
    assert len(alone[a].requests) == 2 and len(workloads[a].requests) == 4
    assert [(name, w is alone[a]) for name, _, w in replays(one, 1, "qlm", alone)] == [
        ("stack-qlm a interactive only", True), ("stack-qlm a run 1", False)]


def test_bad_repeat_or_empty_slice_is_refused() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--repeat", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--slice", "a.csv,,b.csv"])


def test_a_runs_decision_samples_are_those_added_since_the_last_read() -> None:
    assert samples_since([0.01, 0.01, 0.03], [0.01, 0.01, 0.01, 0.03, 0.05]) == [0.01, 0.05]
    assert samples_since([], [0.02]) == [0.02]
