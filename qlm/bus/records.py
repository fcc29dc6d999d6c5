"""The records qlm writes to Kafka: one schema per topic, JSON on the wire, versioned.

Every record is a JSON object with ``"v": 1`` (the schema version) and the fields of
its model below; docs/kafka.md lists them all. Decoding is strict: a wrong type, a
missing field or an unknown field raises :class:`InvalidInput` naming the field, and
the consumer sends the record to ``qlm.dlq``. A later incompatible schema gets
``"v": 2`` and its own model; a consumer names the versions it reads.

Times (``*_at``) are seconds since the Unix epoch on the writer's clock.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Final, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError, from_json, to_json

from qlm.core.errors import InvalidInput
from qlm.submission import ModelLimits, Submission, SubmissionLimits, parse_submission

SCHEMA_VERSION: Final = 1

Name = Annotated[str, Field(min_length=1, max_length=256)]
Timestamp = Annotated[float, Field(ge=0)]
Count = Annotated[int, Field(ge=0)]
Seconds = Annotated[float, Field(ge=0)]
SLOClassName = Literal["interactive", "batch-1", "batch-2", "custom"]


def _field_of(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "record"


def invalid_input_from(error: ValidationError) -> InvalidInput:
    """The first problem of a pydantic validation error as InvalidInput(field, problem)."""
    first = error.errors()[0]
    field, problem = _field_of(first["loc"]), str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "qlm_field":
        field, problem = str(first["ctx"]["field"]), str(first["ctx"]["problem"])
    elif first["type"] == "json_invalid":
        problem = f"not valid JSON ({problem.removeprefix('Invalid JSON: ')})"
    elif first["type"] == "model_type":
        problem = "must be a JSON object"
    elif first["loc"] == ("v",):
        problem = f"unsupported schema version {first.get('input')!r}; this reader knows 1"
    elif first["type"] == "extra_forbidden":
        problem = "unknown field"
    elif first["type"] == "missing":
        problem = "is required"
    return InvalidInput(field, problem)


class BusRecord(BaseModel):
    """Base of every record: frozen, strict types, unknown fields rejected, ``v`` first."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

    topic_name: ClassVar[str] = ""
    v: Literal[1] = SCHEMA_VERSION

    def to_json(self) -> bytes:
        """Compact JSON, UTF-8; fields that are None are left out."""
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str | None) -> Self:
        """Decode and validate; raises InvalidInput naming the first bad field.

        None (a Kafka record without a value) is invalid too.
        """
        if raw is None:
            raise InvalidInput("record", "has no value")
        try:
            return cls.model_validate_json(raw)
        except ValidationError as error:
            raise invalid_input_from(error) from None

    def key(self) -> bytes:
        """The Kafka record key: it picks the partition, and so the order records keep."""
        raise NotImplementedError


def _require(condition: bool, field: str, problem: str) -> None:
    """In a model validator: fail naming ``field`` (pydantic would name the whole record)."""
    if not condition:
        raise PydanticCustomError(
            "qlm_field", "{field} {problem}", {"field": field, "problem": problem}
        )


EventType = Literal[
    "admitted", "started", "first_token", "finished", "evicted", "cancelled", "failed",
    "swapped",
]
_EVENTS_ON_A_WORKER: Final = frozenset({"started", "first_token", "finished", "evicted"})
#: Event types about a worker, not a request: no request id, class or arrival.
WORKER_EVENT_TYPES: Final = frozenset({"swapped"})


