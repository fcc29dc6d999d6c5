"""vLLM engine arguments given per model in the workers file, checked before vLLM loads.

A model entry of the workers file may carry ``engine_args``: any argument of vLLM's
``AsyncEngineArgs`` (vLLM 0.25), e.g.::

    models:
      - name: qwen2.5-1.5b
        path: /models/Qwen2.5-1.5B-Instruct
        engine_args: {tensor_parallel_size: 1, max_model_len: 8192,
                      gpu_memory_utilization: 0.4, quantization: fp8, dtype: bfloat16}

:func:`check_engine_args` checks the common ones here, without vLLM (types and ranges,
an error naming ``<where>.engine_args.<name>``); the others pass as given and
:func:`check_known_to_vllm` checks their names against ``AsyncEngineArgs`` when the
vLLM engine starts. Arguments the worker sets itself (:data:`RESERVED`) are refused.
``load_format: dummy`` (random weights of the checkpoint's shape) is a benchmark option,
never a default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from qlm.core.errors import InvalidInput

#: Set by the worker: the checkpoint path, sleep mode for swaps, qlm's own tokenizing.
RESERVED = frozenset({"model", "enable_sleep_mode", "skip_tokenizer_init"})
DTYPES = frozenset({"auto", "half", "float16", "bfloat16", "float", "float32"})


def _int(minimum: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, got {value!r}"
        return None if value >= minimum else f"must be >= {minimum}, got {value}"
    return check


def _share(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return f"must be a number, got {value!r}"
    return None if 0 < value <= 1 else f"must be in (0, 1], got {value}"


def _number(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return f"must be a number, got {value!r}"
    return None if value >= 0 else f"must be >= 0, got {value}"


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value:
        return None
    return f"must be a non-empty string, got {value!r}"


def _text_or_null(value: Any) -> str | None:
    return None if value is None else _text(value)


def _dtype(value: Any) -> str | None:
    return None if value in DTYPES else f"must be one of {sorted(DTYPES)}, got {value!r}"


CHECKS: dict[str, Callable[[Any], str | None]] = {
    "tensor_parallel_size": _int(1),
    "pipeline_parallel_size": _int(1),
    "data_parallel_size": _int(1),
    "max_model_len": _int(1),
    "max_num_seqs": _int(1),
    "max_num_batched_tokens": _int(1),
    "block_size": _int(1),
    "seed": _int(0),
    "kv_cache_memory_bytes": _int(1),
    "gpu_memory_utilization": _share,
    "swap_space": _number,
    "cpu_offload_gb": _number,
    "quantization": _text_or_null,
    "kv_cache_dtype": _text,
    "load_format": _text,
    "tokenizer_mode": _text,
    "revision": _text_or_null,
    "dtype": _dtype,
    "enforce_eager": _bool,
    "enable_prefix_caching": _bool,
    "enable_chunked_prefill": _bool,
    "trust_remote_code": _bool,
}


def check_engine_args(args: Any, where: str = "engine_args") -> dict[str, Any]:
    """``args`` as a dict of engine arguments, or InvalidInput naming the bad one."""
    if args is None:
        return {}
    if not isinstance(args, Mapping):
        raise InvalidInput(where, f"must be a mapping of vLLM engine arguments, got {args!r}")
    out: dict[str, Any] = {}
    for name, value in args.items():
        at = f"{where}.{name}"
        if not isinstance(name, str) or not name.isidentifier():
            raise InvalidInput(at, "is not an argument name")
        if name in RESERVED:
            raise InvalidInput(at, "is set by the worker; leave it out")
        check = CHECKS.get(name)
        problem = check(value) if check is not None else None
        if problem is not None:
            raise InvalidInput(at, problem)
        out[name] = value
    return out


def check_known_to_vllm(names: Iterable[str], known: Iterable[str], where: str,
                        version: str = "") -> None:
    """InvalidInput naming the first of ``names`` that is not in ``known`` (the fields of
    vLLM's ``AsyncEngineArgs``)."""
    fields = frozenset(known)
    for name in names:
        if name not in fields:
            raise InvalidInput(f"{where}.{name}",
                               f"is not an engine argument of vLLM {version}".rstrip())
