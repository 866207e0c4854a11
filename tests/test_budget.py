"""Budget arithmetic: cost tables, allowed levels, feasibility, snapping, latency tables."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from allocsearch.search.budget import (
    Budget,
    CostModel,
    InfeasibleBudgetError,
    LatencyTable,
    allowed_levels,
    check_feasible_target,
    cost_table,
    load_latency_table,
    snap_to_levels,
    uniform_choice,
)
from allocsearch.supernet.spec import SupernetSpec, Unit


def make_spec(
    numel: list[int], levels: list[list[float]], center: list[int] | None = None
) -> SupernetSpec:
    """Units ``u0..`` with ``flops = 2 * numel`` and the given level sparsities."""
    L, K = len(numel), max(len(r) for r in levels)
    sparsity = np.full((L, K), np.nan)
    valid = np.zeros((L, K), dtype=bool)
    for l, row in enumerate(levels):
        sparsity[l, : len(row)] = row
        valid[l, : len(row)] = True
    units = tuple(Unit(f"u{l}", "q", l, (f"u{l}",), n, 2 * n) for l, n in enumerate(numel))
    c = np.zeros(L, dtype=np.int32) if center is None else np.array(center, dtype=np.int32)
    return SupernetSpec(units, sparsity, valid, c)


QUARTERS = [0.0, 0.25, 0.5, 0.75]


@pytest.fixture
def spec3() -> SupernetSpec:
    return make_spec([100, 100, 100], [QUARTERS] * 3, center=[2, 2, 2])


def test_budget_validation_names_the_bad_value() -> None:
    with pytest.raises(ValueError, match="'weights'"):
        Budget(kind="weights", target=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1.5"):
        Budget(kind="params", target=1.5)
    with pytest.raises(ValueError, match="exceeds"):
        Budget(kind="params", target=0.5, min_sparsity=0.6, max_sparsity=0.4)
    with pytest.raises(ValueError, match="latency table is required"):
        Budget(kind="latency", target=0.5)


def test_cost_table_and_allowed_levels_apply_min_max(spec3: SupernetSpec) -> None:
    budget = Budget(
        kind="params", target=0.5, min_sparsity=np.array([0.25, 0.0, 0.0]), max_sparsity=0.5
    )
    allowed = allowed_levels(spec3, budget)
    np.testing.assert_array_equal(
        allowed, [[False, True, True, False], [True, True, True, False], [True, True, True, False]]
    )
    cost = cost_table(spec3, budget)
    np.testing.assert_array_equal(cost[0], [np.inf, 75.0, 50.0, np.inf])
    flops = cost_table(spec3, Budget(kind="flops", target=0.5))
    np.testing.assert_array_equal(flops[1], [200.0, 150.0, 100.0, 50.0])


def test_per_unit_limits_must_match_the_number_of_units(spec3: SupernetSpec) -> None:
    with pytest.raises(ValueError, match=r"float\[L=3\]"):
        allowed_levels(spec3, Budget(kind="params", target=0.5, min_sparsity=np.zeros(2)))


def test_cost_model_totals_feasibility_and_achieved(spec3: SupernetSpec) -> None:
    cm = CostModel.from_spec(spec3, Budget(kind="params", target=0.5))
    assert cm.dense == 300.0 and cm.capacity == 150.0
    choices = np.array([[2, 2, 2], [1, 2, 3], [1, 1, 2], [0, 3, 3]])
    np.testing.assert_allclose(cm.total_cost(choices), [150.0, 150.0, 200.0, 150.0])
    np.testing.assert_array_equal(cm.is_feasible(choices), [True, True, False, True])
    np.testing.assert_allclose(cm.achieved(choices), [0.5, 0.5, 1 / 3, 0.5])
    # Out of range levels are infeasible, not an indexing error.
    assert not cm.is_feasible(np.array([4, 0, 0]))
    assert not cm.is_feasible(np.array([-1, 3, 3]))
    # Float noise at the capacity does not flip feasibility.
    assert bool(
        CostModel(cm.cost * (1 + 1e-12), cm.allowed, cm.dense, 150.0).is_feasible(choices[0])
    )
    with pytest.raises(ValueError, match="int"):
        cm.total_cost(np.array([1.0, 2.0, 2.0]))


def test_from_count_converts_a_count_to_a_fraction(spec3: SupernetSpec) -> None:
    b = Budget.from_count(120, spec=spec3)
    assert b.kind == "params" and b.target == pytest.approx(0.4)
    assert Budget.from_count(300, spec=spec3, kind="flops").target == pytest.approx(0.5)
    with pytest.raises(ValueError, match="300"):
        Budget.from_count(400, spec=spec3)


def test_infeasible_target_reports_the_achievable_range() -> None:
    spec = make_spec([100, 300], [QUARTERS, QUARTERS])
    budget = Budget(kind="params", target=0.7, max_sparsity=np.array([0.75, 0.5]))
    # Most removable: 75 + 150 of 400 = 0.5625; least: 0.
    with pytest.raises(InfeasibleBudgetError, match=r"between 0 and 0\.5625"):
        check_feasible_target(spec, budget)
    low = Budget(kind="params", target=0.1, min_sparsity=0.25)
    with pytest.raises(InfeasibleBudgetError, match=r"between 0\.25 and 0\.75"):
        check_feasible_target(spec, low)
    check_feasible_target(
        spec, Budget(kind="params", target=0.5625, max_sparsity=np.array([0.75, 0.5]))
    )


def test_unit_without_allowed_level_is_named() -> None:
    spec = make_spec([100, 100], [[0.0, 0.5], [0.0, 0.25]])
    with pytest.raises(InfeasibleBudgetError, match="u1"):
        check_feasible_target(
            spec, Budget(kind="params", target=0.3, min_sparsity=0.3, max_sparsity=0.4)
        )


def test_snap_restores_feasibility_by_hand(spec3: SupernetSpec) -> None:
    # Nearest levels 0.25, 0.25, 0.75 remove 125 < 150. Raising unit 0 or 1 to 0.5 adds
    # deviation 0.15 each (tie -> unit 0); raising unit 2 is impossible.
    budget = Budget(kind="params", target=0.5)
    np.testing.assert_array_equal(
        snap_to_levels(spec3, budget, np.array([0.3, 0.3, 0.9])), [2, 1, 3]
    )


def test_snap_uses_the_budget_by_hand(spec3: SupernetSpec) -> None:
    # Targets 0.5 everywhere keep 150 of a 180 capacity: one unit can move to 0.25
    # (+25 -> 175), a second cannot (200 > 180).
    budget = Budget(kind="params", target=0.4)
    np.testing.assert_array_equal(snap_to_levels(spec3, budget, np.full(3, 0.5)), [1, 2, 2])


def test_snap_rejects_bad_targets(spec3: SupernetSpec) -> None:
    with pytest.raises(ValueError, match=r"float\[L=3\]"):
        snap_to_levels(spec3, Budget(kind="params", target=0.5), np.zeros(2))


@settings(max_examples=60, deadline=None)
@given(
    numel=st.lists(st.integers(10, 500), min_size=2, max_size=6),
    target=st.floats(0.0, 0.7),
    seed=st.integers(0, 2**16),
)
def test_snap_is_feasible_and_maximal(numel: list[int], target: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    levels = [
        list(np.round(np.linspace(0.0, rng.uniform(0.7, 1.0), rng.integers(2, 7)), 6))
        for _ in numel
    ]
    spec = make_spec(numel, levels)
    budget = Budget(kind="params", target=target)
    choice = snap_to_levels(spec, budget, rng.uniform(0, 1, size=len(numel)))
    cm = CostModel.from_spec(spec, budget)
    assert choice.dtype == np.int32 and bool(cm.is_feasible(choice))
    # Maximal: no single unit can move to a costlier level within the capacity.
    rows = np.arange(len(numel))
    extra = cm.cost - cm.cost[rows, choice][:, None]
    fits = cm.allowed & (extra > 0) & (cm.total_cost(choice) + extra <= cm.capacity * (1 + 1e-9))
    assert not fits.any()


def test_uniform_choice_is_center_when_it_uses_the_budget(spec3: SupernetSpec) -> None:
    np.testing.assert_array_equal(
        uniform_choice(spec3, Budget(kind="params", target=0.5)), [2, 2, 2]
    )
    # A centre at 50% under a 25% budget leaves room: the uniform 25% allocation instead.
    np.testing.assert_array_equal(
        uniform_choice(spec3, Budget(kind="params", target=0.25)), [1, 1, 1]
    )
    # Between levels: as uniform as the levels allow while using the budget.
    got = uniform_choice(spec3, Budget(kind="params", target=0.4))
    assert sorted(got.tolist()) == [1, 2, 2]


def test_uniform_choice_brute_force_small() -> None:
    spec = make_spec([100, 200, 300], [QUARTERS, QUARTERS, QUARTERS], center=[2, 2, 2])
    budget = Budget(kind="params", target=0.45)
    cm = CostModel.from_spec(spec, budget)
    got = uniform_choice(spec, budget)
    assert bool(cm.is_feasible(got))
    rows = np.arange(3)

    def maximal(c: np.ndarray) -> bool:
        extra = cm.cost - cm.cost[rows, c][:, None]
        return not (cm.allowed & (extra > 0) & (cm.total_cost(c) + extra <= cm.capacity)).any()

    # The centre (all 0.5, keeping 300 of 330) leaves room for unit 0 at 0.25; among
    # feasible allocations that use the budget (no single costlier move fits), the
    # result is one of those closest to uniform 0.45 in summed |s - 0.45|.
    candidates = [np.array(c) for c in itertools.product(range(4), repeat=3)]
    best = min(
        np.abs(np.take(QUARTERS, c) - 0.45).sum()
        for c in candidates
        if cm.is_feasible(c) and maximal(c)
    )
    assert maximal(got)
    assert np.abs(np.take(QUARTERS, got) - 0.45).sum() == pytest.approx(best)
    np.testing.assert_array_equal(got, [1, 2, 2])


def _latency_spec() -> SupernetSpec:
    return make_spec([100, 100], [[0.0, 0.5, 0.75], [0.25, 0.5]])


def test_load_latency_table_json_and_csv_agree(tmp_path) -> None:  # noqa: ANN001
    spec = _latency_spec()
    (tmp_path / "lat.json").write_text(
        json.dumps({"u0": {"levels": [4.0, 2.5, 1.5]}, "u1": {"levels": [3.0, 2.0], "dense": 4.0}})
    )
    rows = [
        "unit,level,seconds",
        "u0,0,4.0",
        "u0,1,2.5",
        "u0,2,1.5",
        "u1,1,2.0",
        "u1,0,3.0",
        "u1,dense,4.0",
    ]
    (tmp_path / "lat.csv").write_text("\n".join(rows) + "\n")
    a = load_latency_table(tmp_path / "lat.json", spec)
    b = load_latency_table(tmp_path / "lat.csv", spec)
    for t in (a, b):
        np.testing.assert_array_equal(t.kept, [[4.0, 2.5, 1.5], [3.0, 2.0, np.inf]])
        np.testing.assert_array_equal(t.dense, [4.0, 4.0])
    budget = Budget(kind="latency", target=0.5, latency=a)
    cm = CostModel.from_spec(spec, budget)
    assert cm.dense == 8.0 and cm.capacity == 4.0
    np.testing.assert_array_equal(cost_table(spec, budget), a.kept)
    assert bool(cm.is_feasible(np.array([2, 1]))) and not bool(cm.is_feasible(np.array([1, 1])))


def test_load_latency_table_errors(tmp_path) -> None:  # noqa: ANN001
    spec = _latency_spec()
    path = tmp_path / "lat.json"
    path.write_text(json.dumps({"u0": {"levels": [4.0, 2.5, 1.5]}}))
    with pytest.raises(ValueError, match=r"missing \['u1'\]"):
        load_latency_table(path, spec)
    path.write_text(
        json.dumps({"u0": {"levels": [4.0, 2.5]}, "u1": {"levels": [3, 2], "dense": 4}})
    )
    with pytest.raises(ValueError, match="'u0' has 2 levels, supernet has 3"):
        load_latency_table(path, spec)
    path.write_text(json.dumps({"u0": {"levels": [4.0, 2.5, 1.5]}, "u1": {"levels": [3, 2]}}))
    with pytest.raises(ValueError, match="'u1' needs a 'dense' latency"):
        load_latency_table(path, spec)
    with pytest.raises(ValueError, match=".txt"):
        load_latency_table(tmp_path / "lat.txt", spec)


@pytest.mark.parametrize(
    ("suffix", "text", "message"),
    [
        (".json", '{"u0": {"levels": [4.0, [2.5], 1.5]}}', r"unit 'u0' level 1: latency \[2.5\]"),
        (".json", '{"u0": {"levels": [4.0, "fast", 1.5]}}', r"unit 'u0' level 1: latency 'fast'"),
        (".json", '{"u0": {"levels": [4.0, -1, 1.5]}}', r"unit 'u0' level 1: latency -1 is not"),
        (".json", '{"u0": {"levels": 4.0}}', r"unit 'u0' needs an object with a 'levels' list"),
        (".json", '{"u1": {"levels": [3, 2], "dense": true}}', r"unit 'u1' 'dense': latency True"),
        (".json", '{"u0": {"levels": [4.0, 2.5', r"is not valid JSON"),
        (".csv", "unit,level,seconds\nu0,0\n", r"line 2: expected 3 fields unit,level,seconds"),
        (".csv", "unit,level,seconds\nu0,0,4,5\n", r"line 2: expected 3 fields"),
        (".csv", "unit,level,seconds\nu0,0,abc\n", r"line 2: unit 'u0' level 0: latency 'abc'"),
        (".csv", "unit,level,seconds\nu0,x,1\n", r"line 2: unit 'u0' level 'x' is not an integer"),
    ],
)
def test_malformed_latency_values_name_file_unit_and_value(tmp_path, suffix, text, message):
    """Issue 16.1: every malformed value is a ValueError naming the file and the unit
    (never a TypeError), so the CLI prints one line and exits 2."""
    path = tmp_path / f"lat{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_latency_table(path, _latency_spec())
    assert str(path) in str(info.value)


def test_latency_table_shape_is_checked() -> None:
    spec = _latency_spec()
    bad = LatencyTable(kept=np.ones((2, 2)), dense=np.ones(2))
    with pytest.raises(ValueError, match="do not match"):
        cost_table(spec, Budget(kind="latency", target=0.2, latency=bad))


def test_equal_steps_are_recognised_only_where_every_allowed_step_costs_the_same():
    inf = np.inf
    # Two units, steps of 10 weights everywhere (the forbidden last level is ignored).
    equal = CostModel(
        np.array([[100.0, 90.0, 80.0], [50.0, 40.0, inf]]),
        np.array([[True, True, True], [True, True, False]]),
        150.0,
        100.0,
    )
    assert equal.has_equal_steps(1e-6)
    # Attention-like steps of 10 beside MLP-like steps of 30: not equal.
    unequal = CostModel(
        np.array([[100.0, 90.0, 80.0], [90.0, 60.0, 30.0]]), np.ones((2, 3), bool), 190.0, 100.0
    )
    assert not unequal.has_equal_steps(1e-6)
    assert unequal.has_equal_steps(2.0)  # within a loose enough tolerance
    single = CostModel(np.array([[100.0, inf]]), np.array([[True, False]]), 100.0, 100.0)
    assert single.has_equal_steps(1e-6)  # no step at all: vacuously equal
