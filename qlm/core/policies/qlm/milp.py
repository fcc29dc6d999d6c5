"""The exact ``qlm`` plan: a mixed-integer program solved by ``scipy.optimize.milp``
(HiGHS) within a branch-and-bound node budget.

The formulation (positions k = 0..K−1 per worker w, K = number of groups, times
relative to ``now``, means only):

* ``x[g,w,k] ∈ {0,1}``: g at position k of w; Σ_{w,k} x = 1 per g; Σ_g x[·,w,k] ≤ 1;
  positions filled contiguously (Σ_g x[·,w,k+1] ≤ Σ_g x[·,w,k]).
* ``z[w,k,m] ∈ {0,1}``: a swap *into* model m before position k:
  z ≥ Σ_{g∈m} x[g,w,k] − Σ_{g∈m} x[g,w,k−1] (k=0: the active model counts as position −1).
* ``E[w,k]`` (lane drained after k) ≥ E[w,k−1] + Σ_g S_{gw}·x[g,w,k] + Σ_m c_{wm}·z[w,k,m],
  E[w,−1] = the running work's drain time; ``B[w,k]`` (position k's start) ≥ B[w,k−1],
  ≥ E[w,k−1] − Σ_g lead_{gw}·x[g,w,k] (a same-model group starts when a slot frees),
  ≥ E[w,k−1] + c_{wm} − M(1 − z[w,k,m]) (after a swap: full drain plus the swap).
* ``t_g ≥ B[w,k] + prefill_{gw} − M(1 − x[g,w,k])``: the group's first-token time.
* ``u[g,j] ∈ {0,1}``: deadline quantile j of g is met:
  t_g + q_j·Σ spread_{gw}·x[g,w,k] ≤ d_{gj} + M(1 − u[g,j]) (the linearised SLO term).
* maximise Σ weight_g·size_g/J·u[g,j] − ε·Σ t_g.

Every time variable is bounded to [0, horizon] (horizon: all work and one swap per group
after the running work), and each big-M is the smallest value that leaves its
constraint slack when the indicator is 0, which keeps the LP relaxation tight.

:func:`milp_plan` builds it in named steps (instance data, variables, constraints,
objective), solves it and reads the plan back. Variables and rows are added in a fixed
order: the solver's path, hence the plan within a node budget, depends on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qlm.core.policies.planning import DEADLINE_QUANTILES, GroupStats, Lane, Service
from qlm.core.policies.qlm.context import Plan, PlanningContext


@dataclass(frozen=True)
class _Instance:
    """The numbers the program is written in, computed once from the planning context."""

    stats: Sequence[GroupStats]
    lanes: Sequence[Lane]
    now: float
    num_g: int
    num_w: int
    models: list[str]
    svc: dict[tuple[int, int], Service | None]
    allowed: list[tuple[int, int]]  # (group, worker) pairs with a profile
    swap_cost: dict[tuple[int, str], float]
    horizon: float
    time_hi: float  # every time variable lies in [0, time_hi]
    xs_of_g: dict[int, list[tuple[int, int]]]
    gs_on_w: dict[int, list[int]]

    @property
    def positions(self) -> range:
        return range(self.num_g)

    def service(self, g: int, w: int) -> Service:
        s = self.svc[(g, w)]
        assert s is not None  # only asked for allowed pairs
        return s


@dataclass
class _Program:
    """Variables (bounds, integrality, index by name) and constraint rows being built."""

    names: dict[tuple[Any, ...], int] = field(default_factory=dict)
    lower: list[float] = field(default_factory=list)
    upper: list[float] = field(default_factory=list)
    integral: list[int] = field(default_factory=list)
    rows: list[dict[int, float]] = field(default_factory=list)
    row_lo: list[float] = field(default_factory=list)
    row_hi: list[float] = field(default_factory=list)

    def var(self, name: tuple[Any, ...], lo: float, hi: float, is_int: bool) -> int:
        self.names[name] = len(self.lower)
        self.lower.append(lo)
        self.upper.append(hi)
        self.integral.append(1 if is_int else 0)
        return self.names[name]

    def row(self, coefs: dict[int, float], lo: float, hi: float) -> None:
        self.rows.append(coefs)
        self.row_lo.append(lo)
        self.row_hi.append(hi)

    def __getitem__(self, name: tuple[Any, ...]) -> int:
        return self.names[name]


def milp_plan(pc: PlanningContext, time_limit_s: float, node_limit: int = 2000) -> Plan | str:
    """The exact plan of the module docstring, or a string saying why there is none."""
    if time_limit_s <= 0 or node_limit <= 0:
        return "no budget"
    if not pc.stats:
        return Plan(tuple(() for _ in pc.snapshot.workers), 0.0, "milp")
    inst = _instance(pc)
    if isinstance(inst, str):
        return inst
    program = _Program()
    _add_variables(program, inst)
    _add_assignment_rows(program, inst)
    _add_lane_rows(program, inst)
    _add_first_token_rows(program, inst)
    _add_deadline_rows(program, inst)
    result = _solve(program, _objective(program, inst, pc), time_limit_s, node_limit)
    if result.x is None:
        return f"status {result.status}: {result.message}"
    return _read_back(pc, program, inst, result)


def _instance(pc: PlanningContext) -> _Instance | str:
    """The program's data, or why there is no program ("no profile": no group fits any worker)."""
    cost, stats, now = pc.cost, pc.stats, pc.now
    lanes = pc.fresh_lanes()
    num_g, num_w = len(stats), len(lanes)
    models = sorted({g.model for g in stats})
    svc = {(g, w): cost.service(g, w) for g in range(num_g) for w in range(num_w)}
    allowed = [(g, w) for (g, w), s in svc.items() if s is not None]
    if not allowed:
        return "no profile"
    swap_cost = {(w, m): cost.swap_s(w, m, lanes[w].initial[0]) for w in range(num_w)
                 for m in models}
    finite_swaps = [c for c in swap_cost.values() if math.isfinite(c)]
    horizon = (max(lane.initial[2] for lane in lanes) - now
               + sum(max((s.mean_s + s.prefill_s for (gg, _), s in svc.items()
                          if gg == g and s is not None), default=0.0)  # none: unplaceable
                     for g in range(num_g))
               + num_g * (max(finite_swaps) if finite_swaps else 0.0))
    max_prefill = max(sv.prefill_s for sv in svc.values() if sv is not None)
    xs_of_g: dict[int, list[tuple[int, int]]] = {}
    for g, w in allowed:
        xs_of_g.setdefault(g, []).append((g, w))
    gs_on_w = {w: [g for g, ww in allowed if ww == w] for w in range(num_w)}
    return _Instance(stats, lanes, now, num_g, num_w, models, svc, allowed, swap_cost, horizon,
                     horizon + max_prefill + 1.0, xs_of_g, gs_on_w)


