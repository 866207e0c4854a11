"""Allocation baselines every search result is compared against.

Each allocator is a plain function ``(spec, budget, *, inputs) -> int32[L]`` returning a
feasible level vector. Those built on a continuous rule have a matching
``*_sparsity(...) -> float64[L]`` giving the unit sparsities before they are snapped to
the supernet's levels by :func:`~allocsearch.search.budget.snap_to_levels` (the one
snapping function). Rules that look at weights read ``weights[layer]`` float[out, in]
for every layer of a unit (``unit.layers``), so they work for units that span several
linear layers too. Continuous rules aim at ``budget.target`` as a fraction of *weights*;
snapping then meets the actual budget (params, FLOPs or latency).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from allocsearch.search.base import numpy_rng
from allocsearch.search.budget import Budget, allowed_levels, snap_to_levels, uniform_choice
from allocsearch.supernet.spec import SupernetSpec, Unit


def uniform(spec: SupernetSpec, budget: Budget) -> np.ndarray:
    """int32[L]: the same sparsity everywhere (see ``budget.uniform_choice``)."""
    return uniform_choice(spec, budget)


def owl_sparsity(
    spec: SupernetSpec,
    budget: Budget,
    *,
    weights: Mapping[str, np.ndarray],
    input_norms: Mapping[str, np.ndarray],
    outlier_factor: float = 5.0,
    spread: float = 0.08,
) -> np.ndarray:
    """float64[L]: OWL (outlier-weighted layerwise) sparsity of every unit.

    Yin et al., "Outlier Weighed Layerwise Sparsity" (ICML 2024). For each block b the
    outlier ratio D_b is the fraction of Wanda scores ``|W_ij| * ||X_j||`` over all its
    layers that exceed ``outlier_factor`` (M) times their mean. Blocks with more
    outliers are pruned less: ``D' = 2 spread (D - min D) / (max D - min D)``,
    ``density_b = D'_b - mean(D') + (1 - S)``, so sparsities lie in [S - spread,
    S + spread] and average S over blocks; every unit of a block gets ``1 - density_b``.

    Args:
      input_norms: layer name -> float[in], ``||X_j||_2`` of each input channel over the
        calibration tokens.
      outlier_factor: M (paper: 5 to 10). spread: lambda (paper: 0.08 at 70%).
    """
    if outlier_factor <= 0 or not 0 <= spread <= 1:
        raise ValueError(f"outlier_factor {outlier_factor} must be > 0, spread {spread} in [0, 1]")
    blocks = sorted({u.block for u in spec.units})
    ratio = np.empty(len(blocks))
    for i, b in enumerate(blocks):
        scores = []
        for unit in spec.units:
            if unit.block != b:
                continue
            for layer in _layers(unit):
                norms = _lookup(input_norms, layer, "input_norms")
                w = _lookup(weights, layer, "weights")
                if norms.shape != (w.shape[1],):
                    raise ValueError(
                        f"input_norms[{layer!r}] has shape {norms.shape}, expected "
                        f"({w.shape[1]},) for a weight of shape {w.shape}"
                    )
                scores.append((np.abs(w) * norms[None, :]).ravel())
        a = np.concatenate(scores)
        ratio[i] = np.mean(a > outlier_factor * a.mean())
    span = ratio.max() - ratio.min()
    scaled = 2 * spread * (ratio - ratio.min()) / span if span > 0 else np.zeros_like(ratio)
    density = scaled - scaled.mean() + (1.0 - budget.target)
    block_sparsity = dict(zip(blocks, np.clip(1.0 - density, 0.0, 1.0), strict=True))
    return np.array([block_sparsity[u.block] for u in spec.units])


def owl(
    spec: SupernetSpec,
    budget: Budget,
    *,
    weights: Mapping[str, np.ndarray],
    input_norms: Mapping[str, np.ndarray],
    outlier_factor: float = 5.0,
    spread: float = 0.08,
) -> np.ndarray:
    """int32[L]: :func:`owl_sparsity` snapped to the supernet's levels within the budget."""
    s = owl_sparsity(
        spec,
        budget,
        weights=weights,
        input_norms=input_norms,
        outlier_factor=outlier_factor,
        spread=spread,
    )
    return snap_to_levels(spec, budget, s)


