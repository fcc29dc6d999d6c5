"""The live status of the deployment, as the front door's status page shows it.

:class:`StatusBoard` is fed what ingest already follows for ``GET /v1/models`` (the
:class:`~services.ingest.fleet.Fleet` tail of ``qlm.events`` and ``qlm.telemetry``) and
what it reads from Redis every ``refresh_s``:

* queue depth per (model, class): the store's group index (:meth:`queue_depths`);
* SLO attainment per class: every ``first_token`` event, met when it came before the
  request's ``deadline_at`` (read from its record, pipelined, at the next refresh);
* predicted vs realised wait per class: the mean predicted wait of the requests this
  process admitted (it sees each submit, :meth:`on_submit`) against the mean of
  ``started.at - arrival_at`` (the wait until a worker took a request) of ``started``
  events, over the latest 1,000 of each; and for every ``first_token``, the scheduler's
  last forecast before the request started (read with its deadline at the next
  refresh, :meth:`RedisQueueStore.start_facts`): the mean forecast wait to the first
  token and the mean absolute error of that forecast, over the latest 1,000;
* each worker: GPU, models (awake / asleep), batch size, waiting, KV use (its latest
  telemetry), liveness;
* the latest swaps (``swapped`` events) and evictions (``evicted`` events).

Counts are since this process started (each ingest process shows what it has seen;
admissions are this process's own). ``admitted`` events are not read back from Kafka:
parsing every one would cost ingest more than the submit itself.
The aggregation is pure (records in, a JSON-able dict out); only :meth:`refresh` reads
Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from qlm.aio import cancel_and_wait
from qlm.bus.records import Event, Telemetry
from qlm.log import get_logger
from qlm.store.store import RedisQueueStore
from services.ingest.fleet import Fleet
from services.ingest.plane import Prediction, SubmitObserver, SubmitResult, SubmitSource

log = get_logger("services.ingest.status")

RECENT: Final = 12


@dataclass
class _ClassStats:
    met: int = 0
    missed: int = 0
    predicted: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    realised: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    forecast: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    forecast_error: deque[float] = field(default_factory=lambda: deque(maxlen=1000))

    def summary(self) -> dict[str, Any]:
        judged = self.met + self.missed
        return {"met": self.met, "missed": self.missed,
                "attainment": round(self.met / judged, 4) if judged else None,
                "predicted_wait_s": _mean(self.predicted),
                "realised_wait_s": _mean(self.realised),
                "samples": len(self.realised),
                "forecast_wait_s": _mean(self.forecast),
                "forecast_error_s": _mean(self.forecast_error),
                "forecast_samples": len(self.forecast)}


def _mean(values: deque[float]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


class StatusBoard:
    """What the status page shows (module docstring)."""

    def __init__(self, store: RedisQueueStore, fleet: Fleet | None, *,
                 refresh_s: float = 1.0, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.fleet = fleet
        self.refresh_s = refresh_s
        self.clock = clock
        self.started_at = clock()
        self.classes: dict[str, _ClassStats] = {}
        self.telemetry: dict[str, Telemetry] = {}
        self.swaps: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.evictions: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.num_admitted = 0
        self.num_finished = 0
        self.queue_depth: dict[str, dict[str, int]] = {}
        self._first_tokens: list[tuple[str, str, float, float]] = []  # id, class, at, arrival
        self._task: asyncio.Task[None] | None = None
        self.updated_at = 0.0

    # -------------------------------------------------------------- records (pure)
    def on_telemetry(self, record: Telemetry) -> None:
        self.telemetry[record.worker] = record

    def on_submit(self, source: SubmitSource, result: SubmitResult, slo_class: str,
                  model: str, seconds: float, prediction: Prediction | None) -> None:
        """A submit this process handled (the plane's observer)."""
        if result != "admitted":
            return
        self.num_admitted += 1
        if prediction is not None and prediction.known:
            self._stats(slo_class).predicted.append(prediction.wait_mean_s)

    def on_event(self, event: Event) -> None:
        cls = event.slo_class or "unknown"
        if event.type == "started" and event.request_id and event.arrival_at is not None:
            if event.num_output_tokens:  # resumed after an eviction: not a first wait
                return
            self._stats(cls).realised.append(max(0.0, event.at - event.arrival_at))
        elif event.type == "first_token" and event.request_id:
            arrival = event.arrival_at if event.arrival_at is not None else event.at
            self._first_tokens.append((event.request_id, cls, event.at, arrival))
        elif event.type == "finished":
            self.num_finished += 1
        elif event.type == "swapped":
            self.swaps.appendleft({"at": event.at, "worker": event.worker,
                                   "from_model": event.from_model, "model": event.model,
                                   "duration_s": event.duration_s, "reason": event.reason})
        elif event.type == "evicted":
            self.evictions.appendleft({"at": event.at, "worker": event.worker,
                                       "request_id": event.request_id, "model": event.model,
                                       "slo_class": event.slo_class, "reason": event.reason,
                                       "num_output_tokens": event.num_output_tokens})

    def _stats(self, slo_class: str) -> _ClassStats:
        return self.classes.setdefault(slo_class, _ClassStats())

    def judge(self, facts: dict[str, tuple[float | None, float | None]]) -> None:
        """Count the first tokens seen so far as met or missed, and score the last
        forecast before each started (``(deadline_at, predicted first token)`` per id)."""
        seen, self._first_tokens = self._first_tokens, []
        for request_id, slo_class, at, arrival in seen:
            deadline, predicted = facts.get(request_id, (None, None))
            if deadline is None:
                continue
            stats = self._stats(slo_class)
            if at <= deadline:
                stats.met += 1
            else:
                stats.missed += 1
            if predicted is not None:
                stats.forecast.append(max(0.0, predicted - arrival))
                stats.forecast_error.append(abs(predicted - at))

    # -------------------------------------------------------------- I/O
    async def refresh(self) -> None:
        """Re-read the queue depths and judge the first tokens seen since the last time."""
        depths = await self.store.queue_depths()
        table: dict[str, dict[str, int]] = {}
        for (model, slo_class), n in sorted(depths.items()):
            table.setdefault(model, {})[slo_class.value] = n
        self.queue_depth = table
        ids = [request_id for request_id, _, _, _ in self._first_tokens]
        self.judge(await self.store.start_facts(ids) if ids else {})
        self.updated_at = self.clock()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ingest-status")

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as error:  # Redis away: the page shows the last values
                log.warning("status_refresh_failed", error=repr(error))
            await asyncio.sleep(self.refresh_s)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])

    # -------------------------------------------------------------- view
    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows, JSON-able."""
        workers = []
        live = {w.id for w in self.fleet.roster.live()} if self.fleet is not None else set()
        known = self.fleet.roster.workers if self.fleet is not None else {}
        for worker_id, info in sorted(known.items()):
            last = self.telemetry.get(worker_id)
            workers.append({
                "id": worker_id, "gpu": info.gpu, "live": worker_id in live,
                "models": [{"name": m, "state": "awake" if m == info.active_model else "asleep"}
                           for m in info.models],
                "batch_size": last.batch_size if last else None,
                "num_waiting": last.num_waiting if last else None,
                "kv_used_fraction": round(last.kv_used_fraction, 4) if last else None,
                "heard_at": info.heard_at,
            })
        total_depth = {cls: sum(row.get(cls, 0) for row in self.queue_depth.values())
                       for cls in {c for row in self.queue_depth.values() for c in row}}
        return {
            "now": self.clock(), "updated_at": self.updated_at, "since": self.started_at,
            "num_admitted": self.num_admitted, "num_finished": self.num_finished,
            "queue_depth": self.queue_depth, "queue_depth_per_class": total_depth,
            "classes": {name: stats.summary() for name, stats in sorted(self.classes.items())},
            "workers": workers, "swaps": list(self.swaps), "evictions": list(self.evictions),
        }


class Observers:
    """Hands every submit to each of ``observers`` (metrics and the status board)."""

    def __init__(self, *observers: SubmitObserver) -> None:
        self.observers = observers

    def on_submit(self, source: SubmitSource, result: SubmitResult, slo_class: str,
                  model: str, seconds: float, prediction: Prediction | None) -> None:
        for observer in self.observers:
            observer.on_submit(source, result, slo_class, model, seconds, prediction)
