"""The ingest data plane: validate a submission, write it through the store, announce it.

Transport-free: the gRPC servicer (``services/ingest``) and the Kafka batch consumer
both call :class:`IngestPlane`; neither validates nor touches Redis or Kafka itself.

Contracts:

* :meth:`IngestPlane.submit` validates with :func:`qlm.submission.parse_submission`
  (InvalidInput names the field; nothing is written), then enqueues with one store
  call (one Lua script: record + group entry, idempotent by id). Only a *new* request
  is announced with an ``admitted`` event on ``qlm.events``; a repeat of a known id
  with the same content answers from the stored record and announces nothing; a repeat
  with different content is InvalidInput (IdempotencyConflict) naming the field.
* The event is published after the enqueue is durable in Redis. Events are hints (the
  scheduler also ticks), so a failed publish is logged and does not fail the submit.
* Time comes from the injected ``clock`` (Unix seconds in the services).
* Admission control (:class:`AdmissionRules`, gRPC and HTTP submits only): when the predictor says
  a new request cannot meet its SLO even at the best place (``Prediction.admit`` is
  False) and the rules say ``reject`` for its class, :meth:`IngestPlane.submit` raises
  :class:`~qlm.core.errors.Overloaded` (gRPC RESOURCE_EXHAUSTED with the predicted wait
  and a retry-after) and writes nothing; a repeat of an id already queued is never
  refused. Records from Kafka are always queued.
* Every submit (gRPC :meth:`IngestPlane.submit`, Kafka :meth:`IngestPlane.enqueue` and
  :meth:`IngestPlane.decode_batch_record`) is reported once to the plane's
  :class:`SubmitObserver` (metrics) with its :data:`SubmitResult`, class, model, where it
  came from and how long the plane took.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import yaml

from qlm.bus.records import decode_batch_request
from qlm.core.errors import InvalidInput, NotFound, Overloaded
from qlm.core.fit import SequenceLimit
from qlm.core.perf import PROFILE_DIR, ProfileBook
from qlm.core.types import Request, RequestState, SLOClass
from qlm.log import get_logger, request_context
from qlm.store.records import RequestRecord
from qlm.store.store import EnqueueResult, RedisQueueStore
from qlm.submission import ModelLimits, Submission, SubmissionLimits, parse_submission
from qlm.tenants import client_id, scoped_id
from services.ingest.served import ServedModels

log = get_logger("services.ingest.plane")

#: z-score of the 90th percentile of a Normal distribution.
Z_P90 = 1.2815515655446004


# ------------------------------------------------------------------ values
@dataclass(frozen=True, slots=True)
class Prediction:
    """Predicted wait of a request until it starts: Normal(mean, std), and P(meet SLO)."""

    wait_mean_s: float = 0.0
    wait_std_s: float = 0.0
    p_meet_slo: float = 1.0
    admit: bool = True
    retry_after_s: float = 0.0
    #: False when no prediction could be made (estimator unreachable): the numbers above
    #: are placeholders and are not announced.
    known: bool = True

    @property
    def wait_p90_s(self) -> float:
        return self.wait_mean_s + Z_P90 * self.wait_std_s


@dataclass(frozen=True, slots=True)
class SubmitOutcome:
    request_id: str
    state: RequestState
    deadline_at: float
    duplicate: bool
    prediction: Prediction
    #: What was queued (validated): its prompt size, class and SLO for a transport's reply.
    submission: Submission | None = None


@dataclass(frozen=True, slots=True)
class CancelOutcome:
    request_id: str
    state: RequestState
    cancelled: bool


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """Output tokens from ``index`` on; the last chunk of a stream has ``final_state``."""

    index: int
    token_ids: tuple[int, ...] = ()
    text: str = ""
    final_state: RequestState | None = None
    finish_reason: str = ""
    error: str = ""
    num_generated: int = 0


# ------------------------------------------------------------------ collaborators
class EventPublisher(Protocol):
    """Announces queue changes on ``qlm.events`` (qlm.bus)."""

    async def admitted(self, record: RequestRecord, prediction: Prediction) -> None: ...


#: How a submit ended, named once (the metrics label): queued as new; answered from the
#: stored record (same id, same content); refused as invalid input (nothing written);
#: refused because its SLO cannot be met (admission control); failed (Redis away).
SubmitResult = Literal["admitted", "duplicate", "rejected-invalid", "rejected-capacity",
                       "failed"]
SubmitSource = Literal["grpc", "kafka", "http"]
#: Class / model label of a submission refused before its class or model was known.
UNKNOWN: Final = "unknown"


class SubmitObserver(Protocol):
    """Sees every submit once, when it ends (metrics)."""

    def on_submit(self, source: SubmitSource, result: SubmitResult, slo_class: str,
                  model: str, seconds: float, prediction: Prediction | None) -> None: ...


class NoObserver:
    def on_submit(self, source: SubmitSource, result: SubmitResult, slo_class: str,
                  model: str, seconds: float, prediction: Prediction | None) -> None:
        return None


class QuotaCheck(Protocol):
    """Books a tenant's submission against its quotas, or raises Overloaded."""

    async def admit(self, tenant: str, stored_id: str, tokens: int) -> None: ...