class Event(BusRecord):
    """A request's life, or a worker's model swap, on ``qlm.events``; keyed by request id
    (worker events: by worker id).

    Request events (every type but ``swapped``) require ``request_id``, ``slo_class``
    and ``arrival_at``; ``worker`` is required for started / first_token / finished /
    evicted; ``reason`` for failed. ``predicted_wait_s`` accompanies admitted.

    ``swapped`` (a worker event) says that ``worker`` finished a model swap at ``at``:
    ``from_model`` (absent when no model was awake) went to sleep and ``model`` is now
    awake; ``duration_s`` is the wall time of the whole swap (requeueing its running
    requests, sleep and wake). It carries no request fields; ``reason`` says why.
    Readers that only follow requests skip it by its type (or its missing request id).
    """

    topic_name: ClassVar[str] = "qlm.events"
    type: EventType
    request_id: Name | None = None
    model: Name
    slo_class: SLOClassName | None = None
    at: Timestamp
    arrival_at: Timestamp | None = None
    tenant: Name | None = None
    worker: Name | None = None
    num_prompt_tokens: Count | None = None
    num_output_tokens: Count | None = None
    predicted_wait_s: Seconds | None = None
    reason: Annotated[str, Field(max_length=1024)] | None = None
    from_model: Name | None = None
    duration_s: Seconds | None = None

    @model_validator(mode="after")
    def _fields_of_its_type(self) -> Self:
        if self.type in WORKER_EVENT_TYPES:
            for name in ("request_id", "slo_class", "arrival_at"):
                _require(getattr(self, name) is None, name, f"must be absent in {self.type} "
                         "events")
            _require(self.worker is not None, "worker", f"is required for {self.type} events")
            _require(self.duration_s is not None, "duration_s",
                     f"is required for {self.type} events")
            return self
        for name in ("request_id", "slo_class", "arrival_at"):
            _require(getattr(self, name) is not None, name, "is required")
        for name in ("from_model", "duration_s"):
            _require(getattr(self, name) is None, name, "is only for swapped events")
        if self.type in _EVENTS_ON_A_WORKER:
            _require(self.worker is not None, "worker", f"is required for {self.type} events")
        if self.type == "failed":
            _require(bool(self.reason), "reason", "is required for failed events")
        return self

    @property
    def is_worker_event(self) -> bool:
        """Whether this event is about a worker (``swapped``), not a request."""
        return self.type in WORKER_EVENT_TYPES

    def key(self) -> bytes:
        return (self.request_id or self.worker or "").encode()


def admitted_event_json(
    *, request_id: str, model: str, slo_class: str, at: float, arrival_at: float,
    tenant: str | None, num_prompt_tokens: int, predicted_wait_s: float | None,
) -> bytes:
    """``Event(type="admitted", ...).to_json()``, byte for byte, without building the model.

    For the submit path, which announces every new request: the values come from a
    request the ingest plane has validated (non-empty names, non-negative times and
    counts), so :class:`Event`'s checks hold and are not repeated. The encoder is
    pydantic's own (same field order as Event, same number and string formatting).
    """
    fields: dict[str, Any] = {
        "v": SCHEMA_VERSION, "type": "admitted", "request_id": request_id, "model": model,
        "slo_class": slo_class, "at": float(at), "arrival_at": float(arrival_at),
    }
    if tenant is not None:
        fields["tenant"] = tenant
    fields["num_prompt_tokens"] = int(num_prompt_tokens)
    if predicted_wait_s is not None:
        fields["predicted_wait_s"] = float(predicted_wait_s)
    return to_json(fields)


LsoType = Literal["evict", "swap", "migrate", "cap"]


def lso_command_id(fence: int, seq: int) -> str:
    """The ``command_id`` of an LSO command: the issuing term's fencing token, then a
    sequence number (:attr:`LsoCommand.fence` reads it back)."""
    return f"{fence}-{seq}"


class LsoCommand(BusRecord):
    """A serving operation a worker must carry out, on ``qlm.lso``; keyed by the worker.

    - evict: preempt ``request_ids`` (running on ``worker``) and return them to the queue;
      ``keep_kv`` swaps their KV cache to CPU instead of dropping it.
    - swap: put the current model to sleep and wake ``to_model``.
    - migrate: move ``request_ids`` from ``worker`` to ``to_worker``.
    - cap: admit requests only while fewer than ``max_batch_size`` run (absent: the
      worker's own limit again; 0: none for now); the scheduler's ``BatchCap``.
    """

    topic_name: ClassVar[str] = "qlm.lso"
    type: LsoType
    command_id: Name
    worker: Name
    issued_at: Timestamp
    request_ids: tuple[Name, ...] = ()
    to_model: Name | None = None
    to_worker: Name | None = None
    keep_kv: bool = False
    reason: Annotated[str, Field(max_length=1024)] | None = None
    max_batch_size: Annotated[int, Field(ge=0)] | None = None

    @property
    def fence(self) -> int | None:
        """The fencing token of the scheduler term that issued this command (the
        ``<fence>-<seq>`` of its ``command_id``), or None when the id has no such form."""
        head, sep, seq = self.command_id.partition("-")
        if not sep or not head.isdigit() or not seq.isdigit() or len(head) > 18:
            return None
        return int(head)

    @model_validator(mode="after")
    def _fields_of_its_type(self) -> Self:
        if self.type in ("evict", "migrate"):
            _require(bool(self.request_ids), "request_ids", f"must not be empty for {self.type}")
        if self.type == "swap":
            _require(self.to_model is not None, "to_model", "is required for swap")
        if self.type != "cap":
            _require(self.max_batch_size is None, "max_batch_size", "is for cap only")
        if self.type == "migrate":
            _require(self.to_worker is not None, "to_worker", "is required for migrate")
            _require(self.to_worker != self.worker, "to_worker", "must differ from worker")
        return self

    def key(self) -> bytes:
        return self.worker.encode()


