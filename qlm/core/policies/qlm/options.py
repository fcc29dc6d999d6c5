"""The options of the ``qlm`` policy: one frozen dataclass, parsed by
:func:`qlm.core.policies.base.parse_options`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from qlm.core.errors import InvalidInput
from qlm.core.policies.base import option
from qlm.core.policies.planning import output_stats_from
from qlm.core.types import SLOClass


@dataclass(frozen=True, slots=True)
class QlmOptions:
    """Tuning knobs of the qlm scheduler (see the package docstring for what each step does)."""

    milp_max_cells: int = option(12, "use the MILP when groups × workers ≤ this", ge=0)
    milp_time_limit_s: float = option(
        2.0, "wall-clock backstop of the MILP (the node limit is the real budget)", ge=0)
    milp_node_limit: int = option(
        100, "branch-and-bound nodes the MILP may spend (deterministic budget)", ge=0)
    improve_budget: int = option(400, "lane walks the local search may spend", ge=0)
    late_insert_budget: int = option(
        300, "placements the early placement of late and hopeless groups may spend "
        "(0: such groups last)",
        ge=0)
    hopeless_p: float = option(
        0.02, "a group below this p_meet on every candidate goes last", ge=0, le=1)
    displace_below_p: float = option(
        0.5, "a group below this p_meet may displace one earlier group", ge=0, le=1)
    evict: bool = option(True, "evict looser requests to make room for a head group")
    evict_lookahead_groups: int = option(
        32, "groups at the head of a lane that evictions provide for", ge=0)
    evict_budget: int = option(
        256, "evictions one decision may issue in all (the rest wait for the next)", ge=0)
    evict_rate_credit: float = option(
        0.5, "fraction of the modelled decode rate trusted when counting freed slots", ge=0)
    colocated_loose_batch: int = option(
        0, "while a worker sharing this one's GPU (workers file 'device') has interactive "
        "work and a full KV pool, this worker admits at most this many requests beyond its "
        "own interactive ones, more as that pool empties (0: no such cap)", ge=0)
    colocated_pause_share: float = option(
        0.0, "while a worker sharing this one's GPU (workers file 'device') has interactive "
        "work and at least this share of its KV pool reserved, this worker admits only its "
        "own interactive requests (0: never)", ge=0, le=1)
    evict_prefill_aware: bool = option(
        True, "count decode time only after the prompts ahead are prefilled")
    kv_state_swap: bool = option(
        False, "move an evicted request's KV state over PCIe when cheaper than recompute")
    service_scale: float = option(
        1.0, "multiplies every modelled service time (how much slower workers really are)",
        gt=0)
    pcie_gb_per_s: float = option(25.0, "PCIe bandwidth for KV state swaps (GB/s)", gt=0)
    reject_late: bool = option(False, "reject requests whose deadline has passed")
    reject_unservable: bool = option(
        False, "reject requests of a model no worker of the snapshot can serve")
    spare_versatile: bool = option(
        False, "surely met work goes to the least versatile GPU shape (throughput first)")
    fair_share: bool = option(
        True, "within an SLO class, serve the tenant with the least virtual token counter first")
    fair_input_weight: float = option(
        1.0, "fair share: counter cost of a prompt token admitted", ge=0)
    fair_output_weight: float = option(
        2.0, "fair share: counter cost of an output token generated", ge=0)
    class_weights: Mapping[str, float] = option(
        {}, "weight of each SLO class in the objective {class: weight} (default 1)", ge=0)
    output_stats: Mapping[str, Any] = option(
        {}, "per-model output length {model: [mean, std]}; '*' covers the others")
    #: ``class_weights`` by SLO class (derived).
    weights: Mapping[SLOClass, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        weights: dict[SLOClass, float] = {}
        for name, value in self.class_weights.items():
            try:
                weights[SLOClass(name)] = float(value)
            except ValueError:
                raise InvalidInput(f"options.class_weights.{name}", "unknown SLO class") from None
        object.__setattr__(self, "weights", MappingProxyType(weights))
        object.__setattr__(self, "output_stats",
                           MappingProxyType(output_stats_from(self.output_stats)))
