"""Whether a request fits some worker that serves its model: the one admission check of
a request's size, shared by the services (ingest refuses it) and the simulator (refused
at arrival, reported apart from SLO misses).

A worker holds one sequence of at most ``max_model_len`` tokens (prompt + output: vLLM
refuses ``prompt + max_tokens`` beyond it) and, whatever the batch, never more than its
KV cache (``kv_capacity_tokens``). A request is *refused* when ``prompt_tokens +
max_tokens`` is beyond the :class:`SequenceLimit` of every worker serving its model: no
schedule can ever run it, so queueing it would only leave it waiting until its deadline
(or, in the simulator, until the run's horizon). A model that no worker serves is a
different refusal (:class:`~qlm.core.errors.NotServed`); with no limit known, nothing is
refused here.

A worker can serve a model when a profile exists for (model, its GPU) and the profile's
GPU count fits the worker's (:func:`can_serve`, the same rule the planner applies).

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from qlm.core.errors import InvalidInput
from qlm.core.perf import PerfProfile, ProfileBook


@dataclass(frozen=True, slots=True)
class SequenceLimit:
    """The longest sequence one worker serving a model takes: its ``max_model_len`` and
    (when known) its KV cache in tokens."""

    max_model_len: int
    kv_capacity_tokens: int | None = None

    @classmethod
    def of(cls, profile: PerfProfile) -> SequenceLimit:
        return cls(profile.max_model_len, profile.kv_capacity_tokens)

    @property
    def tokens(self) -> int:
        """Prompt + output tokens this worker accepts at most."""
        if self.kv_capacity_tokens is None:
            return self.max_model_len
        return min(self.max_model_len, self.kv_capacity_tokens)

    def capped(self, max_model_len: int) -> SequenceLimit:
        """This limit under a deployment's own ``max_model_len`` (e.g. a models file)."""
        return SequenceLimit(min(self.max_model_len, max_model_len), self.kv_capacity_tokens)

    def describe(self) -> str:
        """The binding limit, for an error message: ``max_model_len M`` or ``KV capacity K``."""
        if self.kv_capacity_tokens is not None and self.kv_capacity_tokens < self.max_model_len:
            return f"KV capacity {self.kv_capacity_tokens}"
        return f"max_model_len {self.max_model_len}"


def can_serve(profiles: ProfileBook, model: str, gpu: str, num_gpus: int) -> bool:
    """Whether a worker of ``num_gpus`` GPUs of type ``gpu`` can run ``model``."""
    return profiles.has(model, gpu) and profiles.get(model, gpu).num_gpus <= num_gpus


def serving_limits(profiles: ProfileBook, model: str,
                   workers: Iterable[tuple[str, int]]) -> tuple[SequenceLimit, ...]:
    """The limits of the workers (``(gpu, num_gpus)`` each) that can serve ``model``."""
    return tuple(SequenceLimit.of(profiles.get(model, gpu)) for gpu, num_gpus in workers
                 if can_serve(profiles, model, gpu, num_gpus))


def refusal(model: str, prompt_tokens: int, max_tokens: int,
            limits: Iterable[SequenceLimit]) -> InvalidInput | None:
    """Why a request of ``prompt_tokens + max_tokens`` fits none of ``limits`` (the
    workers serving ``model``), or None when it fits one (or no limit is known).

    The error names ``prompt`` when the prompt alone leaves no room for one output token
    on every worker, else ``max_tokens``, with the sizes and the largest limit."""
    known = list(limits)
    if not known:
        return None
    total = prompt_tokens + max_tokens
    best = max(known, key=lambda limit: limit.tokens)
    if total <= best.tokens:
        return None
    if prompt_tokens >= best.tokens:
        return InvalidInput(
            "prompt", f"prompt too long for every worker serving model {model!r}: "
            f"{prompt_tokens} prompt tokens + 1 output token > {best.describe()}")
    return InvalidInput(
        "max_tokens", f"prompt + max_tokens too long for every worker serving model {model!r}: "
        f"{prompt_tokens} + {max_tokens} = {total} tokens > {best.describe()}")


def check_fits(model: str, prompt_tokens: int, max_tokens: int,
               limits: Iterable[SequenceLimit]) -> None:
    """Raise :func:`refusal`'s InvalidInput when the request fits no worker."""
    error = refusal(model, prompt_tokens, max_tokens, limits)
    if error is not None:
        raise error
