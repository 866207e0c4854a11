"""Allocation from a per-unit error table: exact DP solver and the table-driven searcher.

After Xu et al., "Efficient Joint Optimization of Layer-Adaptive Weight Pruning in Deep
Neural Networks" (ICCV 2023): the output distortion of pruning several units is close to
the *sum* of the distortions of pruning each alone. Measure that table once (one unit
pruned at a time), then minimise its sum under the budget exactly. EvoPress shows the
additivity assumption fails for LLMs in general, so the table searcher also re-scores
the solution and reports how far the sum was from the measured score.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, final

import jax
import numpy as np

from allocsearch.search.base import (
    HistoryEntry,
    Query,
    Searcher,
    SearchResult,
    check_told,
    draw_batch_seed,
    numpy_rng,
)
from allocsearch.search.budget import (
    FEASIBILITY_RTOL,
    Budget,
    CostModel,
    InfeasibleBudgetError,
    check_feasible_target,
    uniform_choice,
)
from allocsearch.search.knapsack import MckpSolution, check_table, spend_leftover
from allocsearch.supernet.spec import SupernetSpec

DEFAULT_BINS = 50_000
# Offsets within this fraction of a bin of a whole number of bins are taken as that
# number (float noise), so exact grids are not rounded up a whole bin.
_BIN_EPS = 1e-9
# Solves with costs rounded to the nearest bin before falling back to rounding up.
_NEAREST_TRIES = 3
# Largest subdivision of the common level step tried as the bin size.
_MAX_SUBDIVISION = 1024

TableSolver = Callable[[np.ndarray, np.ndarray, float], "np.ndarray | MckpSolution"]
"""``(error float[L, K], cost float[L, K], capacity) -> choice``: minimise the summed
error subject to summed cost <= capacity (``inf`` cost marks a forbidden level); the
choice is int32[L], or an :class:`~allocsearch.search.knapsack.MckpSolution` that also
carries a lower bound."""


def dp_solve(
    error: np.ndarray, cost: np.ndarray, capacity: float, *, bins: int = DEFAULT_BINS
) -> np.ndarray:
    """Minimise ``sum_l error[l, k_l]`` subject to ``sum_l cost[l, k_l] <= capacity``.

    Dynamic programming over units with the budget discretised into about ``bins``
    steps: ``dp_l[b] = min_k error[l, k] + dp_{l-1}[b - c[l, k]]``, then backtracking of
    the argmins; O(L * K * bins) time, int16[L, ~bins] memory. Only the spread above
    each unit's cheapest cost is discretised.

    Discretisation (the returned choice never exceeds ``capacity`` in real costs):
      - when level costs lie on a common lattice (EvoPress's equal-weight grids, or a
        few step sizes in small integer ratios), a bin is a fraction of the level step
        and lattice costs are exact, so the result is the true optimum;
      - otherwise costs are rounded to the nearest bin; if that optimum overshoots the
        real capacity, the bins are reduced by the excess and the DP re-run (up to 3
        times), then costs are rounded up, which cannot overshoot;
      - real capacity left over by rounding is finally spent greedily (single-unit
        changes that lower the error most), which never makes the result worse.

    Args:
      error: float[L, K], score increase of each unit at each level, lower is better.
      cost: float[L, K], kept cost (any unit); ``inf`` marks levels that may not be used.
      capacity: largest allowed total cost.
      bins: budget resolution; more bins, closer to the true optimum and slower.

    Returns:
      int32[L], the level chosen for each unit (lowest level on ties).

    Raises:
      InfeasibleBudgetError: when even the cheapest levels exceed ``capacity``.
    """
    error, cost, usable = check_table(error, cost)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    L, K = cost.shape
    if K > np.iinfo(np.int16).max:
        raise ValueError(f"at most {np.iinfo(np.int16).max} levels, got {K}")
    cheapest = np.where(usable, cost, np.inf).min(axis=1)
    slack = capacity - cheapest.sum()
    if slack < -FEASIBILITY_RTOL * abs(capacity):
        raise InfeasibleBudgetError(
            f"capacity {capacity:.6g} is below the cheapest allocation's cost {cheapest.sum():.6g}"
        )
    if slack <= 0:  # only the cheapest levels fit
        steps = np.where(usable & (cost <= cheapest[:, None]), 0, 1).astype(np.int64)
        only = _dp_backtrack(error, steps, usable, 0)
        assert only is not None, "the cheapest levels have 0 steps"
        return only
    limit = capacity * (1.0 + FEASIBILITY_RTOL)
    choice = _solve_rounded(
        error, cost, usable, capacity, *_budget_grid(cost, usable, cheapest, slack, bins)
    )
    if choice is None:  # lattice rounding left no room; unit-aligned bins always fit
        choice = _solve_rounded(error, cost, usable, capacity, slack / bins, cheapest)
    assert choice is not None, "rounding up from each unit's cheapest cost always fits"
    return spend_leftover(error, cost, usable, limit, choice)


def _solve_rounded(
    error: np.ndarray,
    cost: np.ndarray,
    usable: np.ndarray,
    capacity: float,
    quantum: float,
    base: np.ndarray,
) -> np.ndarray | None:
    """DP on costs ``(cost - base) / quantum`` rounded to whole bins; None if nothing fits.

    Costs rounded to the nearest bin err both ways and mostly cancel; if the optimum of
    the rounded problem overshoots the real capacity, the bins shrink by the excess and
    the DP runs again. Costs rounded up never overshoot: the last resort.
    """
    rows = np.arange(error.shape[0])
    scaled = np.where(usable, cost - base[:, None], 0.0) / quantum
    B0 = int(np.floor((capacity - base.sum()) / quantum + _BIN_EPS))
    limit = capacity * (1.0 + FEASIBILITY_RTOL)
    nearest = np.rint(scaled).astype(np.int64)
    B = B0
    for _ in range(_NEAREST_TRIES):
        if B < 0:
            break
        choice = _dp_backtrack(error, nearest, usable, B)
        if choice is None:
            break
        used = float(cost[rows, choice].sum())
        if used <= limit:
            return choice
        B -= max(1, int(np.ceil((used - capacity) / quantum)))
    if B0 < 0:
        return None
    return _dp_backtrack(error, np.ceil(scaled - _BIN_EPS).astype(np.int64), usable, B0)


def _dp_backtrack(
    error: np.ndarray, steps: np.ndarray, usable: np.ndarray, B: int
) -> np.ndarray | None:
    """int32[L] minimising summed error with summed integer ``steps`` <= ``B``, or None
    when no choice fits (see dp_solve)."""
    L = error.shape[0]
    fits = usable & (steps <= B)
    best = np.zeros(B + 1)
    argmin = np.empty((L, B + 1), dtype=np.int16)
    for l in range(L):
        new = np.full(B + 1, np.inf)
        arg = np.zeros(B + 1, dtype=np.int16)
        for k in np.flatnonzero(fits[l]):  # increasing k, strict <: lowest level on ties
            c = int(steps[l, k])
            cand = error[l, k] + best[: B + 1 - c]
            better = cand < new[c:]
            np.copyto(new[c:], cand, where=better)
            np.copyto(arg[c:], k, where=better)
        best = new
        argmin[l] = arg
    if not np.isfinite(best[B]):
        return None
    choice = np.empty(L, dtype=np.int32)
    b = B
    for l in range(L - 1, -1, -1):
        choice[l] = argmin[l, b]
        b -= int(steps[l, choice[l]])
    return choice


def _budget_grid(
    cost: np.ndarray, usable: np.ndarray, cheapest: np.ndarray, slack: float, bins: int
) -> tuple[float, np.ndarray]:
    """(quantum, base float[L]) of the cost discretisation ``ceil((cost - base) / quantum)``.

    Rounding costs up keeps every DP solution feasible, but it also shuts out solutions
    that use the budget exactly, which equal-step (EvoPress) grids produce all the time.
    So when the most common cost step ``d`` between neighbouring levels is at least
    ``slack / bins``, the quantum is ``d / m``, with ``m`` within what the bins allow and
    chosen to put the most other steps on the lattice as well (largest ``m`` on ties),
    and each unit's base is aligned with its middle level: costs on that lattice are
    then exact and only off-lattice levels (e.g. clipped at sparsity 0 or 1) are rounded.
    Otherwise the quantum is ``slack / bins`` and the base is each unit's cheapest cost.
    """
    generic = (slack / bins, cheapest)
    masked = np.where(usable, cost, np.nan)
    with np.errstate(invalid="ignore"):
        diffs = np.abs(np.diff(masked, axis=1))
    diffs = np.sort(diffs[np.isfinite(diffs) & (diffs > 0)])
    if diffs.size == 0:
        return generic
    # Mode of the steps, values equal to a relative 1e-9 counted together.
    new_run = np.r_[True, np.diff(diffs) > 1e-9 * diffs[1:]]
    run_id = np.cumsum(new_run) - 1
    counts = np.bincount(run_id)
    step = float(diffs[np.flatnonzero(new_run)[np.argmax(counts)]])
    m_max = min(int(np.floor(bins * step / slack)), _MAX_SUBDIVISION)
    if m_max < 1:
        return generic
    # Subdivide the step as finely as the bins allow, preferring the m that puts the
    # most other steps on the lattice too (e.g. m = 16 when steps relate as 43 : 16).
    m_all = np.arange(1, m_max + 1)
    ratio = diffs[None, :] * m_all[:, None] / step
    on_lattice = (np.abs(ratio - np.rint(ratio)) <= 1e-6).sum(axis=1)
    m = int(m_all[np.flatnonzero(on_lattice == on_lattice.max())[-1]])
    quantum = step / m
    L = cost.shape[0]
    lo = np.argmax(usable, axis=1)
    hi = cost.shape[1] - 1 - np.argmax(usable[:, ::-1], axis=1)
    # the usable level nearest the middle (a middle level may be unusable: cost inf)
    distance = np.abs(np.arange(cost.shape[1])[None, :] - ((lo + hi) // 2)[:, None])
    middle = np.argmin(np.where(usable, distance, np.iinfo(np.int64).max), axis=1)
    ref = cost[np.arange(L), middle]
    base = ref - quantum * np.ceil((ref - cheapest) / quantum - _BIN_EPS)
    return quantum, base


class TableState(NamedTuple):
    """State of :class:`TableSearcher` (picklable).

    Attributes:
      costs: the budget bound to the supernet.
      batch_seed: the one minibatch every query of this search is scored on.
      phase: 0 = measure the table, 1 = score the solution, 2 = done.
      probes: int32[n, 2], (unit, level) pruned in each probe row; row 0 is the
        baseline (every unit at level 0) and reads (-1, 0).
      table: float64[L, K], score increase over the baseline of each unit alone at each
        level (0 at level 0; ``inf`` where not allowed or where the probe diverged, which
        keeps the solver away from it); empty until measured.
      baseline: score of the all-level-0 model.
      choice: int32[L], the solver's allocation (the uniform one until solved).
      predicted: baseline + sum of the table entries of ``choice``.
      predicted_bound: baseline + the solver's lower bound on that sum (nan if the solver
        gives none; equal to ``predicted`` when the solver proved optimality).
      measured: the measured score of ``choice``.
      pending, step, generation, evaluations, tokens, history: as elsewhere.
    """

    costs: CostModel
    batch_seed: int
    phase: int
    probes: np.ndarray
    table: np.ndarray
    baseline: float
    choice: np.ndarray
    predicted: float
    predicted_bound: float
    measured: float
    pending: Query | None
    step: int
    generation: int
    evaluations: int
    tokens: int
    history: tuple[HistoryEntry, ...]


@final
@dataclass(frozen=True, kw_only=True)
class TableSearcher(Searcher):
    """Measure the per-unit error table, solve it under the budget, score the solution.

    Two generations: (1) one probe query with the baseline (all units at level 0) and
    every unit alone at each of its other allowed levels, all on one minibatch and
    independent, so they can be scored in parallel; (2) the solver's allocation, scored
    on the same minibatch. ``result().info`` reports additivity: ``predicted`` (baseline
    + sum of the table entries), ``measured``, and their ratio over the baseline.

    Attributes:
      solver: a :data:`TableSolver`: :func:`dp_solve` (default),
        :func:`~allocsearch.search.knapsack.mckp_milp` or
        :func:`~allocsearch.search.knapsack.mckp_lagrangian` (their lower bound is
        reported as ``info["predicted_bound"]``); bind options with functools.partial.
      tokens: calibration tokens per candidate.
    """

    solver: TableSolver = dp_solve
    tokens: int = 2048

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {self.tokens}")

    def init(self, spec: SupernetSpec, budget: Budget, key: jax.Array) -> TableState:
        check_feasible_target(spec, budget)
        costs = CostModel.from_spec(spec, budget)
        units, levels = np.nonzero(costs.allowed)
        probe = levels > 0
        probes = np.concatenate(
            [np.array([[-1, 0]]), np.stack([units[probe], levels[probe]], axis=1)]
        ).astype(np.int32)
        empty_f = np.zeros((0,))
        return TableState(
            costs=costs,
            batch_seed=draw_batch_seed(numpy_rng(key)),
            phase=0,
            probes=probes,
            table=empty_f,
            baseline=float("nan"),
            choice=uniform_choice(spec, budget),
            predicted=float("nan"),
            predicted_bound=float("nan"),
            measured=float("inf"),
            pending=None,
            step=0,
            generation=0,
            evaluations=0,
            tokens=0,
            history=(),
        )

    def ask(self, state: TableState, key: jax.Array) -> tuple[Query, TableState]:
        if state.pending is not None:
            raise ValueError("ask() called twice without tell(); tell the pending query first")
        if state.phase == 0:
            L = state.costs.num_units
            choices = np.zeros((state.probes.shape[0], L), dtype=np.int32)
            rows = np.arange(1, state.probes.shape[0])
            choices[rows, state.probes[1:, 0]] = state.probes[1:, 1]
            query = Query(choices, self.tokens, state.batch_seed, probe=True)
        elif state.phase == 1:
            query = Query(state.choice[None, :].copy(), self.tokens, state.batch_seed)
        else:
            raise ValueError("the table search is done; ask() has nothing left to propose")
        return query, state._replace(pending=query)

    def tell(self, state: TableState, query: Query, scores: np.ndarray) -> TableState:
        scores = check_told(state.pending, query, scores)
        n = query.choices.shape[0]
        evaluations = state.evaluations + n
        tokens = state.tokens + n * query.fidelity
        common = dict(
            pending=None,
            step=state.step + 1,
            generation=state.generation + 1,
            evaluations=evaluations,
            tokens=tokens,
        )
        if state.phase == 0:
            costs = state.costs
            baseline = float(scores[0])
            if not np.isfinite(baseline):
                raise ValueError(
                    f"the baseline (every unit at level 0) scored {baseline}; the error table "
                    f"cannot be measured against it"
                )
            table = np.where(costs.allowed, 0.0, np.inf)
            table[state.probes[1:, 0], state.probes[1:, 1]] = scores[1:] - baseline
            solved = self.solver(table, costs.cost, costs.capacity)
            if isinstance(solved, MckpSolution):
                choice, bound = np.asarray(solved.choice), baseline + solved.lower_bound
            else:
                choice, bound = np.asarray(solved), float("nan")
            if choice.shape != (costs.num_units,) or not bool(costs.is_feasible(choice)):
                raise RuntimeError(
                    f"solver {self.solver!r} returned an allocation that is not feasible: "
                    f"shape {choice.shape}, cost {costs.total_cost(choice.astype(np.int64))} "
                    f"> capacity {costs.capacity}"
                )
            choice = choice.astype(np.int32)
            predicted = baseline + float(table[np.arange(costs.num_units), choice].sum())
            return state._replace(
                phase=1,
                table=table,
                baseline=baseline,
                choice=choice,
                predicted=predicted,
                predicted_bound=bound,
                **common,
            )
        measured = float(scores[0])
        entry = HistoryEntry(state.generation + 1, evaluations, tokens, measured)
        return state._replace(phase=2, measured=measured, history=(*state.history, entry), **common)

    def done(self, state: TableState) -> bool:
        return state.phase == 2

    def result(self, state: TableState) -> SearchResult:
        gain = state.predicted - state.baseline
        info = {
            "baseline": state.baseline,
            "predicted": state.predicted,
            "predicted_bound": state.predicted_bound,
            "measured": state.measured,
            "additivity_ratio": (state.measured - state.baseline) / gain if gain else float("nan"),
            "achieved": float(state.costs.achieved(state.choice)),
        }
        return SearchResult(
            best_choice=state.choice.copy(),
            best_fitness=state.measured,
            evaluations=state.evaluations,
            tokens=state.tokens,
            history=state.history,
            info=info,
        )
