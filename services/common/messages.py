"""Wire translations more than one service uses: the estimator API's SLO class.

The estimator's servicer reads ``slo_class`` with :data:`SLO_CLASS_FROM_PB` (unset means
interactive); ingest's remote predictor writes it with :data:`SLO_CLASS_TO_PB`.
"""

from __future__ import annotations

from typing import Final

from qlm.api.v1 import qlm_pb2 as pb
from qlm.core.types import SLOClass

SLO_CLASS_FROM_PB: Final = {
    pb.SLO_CLASS_UNSPECIFIED: SLOClass.INTERACTIVE,
    pb.SLO_CLASS_INTERACTIVE: SLOClass.INTERACTIVE,
    pb.SLO_CLASS_BATCH_1: SLOClass.BATCH_1,
    pb.SLO_CLASS_BATCH_2: SLOClass.BATCH_2,
    pb.SLO_CLASS_CUSTOM: SLOClass.CUSTOM,
}
SLO_CLASS_TO_PB: Final = {c: p for p, c in SLO_CLASS_FROM_PB.items() if p}
