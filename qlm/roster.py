"""Which workers exist and what each one is now: the static half of a :class:`WorkerView`.

The scheduler and the estimator both need, for every live worker, its GPU type, the
models it holds and the awake one. The Redis store knows only what runs where; the rest
comes from two sources, merged here:

* a **workers file** (the YAML the worker service reads,
  ``{"workers": [{id, gpu, models: [...]}, ...]}``, first model awake at start): workers
  known before they say anything. A model is a name, or a mapping ``{name, path,
  engine_args}``: ``path`` a Hugging Face-format checkpoint directory on the worker's
  host (weights, config, tokenizer, chat template), ``engine_args`` vLLM engine
  arguments (:mod:`qlm.engine.engine_args`); profiles stay keyed by (name, GPU); an
  optional ``device`` names the physical GPU a worker shares with the other workers that
  name it (several engines side by side on one card: :attr:`WorkerView.device`);
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from qlm.bus.records import Event, Telemetry
from qlm.core.errors import InvalidInput
from qlm.core.perf import ProfileBook
from qlm.core.types import WorkerView
from qlm.engine.engine_args import check_engine_args


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """A model as the workers file names it: where its checkpoint is on the worker's host
    (None: a name only, e.g. a shape for dummy weights or a simulated model) and the vLLM
    engine arguments it is served with."""

    name: str
    path: Path | None = None
    engine_args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What the roster knows of one worker. ``heard_at`` is None until it reports;
    ``model_entries``: its models as the workers file describes them (empty otherwise)."""

    id: str
    gpu: str
    models: tuple[str, ...]
    active_model: str | None
    heard_at: float | None = None
    model_entries: tuple[ModelEntry, ...] = ()
    device: str | None = None


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
        unknown = set(entry) - {"id", "gpu", "models", "device"}
        if unknown:
            raise InvalidInput(f"{at}.{sorted(unknown)[0]}", "unknown field")
        device = entry.get("device")
        if device is not None and (not isinstance(device, str) or not device):
            raise InvalidInput(f"{at}.device", "must be a non-empty string (the GPU the "
                               "worker shares with the others naming it)")
        models = entry.get("models")
        if not isinstance(models, list) or not models:
            raise InvalidInput(f"{at}.models", "must be a non-empty list of models")
        found = tuple(model_entry(m, f"{at}.models[{j}]") for j, m in enumerate(models))
        names = tuple(m.name for m in found)
        if len(set(names)) != len(names):
            raise InvalidInput(f"{at}.models", "a model appears twice")
        infos.append(WorkerInfo(entry["id"], entry["gpu"], names, names[0],
                                model_entries=found, device=device))
    if len({w.id for w in infos}) != len(infos):
        raise InvalidInput(f"{where}.workers", "worker ids must be unique")
    return tuple(infos)


def model_entry(value: Any, where: str) -> ModelEntry:
    """One model of a workers file: a name or ``{name, path, engine_args}``."""
    if isinstance(value, str) and value:
        return ModelEntry(value)
    if not isinstance(value, dict):
        raise InvalidInput(where, "must be a model name or a mapping with name, path, engine_args")
    unknown = set(value) - {"name", "path", "engine_args"}
    if unknown:
        raise InvalidInput(f"{where}.{sorted(unknown)[0]}", "unknown field")
    name, path = value.get("name"), value.get("path")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{where}.name", "must be a non-empty string")
    if path is not None and (not isinstance(path, str) or not path):
        raise InvalidInput(f"{where}.path", "must be a checkpoint directory (a string)")
    args = check_engine_args(value.get("engine_args"), f"{where}.engine_args")
    return ModelEntry(name, Path(path) if path else None, args)


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
        device=worker.device,
    )
