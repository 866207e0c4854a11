"""EvoPress search: mutation keeps the budget, staged selection, reaching known optima."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest

from allocsearch.distributed.local import run_search
from allocsearch.search.budget import Budget, CostModel
from allocsearch.search.evolutionary import (
    PAPER_GENERATIONS,
    PAPER_OFFSPRING,
    PAPER_SURVIVORS,
    PAPER_TOKENS,
    EvolutionarySearcher,
)
from allocsearch.supernet.spec import SupernetSpec, Unit


def make_spec(numel: list[int], levels: list[list[float]], roles: list[str]) -> SupernetSpec:
    L, K = len(numel), max(len(r) for r in levels)
    sparsity = np.full((L, K), np.nan)
    valid = np.zeros((L, K), dtype=bool)
    for l, row in enumerate(levels):
        sparsity[l, : len(row)] = row
        valid[l, : len(row)] = True
    units = tuple(Unit(f"u{l}", roles[l], l, (f"u{l}",), n, n) for l, n in enumerate(numel))
    return SupernetSpec(units, sparsity, valid, np.zeros(L, dtype=np.int32))


def equal_spec(L: int = 6, K: int = 5) -> SupernetSpec:
    """Equal-size units, levels 0, 0.2, ..., 0.8: every level step costs 20 weights."""
    return make_spec([100] * L, [[0.2 * k for k in range(K)]] * L, ["q", "k"] * (L // 2))


def additive(table: np.ndarray):  # noqa: ANN201
    def evaluate(choices: np.ndarray, *, fidelity: int, batch_seed: int) -> np.ndarray:
        return table[np.arange(table.shape[0]), choices].sum(axis=1)

    return evaluate


def test_paper_defaults_are_named() -> None:
    assert (PAPER_GENERATIONS, PAPER_OFFSPRING) == (400, 64)
    assert PAPER_SURVIVORS == (8, 2, 1) and PAPER_TOKENS == (2048, 16384, 65536)
    EvolutionarySearcher(
        generations=PAPER_GENERATIONS,
        offspring=PAPER_OFFSPRING,
        survivors=PAPER_SURVIVORS,
        tokens=PAPER_TOKENS,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"survivors": (4, 2), "tokens": (1, 2, 3)}, "one entry per stage"),
        ({"survivors": (4, 2), "tokens": (1, 2)}, "keeps 1"),
        ({"survivors": (2, 4, 1), "tokens": (1, 2, 3)}, "non-increasing"),
        ({"offspring": 2, "survivors": (4, 1), "tokens": (1, 2)}, "at most offspring"),
        ({"generations": 0}, "generations"),
        ({"tokens": (0, 1, 2)}, "tokens per stage"),
    ],
)
def test_constructor_validates(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EvolutionarySearcher(**kwargs)


def test_reaches_the_brute_force_optimum_on_equal_steps() -> None:
    spec = equal_spec()
    rng = np.random.default_rng(0)
    # Convex increasing per-unit errors of different scales.
    table = np.cumsum(np.cumsum(rng.uniform(0, 1, size=(6, 5)), axis=1), axis=1)
    table *= rng.uniform(0.2, 3, size=(6, 1))
    budget = Budget(kind="params", target=0.4)  # 12 level steps in all
    cm = CostModel.from_spec(spec, budget)
    grid = np.array(list(itertools.product(range(5), repeat=6)))
    ok = cm.is_feasible(grid)
    scores = table[np.arange(6), grid].sum(axis=1)
    best = grid[ok][np.argmin(scores[ok])]
    searcher = EvolutionarySearcher(generations=40, offspring=8, survivors=(2, 1), tokens=(1, 1))
    result = run_search(searcher, additive(table), spec, budget, key=jax.random.key(0))
    np.testing.assert_array_equal(result.best_choice, best)
    assert result.best_fitness == pytest.approx(scores[ok].min())
    assert result.info["achieved"] == pytest.approx(0.4)
    fitness = [h.best_fitness for h in result.history]
    assert all(b <= a for a, b in zip(fitness, fitness[1:], strict=False))  # elitist, no noise


def test_switches_keep_cost_exact_and_children_distinct() -> None:
    spec = equal_spec()
    budget = Budget(
        kind="params", target=0.4, max_sparsity=np.array([0.8, 0.8, 0.6, 0.8, 0.8, 0.8])
    )
    cm = CostModel.from_spec(spec, budget)
    searcher = EvolutionarySearcher(generations=1, offspring=30, survivors=(1,), tokens=(1,))
    state = searcher.init(spec, budget, jax.random.key(0))
    parent_cost = float(cm.total_cost(state.parent))
    query, _ = searcher.ask(state, jax.random.key(1))
    np.testing.assert_array_equal(query.choices[0], state.parent)  # one stage: parent first
    children = query.choices[1:]
    assert len(children) == 30
    assert len({c.tobytes() for c in children}) == 30
    assert not any(np.array_equal(c, state.parent) for c in children)
    np.testing.assert_allclose(cm.total_cost(children), parent_cost)
    assert cm.allowed[np.arange(6), children].all()
    # k = min(U{1..3}, U{1..3}) switches: at most 3 units up and 3 down.
    diff = children - state.parent
    assert np.all((diff > 0).sum(axis=1) <= 3) and np.all(diff.sum(axis=1) == 0)


def test_single_switch_moves_one_unit_up_and_one_down() -> None:
    spec = equal_spec()
    budget = Budget(kind="params", target=0.4)
    searcher = EvolutionarySearcher(
        generations=1, offspring=10, survivors=(1,), tokens=(1,), max_switches=1
    )
    state = searcher.init(spec, budget, jax.random.key(0))
    query, _ = searcher.ask(state, jax.random.key(2))
    diff = query.choices[1:] - state.parent
    np.testing.assert_array_equal(np.sort(diff, axis=1)[:, [0, -1]], np.tile([-1, 1], (10, 1)))
    assert np.all(np.abs(diff).sum(axis=1) == 2)


def test_unequal_steps_only_swap_matching_costs() -> None:
    # Units of 100 and 300 weights with 25% steps: steps cost 25 and 75 weights.
    spec = make_spec([100, 100, 300, 300], [[0, 0.25, 0.5, 0.75]] * 4, ["q"] * 4)
    budget = Budget(kind="params", target=0.5)
    cm = CostModel.from_spec(spec, budget)
    searcher = EvolutionarySearcher(generations=1, offspring=6, survivors=(1,), tokens=(1,))
    state = searcher.init(spec, budget, jax.random.key(0))
    np.testing.assert_array_equal(state.parent, [2, 2, 2, 2])
    query, _ = searcher.ask(state, jax.random.key(3))
    children = query.choices[1:]
    np.testing.assert_allclose(cm.total_cost(children), cm.total_cost(state.parent))
    # Changes stay within the small pair and within the large pair.
    d = children - state.parent
    assert np.all(d[:, :2].sum(axis=1) == 0) and np.all(d[:, 2:].sum(axis=1) == 0)


def test_same_role_restricts_swaps() -> None:
    spec = equal_spec()
    budget = Budget(kind="params", target=0.4)
    searcher = EvolutionarySearcher(
        generations=1, offspring=20, survivors=(1,), tokens=(1,), same_role=True
    )
    state = searcher.init(spec, budget, jax.random.key(0))
    query, _ = searcher.ask(state, jax.random.key(4))
    d = query.choices[1:] - state.parent
    assert np.all(d[:, 0::2].sum(axis=1) == 0)  # role q
    assert np.all(d[:, 1::2].sum(axis=1) == 0)  # role k


def test_no_matching_step_is_reported() -> None:
    spec = make_spec([100, 300], [[0, 0.25, 0.5], [0, 0.25, 0.5]], ["q", "q"])
    searcher = EvolutionarySearcher(generations=1, offspring=2, survivors=(1,), tokens=(1,))
    state = searcher.init(spec, Budget(kind="params", target=0.25), jax.random.key(0))
    with pytest.raises(RuntimeError, match="no budget-preserving level switch"):
        searcher.ask(state, jax.random.key(1))


def test_small_neighbourhoods_give_fewer_children() -> None:
    # Two units, three levels, parent (1, 1): only (0, 2) and (2, 0) are reachable.
    spec = make_spec([100, 100], [[0, 0.5, 1.0]] * 2, ["q", "q"])
    searcher = EvolutionarySearcher(generations=1, offspring=8, survivors=(1,), tokens=(1,))
    state = searcher.init(spec, Budget(kind="params", target=0.5), jax.random.key(0))
    query, _ = searcher.ask(state, jax.random.key(1))
    assert sorted(map(tuple, query.choices[1:].tolist())) == [(0, 2), (2, 0)]


def test_staged_selection_flow() -> None:
    spec = equal_spec()
    budget = Budget(kind="params", target=0.4)
    searcher = EvolutionarySearcher(
        generations=1, offspring=8, survivors=(4, 2, 1), tokens=(8, 16, 32)
    )
    state = searcher.init(spec, budget, jax.random.key(0))
    parent = state.parent.copy()
    seen_seeds = []

    q1, state = searcher.ask(state, jax.random.key(1))
    assert q1.choices.shape[0] == 8 and q1.fidelity == 8
    s1 = np.arange(8, 0, -1).astype(np.float32)  # the last rows are best
    state = searcher.tell(state, q1, s1)
    np.testing.assert_array_equal(state.candidates, q1.choices[[7, 6, 5, 4]])
    seen_seeds.append(q1.batch_seed)

    q2, state = searcher.ask(state, jax.random.key(2))
    assert q2.fidelity == 16
    np.testing.assert_array_equal(q2.choices, q1.choices[[7, 6, 5, 4]])
    state = searcher.tell(state, q2, np.array([4.0, 3.0, 1.0, 2.0], dtype=np.float32))
    seen_seeds.append(q2.batch_seed)

    q3, state = searcher.ask(state, jax.random.key(3))
    assert q3.fidelity == 32 and q3.choices.shape[0] == 3
    np.testing.assert_array_equal(q3.choices[0], parent)  # the parent is re-scored
    np.testing.assert_array_equal(q3.choices[1:], q1.choices[[5, 4]])
    seen_seeds.append(q3.batch_seed)
    assert len(set(seen_seeds)) == 3  # a fresh minibatch per stage

    # The parent wins ties on fresh data: elitism.
    state = searcher.tell(state, q3, np.array([1.0, 1.0, 2.0], dtype=np.float32))
    np.testing.assert_array_equal(state.parent, parent)
    assert state.parent_fitness == 1.0 and state.generation == 1 and searcher.done(state)
    result = searcher.result(state)
    assert result.evaluations == 8 + 4 + 3 and result.tokens == 8 * 8 + 4 * 16 + 3 * 32


def test_start_choice_is_used_and_checked() -> None:
    spec = equal_spec()
    budget = Budget(kind="params", target=0.4)
    start = np.array([4, 0, 4, 0, 2, 2])
    state = EvolutionarySearcher(start=start).init(spec, budget, jax.random.key(0))
    np.testing.assert_array_equal(state.parent, start)
    with pytest.raises(ValueError, match="within the allowed levels and the budget"):
        EvolutionarySearcher(start=np.array([0, 0, 0, 0, 0, 0])).init(
            spec, budget, jax.random.key(0)
        )
