"""Contract suite: every Searcher obeys the ask/tell protocol of search/base.py."""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable

import jax
import numpy as np
import pytest

from allocsearch.distributed.local import run_search, step_keys
from allocsearch.search.base import Query, Searcher
from allocsearch.search.budget import Budget, CostModel, InfeasibleBudgetError
from allocsearch.search.dp import TableSearcher, dp_solve
from allocsearch.search.evolutionary import EvolutionarySearcher
from allocsearch.search.knapsack import mckp_lagrangian, mckp_milp
from allocsearch.supernet.spec import SupernetSpec, Unit

SEARCHERS: dict[str, Callable[[], Searcher]] = {
    "evolutionary": lambda: EvolutionarySearcher(
        generations=4, offspring=6, survivors=(3, 2, 1), tokens=(8, 16, 32)
    ),
    "evolutionary-1stage": lambda: EvolutionarySearcher(
        generations=3, offspring=4, survivors=(1,), tokens=(8,), same_role=True
    ),
    "evolutionary-repair": lambda: EvolutionarySearcher(
        generations=4, offspring=6, survivors=(3, 2, 1), tokens=(8, 16, 32), mutation="repair"
    ),
    "evolutionary-repair-same-role": lambda: EvolutionarySearcher(
        generations=3,
        offspring=4,
        survivors=(2, 1),
        tokens=(8, 16),
        mutation="repair",
        same_role=True,
    ),
    "table-dp": lambda: TableSearcher(solver=functools.partial(dp_solve, bins=500), tokens=16),
    "table-milp": lambda: TableSearcher(solver=mckp_milp, tokens=16),
    "table-lagrangian": lambda: TableSearcher(solver=mckp_lagrangian, tokens=16),
}


