"""Pick an engine by name. vLLM is imported only when ``"vllm"`` is chosen."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from qlm.core.errors import InvalidInput
from qlm.core.perf import ProfileBook
from qlm.engine.base import Engine
from qlm.engine.simulated import DEFAULT_MAX_PREFILL_TOKENS, SimulatedEngine
from qlm.engine.text import TextModel
from qlm.roster import ModelEntry

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
    entries: Mapping[str, ModelEntry] | None = None,
) -> Engine:
    """An engine for ``models`` on ``gpu`` (the first model awake).

    ``sim`` needs a profile per (model, gpu); ``vllm`` takes a
    :class:`qlm.engine.vllm_engine.VllmOptions` (default options when None).
    ``entries``: the models as the workers file names them; a checkpoint ``path`` gives
    the simulated engine the model's tokenizer (real text), the vLLM engine its weights.
    """
    if not models:
        raise InvalidInput("models", "at least one model is needed")
    entries = entries or {}
    if kind == "sim":
        return SimulatedEngine(
            [profiles.get(m, gpu) for m in models],
            active_model=models[0],
            time_scale=time_scale,
            max_prefill_tokens=max_prefill_tokens,
            text_models=load_text_models(entries.values()),
        )
    if kind == "vllm":
        from qlm.engine.vllm_engine import VllmEngine, VllmOptions

        known = {m: profiles.get(m, gpu) for m in models if profiles.has(m, gpu)}
        return VllmEngine(gpu, models, vllm_options or VllmOptions(), known, entries)
    raise InvalidInput("engine", f"unknown engine {kind!r}; expected one of {ENGINE_KINDS}")


def load_text_models(entries: Iterable[ModelEntry]) -> dict[str, TextModel]:
    """The tokenizer side of each entry that names a checkpoint; InvalidInput names the
    model whose directory is unusable."""
    out = {}
    for entry in entries:
        if entry.path is None:
            continue
        try:
            out[entry.name] = TextModel.load(entry.path)
        except InvalidInput as error:
            raise InvalidInput(f"models.{entry.name}.path", error.problem) from None
    return out
