"""Errors of the queue store, in the families of :mod:`qlm.core.errors`."""

from __future__ import annotations

from qlm.core.errors import InvalidInput, QlmError


class IdempotencyConflict(InvalidInput):
    """A request id was reused with a different payload (gRPC INVALID_ARGUMENT).

    ``field`` names the first record field whose stored value differs.
    """

    def __init__(self, request_id: str, field: str, stored: str) -> None:
        shown = stored if len(stored) <= 80 else stored[:77] + "..."
        super().__init__(
            field,
            f"request id {request_id!r} already exists with a different {field} (stored: {shown})",
        )
        self.request_id = request_id


class LeaseLost(QlmError):
    """The worker no longer holds the request: its lease expired and it was requeued
    (perhaps pulled by another worker), or it finished, or it was never pulled.

    The worker must stop serving the request and must not report on it again.
    """

    def __init__(self, request_id: str, worker_id: str, state: str, holder: str) -> None:
        holder_text = f" on worker {holder!r}" if holder else ""
        super().__init__(
            f"worker {worker_id!r} does not hold request {request_id!r} (now {state}{holder_text})"
        )
        self.request_id = request_id
        self.worker_id = worker_id
        self.state = state
        self.holder = holder


class FenceLost(QlmError):
    """A scheduler wrote with a fencing token that is no longer the current one (another
    replica took the lease): nothing was written, and it must stop acting as leader."""

    def __init__(self, fence: int) -> None:
        super().__init__(f"fencing token {fence} is no longer current; nothing was written")
        self.fence = fence
