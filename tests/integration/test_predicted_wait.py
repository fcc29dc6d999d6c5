"""The predicted wait GetRequest returns, on the whole stack (real Redis, real Kafka, the
four services as processes, one simulated worker).

The worker's profile is mistral-7b@A100 with a batch of 4, so that a few requests queue.
A batch-2 group is queued first; its last request X gets a predicted first token from the
scheduler's forecasts (GetRequest, and the OpenAI front door's retrieve headers).
Interactive requests sent next are ordered ahead of the batch-2 group (earlier
deadlines): X's prediction must move later by about their work. Once X has run, its
last prediction before it started must be close to its realised wait.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from qlm.api.v1 import qlm_pb2 as pb
from qlm.client import QlmClient
from qlm.core.errors import NotServed
from qlm.core.perf import PROFILE_DIR
from qlm.localstack.services import ServiceStack
from tests.integration.stack_helpers import running_stack

pytestmark = [pytest.mark.redis, pytest.mark.kafka, pytest.mark.slow]

MODEL = "mistral-7b"
GPU = "A100-80GB"
BATCH = 4
TIME_SCALE = 2.0
OUTPUT_TOKENS = 300
NUM_BATCH = 32
NUM_INTERACTIVE = 8


@pytest.fixture
def services(tmp_path: Path, redis_url: str, kafka_bootstrap: str,
             topic_prefix: str) -> Iterator[ServiceStack]:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    data = json.loads((PROFILE_DIR / f"{MODEL}@{GPU}.json").read_text())
    data["max_batch_size"] = BATCH
    (profiles / f"{MODEL}@{GPU}.json").write_text(json.dumps(data))
    workers = f"workers:\n  - {{id: p-0, gpu: {GPU}, models: [{MODEL}]}}\n"
    with running_stack(tmp_path, redis_url, kafka_bootstrap, workers, profiles_source=profiles,
                       policy="qlm", time_scale=TIME_SCALE, admission="interactive=queue",
                       group_window_s=0.5, tick_s=0.25, topic_prefix=topic_prefix) as stack:
        yield stack


def request(request_id: str, slo_class: str) -> dict[str, Any]:
    return {"request_id": request_id, "model": MODEL, "prompt_token_ids": list(range(1, 60)),
            "max_tokens": OUTPUT_TOKENS, "slo_class": slo_class,
            "sampling": {"ignore_eos": True}}


async def predicted(client: QlmClient, request_id: str, timeout_s: float,
                    later_than: float = 0.0) -> pb.RequestInfo:
    """GetRequest until its predicted first token is set, later than ``later_than``, and
    made at a decision after the request arrived (a request that joins a group is first
    shown the group's forecast from the decision before it; the scheduler decides again
    right after its admission)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = await client.get(request_id)
        if (info.predicted_first_token_at > later_than
                and info.predicted_at >= info.arrival_at) or time.monotonic() > deadline:
            return info
        await asyncio.sleep(0.1)


async def submit(client: QlmClient, record: dict[str, Any], timeout_s: float = 60.0) -> None:
    """Submit, retrying while ingest hears of no live worker for the model yet (the
    worker's first telemetry can come after ingest's start-up grace on a busy machine)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await client.submit(record)
            return
        except NotServed:
            assert time.monotonic() < deadline, "no worker reported serving the model"
            await asyncio.sleep(0.25)


async def test_get_request_prediction_moves_on_a_reorder_and_tracks_the_realised_wait(
    services: ServiceStack,
) -> None:
    front_door = openai.OpenAI(base_url=services.openai_base_url, api_key="unused",
                               max_retries=0, timeout=30)
    async with QlmClient(services.ingest_addr) as client:
        for i in range(NUM_BATCH):
            await submit(client, request(f"b{i:02d}", "batch-2"))
        last = f"b{NUM_BATCH - 1:02d}"
        before = await predicted(client, last, 20.0)
        assert before.state == pb.REQUEST_STATE_QUEUED, (before, time.time())
        assert before.predicted_first_token_at > before.arrival_at
        assert before.predicted_wait_s == pytest.approx(
            before.predicted_first_token_at - before.arrival_at)
        assert before.predicted_at >= before.arrival_at
        queued = front_door.chat.completions.with_raw_response.retrieve(f"chatcmpl-{last}")
        assert float(queued.headers["x-qlm-predicted-wait-s"]) > 0
        assert float(queued.headers["x-qlm-predicted-first-token-at"]) > before.arrival_at

        # one wave of BATCH requests at the profile's step time, in wall seconds
        for i in range(NUM_INTERACTIVE):
            await submit(client, request(f"i{i:02d}", "interactive"))
        wave_s = OUTPUT_TOKENS * 0.0095 / TIME_SCALE
        interactive_s = NUM_INTERACTIVE / BATCH * wave_s
        after = await predicted(client, last, 20.0,
                                later_than=before.predicted_first_token_at + interactive_s / 2)
        assert after.predicted_at > before.predicted_at
        assert after.predicted_first_token_at > (before.predicted_first_token_at
                                                 + interactive_s / 2), (before, after)

        deadline = time.monotonic() + 90.0
        while (info := await client.get(last)).first_token_at == 0:
            assert time.monotonic() < deadline, "the last batch request never started"
            await asyncio.sleep(0.2)
        first_i = await client.get("i00")
        info = await client.get(last)
    done = front_door.chat.completions.with_raw_response.retrieve(f"chatcmpl-{last}")
    assert float(done.headers["x-qlm-predicted-first-token-at"]) == pytest.approx(
        info.predicted_first_token_at, abs=1e-3)  # the last forecast before it started
    assert "x-qlm-predicted-wait-s" not in done.headers
    realised = info.first_token_at - info.arrival_at
    predicted_wait = info.predicted_first_token_at - info.arrival_at
    assert info.predicted_at < info.first_token_at
    # its last prediction before it started, within a quarter of the wait (+ 1 s of stack
    # overheads: pulls, Kafka, the scheduler's tick)
    assert abs(predicted_wait - realised) <= 0.25 * realised + 1.0, (predicted_wait, realised)
    assert first_i.first_token_at < info.first_token_at  # interactive went first
