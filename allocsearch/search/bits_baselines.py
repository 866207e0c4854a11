"""OWL-style outlier-aware bitwidths: layers with more outlier weights keep more bits.

The bitwidth counterpart of :func:`~allocsearch.search.baselines.owl_sparsity` (Yin et
al., "Outlier Weighed Layerwise Sparsity", ICML 2024), per unit instead of per block, as
outlier-aware mixed-precision schemes do: a unit's outlier ratio ``D_u`` is the fraction
of its Wanda scores ``|W_ij| * ||X_j||`` above ``outlier_factor`` times their mean; units
with more outliers get more bits, ``bits_u = avg + D'_u - mean_w(D')`` with
``D' = 2 * spread * 16 * (D - min D) / (max D - min D)`` and ``mean_w`` weighted by the
units' weights, so the continuous allocation averages the budget's bits per weight and
spans ``± spread * 16`` bits (``spread`` is OWL's, a fraction of the 16-bit cost). The
bits are then snapped to the supernet's levels within the budget by
:func:`~allocsearch.search.budget.snap_to_levels`, which meets the budget exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from allocsearch.search.budget import (
    FULL_BITS,
    Budget,
    snap_to_levels,
    target_to_average_bits,
)
from allocsearch.supernet.spec import SupernetSpec


def outlier_ratios(
    spec: SupernetSpec,
    *,
    weights: Mapping[str, np.ndarray],
    input_norms: Mapping[str, np.ndarray],
    outlier_factor: float = 5.0,
) -> np.ndarray:
    """float64[L]: fraction of each unit's Wanda scores above ``outlier_factor`` x their mean."""
    if outlier_factor <= 0:
        raise ValueError(f"outlier_factor {outlier_factor} must be > 0")
    ratio = np.empty(spec.num_units)
    for u, unit in enumerate(spec.units):
        scores = []
        for layer in unit.layers or (unit.name,):
            if layer not in weights or layer not in input_norms:
                raise KeyError(f"weights or input_norms have no entry for layer {layer!r}")
            w = np.asarray(weights[layer], np.float64)
            norms = np.asarray(input_norms[layer], np.float64)
            if norms.shape != (w.shape[1],):
                raise ValueError(
                    f"input_norms[{layer!r}] has shape {norms.shape}, expected ({w.shape[1]},)"
                )
            scores.append((np.abs(w) * norms[None, :]).ravel())
        a = np.concatenate(scores)
        ratio[u] = np.mean(a > outlier_factor * a.mean())
    return ratio


def owl_bits(
    spec: SupernetSpec,
    budget: Budget,
    *,
    weights: Mapping[str, np.ndarray],
    input_norms: Mapping[str, np.ndarray],
    outlier_factor: float = 5.0,
    spread: float = 0.08,
) -> np.ndarray:
    """float64[L]: continuous bits per weight of each unit (see the module docstring).

    Args:
      budget: its target read as average bits, ``16 (1 - target)`` (a ``bits`` budget's
        meaning; for other kinds, the bits of keeping ``1 - target`` of the weights).
      spread: half the span of the bits as a fraction of 16 bits (OWL's lambda; 0.08 =
        ±1.28 bits).
    """
    if not 0 <= spread <= 1:
        raise ValueError(f"spread {spread} must lie in [0, 1]")
    ratio = outlier_ratios(
        spec, weights=weights, input_norms=input_norms, outlier_factor=outlier_factor
    )
    span = ratio.max() - ratio.min()
    scaled = (
        2 * spread * FULL_BITS * (ratio - ratio.min()) / span if span > 0 else np.zeros_like(ratio)
    )
    numel = spec.numel.astype(np.float64)
    mean = float(np.dot(scaled, numel) / numel.sum())
    return scaled - mean + target_to_average_bits(budget.target)


def owl_bits_choice(
    spec: SupernetSpec,
    budget: Budget,
    *,
    weights: Mapping[str, np.ndarray],
    input_norms: Mapping[str, np.ndarray],
    outlier_factor: float = 5.0,
    spread: float = 0.08,
) -> np.ndarray:
    """int32[L]: :func:`owl_bits` snapped to the supernet's levels within the budget."""
    bits = owl_bits(
        spec,
        budget,
        weights=weights,
        input_norms=input_norms,
        outlier_factor=outlier_factor,
        spread=spread,
    )
    return snap_to_levels(spec, budget, np.clip(1.0 - bits / FULL_BITS, 0.0, 1.0))
