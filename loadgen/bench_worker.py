"""How long the worker service adds between enqueue and the first token in Redis.

Starts its own ``redis-server`` and Kafka (qlm.localstack) and one worker process with
the simulated engine, then, one request at a time (light load), enqueues a request
into a group already on the worker's virtual queue and waits for the first token to
appear in the request's Redis stream. The engine's own share (the prefill, divided by
the time scale) is reported beside it, so the difference is the worker's overhead:
queue poll + pull + engine hand-off + stream write + the reader's wake-up.

    python -m loadgen.bench_worker --requests 300 --pull-interval-s 0.005 \\
        --out docs/results/bench_worker.json

``--ab-rounds N`` runs N interleaved rounds of a worker that only polls its queue and of
one woken by keyspace notifications on enqueue (``runs``, one entry each, and the median
p50 of each mode): ``docs/results/bench_worker_ab.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import numpy as np

from loadgen.results import emit
from qlm.core.perf import ProfileBook
from qlm.core.types import SLO, Request, SLOClass
from qlm.localstack import KafkaServer, RedisServer, free_loopback_port
from qlm.localstack.services import grpc_serving
from qlm.store import RedisQueueStore

#: The top-level keys this program writes into its JSON (loadgen.results).
RESULT_KEYS: Final = frozenset({
    "runs", "enqueue_to_first_token_p50_ms_median",
    "benchmark", "command", "engine_prefill_ms", "enqueue_to_first_token_ms", "machine",
    "num_requests", "phases_p50_ms (store clock)", "settings", "worker_overhead_p50_ms",
})


MODEL, GPU = "mistral-7b", "A100-80GB"


def wait_serving(port: int, process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """Until the worker's health check answers SERVING (SystemExit if it exits or times out)."""
    deadline = time.monotonic() + timeout_s
    while not grpc_serving(f"127.0.0.1:{port}"):
        if process.poll() is not None:
            raise SystemExit(f"worker exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise SystemExit("worker did not become ready")
        time.sleep(0.2)


async def measure(redis_url: str, args: argparse.Namespace, prefix: str = "q") -> dict[str, Any]:
    store = RedisQueueStore.from_url(redis_url, group_window_s=1e6)
    prompt = list(range(1, args.prompt_tokens + 1))
    overheads: list[float] = []
    phases: dict[str, list[float]] = {"enqueue_to_pulled": [], "pulled_to_first_token_written": [],
                                      "first_token_written_to_read": []}
    try:
        for i in range(args.warmup + args.requests):
            request = Request(f"{prefix}{i}", MODEL, args.prompt_tokens, args.max_tokens,
                              SLOClass.INTERACTIVE, SLO(20.0), arrival_at=time.time())
            if i == 0:
                await store.set_virtual_queue("w1", [store.group_of(request)])
            started = time.perf_counter()
            await store.enqueue(request, prompt=prompt)
            first_at = None
            async for chunk in store.read_tokens(request.id, block_ms=1000):
                if first_at is None and chunk.token_ids:
                    first_at = time.perf_counter()
                if chunk.final_state is not None:
                    break
            assert first_at is not None
            read_at = time.time()
            if i >= args.warmup:
                overheads.append(first_at - started)
                record = await store.get(request.id)
                assert record.started_at is not None and record.first_token_at is not None
                read_at -= (time.perf_counter() - first_at)
                phases["enqueue_to_pulled"].append(record.started_at - record.enqueued_at)
                phases["pulled_to_first_token_written"].append(
                    record.first_token_at - record.started_at)
                phases["first_token_written_to_read"].append(read_at - record.first_token_at)
            await asyncio.sleep(args.gap_s)
    finally:
        await store.aclose()
    profile = ProfileBook.load().get(MODEL, GPU)
    engine_s = profile.prefill_s(args.prompt_tokens) / args.time_scale
    ms = [1000 * x for x in overheads]
    return {
        "num_requests": len(ms),
        "enqueue_to_first_token_ms": {
            "p50": round(float(np.percentile(ms, 50)), 3),
            "p90": round(float(np.percentile(ms, 90)), 3),
            "p99": round(float(np.percentile(ms, 99)), 3),
            "mean": round(sum(ms) / len(ms), 3),
        },
        "phases_p50_ms (store clock)": {
            name: round(1000 * float(np.percentile(values, 50)), 3)
            for name, values in phases.items()
        },
        "engine_prefill_ms": round(1000 * engine_s, 4),
        "worker_overhead_p50_ms": round(float(np.percentile(ms, 50)) - 1000 * engine_s, 3),
    }


def start_worker(redis: RedisServer, kafka: KafkaServer, args: argparse.Namespace,
                 poll_only: bool) -> subprocess.Popen[bytes]:
    """One worker process with the simulated engine, serving once its health answers."""
    health_port = free_loopback_port()
    worker = subprocess.Popen(
        [sys.executable, "-m", "services.worker", "--engine", "sim", "--worker-id", "w1",
         "--gpu", GPU, "--models", MODEL, "--time-scale", str(args.time_scale),
         "--pull-interval-s", str(args.pull_interval_s), "--redis-url", redis.url,
         "--kafka-bootstrap", kafka.bootstrap_servers, "--host", "127.0.0.1",
         "--health-port", str(health_port), "--metrics-port", str(free_loopback_port()),
         "--log-level", "warning", "--wake-on-enqueue", str(not poll_only).lower()],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )  # fmt: skip
    try:
        wait_serving(health_port, worker)
    except BaseException:
        stop_worker(worker)
        raise
    return worker


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    worker.send_signal(signal.SIGTERM)
    worker.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--time-scale", type=float, default=100.0)
    parser.add_argument("--pull-interval-s", type=float, default=0.005)
    parser.add_argument("--gap-s", type=float, default=0.01)
    parser.add_argument("--poll-only", action="store_true",
                        help="no queue notifications: the worker only polls")
    parser.add_argument("--ab-rounds", type=int, default=0,
                        help="instead: this many interleaved rounds of polling only and of "
                             "waking on enqueue, each with a fresh worker (same servers)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.ab_rounds < 0:
        parser.error("--ab-rounds must be >= 0")
    root = Path(tempfile.mkdtemp(prefix="qlm-bench-worker-"))
    redis = RedisServer(root / "redis", free_loopback_port())
    kafka = KafkaServer(root / "kafka", free_loopback_port(), free_loopback_port())
    redis.start()
    kafka.start()
    modes = ([("poll-only", True), ("wake-on-enqueue", False)] * args.ab_rounds
             or [("poll-only" if args.poll_only else "wake-on-enqueue", args.poll_only)])
    runs: list[dict[str, Any]] = []
    try:
        for index, (mode, poll_only) in enumerate(modes):
            worker = start_worker(redis, kafka, args, poll_only)
            try:
                measured = asyncio.run(measure(redis.url, args, prefix=f"r{index}-"))
            finally:
                stop_worker(worker)
            runs.append({"mode": mode, "load_avg_1m": round(os.getloadavg()[0], 2),
                         **measured})
            print(f"{mode}: p50 {measured['enqueue_to_first_token_ms']['p50']} ms",
                  file=sys.stderr)
    finally:
        kafka.stop()
        redis.stop()
    result: dict[str, Any] = {
        "benchmark": "worker enqueue -> first token in the Redis stream, light load",
        "command": " ".join(["python -m loadgen.bench_worker", *sys.argv[1:]]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)},
    }
    if args.ab_rounds:
        result["runs"] = runs
        result["enqueue_to_first_token_p50_ms_median"] = {
            mode: float(np.median([r["enqueue_to_first_token_ms"]["p50"] for r in runs
                                   if r["mode"] == mode]))
            for mode in ("poll-only", "wake-on-enqueue")}
    else:
        result.update({k: v for k, v in runs[0].items() if k not in ("mode", "load_avg_1m")})
    emit(result, args.out, keys=RESULT_KEYS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