def equal_step_spec() -> SupernetSpec:
    """7 units of different sizes, EvoPress-style levels of 20 weights per step."""
    numel = [100, 200, 100, 300, 200, 100, 60]
    roles = ["q", "k", "q", "k", "q", "k", "q"]
    K = 6
    sparsity = np.full((len(numel), K), np.nan)
    valid = np.zeros_like(sparsity, dtype=bool)
    for l, n in enumerate(numel):
        s = np.arange(K) * 20 / n
        s = s[s <= 1.0]
        sparsity[l, : s.size] = s
        valid[l, : s.size] = True
    units = tuple(
        Unit(f"u{l}", roles[l], l // 2, (f"u{l}",), n, 3 * n) for l, n in enumerate(numel)
    )
    return SupernetSpec(units, sparsity, valid, np.full(len(numel), 2, dtype=np.int32))


SPEC = equal_step_spec()
# 20 of the 1060 weights per step; target 200 weights removed (10 steps), unit 6 at most
# 40% sparse and unit 1 at least 10%.
BUDGET = Budget(
    kind="params",
    target=200 / 1060,
    min_sparsity=np.array([0, 0.1, 0, 0, 0, 0, 0]),
    max_sparsity=np.array([1, 1, 1, 1, 1, 1, 0.4]),
)
TABLE = np.cumsum(np.random.default_rng(7).uniform(0.0, 1.0, size=SPEC.sparsity.shape), axis=1)


def noisy_additive(choices: np.ndarray, *, fidelity: int, batch_seed: int) -> np.ndarray:
    """Sum of per-unit errors plus noise that depends on the batch and shrinks with tokens."""
    choices = np.asarray(choices)
    base = np.take_along_axis(np.nan_to_num(TABLE), choices.T, axis=1).sum(axis=0)
    noise = np.random.default_rng([batch_seed, fidelity]).normal(size=SPEC.num_units)
    per_row = (noise[None, :] * (choices + 1)).sum(axis=1)
    return (base + 0.05 * per_row / np.sqrt(fidelity)).astype(np.float32)


class Recorder:
    """An Evaluate that records every query it scores."""

    def __init__(self) -> None:
        self.calls: list[tuple[np.ndarray, int, int]] = []

    def __call__(self, choices: np.ndarray, *, fidelity: int, batch_seed: int) -> np.ndarray:
        self.calls.append((np.array(choices), fidelity, batch_seed))
        return noisy_additive(choices, fidelity=fidelity, batch_seed=batch_seed)


@pytest.fixture(params=sorted(SEARCHERS))
def searcher(request: pytest.FixtureRequest) -> Searcher:
    return SEARCHERS[request.param]()


def test_every_ask_is_feasible_and_typed(searcher: Searcher) -> None:
    cm = CostModel.from_spec(SPEC, BUDGET)
    state = searcher.init(SPEC, BUDGET, jax.random.key(0))
    n_levels = SPEC.num_levels
    i = 0
    while not searcher.done(state):
        query, state = searcher.ask(state, jax.random.key(100 + i))
        assert isinstance(query, Query)
        assert query.choices.dtype == np.int32 and query.choices.ndim == 2
        assert query.choices.shape[1] == SPEC.num_units and query.choices.shape[0] >= 1
        assert query.fidelity >= 1 and isinstance(query.batch_seed, int)
        assert np.all((query.choices >= 0) & (query.choices < n_levels))
        if not query.probe:
            assert cm.is_feasible(query.choices).all()
        scores = noisy_additive(query.choices, fidelity=query.fidelity, batch_seed=query.batch_seed)
        state = searcher.tell(state, query, scores)
        i += 1
    result = searcher.result(state)
    assert result.best_choice.dtype == np.int32
    assert bool(cm.is_feasible(result.best_choice))
    assert np.isfinite(result.best_fitness)


def test_same_key_same_trajectory(searcher: Searcher) -> None:
    runs = []
    for _ in range(2):
        rec = Recorder()
        result = run_search(searcher, rec, SPEC, BUDGET, key=jax.random.key(3))
        runs.append((rec.calls, result))
    (calls_a, res_a), (calls_b, res_b) = runs
    assert len(calls_a) == len(calls_b)
    for (c1, f1, s1), (c2, f2, s2) in zip(calls_a, calls_b, strict=True):
        np.testing.assert_array_equal(c1, c2)
        assert (f1, s1) == (f2, s2)
    np.testing.assert_array_equal(res_a.best_choice, res_b.best_choice)
    assert res_a.best_fitness == res_b.best_fitness and res_a.history == res_b.history


def test_pickled_state_resumes_to_the_same_result(searcher: Searcher) -> None:
    key = jax.random.key(11)
    saved: list[bytes] = []
    full = run_search(
        searcher,
        noisy_additive,
        SPEC,
        BUDGET,
        key=key,
        on_generation=lambda s: saved.append(pickle.dumps(s)),
    )
    assert saved, "on_generation is called after each generation"
    mid = pickle.loads(saved[0])
    resumed = run_search(searcher, noisy_additive, SPEC, BUDGET, key=key, state=mid)
    np.testing.assert_array_equal(full.best_choice, resumed.best_choice)
    assert full.best_fitness == resumed.best_fitness
    assert full.evaluations == resumed.evaluations and full.tokens == resumed.tokens
    assert full.history == resumed.history


def test_result_accounts_for_every_evaluation(searcher: Searcher) -> None:
    rec = Recorder()
    result = run_search(searcher, rec, SPEC, BUDGET, key=jax.random.key(5))
    assert result.evaluations == sum(c.shape[0] for c, _, _ in rec.calls)
    assert result.tokens == sum(c.shape[0] * f for c, f, _ in rec.calls)
    assert result.history and result.history[-1].evaluations == result.evaluations
    # The reported fitness is the best choice's own score in its last evaluation.
    last = [
        score
        for c, f, s in rec.calls
        for row, score in zip(c, noisy_additive(c, fidelity=f, batch_seed=s), strict=True)
        if np.array_equal(row, result.best_choice)
    ]
    assert result.best_fitness == pytest.approx(float(last[-1]))


def test_protocol_misuse_is_reported(searcher: Searcher) -> None:
    state = searcher.init(SPEC, BUDGET, jax.random.key(0))
    with pytest.raises(ValueError, match="without a pending ask"):
        searcher.tell(state, Query(np.zeros((1, SPEC.num_units), np.int32), 1, 0), np.zeros(1))
    query, state = searcher.ask(state, jax.random.key(1))
    with pytest.raises(ValueError, match="twice"):
        searcher.ask(state, jax.random.key(2))
    other = query._replace(batch_seed=query.batch_seed + 1)
    with pytest.raises(ValueError, match="not the one"):
        searcher.tell(state, other, np.zeros(query.choices.shape[0]))
    with pytest.raises(ValueError, match=r"float\[n="):
        searcher.tell(state, query, np.zeros(query.choices.shape[0] + 1))


def test_nan_scores_count_as_worst(searcher: Searcher) -> None:
    def diverging(choices: np.ndarray, *, fidelity: int, batch_seed: int) -> np.ndarray:
        scores = noisy_additive(choices, fidelity=fidelity, batch_seed=batch_seed)
        return np.where(choices[:, 3] == 1, np.nan, scores).astype(np.float32)

    result = run_search(searcher, diverging, SPEC, BUDGET, key=jax.random.key(2))
    if result.best_choice[3] == 1:
        assert result.best_fitness == np.inf
    else:
        assert np.isfinite(result.best_fitness)


def test_table_search_refuses_a_diverged_baseline() -> None:
    searcher = TableSearcher()
    state = searcher.init(SPEC, BUDGET, jax.random.key(0))
    query, state = searcher.ask(state, jax.random.key(1))
    scores = np.zeros(query.choices.shape[0], dtype=np.float32)
    scores[0] = np.nan
    with pytest.raises(ValueError, match="baseline"):
        searcher.tell(state, query, scores)


def test_infeasible_budget_is_refused_at_init(searcher: Searcher) -> None:
    budget = Budget(kind="params", target=0.9, max_sparsity=0.5)
    with pytest.raises(InfeasibleBudgetError, match="between"):
        searcher.init(SPEC, budget, jax.random.key(0))


def test_step_keys_are_fixed_by_the_seed() -> None:
    a, b = step_keys(jax.random.key(0)), step_keys(jax.random.key(0))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(jax.random.key_data(x), jax.random.key_data(y))
