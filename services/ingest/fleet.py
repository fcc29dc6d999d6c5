"""Which models some live worker serves now, for ``GET /v1/models``.

Ingest learns the fleet the way the scheduler and the estimator do: a
:class:`qlm.roster.WorkerRoster` fed by worker telemetry (``qlm.telemetry``: GPU, awake
model, resident models) and worker events (``qlm.events``: liveness), followed with a
:class:`qlm.bus.tail.TopicTail` from the topics' end, plus the workers of
``--workers-file`` when given. A model is *served* when a live worker holds it and the
catalogue (``--models-file`` or the profiles) knows it; it is ``awake`` when some live
worker has it awake, ``asleep`` otherwise (a swap brings it back).

A new ingest process knows a worker after its first telemetry record (one
``telemetry_interval_s``, 1 s by default).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from qlm.aio import cancel_and_wait
from qlm.bus.records import Event, Telemetry
from qlm.bus.security import PLAINTEXT, KafkaAuth
from qlm.bus.tail import TopicTail
from qlm.bus.topics import TopicNames
from qlm.log import get_logger
from qlm.roster import WorkerInfo, WorkerRoster
from qlm.submission import ModelLimits

log = get_logger("services.ingest.fleet")

ModelState = Literal["awake", "asleep"]


class FleetListener(Protocol):
    def on_telemetry(self, record: Telemetry) -> None: ...

    def on_event(self, event: Event) -> None: ...


@dataclass(frozen=True, slots=True)
class ServedModel:
    """A model some live worker holds: its limits, state and the workers holding it
    (``gpus``: their GPU types, once each)."""

    limits: ModelLimits
    state: ModelState
    workers: tuple[str, ...]
    awake_on: tuple[str, ...]
    gpus: tuple[str, ...] = ()


def served_models(workers: tuple[WorkerInfo, ...],
                  catalogue: Mapping[str, ModelLimits]) -> list[ServedModel]:
    """The catalogue's models held by ``workers`` (live ones), by name. Pure."""
    out = []
    for name in sorted(catalogue):
        holders = tuple(w for w in workers if name in w.models)
        if not holders:
            continue
        awake = tuple(w.id for w in workers if w.active_model == name)
        gpus = tuple(dict.fromkeys(w.gpu for w in holders))
        out.append(ServedModel(catalogue[name], "awake" if awake else "asleep",
                               tuple(w.id for w in holders), awake, gpus))
    return out


class Fleet:
    """The roster of live workers, kept current from Kafka between start and stop."""

    def __init__(self, bootstrap_servers: str, topics: TopicNames,
                 catalogue: Mapping[str, ModelLimits], *,
                 declared: tuple[WorkerInfo, ...] = (), timeout_s: float = 10.0,
                 clock: Callable[[], float], auth: KafkaAuth = PLAINTEXT) -> None:
        self.catalogue = dict(catalogue)
        self.topics = topics
        self.roster = WorkerRoster(declared, timeout_s=timeout_s, started_at=clock())
        self._tail = TopicTail(bootstrap_servers, [topics.telemetry, topics.events],
                               self._on_record, client_id="qlm-ingest-fleet", auth=auth)
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[FleetListener] = []
        #: Telemetry records heard since the start (0: nothing known of the fleet yet).
        self.num_reports = 0

    def listen(self, listener: FleetListener) -> None:
        """Also hand every telemetry record and event to ``listener`` (the status board)."""
        self._listeners.append(listener)

    def _on_record(self, topic: str, value: bytes | None) -> None:
        if value is None:
            return
        if topic == self.topics.telemetry:
            telemetry = Telemetry.model_validate_json(value)
            self.roster.on_telemetry(telemetry)
            self.num_reports += 1
            for listener in self._listeners:
                listener.on_telemetry(telemetry)
        elif b'"worker"' in value:  # worker events (liveness, swaps, evictions, first tokens)
            event = Event.model_validate_json(value)
            self.roster.on_event(event)
            for listener in self._listeners:
                listener.on_event(event)

    def models(self) -> list[ServedModel]:
        return served_models(self.roster.live(), self.catalogue)

    async def start(self) -> None:
        await self._tail.start()
        self._task = asyncio.create_task(self._tail.run(), name="ingest-fleet")

    async def stop(self) -> None:
        await self._tail.stop()
        if self._task is not None:
            await cancel_and_wait([self._task])
