"""The pure parts of the local stack's services and of the demo: options, command lines,
time-scaled profiles, the demo's request plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadgen.plan import build_plan, sim_workers
from qlm.core.errors import InvalidInput
from qlm.core.perf import PROFILE_DIR, PerfProfile
from qlm.localstack.services import (
    ServiceOptions,
    ServicePorts,
    ServiceStack,
    scaled_profile_json,
)

REPO = Path(__file__).resolve().parents[2]
DEMO_WORKERS = REPO / "docker" / "workers.demo.yaml"


def _trace(tmp_path: Path, num_rows: int) -> Path:
    path = tmp_path / "trace.csv"
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(num_rows):
        lines.append(f"2023-11-16 18:15:{i:02d}.5000000,{100 + 500 * i},{10 + 900 * i}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_scaled_profile_divides_every_time_and_keeps_token_counts() -> None:
    raw = json.loads((PROFILE_DIR / "mistral-7b@A100-80GB.json").read_text())
    base = PerfProfile.from_json(raw)
    fast = PerfProfile.from_json(scaled_profile_json(raw, 4.0))

    assert fast.prefill_s(1000) == pytest.approx(base.prefill_s(1000) / 4)
    assert fast.decode_step_s(32, 20_000) == pytest.approx(base.decode_step_s(32, 20_000) / 4)
    assert fast.swap_in_s(True) == pytest.approx(base.swap_in_s(True) / 4)
    assert fast.swap_in_s(False) == pytest.approx(base.swap_in_s(False) / 4)
    assert fast.sleep_s == pytest.approx(base.sleep_s / 4)
    assert (fast.kv_capacity_tokens, fast.max_batch_size, fast.max_model_len) == (
        base.kv_capacity_tokens, base.max_batch_size, base.max_model_len)
    assert scaled_profile_json(raw, 1.0) == raw


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_scaled_profile_needs_a_positive_scale(bad: float) -> None:
    raw = json.loads((PROFILE_DIR / "mistral-7b@A100-80GB.json").read_text())
    with pytest.raises(InvalidInput, match="time_scale"):
        scaled_profile_json(raw, bad)


@pytest.mark.parametrize(("field", "value"), [
    ("policy", "lifo"), ("time_scale", 0.0), ("time_scale", float("nan")), ("tick_s", -1.0),
    ("workers_file", Path("/nonexistent/workers.yaml")),
])
def test_service_options_name_the_bad_field(field: str, value: object) -> None:
    with pytest.raises(InvalidInput) as caught:
        ServiceOptions(**{"workers_file": DEMO_WORKERS, field: value})  # type: ignore[arg-type]
    assert caught.value.field == field


def stack_worker_ids() -> tuple[str, ...]:
    from qlm.roster import read_workers_file

    return tuple(w.id for w in read_workers_file(DEMO_WORKERS))


def test_every_command_line_names_the_run_directory_and_its_settings(tmp_path: Path) -> None:
    options = ServiceOptions(policy="fcfs", workers_file=DEMO_WORKERS, time_scale=3.0,
                             topic_prefix="t.")
    stack = ServiceStack(tmp_path, "redis://127.0.0.1:1/0", "127.0.0.1:2", options,
                         ServicePorts(50051, 50052, 1, 2, 3).resolved(
                             worker_ids=stack_worker_ids()))
    argvs = {name: stack.argv(name) for name in stack.processes}
    workers = [name for name in argvs if name.startswith("worker-")]
    assert len(workers) == len(stack_worker_ids()) > 1  # one process per worker (per GPU)
    argvs["worker"] = argvs[workers[0]]

    health_ports = {a[a.index("--health-port") + 1] for n, a in argvs.items() if n in workers}
    assert len(health_ports) == len(workers)
    for argv in argvs.values():
        assert any(str(stack.run_dir) in arg for arg in argv)  # the pid-file marker
        assert argv[argv.index("--topic-prefix") + 1] == "t."
        assert argv[argv.index("--redis-url") + 1] == "redis://127.0.0.1:1/0"
    assert argvs["scheduler"][argvs["scheduler"].index("--policy") + 1] == "fcfs"
    assert argvs["worker"][argvs["worker"].index("--time-scale") + 1] == "3.0"
    assert argvs["ingest"][argvs["ingest"].index("--estimator-addr") + 1] == "127.0.0.1:50052"
    for name in ("scheduler", "estimator", "ingest"):  # predictions in wall-clock seconds
        assert str(stack.profiles_dir) in argvs[name]
    # the worker reads the unscaled profiles the others' are scaled from (--time-scale)
    worker_profiles = argvs["worker"][argvs["worker"].index("--profiles-dir") + 1]
    assert worker_profiles == str(stack.profiles_source) != str(stack.profiles_dir)


def test_demo_plan_is_seeded_fits_the_models_and_keeps_the_rate(tmp_path: Path) -> None:
    trace = _trace(tmp_path, 10)
    plan = build_plan(trace, 10, rate=2.0, models=("mistral-7b", "vicuna-13b"), seed=3)
    again = build_plan(trace, 10, rate=2.0, models=("mistral-7b", "vicuna-13b"), seed=3)
    faster = build_plan(trace, 10, rate=4.0, models=("mistral-7b", "vicuna-13b"), seed=3)

    assert [j.request for j in plan.jobs] == [j.request for j in again.jobs]
    assert plan.span_s == pytest.approx(9 / 2.0)  # 10 arrivals at a mean of 2 req/s
    assert faster.span_s == pytest.approx(plan.span_s / 2)
    for job in plan.jobs:
        r = job.request
        limit = 4096 if r.model == "vicuna-13b" else 32768
        assert r.prompt_tokens + r.max_tokens <= limit
        assert job.output_tokens == r.max_tokens  # the simulated engine stops at max_tokens
    assert {j.request.model for j in plan.jobs} == {"mistral-7b", "vicuna-13b"}


def test_demo_plan_refuses_an_unknown_model(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="models"):
        build_plan(_trace(tmp_path, 3), 3, rate=1.0, models=("gpt-5",))


def test_demo_workers_become_simulator_workers_with_the_first_model_awake() -> None:
    workers = sim_workers(DEMO_WORKERS)
    assert [(w.id, w.gpu, w.active_model) for w in workers] == [
        ("demo-a100-0", "A100-80GB", "vicuna-13b"), ("demo-a10-0", "A10-24GB", "mistral-7b")]


def test_loadgen_sim_runs_the_demos_requests_on_the_demos_workers(tmp_path: Path) -> None:
    from loadgen.sim import Task

    trace = _trace(tmp_path, 8)
    task = Task("WA", "fcfs", 2.0, 5, 8, "mini", trace, None, DEMO_WORKERS,
                ("mistral-7b", "vicuna-13b"))
    plan = build_plan(trace, 8, rate=2.0, models=("mistral-7b", "vicuna-13b"), seed=5)
    assert task.jobs() == plan.jobs
    assert task.workers() == sim_workers(DEMO_WORKERS)
    with pytest.raises(InvalidInput, match="models"):
        Task("WA", "fcfs", 2.0, 5, 8, "mini", None, None, None, ("mistral-7b",)).jobs()
