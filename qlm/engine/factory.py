"""Pick an engine by name. vLLM is imported only when ``"vllm"`` is chosen."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qlm.core.errors import InvalidInput
from qlm.core.perf import ProfileBook
from qlm.engine.base import Engine
from qlm.engine.simulated import DEFAULT_MAX_PREFILL_TOKENS, SimulatedEngine

ENGINE_KINDS = ("sim", "vllm")


def make_engine(
    kind: str,
    gpu: str,
    models: Sequence[str],
    profiles: ProfileBook,
    *,
    time_scale: float = 1.0,
    max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
    vllm_options: Any = None,
) -> Engine:
    """An engine for ``models`` on ``gpu`` (the first model awake).

    ``sim`` needs a profile per (model, gpu); ``vllm`` takes a
    :class:`qlm.engine.vllm_engine.VllmOptions` (default options when None).
    """
    if not models:
        raise InvalidInput("models", "at least one model is needed")
    if kind == "sim":
        return SimulatedEngine(
            [profiles.get(m, gpu) for m in models],
            active_model=models[0],
            time_scale=time_scale,
            max_prefill_tokens=max_prefill_tokens,
        )
    if kind == "vllm":
        from qlm.engine.vllm_engine import VllmEngine, VllmOptions

        known = {m: profiles.get(m, gpu) for m in models if profiles.has(m, gpu)}
        return VllmEngine(gpu, models, vllm_options or VllmOptions(), known)
    raise InvalidInput("engine", f"unknown engine {kind!r}; expected one of {ENGINE_KINDS}")