class WaitPredictor(Protocol):
    """Predicts the wait of a new request (the RWT estimator, in process or remote)."""

    async def predict(self, request: Request, now: float) -> Prediction: ...


class NoQueueModel:
    """Predicts no wait; used when no estimator is configured."""

    async def predict(self, request: Request, now: float) -> Prediction:
        return Prediction()


@dataclass(frozen=True, slots=True)
class AdmissionRules:
    """Per class: ``reject`` a request the predictor does not admit, or ``queue`` it anyway.

    Batch classes are always queued (the predictor admits them too).
    """

    rejecting: frozenset[SLOClass] = frozenset({SLOClass.INTERACTIVE})

    def rejects(self, slo_class: SLOClass) -> bool:
        return slo_class in self.rejecting

    @classmethod
    def parse(cls, text: str) -> AdmissionRules:
        """From ``"interactive=reject,batch-1=queue"``; classes not named keep the default
        (interactive rejects, the others queue). InvalidInput names the bad entry."""
        rejecting = set(cls().rejecting)
        for entry in filter(None, (part.strip() for part in text.split(","))):
            name, _, action = entry.partition("=")
            try:
                slo_class = SLOClass(name.strip())
            except ValueError:
                raise InvalidInput("admission", f"unknown class {name.strip()!r}") from None
            match action.strip():
                case "reject" if slo_class not in (SLOClass.BATCH_1, SLOClass.BATCH_2):
                    rejecting.add(slo_class)
                case "reject":
                    raise InvalidInput("admission", f"{slo_class.value}: batch classes are "
                                       "always queued")
                case "queue":
                    rejecting.discard(slo_class)
                case other:
                    raise InvalidInput("admission", f"{entry!r}: expected reject or queue, "
                                       f"got {other!r}")
        return cls(frozenset(rejecting))


# ------------------------------------------------------------------ catalogue
def load_models(models_file: Path | None = None, profiles_dir: Path | None = None) -> dict[
    str, ModelLimits
]:
    """Served models: from ``models_file`` (YAML/JSON ``{"models": [{name, max_model_len}]}``)
    when given, else every model with a performance profile: its GPUs, each with the
    profile's max_model_len and KV cache (a request is refused when it fits none of the
    GPUs serving it), and max_model_len = the largest over its GPUs."""
    if models_file is not None:
        return _models_from_file(models_file)
    book = ProfileBook.load(profiles_dir or PROFILE_DIR)
    per_model: dict[str, list[tuple[str, SequenceLimit]]] = {}
    for (model, gpu), profile in sorted(book.profiles.items()):
        per_model.setdefault(model, []).append((gpu, SequenceLimit.of(profile)))
    return {
        model: ModelLimits(model, max(limit.max_model_len for _, limit in entries),
                           tuple(gpu for gpu, _ in entries),
                           tuple(limit for _, limit in entries))
        for model, entries in per_model.items()
    }


def _models_from_file(path: Path) -> dict[str, ModelLimits]:
    data = yaml.safe_load(path.read_text())
    entries = data.get("models") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise InvalidInput(f"{path.name}.models", "must be a list of {name, max_model_len}")
    models: dict[str, ModelLimits] = {}
    for i, entry in enumerate(entries):
        where = f"{path.name}.models[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidInput(f"{where}.name", "must be a string")
        max_len = entry.get("max_model_len")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 1:
            raise InvalidInput(f"{where}.max_model_len", f"must be an integer > 1, got {max_len!r}")
        gpus = tuple(str(g) for g in entry.get("gpus", ()))
        models[entry["name"]] = ModelLimits(entry["name"], max_len, gpus)
    return models


