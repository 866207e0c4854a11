"""Group selection of structured levels: exact refit error, exhaustive best, swap search."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from allocsearch.pruners import HeadGroups, NeuronGroups, StructuredPruner, accumulate_stats
from allocsearch.pruners.group_selection import (
    _columns,
    _swap_deltas,
    nested_removals,
    removal_errors,
    swap_search,
)

# Eight removable groups each: single query heads (GQA, 4 per kv head), kv groups (2 query
# heads each) and neurons.
LAYOUTS = {
    "query_heads": HeadGroups(
        hidden_size=6, num_heads=8, num_kv_heads=2, head_dim=2, query_heads=True
    ),
    "kv_groups": HeadGroups(hidden_size=6, num_heads=16, num_kv_heads=8, head_dim=2),
    "neurons": NeuronGroups(hidden_size=6, intermediate_size=8, min_step=1),
}
SEEDS, COUNTS = range(20), range(1, 8)


def refit_error(w: np.ndarray, h: np.ndarray, keep_cols: np.ndarray) -> float:
    """float64 reference: ``tr((W - W') H (W - W')^T)`` with ``W'`` the least-squares refit
    on the kept columns."""
    fit = np.zeros_like(w)
    k = keep_cols
    fit[:, k] = np.linalg.solve(h[np.ix_(k, k)], (w @ h)[:, k].T).T
    return float(np.trace((w - fit) @ h @ (w - fit).T))


def correlated_case(seed: int, layout):
    """Weight, statistics and damped float64 Hessian for inputs ``X = Z A`` (correlated)."""
    rng = np.random.default_rng(seed)
    n = layout.in_features
    x = rng.normal(size=(256, n)) @ rng.normal(size=(n, n))
    w = rng.normal(size=(layout.hidden_size, n)).astype(np.float32)
    stats = accumulate_stats(None, x.astype(np.float32))
    h = np.asarray(stats.hessian, np.float64)
    return w, stats, h + 0.01 * np.mean(np.diag(h)) * np.eye(n)


def chosen_and_best(layout, seed: int, count: int, **settings) -> tuple[float, float]:
    """Refit error (float64) of the pruner's choice for one level, and the exhaustive best."""
    w, stats, h = correlated_case(seed, layout)
    pruner = StructuredPruner(layout=layout, **settings)
    keep = pruner.prune(w, stats, [count / layout.num_groups]).group_keep[0]
    w64 = w.astype(np.float64)
    chosen = refit_error(w64, h, np.flatnonzero(layout.column_keep(keep)))
    best = np.inf
    for removed in itertools.combinations(range(layout.num_groups), count):
        k = np.ones(layout.num_groups, bool)
        k[list(removed)] = False
        best = min(best, refit_error(w64, h, np.flatnonzero(layout.column_keep(k))))
    return chosen, best


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_selection_equals_the_exhaustive_best_on_140_correlated_cases(kind):
    ratios = [chosen_and_best(LAYOUTS[kind], s, r)[0:2] for s in SEEDS for r in COUNTS]
    ratios = np.array([c / b for c, b in ratios])
    assert len(ratios) == 140
    np.testing.assert_allclose(ratios, 1.0, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_swap_search_is_mostly_within_one_percent_of_the_exhaustive_best(kind):
    # enumeration_limit=1 forces the local search from the greedy order on every case.
    # Measured (seeds 0-19, counts 1-7): worst 1.026 (query heads), 1.110 (kv groups),
    # 1.031 (neurons); 1, 5 and 2 of 140 cases above 1%. The greedy order alone: 1.17,
    # 1.17, 1.69. The 1% bound holds everywhere only where the default enumerates.
    pairs = [
        chosen_and_best(LAYOUTS[kind], s, r, enumeration_limit=1) for s in SEEDS for r in COUNTS
    ]
    ratios = np.array([c / b for c, b in pairs])
    assert len(ratios) == 140
    assert ratios.min() > 1 - 1e-4 and ratios.max() <= 1.12
    assert np.mean(ratios <= 1.01) >= 0.95


def hand_case():
    """``H = [[1, 0, .6], [0, 1, .6], [.6, .6, 1]]``, ``W = [1, 1, 0]``: keeping input 3
    alone costs ``wHw' - (wH)_3^2 / H_33 = 2 - 1.2^2 = 0.56``, keeping input 1 or 2 costs
    ``2 - 1 = 1``. Greedy removes input 3 first (it costs 0), so it ends at 1."""
    h = np.array([[1.0, 0.0, 0.6], [0.0, 1.0, 0.6], [0.6, 0.6, 1.0]])
    x = np.linalg.cholesky(h).T  # x^T x = h
    layout = NeuronGroups(hidden_size=1, intermediate_size=3, min_step=1)
    stats = accumulate_stats(None, x.astype(np.float32))
    return layout, stats, np.array([[1.0, 1.0, 0.0]], np.float32)


@pytest.mark.parametrize("settings", [{}, {"enumeration_limit": 0}])
def test_hand_computed_case_where_greedy_is_suboptimal(settings):
    layout, stats, w = hand_case()
    variants = StructuredPruner(layout=layout, percdamp=0.0, **settings).prune(w, stats, [2 / 3])
    np.testing.assert_array_equal(variants.group_keep, [[False, False, True]])
    np.testing.assert_allclose(np.asarray(variants.weights[0]), [[0.0, 0.0, 1.2]], atol=1e-5)
    hinv = jnp.asarray(np.linalg.inv(np.asarray(stats.hessian, np.float64)), jnp.float32)
    errors = removal_errors(jnp.asarray(w), hinv, np.array([[0, 1], [0, 2], [1, 2], [2, 0]]), 1)
    np.testing.assert_allclose(errors, [0.56, 1.0, 1.0, 1.0], rtol=1e-4)
    greedy = StructuredPruner(layout=layout, percdamp=0.0, enumeration_limit=0, max_swaps=0)
    keep = greedy.prune(w, stats, [2 / 3]).group_keep[0]
    assert keep[2] == np.False_ and keep.sum() == 1


@pytest.mark.parametrize("width", [1, 3])
def test_swap_deltas_match_exact_rescoring(width):
    rng = np.random.default_rng(7)
    n = 8 * width
    x = rng.normal(size=(200, n)) @ rng.normal(size=(n, n))
    h = x.T @ x + 0.01 * np.trace(x.T @ x) / n * np.eye(n)
    hinv = jnp.asarray(np.linalg.inv(h), jnp.float32)
    w = jnp.asarray(rng.normal(size=(5, n)), jnp.float32)
    removed, ins = np.array([1, 4, 6]), np.array([0, 2, 3, 5, 7])
    deltas, ka, kb = _swap_deltas(
        w,
        hinv,
        jnp.asarray(_columns(removed, width)),
        jnp.asarray(_columns(np.arange(3)[:, None], width)),
        jnp.asarray(_columns(ins[:, None], width)),
        jnp.ones(3, bool),
        jnp.ones(5, bool).at[4].set(False),
        width=width,
        pool_out=3,
        pool_in=5,
    )
    base = removal_errors(w, hinv, removed[None], width)[0]
    for a, b in itertools.product(range(3), range(5)):
        trial = removed.copy()
        trial[int(ka[a])] = ins[int(kb[b])]
        exact = removal_errors(w, hinv, trial[None], width)[0] - base
        if int(kb[b]) == 4:  # masked
            assert deltas[a, b] == np.inf
            continue
        assert deltas[a, b] == pytest.approx(exact, abs=1e-4 * base)


def test_nested_chain_is_nested_and_swaps_respect_bounds():
    layout = LAYOUTS["query_heads"]
    w, stats, h = correlated_case(3, layout)
    hinv = jnp.asarray(np.linalg.inv(h), jnp.float32)
    w_j = jnp.asarray(w)
    order = np.arange(8)
    for limit in (5000, 0):
        sets = nested_removals(w_j, hinv, [2, 4, 6], 2, greedy_order=lambda: order, limit=limit)
        assert [len(s) for s in sets] == [2, 4, 6]
        assert set(sets[0]) <= set(sets[1]) <= set(sets[2])
    fixed, err = swap_search(w_j, hinv, np.array([0, 1, 2]), 2, fixed=np.array([0, 1]))
    assert {0, 1} <= set(fixed.tolist())
    assert err <= removal_errors(w_j, hinv, np.array([[0, 1, 2]]), 2)[0]
    with pytest.raises(ValueError, match="counts must increase"):
        nested_removals(w_j, hinv, [3, 3], 2, greedy_order=lambda: order)
    with pytest.raises(ValueError, match="max_swaps must be an int >= 0"):
        StructuredPruner(layout=layout, max_swaps=-1)
