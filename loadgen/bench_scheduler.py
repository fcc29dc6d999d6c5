"""Scheduler step time with 100k (or 1M) queued requests in Redis: snapshot + decide + apply.

    python -m loadgen.bench_scheduler --queued 100000 --workers 80 \\
        --policies qlm,qlm:fair_share=false,fcfs --out docs/results/bench_scheduler.json

A policy is ``name`` or ``name:option=value[:option=value]...`` (``qlm:fair_share=false``;
values are JSON, else text; :func:`loadgen.bench_decide.policy_entry`), separated by
``,`` or ``;``, made with those options.

Starts a local ``redis-server`` (AOF on, as deployed) and a one-node Apache Kafka (KRaft)
on free loopback ports (or uses ``--redis-url`` / ``--kafka-bootstrap``), queues
``--queued`` requests once (2 models × 3 classes over ``--span-s`` seconds of arrivals,
10 s group windows: a few hundred groups; ``enqueue_many`` pipelines, ``--fill-pipelines``
of them in flight), claims ``--running`` requests per worker (their running batches)
and then, per policy, on a new store (so its first step reads the whole queue) runs the
scheduler's own step (:meth:`services.scheduler.loop.SchedulingLoop.step`, as the
leader) ``--steps`` times:

1. ``requeue_expired`` + the store snapshot (one Lua script for what changed since the
   previous step, the records of requests that entered a group) → ``QueueSnapshot``
   (*snapshot*);
2. the policy's pure ``decide`` (*decide*), in a worker thread as in the service;
3. ``set_virtual_queues`` for every worker + LSO commands queued on ``qlm.lso`` +
   rejections (*apply*; as in the service, the broker's acknowledgement of a step's
   commands is awaited at the start of the next step's apply, so its round trip overlaps
   the next snapshot and decision, and is counted in the step only where it is longer).

Between steps ``--churn`` new requests arrive, ``--pulls`` requests are pulled from the
head of the workers' virtual queues and finished (so groups change at both ends, as in
a live queue), and every running request generates ``--progress`` tokens (so, as in
service, every running record moved since the previous step). The first step is
reported as cold (it reads the whole queue); ``ratio_step_to_decide`` is step (*total*)
over *decide*, p50 and p99, measured in the same steps, in wall time and in CPU time
(``cpu_ratio_step_to_decide``: the scheduler process's CPU for the whole step over the
CPU of ``decide`` alone). The loop freezes the heap as the service does
(``gc_freeze_records``, its default); ``gc`` reports the garbage collector's full passes
during the timed steps and the freezes. The cluster is the paper's mix: 3/8 of the workers A10-24GB,
5/8 A100-80GB, models round robin. Reports p50/p99/max per phase and policy, with the
command line, and the CPU seconds each step cost this process (all threads) and the
Redis server: on a shared machine wall times grow with the load average, CPU seconds
much less.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shlex
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import redis

from loadgen.bench_decide import FullCollections, policy_entry
from loadgen.results import emit
from qlm.bus.producer import BusProducer
from qlm.bus.topics import TopicNames, ensure_topics, topic_specs
from qlm.core.errors import InvalidInput
from qlm.core.perf import ProfileBook
from qlm.core.policies import PolicyContext, make_policy
from qlm.core.policies.base import Policy
from qlm.core.types import SLO, Decision, QueueSnapshot, Request, SLOClass
from qlm.localstack import KafkaServer, RedisServer, free_loopback_port
from qlm.roster import WorkerInfo, WorkerRoster
from qlm.store.store import RedisQueueStore, TokenAppend
from services.scheduler.lease import LeaderLease, LeaseKeys
from services.scheduler.loop import COMMAND_LINGER_MS, SchedulingLoop, StepReport
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.settings import SchedulerSettings

#: The service's default (the bench measures the step as deployed).
GC_FREEZE_RECORDS: Final[int] = SchedulerSettings.model_fields["gc_freeze_records"].default

#: The top-level keys this program writes into its JSON (loadgen.results).
RESULT_KEYS: Final = frozenset({
    "benchmark", "churn_per_step", "command", "date_utc", "enqueue_s", "gc_freeze_records",
    "machine", "policies", "queued", "redis_bytes_per_queued_request",
    "redis_used_memory_after_fill_bytes", "running", "running_per_worker",
    "served_per_step", "steps", "targets", "tokens_per_running_request_per_step", "workers",
})


MODELS = ("mistral-7b", "vicuna-13b")
CLASSES = (SLOClass.INTERACTIVE, SLOClass.BATCH_1, SLOClass.BATCH_2)
WINDOW_S = 10.0
ENQUEUE_CHUNK = 5000


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


async def enqueue_all(store: RedisQueueStore, requests: Sequence[Request],
                      pipelines: int = 1) -> int:
    """Queue ``requests`` through ``enqueue_many`` (one pipeline per chunk), with up to
    ``pipelines`` chunks in flight (Redis runs one while this process encodes the next);
    returns how many were new (not already stored)."""
    chunks = [requests[i:i + ENQUEUE_CHUNK] for i in range(0, len(requests), ENQUEUE_CHUNK)]
    gate = asyncio.Semaphore(pipelines)

    async def one(chunk: Sequence[Request]) -> int:
        async with gate:
            results = await store.enqueue_many([(r, "x", None) for r in chunk])
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            raise SystemExit(f"enqueue failed: {errors[0]}")
        return sum(1 for r in results if not isinstance(r, Exception) and r.created)

    return sum(await asyncio.gather(*(one(chunk) for chunk in chunks)))


async def fill_running(store: RedisQueueStore, workers: Sequence[WorkerInfo],
                       requests: Sequence[Request], per_worker: int) -> dict[str, list[str]]:
    """Claim ``per_worker`` queued requests of each worker's awake model onto it; returns
    the ids claimed per worker."""
    pools = {m: [r.id for r in requests if r.model == m] for m in MODELS}
    claimed = {}
    for worker in workers:
        assert worker.active_model is not None
        ids, pools[worker.active_model] = (pools[worker.active_model][:per_worker],
                                           pools[worker.active_model][per_worker:])
        claimed[worker.id] = [r.id for r in await store.claim(worker.id, ids, lease_s=3600)]
    return claimed


async def progress(store: RedisQueueStore, running: dict[str, list[str]], tokens: int) -> None:
    """Every running request generates ``tokens`` more (as workers report between steps)."""
    if tokens:
        await asyncio.gather(*(
            store.append_tokens_many(worker, [TokenAppend(i, (1,) * tokens) for i in ids])
            for worker, ids in running.items()))


def redis_cpu_s(client: redis.Redis) -> float:
    info: Any = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def percentiles(values: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(values) * 1e3
    return {"p50": round(float(np.percentile(ms, 50)), 1),
            "p99": round(float(np.percentile(ms, 99)), 1),
            "max": round(float(ms.max()), 1)}


class TimedPolicy:
    """A policy whose ``decide`` also records its CPU time (the thread's: the step runs
    ``decide`` in a worker thread), so that decide and the whole step can be compared in
    CPU time, which the load of a shared machine inflates much less than wall time."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.name = policy.name
        self.cpu_s: list[float] = []

    def decide(self, snapshot: QueueSnapshot, ctx: PolicyContext) -> Decision:
        started = time.thread_time()
        try:
            return self.policy.decide(snapshot, ctx)
        finally:
            self.cpu_s.append(time.thread_time() - started)


