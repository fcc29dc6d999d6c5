"""Which workers exist and what each one is now: the static half of a :class:`WorkerView`.

The scheduler and the estimator both need, for every live worker, its GPU type, the
models it holds and the awake one. The Redis store knows only what runs where; the rest
comes from two sources, merged here:

* a **workers file** (the YAML the worker service reads,
  ``{"workers": [{id, gpu, models: [...]}, ...]}``, first model awake at start): workers
  known before they say anything;
* **telemetry** (``qlm.telemetry``, one record per worker per interval) and worker events
  (``started`` / ``first_token`` / ``finished`` / ``evicted`` on ``qlm.events``): a worker
  that reports is alive; telemetry also names its GPU and awake model (and its resident
  models when the record carries them).

Liveness is judged on *bus time*, the latest report heard from any worker (never earlier
than the roster's start): a worker is live while its own last report (its start, for a
declared worker not heard from yet) is within ``timeout_s`` of that. So a worker that
dies while the others keep reporting drops out after ``timeout_s``; but when nobody is
heard any more (Kafka unreachable, the tail stopped) bus time stands still and every
worker keeps its standing: a bus outage never empties the virtual queues. It also makes
liveness immune to clock skew between the workers and the reader. ``timeout_s = 0``
keeps every known worker live forever (no liveness check).

:meth:`WorkerRoster.views` builds the views with ``running=()``: the store snapshot fills
the running requests (:meth:`qlm.store.StoreSnapshot.to_queue_snapshot`). KV capacity and
batch limit are the profile's for the awake model on the worker's GPU. Pure: time is
passed in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from qlm.bus.records import Event, Telemetry
from qlm.core.errors import InvalidInput
from qlm.core.perf import ProfileBook
from qlm.core.types import WorkerView


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What the roster knows of one worker. ``heard_at`` is None until it reports."""

    id: str
    gpu: str
    models: tuple[str, ...]
    active_model: str | None
    heard_at: float | None = None


def read_workers_file(path: Path) -> tuple[WorkerInfo, ...]:
    """The workers of a workers file (format in the module docstring); InvalidInput names
    the bad entry."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise InvalidInput("workers_file", f"cannot read {path}: {error}") from None
    return workers_from(data, Path(path).name)


def workers_from(data: Any, where: str = "workers_file") -> tuple[WorkerInfo, ...]:
    entries = data.get("workers") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise InvalidInput(f"{where}.workers", "must be a non-empty list")
    infos = []
    for i, entry in enumerate(entries):
        at = f"{where}.workers[{i}]"
        if not isinstance(entry, dict):
            raise InvalidInput(at, "must be a mapping with id, gpu and models")
        for name in ("id", "gpu"):
            if not isinstance(entry.get(name), str) or not entry[name]:
                raise InvalidInput(f"{at}.{name}", "must be a non-empty string")
        models = entry.get("models")
        if not isinstance(models, list) or not models or not all(
            isinstance(m, str) and m for m in models
        ):
            raise InvalidInput(f"{at}.models", "must be a non-empty list of model names")
        infos.append(WorkerInfo(entry["id"], entry["gpu"], tuple(models), models[0]))
    if len({w.id for w in infos}) != len(infos):
        raise InvalidInput(f"{where}.workers", "worker ids must be unique")
    return tuple(infos)


class WorkerRoster:
    """The known workers; updated by ``on_telemetry`` / ``on_event``; read by ``views``."""

    def __init__(self, declared: Iterable[WorkerInfo] = (), *, timeout_s: float = 10.0,
                 started_at: float = 0.0) -> None:
        if not (math.isfinite(timeout_s) and timeout_s >= 0):
            raise InvalidInput("worker_timeout_s", f"must be >= 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.started_at = started_at
        self._workers: dict[str, WorkerInfo] = {w.id: w for w in declared}
        self.bus_time = started_at

    @property
    def workers(self) -> Mapping[str, WorkerInfo]:
        return dict(self._workers)

    def on_telemetry(self, record: Telemetry) -> None:
        """A worker reported: it is alive, on ``record.gpu``, with ``record.model`` awake."""
        self.bus_time = max(self.bus_time, record.at)
        known = self._workers.get(record.worker)
        models = tuple(getattr(record, "models", None) or ())
        if known is None:
            models = models or ((record.model,) if record.model else ())
            self._workers[record.worker] = WorkerInfo(
                record.worker, record.gpu, models, record.model, record.at)
            return
        if record.model and record.model not in models:
            models = (*(models or known.models), record.model)
            models = tuple(dict.fromkeys(models))
        self._workers[record.worker] = replace(
            known, gpu=record.gpu, models=models or known.models, active_model=record.model,
            heard_at=max(record.at, known.heard_at or record.at))

    def on_event(self, event: Event) -> None:
        """A worker event (started, first_token, finished, evicted) shows it is alive."""
        if event.worker is None or event.worker not in self._workers:
            return
        self.bus_time = max(self.bus_time, event.at)
        known = self._workers[event.worker]
        self._workers[event.worker] = replace(known, heard_at=max(event.at, known.heard_at or 0.0))

    def is_live(self, worker: WorkerInfo) -> bool:
        """Whether ``worker`` reported within ``timeout_s`` of bus time (module docstring)."""
        if self.timeout_s == 0:
            return True
        last = worker.heard_at if worker.heard_at is not None else self.started_at
        return self.bus_time - last <= self.timeout_s

    def live(self, now: float | None = None) -> tuple[WorkerInfo, ...]:
        """Live workers, by id (``now`` is not needed: liveness runs on bus time)."""
        return tuple(w for _, w in sorted(self._workers.items()) if self.is_live(w))

    def views(self, now: float, profiles: ProfileBook) -> tuple[WorkerView, ...]:
        """Views of the live workers that have a profile for at least one of their models
        (``now``: the time of the snapshot they go into)."""
        return tuple(v for w in self.live(now) if (v := view_of(w, profiles)) is not None)


def view_of(worker: WorkerInfo, profiles: ProfileBook) -> WorkerView | None:
    """The static view of ``worker`` (no running requests); None when no profile fits."""
    served = [m for m in worker.models if profiles.has(m, worker.gpu)]
    if not served:
        return None
    limits_of = worker.active_model if worker.active_model in served else served[0]
    profile = profiles.get(limits_of, worker.gpu)
    return WorkerView(
        id=worker.id,
        gpu=worker.gpu,
        models=tuple(served),
        active_model=worker.active_model if worker.active_model in served else None,
        kv_capacity_tokens=profile.kv_capacity_tokens,
        max_batch_size=profile.max_batch_size,
        num_gpus=profile.num_gpus,
    )