def _add_variables(p: _Program, inst: _Instance) -> None:
    """x (placement), then per lane and position z (swap into m), E (drained), B (start),
    then per group t (first token) and u (deadline quantile met)."""
    for g, w in inst.allowed:
        for k in inst.positions:
            p.var(("x", g, w, k), 0, 1, True)
    for w in range(inst.num_w):
        for k in inst.positions:
            for m in inst.models:
                hi = 1.0 if math.isfinite(inst.swap_cost[(w, m)]) else 0.0
                p.var(("z", w, k, m), 0, hi, True)
            p.var(("E", w, k), 0.0, inst.time_hi, False)
            p.var(("B", w, k), 0.0, inst.time_hi, False)
    placeable = {g for g, _ in inst.allowed}
    for g in range(inst.num_g):
        p.var(("t", g), 0.0, inst.time_hi, False)
        for j in range(len(DEADLINE_QUANTILES)):  # a group no worker can serve meets nothing
            p.var(("u", g, j), 0, 1 if g in placeable else 0, True)


def _add_assignment_rows(p: _Program, inst: _Instance) -> None:
    """Each placeable group at exactly one position of one worker."""
    for g in range(inst.num_g):
        pairs = inst.xs_of_g.get(g, [])
        if pairs:
            p.row({p[("x", g, w, k)]: 1.0 for _, w in pairs for k in inst.positions}, 1, 1)


def _add_lane_rows(p: _Program, inst: _Instance) -> None:
    """Per worker and position, in this order: one group at most, contiguous positions,
    swap indicators, drain time E, start time B."""
    big_m = inst.time_hi
    for w in range(inst.num_w):
        tail0, seg0, end0, _ = inst.lanes[w].initial
        seg0, end0 = seg0 - inst.now, end0 - inst.now
        on_w = inst.gs_on_w[w]
        for k in inst.positions:
            here = {p[("x", g, w, k)]: 1.0 for g in on_w}
            if here:
                p.row(dict(here), -math.inf, 1)
            if k > 0 and here:
                coefs = dict(here)
                for g in on_w:
                    coefs[p[("x", g, w, k - 1)]] = -1.0
                p.row(coefs, -math.inf, 0)
            for m in inst.models:
                coefs = {p[("z", w, k, m)]: 1.0}
                for g in on_w:
                    if inst.stats[g].model == m:
                        coefs[p[("x", g, w, k)]] = -1.0
                        if k > 0:
                            coefs[p[("x", g, w, k - 1)]] = 1.0
                lo = -1.0 if (k == 0 and tail0 == m) else 0.0
                p.row(coefs, lo, math.inf)
            e, b = p[("E", w, k)], p[("B", w, k)]
            prev_e = p[("E", w, k - 1)] if k > 0 else None
            # E[w,k] >= E[w,k-1] + sum S x + sum c z
            coefs = {e: 1.0}
            for g in on_w:
                coefs[p[("x", g, w, k)]] = -inst.service(g, w).mean_s
            for m in inst.models:
                if math.isfinite(inst.swap_cost[(w, m)]):
                    coefs[p[("z", w, k, m)]] = -inst.swap_cost[(w, m)]
            if prev_e is not None:
                coefs[prev_e] = -1.0
            p.row(coefs, 0.0 if prev_e is not None else end0, math.inf)
            # B[w,k] >= B[w,k-1]  (or the free time)
            if k > 0:
                p.row({b: 1.0, p[("B", w, k - 1)]: -1.0}, 0.0, math.inf)
            else:
                p.row({b: 1.0}, seg0, math.inf)
            # B[w,k] >= E[w,k-1] - sum lead x
            coefs = {b: 1.0}
            for g in on_w:
                coefs[p[("x", g, w, k)]] = inst.service(g, w).lead_s
            if prev_e is not None:
                coefs[prev_e] = -1.0
            p.row(coefs, 0.0 if prev_e is not None else end0, math.inf)
            # B[w,k] >= E[w,k-1] + c_m - M (1 - z)
            for m in inst.models:
                c = inst.swap_cost[(w, m)]
                if not math.isfinite(c):
                    continue
                coefs = {b: 1.0, p[("z", w, k, m)]: -(c + big_m)}
                if prev_e is not None:
                    coefs[prev_e] = -1.0
                p.row(coefs, -big_m if prev_e is not None else end0 - big_m, math.inf)