@dataclass
class Queue:
    """The queue every policy starts from (filled once)."""

    workers: tuple[WorkerInfo, ...]
    enqueue_s: float
    running: dict[str, list[str]]
    redis_memory_empty_bytes: int


async def fill(args: argparse.Namespace, redis_url: str) -> Queue:
    empty = redis.Redis.from_url(redis_url)
    empty.flushall()
    memory: Any = empty.info("memory")
    empty.close()
    rng = np.random.default_rng(args.seed)
    workers = cluster(args.workers)
    store = RedisQueueStore.from_url(redis_url, group_window_s=WINDOW_S)
    try:
        queued = make_requests(args.queued, time.time() - args.span_s, args.span_s, rng, "q")
        t = time.perf_counter()
        await enqueue_all(store, queued, args.fill_pipelines)
        enqueue_s = time.perf_counter() - t
        running = await fill_running(store, workers, queued, args.running)
    finally:
        await store.aclose()
    return Queue(workers, round(enqueue_s, 1), running, int(memory["used_memory"]))


async def serve_some(store: RedisQueueStore, workers: Sequence[WorkerInfo], count: int,
                     turn: int) -> int:
    """Pull ``count`` requests in all from the heads of a few workers' virtual queues (the
    scheduler just wrote them) and finish them: groups lose requests at their head."""
    served = 0
    for k in range(len(workers)):
        if served >= count:
            break
        worker = workers[(turn * 7 + k) % len(workers)]
        assert worker.active_model is not None
        for record in await store.pull(worker.id, worker.active_model, min(16, count - served)):
            await store.ack(worker.id, record.id, num_generated=1)
            served += 1
    return served


