"""The GPU swap benchmark without a GPU: loadgen.gpu.swap_bench through the worker service
with the simulated engine on real Redis and Kafka (its vLLM run is the same code with
``--engine vllm``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.redis
@pytest.mark.kafka
@pytest.mark.slow
def test_swap_bench_swaps_through_the_worker_service(redis_url: str, kafka_bootstrap: str,
                                                     topic_prefix: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "loadgen.gpu.swap_bench", "--engine", "sim",
               "--gpu", "H100-80GB", "--swaps", "4", "--warmup-swaps", "1",
               "--cold-restarts", "1", "--time-scale", "10", "--redis-url", redis_url,
               "--kafka-bootstrap", kafka_bootstrap, "--topic-prefix", topic_prefix,
               "--dir", str(tmp_path / "run"), "--budget-s", "240", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "swap_bench.json").read_text())
    assert result["error"] is None and result["command"].startswith(
        "python3 -m loadgen.gpu.swap_bench --engine sim")
    assert result["device"] and result["code_version"]
    swaps = result["swaps"]
    assert [r["to_model"] for r in swaps] == ["qwen2.5-1.5b", "mistral-7b"] * 2 + ["qwen2.5-1.5b"]
    assert [r["warmup"] for r in swaps] == [True, False, False, False, False]
    # the simulated swap is the profiles' sleep + wake, time-scaled: the worker reports it
    # and the command -> first token time includes it
    assert all(r["worker_sleep_wake_s"] > 0 for r in swaps)
    assert all(r["command_to_first_token_s"] >= r["worker_sleep_wake_s"] for r in swaps)
    summary = result["summary"]
    assert summary["swap_command_to_first_token"]["n"] == 4
    cold = result["cold_restarts"]
    assert len(cold) == 1 and cold[0]["stop_to_first_token_s"] > cold[0]["start_s"] > 0
    assert summary["cold_restart_to_first_token"]["n"] == 1
