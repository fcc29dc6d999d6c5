"""Micro-benchmark of the Kafka bus: acknowledged publishes/s and committed consumes/s.

Starts its own Kafka broker (KRaft, one node, as ``make up``) on free loopback ports,
or uses ``--bootstrap``. ``--brokers 1,3`` runs the phases once per cluster size, one
after the other in this process: with 3 nodes (:class:`qlm.localstack.KafkaCluster`)
the topics get 3 replicas and ``min.insync.replicas`` 2, so every acknowledged publish
waits for a second broker. Phases, on topics under a fresh prefix:

1. publish: ``--clients`` asyncio tasks (default 64) share one :class:`BusProducer`
   (acks=all, idempotent) and each awaits the acknowledgement of every ``Event`` it
   publishes, ``--records`` in all (after 64 unmeasured warm-up records); reports
   records/s and p50/p99 ack latency;
2. consume: one :class:`BusConsumer` with a handler that does nothing reads them all
   back (warm-up included), committing after each fetched batch; reports records/s.

Writes the numbers as JSON (``--out``) with the exact command line. Example::

    python -m loadgen.bench_bus --out docs/results/bench_bus.json
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
from aiokafka import ConsumerRecord

from loadgen.results import emit
from qlm.bus import BusConsumer, BusProducer, ConsumerOptions, Event, TopicNames
from qlm.bus.topics import TopicLayout, ensure_topics, topic_specs
from qlm.localstack import KafkaCluster, KafkaServer, free_loopback_port
from qlm.localstack.kafka import kafka_version

#: The top-level keys this program writes into its JSON (loadgen.results).
RESULT_KEYS: Final = frozenset({
    "clients", "command", "consume", "kafka", "machine", "publish", "runs", "brokers",
    "replication_factor", "min_insync_replicas", "load_avg_1m_after",
})


def make_event(index: int) -> Event:
    return Event(
        type="admitted", request_id=f"bench-{index}", model="m", slo_class="batch-1",
        at=1.0, arrival_at=1.0, num_prompt_tokens=100, predicted_wait_s=1.0,
    )  # fmt: skip


async def publish_phase(
    bootstrap: str, topic: str, num_records: int, num_clients: int
) -> dict[str, Any]:
    """Every client publishes its share and awaits each acknowledgement."""
    latencies_s: list[float] = []

    async def client(producer: BusProducer, indices: range) -> None:
        for index in indices:
            sent_at = time.perf_counter()
            await producer.publish(topic, make_event(index))
            latencies_s.append(time.perf_counter() - sent_at)

    async with BusProducer(bootstrap) as producer:
        # Warm-up, not measured: leaders elected and metadata known for every partition.
        await asyncio.gather(*(producer.publish(topic, make_event(-i)) for i in range(1, 65)))
        per_client = num_records // num_clients
        started_at = time.perf_counter()
        await asyncio.gather(
            *(client(producer, range(i * per_client, (i + 1) * per_client))
              for i in range(num_clients))
        )  # fmt: skip
        elapsed_s = time.perf_counter() - started_at
    latencies = np.array(latencies_s) * 1000
    return {
        "records": len(latencies_s),
        "seconds": round(elapsed_s, 3),
        "records_per_s": round(len(latencies_s) / elapsed_s, 1),
        "ack_latency_ms_p50": round(float(np.percentile(latencies, 50)), 2),
        "ack_latency_ms_p99": round(float(np.percentile(latencies, 99)), 2),
    }


async def consume_phase(bootstrap: str, names: TopicNames, num_records: int) -> dict[str, Any]:
    """One consumer reads every record back through decode + handler + commit."""
    done = asyncio.Event()
    num_seen = 0

    async def handle(value: Event, record: ConsumerRecord[Any, Any]) -> None:
        nonlocal num_seen
        num_seen += 1
        if num_seen >= num_records:
            done.set()

    async with BusProducer(bootstrap) as producer:
        consumer = BusConsumer(
            bootstrap, [names.events], f"bench-{uuid.uuid4().hex[:6]}", Event.from_json,
            handle, names.dlq, producer, ConsumerOptions(max_records=500),
        )  # fmt: skip
        await consumer.start()
        running = asyncio.create_task(consumer.run())
        started_at = time.perf_counter()
        await asyncio.wait_for(done.wait(), timeout=600)
        elapsed_s = time.perf_counter() - started_at
        await consumer.stop()
        await running
    return {
        "records": num_seen,
        "seconds": round(elapsed_s, 3),
        "records_per_s": round(num_seen / elapsed_s, 1),
    }


async def run(
    bootstrap: str, num_records: int, num_clients: int, layout: TopicLayout
) -> dict[str, Any]:
    names = TopicNames(f"bench-{uuid.uuid4().hex[:8]}.")
    await ensure_topics(bootstrap, topic_specs(names, layout))
    published = await publish_phase(bootstrap, names.events, num_records, num_clients)
    return {
        "publish": published,
        "consume": await consume_phase(bootstrap, names, published["records"] + 64),
    }


def run_on_own_brokers(num_brokers: int, args: argparse.Namespace) -> dict[str, Any]:
    """Start ``num_brokers`` nodes, run both phases on topics replicated on up to three of
    them, stop the nodes."""
    data_dir = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
    servers: KafkaServer | KafkaCluster
    if num_brokers == 1:
        servers = KafkaServer(data_dir, free_loopback_port(), free_loopback_port(),
                              die_with_parent=True)  # fmt: skip
    else:
        ports = [(free_loopback_port(), free_loopback_port()) for _ in range(num_brokers)]
        servers = KafkaCluster(data_dir, ports, die_with_parent=True)
    layout = TopicLayout(replication_factor=min(3, num_brokers))
    servers.start()
    try:
        results = asyncio.run(
            run(servers.bootstrap_servers, args.records, args.clients, layout)
        )
    finally:
        servers.stop()
    return {
        "brokers": num_brokers,
        "replication_factor": layout.replication_factor,
        "min_insync_replicas": layout.min_isr,
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        **results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    parser.add_argument(
        "--brokers", default="1",
        help="comma-separated cluster sizes to start and measure in turn, e.g. 1,3",
    )
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    try:
        sizes = [int(n) for n in args.brokers.split(",")]
    except ValueError:
        parser.error(f"--brokers: comma-separated integers, got {args.brokers!r}")
    if any(n < 1 for n in sizes):
        parser.error(f"--brokers: sizes must be >= 1, got {args.brokers!r}")
    load_at_start = os.getloadavg()[0]
    if args.bootstrap is not None:
        runs = [asyncio.run(run(args.bootstrap, args.records, args.clients, TopicLayout()))]
    else:
        runs = [run_on_own_brokers(n, args) for n in sizes]
    report = {
        "command": "python -m loadgen.bench_bus " + shlex.join(argv or sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_1m_at_start": round(load_at_start, 2),
        },
        "kafka": kafka_version() if args.bootstrap is None else "external",
        "clients": args.clients,
        **(runs[0] if len(runs) == 1 else {"runs": runs}),
    }
    emit(report, args.out, keys=RESULT_KEYS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
