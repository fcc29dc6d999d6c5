"""Benchmark results: shown on stdout and written as JSON where ``--out`` says.

Every measured JSON in ``docs/results/`` is written only by the program that measured
it. Each writer declares the top-level keys it may write (``RESULT_KEYS`` in its module);
:func:`emit` refuses to write a key the writer did not declare, and
``tests/unit/test_results_keys.py`` fails when a committed JSON holds a key its writer
(named by the JSON's ``command``) does not declare: a field added by hand is caught.
Commentary on a result goes in ``docs/results/README.md``, never into its JSON.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any


def undeclared(result: Mapping[str, Any], keys: Collection[str]) -> list[str]:
    """The top-level keys of ``result`` that its writer did not declare."""
    return sorted(k for k in result if k not in keys)


def write_json(path: Path, result: Mapping[str, Any], keys: Collection[str],
               indent: int = 2) -> None:
    """Write ``result`` to ``path`` (its folder created), or raise ValueError naming the
    keys its writer did not declare (nothing written)."""
    extra = undeclared(result, keys)
    if extra:
        raise ValueError(f"result keys not declared by the writer: {', '.join(extra)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=indent) + "\n")


def emit(result: Mapping[str, Any], out: Path | None, shown: Any = None, *,
         keys: Collection[str]) -> None:
    """Print ``shown`` (default: the whole result) as JSON; write ``result`` to ``out``
    when given (:func:`write_json`: only the writer's declared ``keys``). The result is
    printed first, so a refused write loses no measurement."""
    print(json.dumps(result if shown is None else shown, indent=2))
    if out is not None:
        write_json(out, result, keys)
