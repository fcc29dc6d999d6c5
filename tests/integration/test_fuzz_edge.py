"""Fuzzing ingest on real Redis, Kafka and gRPC (hypothesis' inputs, a CI-sized number):
every Submit is answered OK or with a clean INVALID_ARGUMENT / FAILED_PRECONDITION, every
batch record is enqueued or dead-lettered, and ingest keeps serving. The same run over
10,000 of each is ``python -m loadgen.fuzz_edge`` (docs/results/fuzz_edge.json)."""

from __future__ import annotations

import pytest

from loadgen.fuzz_edge import MODEL, collect, fuzz_ingest, kafka_values, submit_messages
from qlm.submission import ModelLimits
from services.ingest.app import IngestApp
from services.ingest.settings import IngestSettings

pytestmark = [pytest.mark.redis, pytest.mark.kafka]

NUM = 60


async def test_fuzzed_submits_and_batch_records_never_crash_ingest(
    redis_url: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = IngestSettings.model_validate(dict(
        redis_url=redis_url, kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix,
        host="127.0.0.1", port=0, consumer_group=f"{topic_prefix}ingest",
        served_models_timeout_s=0.0, auth="off", serve_metrics=False, log_json=False,
        max_prompt_bytes=4096, shutdown_grace_s=1.0))
    app = IngestApp(settings, models={MODEL: ModelLimits(MODEL, 2048)})
    await app.start()
    try:
        result = await fuzz_ingest(app, kafka_bootstrap, collect(kafka_values, NUM, 11),
                                   collect(submit_messages(), NUM, 12), timeout_s=120)
    finally:
        await app.stop()
    assert result["grpc"]["crashes"] == 0, result
    assert sum(result["grpc"]["answers"].values()) == NUM
    assert result["grpc"]["answers"].get("INVALID_ARGUMENT", 0) > 0
    assert result["kafka"]["unaccounted"] == 0, result
    assert result["kafka"]["consumer_running"] and result["ingest_serving_after"]
