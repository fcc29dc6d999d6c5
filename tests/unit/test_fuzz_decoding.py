"""Fuzzing the edge without servers (hypothesis): any Kafka batch record decodes into a
submission or fails with InvalidInput naming a field, whose dead letter fits a Kafka
record; any Submit message parses or is refused the same way. Nothing else is raised.

The same strategies drive the real-server test (tests/integration/test_fuzz_edge.py) and
the benchmark over 10,000 of each (``python -m loadgen.fuzz_edge``).
"""

from __future__ import annotations

from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings

from loadgen.fuzz_edge import MODEL, kafka_values, submit_messages
from qlm.api.v1 import qlm_pb2 as pb
from qlm.bus.records import DeadLetter, decode_batch_request
from qlm.core.errors import InvalidInput
from qlm.submission import ModelLimits, SubmissionLimits, parse_submission
from services.ingest import messages

MODELS = {MODEL: ModelLimits(MODEL, 2048)}
LIMITS = SubmissionLimits(max_prompt_bytes=4096)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(kafka_values)
def test_any_kafka_record_is_a_submission_or_a_clean_dead_letter(raw: bytes | None) -> None:
    try:
        submission = decode_batch_request(raw, MODELS, LIMITS)
    except InvalidInput as error:
        assert error.field and error.problem
        letter = DeadLetter.of(error, "qlm.batch.requests", 3, 17, b"key", raw, "ingest", 1.0)
        encoded = letter.to_json()
        assert len(encoded) < 1024 * 1024
        assert DeadLetter.from_json(encoded).field == error.field[:256]
    else:
        assert submission.model == MODEL and 0 < submission.max_tokens < 2**31


@FUZZ
@given(submit_messages())
def test_any_submit_message_is_a_submission_or_invalid_argument(data: bytes) -> None:
    try:
        message = pb.SubmitRequest.FromString(data)
    except DecodeError:
        return  # the error interceptor answers INVALID_ARGUMENT naming "request"
    try:
        submission = parse_submission(messages.submit_record(message), MODELS, LIMITS)
    except InvalidInput as error:
        assert error.field and error.problem
    else:
        assert 0 < submission.max_tokens < 2**31
        assert all(0 <= t < 2**31 for t in submission.prompt_token_ids or ())
