"""The runtime shared by every environment that runs qlm's scheduling core.

:mod:`qlm.runtime.apply` says once what a :class:`~qlm.core.types.Decision` means and
carries it out through a small :class:`~qlm.runtime.apply.Effects` protocol that the
simulator, the scheduler service and the GPU harness each implement. Pure: no I/O.
"""

from qlm.runtime.apply import DEFAULT_REJECT_REASON, Effects, apply, virtual_queues

__all__ = ["DEFAULT_REJECT_REASON", "Effects", "apply", "virtual_queues"]
