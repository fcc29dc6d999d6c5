"""Micro-benchmark of the Redis queue store: enqueues/s, pulls/s and acks/s.

``--clients`` asyncio tasks (default 64) share one :class:`RedisQueueStore` (one
connection each) against a local ``redis-server`` that this script starts on a free
loopback port with the project's settings (AOF on, ``appendfsync everysec``), or
against ``--url``. Phases run one after the other on the same data:

1. enqueue ``--requests`` requests (3 models × 3 SLO classes, groups of 10 s);
2. snapshot: three full snapshots of the queue, one after the other;
3. pull: each client is a worker with every group of its model in its virtual
   queue and pulls ``--pull-batch`` requests per call until the queue is empty;
4. append: ``--token-steps`` engine steps per worker, each one ``append_tokens_many``
   call adding a chunk of ``TOKENS_PER_CHUNK`` tokens to every request it holds (as a
   worker streams output); "requests" counts the chunks;
5. ack every pulled request as finished.

Writes throughput and per-call latency percentiles as JSON (``--out``), with the
exact command line. Example::

    python -m loadgen.bench_store --out docs/results/bench_store.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import redis

from loadgen.results import emit
from qlm.core.types import SLO, GroupKey, Request, SLOClass
from qlm.localstack import RedisServer, free_loopback_port
from qlm.store import RedisQueueStore, TokenAppend

#: The top-level keys this program writes into its JSON (loadgen.results).
RESULT_KEYS: Final = frozenset({
    "benchmark", "clients", "command", "date_utc", "machine", "median", "pull_batch",
    "requests", "runs",
})


MODELS = ("llama-8b", "qwen-7b", "mistral-7b")
CLASSES = (SLOClass.INTERACTIVE, SLOClass.BATCH_1, SLOClass.BATCH_2)
WINDOW_S = 10.0
T0 = 1_700_000_000.0
TOKENS_PER_CHUNK = 4


@dataclass(frozen=True)
class PhaseResult:
    """One phase: ``num_calls`` store calls moving ``num_requests`` requests."""

    name: str
    num_calls: int
    num_requests: int
    elapsed_s: float
    latencies_s: Sequence[float]
    client_cpu_s: float = 0.0
    redis_cpu_s: float = 0.0

    def as_json(self) -> dict[str, Any]:
        lat_ms = np.asarray(self.latencies_s) * 1e3
        return {
            "calls": self.num_calls,
            "requests": self.num_requests,
            "elapsed_s": round(self.elapsed_s, 3),
            "calls_per_s": round(self.num_calls / self.elapsed_s, 1),
            "requests_per_s": round(self.num_requests / self.elapsed_s, 1),
            "client_cpu_s": round(self.client_cpu_s, 3),
            "redis_server_cpu_s": round(self.redis_cpu_s, 3),
            "client_cpu_us_per_call": round(self.client_cpu_s / self.num_calls * 1e6, 1),
            "redis_cpu_us_per_call": round(self.redis_cpu_s / self.num_calls * 1e6, 1),
            "redis_cpu_us_per_request": round(self.redis_cpu_s / self.num_requests * 1e6, 1),
            "latency_ms": {
                "p50": round(float(np.percentile(lat_ms, 50)), 3),
                "p99": round(float(np.percentile(lat_ms, 99)), 3),
                "max": round(float(lat_ms.max()), 3),
            },
        }


def make_requests(num_requests: int, rate_per_s: float) -> list[Request]:
    """Arrivals ``1/rate`` apart, models and classes round-robin."""
    return [
        Request(
            id=f"bench-{k:07d}",
            model=MODELS[k % len(MODELS)],
            prompt_tokens=100 + k % 900,
            max_tokens=256,
            slo_class=CLASSES[(k // len(MODELS)) % len(CLASSES)],
            slo=SLO.for_class(CLASSES[(k // len(MODELS)) % len(CLASSES)]),
            arrival_at=T0 + k / rate_per_s,
        )
        for k in range(num_requests)
    ]


async def run_clients(
    num_clients: int, client_loop: Callable[[int, list[float]], Awaitable[int]]
) -> tuple[int, int, float, list[float]]:
    """Run ``client_loop(client_index, latencies)`` on every client; each returns the
    number of requests it moved. Returns (calls, requests, elapsed_s, latencies)."""
    latencies: list[list[float]] = [[] for _ in range(num_clients)]
    started = time.perf_counter()
    moved = await asyncio.gather(*(client_loop(i, latencies[i]) for i in range(num_clients)))
    elapsed = time.perf_counter() - started
    flat = [x for per_client in latencies for x in per_client]
    return len(flat), sum(moved), elapsed, flat


async def bench_enqueue(
    store: RedisQueueStore, requests: list[Request], num_clients: int
) -> PhaseResult:
    async def client(index: int, latencies: list[float]) -> int:
        mine = requests[index::num_clients]
        for request in mine:
            t = time.perf_counter()
            await store.enqueue(request, prompt="x" * 64, params={"temperature": 0.0})
            latencies.append(time.perf_counter() - t)
        return len(mine)

    calls, moved, elapsed, lat = await run_clients(num_clients, client)
    return PhaseResult("enqueue", calls, moved, elapsed, lat)


async def bench_snapshot(store: RedisQueueStore, num_snapshots: int) -> PhaseResult:
    """Sequential full snapshots of the queue (the scheduler's read)."""
    latencies = []
    num_requests = 0
    started = time.perf_counter()
    for _ in range(num_snapshots):
        t = time.perf_counter()
        snap = await store.snapshot()
        latencies.append(time.perf_counter() - t)
        num_requests += sum(g.size for g in snap.groups)
    elapsed = time.perf_counter() - started
    return PhaseResult("snapshot", num_snapshots, num_requests, elapsed, latencies)


async def bench_pull(
    store: RedisQueueStore, requests: list[Request], num_clients: int, batch: int
) -> tuple[PhaseResult, dict[str, list[str]]]:
    groups: dict[str, set[GroupKey]] = {m: set() for m in MODELS}
    for request in requests:
        groups[request.model].add(store.group_of(request))
    workers = {f"w{i:02d}": MODELS[i % len(MODELS)] for i in range(num_clients)}
    await store.set_virtual_queues({w: sorted(groups[m]) for w, m in workers.items()})
    held: dict[str, list[str]] = {w: [] for w in workers}

    async def client(index: int, latencies: list[float]) -> int:
        worker = f"w{index:02d}"
        while True:
            t = time.perf_counter()
            pulled = await store.pull(worker, workers[worker], batch, lease_s=600.0)
            latencies.append(time.perf_counter() - t)
            if not pulled:
                return len(held[worker])
            held[worker].extend(r.id for r in pulled)

    calls, moved, elapsed, lat = await run_clients(num_clients, client)
    return PhaseResult(f"pull(batch={batch})", calls, moved, elapsed, lat), held


async def bench_append(
    store: RedisQueueStore, held: dict[str, list[str]], num_steps: int
) -> PhaseResult:
    """Every worker streams ``num_steps`` chunks to each request it holds, one
    ``append_tokens_many`` call per step (what a worker does per engine step)."""
    workers = sorted(held)

    async def client(index: int, latencies: list[float]) -> int:
        worker = workers[index]
        tokens = tuple(range(TOKENS_PER_CHUNK))
        appended = 0
        for _ in range(num_steps):
            appends = [TokenAppend(request_id, tokens, "abcd") for request_id in held[worker]]
            t = time.perf_counter()
            results = await store.append_tokens_many(worker, appends)
            latencies.append(time.perf_counter() - t)
            errors = [r for r in results if isinstance(r, Exception)]
            if errors:
                raise SystemExit(f"append failed: {errors[0]}")
            appended += len(appends)
        return appended

    calls, moved, elapsed, lat = await run_clients(len(workers), client)
    return PhaseResult("append", calls, moved, elapsed, lat)


async def bench_ack(
    store: RedisQueueStore, held: dict[str, list[str]], num_clients: int
) -> PhaseResult:
    workers = sorted(held)

    async def client(index: int, latencies: list[float]) -> int:
        worker = workers[index]
        for request_id in held[worker]:
            t = time.perf_counter()
            await store.ack(worker, request_id, num_generated=10)
            latencies.append(time.perf_counter() - t)
        return len(held[worker])

    calls, moved, elapsed, lat = await run_clients(num_clients, client)
    return PhaseResult("ack", calls, moved, elapsed, lat)


class CpuMeter:
    """CPU seconds used by this process and by the Redis server between two reads."""

    def __init__(self, url: str) -> None:
        self._redis = redis.Redis.from_url(url, decode_responses=True)

    def read(self) -> tuple[float, float]:
        info = self._redis.info("cpu")
        return time.process_time(), float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def measure(self, phase: PhaseResult, before: tuple[float, float]) -> PhaseResult:
        after = self.read()
        return replace(
            phase, client_cpu_s=after[0] - before[0], redis_cpu_s=after[1] - before[1]
        )

    def close(self) -> None:
        self._redis.close()


async def run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    store = RedisQueueStore.from_url(
        url, max_connections=args.clients, group_window_s=WINDOW_S
    )
    cpu = CpuMeter(url)
    try:
        requests = make_requests(args.requests, args.arrival_rate)
        await asyncio.gather(*(store.ping() for _ in range(args.clients)))  # open connections
        before = cpu.read()
        enqueue = cpu.measure(await bench_enqueue(store, requests, args.clients), before)
        before = cpu.read()
        snapshot = cpu.measure(await bench_snapshot(store, 3), before)
        before = cpu.read()
        pull, held = await bench_pull(store, requests, args.clients, args.pull_batch)
        pull = cpu.measure(pull, before)
        pulled = sum(len(v) for v in held.values())
        if pulled != len(requests) or len({i for v in held.values() for i in v}) != pulled:
            raise SystemExit(f"pull handed out {pulled} requests for {len(requests)} queued")
        before = cpu.read()
        append = cpu.measure(await bench_append(store, held, args.token_steps), before)
        before = cpu.read()
        ack = cpu.measure(await bench_ack(store, held, args.clients), before)
    finally:
        await store.aclose()
        cpu.close()
    phases = (enqueue, snapshot, pull, append, ack) if args.token_steps else (
        enqueue, snapshot, pull, ack)  # fmt: skip
    return {p.name: p.as_json() for p in phases}


def redis_version(url: str) -> str:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()


def median_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per phase, the median over runs of throughput and latency percentiles."""
    def median(phase: str, *path: str) -> float:
        values = []
        for run_result in runs:
            value: Any = run_result["phases"][phase]
            for key in path:
                value = value[key]
            values.append(float(value))
        return round(float(np.median(values)), 3)

    return {
        phase: {
            "requests_per_s": median(phase, "requests_per_s"),
            "calls_per_s": median(phase, "calls_per_s"),
            "latency_ms_p50": median(phase, "latency_ms", "p50"),
            "latency_ms_p99": median(phase, "latency_ms", "p99"),
            "client_cpu_us_per_call": median(phase, "client_cpu_us_per_call"),
            "redis_cpu_us_per_call": median(phase, "redis_cpu_us_per_call"),
            "redis_cpu_us_per_request": median(phase, "redis_cpu_us_per_request"),
        }
        for phase in runs[0]["phases"]
    }


def run_once(args: argparse.Namespace, data_dir: Path) -> tuple[dict[str, Any], str]:
    """One full run (fresh Redis data); returns its phases and the Redis version."""
    server = None
    url = args.url
    if url is None:
        server = RedisServer(data_dir, free_loopback_port())
        server.start()
        url = server.url
    try:
        redis.Redis.from_url(url).flushall()
        load_at_start = round(os.getloadavg()[0], 2)
        phases = asyncio.run(run(url, args))
        return {"load_average_1m_at_start": load_at_start, "phases": phases}, redis_version(url)
    finally:
        if server is not None:
            server.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--pull-batch", type=int, default=1, help="requests per pull call")
    parser.add_argument("--arrival-rate", type=float, default=100.0, help="arrivals/s (groups)")
    parser.add_argument(
        "--token-steps", type=int, default=8,
        help="append phase: chunks streamed to each pulled request (0: no append phase)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="full runs; the median is reported")
    parser.add_argument("--url", help="an existing Redis (flushed!); default: start one")
    parser.add_argument("--out", type=Path, help="write the result JSON here")
    args = parser.parse_args(argv)

    runs = []
    version = ""
    for index in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="qlm-bench-redis-") as data_dir:
            run_result, version = run_once(args, Path(data_dir))
        runs.append(run_result)
        print(f"run {index + 1}/{args.repeat}: " + json.dumps(median_summary([run_result])))

    result = {
        "benchmark": "qlm.store (RedisQueueStore) micro-benchmark",
        "command": "python -m loadgen.bench_store " + shlex.join(argv or sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "host_note": "other processes ran meanwhile: see each run's load average",
            "python": platform.python_version(),
            "redis_server": version,
            "redis_config": "appendonly yes, appendfsync everysec, no RDB"
            if args.url is None
            else "external",
        },
        "requests": args.requests,
        "clients": args.clients,
        "pull_batch": args.pull_batch,
        "median": median_summary(runs),
        "runs": runs,
    }
    emit(result, args.out, shown=result["median"], keys=RESULT_KEYS)


if __name__ == "__main__":
    main()
