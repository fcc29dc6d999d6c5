"""Scheduler step time with 100k queued requests in Redis: snapshot + decide + apply.

    python -m loadgen.bench_scheduler --queued 100000 --workers 80 --policies qlm,fcfs \\
        --out docs/results/bench_scheduler.json

Starts a local ``redis-server`` (AOF on, as deployed) and a one-node Apache Kafka (KRaft)
on free loopback ports (or uses ``--redis-url`` / ``--kafka-bootstrap``), queues
``--queued`` requests (2 models × 3 classes over ``--span-s`` seconds of arrivals, 10 s
group windows: a few hundred groups), claims ``--running`` requests per worker (their
running batches) and then runs the scheduler's own step
(:meth:`services.scheduler.loop.SchedulingLoop.step`, as the leader) ``--steps`` times
per policy:

1. ``requeue_expired`` + the store snapshot (one Lua script for membership, the records
   in chunks) → ``QueueSnapshot`` (*snapshot*);
2. the policy's ``decide`` (*decide*), in a worker thread as in the service;
3. ``set_virtual_queues`` for every worker + LSO commands on ``qlm.lso`` + rejections
   (*apply*).

Between steps ``--churn`` new requests arrive (so group summaries change as in a live
queue). The cluster is the paper's mix: 3/8 of the workers A10-24GB, 5/8 A100-80GB,
models round robin. Reports p50/p99/max per phase and policy, with the command line, and
the CPU seconds each step cost this process (all threads) and the Redis server: on a
shared machine wall times grow with the load average, CPU seconds much less.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import redis

from loadgen.results import emit
from qlm.bus.producer import BusProducer
from qlm.bus.topics import TopicNames, ensure_topics, topic_specs
from qlm.core.perf import ProfileBook
from qlm.core.policies import PolicyContext, make_policy
from qlm.core.types import SLO, Request, SLOClass
from qlm.localstack import KafkaServer, RedisServer, free_loopback_port
from qlm.roster import WorkerInfo, WorkerRoster
from qlm.store.store import RedisQueueStore
from services.scheduler.lease import LeaderLease, LeaseKeys
from services.scheduler.loop import SchedulingLoop, StepReport
from services.scheduler.metrics import SchedulerMetrics

#: The top-level keys this program writes into its JSON (loadgen.results).
RESULT_KEYS: Final = frozenset({
    "benchmark", "churn_per_step", "command", "date_utc", "machine", "policies", "queued",
    "running_per_worker", "steps", "workers",
})


MODELS = ("mistral-7b", "vicuna-13b")
CLASSES = (SLOClass.INTERACTIVE, SLOClass.BATCH_1, SLOClass.BATCH_2)
WINDOW_S = 10.0
ENQUEUE_CHUNK = 2000


def cluster(num_workers: int) -> tuple[WorkerInfo, ...]:
    num_a10 = round(num_workers * 3 / 8)
    return tuple(
        WorkerInfo(f"w{i:03d}", "A10-24GB" if i < num_a10 else "A100-80GB",
                   (MODELS[i % 2], MODELS[(i + 1) % 2]), MODELS[i % 2])
        for i in range(num_workers))


def make_requests(count: int, start_at: float, span_s: float, rng: np.random.Generator,
                  tag: str) -> list[Request]:
    arrivals = np.sort(rng.uniform(start_at, start_at + span_s, count))
    prompts = rng.integers(50, 2000, count)
    outputs = rng.integers(16, 1024, count)
    out = []
    for k in range(count):
        slo_class = CLASSES[int(rng.integers(0, 3))]
        out.append(Request(f"{tag}-{k:07d}", MODELS[k % 2], int(prompts[k]), int(outputs[k]),
                           slo_class, SLO.for_class(slo_class), float(arrivals[k])))
    return out


async def enqueue_all(store: RedisQueueStore, requests: Sequence[Request]) -> None:
    for i in range(0, len(requests), ENQUEUE_CHUNK):
        results = await store.enqueue_many([(r, "x", None) for r in
                                            requests[i:i + ENQUEUE_CHUNK]])
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            raise SystemExit(f"enqueue failed: {errors[0]}")


async def fill_running(store: RedisQueueStore, workers: Sequence[WorkerInfo],
                       requests: Sequence[Request], per_worker: int) -> int:
    """Claim ``per_worker`` queued requests of each worker's awake model onto it."""
    pools = {m: [r.id for r in requests if r.model == m] for m in MODELS}
    claimed = 0
    for worker in workers:
        assert worker.active_model is not None
        ids, pools[worker.active_model] = (pools[worker.active_model][:per_worker],
                                           pools[worker.active_model][per_worker:])
        claimed += len(await store.claim(worker.id, ids, lease_s=3600))
    return claimed


