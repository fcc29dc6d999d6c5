"""A Submit with ``tpot_slo_s`` on the real stack (the four services as processes, real
Redis, real Kafka, a simulated worker): the scheduler caps the batch of the worker that
serves it, the worker reports the cap in force on ``qlm.telemetry``, and the cap is lifted
once no request with a target is left."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from qlm.bus.topics import TopicNames
from qlm.client import NotServed, QlmClient
from qlm.core.perf import ProfileBook
from qlm.core.policies.planning import TPOT_HEADROOM
from qlm.core.policies.qlm.options import QlmOptions
from qlm.localstack.services import ServiceStack
from qlm.sim.batching import tpot_batch_cap
from tests.integration.stack_helpers import running_stack

pytestmark = [pytest.mark.redis, pytest.mark.kafka, pytest.mark.slow]

MODEL, GPU, WORKER = "mistral-7b", "A100-80GB", "tpot-0"
PROMPT_TOKENS, MAX_TOKENS, TPOT_S = 40, 1500, 0.02


@pytest.fixture
def services(tmp_path: Path, redis_url: str, kafka_bootstrap: str,
             topic_prefix: str) -> Iterator[ServiceStack]:
    workers = f"workers:\n  - {{id: {WORKER}, gpu: {GPU}, models: [{MODEL}]}}\n"
    with running_stack(tmp_path, redis_url, kafka_bootstrap, workers, policy="qlm",
                       time_scale=1.0, admission="interactive=queue", group_window_s=0.2,
                       tick_s=0.25, topic_prefix=topic_prefix) as stack:
        yield stack


class Telemetry:
    """Every record of the test's ``qlm.telemetry`` topic."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                         auto_offset_reset="earliest")
        self.records: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def _follow(self) -> None:
        async for record in self.consumer:
            self.records.append(json.loads(record.value))

    async def __aenter__(self) -> Telemetry:
        await self.consumer.start()
        self._task = asyncio.create_task(self._follow())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.consumer.stop()

    def caps(self) -> list[int | None]:
        return [r.get("batch_cap") for r in self.records if r["worker"] == WORKER]


async def eventually(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


@pytest.fixture
async def telemetry(services: ServiceStack, kafka_bootstrap: str,
                    topic_prefix: str) -> AsyncIterator[Telemetry]:
    async with Telemetry(kafka_bootstrap, TopicNames(topic_prefix).telemetry) as log:
        yield log


async def test_a_request_with_a_tpot_target_runs_on_a_worker_with_its_batch_cap(
    services: ServiceStack, telemetry: Telemetry,
) -> None:
    profile = ProfileBook.load().get(MODEL, GPU)
    mean_output = QlmOptions().output_stats["*"].mean
    expected = tpot_batch_cap(profile, TPOT_HEADROOM * TPOT_S, PROMPT_TOKENS, mean_output)
    assert 0 < expected < profile.max_batch_size  # the target binds on this GPU

    # the worker is up once it reports (ingest learns the served models from telemetry)
    await eventually(lambda: bool(telemetry.caps()), 60, "the worker's first telemetry")
    assert telemetry.caps()[-1] is None  # no cap before any request with a target
    async with QlmClient(services.ingest_addr) as client:
        deadline = time.monotonic() + 30
        while True:
            try:
                await client.submit({
                    "request_id": "tpot-1", "model": MODEL, "slo_class": "interactive",
                    "prompt_token_ids": list(range(1, PROMPT_TOKENS + 1)),
                    "max_tokens": MAX_TOKENS, "tpot_slo_s": TPOT_S,
                    "sampling": {"ignore_eos": True},
                })
                break
            except NotServed:  # ingest has not yet heard the worker's telemetry
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        await eventually(lambda: expected in telemetry.caps(), 60,
                         f"the worker to report batch cap {expected}: {telemetry.caps()} "
                         f"({len(telemetry.records)} telemetry records)")
        num_tokens = 0
        async for chunk in client.stream_tokens("tpot-1"):
            num_tokens += len(chunk.token_ids)
        assert num_tokens == MAX_TOKENS
        info = await client.get("tpot-1")
        assert info.worker_id == WORKER
    # no request with a target left: the cap is lifted (telemetry without one)
    seen = len(telemetry.caps())
    await eventually(lambda: None in telemetry.caps()[seen:], 30,
                     f"the cap to be lifted: {telemetry.caps()}")
