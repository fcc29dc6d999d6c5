"""What a simulation is given: jobs (requests with their true output length), workers, knobs."""

from __future__ import annotations

from dataclasses import dataclass

from qlm.core.errors import InvalidInput
from qlm.core.pulls import DEFAULT_EXPECTED_OUTPUT_TOKENS
from qlm.core.types import Request
from qlm.sim.batching import PREFILL_MODES


@dataclass(frozen=True, slots=True)
class Job:
    """A request plus what only the simulated engine knows: its true output length."""

    request: Request
    output_tokens: int

    def __post_init__(self) -> None:
        if not 1 <= self.output_tokens <= self.request.max_tokens:
            raise InvalidInput(
                "output_tokens",
                f"must be in [1, max_tokens={self.request.max_tokens}], got {self.output_tokens}",
            )


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One model instance: ``num_gpus`` GPUs of type ``gpu``.

    ``models`` are resident (awake or asleep: waking costs ``wake_s``); any other
    model the GPU has a profile for costs ``cold_load_s``. ``active_model`` is
    awake at the start (must be in ``models``).
    """

    id: str
    gpu: str
    active_model: str
    models: tuple[str, ...]
    num_gpus: int = 1
    #: The GPU it shares with the other workers naming it (None: its own); the policy
    #: sees it (:attr:`WorkerView.device`), the simulated engines do not slow each other.
    device: str | None = None

    def __post_init__(self) -> None:
        if self.active_model not in self.models:
            raise InvalidInput(f"worker {self.id}.active_model", "must be one of its models")
        if self.num_gpus <= 0:
            raise InvalidInput(f"worker {self.id}.num_gpus", "must be > 0")


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Simulation knobs.

    * ``tick_s``: period of the scheduler's tick (virtual seconds);
    * ``group_window_s``: arrival window of a request group;
    * ``min_decision_interval_s``: decisions triggered by events closer than this
      are coalesced into one (0: one per distinct event time);
    * ``max_prefill_tokens``: prompt tokens one prefill step admits at most (at least
      one request), like vLLM's ``max_num_batched_tokens``;
    * ``pcie_gb_s``: GPU↔CPU bandwidth for KV state swaps (GB/s);
    * ``horizon_s``: the run stops this long after the last arrival; requests not
      served by then count as missed;
    * ``expected_output_tokens``: the KV reservation of the backpressure pull;
    * ``prefill_mode``: the engine model (:data:`qlm.sim.batching.PREFILL_MODES`):
      ``whole`` prefills admitted requests in one step while the batch waits;
      ``chunked`` is vLLM's: each step has a budget of ``max_prefill_tokens`` tokens,
      one per decoding request first, then prompt chunks; a request joins one step
      late (asynchronous scheduling) and every token reaches the client the profile's
      output latency after its step;
    * ``colocation_slowdown``: workers of one ``device`` share a card and slow each
      other: a step of one takes ``1 + colocation_slowdown × load`` times its profile's,
      ``load`` the others' running batch as a share of their ``max_batch_size``, as it
      stands when the step (or a decode segment) starts (0: engines do not interfere).
    """

    tick_s: float = 1.0
    group_window_s: float = 1.0
    min_decision_interval_s: float = 0.25
    max_prefill_tokens: int = 8192
    pcie_gb_s: float = 25.0
    horizon_s: float = 6 * 3600.0
    expected_output_tokens: int = DEFAULT_EXPECTED_OUTPUT_TOKENS
    prefill_mode: str = "chunked"
    colocation_slowdown: float = 0.0

    def __post_init__(self) -> None:
        for name in ("tick_s", "group_window_s", "pcie_gb_s", "horizon_s"):
            if getattr(self, name) <= 0:
                raise InvalidInput(f"sim.{name}", "must be > 0")
        if self.min_decision_interval_s < 0:
            raise InvalidInput("sim.min_decision_interval_s", "must be >= 0")
        if not self.colocation_slowdown >= 0:
            raise InvalidInput("sim.colocation_slowdown", "must be >= 0")
        if self.max_prefill_tokens <= 0:
            raise InvalidInput("sim.max_prefill_tokens", "must be > 0")
        if self.prefill_mode not in PREFILL_MODES:
            raise InvalidInput("sim.prefill_mode", f"must be one of {PREFILL_MODES}, "
                               f"got {self.prefill_mode!r}")