class Telemetry(BusRecord):
    """One worker's state after a step (or a window of steps), on ``qlm.telemetry``.

    The estimator compares ``step_time_observed_s`` with ``step_time_predicted_s``
    (from the performance profile) to correct its model online. ``num_steps = 0`` is
    a heartbeat of an idle worker (no step in the window; both step times are 0 and
    carry no information). ``models`` lists the models the worker holds (awake or
    asleep), when it says.
    """

    topic_name: ClassVar[str] = "qlm.telemetry"
    worker: Name
    gpu: Name
    at: Timestamp
    model: Name | None = None
    models: tuple[Name, ...] | None = None
    batch_size: Count
    num_waiting: Count = 0
    kv_used_fraction: Annotated[float, Field(ge=0, le=1)]
    num_context_tokens: Count | None = None
    batch_cap: Annotated[int, Field(ge=0)] | None = None
    step_time_predicted_s: Seconds
    step_time_observed_s: Seconds
    num_steps: Annotated[int, Field(ge=0)] = 1

    def key(self) -> bytes:
        return self.worker.encode()


class BatchResult(BusRecord):
    """The outcome of one batch request, on ``qlm.batch.results``; keyed by request id.

    ``error`` is required when ``status`` is failed.
    """

    topic_name: ClassVar[str] = "qlm.batch.results"
    request_id: Name
    model: Name
    status: Literal["finished", "failed", "cancelled"]
    at: Timestamp
    arrival_at: Timestamp | None = None
    first_token_at: Timestamp | None = None
    worker: Name | None = None
    num_prompt_tokens: Count | None = None
    num_output_tokens: Count = 0
    output_text: str | None = None
    output_token_ids: tuple[Count, ...] | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    slo_met: bool | None = None
    error: Annotated[str, Field(max_length=4096)] | None = None

    @model_validator(mode="after")
    def _error_when_failed(self) -> Self:
        if self.status == "failed":
            _require(bool(self.error), "error", "is required when status is failed")
        return self

    def key(self) -> bytes:
        return self.request_id.encode()


#: Most bytes of a poisoned record's value a dead letter carries: its base64 (4/3 larger)
#: plus the other fields stays far below the ~1 MiB a Kafka record may have by default.
DEAD_LETTER_MAX_VALUE_BYTES: Final = 384 * 1024
#: Most bytes of a poisoned record's key a dead letter carries.
DEAD_LETTER_MAX_KEY_BYTES: Final = 1024
MAX_FIELD_NAME_LEN: Final = 256