async def bench_policy(spec: str, number: int, args: argparse.Namespace, redis_url: str,
                       kafka: str, profiles: ProfileBook, queue: Queue) -> dict[str, Any]:
    """The steps of policy ``spec``, the ``number``-th of the run (its arrivals' ids carry
    the number: two specs of one policy must not enqueue the same ids)."""
    policy_name, options = policy_entry(spec)
    rng = np.random.default_rng(args.seed + 1)
    workers = queue.workers
    store = RedisQueueStore.from_url(redis_url, group_window_s=WINDOW_S)
    topics = TopicNames(f"bench-{uuid.uuid4().hex[:8]}.")
    await ensure_topics(kafka, topic_specs(topics))
    producer = BusProducer(kafka, client_id="bench-scheduler", linger_ms=COMMAND_LINGER_MS)
    await producer.start()
    lease_client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        lease = LeaderLease(lease_client, LeaseKeys.under("qlm:"), f"bench-{policy_name}",
                            ttl_s=3600, margin_s=1)
        await lease_client.delete(LeaseKeys.under("qlm:").leader)
        await lease.try_acquire()
        policy = TimedPolicy(make_policy(policy_name, **options))
        loop = SchedulingLoop(store, producer, topics.lso, policy,  # type: ignore[arg-type]
                              PolicyContext(profiles), WorkerRoster(workers, timeout_s=0),
                              lease, SchedulerMetrics(), command_cooldown_s=0.0,
                              gc_freeze_records=args.gc_freeze_records)
        collections = FullCollections()
        reports: list[StepReport] = []
        client_cpu: list[float] = []
        redis_cpu: list[float] = []
        num_pulled = num_arrived = 0
        meter = redis.Redis.from_url(redis_url, decode_responses=True)
        for step in range(args.steps + 1):
            before = (time.process_time(), redis_cpu_s(meter))
            with collections if step > 0 else contextlib.nullcontext():
                report = await loop.step()
            if step > 0:  # the first step reads the whole queue: reported as cold
                reports.append(report)
                client_cpu.append(time.process_time() - before[0])
                redis_cpu.append(redis_cpu_s(meter) - before[1])
            else:
                cold = report
            arrivals = make_requests(args.churn, time.time(), 1.0, rng,
                                     f"{policy_name}-{number}-{step}")
            num_arrived += await enqueue_all(store, arrivals)
            num_pulled += await serve_some(store, workers, args.pulls, step)
            await progress(store, queue.running, args.progress)
        meter.close()
        ms = {phase: percentiles([getattr(r, f"{phase}_s") for r in reports])
              for phase in ("snapshot", "decide", "apply", "total")}
        step_cpu, decide_cpu = percentiles(client_cpu), percentiles(policy.cpu_s[1:])
        return {
            "groups": reports[-1].num_groups,
            "queued_at_last_step": reports[-1].num_queued,
            "served_between_steps": round(num_pulled / (args.steps + 1), 1),
            "arrived_between_steps": round(num_arrived / (args.steps + 1), 1),
            "commands_per_step": round(float(np.mean([r.num_commands for r in reports])), 2),
            "whole_snapshots": store.num_whole_snapshots,
            "cold_ms": {"snapshot": round(cold.snapshot_s * 1e3, 1),
                        "decide": round(cold.decide_s * 1e3, 1),
                        "apply": round(cold.apply_s * 1e3, 1)},
            "ms": ms,
            "ratio_step_to_decide": {q: round(ms["total"][q] / ms["decide"][q], 2)
                                     for q in ("p50", "p99")},
            "cpu_ms_per_step": {"scheduler_process": step_cpu, "decide": decide_cpu,
                                "redis_server": percentiles(redis_cpu)},
            "cpu_ratio_step_to_decide": {q: round(step_cpu[q] / decide_cpu[q], 2)
                                         for q in ("p50", "p99")},
            "gc": {"freezes": loop.heap.num_freezes,
                   "full_collections_in_steps": len(collections.seconds),
                   "full_collection_max_ms": round(max(collections.seconds, default=0) * 1e3, 1)},
        }
    finally:
        await producer.stop()
        await store.aclose()
        await lease_client.aclose()