def _add_first_token_rows(p: _Program, inst: _Instance) -> None:
    """t_g >= B[w,k] + prefill - M (1 - x[g,w,k])."""
    big_m = inst.time_hi
    for g, w in inst.allowed:
        s = inst.service(g, w)
        t = p[("t", g)]
        for k in inst.positions:
            p.row({t: 1.0, p[("B", w, k)]: -1.0, p[("x", g, w, k)]: -big_m},
                  s.prefill_s - big_m, math.inf)


def _add_deadline_rows(p: _Program, inst: _Instance) -> None:
    """t_g + q_j·spread ≤ d_gj + M (1 − u[g,j]): the linearised SLO term."""
    for g in range(inst.num_g):
        t = p[("t", g)]
        spreads = [sv.spread_s for (gg, _), sv in inst.svc.items() if gg == g and sv is not None]
        for j, (q, d) in enumerate(zip(DEADLINE_QUANTILES, inst.stats[g].deadline_points,
                                       strict=True)):
            # the tightest M that keeps u = 0 feasible: how late t + q·spread can be
            m_gj = max(0.0, inst.time_hi + q * max(spreads, default=0.0) - (d - inst.now))
            coefs = {t: 1.0, p[("u", g, j)]: m_gj}
            for _, w in inst.xs_of_g.get(g, []):
                s = inst.service(g, w)
                for k in inst.positions:
                    coefs[p[("x", g, w, k)]] = q * s.spread_s
            p.row(coefs, -math.inf, d - inst.now + m_gj)


def _objective(p: _Program, inst: _Instance, pc: PlanningContext) -> np.ndarray:
    """Minimise −Σ weight·size/J·u + ε·Σ t (ε breaks ties towards earlier first tokens)."""
    num_j = len(DEADLINE_QUANTILES)
    objective = np.zeros(len(p.lower))
    eps = 1e-2 / max(1.0, inst.horizon * inst.num_g)
    for g in range(inst.num_g):
        objective[p[("t", g)]] = eps
        for j in range(num_j):
            objective[p[("u", g, j)]] = -pc.weight(g) * inst.stats[g].size / num_j
    return objective


def _solve(p: _Program, objective: np.ndarray, time_limit_s: float, node_limit: int) -> Any:
    """HiGHS on the program within the node budget (the time limit is a backstop)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_array

    r_idx, c_idx, vals = [], [], []
    for i, coefs in enumerate(p.rows):
        for c, v in coefs.items():
            r_idx.append(i)
            c_idx.append(c)
            vals.append(v)
    matrix = coo_array((vals, (r_idx, c_idx)), shape=(len(p.rows), len(p.lower))).tocsr()
    return milp(
        objective,
        constraints=LinearConstraint(matrix, np.array(p.row_lo), np.array(p.row_hi)),
        integrality=np.array(p.integral),
        bounds=Bounds(np.array(p.lower), np.array(p.upper)),
        options={"time_limit": time_limit_s, "node_limit": node_limit, "presolve": True,
                 "mip_rel_gap": 1e-7},
    )


def _read_back(pc: PlanningContext, p: _Program, inst: _Instance, result: Any) -> Plan:
    """Each worker's groups in position order, scored by the planning model."""
    orders: list[list[tuple[int, int]]] = [[] for _ in range(inst.num_w)]
    for g, w in inst.allowed:
        for k in inst.positions:
            if result.x[p[("x", g, w, k)]] > 0.5:
                orders[w].append((k, g))
    final = tuple(tuple(g for _, g in sorted(o)) for o in orders)
    return Plan(final, pc.score(final), "milp" if result.status == 0 else "milp (budget hit)")
