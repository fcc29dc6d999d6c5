"""Online correction of the scheduler's profiles from telemetry (``--online-correction``).

The same correction the estimator service applies (:meth:`RWTEstimator.with_observation`:
an EWMA of observed/predicted decode step time per (model, GPU)), turned into a
:class:`ProfileBook` whose decode coefficients are multiplied by the factor, so that the
policies — which read profiles, not the estimator — plan with the corrected speed.

A new book is built only when some factor moved by more than ``min_change`` (relative)
since the book in use was built: the policies memoise per profile book, and rebuilding
it on every small move would throw their memos away every step. Pure: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

from qlm.core.errors import InvalidInput
from qlm.core.estimator import RWTEstimator
from qlm.core.perf import PerfProfile, ProfileBook

if TYPE_CHECKING:  # the bus (aiokafka, structlog) is not needed to correct profiles
    from qlm.bus.records import Telemetry


def corrected(profile: PerfProfile, factor: float) -> PerfProfile:
    """``profile`` with every decode step time multiplied by ``factor``."""
    return replace(profile, decode_base_s=profile.decode_base_s * factor,
                   decode_per_seq_s=profile.decode_per_seq_s * factor,
                   decode_per_ctx_token_s=profile.decode_per_ctx_token_s * factor)


class CorrectedProfiles:
    """The measured profiles, corrected by telemetry; :meth:`book` is what policies use."""

    def __init__(self, profiles: ProfileBook, min_change: float = 0.1) -> None:
        if not (math.isfinite(min_change) and min_change >= 0):
            raise InvalidInput("correction_min_change", f"must be >= 0, got {min_change}")
        self.base = profiles
        self.min_change = min_change
        self.estimator = RWTEstimator(profiles)
        self._applied: dict[tuple[str, str], float] = {}
        self._book = profiles

    def on_telemetry(self, record: Telemetry) -> bool:
        """Fold in one telemetry window (windows without steps are heartbeats: skipped)."""
        if record.model is None:
            return False
        return self.observe(record.model, record.gpu, record.step_time_predicted_s,
                            record.step_time_observed_s)

    def observe(self, model: str, gpu: str, predicted_s: float, observed_s: float) -> bool:
        """Fold in one window's mean step time: ``predicted_s`` by the *uncorrected*
        profile (what workers report), ``observed_s`` measured. False if skipped."""
        if predicted_s <= 0 or observed_s <= 0 or not self.base.has(model, gpu):
            return False
        before = self.estimator.correction(model, gpu)
        self.estimator = self.estimator.with_observation(
            model, gpu, predicted_s * before, observed_s)
        return True

    def book(self) -> ProfileBook:
        """The corrected book; the same object until a factor moved by ``min_change``."""
        factors = dict(self.estimator.corrections)
        moved = any(abs(f / self._applied.get(k, 1.0) - 1.0) > self.min_change
                    for k, f in factors.items())
        if moved:
            self._applied = factors
            self._book = ProfileBook({key: corrected(p, factors.get(key, 1.0))
                                      for key, p in self.base.profiles.items()})
        return self._book

    @property
    def factors(self) -> dict[tuple[str, str], float]:
        """The factors of the book in use."""
        return dict(self._applied)
