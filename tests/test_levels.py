"""Level grids: hand-computed cases, exactness of counts, and SupernetSpec compatibility."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from allocsearch.pruners import MagnitudePruner, NMMagnitudePruner
from allocsearch.supernet.levels import (
    LevelGrid,
    equal_step_grid,
    explicit_grid,
    nm_grid,
    round_count,
    structured_grid,
)
from allocsearch.supernet.spec import SupernetSpec, Unit


def counts_of(grid: LevelGrid, totals) -> list[list[int]]:
    """Per-unit removed counts of the valid levels (exact integers)."""
    out = []
    for i, n in enumerate(totals):
        raw = grid.sparsity[i, grid.valid[i]] * n
        np.testing.assert_allclose(raw, np.rint(raw), atol=1e-9)  # whole items
        out.append(np.rint(raw).astype(int).tolist())
    return out


def as_spec(grid: LevelGrid, numel, structure: str = "unstructured") -> SupernetSpec:
    units = tuple(
        Unit(
            name=f"l{i}", role="q", block=i, layers=(f"l{i}",), numel=int(n), flops_per_token=int(n)
        )
        for i, n in enumerate(numel)
    )
    return SupernetSpec(
        units=units,
        sparsity=grid.sparsity,
        valid=grid.valid,
        center=grid.center,
        structure=structure,
        level_labels=grid.labels,
    )


def test_round_count_rounds_half_up():
    np.testing.assert_array_equal(round_count([0.5, 0.25, 0.125, 0.7], 10), [5, 3, 1, 7])


def test_equal_step_grid_hand_computed():
    numel = [1000, 100, 4000]
    grid = equal_step_grid(numel, center=0.5, step_weights=50, steps_each_side=2)
    assert counts_of(grid, numel) == [
        [400, 450, 500, 550, 600],
        [0, 50, 100],  # 100 weights: -50 and 150 fall outside [0, 100] and are dropped
        [1900, 1950, 2000, 2050, 2100],
    ]
    np.testing.assert_array_equal(grid.center, [2, 1, 2])
    np.testing.assert_array_equal(grid.valid.sum(axis=1), [5, 3, 5])
    np.testing.assert_allclose(grid.sparsity[1, :3], [0.0, 0.5, 1.0])
    assert np.all(np.isnan(grid.sparsity[1, 3:]))
    assert grid.labels is None
    as_spec(grid, numel)  # the spec accepts it


def test_equal_step_grid_bounds_drop_levels_and_center_must_fit():
    numel = [1000, 1000]
    grid = equal_step_grid(
        numel,
        center=0.5,
        step_weights=100,
        steps_each_side=3,
        min_sparsity=[0.3, 0.45],
        max_sparsity=0.65,
    )
    assert counts_of(grid, numel) == [[300, 400, 500, 600], [500, 600]]
    np.testing.assert_array_equal(grid.center, [2, 0])
    with pytest.raises(ValueError, match=r"center level \(500 of 1000 weights\) lies outside"):
        equal_step_grid(numel, center=0.5, step_weights=10, steps_each_side=1, min_sparsity=0.6)
    with pytest.raises(ValueError, match="step_weights must be a positive int"):
        equal_step_grid(numel, center=0.5, step_weights=0, steps_each_side=1)
    with pytest.raises(ValueError, match="numel must be"):
        equal_step_grid([10, 0], center=0.5, step_weights=1, steps_each_side=1)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    numel=st.lists(st.integers(1, 10**8), min_size=1, max_size=6),
    center=st.floats(0.0, 1.0),
    step=st.integers(1, 10**6),
    side=st.integers(0, 8),
)
def test_equal_step_grid_steps_are_equal_whole_weights(numel, center, step, side):
    grid = equal_step_grid(numel, center=center, step_weights=step, steps_each_side=side)
    counts = counts_of(grid, numel)
    for i, c in enumerate(counts):
        assert np.all(np.diff(c) == step)  # equal steps in weights, whatever the layer size
        assert c[grid.center[i]] == round_count(center, numel[i])
        assert 0 <= c[0] and c[-1] <= numel[i]
    as_spec(grid, numel)


def test_equal_step_swaps_keep_the_budget_exact():
    numel = np.array([4096 * 4096, 4096 * 14336, 1024 * 4096])
    grid = equal_step_grid(numel, center=0.5, step_weights=10**6, steps_each_side=8)
    spec = as_spec(grid, numel)
    uniform = spec.center.copy()
    kept = spec.kept_params()[np.arange(3), uniform].sum()
    swapped = uniform + np.array([1, -1, 0])  # one layer up, one down
    assert spec.kept_params()[np.arange(3), swapped].sum() == kept
    swapped = uniform + np.array([-2, 0, 2])
    assert spec.kept_params()[np.arange(3), swapped].sum() == kept


def test_grid_levels_are_accepted_by_the_pruners():
    numel = [12 * 10, 7 * 9]
    grid = equal_step_grid(numel, center=0.37, step_weights=11, steps_each_side=3)
    for i, shape in enumerate([(12, 10), (7, 9)]):
        weight = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 1.0
        levels = grid.sparsity[i, grid.valid[i]]
        variants = MagnitudePruner().prune(weight, None, levels)
        for k, c in enumerate(counts_of(grid, numel)[i]):
            assert int(np.sum(np.asarray(variants.weights(weight, k)) == 0)) == c


def test_explicit_grid_snaps_to_whole_weights():
    grid = explicit_grid([0.0, 0.3, 0.5, 0.7], numel=[10, 1000, 7], center=0.5)
    assert counts_of(grid, [10, 1000, 7]) == [[0, 3, 5, 7], [0, 300, 500, 700], [0, 2, 4, 5]]
    np.testing.assert_allclose(grid.sparsity[2], [0, 2 / 7, 4 / 7, 5 / 7])
    np.testing.assert_array_equal(grid.center, [2, 2, 2])
    as_spec(grid, [10, 1000, 7])
    with pytest.raises(ValueError, match="layer 0 has only 4 weights: sparsities 0.5 and 0.6"):
        explicit_grid([0.5, 0.6], numel=[4], center=0.5)
    with pytest.raises(ValueError, match="center 0.4 must be one of the sparsities"):
        explicit_grid([0.5, 0.6], numel=[100], center=0.4)
    with pytest.raises(ValueError, match="strictly increasing"):
        explicit_grid([0.6, 0.5], numel=[100], center=0.5)


def test_nm_grid_patterns_labels_and_errors():
    grid = nm_grid([(0, 4), (1, 4), (2, 4), (3, 4)], in_features=[8, 16], center=(2, 4))
    np.testing.assert_array_equal(grid.sparsity, [[0, 0.25, 0.5, 0.75]] * 2)
    np.testing.assert_array_equal(grid.center, [2, 2])
    assert grid.labels == (("0:4", "1:4", "2:4", "3:4"),) * 2
    spec = as_spec(grid, [64, 128], structure="nm")
    assert spec.level_labels[0][spec.center[0]] == "2:4"
    four_eight = nm_grid([(4, 8)], in_features=[16], center=(4, 8))
    assert four_eight.labels == (("4:8",),) and four_eight.sparsity[0, 0] == 0.5
    weight = np.random.default_rng(0).normal(size=(2, 16)).astype(np.float32)
    variants = NMMagnitudePruner(m=8).prune(weight, None, four_eight.sparsity[0])
    assert int(np.sum(np.asarray(variants.weights(weight, 0)) == 0)) == 16
    with pytest.raises(ValueError, match=r"layers \[1\] have in_features \[10\]"):
        nm_grid([(2, 4)], in_features=[8, 10], center=(2, 4))
    with pytest.raises(ValueError, match=r"one group size M >= 1, got M values \[4, 8\]"):
        nm_grid([(1, 4), (4, 8)], in_features=[8], center=(1, 4))
    with pytest.raises(ValueError, match="center pattern"):
        nm_grid([(1, 4), (2, 4)], in_features=[8], center=(3, 4))


def test_structured_grid_whole_groups_per_unit_centers_and_labels():
    grid = structured_grid(
        [8, 8, 11008],
        [1, 2, 1376],
        center=[0.5, 0.25, 0.5],
        steps_each_side=2,
        min_step=1,
        group_name="groups",
    )
    assert counts_of(grid, [8, 8, 11008]) == [
        [2, 3, 4, 5, 6],
        [0, 2, 4, 6],
        [2752, 4128, 5504, 6880, 8256],
    ]
    np.testing.assert_array_equal(grid.center, [2, 1, 2])
    assert grid.labels[0] == ("6 groups", "5 groups", "4 groups", "3 groups", "2 groups")
    as_spec(grid, [8, 8, 11008], structure="heads")
    capped = structured_grid([8], 1, center=0.5, steps_each_side=4, max_sparsity=0.75)
    assert counts_of(capped, [8]) == [[0, 1, 2, 3, 4, 5, 6]]
    with pytest.raises(ValueError, match="group_step must be an int or int.* >= min_step=32"):
        structured_grid([11008], 16, center=0.5, steps_each_side=2, min_step=32)
