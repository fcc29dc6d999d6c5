"""One worker: pull under backpressure, run on the engine, stream, report, obey LSOs.

Loops of a running :class:`Worker` (asyncio tasks):

* **pull**: while it is not draining or swapping, read the head of its virtual queue
  (the store's ``queue_head``, one atomic read), decide how many requests fit with
  :func:`qlm.core.pulls.plan_pulls` (the simulator's backpressure: free batch slots,
  KV reservations and the prefill cap), take that many with the store's pull (under a
  lease) and add them to the engine. When nothing fits or is queued it waits for
  :attr:`Worker.wake` (a request left or got its first token; requests were queued,
  see :mod:`services.worker.wakeup`) or at most ``poll_interval_s``.
* **serve** (one task per request): tokens from the engine are appended to the
  request's Redis stream (chunks that pile up while a write is in flight go in one
  write, and the writes of all requests share round trips, see
  :mod:`services.worker.streams`); the first one publishes ``first_token``; the end
  acks the request in the store (finished / failed) and publishes ``finished`` (and,
  for batch classes, a ``qlm.batch.results`` record).
* **renew**: every ``renew_interval_s`` extend the leases of the running requests;
  requests the worker lost (lease expired, taken elsewhere) are aborted silently;
  requests whose cancellation was requested are aborted and acked ``cancelled``.
* **telemetry**: every ``telemetry_interval_s`` (and right after a model swap) publish
  the awake and held models, batch size, KV use and the mean predicted vs observed
  step time of the window on ``qlm.telemetry`` (an idle window is a heartbeat with
  ``num_steps = 0``: the scheduler's roster uses telemetry for liveness) and refresh
  the Prometheus gauges.

LSO commands (:meth:`Worker.on_lso`): ``evict`` / ``migrate`` abort the named running
requests and requeue them with their progress (``evicted`` event); ``swap`` stops
pulling, evicts everything running, swaps the engine (:meth:`Engine.swap`), then
publishes a ``swapped`` event (from and to model, wall time of the swap); ``cap`` sets
the batch cap (:meth:`Worker.set_batch_cap`): the pull admits only while fewer requests
run, which bounds the engine's batch on every engine (vLLM's ``max_num_seqs`` cannot
change while its engine runs); telemetry reports the cap in force.

Stopping (:meth:`Worker.drain`, on SIGTERM): stop pulling, let running requests
finish for ``grace_s``, then requeue what is left with its progress.

Every Redis write that names the worker is checked by the store: a request the worker
no longer holds (LeaseLost) is dropped without reporting. Events are hints; a failed
publish is logged and never fails a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from qlm.aio import cancel_and_wait, wait_event
from qlm.bus.producer import BusProducer
from qlm.bus.records import BatchResult, BusRecord, Event, LsoCommand, Telemetry
from qlm.bus.topics import TopicNames
from qlm.core.errors import InvalidInput, NotFound, QlmError, Unavailable
from qlm.core.perf import PerfProfile
from qlm.core.pulls import DEFAULT_EXPECTED_OUTPUT_TOKENS, DEFAULT_PREFILL_CAP_TOKENS, plan_pulls
from qlm.core.types import RequestState, RunningRequest, SLOClass, WorkerView
from qlm.engine.base import Engine, EngineRequest, EngineStats, OutputChunk
from qlm.engine.text import chat_messages
from qlm.log import get_logger, request_context
from qlm.store.errors import LeaseLost
from qlm.store.records import RequestRecord
from qlm.store.store import RedisQueueStore
from services.worker.metrics import WorkerMetrics
from services.worker.streams import StreamWriter

log = get_logger("services.worker")

#: SLO classes whose results go to qlm.batch.results.
BATCH_CLASSES = frozenset({SLOClass.BATCH_1, SLOClass.BATCH_2})
#: Largest output (token ids) put in one batch result record.
MAX_RESULT_TOKENS = 100_000
#: Longest wait for an evicted request's kept output to be read back from its stream.
KEPT_OUTPUT_READ_S = 2.0

StopReason = Literal["evict", "cancel", "lost", "shutdown"]


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """Timing and admission knobs of a worker (see
    :class:`services.worker.settings.WorkerSettings`)."""

    lease_s: float = 15.0
    renew_interval_s: float = 1.0
    pull_interval_s: float = 0.005
    telemetry_interval_s: float = 1.0
    expected_output_tokens: int = DEFAULT_EXPECTED_OUTPUT_TOKENS
    #: Context admitted but not yet prefilled, at most (0: none; see plan_pulls).
    prefill_cap_tokens: int = DEFAULT_PREFILL_CAP_TOKENS

    def __post_init__(self) -> None:
        for name in ("lease_s", "renew_interval_s", "pull_interval_s", "telemetry_interval_s"):
            if not getattr(self, name) > 0:
                raise InvalidInput(name, f"must be > 0, got {getattr(self, name)}")
        if self.renew_interval_s >= self.lease_s:
            raise InvalidInput("renew_interval_s", "must be shorter than lease_s")


@dataclass(eq=False)
class _Running:
    """A request this worker holds, and what it has streamed of it."""

    record: RequestRecord
    engine_request: EngineRequest
    started_at: float
    num_generated: int
    token_ids: list[int]
    text: list[str]
    first_token_at: float | None = None
    stop_reason: StopReason | None = None
    task: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def id(self) -> str:
        return self.record.id

    def view(self) -> RunningRequest:
        request = self.record.request
        progress = min(self.num_generated, request.max_tokens)
        if progress != request.num_generated:
            request = replace(request, num_generated=progress)
        return RunningRequest(request, self.started_at, self.first_token_at)


class Worker:
    """One worker (``worker_id`` on one ``gpu``) driving one engine."""

    def __init__(
        self,
        worker_id: str,
        engine: Engine,
        store: RedisQueueStore,
        producer: BusProducer,
        topics: TopicNames,
        profiles: dict[str, PerfProfile],
        metrics: WorkerMetrics,
        options: WorkerOptions | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.id = worker_id
        self.engine = engine
        self.store = store
        self.producer = producer
        self.topics = topics
        self.profiles = profiles
        self.metrics = metrics
        self.options = options or WorkerOptions()
        self.clock = clock
        self.running: dict[str, _Running] = {}
        self.draining = False
        self.swapping = False
        #: The scheduler's batch cap (``cap`` LSO command), None: the profile's limit.
        self.batch_cap: int | None = None
        #: Set when the worker should look at its queue now (a request left, work queued).
        self.wake = asyncio.Event()
        self.poll_interval_s = self.options.pull_interval_s
        self._swap_lock = asyncio.Lock()
        self._pull_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_stats: EngineStats | None = None
        self._last_stats_at = 0.0
        self._streams = StreamWriter(store, worker_id)
        self._outbox: asyncio.Queue[tuple[BusRecord, str]] = asyncio.Queue()
        self._sender: asyncio.Task[None] | None = None
        self._pull_task: asyncio.Task[None] | None = None

    # ================================================================ lifecycle
    async def start(self) -> None:
        await self.engine.start()
        await self.requeue_orphans()
        self._last_stats, self._last_stats_at = self.engine.stats(), time.monotonic()
        self._set_active_model_gauge()
        self._sender = asyncio.create_task(self._send_loop(), name=f"worker-{self.id}-send")
        self._pull_task = asyncio.create_task(self._pull_loop(), name=f"worker-{self.id}-pull")
        for name, loop in (
            ("renew", self._renew_loop),
            ("telemetry", self._telemetry_loop),
        ):
            self._tasks.append(asyncio.create_task(loop(), name=f"worker-{self.id}-{name}"))
        log.info("worker_started", worker=self.id, gpu=self.engine.gpu,
                 models=list(self.engine.models), active_model=self.engine.active_model)

    async def requeue_orphans(self) -> int:
        """Return what an earlier life of this worker id still holds (it died without
        requeueing) to the queue with its progress, instead of waiting for the leases to
        expire. Returns how many."""
        snapshot = await self.store.snapshot()
        orphans = [r.request for r in snapshot.running.get(self.id, ())]
        for request in orphans:
            with request_context(request_id=request.id), contextlib.suppress(LeaseLost):
                await self.store.requeue(self.id, request.id)
                log.info("orphan_requeued", worker=self.id, num_generated=request.num_generated)
        return len(orphans)

    async def drain(self, grace_s: float) -> None:
        """Stop pulling; let running requests finish within ``grace_s``; requeue the rest
        with their progress; stop the loops and the engine."""
        self.draining = True
        self.wake.set()
        deadline = time.monotonic() + grace_s
        if self._pull_task is not None:  # its pull in flight ends and starts what it took
            await self._pull_task
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        leftover = list(self.running.values())
        if leftover:
            log.info("worker_requeue_on_shutdown", worker=self.id, num_requests=len(leftover))
        await asyncio.gather(*(self._evict(r, "shutdown") for r in leftover))
        await cancel_and_wait(self._tasks)
        await self.engine.close()
        await self._streams.close()
        await self._outbox.join()
        if self._sender is not None:
            await cancel_and_wait([self._sender])
        log.info("worker_stopped", worker=self.id)

    # ================================================================ pull
    async def _pull_loop(self) -> None:
        while not self.draining:
            self.wake.clear()  # before looking: a wake-up during the pull is not lost
            try:
                num_pulled = await self.pull_once()
            except (Unavailable, OSError) as error:
                log.warning("pull_failed", worker=self.id, error=str(error))
                num_pulled = 0
                await asyncio.sleep(0.5)
            except Exception:  # a bug must not stop the worker pulling for good
                log.exception("pull_failed", worker=self.id)
                num_pulled = 0
                await asyncio.sleep(0.5)
            if num_pulled == 0 and not self.draining:
                await wait_event(self.wake, self.poll_interval_s)

    def view(self) -> WorkerView | None:
        """This worker as the scheduler sees it (None while it has no active model)."""
        model = self.engine.active_model
        if model is None:
            return None
        profile = self.profiles[model]
        stats = self.engine.stats()
        capacity = profile.kv_capacity_tokens
        if stats.kv_capacity_tokens > 0:
            capacity = min(capacity, stats.kv_capacity_tokens)
        return WorkerView(
            id=self.id,
            gpu=self.engine.gpu,
            models=self.engine.models,
            active_model=model,
            kv_capacity_tokens=capacity,
            max_batch_size=profile.max_batch_size,
            running=tuple(r.view() for r in self.running.values()),
            batch_cap=self.batch_cap,
        )

    async def pull_once(self) -> int:
        """One backpressure pull; returns how many requests were started."""
        async with self._pull_lock:  # a swap waits for a pull in flight to start its requests
            return await self._pull_unlocked()

    async def _pull_unlocked(self) -> int:
        if self.draining or self.swapping:
            return 0
        view = self.view()
        if view is None or view.batch_size >= view.batch_limit:
            return 0
        model = view.active_model
        assert model is not None
        head = await self.store.queue_head(self.id, model, view.batch_limit - view.batch_size)
        planned = plan_pulls(view, head, self.profiles[model], self.options.expected_output_tokens,
                             prefill_cap_tokens=self.options.prefill_cap_tokens)
        if not planned:
            return 0
        records = await self.store.pull(
            self.id, model, len(planned), lease_s=self.options.lease_s
        )
        for record in records:
            await self._start(record)
        return len(records)

    async def _start(self, record: RequestRecord) -> None:
        with request_context(request_id=record.id):
            self.metrics.pulled.labels(self.id).inc()
            started_at = record.started_at or self.clock()
            if record.request.num_generated >= record.request.max_tokens:
                await self._ack_complete(record)
                return
            if record.request.model != self.engine.active_model:  # not ours to fail: put back
                with contextlib.suppress(LeaseLost):
                    await self.store.requeue(self.id, record.id)
                return
            try:
                engine_request = await self._engine_request(record)
                run = _Running(
                    record=record,
                    engine_request=engine_request,
                    started_at=started_at,
                    num_generated=record.request.num_generated,
                    token_ids=list(engine_request.generated_token_ids),
                    text=[engine_request.generated_text] if engine_request.generated_text else [],
                    first_token_at=record.first_token_at,
                )
                stream = self.engine.add(engine_request)
            except InvalidInput as error:
                await self._fail(record, str(error))
                return
            self.running[record.id] = run
            self._publish(self._event(record, "started", at=started_at))
            run.task = asyncio.create_task(self._serve(run, stream), name=f"serve-{record.id}")
            log.info("request_started", worker=self.id, num_generated=run.num_generated)

    async def _ack_complete(self, record: RequestRecord) -> None:
        """A request evicted right after its last token: nothing left to generate."""
        with contextlib.suppress(LeaseLost):
            await self.store.ack(self.id, record.id, RequestState.FINISHED)
            self.metrics.requests.labels(self.id, "finished").inc()
            self._publish(self._event(record, "finished", at=self.clock(),
                                      num_output_tokens=record.request.num_generated))
            self._publish_result(record, "finished", self.clock(), None, finish_reason="length")

    async def _engine_request(self, record: RequestRecord) -> EngineRequest:
        request = record.request
        prompt = record.prompt
        token_ids: tuple[int, ...] | None = None
        text: str | None = None
        messages: tuple[dict[str, str], ...] | None = None
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            token_ids = tuple(prompt) if len(prompt) == request.prompt_tokens else None
        elif isinstance(prompt, str):
            text = prompt
        elif isinstance(prompt, dict) and "messages" in prompt:
            messages = chat_messages(prompt["messages"], "prompt.messages")
        params = dict(record.params)
        kept_ids: tuple[int, ...] = ()
        kept_text = ""
        if request.num_generated > 0:
            kept_ids, kept_text = await self._kept_output(record.id, request.num_generated)
        stop = params.get("stop") or ()
        return EngineRequest(
            request_id=record.id,
            model=request.model,
            prompt_tokens=request.prompt_tokens,
            max_tokens=request.max_tokens,
            prompt_token_ids=token_ids,
            prompt_text=text,
            prompt_messages=messages,
            num_generated=request.num_generated,
            generated_token_ids=kept_ids,
            generated_text=kept_text,
            ignore_eos=bool(params.get("ignore_eos", False)),
            temperature=params.get("temperature"),
            top_p=params.get("top_p"),
            top_k=params.get("top_k"),
            seed=params.get("seed"),
            stop=tuple(str(s) for s in stop),
        )

    async def _kept_output(
        self, request_id: str, num_generated: int
    ) -> tuple[tuple[int, ...], str]:
        """The output an evicted request already streamed (its first ``num_generated``
        tokens), read back from its stream; whatever was read within
        ``KEPT_OUTPUT_READ_S`` if the stream holds less (e.g. it was trimmed)."""
        ids: list[int] = []
        text: list[str] = []
        reader = self.store.read_tokens(request_id, block_ms=50)
        try:
            async with asyncio.timeout(KEPT_OUTPUT_READ_S):
                async for chunk in reader:
                    ids.extend(chunk.token_ids)
                    text.append(chunk.text)
                    if chunk.final_state is not None or chunk.num_generated >= num_generated:
                        break
        except TimeoutError:
            log.warning("kept_output_incomplete", worker=self.id, num_read=len(ids),
                        num_generated=num_generated)
        finally:
            await reader.aclose()  # type: ignore[attr-defined]
        return tuple(ids[:num_generated]), "".join(text)

    # ================================================================ serve
    async def _serve(self, run: _Running, stream: AsyncIterator[OutputChunk]) -> None:
        """Stream one request's output to Redis until it ends or is stopped."""
        pending: list[OutputChunk] = []
        arrived = asyncio.Event()

        async def pump() -> None:
            try:
                async for chunk in stream:
                    pending.append(chunk)
                    arrived.set()
            finally:  # the stream's end or error wakes the writer too
                arrived.set()

        pump_task = asyncio.create_task(pump(), name=f"pump-{run.id}")
        try:
            with request_context(request_id=run.id):
                while True:
                    if not pending:
                        if pump_task.done():  # no finish reason will come: fail the request
                            pump_task.result()  # the engine's error, if it raised one
                            raise RuntimeError("the engine's output stream ended without "
                                               "a finish reason")
                        await arrived.wait()
                        arrived.clear()
                        continue
                    chunks, pending[:] = list(pending), []
                    if not await self._write(run, chunks):
                        return
                    last = chunks[-1].finish_reason
                    if last in ("length", "stop"):
                        await self._finish(run, last)
                        return
                    if last == "abort" or run.stop_reason is not None:
                        return
        except LeaseLost:
            log.warning("lease_lost", worker=self.id)
            run.stop_reason = "lost"
            with contextlib.suppress(NotFound):
                await self.engine.abort(run.id)
            self._forget(run, "lost")
        except Exception as error:  # the engine or Redis broke for this request
            log.exception("serve_failed", worker=self.id)
            with contextlib.suppress(NotFound):
                await self.engine.abort(run.id)
            with contextlib.suppress(QlmError):
                await self._fail(run.record, f"worker error: {error!r}", run)
            self._forget(run, "failed")
        finally:
            await cancel_and_wait([pump_task])
            run.done.set()

    async def _write(self, run: _Running, chunks: list[OutputChunk]) -> bool:
        """Append the tokens of ``chunks`` to the stream; False if the request was lost."""
        token_ids = [t for c in chunks for t in c.token_ids]
        text = "".join(c.text for c in chunks)
        if not token_ids and not text:
            return True
        if run.stop_reason == "lost":
            return False
        await self._streams.append(run.id, tuple(token_ids), text)
        run.num_generated += len(token_ids)
        run.token_ids.extend(token_ids)
        if text:
            run.text.append(text)
        self.metrics.output_tokens.labels(self.id, run.record.request.model).inc(len(token_ids))
        if run.first_token_at is None:
            run.first_token_at = self.clock()
            self._count_first_token(run.record, run.first_token_at)
            self._publish(self._event(run.record, "first_token", at=run.first_token_at,
                                      num_output_tokens=run.num_generated))
            if self.options.prefill_cap_tokens > 0:
                self.wake.set()  # its prefill is done: the cap has room for the next
        return True

    def _count_first_token(self, record: RequestRecord, at: float) -> None:
        request = record.request
        slo = "met" if at <= request.deadline_at else "missed"
        self.metrics.first_tokens.labels(self.id, request.model, request.slo_class.value,
                                         slo).inc()

    async def _finish(self, run: _Running, reason: str) -> None:
        await self.store.ack(self.id, run.id, RequestState.FINISHED,
                             num_generated=run.num_generated)
        now = self.clock()
        self._forget(run, "finished")
        self._publish(self._event(run.record, "finished", at=now,
                                  num_output_tokens=run.num_generated))
        self._publish_result(run.record, "finished", now, run, finish_reason=reason)
        log.info("request_finished", worker=self.id, num_generated=run.num_generated)

    async def _fail(self, record: RequestRecord, error: str, run: _Running | None = None) -> None:
        num_generated = run.num_generated if run else record.request.num_generated
        try:
            await self.store.ack(self.id, record.id, RequestState.FAILED,
                                 num_generated=num_generated, error=error[:1000])
        except LeaseLost:
            return
        now = self.clock()
        self.metrics.requests.labels(self.id, "failed").inc()
        self._publish(self._event(record, "failed", at=now, reason=error[:1000]))
        self._publish_result(record, "failed", now, run, error=error[:4000])
        log.warning("request_failed", worker=self.id, error=error)

    def _forget(self, run: _Running, outcome: str) -> None:
        if self.running.pop(run.id, None) is not None:
            self.metrics.requests.labels(self.id, outcome).inc()
            self.wake.set()

    # ================================================================ stopping requests
    async def _stop(self, run: _Running, reason: StopReason, keep_kv: bool = False) -> bool:
        """Abort ``run`` in the engine and wait until its streamed tokens are written.

        False if someone else is already stopping it (or it ended)."""
        if run.stop_reason is not None or run.id not in self.running:
            return False
        run.stop_reason = reason
        with contextlib.suppress(NotFound):
            await self.engine.abort(run.id, keep_kv=keep_kv)
        await run.done.wait()
        return True

    async def _evict(self, run: _Running, reason: str, keep_kv: bool = False) -> bool:
        """Requeue ``run`` keeping its progress (and, with ``keep_kv``, its KV state in
        the engine's CPU memory); publish ``evicted``. False if it was not running here
        any more."""
        with request_context(request_id=run.id):
            stop: StopReason = "shutdown" if reason == "shutdown" else "evict"
            if not await self._stop(run, stop, keep_kv):
                return False
            try:
                state = await self.store.requeue(self.id, run.id, num_generated=run.num_generated)
            except LeaseLost:
                self._forget(run, "lost")
                return False
            self._forget(run, "evicted")
            now = self.clock()
            if state is RequestState.CANCELLED:
                self._publish(self._event(run.record, "cancelled", at=now, reason="cancelled"))
                self._publish_result(run.record, "cancelled", now, run, finish_reason="abort")
            else:
                self._publish(self._event(run.record, "evicted", at=now, reason=reason,
                                          num_output_tokens=run.num_generated))
            log.info("request_evicted", worker=self.id, reason=reason,
                     num_generated=run.num_generated)
            return True

    async def _cancel(self, run: _Running) -> None:
        with request_context(request_id=run.id):
            if not await self._stop(run, "cancel"):
                return
            try:
                await self.store.ack(self.id, run.id, RequestState.CANCELLED,
                                     num_generated=run.num_generated, error="cancelled")
            except LeaseLost:
                self._forget(run, "lost")
                return
            self._forget(run, "cancelled")
            now = self.clock()
            self._publish(self._event(run.record, "cancelled", at=now, reason="cancelled",
                                      num_output_tokens=run.num_generated))
            self._publish_result(run.record, "cancelled", now, run, finish_reason="abort")
            log.info("request_cancelled", worker=self.id, num_generated=run.num_generated)

    async def _drop_lost(self, run: _Running) -> None:
        with request_context(request_id=run.id):
            log.warning("lease_lost", worker=self.id)
            if await self._stop(run, "lost"):
                self._forget(run, "lost")

    # ================================================================ renew
    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.renew_interval_s)
            try:
                await self.renew_once()
            except (Unavailable, OSError) as error:
                log.warning("renew_failed", worker=self.id, error=str(error))
            except Exception:
                log.exception("renew_failed", worker=self.id)

    async def renew_once(self) -> None:
        """Extend leases; drop lost requests; stop cancelled ones."""
        ids = [i for i, r in self.running.items() if r.stop_reason is None]
        if not ids:
            return
        renewal = await self.store.renew_leases(self.id, ids, lease_s=self.options.lease_s)
        jobs = [self._drop_lost(self.running[i]) for i in renewal.lost if i in self.running]
        jobs += [self._cancel(self.running[i]) for i in renewal.cancel_requested
                 if i in self.running]
        if jobs:
            await asyncio.gather(*jobs)

    # ================================================================ LSO
    async def on_lso(self, command: LsoCommand) -> None:
        """Carry out an LSO command addressed to this worker."""
        if command.worker != self.id:
            return
        log.info("lso_received", worker=self.id, type=command.type, command_id=command.command_id,
                 request_ids=list(command.request_ids), to_model=command.to_model)
        if command.type in ("evict", "migrate"):
            runs = [self.running[i] for i in command.request_ids if i in self.running]
            reason = command.reason or command.type
            keep_kv = command.keep_kv and command.type == "evict"
            await asyncio.gather(*(self._evict(r, reason, keep_kv) for r in runs))
        elif command.type == "swap":
            assert command.to_model is not None
            if command.to_model not in self.engine.models:
                raise InvalidInput(
                    "to_model", f"worker {self.id} holds {list(self.engine.models)}, "
                    f"not {command.to_model!r}",
                )
            await self.swap(command.to_model, reason=command.reason or "lso")
        elif command.type == "cap":
            self.set_batch_cap(command.max_batch_size)

    def set_batch_cap(self, max_batch_size: int | None) -> None:
        """Admit requests only while fewer than ``max_batch_size`` run (None: the profile's
        limit). The engine runs what the worker pulls, so the pull enforces it on every
        engine (vLLM's ``max_num_seqs`` is fixed when its engine starts)."""
        if max_batch_size == self.batch_cap:
            return
        self.batch_cap = max_batch_size
        log.info("batch_cap_set", worker=self.id, max_batch_size=max_batch_size)
        self.wake.set()  # a lifted cap may let a pull through now
        self._publish_telemetry()

    async def swap(self, to_model: str, reason: str = "") -> None:
        """Make ``to_model`` active: stop pulling, requeue running work, swap the engine."""
        async with self._swap_lock:
            current = self.engine.active_model
            if current == to_model or self.draining:
                return
            async with self._pull_lock:
                self.swapping = True
            started = time.monotonic()
            try:
                await asyncio.gather(*(self._evict(r, "swap") for r in list(self.running.values())))
                await self.engine.swap(to_model)
            finally:
                self.swapping = False
                self.wake.set()
                self._set_active_model_gauge()
            elapsed = time.monotonic() - started
            self.metrics.swaps.labels(self.id).inc()
            self.metrics.swap_seconds.labels(self.id).observe(elapsed)
            log.info("model_swapped", worker=self.id, from_model=current, to_model=to_model,
                     wall_s=round(elapsed, 4), reason=reason)
            self._publish(Event(type="swapped", model=to_model, from_model=current,
                                worker=self.id, at=self.clock(), duration_s=elapsed,
                                reason=reason[:1024] or None))
            self._publish_telemetry()

    # ================================================================ telemetry
    async def _telemetry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.telemetry_interval_s)
            try:
                self._publish_telemetry()
            except Exception:
                log.exception("telemetry_failed", worker=self.id)

    def _publish_telemetry(self) -> None:
        stats = self.engine.stats()
        now_mono = time.monotonic()
        last = self._last_stats or stats
        window_s = max(1e-9, now_mono - self._last_stats_at)
        num_steps = stats.num_steps - last.num_steps
        num_tokens = stats.num_output_tokens - last.num_output_tokens
        self._last_stats, self._last_stats_at = stats, now_mono
        m = self.metrics
        m.batch_size.labels(self.id).set(stats.batch_size)
        m.num_waiting.labels(self.id).set(stats.num_waiting)
        m.kv_used.labels(self.id).set(stats.kv_used_fraction)
        m.tokens_per_s.labels(self.id).set(num_tokens / window_s)
        predicted = observed = 0.0
        if num_steps > 0:
            predicted = (stats.step_time_predicted_s - last.step_time_predicted_s) / num_steps
            observed = (stats.step_time_observed_s - last.step_time_observed_s) / num_steps
            m.step_seconds.labels(self.id, "predicted").set(predicted)
            m.step_seconds.labels(self.id, "observed").set(observed)
        self._publish(Telemetry(
            worker=self.id,
            gpu=self.engine.gpu,
            at=self.clock(),
            model=stats.active_model,
            models=self.engine.models,
            batch_size=stats.batch_size,
            num_waiting=stats.num_waiting,
            kv_used_fraction=stats.kv_used_fraction,
            num_context_tokens=stats.kv_used_tokens,
            batch_cap=self.batch_cap,
            step_time_predicted_s=predicted,
            step_time_observed_s=observed,
            num_steps=num_steps,
        ), self.topics.telemetry)

    def _set_active_model_gauge(self) -> None:
        active = self.engine.active_model
        for model in self.engine.models:
            self.metrics.active_model.labels(self.id, model).set(1 if model == active else 0)

    # ================================================================ records
    def _event(self, record: RequestRecord, kind: Any, *, at: float, reason: str | None = None,
               num_output_tokens: int | None = None) -> Event:
        request = record.request
        return Event(
            type=kind,
            request_id=request.id,
            model=request.model,
            slo_class=request.slo_class.value,
            at=at,
            arrival_at=max(0.0, request.arrival_at),
            tenant=request.tenant,
            worker=self.id,
            num_prompt_tokens=request.prompt_tokens,
            num_output_tokens=num_output_tokens,
            reason=reason,
        )

    def _publish_result(self, record: RequestRecord, status: Any, at: float,
                        run: _Running | None, *, finish_reason: Any = None,
                        error: str | None = None) -> None:
        request = record.request
        if request.slo_class not in BATCH_CLASSES:
            return
        token_ids = run.token_ids if run else []
        first_token_at = run.first_token_at if run else record.first_token_at
        self._publish(BatchResult(
            request_id=request.id,
            model=request.model,
            status=status,
            at=at,
            arrival_at=max(0.0, request.arrival_at),
            first_token_at=first_token_at,
            worker=self.id,
            num_prompt_tokens=request.prompt_tokens,
            num_output_tokens=run.num_generated if run else request.num_generated,
            output_text="".join(run.text) if run and run.text else None,
            output_token_ids=tuple(token_ids) if len(token_ids) <= MAX_RESULT_TOKENS else None,
            finish_reason=finish_reason,
            slo_met=None if first_token_at is None else first_token_at <= request.deadline_at,
            error=error,
        ), self.topics.batch_results)

    def _publish(self, record: BusRecord, topic: str | None = None) -> None:
        """Queue ``record`` for Kafka (``qlm.events`` by default) without waiting for it.

        One sender per worker hands records to the producer in the order they were
        queued, so a request's events keep their order on its partition."""
        self._outbox.put_nowait((record, topic or self.topics.events))

    async def _send_loop(self) -> None:
        while True:
            record, topic = await self._outbox.get()
            try:
                future = await self.producer.publish_soon(topic, record)
                future.add_done_callback(self._log_publish_failure)
            except Exception as error:  # events are hints: log and carry on
                log.warning("publish_failed", worker=self.id, topic=topic, error=repr(error))
            finally:
                self._outbox.task_done()

    def _log_publish_failure(self, future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.warning("publish_failed", worker=self.id, error=repr(future.exception()))
