"""Whether a model is served now: the one answer to "may this model be submitted?".

Ingest refuses a submit (gRPC FAILED_PRECONDITION naming ``model``; a Kafka record goes
to ``qlm.dlq``) for a catalogue model that no live worker holds, and ListModels lists
only served models. A submission too long for every live worker holding its model (its
prompt + ``max_tokens`` beyond each one's ``max_model_len`` or KV cache, by the profile
of the worker's GPU: :func:`qlm.core.fit.refusal`, the simulator's check too) is refused
as invalid input naming ``prompt`` or ``max_tokens``. The fleet view behind it is
:class:`services.ingest.fleet.Fleet`
(worker telemetry and events in a :class:`qlm.roster.WorkerRoster`; a worker is live
while it reported within ``worker_timeout_s`` of the latest report), the same one the
HTTP front door's ``/v1/models`` reads.

Until the first worker report, and for at most ``grace_s`` after the start, the answer
is *unknown* and nothing is refused (a fresh ingest next to running workers hears them
within a telemetry interval); after that, silence means that nobody serves anything.
``grace_s = 0`` (or no fleet) turns the check off: every catalogue model counts as
served.
"""

from __future__ import annotations

from collections.abc import Callable

from qlm.core.errors import NotServed
from qlm.core.fit import check_fits
from qlm.submission import ModelLimits, Submission
from services.ingest.fleet import Fleet


class ServedModels:
    """The catalogue models that live workers hold (module docstring)."""

    def __init__(self, fleet: Fleet | None, grace_s: float,
                 clock: Callable[[], float]) -> None:
        self.fleet = fleet
        self.grace_s = grace_s
        self.clock = clock
        self.started_at = clock()

    @property
    def checking(self) -> bool:
        return self.fleet is not None and self.grace_s > 0

    def known(self) -> bool:
        """Whether the answer is known yet (module docstring)."""
        if self.fleet is None or not self.checking:
            return False
        return self.fleet.num_reports > 0 or self.clock() - self.started_at >= self.grace_s

    def served(self) -> list[ModelLimits]:
        """The served catalogue models, by name (all of them while unknown)."""
        assert self.fleet is not None or not self.known()
        if self.fleet is None or not self.known():
            catalogue = self.fleet.catalogue if self.fleet is not None else {}
            return sorted(catalogue.values(), key=lambda m: m.name)
        return [m.limits for m in self.fleet.models()]

    def check(self, submission: Submission) -> None:
        """Raise NotServed (naming ``model``) when no live worker holds the submission's
        model, or InvalidInput (naming ``prompt`` or ``max_tokens``) when it is too long
        for every live worker holding it (module docstring)."""
        if not self.known():
            return
        assert self.fleet is not None
        model = submission.model
        served = {m.limits.name: m for m in self.fleet.models()}
        if model not in served:
            raise NotServed("model", f"no worker serves {model!r} now; served models: "
                            f"{', '.join(sorted(served)) or 'none'}", model)
        limits = served[model].limits.sequence_limits(served[model].gpus)
        check_fits(model, submission.num_prompt_tokens, submission.max_tokens, limits)

    def list(self) -> list[ModelLimits]:
        """The catalogue entries of the served models, by name."""
        return self.served()
