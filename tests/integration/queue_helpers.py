"""Helpers shared by the queue store tests: a settable clock and small requests."""

from __future__ import annotations

from qlm.core.types import SLO, GroupKey, Request, SLOClass

WINDOW_S = 10.0
T0 = 1_000_000.0


class FakeClock:
    """A settable clock: ``clock()`` returns ``clock.now``."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_request(
    request_id: str,
    *,
    model: str = "llama-8b",
    slo_class: SLOClass = SLOClass.INTERACTIVE,
    arrival_at: float = T0,
    ttft_s: float | None = None,
    max_tokens: int = 64,
    prompt_tokens: int = 100,
) -> Request:
    return Request(
        id=request_id,
        model=model,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        slo_class=slo_class,
        slo=SLO.for_class(slo_class, ttft_s),
        arrival_at=arrival_at,
    )


def group_of(request: Request) -> GroupKey:
    return GroupKey(request.model, request.slo_class, int(request.arrival_at // WINDOW_S),
                    request.tenant)
