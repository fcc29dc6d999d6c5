"""loadgen.gpu.burst_phases: decode speed per window of interactive arrivals and the batch
requests alive at each time, from a replay's per-request rows."""

from __future__ import annotations

import gzip
import json
import tarfile
from pathlib import Path

import pytest

from loadgen.gpu.burst_phases import (
    batch_between,
    decode_windows,
    main,
    model_of,
    phases,
    read_log,
    worker_states,
)
from qlm.core.errors import InvalidInput

MODELS = ["mistral-7b", "qwen2.5-1.5b"]
ARGS = {"models": ",".join(MODELS), "second_model_every": 4, "interactive_slo_s": 2.0}
# id, arrival, first token, finish, output tokens, evictions
ROWS = [
    ["i0", 0.5, 0.7, 1.7, 11, 0],     # qwen (0 % 4 == 0): 100 ms per token
    ["i1", 1.0, 1.5, 3.5, 21, 0],     # mistral: 100 ms per token, residency 2 s
    ["i2", 2.0, 5.0, 6.0, 11, 0],     # mistral: missed (TTFT 3 s), 100 ms per token
    ["i3", 9.0, None, None, 0, 0],    # mistral, second window: never served, missed
    ["bmist0", 2.0, 2.5, 9.0, 50, 1],  # evicted once
    ["bmist1", 2.0, 2.6, 4.5, 50, 0],
    ["bqwen0", 2.0, 3.0, 5.0, 50, 0],
]


def test_a_request_id_names_its_model() -> None:
    assert model_of("i8", MODELS, 4) == "qwen2.5-1.5b"
    assert model_of("i9", MODELS, 4) == "mistral-7b"
    assert model_of("bqwen12", MODELS, 4) == "qwen2.5-1.5b"
    with pytest.raises(InvalidInput, match="requests"):
        model_of("x1", MODELS, 4)


def test_each_window_of_arrivals_gets_its_misses_tpot_and_residency() -> None:
    out = decode_windows(ROWS, MODELS, 4, 2.0, 8.0)
    first, second = out["mistral-7b"]
    assert first == {"arrivals_s": [0.0, 8.0], "num": 2, "missed": 1, "tpot_ms": 100.0,
                     "residency_s": 1.5}
    assert second == {"arrivals_s": [8.0, 16.0], "num": 1, "missed": 1, "tpot_ms": None,
                      "residency_s": None}
    assert out["qwen2.5-1.5b"] == [{"arrivals_s": [0.0, 8.0], "num": 1, "missed": 0,
                                    "tpot_ms": 100.0, "residency_s": 1.0}]


def test_batch_requests_are_counted_between_first_token_and_finish_evicted_apart() -> None:
    samples = {s["t_s"]: s for s in batch_between(ROWS, MODELS, 4, 2.0)}
    assert samples[4.0]["mistral-7b"] == {"never_evicted": 1, "evicted": 1}
    assert samples[4.0]["qwen2.5-1.5b"] == {"never_evicted": 1, "evicted": 0}
    assert samples[6.0]["mistral-7b"] == {"never_evicted": 0, "evicted": 1}
    assert samples[0.0]["mistral-7b"] == {"never_evicted": 0, "evicted": 0}


def test_a_result_without_the_replays_arguments_is_refused_by_name() -> None:
    with pytest.raises(InvalidInput, match="second_model_every"):
        phases({"args": {"models": "a,b"}, "variants": {}}, 8.0, 2.0)
    with pytest.raises(InvalidInput, match="requests"):
        phases({"args": ARGS, "variants": {"run 1": {}}}, 8.0, 2.0)


