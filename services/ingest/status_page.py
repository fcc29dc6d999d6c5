"""The status page: one HTML document (``status.html`` beside this module) that polls
``status.json`` every second.

No external scripts or styles (the page must work on a machine without network). Every
number has an element id (``depth-<model>-<class>``, ``attainment-<class>``,
``batch-<worker>``, ``num-admitted`` ...) so that a browser test can read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

STATUS_HTML: Final = (Path(__file__).parent / "status.html").read_text(encoding="utf-8")