# ------------------------------------------------------------------ group commit
class EnqueueBatcher:
    """Sends the enqueues of concurrent submits to Redis together (one pipeline).

    A submit waits while the batch in flight completes; everything that arrived
    meanwhile (up to ``max_batch``) goes in the next pipeline. Each request is still its
    own atomic script run with its own result, so the semantics of one enqueue do not
    change; only the round trips and the client's per-command cost are shared.
    """

    def __init__(self, store: RedisQueueStore, max_batch: int = 256) -> None:
        if max_batch < 1:
            raise InvalidInput("max_batch", f"must be >= 1, got {max_batch}")
        self.store = store
        self.max_batch = max_batch
        self._pending: list[tuple[Request, Any, Mapping[str, Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def enqueue(
        self, request: Request, prompt: Any, params: Mapping[str, Any]
    ) -> EnqueueResult:
        """Like ``store.enqueue``: the result, or its InvalidInput / Unavailable raised."""
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((request, prompt, params, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_all(), name="enqueue-batcher")
        result = await done
        if isinstance(result, Exception):
            raise result
        return result

    async def _flush_all(self) -> None:
        await asyncio.sleep(0)  # let the submits of this loop iteration join
        while self._pending:
            batch, self._pending = (
                self._pending[: self.max_batch], self._pending[self.max_batch :]
            )
            try:
                results: list[Any] = list(await self.store.enqueue_many(
                    [(request, prompt, params) for request, prompt, params, _ in batch]
                ))
            except Exception as error:  # Unavailable: every waiter of the batch gets it
                results = [error] * len(batch)
            for (*_, done), result in zip(batch, results, strict=True):
                if not done.done():
                    done.set_result(result)


# ------------------------------------------------------------------ the plane
def new_request_id() -> str:
    return uuid.uuid4().hex


class IngestPlane:
    """Submit / get / cancel / stream, over a store, an event publisher and a predictor."""

    def __init__(
        self,
        store: RedisQueueStore,
        events: EventPublisher,
        models: Mapping[str, ModelLimits],
        clock: Callable[[], float],
        limits: SubmissionLimits = SubmissionLimits(),  # noqa: B008 - frozen
        predictor: WaitPredictor | None = None,
        id_factory: Callable[[], str] = new_request_id,
        admission: AdmissionRules = AdmissionRules(),
        observer: SubmitObserver | None = None,
        served: ServedModels | None = None,
    ) -> None:
        self.store = store
        self.events = events
        self.models = dict(models)
        self.clock = clock
        self.limits = limits
        self.predictor = predictor or NoQueueModel()
        self.id_factory = id_factory
        self.admission = admission
        self.enqueuer = EnqueueBatcher(store)
        self.observer = observer or NoObserver()
        #: Which catalogue models a worker serves now; None: all of them (no check).
        self.served = served
        #: Per-tenant quotas of authenticated submits (services.ingest.quotas), or None.
        self.quotas: QuotaCheck | None = None

    def validate(self, record: Any) -> Submission:
        """The submission in ``record``, or InvalidInput naming the field (NotServed for a
        catalogue model that no worker serves now)."""
        submission = parse_submission(record, self.models, self.limits)
        if self.served is not None:
            self.served.check(submission)
        return submission

    async def submit(self, record: Any, tenant: str | None = None,
                     source: SubmitSource = "grpc") -> SubmitOutcome:
        """Validate and queue one submission (contract in the module docstring); ``source``
        names the transport (gRPC or the OpenAI-compatible HTTP front door).

        ``tenant`` is the authenticated caller (None: authentication off): the record's
        ``tenant`` must then be empty or the same, and the request is stored under the
        id scoped to it (:func:`qlm.tenants.scoped_id`); the outcome shows the client's id.
        """
        started = time.perf_counter()
        try:
            submission = self.validate(_with_tenant(record, tenant))
        except InvalidInput:
            self.observer.on_submit(source, "rejected-invalid", UNKNOWN, UNKNOWN,
                                    time.perf_counter() - started, None)
            raise
        submission = submission.with_id(
            scoped_id(tenant, submission.request_id or self.id_factory()))
        await self.book_quota(tenant, submission, source, started)
        outcome = await self.enqueue(submission, admission=True, source=source, started=started)
        return replace(outcome, request_id=client_id(tenant, outcome.request_id))

    async def book_quota(self, tenant: str | None, submission: Submission,
                         source: SubmitSource, started: float | None = None,
                         report: bool = True) -> None:
        """Book ``submission`` (its stored id) against ``tenant``'s quotas, or raise
        QuotaExceeded (an Overloaded, nothing booked; with ``report``, counted by the
        observer as ``rejected-capacity``). Every admission line calls it before
        :meth:`enqueue`: gRPC and HTTP submits, ``qlm.batch.requests`` records, Batch API
        lines. No-op without a tenant (authentication off) or without quotas."""
        if tenant is None or self.quotas is None:
            return
        started = time.perf_counter() if started is None else started
        try:
            await self.quotas.admit(tenant, submission.request_id,
                                    submission.num_prompt_tokens + submission.max_tokens)
        except Overloaded:
            if report:
                self.observer.on_submit(source, "rejected-capacity",
                                        submission.slo_class.value, submission.model,
                                        time.perf_counter() - started, None)
            raise

    def decode_batch_record(self, raw: bytes | None) -> Submission:
        """Validate one ``qlm.batch.requests`` record (JSON; qlm.bus.records).

        Validated exactly like :meth:`submit`, and ``request_id`` is required: a record may
        be delivered again after a consumer restart, and the id makes that a no-op.
        """
        started = time.perf_counter()
        try:
            submission = decode_batch_request(raw, self.models, self.limits)
            if self.served is not None:
                self.served.check(submission)
            if not submission.request_id:
                raise InvalidInput(
                    "request_id", "is required in batch records (it makes redelivery idempotent)"
                )
        except InvalidInput:
            self.observer.on_submit("kafka", "rejected-invalid", UNKNOWN, UNKNOWN,
                                    time.perf_counter() - started, None)
            raise
        return submission

    async def enqueue(self, submission: Submission, *, admission: bool = False,
                      source: SubmitSource = "kafka",
                      started: float | None = None) -> SubmitOutcome:
        """Queue a validated submission that has an id; announce it when new. With
        ``admission``, refuse it first when the rules say so (module docstring).
        ``source`` and ``started`` (``time.perf_counter()`` when the submit began) are
        for the observer."""
        started = time.perf_counter() if started is None else started
        seen: list[Prediction] = []
        result: SubmitResult = "failed"
        try:
            outcome = await self._enqueue(submission, admission, seen)
            result = "duplicate" if outcome.duplicate else "admitted"
            return outcome
        except Overloaded:
            result = "rejected-capacity"
            raise
        except InvalidInput:
            result = "rejected-invalid"
            raise
        finally:
            self.observer.on_submit(source, result, submission.slo_class.value,
                                    submission.model, time.perf_counter() - started,
                                    seen[0] if seen else None)

    async def _enqueue(self, submission: Submission, admission: bool,
                       seen: list[Prediction]) -> SubmitOutcome:
        # Log lines here name the request themselves (request_id=...): binding it to the
        # logging context for every submit cost more than all the lines logged on the way.
        now = self.clock()
        request = submission.to_request(arrival_at=now)
        prompt = submission.stored_prompt()
        prediction = await self.predictor.predict(request, now)
        seen.append(prediction)
        if admission and not prediction.admit and self.admission.rejects(request.slo_class):
            await self._refuse(request, prediction)
        result = await self.enqueuer.enqueue(request, prompt, submission.sampling)
        stored = result.record
        if result.created:
            await self._announce(stored, prediction)
        else:
            log.info("duplicate_submit", request_id=stored.id, state=stored.state.value)
        return SubmitOutcome(
            request_id=stored.id,
            state=stored.state,
            deadline_at=stored.request.deadline_at,
            duplicate=not result.created,
            prediction=prediction,
            submission=submission,
        )

    async def _refuse(self, request: Request, prediction: Prediction) -> None:
        """Raise Overloaded, unless the id is already known (a retry is answered as usual)."""
        try:
            await self.store.get(request.id)
            return
        except NotFound:
            pass
        log.info("admission_refused", request_id=request.id, slo_class=request.slo_class.value,
                 wait_mean_s=round(prediction.wait_mean_s, 3), p_meet_slo=prediction.p_meet_slo,
                 retry_after_s=round(prediction.retry_after_s, 3))
        raise Overloaded(
            f"request cannot meet its {request.slo.ttft_s:g} s TTFT SLO now: predicted wait "
            f"{prediction.wait_mean_s:.1f} s (p90 {prediction.wait_p90_s:.1f} s, P(meet) "
            f"{prediction.p_meet_slo:.3f}); retry after {prediction.retry_after_s:.1f} s",
            retry_after_s=prediction.retry_after_s,
            details={"predicted-wait-s": f"{prediction.wait_mean_s:.3f}",
                     "predicted-wait-p90-s": f"{prediction.wait_p90_s:.3f}",
                     "p-meet-slo": f"{prediction.p_meet_slo:.4f}"},
        )

    async def _announce(self, record: RequestRecord, prediction: Prediction) -> None:
        try:
            await self.events.admitted(record, prediction)
        except Exception as exc:  # an event is a hint; the request is already queued
            log.warning("admitted_event_failed", request_id=record.id, error=repr(exc))

    async def get(self, request_id: str, tenant: str | None = None) -> RequestRecord:
        """The record of ``request_id`` as ``tenant`` names it (its ``request.id`` is the
        client's id), with its predicted first token (:meth:`RedisQueueStore.forecast_for`).
        NotFound, with the same message, for an unknown id and for another tenant's id."""
        _check_id(request_id)
        with _not_found_as(request_id):
            record = await self.store.get(scoped_id(tenant, request_id))
        record = await self.store.forecast_for(record)
        if tenant is None:
            return record
        return replace(record, request=replace(record.request, id=request_id))

    async def cancel(self, request_id: str, tenant: str | None = None) -> CancelOutcome:
        _check_id(request_id)
        stored_id = scoped_id(tenant, request_id)
        with request_context(request_id=stored_id), _not_found_as(request_id):
            before = await self.store.get(stored_id)  # NotFound for an unknown id
            state = await self.store.cancel(stored_id)
            cancelled = not before.state.is_terminal and state in (
                RequestState.CANCELLED, RequestState.RUNNING
            )
            log.info("cancel", cancelled=cancelled, state=state.value)
            return CancelOutcome(request_id, state, cancelled)

    def list_models(self) -> list[ModelLimits]:
        """The catalogue models that a worker serves now (all of them without a check)."""
        if self.served is not None:
            return self.served.list()
        return sorted(self.models.values(), key=lambda m: m.name)

    async def stream_tokens(
        self, request_id: str, from_index: int = 0, block_ms: int = 1000,
        tenant: str | None = None,
    ) -> AsyncIterator[TokenChunk]:
        """Output chunks of ``request_id`` from token ``from_index`` on, then a final chunk.

        Follows the request's Redis stream (written by its worker). NotFound for an
        unknown id; a request whose stream expired after it ended yields only the final
        chunk, built from its record.
        """
        _check_id(request_id)
        if from_index < 0:
            raise InvalidInput("from_index", f"must be >= 0, got {from_index}")
        stored_id = scoped_id(tenant, request_id)
        with _not_found_as(request_id):
            async for entry in self.store.read_tokens(stored_id, block_ms=block_ms):
                if entry.final_state is not None:
                    break
                chunk = _clip(entry.token_ids, entry.text, entry.num_generated, from_index)
                if chunk is not None:
                    yield chunk
            yield _final_chunk(await self.store.get(stored_id))

    async def health(self) -> bool:
        """Whether the store answers."""
        try:
            return await asyncio.wait_for(self.store.ping(), timeout=2.0)
        except Exception:
            return False


def _with_tenant(record: Any, tenant: str | None) -> Any:
    """``record`` with the authenticated ``tenant`` filled in (InvalidInput when it names
    another one); as is when authentication is off."""
    if tenant is None or not isinstance(record, Mapping):
        return record
    claimed = record.get("tenant")
    if claimed and claimed != tenant:
        raise InvalidInput("tenant", "must be empty or the API key's tenant")
    return {**record, "tenant": tenant}


@contextmanager
def _not_found_as(request_id: str) -> Iterator[None]:
    """NotFound names the id the client gave, never the stored (scoped) one."""
    try:
        yield
    except NotFound:
        raise NotFound("request", request_id) from None


def _check_id(request_id: str) -> None:
    if not request_id:
        raise InvalidInput("request_id", "is required")


def _clip(
    token_ids: tuple[int, ...], text: str, num_generated: int, from_index: int
) -> TokenChunk | None:
    """The part of a stream entry at or after token ``from_index`` (None if none is)."""
    index = num_generated - len(token_ids)
    if num_generated <= from_index:
        return None
    if index >= from_index:
        return TokenChunk(index, token_ids, text, num_generated=num_generated)
    skip = from_index - index  # text cannot be split by token without the tokenizer
    return TokenChunk(from_index, token_ids[skip:], "", num_generated=num_generated)


def _final_chunk(record: RequestRecord) -> TokenChunk:
    n = record.request.num_generated
    state = record.state if record.state.is_terminal else RequestState.FAILED
    reason = "length" if state is RequestState.FINISHED and n >= record.request.max_tokens else ""
    return TokenChunk(
        index=n, final_state=state, finish_reason=reason or state.value, error=record.error,
        num_generated=n,
    )
