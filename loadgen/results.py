"""Benchmark results: shown on stdout and written as JSON where ``--out`` says."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def emit(result: Mapping[str, Any], out: Path | None, shown: Any = None) -> None:
    """Print ``shown`` (default: the whole result) as JSON; write ``result`` to ``out``
    (its folder created) when given."""
    print(json.dumps(result if shown is None else shown, indent=2))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