def redis_cpu_s(client: redis.Redis) -> float:
    info: Any = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def percentiles(values: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(values) * 1e3
    return {"p50": round(float(np.percentile(ms, 50)), 1),
            "p99": round(float(np.percentile(ms, 99)), 1),
            "max": round(float(ms.max()), 1)}


async def bench_policy(policy_name: str, args: argparse.Namespace, redis_url: str,
                       kafka: str, profiles: ProfileBook) -> dict[str, Any]:
    redis.Redis.from_url(redis_url).flushall()
    rng = np.random.default_rng(args.seed)
    now = time.time()
    workers = cluster(args.workers)
    store = RedisQueueStore.from_url(redis_url, group_window_s=WINDOW_S)
    topics = TopicNames(f"bench-{uuid.uuid4().hex[:8]}.")
    await ensure_topics(kafka, topic_specs(topics))
    producer = BusProducer(kafka, client_id="bench-scheduler")
    await producer.start()
    lease_client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        queued = make_requests(args.queued, now - args.span_s, args.span_s, rng, "q")
        t = time.perf_counter()
        await enqueue_all(store, queued)
        enqueue_s = time.perf_counter() - t
        num_running = await fill_running(store, workers, queued, args.running)
        lease = LeaderLease(lease_client, LeaseKeys.under("qlm:"), "bench", ttl_s=3600,
                            margin_s=1)
        await lease.try_acquire()
        loop = SchedulingLoop(store, producer, topics.lso, make_policy(policy_name),
                              PolicyContext(profiles), WorkerRoster(workers, timeout_s=0),
                              lease, SchedulerMetrics(), command_cooldown_s=0.0)
        reports: list[StepReport] = []
        client_cpu: list[float] = []
        redis_cpu: list[float] = []
        meter = redis.Redis.from_url(redis_url, decode_responses=True)
        for step in range(args.steps + 1):
            before = (time.process_time(), redis_cpu_s(meter))
            report = await loop.step()
            if step > 0:  # the first step fills the memos: reported as cold
                reports.append(report)
                client_cpu.append(time.process_time() - before[0])
                redis_cpu.append(redis_cpu_s(meter) - before[1])
            else:
                cold = report
            arrivals = make_requests(args.churn, time.time(), 1.0, rng, f"s{step}")
            await enqueue_all(store, arrivals)
        meter.close()
        return {
            "enqueue_s": round(enqueue_s, 2),
            "running": num_running,
            "groups": reports[-1].num_groups,
            "queued_at_last_step": reports[-1].num_queued,
            "commands_per_step": round(float(np.mean([r.num_commands for r in reports])), 2),
            "cold_ms": {"snapshot": round(cold.snapshot_s * 1e3, 1),
                        "decide": round(cold.decide_s * 1e3, 1),
                        "apply": round(cold.apply_s * 1e3, 1)},
            "ms": {phase: percentiles([getattr(r, f"{phase}_s") for r in reports])
                   for phase in ("snapshot", "decide", "apply", "total")},
            "cpu_ms_per_step": {"scheduler_process": percentiles(client_cpu),
                                "redis_server": percentiles(redis_cpu)},
        }
    finally:
        await producer.stop()
        await store.aclose()
        await lease_client.aclose()


async def run(args: argparse.Namespace, redis_url: str, kafka: str) -> dict[str, Any]:
    profiles = ProfileBook.load()
    return {name: await bench_policy(name, args, redis_url, kafka, profiles)
            for name in args.policies.split(",")}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=80)
    parser.add_argument("--running", type=int, default=16, help="running requests per worker")
    parser.add_argument("--span-s", type=float, default=600.0, help="arrival span of the queue")
    parser.add_argument("--churn", type=int, default=200, help="new arrivals between steps")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--policies", default="qlm,fcfs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--redis-url", help="an existing Redis (flushed!); default: start one")
    parser.add_argument("--kafka-bootstrap", help="an existing Kafka; default: start one")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="qlm-bench-sched-") as tmp:
        redis_server = kafka_server = None
        redis_url, kafka = args.redis_url, args.kafka_bootstrap
        try:
            if redis_url is None:
                redis_server = RedisServer(Path(tmp) / "redis", free_loopback_port())
                redis_server.start()
                redis_url = redis_server.url
            if kafka is None:
                kafka_server = KafkaServer(Path(tmp) / "kafka", free_loopback_port(),
                                           free_loopback_port())
                kafka_server.start()
                kafka = kafka_server.bootstrap_servers
            load_at_start = round(os.getloadavg()[0], 2)
            results = asyncio.run(run(args, redis_url, kafka))
        finally:
            if kafka_server is not None:
                kafka_server.stop()
            if redis_server is not None:
                redis_server.stop()

    result = {
        "benchmark": "scheduler step (requeue_expired + snapshot from Redis, decide, apply "
                     "to Redis and Kafka) with the queue held in Redis",
        "command": "python -m loadgen.bench_scheduler " + shlex.join(
            list(argv) if argv is not None else sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1m_at_start": load_at_start,
                    "host_note": "2 cores used by other work too; see the load average"},
        "queued": args.queued, "workers": args.workers, "running_per_worker": args.running,
        "steps": args.steps, "churn_per_step": args.churn,
        "policies": results,
    }
    emit(result, args.out, keys=RESULT_KEYS)


if __name__ == "__main__":
    main()
