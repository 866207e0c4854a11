"""Knapsack solvers: multiple-choice (one level per unit) and 0/1 over items.

After Aflalo et al., "Knapsack Pruning with Inner Distillation". For layer-level
allocation, picking one level per unit from the per-unit error table under the budget is
a *multiple-choice* knapsack: solved exactly by MILP (HiGHS through scipy) or fast by
Lagrangian relaxation along each unit's lower convex hull, which also gives a lower
bound and so a certified gap. For structured pruning, items (channels, heads) with a
value (first-order Taylor importance, computed by the caller) and an integer cost form a
0/1 knapsack: exact DP after dividing costs by their GCD, or greedy by value/cost.
"""

from __future__ import annotations

import math
from functools import reduce
from typing import NamedTuple

import numpy as np
import scipy.optimize
import scipy.sparse

from allocsearch.search.budget import FEASIBILITY_RTOL, InfeasibleBudgetError

# Cells (items x capacity steps) above which the exact 0/1 DP refuses (memory: 1 byte each).
MAX_DP_CELLS = 200_000_000


def check_table(error: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated float64 (error, cost) tables [L, K] and bool[L, K] usable = both finite.

    Shared by every table solver. Raises ValueError for mismatched shapes, units with no
    usable level, or negative costs.
    """
    error = np.asarray(error, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.float64)
    if error.ndim != 2 or error.shape != cost.shape:
        raise ValueError(f"error {error.shape} and cost {cost.shape} must both be [L, K]")
    usable = np.isfinite(error) & np.isfinite(cost)
    empty = np.flatnonzero(~usable.any(axis=1))
    if empty.size:
        raise ValueError(f"units {empty[:10].tolist()} have no level with finite error and cost")
    if np.any(cost[usable] < 0):
        raise ValueError("costs must be >= 0")
    return error, cost, usable


class MckpSolution(NamedTuple):
    """A multiple-choice knapsack solution with a certificate.

    Attributes:
      choice: int32[L], a feasible allocation (one level per unit).
      objective: its summed error (lower is better).
      lower_bound: no feasible allocation has a smaller summed error.
      multiplier: Lagrange multiplier (error per unit of cost) of the LP bound.
    """

    choice: np.ndarray
    objective: float
    lower_bound: float
    multiplier: float

    @property
    def gap(self) -> float:
        """``objective - lower_bound`` >= 0; 0 proves ``choice`` optimal."""
        return self.objective - self.lower_bound


def mckp_milp(
    error: np.ndarray, cost: np.ndarray, capacity: float, *, time_limit: float | None = 30.0
) -> MckpSolution:
    """Multiple-choice knapsack by MILP: min sum error s.t. sum cost <= capacity.

    Binary x[l, k], one level per unit, solved by HiGHS (:func:`scipy.optimize.milp`)
    with zero relative gap. First, reduced-cost fixing at the optimal Lagrange multiplier
    of :func:`mckp_lagrangian` removes levels that cannot be optimal, and units left with
    one level are fixed; costs are offset per unit and scaled so the capacity row is
    O(1). If HiGHS's feasibility tolerance lets the solution exceed the capacity in real
    costs, it is solved again with the capacity tightened by the excess.

    Proving optimality can be slow on tables with many near-ties (see
    ``scripts/bench_solvers.py``); at ``time_limit`` the best solution found so far is
    returned with the proven bound, so ``gap`` tells how far from optimal it may be.

    Args:
      error: float[L, K], lower is better; cost: float[L, K] (``inf`` = forbidden level).
      capacity: largest allowed total cost.
      time_limit: seconds for HiGHS, or None for no limit.
    """
    error, cost, usable = check_table(error, cost)
    L, _ = cost.shape
    rows = np.arange(L)
    # mckp_lagrangian raises InfeasibleBudgetError if even the cheapest levels do not fit.
    heuristic = mckp_lagrangian(error, cost, capacity)
    # Reduced-cost fixing: at multiplier lambda, forcing level k on unit l raises the
    # Lagrangian bound by its reduced cost; levels whose bound exceeds the heuristic's
    # objective cannot be in any better solution. HiGHS then sees a few levels per unit.
    lam = heuristic.multiplier
    reduced = np.where(usable, error + lam * np.where(usable, cost, 0.0), np.inf)
    best = reduced.min(axis=1)
    dual = best.sum() - lam * capacity
    tol = 1e-9 * max(1.0, abs(heuristic.objective))
    candidates = usable & (dual + (reduced - best[:, None]) <= heuristic.objective + tol)
    free = candidates.sum(axis=1) > 1
    if not free.any():
        return heuristic
    picked = heuristic.choice.copy()
    fixed_cost = float(cost[rows[~free], picked[~free]].sum())
    fixed_error = float(error[rows[~free], picked[~free]].sum())
    base_cost = np.where(candidates, cost, np.inf).min(axis=1)
    base_error = np.where(candidates, error, np.inf).min(axis=1)
    units, levels = np.nonzero(candidates & free[:, None])
    offset = cost[units, levels] - base_cost[units]
    room = capacity - fixed_cost - base_cost[free].sum()
    scale = max(room, offset.max(initial=0.0), 1e-300)
    n = units.size
    _, row = np.unique(units, return_inverse=True)
    one_each = scipy.sparse.csr_array((np.ones(n), (row, np.arange(n))), shape=(row.max() + 1, n))
    options: dict[str, float] = {"mip_rel_gap": 0.0}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    shift = fixed_error + float(base_error[free].sum())
    rhs = max(room, 0.0) / scale
    for _ in range(4):
        res = scipy.optimize.milp(
            error[units, levels] - base_error[units],
            integrality=np.ones(n),
            bounds=scipy.optimize.Bounds(0.0, 1.0),
            constraints=[
                scipy.optimize.LinearConstraint(one_each, 1.0, 1.0),
                scipy.optimize.LinearConstraint((offset / scale)[None, :], -np.inf, rhs),
            ],
            options=options,
        )
        if res.x is None:
            raise RuntimeError(f"MILP found no solution: {res.message} (status {res.status})")
        order = np.lexsort((-res.x, units))  # per unit, the largest x first
        first = np.r_[True, units[order][1:] != units[order][:-1]]
        picked[units[order][first]] = levels[order][first]
        used = float(cost[rows, picked].sum())
        if used <= capacity * (1.0 + FEASIBILITY_RTOL):
            break
        rhs -= 2.0 * (used - capacity) / scale
    else:
        raise RuntimeError("MILP solutions kept exceeding the capacity beyond solver tolerance")
    objective = float(error[rows, picked].sum())
    if objective > heuristic.objective:  # only possible when stopped by the time limit
        picked, objective = heuristic.choice, heuristic.objective
    # Any solution better than the heuristic lies in the reduced problem, so its bound
    # holds for the full problem up to the heuristic's objective.
    dual_bound = float(res.mip_dual_bound) if res.mip_dual_bound is not None else -np.inf
    proven = objective if res.status == 0 else shift + np.nan_to_num(dual_bound, nan=-np.inf)
    bound = max(heuristic.lower_bound, min(heuristic.objective, proven))
    return MckpSolution(picked.astype(np.int32), objective, min(bound, objective), lam)


def mckp_lagrangian(error: np.ndarray, cost: np.ndarray, capacity: float) -> MckpSolution:
    """Multiple-choice knapsack by Lagrangian relaxation along each unit's convex hull.

    Each unit's levels, as points (cost, error), are reduced to the lower convex hull
    from the cheapest point to the least-error point. Starting from every unit at its
    cheapest point, hull segments are taken in order of error saved per cost added, all
    units together. The first segment that does not fit defines the multiplier and, taken
    fractionally, the LP relaxation = Lagrangian dual bound. The returned allocation takes
    the segments that fit in that order and, past that point, keeps taking later ones
    that still fit for units not yet blocked, then spends what capacity is left with
    :func:`spend_leftover`. O(L K log(L K)) plus the leftover passes.

    Args:
      error: float[L, K], lower is better; cost: float[L, K] (``inf`` = forbidden level).
      capacity: largest allowed total cost.
    """
    error, cost, usable = check_table(error, cost)
    L, _ = cost.shape
    start = np.empty(L, dtype=np.int32)
    seg_unit: list[int] = []
    seg_to: list[int] = []
    seg_dc: list[float] = []
    seg_de: list[float] = []
    for l in range(L):
        hull = _lower_hull(cost[l], error[l], np.flatnonzero(usable[l]))
        start[l] = hull[0]
        for a, b in zip(hull[:-1], hull[1:], strict=True):
            seg_unit.append(l)
            seg_to.append(b)
            seg_dc.append(cost[l, b] - cost[l, a])
            seg_de.append(error[l, b] - error[l, a])
    rows = np.arange(L)
    used = float(cost[rows, start].sum())
    if used > capacity * (1.0 + FEASIBILITY_RTOL):
        raise InfeasibleBudgetError(
            f"capacity {capacity:.6g} is below the cheapest allocation's cost {used:.6g}"
        )
    dc, de = np.array(seg_dc), np.array(seg_de)
    rate = -de / dc if dc.size else dc  # error saved per cost added; decreasing per unit
    order = np.lexsort((np.arange(dc.size), -rate))
    choice = start.copy()
    remaining = capacity - used
    objective = float(error[rows, start].sum())
    bound, multiplier = None, 0.0
    blocked = np.zeros(L, dtype=bool)
    for s in order:
        u = seg_unit[s]
        if blocked[u]:
            continue
        if dc[s] <= remaining:
            remaining -= dc[s]
            objective += de[s]
            choice[u] = seg_to[s]
            continue
        blocked[u] = True
        if bound is None:  # first segment that does not fit: LP optimum takes a fraction
            bound = objective + de[s] * (max(remaining, 0.0) / dc[s])
            multiplier = float(rate[s])
    choice = spend_leftover(error, cost, usable, capacity * (1.0 + FEASIBILITY_RTOL), choice)
    objective = float(error[rows, choice].sum())
    if bound is None:
        bound = objective
    bound = min(float(bound), objective)
    return MckpSolution(choice, objective, bound, multiplier)


def spend_leftover(
    error: np.ndarray, cost: np.ndarray, usable: np.ndarray, limit: float, choice: np.ndarray
) -> np.ndarray:
    """int32[L]: ``choice`` improved by single-unit level changes within the capacity.

    Greedily applies the change that lowers the summed error most while the total cost
    stays <= ``limit``, until none is left. Used by the table solvers to spend capacity
    that rounding or a heuristic left unused; never makes ``choice`` worse.
    """
    rows = np.arange(error.shape[0])
    choice = choice.copy()
    while True:
        used = cost[rows, choice].sum()
        gain = error[rows, choice][:, None] - error
        extra = cost - cost[rows, choice][:, None]
        with np.errstate(invalid="ignore"):
            ok = usable & (gain > 0) & (used + extra <= limit)
        if not ok.any():
            return choice
        l, k = divmod(int(np.argmax(np.where(ok, gain, -np.inf))), error.shape[1])
        choice[l] = k


def _lower_hull(cost: np.ndarray, error: np.ndarray, levels: np.ndarray) -> list[int]:
    """Levels on the lower convex hull of (cost, error), from cheapest to least error.

    Strictly convex: collinear points are dropped, so rates strictly decrease.
    """
    order = levels[np.lexsort((error[levels], cost[levels]))]
    hull: list[int] = []
    for k in order:
        if hull and cost[k] == cost[hull[-1]]:
            continue  # same cost, larger error (sorted): never better
        if hull and error[k] >= error[hull[-1]]:
            continue  # costlier and no better: off the efficient frontier
        while len(hull) >= 2:
            o, a = hull[-2], hull[-1]
            cross = (cost[a] - cost[o]) * (error[k] - error[o]) - (error[a] - error[o]) * (
                cost[k] - cost[o]
            )
            if cross > 0:
                break
            hull.pop()
        hull.append(int(k))
    return hull


def knapsack_01(values: np.ndarray, costs: np.ndarray, capacity: int) -> np.ndarray:
    """Exact 0/1 knapsack: keep items maximising total value with total cost <= capacity.

    DP over the capacity after dividing all costs (and the capacity, rounded down) by
    their GCD; O(N * capacity / gcd) time and bytes (refuses above :data:`MAX_DP_CELLS`).

    Args:
      values: float[N], importance of keeping each item (higher is better).
      costs: int[N] > 0, e.g. params or MACs of each item.
      capacity: int >= 0, largest total cost kept.

    Returns:
      bool[N], True for kept items.
    """
    values, costs = _check_items(values, costs, capacity)
    g = reduce(math.gcd, costs.tolist())
    c = costs // g
    C = capacity // g
    N = c.size
    if N * (C + 1) > MAX_DP_CELLS:
        raise ValueError(
            f"exact knapsack needs {N} x {C + 1} cells (> {MAX_DP_CELLS}); "
            f"use knapsack_greedy or coarser costs"
        )
    best = np.zeros(C + 1)
    take = np.zeros((N, C + 1), dtype=bool)
    for i in range(N):
        ci = int(c[i])
        if ci > C:
            continue
        cand = best[: C + 1 - ci] + values[i]
        better = cand > best[ci:]
        best[ci:] = np.where(better, cand, best[ci:])
        take[i, ci:] = better
    kept = np.zeros(N, dtype=bool)
    b = C
    for i in range(N - 1, -1, -1):
        if take[i, b]:
            kept[i] = True
            b -= int(c[i])
    return kept


def knapsack_greedy(values: np.ndarray, costs: np.ndarray, capacity: int) -> np.ndarray:
    """Greedy 0/1 knapsack: items by value/cost, highest first, kept while they fit.

    Items that do not fit are skipped and later (cheaper) ones still tried; items with
    value <= 0 are never kept. Same arguments and result as :func:`knapsack_01`.
    """
    values, costs = _check_items(values, costs, capacity)
    order = np.lexsort((np.arange(values.size), -(values / costs)))
    kept = np.zeros(values.size, dtype=bool)
    remaining = capacity
    for i in order:
        if values[i] <= 0:
            break
        if costs[i] <= remaining:
            kept[i] = True
            remaining -= int(costs[i])
    return kept


def _check_items(values: np.ndarray, costs: np.ndarray, capacity: int) -> tuple[np.ndarray, ...]:
    values = np.asarray(values, dtype=np.float64)
    costs = np.asarray(costs)
    if values.ndim != 1 or costs.shape != values.shape:
        raise ValueError(f"values {values.shape} and costs {costs.shape} must both be [N]")
    if not np.issubdtype(costs.dtype, np.integer) or np.any(costs <= 0):
        raise ValueError(f"costs must be positive integers, got {costs.dtype} min {costs.min()}")
    if int(capacity) != capacity or capacity < 0:
        raise ValueError(f"capacity must be an integer >= 0, got {capacity}")
    if np.any(~np.isfinite(values)):
        raise ValueError("values must be finite")
    return values, costs.astype(np.int64)
