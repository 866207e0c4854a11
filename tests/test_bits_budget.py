"""Bits and bytes budgets: costs by hand, DP/knapsack optima against brute force on a tiny
bits table, uniform and outlier-aware bits baselines, EvoPress under a bits budget."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest

from allocsearch.distributed.local import run_search
from allocsearch.quantizers.costs import level_bits, level_from_label, spec_quant_levels
from allocsearch.quantizers.grid import QuantLevel
from allocsearch.search.baselines import owl
from allocsearch.search.bits_baselines import outlier_ratios, owl_bits, owl_bits_choice
from allocsearch.search.budget import (
    Budget,
    CostModel,
    InfeasibleBudgetError,
    average_bits_to_target,
    cost_table,
    dense_cost,
    target_to_average_bits,
    uniform_choice,
)
from allocsearch.search.dp import dp_solve
from allocsearch.search.evolutionary import EvolutionarySearcher
from allocsearch.search.knapsack import mckp_milp
from allocsearch.supernet.quantized import quantized_grid
from allocsearch.supernet.spec import SupernetSpec, Unit

SHAPES = [(8, 256), (16, 128), (4, 384), (8, 128)]


def bits_spec(bits=(8, 4, 3, 2), *, symmetric=True, shapes=SHAPES) -> SupernetSpec:
    grid, _ = quantized_grid(shapes, list(bits), group_size=128, symmetric=symmetric)
    units = tuple(
        Unit(f"model.layers.{i}.mlp.down_proj", "down", i, (f"model.layers.{i}.mlp.down_proj",),
             o * n, o * n)
        for i, (o, n) in enumerate(shapes)
    )  # fmt: skip
    return SupernetSpec(units, grid.sparsity, grid.valid, grid.center, "unstructured", grid.labels)


def test_bits_and_bytes_costs_by_hand():
    spec = bits_spec()
    cost = cost_table(spec, Budget(kind="bits", target=0.5))
    # (8, 256) sym g128: b * 2048 codes + 16 bits x 8 rows x 2 groups = 2048 b + 256
    np.testing.assert_allclose(cost[0], [2048 * b + 256 for b in (8, 4, 3, 2)], rtol=1e-12)
    # (4, 384): 1536 b + 16 x 4 x 3
    np.testing.assert_allclose(cost[2], [1536 * b + 192 for b in (8, 4, 3, 2)], rtol=1e-12)
    for u, shape in enumerate(SHAPES):
        want = [level_bits(QuantLevel(b, 128, True), shape) for b in (8, 4, 3, 2)]
        np.testing.assert_allclose(cost[u], want, rtol=1e-12)
    np.testing.assert_allclose(cost_table(spec, Budget(kind="bytes", target=0.5)), cost / 8)
    assert dense_cost(spec, Budget(kind="bits", target=0.5)) == 16 * (2048 * 2 + 1536 + 1024)
    assert dense_cost(spec, Budget(kind="bytes", target=0.5)) == 2 * (2048 * 2 + 1536 + 1024)
    # asymmetric: + b bits of zero point per group
    asym = cost_table(bits_spec(symmetric=False), Budget(kind="bits", target=0.5))
    np.testing.assert_allclose(asym[1], [2048 * b + 16 * (16 + b) for b in (8, 4, 3, 2)])


def test_average_bits_target_round_trip_and_errors():
    assert average_bits_to_target(3.0) == 1 - 3 / 16
    assert target_to_average_bits(1 - 3 / 16) == 3.0
    b = Budget.from_average_bits(4.5)
    assert (b.kind, b.target) == ("bits", 1 - 4.5 / 16)
    for bad in (0, -1, 16.5, float("nan"), True, "3"):
        with pytest.raises(ValueError, match="average bits"):
            average_bits_to_target(bad)


def test_uniform_bits_and_the_infeasible_message():
    spec = bits_spec()
    # every layer at 3 bits costs 3 + 16/128 = 3.125 bits per weight: the centre at 3.125
    centre_bits = quantized_grid(SHAPES, [8, 4, 3, 2], group_size=128, symmetric=True)[0].center
    np.testing.assert_array_equal(uniform_choice(spec, Budget.from_average_bits(3.125)), [2] * 4)
    assert list(centre_bits) == [2] * 4  # bits sorted down: [8, 4, 3, 2], middle 3
    # 3.0 bits: some layers must drop to 2 bits (then leftover budget is spent); the snap
    # stays within the budget: here 2, 3, 3, 4 bits = (4352 + 6400 + 4800 + 4224) / 6656
    cm = CostModel.from_spec(spec, Budget.from_average_bits(3.0))
    choice = uniform_choice(spec, Budget.from_average_bits(3.0))
    np.testing.assert_array_equal(choice, [3, 2, 2, 1])
    assert cm.is_feasible(choice)
    assert target_to_average_bits(cm.achieved(choice)) == pytest.approx(19776 / 6656)
    with pytest.raises(InfeasibleBudgetError, match=r"between 2\.125 and 8\.125 bits per weight"):
        uniform_choice(spec, Budget.from_average_bits(1.5))


@pytest.mark.parametrize("avg", [2.2, 2.6, 3.0, 3.4, 4.0, 5.5, 7.9])
def test_dp_and_knapsack_match_brute_force_on_a_bits_table(avg):
    spec = bits_spec()
    cm = CostModel.from_spec(spec, Budget.from_average_bits(avg))
    rng = np.random.default_rng(3)
    # error grows as bits fall, differently per layer
    error = np.cumsum(rng.uniform(0.0, 1.0, size=cm.cost.shape), axis=1)
    error[:, 0] = 0.0
    best, best_err = None, np.inf
    for c in itertools.product(range(4), repeat=spec.num_units):
        c = np.array(c)
        if cm.is_feasible(c):
            e = error[np.arange(spec.num_units), c].sum()
            if e < best_err - 1e-12:
                best, best_err = c, e
    for solve in (dp_solve, lambda e, c, cap: mckp_milp(e, c, cap).choice):
        got = np.asarray(solve(error, cm.cost, cm.capacity))
        assert cm.is_feasible(got)
        assert error[np.arange(spec.num_units), got].sum() == pytest.approx(best_err, abs=1e-12)
    np.testing.assert_array_equal(dp_solve(error, cm.cost, cm.capacity), best)


def test_evopress_under_a_bits_budget_repairs_and_swaps():
    # levels {8, 4, 3, 2}: the 8 -> 4 step costs 4x the 1-bit steps, so "auto" repairs
    spec = bits_spec()
    budget = Budget.from_average_bits(3.0)
    cm = CostModel.from_spec(spec, budget)
    assert not cm.has_equal_steps(1e-6)
    # levels {4, 3, 2} on layers of one size: every 1-bit step costs the same, so "auto"
    # swaps at constant cost (EvoPress's group_rule=size mutation)
    same = bits_spec((4, 3, 2), shapes=[(8, 256)] * 4)
    assert CostModel.from_spec(same, budget).has_equal_steps(1e-9)
    table = np.cumsum(np.random.default_rng(0).uniform(size=cm.cost.shape), axis=1)

    def evaluate(choices, *, fidelity, batch_seed):
        return table[np.arange(spec.num_units), np.asarray(choices)].sum(axis=1)

    searcher = EvolutionarySearcher(generations=25, offspring=8, survivors=(1,), tokens=(8,))
    result = run_search(searcher, evaluate, spec, budget, key=jax.random.key(0))
    assert cm.is_feasible(result.best_choice)
    # the exact optimum of this additive score; the (1 + lambda) search reaches it
    opt = dp_solve(table - table[:, :1], cm.cost, cm.capacity)
    assert table[np.arange(4), result.best_choice].sum() == pytest.approx(
        table[np.arange(4), opt].sum()
    )


def test_level_labels_parse_back():
    assert level_from_label("4b g128 sym") == QuantLevel(4, 128, True)
    assert level_from_label("3b g64 asym") == QuantLevel(3, 64, False)
    assert level_from_label("2:4") is None and level_from_label("50%") is None
    spec = bits_spec()
    levels = spec_quant_levels(spec.level_labels)
    assert [lv.bits for lv in levels[0]] == [8, 4, 3, 2]
    assert spec_quant_levels((("2:4", "4b g128 sym"),)) is None
    assert spec_quant_levels(None) is None


def test_owl_bits_gives_outlier_layers_more_bits_by_hand():
    spec = bits_spec()
    rng = np.random.default_rng(1)
    weights, norms = {}, {}
    for u, (o, n) in zip(spec.units, SHAPES, strict=True):
        weights[u.name] = rng.normal(size=(o, n))
        norms[u.name] = np.ones(n)
    # layer 2 gets many large weights (outliers), layer 0 none beyond the normal tail
    weights[spec.units[2].name][:, :40] *= 30.0
    ratio = outlier_ratios(spec, weights=weights, input_norms=norms)
    assert np.argmax(ratio) == 2
    budget = Budget.from_average_bits(3.5)
    bits = owl_bits(spec, budget, weights=weights, input_norms=norms, spread=1 / 16)
    # spans ±1 bit: max - min = 2 bits, weighted mean = 3.5
    assert bits.max() - bits.min() == pytest.approx(2.0)
    assert np.dot(bits, spec.numel) / spec.numel.sum() == pytest.approx(3.5)
    assert np.argmax(bits) == 2
    choice = owl_bits_choice(spec, budget, weights=weights, input_norms=norms, spread=1 / 16)
    assert CostModel.from_spec(spec, budget).is_feasible(choice)
    assert choice[2] == choice.min()  # the outlier layer keeps the most bits
    # the sparsity OWL (per block) is a different rule: here every unit is its own block
    assert owl(spec, budget, weights=weights, input_norms=norms).shape == (4,)
