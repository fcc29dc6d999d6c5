"""The engine interface: what a worker needs from the thing that runs the model.

One small async protocol, :class:`Engine`, with two implementations: the simulated
engine (:mod:`qlm.engine.simulated`, follows a performance profile in real time, no
GPU) and the vLLM engine (:mod:`qlm.engine.vllm_engine`, vLLM's AsyncLLM in-process;
imported only when chosen, see :func:`qlm.engine.make_engine`).

Contract (every implementation):

* ``add(request)`` admits a request for the *active* model and returns an async
  iterator of :class:`OutputChunk`. Chunks carry the new output tokens in order;
  ``num_generated`` counts all output tokens including the progress the request
  brought with it (``EngineRequest.num_generated``). The last chunk has
  ``finish_reason`` set ("length": ``max_tokens`` reached, "stop": end of sequence,
  "abort": aborted) and may carry tokens. Iteration ends after it. Raises
  :class:`InvalidInput` (nothing admitted) for a request of a model that is not
  active, a duplicate id, or a request that can never fit the engine.
* ``abort(request_id)`` stops a request and returns its :class:`Progress` (output
  tokens generated so far, including what it was admitted with), so the caller can
  requeue it and resume it later with :meth:`EngineRequest.resumed`. Its iterator
  ends with an "abort" chunk; output the engine had produced but not yet delivered
  may ride on that chunk (vLLM), so a caller that streams keeps what it received
  (the iterator's total) rather than ``Progress``. Aborting an unknown or finished
  id raises :class:`NotFound`. ``keep_kv=True`` asks the engine to keep the request's
  KV state in CPU memory, so that adding it again with the same context restores that
  state instead of recomputing it (an engine that cannot does a plain abort).
* ``sleep(model)`` / ``wake(model)`` change which model is active; ``swap(to_model)``
  makes ``to_model`` active (a no-op if it is): ``sleep(current)`` then ``wake(to_model)``,
  or both at once where the engine can hold both (the vLLM engine, when the models' GPU
  shares add up to at most the card). ``sleep`` (and ``swap``) requires the model to have no
  requests (abort or finish them first) else InvalidInput; while asleep or swapping
  ``active_model`` is None and ``add`` refuses. ``wake`` of a model the engine does
  not hold raises InvalidInput.
* ``stats()`` is a synchronous read of gauges (batch size, KV use) and cumulative
  counters (steps, step time observed vs predicted, tokens); callers diff counters
  over their own window. Times are in *engine seconds*: what the step would take on
  the real GPU (for a time-scaled simulated engine, wall time × time scale).
* ``start()`` / ``close()`` bracket the engine's life; ``close`` aborts what runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from typing import Literal, Protocol, runtime_checkable

from qlm.core.errors import InvalidInput

FinishReason = Literal["length", "stop", "abort"]


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One request as an engine runs it.

    The prompt is token ids (``prompt_token_ids``), text (``prompt_text``) or chat
    messages (``prompt_messages``: ``{"role", "content"}`` mappings, rendered by the
    model's chat template); ``prompt_tokens`` is its length in tokens (an estimate for
    text and chat until an engine with the model's tokenizer encodes it:
    :func:`qlm.engine.text.tokenized`).
    ``num_generated`` / ``generated_token_ids`` are progress kept from an earlier run
    (eviction): the engine re-prefills prompt + those tokens and generates the rest,
    up to ``max_tokens`` output tokens in total. ``ignore_eos`` makes the output
    exactly ``max_tokens`` long (trace replay; off by default: a model's end of sequence
    ends its output). ``stop``: strings that end the output (not included in its text).
    """

    request_id: str
    model: str
    prompt_tokens: int
    max_tokens: int
    prompt_token_ids: tuple[int, ...] | None = None
    prompt_text: str | None = None
    prompt_messages: tuple[Mapping[str, str], ...] | None = None
    num_generated: int = 0
    generated_token_ids: tuple[int, ...] = ()
    generated_text: str = ""
    ignore_eos: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.request_id:
            raise InvalidInput("request_id", "must not be empty")
        if self.prompt_tokens <= 0:
            raise InvalidInput("prompt_tokens", f"must be > 0, got {self.prompt_tokens}")
        if not 0 <= self.num_generated < self.max_tokens:
            raise InvalidInput(
                "num_generated",
                f"must be in [0, max_tokens={self.max_tokens}), got {self.num_generated}",
            )
        if self.prompt_token_ids is not None and len(self.prompt_token_ids) != self.prompt_tokens:
            raise InvalidInput(
                "prompt_token_ids",
                f"has {len(self.prompt_token_ids)} ids but prompt_tokens={self.prompt_tokens}",
            )

    @property
    def remaining_tokens(self) -> int:
        return self.max_tokens - self.num_generated

    @property
    def context_tokens(self) -> int:
        """Tokens to prefill when admitted: the prompt plus the progress kept."""
        return self.prompt_tokens + self.num_generated

    def resume_prompt_ids(self) -> list[int] | None:
        """Prompt ids to prefill on (re)admission: prompt + kept output ids (None for text)."""
        if self.prompt_token_ids is None:
            return None
        return [*self.prompt_token_ids, *self.generated_token_ids]

    def resumed(self, progress: Progress) -> EngineRequest:
        """This request continued after ``progress`` (its output so far) was kept."""
        return replace(
            self,
            num_generated=progress.num_generated,
            generated_token_ids=progress.token_ids,
            generated_text=progress.text,
        )


@dataclass(frozen=True, slots=True)
class OutputChunk:
    """New output of one request; ``finish_reason`` set on the last chunk."""

    request_id: str
    token_ids: tuple[int, ...]
    num_generated: int
    text: str = ""
    finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class Progress:
    """What an aborted request had produced: all its output tokens so far."""

    request_id: str
    num_generated: int
    token_ids: tuple[int, ...] = ()
    text: str = ""


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Gauges now plus counters since the engine started (see the module contract)."""

    active_model: str | None
    batch_size: int
    num_waiting: int
    kv_used_tokens: int
    kv_capacity_tokens: int
    num_steps: int = 0
    step_time_observed_s: float = 0.0
    step_time_predicted_s: float = 0.0
    num_output_tokens: int = 0
    num_swaps: int = 0

    @property
    def kv_used_fraction(self) -> float:
        if self.kv_capacity_tokens <= 0:
            return 0.0
        return min(1.0, self.kv_used_tokens / self.kv_capacity_tokens)


@runtime_checkable
class Engine(Protocol):
    """See the module docstring for the contract."""

    @property
    def gpu(self) -> str: ...

    @property
    def models(self) -> tuple[str, ...]: ...

    @property
    def active_model(self) -> str | None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def add(self, request: EngineRequest) -> AsyncIterator[OutputChunk]: ...

    async def abort(self, request_id: str, keep_kv: bool = False) -> Progress: ...

    async def sleep(self, model: str) -> None: ...

    async def wake(self, model: str) -> None: ...

    async def swap(self, to_model: str) -> None: ...

    def stats(self) -> EngineStats: ...
