"""Redis memory per queued request: ``used_memory`` before and after enqueueing N requests.

Starts its own ``redis-server`` (AOF on, as deployed) on a free loopback port, or uses
``--url`` (flushed!). For each prompt shape it flushes, reads ``INFO memory``, enqueues
``--requests`` requests through :class:`qlm.store.RedisQueueStore` (``enqueue_many``,
3 models × 3 SLO classes, 10 s groups at ``--arrival-rate``), reads ``INFO memory``
again and reports the difference per request, with ``MEMORY USAGE`` of one record and
the encoding of the record hash and of the largest group set. Example::

    python -m loadgen.bench_redis_memory --out docs/results/bench_redis_memory.json
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import redis

from loadgen.bench_store import make_requests
from loadgen.results import emit
from qlm.localstack import RedisServer, free_loopback_port
from qlm.store import RedisQueueStore

#: The top-level keys this program writes into its JSON (loadgen.results).
RESULT_KEYS: Final = frozenset({
    "arrival_rate_per_s", "benchmark", "command", "date_utc", "hash_max_listpack_value",
    "machine", "results",
})


BATCH = 500
#: Prompt shapes: (name, prompt). Redis keeps a hash compact (listpack) only while every
#: value is at most 64 bytes (``hash-max-listpack-value``); longer prompts change that.
PROMPTS: dict[str, Any] = {
    "text-48B": "x" * 48,
    "text-1KiB": "x" * 1024,
    "tokens-1000": list(range(1000, 2000)),
}


def memory(client: redis.Redis) -> dict[str, int]:
    info = client.info("memory")
    return {key: int(info[key]) for key in ("used_memory", "used_memory_dataset")}


async def enqueue_all(url: str, num_requests: int, rate: float, prompt: Any) -> None:
    store = RedisQueueStore.from_url(url, group_window_s=10.0)
    try:
        requests = make_requests(num_requests, rate)
        for start in range(0, num_requests, BATCH):
            batch = [(r, prompt, {"temperature": 0.0}) for r in requests[start : start + BATCH]]
            results = await store.enqueue_many(batch)
            failed = [r for r in results if isinstance(r, Exception)]
            if failed:
                raise SystemExit(f"enqueue failed: {failed[0]}")
    finally:
        await store.aclose()


def measure(url: str, num_requests: int, rate: float, name: str, prompt: Any) -> dict[str, Any]:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        client.flushall()
        before = memory(client)
        started = time.perf_counter()
        asyncio.run(enqueue_all(url, num_requests, rate, prompt))
        elapsed = time.perf_counter() - started
        after = memory(client)
        record = client.keys("*req:bench-0000000")[0]
        groups = client.zrange(next(iter(client.keys("*groups"))), 0, -1)
        group_keys = [k for k in client.scan_iter(match="*group:*", count=1000)]
        sizes = {k: client.zcard(k) for k in group_keys}
        largest = max(sizes, key=lambda k: sizes[k])
        prompt_bytes = len(client.hget(record, "prompt") or "")
        per_request = (after["used_memory"] - before["used_memory"]) / num_requests
        return {
            "prompt": name,
            "prompt_bytes_stored": prompt_bytes,
            "requests": num_requests,
            "groups": len(groups),
            "enqueue_s": round(elapsed, 2),
            "used_memory_delta_bytes": after["used_memory"] - before["used_memory"],
            "bytes_per_queued_request": round(per_request, 1),
            "dataset_bytes_per_queued_request": round(
                (after["used_memory_dataset"] - before["used_memory_dataset"]) / num_requests, 1
            ),
            "bytes_per_request_beyond_the_prompt": round(per_request - prompt_bytes, 1),
            "record": {
                "memory_usage_bytes": client.memory_usage(record, samples=0),
                "encoding": client.object("encoding", record),
                "fields": client.hlen(record),
            },
            "largest_group": {
                "members": sizes[largest],
                "memory_usage_bytes": client.memory_usage(largest, samples=0),
                "encoding": client.object("encoding", largest),
            },
        }
    finally:
        client.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--arrival-rate", type=float, default=100.0, help="arrivals/s (groups)")
    parser.add_argument("--prompts", default=",".join(PROMPTS), help="comma-separated shapes")
    parser.add_argument(
        "--hash-max-listpack-value", type=int,
        help="CONFIG SET this first (Redis default 64: a record with a longer value, such as "
        "most prompts, is a hashtable)",
    )
    parser.add_argument("--url", help="an existing Redis (flushed!); default: start one")
    parser.add_argument("--out", type=Path, help="write the result JSON here")
    args = parser.parse_args(argv)
    names = args.prompts.split(",")
    unknown = sorted(set(names) - set(PROMPTS))
    if unknown:
        parser.error(f"--prompts: unknown {unknown}; known: {', '.join(PROMPTS)}")

    with tempfile.TemporaryDirectory(prefix="qlm-bench-mem-") as data_dir:
        server = None
        url = args.url
        if url is None:
            server = RedisServer(Path(data_dir), free_loopback_port())
            server.start()
            url = server.url
        try:
            if args.hash_max_listpack_value is not None:
                redis.Redis.from_url(url).config_set(
                    "hash-max-listpack-value", args.hash_max_listpack_value
                )
            rows = [measure(url, args.requests, args.arrival_rate, n, PROMPTS[n]) for n in names]
            info_client = redis.Redis.from_url(url, decode_responses=True)
            info = {**info_client.info("server"), **info_client.info("memory")}
            info_client.close()
        finally:
            if server is not None:
                server.stop()

    result = {
        "benchmark": "Redis memory per queued request (qlm.store)",
        "command": "python -m loadgen.bench_redis_memory " + shlex.join(argv or sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "python": platform.python_version(),
            "redis_server": info["redis_version"],
            "allocator": info.get("mem_allocator", ""),
            "load_average_1m": round(os.getloadavg()[0], 2),
        },
        "hash_max_listpack_value": args.hash_max_listpack_value or 64,
        "arrival_rate_per_s": args.arrival_rate,
        "results": rows,
    }
    emit(result, args.out, keys=RESULT_KEYS)


if __name__ == "__main__":
    main()