async def run(args: argparse.Namespace, redis_url: str, kafka: str) -> dict[str, Any]:
    profiles = ProfileBook.load()
    queue = await fill(args, redis_url)
    meter = redis.Redis.from_url(redis_url)
    memory: Any = meter.info("memory")
    meter.close()
    specs = args.policies.split(";" if ";" in args.policies else ",")
    policies = {spec: await bench_policy(spec, number, args, redis_url, kafka, profiles, queue)
                for number, spec in enumerate(specs)}
    return {"enqueue_s": queue.enqueue_s,
            "running": sum(len(ids) for ids in queue.running.values()),
            "redis_used_memory_after_fill_bytes": int(memory["used_memory"]),
            "redis_bytes_per_queued_request": round(
                (int(memory["used_memory"]) - queue.redis_memory_empty_bytes) / args.queued),
            "policies": policies}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=80)
    parser.add_argument("--running", type=int, default=16, help="running requests per worker")
    parser.add_argument("--span-s", type=float, default=600.0, help="arrival span of the queue")
    parser.add_argument("--churn", type=int, default=200, help="new arrivals between steps")
    parser.add_argument("--pulls", type=int, default=64,
                        help="requests pulled from virtual queue heads and finished between steps")
    parser.add_argument("--progress", type=int, default=1,
                        help="tokens each running request generates between steps")
    parser.add_argument("--fill-pipelines", type=int, default=3,
                        help="enqueue pipelines in flight while filling the queue")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--policies", default="qlm,fcfs",
                        help="separated by ',' or ';', each name[:option=value]... "
                             "(qlm:fair_share=false;fcfs)")
    parser.add_argument("--gc-freeze-records", type=int, default=GC_FREEZE_RECORDS,
                        help="the scheduler's gc_freeze_records (0: never freeze)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--redis-url", help="an existing Redis (flushed!); default: start one")
    parser.add_argument("--kafka-bootstrap", help="an existing Kafka; default: start one")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    for spec in args.policies.split(";" if ";" in args.policies else ","):
        try:
            policy_entry(spec)
        except InvalidInput as error:
            parser.error(f"--policies: {error}")

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
        "steps": args.steps, "churn_per_step": args.churn, "served_per_step": args.pulls,
        "tokens_per_running_request_per_step": args.progress,
        "gc_freeze_records": args.gc_freeze_records,
        "targets": {"step_p99_ms_at_100k": 50, "step_p99_ms_at_1m": 500,
                    "step_over_decide_at_100k": 3},
        **results,
    }
    emit(result, args.out, keys=RESULT_KEYS)


if __name__ == "__main__":
    main()
