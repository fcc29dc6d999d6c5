"""Which models some worker serves now: the one answer to "is this model served?".

Ingest refuses a submit (gRPC FAILED_PRECONDITION naming ``model``; a Kafka record goes
to ``qlm.dlq``) for a catalogue model that no live worker holds, and ListModels lists
only served models; any other front door of the ingest service asks the same object.

The source is worker telemetry (``qlm.telemetry``: every worker reports its GPU and the
models it holds at least every ``telemetry_interval_s``), kept in a
:class:`qlm.roster.WorkerRoster` as the scheduler and the estimator keep theirs. A worker
is live while it reported within ``timeout_s`` of the latest report heard (bus time,
see :mod:`qlm.roster`). Until the first report, and for at most ``timeout_s`` after the
start, the answer is *unknown* and nothing is refused (a fresh ingest next to running
workers hears them within a telemetry interval); after that, silence means that nobody
serves anything. ``timeout_s = 0`` turns the check off (every catalogue model counts as
served). Pure: records and time are passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from qlm.bus.records import Telemetry
from qlm.core.errors import NotServed
from qlm.roster import WorkerRoster
from qlm.submission import ModelLimits


class ServedModels:
    """The catalogue models that live workers hold (module docstring)."""

    def __init__(self, catalogue: Mapping[str, ModelLimits], timeout_s: float,
                 clock: Callable[[], float]) -> None:
        self.catalogue = dict(catalogue)
        self.timeout_s = timeout_s
        self.clock = clock
        self.started_at = clock()
        self.roster = WorkerRoster(timeout_s=timeout_s, started_at=self.started_at)
        self.num_reports = 0

    def on_telemetry(self, record: Telemetry) -> None:
        self.roster.on_telemetry(record)
        self.num_reports += 1

    def on_record(self, topic: str, value: bytes | None) -> None:
        """A ``qlm.telemetry`` record from a :class:`qlm.bus.tail.TopicTail`; a malformed
        one is ignored (InvalidInput raised for the tail to log)."""
        if value is not None:
            self.on_telemetry(Telemetry.from_json(value))

    @property
    def checking(self) -> bool:
        return self.timeout_s > 0

    def known(self) -> bool:
        """Whether the answer is known yet (module docstring)."""
        if not self.checking:
            return False
        return self.num_reports > 0 or self.clock() - self.started_at >= self.timeout_s

    def served(self) -> frozenset[str]:
        """Models held by a live worker (every catalogue model while unknown)."""
        if not self.known():
            return frozenset(self.catalogue)
        return frozenset(m for w in self.roster.live() for m in w.models)

    def check(self, model: str) -> None:
        """Raise NotServed (naming ``model``) when no live worker holds ``model``."""
        if not self.known() or model in self.served():
            return
        served = ", ".join(sorted(m for m in self.served() if m in self.catalogue)) or "none"
        raise NotServed("model", f"no worker serves {model!r} now; served models: {served}")

    def list(self) -> list[ModelLimits]:
        """The catalogue entries of the served models, by name."""
        served = self.served()
        return sorted((m for m in self.catalogue.values() if m.name in served),
                      key=lambda m: m.name)

