"""The OpenAI Files and Batch APIs: durable files and batches in Redis, and the driver that
moves each batch through the same queue as everything else.

**Durable state** (key names in :mod:`qlm.store.keys`): a file is a metadata hash plus its
content; a batch is a hash of flat fields (status, times, ``total``, the ``enqueued``
cursor) plus two hashes of result lines keyed by ``custom_id`` (``out``: succeeded,
``err``: refused, failed, cancelled or expired). Every change is one Redis command or one
MULTI transaction, so a process killed at any point leaves a state the next one resumes.

**Exactly once.** The request of line ``custom_id`` of batch ``B`` has the id
:func:`request_id_for` ``(B, custom_id)``: enqueuing it again after a restart is a
duplicate that the store answers from the record (the plane's idempotency), never a
second run. A result line is written with HSETNX (the first one stays), and the output
and error files get ids derived from the batch id and are written with the final status
in one transaction.

**The driver** (:class:`BatchDriver`, a task of the ingest process) holds a Redis lock
(``batches:driver``; several ingest processes elect one; a killed holder's lock expires
after ``LOCK_TTL_S``) and, every ``poll_interval_s``, for each active batch:

1. enqueues the next lines from the cursor (validated exactly like a live request; an
   invalid line becomes an error line with status 400 naming the parameter), then
   moves the cursor;
2. collects the lines whose requests ended: text from the request's token stream, usage
   from its record, in OpenAI's batch output line format;
3. on cancel (or past ``expires_at``), cancels the requests not ended and writes the
   lines never enqueued as errors (``batch_cancelled`` / ``batch_expired``);
4. once every line has a result, writes the output and error files (input order) and
   the final status (``completed``, ``cancelled`` or ``expired``) together.

Lines go to the queue through :meth:`services.ingest.plane.IngestPlane.enqueue`, as the Kafka
``qlm.batch.requests`` records do (batch classes are never refused by admission control).
**Quotas**: each line is booked against the batch's tenant's quotas first
(:meth:`~services.ingest.plane.IngestPlane.book_quota`: queued requests, tokens per
minute). A line over quota is neither lost nor an error line: the cursor stops at the
first such line (lines are booked in waves of ``QUOTA_WAVE`` in input order) and the
batch tries again from it after the quota's retry-after (at most ``MAX_QUOTA_WAIT_S``),
so a tenant's batch is metered at its limits; lines behind it that were queued meanwhile
are duplicates the next time (no second run, no second booking). A batch that cannot get
its lines in before ``expires_at`` ends ``expired`` with ``batch_expired`` lines, as
OpenAI's do.
The SLO of every line comes from the batch's ``completion_window``
(:func:`slo_of_window`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from redis.asyncio.lock import Lock
from redis.exceptions import LockError

from qlm.aio import cancel_and_wait
from qlm.core.errors import InvalidInput, NotFound, QlmError, QuotaExceeded, UnknownModel
from qlm.core.types import RequestState, SLOClass
from qlm.log import get_logger
from qlm.store.client import RedisClient
from qlm.store.keys import Keys
from services.ingest.openai import translate
from services.ingest.plane import IngestPlane

log = get_logger("services.ingest.openai.batches")

ENDPOINTS: Final = {"/v1/chat/completions": True, "/v1/completions": False}  # → chat?
TERMINAL: Final = frozenset({"completed", "failed", "expired", "cancelled"})
LOCK_TTL_S: Final = 5.0
#: Lines enqueued per driver step and batch (each is one plane.enqueue, gathered).
ENQUEUE_CHUNK: Final = 500
MAX_LINES: Final = 50_000
#: Lines booked against the tenant's quotas together; after a wave with a line over
#: quota the step stops (the lines behind it are not tried until the wait is over).
QUOTA_WAVE: Final = 50
#: Longest wait before lines over quota are tried again (a raised limit applies soon).
MAX_QUOTA_WAIT_S: Final = 5.0
_WINDOW: Final = re.compile(r"(\d+)([smh])")


# ------------------------------------------------------------------ pure parts
@dataclass(frozen=True, slots=True)
class BatchLine:
    index: int
    custom_id: str
    body: Mapping[str, Any]


class BatchFileInvalid(QlmError):
    """The input file cannot run as a batch: ``errors`` in OpenAI's ``errors.data`` shape."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors[0]["message"] if errors else "invalid batch file")
        self.errors = errors


