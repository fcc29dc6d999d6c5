"""Outages of Redis: ingest (a real ``python -m services.ingest`` process with its gRPC front
door and its Kafka batch consumer) rides one out and serves again without a restart.

While Redis is down, Submit answers UNAVAILABLE and batch records wait on Kafka (the one in
hand is retried, uncommitted); once Redis is back, the same process takes submits again
and every batch record lands exactly once. The outage lasts ``QLM_TEST_OUTAGE_S`` seconds
(default 35: longer than the ~30 s that used to end ingest, short enough for CI); the
documented long run is

    QLM_TEST_OUTAGE_S=120 QLM_OUTAGE_RESULT=docs/results/outage_redis_120s.json \\
        python -m pytest -q -m slow tests/integration/test_outage.py

which also writes what it saw to the JSON file.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadgen.results import write_json
from qlm.bus.producer import BusProducer
from qlm.client import QlmClient
from qlm.core.errors import Unavailable
from qlm.localstack import RedisServer
from qlm.localstack.process import free_loopback_port
from qlm.store.keys import Keys

pytestmark = [pytest.mark.redis, pytest.mark.kafka, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
OUTAGE_S = float(os.environ.get("QLM_TEST_OUTAGE_S", "35"))
KEYS = Keys()
#: The top-level keys this test writes into its result JSON (loadgen.results).
RESULT_KEYS = frozenset({
    "command", "redis_down_s", "submits_answered_unavailable", "submits_accepted_while_down",
    "first_submit_ok_after_redis_back_s", "batch_records", "all_batch_records_landed_after_s",
    "requests_queued", "ingest_pid_unchanged",
})


def record(request_id: str) -> dict[str, object]:
    return {"request_id": request_id, "model": "m7b", "prompt": "Tell me a story.",
            "max_tokens": 8, "slo_class": "batch-2"}


async def test_ingest_rides_out_a_redis_outage_and_serves_again_without_a_restart(
    redis_server: RedisServer, redis_url: str, kafka_bootstrap: str, topic_prefix: str,
    tmp_path: Path,
) -> None:
    models_file = tmp_path / "models.json"
    models_file.write_text(json.dumps({"models": [{"name": "m7b", "max_model_len": 2048}]}))
    port = free_loopback_port()
    log_path = tmp_path / "ingest.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.ingest", "--host", "127.0.0.1", "--port", str(port),
             "--redis-url", redis_url, "--kafka-bootstrap", kafka_bootstrap,
             "--topic-prefix", topic_prefix, "--consumer-group", f"{topic_prefix}ingest",
             "--models-file", str(models_file), "--served-models-timeout-s", "0", "--auth", "off",
             "--metrics-port", "0", "--shutdown-grace-s", "2"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log_file, stderr=subprocess.STDOUT,
        )
    raw = aioredis.Redis.from_url(redis_url)
    batch_ids: list[str] = []
    num_unavailable = num_submitted_during = 0
    try:
        target = f"127.0.0.1:{port}"
        async with grpc.aio.insecure_channel(target) as channel:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=60, wait_for_ready=True)
        async with QlmClient(target, timeout_s=20) as client, \
                BusProducer(kafka_bootstrap) as producer:
            assert (await client.submit(record("before"))).request_id == "before"
            topic = f"{topic_prefix}qlm.batch.requests"

            async def batch(request_id: str) -> None:
                await producer.publish_raw(topic, json.dumps(record(request_id)).encode(),
                                           request_id.encode())
                batch_ids.append(request_id)

            await batch("batch-before")
            await asyncio.to_thread(redis_server.stop)
            outage_started = time.monotonic()
            i = 0
            while time.monotonic() - outage_started < OUTAGE_S:
                await batch(f"batch-during-{i}")
                try:
                    await client.submit(record(f"during-{i}"))
                    num_submitted_during += 1
                except Unavailable:
                    num_unavailable += 1
                i += 1
                await asyncio.sleep(1.0)
            assert process.poll() is None, "ingest exited during the outage"
            await asyncio.to_thread(redis_server.start)
            outage_ended = time.monotonic()

            recovered_at = None
            while recovered_at is None:
                assert time.monotonic() - outage_ended < 120, "ingest never served again"
                try:
                    await client.submit(record("after"))
                    recovered_at = time.monotonic()
                except Unavailable:
                    await asyncio.sleep(0.5)
            await batch("batch-after")
            missing = list(batch_ids)
            while missing:
                assert time.monotonic() - outage_ended < 120, f"never landed: {missing[:5]}"
                missing = [r for r in missing if not await raw.exists(KEYS.request(r))]
                await asyncio.sleep(0.5)
            landed_at = time.monotonic()
        assert process.poll() is None, "ingest restarted or exited"
        assert num_unavailable > 0 and num_submitted_during == 0
        num_queued = 0
        async for key in raw.scan_iter(match=KEYS.group("*"), count=1000):
            num_queued += await raw.zcard(key)
        # every record once: "before", "after" and the batch records, nothing twice
        assert num_queued == len(batch_ids) + 2
        result_path = os.environ.get("QLM_OUTAGE_RESULT")
        if result_path:
            write_json(Path(result_path), {
                "command": f"QLM_TEST_OUTAGE_S={OUTAGE_S:g} QLM_OUTAGE_RESULT={result_path} "
                           "python -m pytest -q -m slow tests/integration/test_outage.py",
                "redis_down_s": round(outage_ended - outage_started, 1),
                "submits_answered_unavailable": num_unavailable,
                "submits_accepted_while_down": num_submitted_during,
                "first_submit_ok_after_redis_back_s": round(recovered_at - outage_ended, 2),
                "batch_records": len(batch_ids),
                "all_batch_records_landed_after_s": round(landed_at - outage_ended, 2),
                "requests_queued": num_queued, "ingest_pid_unchanged": True,
            }, RESULT_KEYS)
    finally:
        await raw.aclose()
        if not redis_server.is_running():
            redis_server.start()
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            process.kill()