def lamp_scores(weight: np.ndarray) -> np.ndarray:
    """float64[numel]: LAMP scores of one layer, in ascending order of ``|w|``.

    Lee et al., "Layer-adaptive sparsity for the magnitude-based pruning" (ICLR 2021):
    with weights sorted by magnitude ascending, ``score(u) = w_u^2 / sum_{v >= u} w_v^2``
    (0 where that sum is 0). Non-decreasing; the largest weight scores 1. Higher = keep.
    """
    w2 = np.sort(np.square(np.asarray(weight, dtype=np.float64)).ravel())
    tail = np.cumsum(w2[::-1])[::-1]
    return np.divide(w2, tail, out=np.zeros_like(w2), where=tail > 0)


def lamp_sparsity(
    spec: SupernetSpec, budget: Budget, *, weights: Mapping[str, np.ndarray]
) -> np.ndarray:
    """float64[L]: unit sparsities of pruning the lowest LAMP scores globally.

    ``round(target * total weights)`` weights with the lowest :func:`lamp_scores`, over
    all layers together, are pruned (ties: earlier layers first).
    """
    layers = [layer for unit in spec.units for layer in _layers(unit)]
    scores = [lamp_scores(_lookup(weights, layer, "weights")) for layer in layers]
    return _unit_sparsity(spec, layers, scores, budget.target, caps=None)


