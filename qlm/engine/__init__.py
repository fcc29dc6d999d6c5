"""Engines that run a model for a worker: simulated (CPU) or vLLM (GPU); see :mod:`.base`.

:func:`make_engine` picks one by name; the vLLM engine module (and vLLM itself) is
imported only when ``"vllm"`` is chosen.
"""

from qlm.engine.base import Engine, EngineRequest, EngineStats, OutputChunk, Progress

__all__ = ["Engine", "EngineRequest", "EngineStats", "OutputChunk", "Progress"]