class DeadLetter(BusRecord):
    """A record a consumer could not use, on ``qlm.dlq``; keyed by its origin.

    ``value_b64`` / ``key_b64`` hold the original bytes (standard base64), exactly when
    ``truncated`` is absent; a record larger than :data:`DEAD_LETTER_MAX_VALUE_BYTES`
    (key: :data:`DEAD_LETTER_MAX_KEY_BYTES`) keeps only its first bytes, and
    ``value_size`` / ``value_sha256`` (always present) identify the whole of it, next to
    its origin ``topic`` / ``partition`` / ``offset``. ``field`` names the bad field when
    the record was invalid; a record that failed otherwise has ``reason`` starting with
    the exception's type.
    """

    topic_name: ClassVar[str] = "qlm.dlq"
    reason: Annotated[str, Field(min_length=1, max_length=4096)]
    field: Annotated[str, Field(max_length=MAX_FIELD_NAME_LEN)] | None = None
    topic: Name
    partition: Count
    offset: Count
    consumer_group: Name
    failed_at: Timestamp
    key_b64: str | None = None
    value_b64: str
    value_size: Count | None = None
    value_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    truncated: bool | None = None

    @classmethod
    def of(
        cls,
        error: BaseException,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        consumer_group: str,
        failed_at: float,
        max_value_bytes: int = DEAD_LETTER_MAX_VALUE_BYTES,
    ) -> DeadLetter:
        """The dead letter for a record that failed with ``error`` (any exception:
        InvalidInput gives its field; others their type and message)."""
        value = value or b""
        kept_key = None if key is None else key[:DEAD_LETTER_MAX_KEY_BYTES]
        kept_value = value[:max(0, max_value_bytes)]
        truncated = len(kept_value) < len(value) or (key is not None and len(kept_key or b"")
                                                    < len(key))
        if isinstance(error, InvalidInput):
            reason, field = str(error), error.field[:MAX_FIELD_NAME_LEN]
        else:
            reason, field = f"{type(error).__name__}: {_message_of(error)}", None
        return cls(
            reason=reason[:4096] or type(error).__name__,
            field=field,
            topic=topic,
            partition=partition,
            offset=offset,
            consumer_group=consumer_group,
            failed_at=failed_at,
            key_b64=None if kept_key is None else base64.b64encode(kept_key).decode(),
            value_b64=base64.b64encode(kept_value).decode(),
            value_size=len(value),
            value_sha256=hashlib.sha256(value).hexdigest(),
            truncated=True if truncated else None,
        )

    def original_value(self) -> bytes:
        """The bytes of the record as it was on its topic (its first bytes when
        ``truncated``)."""
        return base64.b64decode(self.value_b64)

    def key(self) -> bytes:
        return f"{self.topic}:{self.partition}:{self.offset}".encode()


def _message_of(error: BaseException) -> str:
    """``str(error)``, or a placeholder when even that fails (a poisoned __str__)."""
    try:
        return str(error)[:4000]
    except Exception:
        return "(message unavailable)"


# ------------------------------------------------------------ batch requests
def encode_batch_request(submission: Submission) -> bytes:
    """A ``qlm.batch.requests`` record: the submission's fields (``SubmitRequest``) plus ``v``."""
    return json.dumps({"v": SCHEMA_VERSION, **submission.to_record()}).encode()


def decode_batch_request(
    raw: bytes | None,
    models: Mapping[str, ModelLimits] | None,
    limits: SubmissionLimits | None = None,
) -> Submission:
    """Validate a ``qlm.batch.requests`` record into a Submission (``v`` may be left out).

    Raises InvalidInput naming the field: bad JSON, not an object, unsupported ``v``,
    or anything :func:`qlm.submission.parse_submission` rejects.
    """
    record = _json_object(raw)
    version = record.pop("v", SCHEMA_VERSION)
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise InvalidInput("v", f"unsupported schema version {version!r}; this reader knows 1")
    return parse_submission(record, models, limits or SubmissionLimits())


def loads_bounded(raw: bytes | str) -> Any:
    """Parse JSON from an untrusted source, bounded before anything else looks at it.

    pydantic-core's parser (the one every :class:`BusRecord` uses too) stops at a nesting
    depth of 200 and at integers beyond Python's digit limit with a ValueError, and it
    refuses NaN / Infinity here; ``json.loads`` would recurse until RecursionError on
    deep input. Any failure is InvalidInput naming ``record``.
    """
    try:
        return from_json(raw, allow_inf_nan=False)
    except ValueError as error:
        raise InvalidInput("record", f"not valid JSON ({_message_of(error)[:200]})") from None


def _json_object(raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        raise InvalidInput("record", "has no value")
    value = loads_bounded(raw)
    if not isinstance(value, dict):
        raise InvalidInput("record", "must be a JSON object")
    return value


#: Topic base name -> the record model that topic carries (batch requests: see above).
RECORD_TYPES: Final[Mapping[str, type[BusRecord]]] = {
    model.topic_name: model for model in (Event, LsoCommand, Telemetry, BatchResult, DeadLetter)
}