def lamp(spec: SupernetSpec, budget: Budget, *, weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """int32[L]: :func:`lamp_sparsity` snapped to the supernet's levels within the budget."""
    return snap_to_levels(spec, budget, lamp_sparsity(spec, budget, weights=weights))


def global_magnitude_sparsity(
    spec: SupernetSpec,
    budget: Budget,
    *,
    weights: Mapping[str, np.ndarray],
    min_density: float = 0.01,
) -> np.ndarray:
    """float64[L]: unit sparsities of pruning the smallest ``|w|`` over all layers.

    Every layer keeps at least ``ceil(min_density * numel)`` weights (no layer collapse);
    ``round(target * total weights)`` are pruned in all (fewer if the floors forbid).
    """
    if not 0 <= min_density <= 1:
        raise ValueError(f"min_density must be in [0, 1], got {min_density}")
    layers = [layer for unit in spec.units for layer in _layers(unit)]
    mags = [np.sort(np.abs(_lookup(weights, layer, "weights")).ravel()) for layer in layers]
    caps = np.array([m.size - int(np.ceil(min_density * m.size)) for m in mags])
    return _unit_sparsity(spec, layers, mags, budget.target, caps=caps)


def global_magnitude(
    spec: SupernetSpec,
    budget: Budget,
    *,
    weights: Mapping[str, np.ndarray],
    min_density: float = 0.01,
) -> np.ndarray:
    """int32[L]: :func:`global_magnitude_sparsity` snapped to levels within the budget."""
    s = global_magnitude_sparsity(spec, budget, weights=weights, min_density=min_density)
    return snap_to_levels(spec, budget, s)


def erk_sparsity(
    spec: SupernetSpec, budget: Budget, *, shapes: Mapping[str, tuple[int, int]]
) -> np.ndarray:
    """float64[L]: Erdos-Renyi(-Kernel) sparsities.

    Evci et al. (RigL, ICML 2020), for linear layers: density proportional to
    ``(fan_in + fan_out) / (fan_in * fan_out)``, scaled so the kept weights are
    ``(1 - target)`` of all; layers that would exceed density 1 are made dense and the
    scale is solved again for the rest. A unit's sparsity is over its layers' weights.

    Args:
      shapes: layer name -> (out_features, in_features).
    """
    layers = [layer for unit in spec.units for layer in _layers(unit)]
    shp = np.array([_lookup(shapes, layer, "shapes") for layer in layers], dtype=np.float64)
    if shp.shape != (len(layers), 2) or np.any(shp <= 0):
        raise ValueError(f"shapes must map each layer to (out, in) > 0, got {shp.tolist()}")
    numel = shp.prod(axis=1)
    raw = shp.sum(axis=1) / numel
    keep_total = (1.0 - budget.target) * numel.sum()
    dense = np.zeros(len(layers), dtype=bool)
    while True:
        rest = keep_total - numel[dense].sum()
        scale = rest / (raw * numel)[~dense].sum() if (~dense).any() else 0.0
        now_dense = dense | (scale * raw > 1.0)
        if np.array_equal(now_dense, dense):
            break
        dense = now_dense
    density = np.where(dense, 1.0, np.maximum(scale, 0.0) * raw)
    kept = dict(zip(layers, density * numel, strict=True))
    sizes = dict(zip(layers, numel, strict=True))
    return np.array(
        [
            1.0 - sum(kept[x] for x in _layers(u)) / sum(sizes[x] for x in _layers(u))
            for u in spec.units
        ]
    )


def erk(spec: SupernetSpec, budget: Budget, *, shapes: Mapping[str, tuple[int, int]]) -> np.ndarray:
    """int32[L]: :func:`erk_sparsity` snapped to the supernet's levels within the budget."""
    return snap_to_levels(spec, budget, erk_sparsity(spec, budget, shapes=shapes))


def random_feasible(
    spec: SupernetSpec, budget: Budget, *, key: jax.Array, spread: float = 0.2
) -> np.ndarray:
    """int32[L]: a random feasible allocation (seeded by ``key``).

    Each unit's target sparsity is drawn uniformly from ``target +- spread``, clipped to
    the unit's allowed sparsities, then snapped (which restores the budget).
    """
    if spread < 0:
        raise ValueError(f"spread must be >= 0, got {spread}")
    rng = numpy_rng(key)
    allowed = allowed_levels(spec, budget)
    s = np.where(allowed, spec.sparsity, np.nan)
    lo, hi = np.nanmin(s, axis=1), np.nanmax(s, axis=1)
    t = budget.target + rng.uniform(-spread, spread, size=spec.num_units)
    return snap_to_levels(spec, budget, np.clip(t, lo, hi))


def _layers(unit: Unit) -> tuple[str, ...]:
    return unit.layers if unit.layers else (unit.name,)


def _lookup(mapping: Mapping[str, object], name: str, what: str) -> np.ndarray:
    if name not in mapping:
        raise KeyError(f"{what} has no entry for layer {name!r} ({len(mapping)} entries given)")
    return np.asarray(mapping[name])


def _unit_sparsity(
    spec: SupernetSpec,
    layers: list[str],
    ascending: list[np.ndarray],
    target: float,
    *,
    caps: np.ndarray | None,
) -> np.ndarray:
    """float64[L] from pruning the globally smallest of per-layer ascending score arrays.

    ``caps`` bounds how many of each layer may be pruned (prefixes only). Exactly
    ``min(round(target * total), sum caps)`` are pruned; ties go to earlier layers.
    """
    sizes = np.array([a.size for a in ascending])
    caps = sizes if caps is None else np.minimum(caps, sizes)
    k = min(int(round(target * sizes.sum())), int(caps.sum()))
    counts = np.zeros(len(layers), dtype=np.int64)
    if k > 0:
        pool = np.concatenate([a[:c] for a, c in zip(ascending, caps, strict=True)])
        t = np.partition(pool, k - 1)[k - 1]
        below = np.array(
            [np.searchsorted(a[:c], t, "left") for a, c in zip(ascending, caps, strict=True)]
        )
        upto = np.array(
            [np.searchsorted(a[:c], t, "right") for a, c in zip(ascending, caps, strict=True)]
        )
        counts = below.copy()
        left = k - below.sum()
        for i in range(len(layers)):  # distribute ties at the threshold in layer order
            extra = min(left, upto[i] - below[i])
            counts[i] += extra
            left -= extra
    pruned = dict(zip(layers, counts, strict=True))
    size = dict(zip(layers, sizes, strict=True))
    return np.array(
        [sum(pruned[x] for x in _layers(u)) / sum(size[x] for x in _layers(u)) for u in spec.units],
        dtype=np.float64,
    )
