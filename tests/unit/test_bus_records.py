"""Kafka record schemas: JSON round trips, versioning, and errors that name the field."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from qlm.bus.records import (
    RECORD_TYPES,
    BatchResult,
    BusRecord,
    DeadLetter,
    Event,
    LsoCommand,
    Telemetry,
    decode_batch_request,
    encode_batch_request,
)
from qlm.bus.topics import TopicLayout, TopicNames, topic_specs
from qlm.core.errors import InvalidInput
from qlm.submission import ModelLimits, parse_submission

EXAMPLES: list[BusRecord] = [
    Event(type="admitted", request_id="r1", model="m", slo_class="batch-1", at=2.0,
          arrival_at=1.0, predicted_wait_s=3.5, tenant="t"),
    Event(type="failed", request_id="r1", model="m", slo_class="interactive", at=2.0,
          arrival_at=1.0, reason="worker lost"),
    LsoCommand(type="evict", command_id="c1", worker="w0", issued_at=1.0,
               request_ids=("r1", "r2"), keep_kv=True),
    LsoCommand(type="swap", command_id="c2", worker="w0", issued_at=1.0, to_model="m2"),
    LsoCommand(type="migrate", command_id="c3", worker="w0", issued_at=1.0,
               request_ids=("r1",), to_worker="w1"),
    LsoCommand(type="cap", command_id="c4", worker="w0", issued_at=1.0, max_batch_size=40),
    LsoCommand(type="cap", command_id="c5", worker="w0", issued_at=1.0),
    Telemetry(worker="w0", gpu="H100", at=1.0, batch_size=8, kv_used_fraction=0.5,
              step_time_predicted_s=0.02, step_time_observed_s=0.025),
    Telemetry(worker="w0", gpu="H100", at=1.0, batch_size=8, kv_used_fraction=0.5,
              batch_cap=40, step_time_predicted_s=0.02, step_time_observed_s=0.025),
    BatchResult(request_id="r1", model="m", status="finished", at=9.0, num_output_tokens=3,
                output_token_ids=(1, 2, 3), finish_reason="length", slo_met=True),
    DeadLetter(reason="x: bad", field="x", topic="qlm.events", partition=0, offset=7,
               consumer_group="g", failed_at=1.0, value_b64="AAE="),
]  # fmt: skip


@pytest.mark.parametrize("record", EXAMPLES, ids=lambda r: type(r).__name__)
def test_every_record_round_trips_through_json_with_its_version(record: BusRecord) -> None:
    raw = record.to_json()
    assert json.loads(raw)["v"] == 1
    assert type(record).from_json(raw) == record
    assert record.key()


def test_every_topic_but_batch_requests_has_a_record_type() -> None:
    names = {spec.name for spec in topic_specs(TopicNames())}
    assert set(RECORD_TYPES) == names - {"qlm.batch.requests"}


@pytest.mark.parametrize(("replicas", "min_isr"), [(1, 1), (2, 1), (3, 2), (4, 3), (5, 3)])
def test_min_insync_replicas_defaults_to_a_majority_from_three_replicas(
    replicas: int, min_isr: int
) -> None:
    specs = topic_specs(TopicNames(), TopicLayout(replication_factor=replicas))
    assert {spec.replication_factor for spec in specs} == {replicas}
    assert {spec.configs["min.insync.replicas"] for spec in specs} == {str(min_isr)}


def test_topic_layout_overrides_partitions_of_the_named_topics_only() -> None:
    default = {s.name: s.num_partitions for s in topic_specs(TopicNames("p."))}
    layout = TopicLayout(partitions={"qlm.batch.requests": 12}, min_insync_replicas=1,
                         replication_factor=3)  # fmt: skip
    changed = {s.name: s.num_partitions for s in topic_specs(TopicNames("p."), layout)}
    assert changed == {**default, "p.qlm.batch.requests": 12}
    assert {s.configs["min.insync.replicas"] for s in topic_specs(None, layout)} == {"1"}


@pytest.mark.parametrize(
    ("layout", "field"),
    [
        ({"replication_factor": 0}, "replication_factor"),
        ({"partitions": {"qlm.nope": 2}}, "partitions"),
        ({"partitions": {"qlm.events": 0}}, "partitions"),
        ({"replication_factor": 2, "min_insync_replicas": 3}, "min_insync_replicas"),
        ({"min_insync_replicas": 0}, "min_insync_replicas"),
    ],
)
def test_a_bad_topic_layout_names_the_field(layout: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as error:
        TopicLayout(**layout)
    assert error.value.field == field


def _event(**changes: Any) -> bytes:
    fields = {"v": 1, "type": "admitted", "request_id": "r", "model": "m",
              "slo_class": "batch-1", "at": 1, "arrival_at": 1}  # fmt: skip
    fields.update(changes)
    return json.dumps({k: v for k, v in fields.items() if v is not None}).encode()


@pytest.mark.parametrize(
    ("raw", "field", "problem"),
    [
        (b"{oops", "record", "not valid JSON"),
        (b"\xff\xfe", "record", "not valid JSON"),
        (b"[1, 2]", "record", "must be a JSON object"),
        (_event(v=2), "v", "unsupported schema version 2"),
        (_event(model=None), "model", "is required"),
        (_event(at="soon"), "at", "valid number"),
        (_event(at=-1), "at", "greater than or equal to 0"),
        (_event(request_id=""), "request_id", "at least 1 character"),
        (_event(slo_class="gold"), "slo_class", "'interactive'"),
        (_event(type="started"), "worker", "is required for started events"),
        (_event(colour="red"), "colour", "unknown field"),
    ],
)
def test_bad_event_names_the_field(raw: bytes, field: str, problem: str) -> None:
    with pytest.raises(InvalidInput) as error:
        Event.from_json(raw)
    assert error.value.field == field
    assert problem in error.value.problem


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"type": "evict"}, "request_ids"),
        ({"type": "swap"}, "to_model"),
        ({"type": "migrate", "request_ids": ["r"]}, "to_worker"),
        ({"type": "migrate", "request_ids": ["r"], "to_worker": "w0"}, "to_worker"),
        ({"type": "drain"}, "type"),
        ({"type": "cap", "max_batch_size": -1}, "max_batch_size"),
        ({"type": "swap", "to_model": "m", "max_batch_size": 4}, "max_batch_size"),
    ],
)
def test_lso_command_needs_the_fields_of_its_type(fields: dict[str, Any], field: str) -> None:
    raw = json.dumps({"command_id": "c", "worker": "w0", "issued_at": 1, **fields})
    with pytest.raises(InvalidInput) as error:
        LsoCommand.from_json(raw)
    assert error.value.field == field


def test_telemetry_kv_fraction_is_bounded() -> None:
    raw = Telemetry(worker="w", gpu="g", at=1, batch_size=1, kv_used_fraction=1.0,
                    step_time_predicted_s=1, step_time_observed_s=1).to_json()  # fmt: skip
    with pytest.raises(InvalidInput) as error:
        Telemetry.from_json(raw.replace(b'"kv_used_fraction":1.0', b'"kv_used_fraction":1.5'))
    assert error.value.field == "kv_used_fraction"


def test_failed_batch_result_needs_an_error() -> None:
    with pytest.raises(InvalidInput) as error:
        BatchResult.from_json(b'{"request_id":"r","model":"m","status":"failed","at":1}')
    assert error.value.field == "error"


def test_dead_letter_keeps_the_original_bytes() -> None:
    original = b"\x00\xffnot json"
    letter = DeadLetter.of(InvalidInput("record", "not valid JSON"), "qlm.batch.requests",
                           2, 41, b"key", original, "ingest", 5.0)  # fmt: skip
    decoded = DeadLetter.from_json(letter.to_json())
    assert decoded.original_value() == original
    assert base64.b64decode(decoded.key_b64 or "") == b"key"
    assert (decoded.field, decoded.reason) == ("record", "record: not valid JSON")
    assert decoded.key() == b"qlm.batch.requests:2:41"


MODELS = {"m": ModelLimits("m", max_model_len=100)}


def test_batch_request_round_trips_and_version_is_optional() -> None:
    submission = parse_submission(
        {"request_id": "r1", "model": "m", "prompt": "hi", "max_tokens": 5,
         "slo_class": "batch-2"}, MODELS)  # fmt: skip
    raw = encode_batch_request(submission)
    assert json.loads(raw)["v"] == 1
    assert decode_batch_request(raw, MODELS) == submission
    without_version = json.dumps(submission.to_record()).encode()
    assert decode_batch_request(without_version, MODELS) == submission


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (None, "record"),
        (b"not json", "record"),
        (b'"a string"', "record"),
        (b'{"v": 3, "model": "m", "prompt": "x", "max_tokens": 1}', "v"),
        (b'{"v": true, "model": "m", "prompt": "x", "max_tokens": 1}', "v"),
        (b'{"model": "nope", "prompt": "x", "max_tokens": 1}', "model"),
        (b'{"model": "m", "prompt": "", "max_tokens": 1}', "prompt"),
        (b'{"model": "m", "prompt": "x", "max_tokens": 0}', "max_tokens"),
    ],
)
def test_bad_batch_request_names_the_field(raw: bytes | None, field: str) -> None:
    with pytest.raises(InvalidInput) as error:
        decode_batch_request(raw, MODELS)
    assert error.value.field == field


def test_topic_names_take_a_prefix_and_reject_bad_ones() -> None:
    assert TopicNames("t1.").dlq == "t1.qlm.dlq"
    assert len(set(TopicNames().all())) == 6
    with pytest.raises(InvalidInput):
        TopicNames("has space")
