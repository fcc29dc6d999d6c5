"""Discrete-event simulator of a GPU cluster driven by a qlm scheduling policy.

Pure: virtual time only; the wall-clock timer that measures decision time is
injected by the caller. See :mod:`qlm.sim.engine` for the model.
"""

from qlm.sim.cluster import Job, SimConfig, WorkerSpec
from qlm.sim.engine import Simulation, simulate
from qlm.sim.metrics import RequestRecord, RunMetrics, RunResult

__all__ = [
    "Job",
    "RequestRecord",
    "RunMetrics",
    "RunResult",
    "SimConfig",
    "Simulation",
    "WorkerSpec",
    "simulate",
]
