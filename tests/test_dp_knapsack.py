"""Table solvers against brute force, and the item-level 0/1 knapsack."""

from __future__ import annotations

import functools
import itertools

import jax
import numpy as np
import pytest

from allocsearch.distributed.local import run_search
from allocsearch.search.budget import Budget, CostModel, InfeasibleBudgetError
from allocsearch.search.dp import TableSearcher, dp_solve
from allocsearch.search.knapsack import (
    MAX_DP_CELLS,
    _lower_hull,
    knapsack_01,
    knapsack_greedy,
    mckp_lagrangian,
    mckp_milp,
)
from allocsearch.supernet.spec import SupernetSpec, Unit

L, K = 5, 4


def brute_force(error: np.ndarray, cost: np.ndarray, capacity: float) -> float:
    """Smallest summed error over all level vectors with summed cost <= capacity."""
    grid = np.array(list(itertools.product(range(error.shape[1]), repeat=error.shape[0])))
    rows = np.arange(error.shape[0])
    e = error[rows, grid].sum(axis=1)
    c = cost[rows, grid].sum(axis=1)
    ok = np.isfinite(e) & (c <= capacity * (1 + 1e-12))
    return float(e[ok].min())


def integer_instance(seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Random errors, integer kept costs decreasing with the level, one forbidden entry."""
    rng = np.random.default_rng(seed)
    error = np.cumsum(rng.uniform(0, 1, size=(L, K)), axis=1) * rng.uniform(0.5, 2, (L, 1))
    cost = np.cumsum(rng.integers(1, 9, size=(L, K))[:, ::-1], axis=1)[:, ::-1].astype(float)
    cost[rng.integers(L), K - 1] = np.inf
    lo = np.where(np.isfinite(cost), cost, np.inf).min(axis=1).sum()
    hi = cost[:, 0].sum()
    return error, cost, float(rng.integers(int(lo), int(hi) + 1))


def total(error: np.ndarray, choice: np.ndarray) -> float:
    return float(error[np.arange(error.shape[0]), choice].sum())


def used(cost: np.ndarray, choice: np.ndarray) -> float:
    return float(cost[np.arange(cost.shape[0]), choice].sum())


@pytest.mark.parametrize("seed", range(25))
def test_solvers_match_brute_force_on_integer_costs(seed: int) -> None:
    error, cost, capacity = integer_instance(seed)
    opt = brute_force(error, cost, capacity)
    # Integer costs: enough bins to make every cost a whole number of bins.
    dp = dp_solve(error, cost, capacity, bins=10_000)
    assert used(cost, dp) <= capacity and total(error, dp) == pytest.approx(opt)
    milp = mckp_milp(error, cost, capacity)
    assert used(cost, milp.choice) <= capacity
    assert milp.objective == pytest.approx(opt) and milp.gap == pytest.approx(0, abs=1e-9)
    lag = mckp_lagrangian(error, cost, capacity)
    assert used(cost, lag.choice) <= capacity
    assert lag.objective == pytest.approx(total(error, lag.choice))
    assert lag.lower_bound <= opt + 1e-9 <= lag.objective + 2e-9
    assert lag.objective - opt <= lag.gap + 1e-9


@pytest.mark.parametrize("seed", range(10))
def test_dp_on_real_costs_is_feasible_and_near_optimal(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    error = np.cumsum(rng.uniform(0, 1, size=(L, K)), axis=1)
    cost = np.cumsum(rng.uniform(0.1, 3, size=(L, K))[:, ::-1], axis=1)[:, ::-1]
    slack = rng.uniform(0.1, 0.9) * (cost[:, 0].sum() - cost[:, -1].sum())
    capacity = cost[:, -1].sum() + slack
    bins = 200
    choice = dp_solve(error, cost, capacity, bins=bins)
    assert used(cost, choice) <= capacity
    # Rounding costs loses at most (2 L + 4) bins of at most 2 slack / bins each.
    margin = (2 * L + 4) * 2 * slack / bins
    assert total(error, choice) <= brute_force(error, cost, capacity - margin) + 1e-12
    assert total(error, choice) >= brute_force(error, cost, capacity) - 1e-12


def test_dp_is_exact_on_equal_weight_grids_with_clipping() -> None:
    # EvoPress-style: kept = numel * (1 - s) with s = centre + j * d / numel, clipped to
    # [0, 1]; d = 0.37e6 weights. Off-lattice levels at the clip points.
    rng = np.random.default_rng(0)
    numel = np.array([1.3e6, 2.2e6, 0.9e6, 1.7e6, 3.1e6])
    s = np.clip(0.6 + np.arange(-2, 2)[None, :] * 0.37e6 / numel[:, None], 0, 1)
    cost = numel[:, None] * (1 - s)
    error = np.exp(4 * s) * rng.uniform(0.5, 2, (L, 1))
    for target in (0.45, 0.5, 0.6, 0.65):
        capacity = (1 - target) * numel.sum()
        choice = dp_solve(error, cost, capacity, bins=100)
        assert used(cost, choice) <= capacity * (1 + 1e-12)
        assert total(error, choice) == pytest.approx(brute_force(error, cost, capacity))


@pytest.mark.parametrize("seed", range(30))
def test_dp_stays_feasible_with_very_few_bins(seed: int) -> None:
    # Coarse bins on grids whose cheapest (clipped) levels are off the lattice: the
    # rounded problems can leave no room, and dp_solve must still return a feasible
    # choice no worse than all-cheapest.
    rng = np.random.default_rng(seed)
    numel = rng.uniform(0.5e6, 3e6, size=L)
    s = np.clip(rng.uniform(0.3, 0.9) + np.arange(-2, 2)[None, :] * 0.4e6 / numel[:, None], 0, 1)
    cost = numel[:, None] * (1 - s)
    error = np.exp(3 * s) * rng.uniform(0.5, 2, (L, 1))
    cheapest = cost.min(axis=1).sum()
    capacity = cheapest + rng.uniform(0, 1.5) * 0.4e6
    for bins in (1, 2, 3, 7):
        choice = dp_solve(error, cost, capacity, bins=bins)
        assert used(cost, choice) <= capacity * (1 + 1e-9)
        assert total(error, choice) <= error[np.arange(L), cost.argmin(axis=1)].sum() + 1e-12


def test_dp_with_an_unusable_middle_level_is_optimal() -> None:
    """Issue 16.9: a unit whose middle level has infinite cost (allowed: inf marks levels
    that may not be used) used to give 'cannot convert float NaN to integer'."""
    error = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 3.0]])
    cost = np.array([[10.0, np.inf, 4.0], [10.0, 6.0, 3.0]])
    for capacity in (7.0, 12.0, 14.0, 16.0, 20.0):
        choice = dp_solve(error, cost, capacity)
        assert cost[[0, 1], choice].sum() <= capacity
        assert total(error, choice) == pytest.approx(brute_force(error, cost, capacity))
    # by hand at 14: (2, 0) costs 4 + 10 and errs 2; (0, 2) errs 3, (2, 1) errs 3
    np.testing.assert_array_equal(dp_solve(error, cost, 14.0), [2, 0])


def test_dp_breaks_ties_towards_the_lowest_level() -> None:
    error = np.zeros((2, 3))
    cost = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    np.testing.assert_array_equal(dp_solve(error, cost, 6.0, bins=10), [0, 0])


def test_solvers_refuse_impossible_capacity() -> None:
    error = np.zeros((2, 2))
    cost = np.array([[2.0, 1.0], [2.0, 1.0]])
    for solve in (dp_solve, mckp_milp, mckp_lagrangian):
        with pytest.raises(InfeasibleBudgetError, match="cheapest"):
            solve(error, cost, 1.5)
    with pytest.raises(ValueError, match="no level"):
        dp_solve(np.array([[np.inf, np.inf], [0.0, 0.0]]), cost, 4.0)
    with pytest.raises(ValueError, match=r"\[L, K\]"):
        dp_solve(np.zeros((2, 3)), cost, 4.0)


def test_exact_capacity_only_admits_cheapest_levels() -> None:
    error = np.array([[0.0, 1.0], [0.0, 5.0]])
    cost = np.array([[2.0, 1.0], [2.0, 1.0]])
    np.testing.assert_array_equal(dp_solve(error, cost, 2.0), [1, 1])
    np.testing.assert_array_equal(dp_solve(error, cost, 3.0), [1, 0])


def test_lower_hull_by_hand() -> None:
    # Points (cost, error): (1, 9) (2, 5) (3, 4) (4, 1) (5, 1) (2, 7).
    cost = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 2.0])
    error = np.array([9.0, 5.0, 4.0, 1.0, 1.0, 7.0])
    # (3, 4) lies above the segment (2, 5)-(4, 1); (5, 1) is no better than (4, 1);
    # (2, 7) is beaten by (2, 5).
    assert _lower_hull(cost, error, np.arange(6)) == [0, 1, 3]
    # Collinear points are dropped: (1, 3) (2, 2) (3, 1) keeps the ends only.
    assert _lower_hull(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0]), np.arange(3)) == [0, 2]


def test_lagrangian_bound_by_hand() -> None:
    # Two units, levels (cost, error): unit 0 (4, 0) (2, 4) ; unit 1 (4, 0) (2, 1).
    # Capacity 6: one unit must take its cheap level. Rates: unit 0 saves 2 per cost,
    # unit 1 0.5. From both cheap (cost 4, error 5): unit 0 segment fits (cost 6, error 1);
    # unit 1's does not; remaining 0 -> bound = 1 = optimum, multiplier 0.5.
    error = np.array([[0.0, 4.0], [0.0, 1.0]])
    cost = np.array([[4.0, 2.0], [4.0, 2.0]])
    sol = mckp_lagrangian(error, cost, 6.0)
    np.testing.assert_array_equal(sol.choice, [0, 1])
    assert (sol.objective, sol.lower_bound, sol.multiplier) == (1.0, 1.0, 0.5)
    # Capacity 5: LP takes half of unit 0's segment: bound 5 - 4 / 2 = 3; best integer 4.
    sol = mckp_lagrangian(error, cost, 5.0)
    assert sol.lower_bound == pytest.approx(3.0) and sol.objective == 5.0
    assert sol.gap == pytest.approx(2.0) and sol.multiplier == 2.0


def items_brute_force(values: np.ndarray, costs: np.ndarray, capacity: int) -> float:
    best = 0.0
    for mask in itertools.product([False, True], repeat=values.size):
        m = np.array(mask)
        if costs[m].sum() <= capacity:
            best = max(best, values[m].sum())
    return best


@pytest.mark.parametrize("seed", range(10))
def test_knapsack_01_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.uniform(-0.2, 1, size=10)
    costs = 7 * rng.integers(1, 20, size=10)  # common factor 7 is divided out
    capacity = int(rng.integers(0, costs.sum()))
    kept = knapsack_01(values, costs, capacity)
    assert kept.dtype == bool and costs[kept].sum() <= capacity
    assert values[kept].sum() == pytest.approx(items_brute_force(values, costs, capacity))
    greedy = knapsack_greedy(values, costs, capacity)
    assert costs[greedy].sum() <= capacity
    assert values[greedy].sum() <= values[kept].sum() + 1e-12


def test_knapsack_gcd_keeps_large_costs_cheap() -> None:
    costs = np.array([4096, 8192, 12288]) * 1000  # GCD 4.096e6: 6 capacity cells
    values = np.array([1.0, 1.5, 2.4])
    kept = knapsack_01(values, costs, 16384 * 1000)
    np.testing.assert_array_equal(kept, [True, False, True])
    with pytest.raises(ValueError, match="knapsack_greedy"):
        knapsack_01(np.ones(2), np.array([1, 2]), MAX_DP_CELLS)


def test_knapsack_greedy_by_hand() -> None:
    # Ratios 3, 2, 1.5, 1: take 0 (cost 1), 1 (cost 2), skip 2 (cost 4 > 2 left), take 3.
    values = np.array([3.0, 4.0, 6.0, 2.0])
    costs = np.array([1, 2, 4, 2])
    np.testing.assert_array_equal(knapsack_greedy(values, costs, 5), [True, True, False, True])
    with pytest.raises(ValueError, match="positive integers"):
        knapsack_greedy(values, np.array([1.0, 2.0, 4.0, 2.0]), 5)


def equal_step_spec() -> SupernetSpec:
    numel = [100, 200, 100, 300, 200]
    sparsity = np.array([[j * 20 / n for j in range(K)] for n in numel])
    units = tuple(Unit(f"u{l}", "q", l, (f"u{l}",), n, n) for l, n in enumerate(numel))
    return SupernetSpec(units, sparsity, np.ones((L, K), bool), np.full(L, 2, np.int32))


@pytest.mark.parametrize(
    "solver",
    [functools.partial(dp_solve, bins=1000), mckp_milp, mckp_lagrangian],
    ids=["dp", "milp", "lagrangian"],
)
def test_table_searcher_on_an_additive_objective(solver) -> None:  # noqa: ANN001
    spec = equal_step_spec()
    budget = Budget(kind="params", target=160 / 900)
    table = np.cumsum(np.random.default_rng(1).uniform(0, 1, size=(L, K)), axis=1)
    table -= table[:, :1]  # dense is 0
    calls = []

    def evaluate(choices: np.ndarray, *, fidelity: int, batch_seed: int) -> np.ndarray:
        calls.append(choices.shape[0])
        return (1.0 + table[np.arange(L), choices].sum(axis=1)).astype(np.float64)

    result = run_search(TableSearcher(solver=solver), evaluate, spec, budget, key=jax.random.key(0))
    assert calls == [1 + L * (K - 1), 1]
    cm = CostModel.from_spec(spec, budget)
    opt = brute_force(table, cm.cost, cm.capacity)
    info = result.info
    assert info["baseline"] == 1.0
    assert info["predicted"] == pytest.approx(info["measured"])
    assert info["additivity_ratio"] == pytest.approx(1.0)
    assert result.best_fitness == pytest.approx(1.0 + total(table, result.best_choice))
    if solver is mckp_lagrangian:
        assert info["predicted_bound"] <= 1.0 + opt + 1e-9 <= info["predicted"] + 1e-9
    else:
        assert result.best_fitness == pytest.approx(1.0 + opt)