def test_the_program_reads_a_gzipped_result_and_writes_only_its_keys(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "r.json.gz"
    source.write_bytes(gzip.compress(json.dumps(
        {"args": ARGS, "variants": {"run 1": {"requests": ROWS}}}).encode()))
    out = tmp_path / "phases.json"
    assert main([str(source), "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["runs"]["run 1"]["interactive_decode"]["mistral-7b"][0]["missed"] == 1
    assert main([str(source), "--window-s", "0"]) == 2
    assert "window_s" in capsys.readouterr().err


def test_the_schedulers_worker_state_log_is_summarised_per_worker_and_second(
        tmp_path: Path) -> None:
    def line(now: float, worker: str, running: dict[str, int], kv: int, cap: int | None,
             evictions: int = 0) -> str:
        return json.dumps({"event": "worker_state", "now": now, "worker": worker,
                           "running": running, "kv_reserved_tokens": kv,
                           "kv_capacity_tokens": 1000, "lane_head": "m|interactive|7",
                           "lane_head_size": 3, "evictions": evictions, "batch_cap": cap})
    log = "\n".join([
        "not json at all", json.dumps({"event": "step", "now": 1.0}),
        line(100.0, "w0", {"interactive": 2}, 500, None),
        line(100.5, "w0", {"interactive": 5, "batch-1": 1}, 900, None, evictions=2),
        '{"event": "worker_state", "now": 101.2, "worker"',  # cut short
        line(101.2, "w0", {"interactive": 4}, 800, 12, evictions=1),
        line(101.3, "w1", {"batch-2": 9}, 100, 9),
    ])
    states = worker_states(log.splitlines())
    assert states["w0"] == [
        {"t_s": 0, "running": {"interactive": 5, "batch-1": 1}, "kv_reserved_tokens": 900,
         "kv_capacity_tokens": 1000, "lane_head_class": "interactive", "lane_head_size": 3,
         "evictions": 2, "batch_cap": None},
        {"t_s": 1, "running": {"interactive": 4}, "kv_reserved_tokens": 800,
         "kv_capacity_tokens": 1000, "lane_head_class": "interactive", "lane_head_size": 3,
         "evictions": 1, "batch_cap": 12}]
    assert states["w1"][0]["running"] == {"batch-2": 9}
    # read from a logs archive as the GPU runs bring them back
    (tmp_path / "services").mkdir()
    (tmp_path / "services" / "scheduler.log").write_text(log)
    archive = tmp_path / "logs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "services" / "scheduler.log", arcname="services/scheduler.log")
    assert read_log(archive) == log
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz"):
        pass
    with pytest.raises(InvalidInput, match="scheduler_log"):
        read_log(empty)


def test_the_engines_telemetry_in_a_logs_archive_is_summarised_beside_the_plans_view(
        tmp_path: Path) -> None:
    """A saved logs archive with the scheduler's log and the workers' qlm.telemetry
    segments: the program reports, per worker and second from the first worker_state
    line, the engine's batch, unscheduled requests, KV blocks in use and mean step time
    (weighted by steps), beside the scheduler's reservation for the same seconds."""
    import io

    from tests.unit.test_gpu_tools import kafka_segment

    t0 = 5000.0
    state = {"event": "worker_state", "now": t0, "worker": "w0", "running": {"interactive": 3},
             "kv_reserved_tokens": 990, "kv_capacity_tokens": 1000, "lane_head": None,
             "lane_head_size": 0, "evictions": 0, "batch_cap": None}

    def telemetry(at: float, batch: int, waiting: int, kv: float, steps: int, step_s: float
                  ) -> dict[str, object]:
        return {"worker": "w0", "gpu": "H100-80GB", "at": t0 + at, "model": "m",
                "batch_size": batch, "num_waiting": waiting, "kv_used_fraction": kv,
                "step_time_predicted_s": 0.01, "step_time_observed_s": step_s,
                "num_steps": steps}

    records = [telemetry(-3.0, 1, 0, 0.1, 5, 0.5),  # before the first worker_state: left out
               telemetry(0.2, 3, 0, 0.62, 10, 0.030), telemetry(0.7, 4, 2, 0.70, 30, 0.040),
               telemetry(1.5, 0, 0, 0.0, 0, 0.0)]  # an idle heartbeat
    archive = tmp_path / "logs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in (("services/scheduler.log", (json.dumps(state) + "\n").encode()),
                           ("kafka/data/qlm.telemetry-0/00000000000000000000.log",
                            kafka_segment(records, int(t0 * 1000)))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"args": ARGS, "variants": {"run": {"requests": ROWS}}}))
    out = tmp_path / "phases.json"
    assert main([str(result), "--scheduler-log", str(archive), "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["worker_states"]["w0"][0]["kv_reserved_tokens"] == 990
    assert written["engine_states"]["w0"] == [
        {"t_s": 0, "batch_size": 4, "num_waiting": 2, "kv_used_fraction": 0.7,
         "num_steps": 40, "step_ms": 37.5},
        {"t_s": 1, "batch_size": 0, "num_waiting": 0, "kv_used_fraction": 0.0,
         "num_steps": 0, "step_ms": None}]
