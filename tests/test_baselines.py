"""Allocation baselines on hand-computed cases."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from allocsearch.search.baselines import (
    erk,
    erk_sparsity,
    global_magnitude,
    global_magnitude_sparsity,
    lamp,
    lamp_scores,
    lamp_sparsity,
    owl,
    owl_sparsity,
    random_feasible,
    uniform,
)
from allocsearch.search.budget import Budget, CostModel, uniform_choice
from allocsearch.supernet.spec import SupernetSpec, Unit


def layer_spec(
    shapes: dict[str, tuple[int, int]], blocks: list[int], levels: list[float]
) -> SupernetSpec:
    """One unit per layer, all with the same level sparsities."""
    names = list(shapes)
    units = tuple(
        Unit(n, "q", b, (n,), shapes[n][0] * shapes[n][1], shapes[n][0] * shapes[n][1])
        for n, b in zip(names, blocks, strict=True)
    )
    L, K = len(names), len(levels)
    return SupernetSpec(
        units,
        np.tile(np.array(levels), (L, 1)),
        np.ones((L, K), dtype=bool),
        np.zeros(L, dtype=np.int32),
    )


QUARTERS = [0.0, 0.25, 0.5, 0.75]
FINE = [round(0.05 * k, 2) for k in range(20)]


def test_erk_density_ratios_by_hand() -> None:
    shapes = {"a": (4, 4), "b": (8, 2)}
    spec = layer_spec(shapes, [0, 1], FINE)
    # raw density (in + out) / (in * out): 0.5 and 0.625; keep 16 of 32 weights:
    # scale 16 / (8 + 10) -> densities 4/9 and 5/9.
    s = erk_sparsity(spec, Budget(kind="params", target=0.5), shapes=shapes)
    np.testing.assert_allclose(s, [1 - 4 / 9, 1 - 5 / 9])


def test_erk_caps_density_at_one() -> None:
    shapes = {"a": (4, 4), "b": (8, 2), "c": (1, 1)}
    spec = layer_spec(shapes, [0, 1, 2], FINE)
    # Keep 16.5 of 33: "c" (raw 2) would get 0.825 * 2 > 1, so it is dense and the rest
    # share 15.5 at scale 15.5 / 18.
    s = erk_sparsity(spec, Budget(kind="params", target=0.5), shapes=shapes)
    np.testing.assert_allclose(s, [1 - 0.5 * 15.5 / 18, 1 - 0.625 * 15.5 / 18, 0.0])


def owl_case() -> tuple[SupernetSpec, dict[str, np.ndarray], dict[str, np.ndarray]]:
    weights = {
        "b0.a": np.ones((1, 4)),
        "b1.x": np.full((2, 2), 3.0),
        "b1.y": np.array([[1.0, 1.0], [1.0, 4.0]]),
        "b2.z": np.array([[1.0] * 7 + [9.0]]),
    }
    norms = {
        "b0.a": np.array([1.0, 1.0, 1.0, 9.0]),
        "b1.x": np.ones(2),
        "b1.y": np.ones(2),
        "b2.z": np.ones(8),
    }
    shapes = {k: v.shape for k, v in weights.items()}
    return layer_spec(shapes, [0, 1, 1, 2], FINE), weights, norms


def test_owl_by_hand() -> None:
    spec, weights, norms = owl_case()
    # M = 2. Block 0: scores 1 1 1 9, mean 3 -> 1 of 4 above 6: D = 0.25.
    # Block 1 (both layers together): 3 3 3 3 1 1 1 4, mean 2.375 -> none above 4.75:
    # D = 0 (per layer, "y" alone would have had 1 of 4). Block 2: 1 x7, 9, mean 2 ->
    # 1 of 8 above 4: D = 0.125. D' = 0.16 * (D - 0) / 0.25 = 0.16, 0, 0.08; density =
    # D' - 0.08 + 0.5 -> sparsity 0.42, 0.58, 0.5.
    s = owl_sparsity(
        spec,
        Budget(kind="params", target=0.5),
        weights=weights,
        input_norms=norms,
        outlier_factor=2.0,
        spread=0.08,
    )
    np.testing.assert_allclose(s, [0.42, 0.58, 0.58, 0.5])


def test_owl_without_outlier_spread_is_uniform() -> None:
    spec, weights, norms = owl_case()
    flat = {k: np.ones_like(v) for k, v in weights.items()}
    flat_norms = {k: np.ones_like(v) for k, v in norms.items()}
    s = owl_sparsity(spec, Budget(kind="params", target=0.5), weights=flat, input_norms=flat_norms)
    np.testing.assert_allclose(s, 0.5)


def test_owl_input_errors_name_the_layer() -> None:
    spec, weights, norms = owl_case()
    budget = Budget(kind="params", target=0.5)
    with pytest.raises(KeyError, match="b1.y"):
        owl_sparsity(
            spec,
            budget,
            weights={k: v for k, v in weights.items() if k != "b1.y"},
            input_norms=norms,
        )
    with pytest.raises(ValueError, match=r"input_norms\['b2.z'\]"):
        owl_sparsity(spec, budget, weights=weights, input_norms={**norms, "b2.z": np.ones(3)})


def test_lamp_scores_of_a_small_vector() -> None:
    # Sorted squares 1, 4, 9; tail sums 14, 13, 9.
    np.testing.assert_allclose(lamp_scores(np.array([3.0, -1.0, 2.0])), [1 / 14, 4 / 13, 1.0])
    np.testing.assert_allclose(lamp_scores(np.zeros(3)), [0.0, 0.0, 0.0])


def lamp_case() -> tuple[SupernetSpec, dict[str, np.ndarray]]:
    weights = {"a": np.array([[1.0, 2.0, 3.0, 4.0]]), "b": np.ones((1, 4))}
    return layer_spec({k: v.shape for k, v in weights.items()}, [0, 1], QUARTERS), weights


def test_lamp_by_hand() -> None:
    spec, weights = lamp_case()
    # Scores a: 1/30, 4/29, 9/25, 1; b: 1/4, 1/3, 1/2, 1. Pruning 5 of 8 takes
    # a, a, b, b, a -> a 75%, b 50%.
    budget = Budget(kind="params", target=0.625)
    np.testing.assert_allclose(lamp_sparsity(spec, budget, weights=weights), [0.75, 0.5])
    np.testing.assert_array_equal(lamp(spec, budget, weights=weights), [3, 2])


def test_global_magnitude_keeps_the_floor() -> None:
    weights = {"a": np.array([[1.0, 2.0, 3.0, 4.0]]), "b": np.array([[0.1, 0.2, 0.3, 0.4]])}
    spec = layer_spec({k: v.shape for k, v in weights.items()}, [0, 1], QUARTERS)
    budget = Budget(kind="params", target=0.5)
    # Without a floor all of "b" goes; keeping 25% of it moves one prune to "a".
    s0 = global_magnitude_sparsity(spec, budget, weights=weights, min_density=0.0)
    np.testing.assert_allclose(s0, [0.0, 1.0])
    s = global_magnitude_sparsity(spec, budget, weights=weights, min_density=0.25)
    np.testing.assert_allclose(s, [0.25, 0.75])
    np.testing.assert_array_equal(
        global_magnitude(spec, budget, weights=weights, min_density=0.25), [1, 3]
    )


def test_ties_at_the_threshold_go_to_earlier_layers() -> None:
    weights = {"a": np.ones((1, 4)), "b": np.ones((1, 4))}
    spec = layer_spec({k: v.shape for k, v in weights.items()}, [0, 1], QUARTERS)
    s = global_magnitude_sparsity(
        spec, Budget(kind="params", target=0.25), weights=weights, min_density=0
    )
    np.testing.assert_allclose(s, [0.5, 0.0])


def random_case(seed: int) -> tuple[SupernetSpec, dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shapes = {f"l{i}": (int(rng.integers(2, 9)), int(rng.integers(2, 9))) for i in range(8)}
    weights = {k: rng.standard_t(3, size=v) for k, v in shapes.items()}
    norms = {k: rng.uniform(0.1, 3, size=v[1]) for k, v in shapes.items()}
    return layer_spec(shapes, [i // 2 for i in range(8)], FINE), weights, norms


@pytest.mark.parametrize("kind", ["params", "flops"])
@pytest.mark.parametrize("seed", range(3))
def test_every_allocator_is_feasible(seed: int, kind: str) -> None:
    spec, weights, norms = random_case(seed)
    budget = Budget(kind=kind, target=0.6)  # type: ignore[arg-type]
    cm = CostModel.from_spec(spec, budget)
    shapes = {k: v.shape for k, v in weights.items()}
    outputs = [
        uniform(spec, budget),
        owl(spec, budget, weights=weights, input_norms=norms),
        lamp(spec, budget, weights=weights),
        global_magnitude(spec, budget, weights=weights),
        erk(spec, budget, shapes=shapes),
        random_feasible(spec, budget, key=jax.random.key(seed)),
    ]
    for choice in outputs:
        assert choice.dtype == np.int32 and choice.shape == (spec.num_units,)
        assert bool(cm.is_feasible(choice))
        assert cm.achieved(choice) == pytest.approx(0.6, abs=0.05)
    np.testing.assert_array_equal(outputs[0], uniform_choice(spec, budget))


def test_random_feasible_is_seeded() -> None:
    spec, _, _ = random_case(0)
    budget = Budget(kind="params", target=0.5)
    a = random_feasible(spec, budget, key=jax.random.key(1))
    b = random_feasible(spec, budget, key=jax.random.key(1))
    c = random_feasible(spec, budget, key=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