def window_seconds(text: str) -> float:
    """``24h`` → 86400; InvalidInput names ``completion_window``."""
    match = _WINDOW.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None or int(match.group(1)) <= 0:
        raise InvalidInput("completion_window", f"must be like 24h, 30m or 90s, got {text!r}")
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)]


def slo_of_window(seconds: float) -> tuple[SLOClass, float]:
    """A batch's SLO: the window is the TTFT SLO; class ``batch-1`` under an hour, else
    ``batch-2``."""
    return (SLOClass.BATCH_1 if seconds < 3600 else SLOClass.BATCH_2), float(seconds)


def request_id_for(batch_id: str, custom_id: str) -> str:
    """The qlm request id of one line: the same for the same batch and ``custom_id``."""
    digest = hashlib.sha256(custom_id.encode()).hexdigest()[:24]
    return f"{batch_id}:{digest}"


def parse_batch_file(text: str, endpoint: str) -> list[BatchLine]:
    """The lines of a batch input file; BatchFileInvalid lists what is wrong (per line).

    Each line: ``{"custom_id": str, "method": "POST", "url": <endpoint>, "body": {...}}``;
    ``custom_id`` unique. The bodies are checked when each line is enqueued."""
    errors: list[dict[str, Any]] = []
    lines: list[BatchLine] = []
    seen: set[str] = set()

    def bad(number: int, param: str | None, message: str) -> None:
        errors.append({"code": "invalid_request", "line": number, "param": param,
                       "message": f"line {number}: {message}"})

    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError as error:
            bad(number, None, f"not valid JSON ({error})")
            continue
        if not isinstance(line, dict):
            bad(number, None, "must be a JSON object")
            continue
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            bad(number, "custom_id", "custom_id must be a non-empty string")
        elif custom_id in seen:
            bad(number, "custom_id", f"custom_id {custom_id!r} appears twice")
        if line.get("method", "POST") != "POST":
            bad(number, "method", f"method must be POST, got {line.get('method')!r}")
        if line.get("url") != endpoint:
            bad(number, "url", f"url must be the batch's endpoint {endpoint}, "
                f"got {line.get('url')!r}")
        if not isinstance(line.get("body"), dict):
            bad(number, "body", "body must be a JSON object")
        if len(errors) >= 100:
            break
        if isinstance(custom_id, str) and custom_id:
            seen.add(custom_id)
            lines.append(BatchLine(len(lines), custom_id, line.get("body") or {}))
    if not lines and not errors:
        errors.append({"code": "empty_file", "line": None, "param": None,
                       "message": "the input file has no requests"})
    if len(lines) > MAX_LINES:
        errors.append({"code": "too_many_requests", "line": None, "param": None,
                       "message": f"at most {MAX_LINES} requests per batch, got {len(lines)}"})
    if errors:
        raise BatchFileInvalid(errors)
    return lines


def output_line(custom_id: str, request_id: str, status_code: int,
                body: Mapping[str, Any]) -> str:
    """A line of an output or error file with a response (OpenAI's format)."""
    return json.dumps({"id": f"batch_req_{_hex(request_id)}", "custom_id": custom_id,
                       "response": {"status_code": status_code, "request_id": request_id,
                                    "body": body}, "error": None}, separators=(",", ":"))


def error_line(custom_id: str, request_id: str, code: str, message: str) -> str:
    """A line of an error file for a request that has no response (failed, cancelled)."""
    return json.dumps({"id": f"batch_req_{_hex(request_id)}", "custom_id": custom_id,
                       "response": None, "error": {"code": code, "message": message}},
                      separators=(",", ":"))


def _hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


# ------------------------------------------------------------------ durable state
_BATCH_TIMES: Final = ("created_at", "in_progress_at", "expires_at", "finalizing_at",
                       "completed_at", "failed_at", "expired_at", "cancelling_at",
                       "cancelled_at")


