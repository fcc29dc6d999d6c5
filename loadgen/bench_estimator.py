"""PredictWait latency with 100k queued requests in Redis (the estimator plane in process).

    python -m loadgen.bench_estimator --queued 100000 --workers 80 \\
        --out docs/results/bench_estimator.json

Starts a local ``redis-server`` (or uses ``--redis-url``), queues ``--queued`` requests
as :mod:`loadgen.bench_scheduler` does, places their groups on the workers' virtual queues
with one ``fcfs`` decision, then repeats ``--rounds`` times what the estimator service
does: a background view refresh (store snapshot + queue index) and memo warm-up, followed
by ``--queries`` PredictWait answers for random interactive and batch requests. Reports
p50/p99 of the answer (the submit path's cost without the gRPC hop), of the refresh and
of the warm-up.
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

import numpy as np
import redis

from loadgen.bench_scheduler import ENQUEUE_CHUNK, cluster, make_requests, percentiles
from loadgen.results import emit
from qlm.core.estimator import RWTEstimator
from qlm.core.perf import ProfileBook
from qlm.core.policies import PolicyContext, make_policy
from qlm.core.types import SLOClass
from qlm.estimator_plane import EstimatorPlane, WaitQuery
from qlm.localstack import RedisServer, free_loopback_port
from qlm.roster import WorkerRoster
from qlm.store.store import RedisQueueStore

#: The top-level keys this program writes into its JSON (loadgen.results).
RESULT_KEYS: Final = frozenset({
    "admitted", "answers", "benchmark", "command", "date_utc", "groups", "machine", "ms",
    "queued", "workers",
})


WINDOW_S = 10.0


async def run(args: argparse.Namespace, redis_url: str) -> dict[str, Any]:
    redis.Redis.from_url(redis_url).flushall()
    rng = np.random.default_rng(args.seed)
    profiles = ProfileBook.load()
    store = RedisQueueStore.from_url(redis_url, group_window_s=WINDOW_S)
    roster = WorkerRoster(cluster(args.workers), timeout_s=0)
    try:
        now = time.time()
        queued = make_requests(args.queued, now - args.span_s, args.span_s, rng, "q")
        for i in range(0, len(queued), ENQUEUE_CHUNK):
            await store.enqueue_many([(r, "x", None) for r in queued[i:i + ENQUEUE_CHUNK]])
        snapshot = (await store.snapshot()).to_queue_snapshot(now, roster.views(now, profiles))
        decision = make_policy("fcfs").decide(snapshot, PolicyContext(profiles))
        await store.set_virtual_queues({p.worker_id: p.order for p in decision.placements})
        plane = EstimatorPlane(RWTEstimator(profiles), roster, store,
                               refresh_interval_s=3600.0)
        plane._kept_fresh = True  # answers use the view as refreshed below, as in the service
        refresh: list[float] = []
        warm: list[float] = []
        answers: list[float] = []
        admitted = 0
        for _ in range(args.rounds):
            await store.enqueue_many([(r, "x", None) for r in make_requests(
                args.churn, time.time(), 1.0, rng, f"c{len(refresh)}")])
            t = time.perf_counter()
            view = await plane.refresh()
            refresh.append(time.perf_counter() - t)
            t = time.perf_counter()
            await asyncio.to_thread(plane._warm, view)
            warm.append(time.perf_counter() - t)
            for _ in range(args.queries):
                slo_class = (SLOClass.INTERACTIVE, SLOClass.BATCH_1)[int(rng.integers(0, 2))]
                query = WaitQuery(("mistral-7b", "vicuna-13b")[int(rng.integers(0, 2))],
                                  slo_class, int(rng.integers(50, 2000)),
                                  int(rng.integers(16, 1024)))
                t = time.perf_counter()
                answer = await plane.predict_wait(query)
                answers.append(time.perf_counter() - t)
                admitted += answer.admit
        return {"groups": len(view.groups), "queued": view.num_queued,
                "answers": len(answers), "admitted": admitted,
                "ms": {"predict_wait": percentiles(answers), "refresh": percentiles(refresh),
                       "warm": percentiles(warm)}}
    finally:
        await store.aclose()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=80)
    parser.add_argument("--span-s", type=float, default=600.0)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--churn", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--redis-url")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qlm-bench-est-") as tmp:
        server = None
        url = args.redis_url
        try:
            if url is None:
                server = RedisServer(Path(tmp), free_loopback_port())
                server.start()
                url = server.url
            load_at_start = round(os.getloadavg()[0], 2)
            results = asyncio.run(run(args, url))
        finally:
            if server is not None:
                server.stop()
    result = {
        "benchmark": "estimator PredictWait (in process, no gRPC hop) over a Redis queue view",
        "command": "python -m loadgen.bench_estimator " + shlex.join(
            list(argv) if argv is not None else sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1m_at_start": load_at_start,
                    "host_note": "2 cores used by other work too; see the load average"},
        "workers": args.workers, **results,
    }
    emit(result, args.out, keys=RESULT_KEYS)


if __name__ == "__main__":
    main()