#: Where a file or batch records the tenant that owns it (authentication on).
TENANT_FIELD = "tenant"


def _owned_by(fields: Mapping[str, Any], tenant: str | None) -> bool:
    """Whether stored ``fields`` may be shown to ``tenant`` (None: authentication off)."""
    if tenant is None:
        return True
    owner = fields.get(TENANT_FIELD)
    return owner is not None and json.loads(owner) == tenant


class BatchStore:
    """Files and batches in Redis (key names: :class:`qlm.store.keys.Keys`)."""

    def __init__(self, redis: RedisClient, prefix: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis: Any = redis  # decode_responses=True: strings in, strings out
        self.keys = Keys(prefix)
        self.clock = clock

    # -------------------------------------------------------------- files
    async def create_file(self, content: str, filename: str, purpose: str,
                          file_id: str | None = None,
                          tenant: str | None = None) -> dict[str, Any]:
        """A new file; with ``tenant`` (authentication on) only that tenant sees it."""
        file_id = file_id or new_file_id()
        meta: dict[str, Any] = {
                "id": file_id, "object": "file", "bytes": len(content.encode()),
                "created_at": int(self.clock()), "filename": filename, "purpose": purpose,
                "status": "processed"}
        owned = {**meta, TENANT_FIELD: tenant} if tenant is not None else meta
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.keys.file_content(file_id), content)
        pipe.hset(self.keys.file(file_id), mapping={k: json.dumps(v) for k, v in owned.items()})
        pipe.zadd(self.keys.files, {file_id: meta["created_at"]})
        await pipe.execute()
        return meta

    async def get_file(self, file_id: str, tenant: str | None = None) -> dict[str, Any]:
        """The file's metadata; NotFound also when it is another tenant's (the same answer
        as for an unknown id)."""
        fields = await self.redis.hgetall(self.keys.file(file_id))
        if not fields or not _owned_by(fields, tenant):
            raise NotFound("file", file_id)
        return {k: json.loads(v) for k, v in fields.items() if k != TENANT_FIELD}

    async def file_content(self, file_id: str, tenant: str | None = None) -> str:
        if tenant is not None:
            await self.get_file(file_id, tenant)  # NotFound for another tenant's
        content = await self.redis.get(self.keys.file_content(file_id))
        if content is None:
            raise NotFound("file", file_id)
        return str(content)

    async def list_files(self, purpose: str | None, limit: int,
                         after: str | None, tenant: str | None = None) -> list[dict[str, Any]]:
        ids = [str(i) for i in await self.redis.zrevrange(self.keys.files, 0, -1)]
        if after is not None and after in ids:
            ids = ids[ids.index(after) + 1:]
        out = []
        for file_id in ids:
            with contextlib.suppress(NotFound):
                meta = await self.get_file(file_id, tenant)
                if purpose is None or meta["purpose"] == purpose:
                    out.append(meta)
            if len(out) >= limit:
                break
        return out

    async def delete_file(self, file_id: str, tenant: str | None = None) -> None:
        await self.get_file(file_id, tenant)  # NotFound
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.keys.file(file_id), self.keys.file_content(file_id))
        pipe.zrem(self.keys.files, file_id)
        await pipe.execute()

    # -------------------------------------------------------------- batches
    async def create_batch(self, fields: Mapping[str, Any], active: bool) -> None:
        batch_id = str(fields["id"])
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.keys.batch(batch_id), mapping={k: json.dumps(v) for k, v in fields.items()})
        pipe.zadd(self.keys.batches, {batch_id: float(fields["created_at"])})
        if active:
            pipe.sadd(self.keys.active_batches, batch_id)
        await pipe.execute()

    async def batch_fields(self, batch_id: str, tenant: str | None = None) -> dict[str, Any]:
        """The batch's fields; NotFound also when it is another tenant's."""
        fields = await self.redis.hgetall(self.keys.batch(batch_id))
        if not fields or not _owned_by(fields, tenant):
            raise NotFound("batch", batch_id)
        return {k: json.loads(v) for k, v in fields.items()}

    async def get_batch(self, batch_id: str, tenant: str | None = None) -> dict[str, Any]:
        """The batch as OpenAI's ``batch`` object."""
        fields = await self.batch_fields(batch_id, tenant)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hlen(self.keys.batch_output(batch_id))
        pipe.hlen(self.keys.batch_errors(batch_id))
        completed, failed = await pipe.execute()
        return batch_object(fields, int(completed), int(failed))

    async def list_batches(self, limit: int, after: str | None,
                           tenant: str | None = None) -> list[dict[str, Any]]:
        ids = [str(i) for i in await self.redis.zrevrange(self.keys.batches, 0, -1)]
        if after is not None and after in ids:
            ids = ids[ids.index(after) + 1:]
        out: list[dict[str, Any]] = []
        for batch_id in ids:
            with contextlib.suppress(NotFound):
                out.append(await self.get_batch(batch_id, tenant))
            if len(out) >= limit:
                break
        return out

    async def update(self, batch_id: str, **fields: Any) -> None:
        await self.redis.hset(self.keys.batch(batch_id),
                              mapping={k: json.dumps(v) for k, v in fields.items()})

    async def fail(self, batch_id: str, code: str, message: str) -> None:
        """End a batch as ``failed`` with one error (and stop driving it)."""
        errors = {"object": "list",
                  "data": [{"code": code, "message": message, "line": None, "param": None}]}
        tx = self.redis.pipeline(transaction=True)
        tx.hset(self.keys.batch(batch_id), mapping={
            "status": json.dumps("failed"), "failed_at": json.dumps(int(self.clock())),
            "errors": json.dumps(errors)})
        tx.srem(self.keys.active_batches, batch_id)
        await tx.execute()

    async def request_cancel(self, batch_id: str, tenant: str | None = None) -> None:
        """Mark the batch for cancelling (the driver does it); a no-op when ended."""
        await self.batch_fields(batch_id, tenant)  # NotFound
        await self.redis.hsetnx(self.keys.batch(batch_id), "cancelling_at",
                                json.dumps(int(self.clock())))

    async def active(self) -> list[str]:
        return sorted(str(i) for i in await self.redis.smembers(self.keys.active_batches))

    async def result_ids(self, batch_id: str) -> set[str]:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hkeys(self.keys.batch_output(batch_id))
        pipe.hkeys(self.keys.batch_errors(batch_id))
        out, err = await pipe.execute()
        return {str(i) for i in (*out, *err)}

    async def add_results(self, batch_id: str, output: Mapping[str, str],
                          errors: Mapping[str, str]) -> None:
        """Record result lines; a custom_id that has one already keeps it (HSETNX)."""
        if not output and not errors:
            return
        pipe = self.redis.pipeline(transaction=False)
        for custom_id, line in output.items():
            pipe.hsetnx(self.keys.batch_output(batch_id), custom_id, line)
        for custom_id, line in errors.items():
            pipe.hsetnx(self.keys.batch_errors(batch_id), custom_id, line)
        await pipe.execute()

    async def finalize(self, batch_id: str, status: str, order: Sequence[str]) -> None:
        """Write the output and error files (lines in ``order`` of custom_id) and the final
        status, in one transaction; their ids derive from the batch id."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.batch_output(batch_id))
        pipe.hgetall(self.keys.batch_errors(batch_id))
        pipe.hgetall(self.keys.batch(batch_id))
        out, err, batch_fields = await pipe.execute()
        now = int(self.clock())
        fields: dict[str, Any] = {"status": status, "finalizing_at": now, f"{status}_at": now}
        tx = self.redis.pipeline(transaction=True)
        base = batch_id.removeprefix("batch_")
        for kind, lines, key in (("output", out, "output_file_id"),
                                 ("errors", err, "error_file_id")):
            if not lines:
                continue
            file_id = f"file-{base}-{kind}"
            content = "".join(lines[c] + "\n" for c in order if c in lines)
            meta = {"id": file_id, "object": "file", "bytes": len(content.encode()),
                    "created_at": now, "filename": f"{batch_id}_{kind}.jsonl",
                    "purpose": "batch_output", "status": "processed"}
            tx.set(self.keys.file_content(file_id), content)
            owner = batch_fields.get(TENANT_FIELD)  # the batch's tenant owns its results
            if owner is not None:
                meta[TENANT_FIELD] = json.loads(owner)
            tx.hset(self.keys.file(file_id), mapping={k: json.dumps(v) for k, v in meta.items()})
            tx.zadd(self.keys.files, {file_id: now})
            fields[key] = file_id
        tx.hset(self.keys.batch(batch_id), mapping={k: json.dumps(v) for k, v in fields.items()})
        tx.srem(self.keys.active_batches, batch_id)
        await tx.execute()


def batch_object(fields: Mapping[str, Any], completed: int, failed: int) -> dict[str, Any]:
    status = fields.get("status", "validating")
    if status not in TERMINAL and fields.get("cancelling_at") is not None:
        status = "cancelling"
    out: dict[str, Any] = {
        "id": fields["id"], "object": "batch", "endpoint": fields.get("endpoint"),
        "errors": fields.get("errors"), "input_file_id": fields.get("input_file_id"),
        "completion_window": fields.get("completion_window"), "status": status,
        "output_file_id": fields.get("output_file_id"),
        "error_file_id": fields.get("error_file_id"),
        "request_counts": {"total": int(fields.get("total", 0)), "completed": completed,
                           "failed": failed},
        "metadata": fields.get("metadata"),
    }
    for name in _BATCH_TIMES:
        out[name] = fields.get(name)
    return out


# ------------------------------------------------------------------ create
async def create_batch(store: BatchStore, input_file_id: str, endpoint: str,
                       completion_window: str, metadata: Mapping[str, str] | None,
                       clock: Callable[[], float], tenant: str | None = None) -> dict[str, Any]:
    """Validate the input file and record the batch (``in_progress``, or ``failed`` with
    ``errors`` when the file cannot run). InvalidInput / NotFound name the parameter."""
    if endpoint not in ENDPOINTS:
        raise InvalidInput("endpoint", f"must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
    seconds = window_seconds(completion_window)
    try:
        meta = await store.get_file(input_file_id, tenant)
    except NotFound:
        raise InvalidInput("input_file_id", f"no file {input_file_id!r}") from None
    if meta.get("purpose") != "batch":
        raise InvalidInput("input_file_id", f"file {input_file_id!r} has purpose "
                           f"{meta.get('purpose')!r}, not 'batch'")
    now = int(clock())
    slo_class, ttft = slo_of_window(seconds)
    fields: dict[str, Any] = {
        "id": new_batch_id(), "endpoint": endpoint, "input_file_id": input_file_id,
        "completion_window": completion_window, "created_at": now,
        "expires_at": now + int(seconds), "metadata": dict(metadata) if metadata else None,
        "slo_class": slo_class.value, "ttft_slo_s": ttft, "enqueued": 0, "errors": None,
    }
    if tenant is not None:
        fields[TENANT_FIELD] = tenant
    try:
        lines = parse_batch_file(await store.file_content(input_file_id), endpoint)
    except BatchFileInvalid as invalid:
        fields.update(status="failed", failed_at=now, total=0,
                      errors={"object": "list", "data": invalid.errors})
        await store.create_batch(fields, active=False)
        return batch_object(fields, 0, 0)
    fields.update(status="in_progress", in_progress_at=now, total=len(lines))
    await store.create_batch(fields, active=True)
    log.info("batch_created", batch_id=fields["id"], total=len(lines), slo_class=slo_class.value)
    return batch_object(fields, 0, 0)


# ------------------------------------------------------------------ driver
@dataclass
class _Progress:
    """What the driver keeps in memory of one batch (rebuilt from Redis after a restart)."""

    lines: list[BatchLine]
    results: set[str]
    chat: bool
    cancelled_requests: bool = False
    ids: dict[str, str] = field(default_factory=dict)  # custom_id → request id
    #: A line was over its tenant's quota: the cursor waits on it until this time.
    quota_wait_until: float = 0.0


class BatchDriver:
    """Moves every active batch forward (module docstring) while it holds the lock."""

    def __init__(self, store: BatchStore, plane: IngestPlane, *, default_max_tokens: int,
                 poll_interval_s: float = 0.5, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.plane = plane
        self.default_max_tokens = default_max_tokens
        self.poll_interval_s = poll_interval_s
        self.clock = clock
        self._lock = Lock(store.redis, store.keys.batch_driver, timeout=LOCK_TTL_S,
                          blocking=False, thread_local=False)
        self._progress: dict[str, _Progress] = {}
        self._task: asyncio.Task[None] | None = None
        self._holding = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ingest-batches")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
        if self._holding:
            with contextlib.suppress(Exception):
                await self._lock.release()

    async def _run(self) -> None:
        while True:
            try:
                if await self._hold_lock():
                    await self.step()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # Redis away, a bug: log, keep the process serving
                log.warning("batch_step_failed", error=repr(error))
            await asyncio.sleep(self.poll_interval_s)

    async def _hold_lock(self) -> bool:
        if self._holding:
            try:
                await self._lock.reacquire()
                return True
            except LockError:
                self._holding = False
                self._progress.clear()
        self._holding = bool(await self._lock.acquire())
        return self._holding

    async def step(self) -> None:
        """One pass over the active batches."""
        for batch_id in await self.store.active():
            await self._advance(batch_id)

    async def _advance(self, batch_id: str) -> None:
        fields = await self.store.batch_fields(batch_id)
        if fields.get("status") in TERMINAL:
            await self.store.redis.srem(self.store.keys.active_batches, batch_id)
            return
        progress = self._progress.get(batch_id)
        if progress is None:
            try:
                content = await self.store.file_content(fields["input_file_id"])
            except NotFound:  # deleted while the batch ran: nothing left to run it from
                await self.store.fail(batch_id, "input_file_deleted",
                                      f"input file {fields['input_file_id']} was deleted")
                return
            lines = parse_batch_file(content, fields["endpoint"])
            progress = _Progress(lines, await self.store.result_ids(batch_id),
                                 ENDPOINTS[fields["endpoint"]])
            progress.ids = {line.custom_id: request_id_for(batch_id, line.custom_id)
                            for line in lines}
            self._progress[batch_id] = progress
        enqueued = int(fields.get("enqueued", 0))
        expired = self.clock() > float(fields["expires_at"])
        stopping = "expired" if expired else (
            "cancelled" if fields.get("cancelling_at") is not None else None)
        if (stopping is None and enqueued < len(progress.lines)
                and self.clock() >= progress.quota_wait_until):
            enqueued = await self._enqueue(batch_id, fields, progress, enqueued)
        if stopping is not None:
            await self._stop_lines(batch_id, progress, enqueued, stopping)
        await self._collect(batch_id, progress, enqueued, stopping)
        if len(progress.results) >= len(progress.lines):
            await self.store.finalize(batch_id, stopping or "completed",
                                      [line.custom_id for line in progress.lines])
            self._progress.pop(batch_id, None)
            log.info("batch_finalized", batch_id=batch_id, status=stopping or "completed")

    async def _enqueue(self, batch_id: str, fields: Mapping[str, Any], progress: _Progress,
                       start: int) -> int:
        chunk = progress.lines[start:start + ENQUEUE_CHUNK]
        refused: dict[str, str] = {}
        over_quota: dict[int, float] = {}  # position in chunk → retry after (s)
        tenant = fields.get(TENANT_FIELD) or None  # the batch's tenant submits its lines

        async def one(position: int, line: BatchLine) -> None:
            request_id = progress.ids[line.custom_id]
            try:
                record = translate.submission_record(
                    line.body, {}, chat=progress.chat, default_max_tokens=self.default_max_tokens)
                record.update(request_id=request_id, slo_class=fields["slo_class"],
                              ttft_slo_s=fields["ttft_slo_s"])
                if tenant is not None:
                    record["tenant"] = tenant
                submission = self.plane.validate(record)
                await self.plane.book_quota(tenant, submission, "http")
                await self.plane.enqueue(submission, source="http")
            except QuotaExceeded as error:  # not now: the cursor waits on this line
                over_quota[position] = error.retry_after_s
            except InvalidInput as error:
                param = translate.openai_param(error, progress.chat)
                code = "model_not_found" if isinstance(error, UnknownModel) else "invalid_value"
                refused[line.custom_id] = output_line(
                    line.custom_id, request_id, 404 if code == "model_not_found" else 400,
                    {"error": {"message": f"{param}: {error.problem}",
                               "type": "invalid_request_error", "param": param, "code": code}})

        for wave in range(0, len(chunk), QUOTA_WAVE):  # over quota: few more lines tried
            await asyncio.gather(*(one(position, chunk[position]) for position in
                                   range(wave, min(wave + QUOTA_WAVE, len(chunk)))))
            if over_quota:
                break
        await self.store.add_results(batch_id, {}, refused)
        progress.results.update(refused)
        end = start + len(chunk)
        if over_quota:
            first = min(over_quota)
            end = start + first
            progress.quota_wait_until = self.clock() + min(over_quota[first], MAX_QUOTA_WAIT_S)
            log.info("batch_lines_over_quota", batch_id=batch_id, tenant=tenant, line=end,
                     retry_after_s=round(over_quota[first], 3))
        await self.store.update(batch_id, enqueued=end)
        return end

    async def _stop_lines(self, batch_id: str, progress: _Progress, enqueued: int,
                          reason: str) -> None:
        code = "batch_expired" if reason == "expired" else "batch_cancelled"
        never = {line.custom_id: error_line(line.custom_id, progress.ids[line.custom_id], code,
                                            f"the batch was {reason} before this request ran")
                 for line in progress.lines[enqueued:] if line.custom_id not in progress.results}
        await self.store.add_results(batch_id, {}, never)
        progress.results.update(never)
        if not progress.cancelled_requests:
            for line in progress.lines[:enqueued]:
                if line.custom_id not in progress.results:
                    with contextlib.suppress(NotFound):
                        await self.plane.cancel(progress.ids[line.custom_id])
            progress.cancelled_requests = True

    async def _collect(self, batch_id: str, progress: _Progress, enqueued: int,
                       stopping: str | None) -> None:
        pending = [line for line in progress.lines[:enqueued]
                   if line.custom_id not in progress.results]
        if not pending:
            return
        states = await self.plane.store.states([progress.ids[line.custom_id] for line in pending])
        ended = [line for line in pending
                 if (s := states[progress.ids[line.custom_id]]) is not None and s.is_terminal]
        output: dict[str, str] = {}
        errors: dict[str, str] = {}
        for i in range(0, len(ended), 64):
            lines = await asyncio.gather(*(self._result(line, progress, stopping)
                                           for line in ended[i:i + 64]))
            for line, (ok, text) in zip(ended[i:i + 64], lines, strict=True):
                (output if ok else errors)[line.custom_id] = text
        await self.store.add_results(batch_id, output, errors)
        progress.results.update(output)
        progress.results.update(errors)

    async def _result(self, line: BatchLine, progress: _Progress,
                      stopping: str | None) -> tuple[bool, str]:
        request_id = progress.ids[line.custom_id]
        record = await self.plane.get(request_id)
        if record.state is RequestState.FAILED:
            return False, error_line(line.custom_id, request_id, "request_failed",
                                     record.error or "the request failed")
        if record.state is RequestState.CANCELLED:
            code = "batch_expired" if stopping == "expired" else "batch_cancelled"
            return False, error_line(line.custom_id, request_id, code,
                                     f"the request was cancelled ({record.error or code})")
        chunks = await self.plane.store.token_chunks(request_id)
        text = "".join(c.text for c in chunks)
        request = record.request
        body = translate.completion_object(
            request_id=request_id, model=request.model, created=int(request.arrival_at),
            text=text, chat=progress.chat,
            finish_reason=translate.finish_reason_of("finished", request.num_generated,
                                                     request.max_tokens),
            usage_=translate.usage(request.prompt_tokens, request.num_generated))
        return True, output_line(line.custom_id, request_id, 200, body)
