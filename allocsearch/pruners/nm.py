"""N:M semi-structured pruning: N zeros in every group of M consecutive input weights.

Groups run along the *input* dimension of the ``(out, in)`` weight (each row is cut into
``in / M`` groups), and N counts *zeros*, as in Wanda, SparseGPT and llm-compressor
("2:4" = half the weights removed). A level is the sparsity ``N / M`` for the pruner's
fixed ``m``; for example ``NMSparseGPTPruner(m=4)`` at levels ``[0, .25, .5, .75]`` gives
dense (0:4), 1:4, 2:4 and 3:4, and ``m=8`` at 0.5 gives 4:8.

The magnitude and Wanda variants are nested across N for a fixed M (the N smallest of a
group contain the N-1 smallest), and are stored as one global pruning order: all group
minima first, then all second-smallest weights, and so on, so ``rank >= N * numel / M``
is the N:M mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

from allocsearch.pruners.base import (
    DenseVariants,
    LayerStats,
    NestedVariants,
    check_sparsities,
    check_stats,
    check_weight,
    exact_counts,
    rank_in_rows,
)
from allocsearch.pruners.sparsegpt import check_obs_options, obs_prune_levels
from allocsearch.pruners.wanda import wanda_scores


def check_nm_width(in_features: int, m: int) -> None:
    """Raise a ValueError unless ``m`` divides the layer's input width."""
    if in_features % m:
        raise ValueError(
            f"N:M pruning with M={m} needs in_features divisible by M, but the layer has "
            f"in_features={in_features} (remainder {in_features % m})"
        )


def _check_m(m: int) -> None:
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"M (group size) must be a positive int, got {m!r}")


def nm_zeros_per_group(sparsities: np.ndarray, m: int) -> np.ndarray:
    """int64[K]: N (zeros per group of ``m``) of each level; refuses levels not of form N/M."""
    return exact_counts(sparsities, m, what=f"zeros per group of {m}")


@partial(jax.jit, static_argnames="m")
def nm_rank(scores: jax.Array, m: int) -> jax.Array:
    """int32[out, in]: global pruning order in which ``rank < N * numel / m`` is the N:M mask.

    A weight that is the ``r``-th smallest of its group (ties: lower column) with group
    index ``g`` (row-major over ``out x in / m`` groups) gets ``r * n_groups + g``.
    """
    out, n_in = scores.shape
    n_groups = out * (n_in // m)
    within = rank_in_rows(scores.reshape(out, n_in // m, m))  # 0 = pruned first
    group_index = jnp.arange(n_groups, dtype=jnp.int32).reshape(out, n_in // m, 1)
    return (within * n_groups + group_index).reshape(out, n_in)


def _nested_nm(scores: jax.Array, sparsities: np.ndarray, m: int) -> NestedVariants:
    n_zero = nm_zeros_per_group(sparsities, m)
    counts = n_zero * (scores.size // m)
    return NestedVariants(
        rank=nm_rank(scores, m),
        per_row=False,
        prune_counts=counts.astype(np.int32),
        sparsity=sparsities,
    )


@dataclass(frozen=True, kw_only=True)
class _NMScorePruner:
    """An N:M pruner that ranks the inputs of each group of ``m`` by a score: the N lowest
    go. Subclasses give the score (:meth:`_scores`) and the ``name``.

    Attributes:
      m: group size M; levels are sparsities N / M.
    """

    m: int = 4
    name: ClassVar[str]
    nested: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_m(self.m)

    def _scores(self, w: jax.Array, stats: LayerStats | None) -> jax.Array:
        raise NotImplementedError

    def prune(
        self, weight: ArrayLike, stats: LayerStats | None, sparsities: ArrayLike
    ) -> NestedVariants:
        """All levels (sparsities N / m)."""
        w = check_weight(weight)
        check_nm_width(w.shape[1], self.m)
        return _nested_nm(self._scores(w, stats), check_sparsities(sparsities), self.m)


class NMMagnitudePruner(_NMScorePruner):
    """N:M magnitude pruning: in each group of ``m`` inputs, drop the N smallest ``|w|``
    (statistics are not used).

    Attributes:
      m: group size M; levels are sparsities N / M.
    """

    name: ClassVar[str] = "magnitude_nm"

    def _scores(self, w: jax.Array, stats: LayerStats | None) -> jax.Array:
        return jnp.abs(w)


class NMWandaPruner(_NMScorePruner):
    """N:M Wanda: in each group of ``m`` inputs, drop the N lowest ``|w_ij| * ||X_j||_2``.

    Attributes:
      m: group size M; levels are sparsities N / M.
    """

    name: ClassVar[str] = "wanda_nm"

    def _scores(self, w: jax.Array, stats: LayerStats | None) -> jax.Array:
        return wanda_scores(w, check_stats(stats, w.shape[1], self.name))


@dataclass(frozen=True, kw_only=True)
class NMSparseGPTPruner:
    """N:M SparseGPT: compensated weights; each group's mask is chosen by ``w^2 / U_jj^2``
    when the OBS sweep reaches it (see :mod:`allocsearch.pruners.sparsegpt`).

    Attributes:
      m: group size M; levels are sparsities N / M. Must divide ``blocksize``.
      blocksize, percdamp, levels_per_pass: as for ``SparseGPTPruner``.
    """

    m: int = 4
    blocksize: int = 128
    percdamp: float = 0.01
    levels_per_pass: int | None = None
    name: ClassVar[str] = "sparsegpt_nm"
    nested: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_m(self.m)
        check_obs_options(self.blocksize, self.percdamp, self.levels_per_pass)
        if self.blocksize % self.m:
            raise ValueError(
                f"blocksize={self.blocksize} must be a multiple of M={self.m} so that no "
                f"group of M columns straddles two blocks"
            )

    def prune(
        self, weight: ArrayLike, stats: LayerStats | None, sparsities: ArrayLike
    ) -> DenseVariants:
        """All levels (sparsities N / m); compensated weights per level."""
        w = check_weight(weight)
        check_nm_width(w.shape[1], self.m)
        h = check_stats(stats, w.shape[1], self.name)
        s = check_sparsities(sparsities)
        weights = obs_prune_levels(
            w,
            h,
            counts=None,
            nm_prune=nm_zeros_per_group(s, self.m),
            m=self.m,
            blocksize=self.blocksize,
            percdamp=self.percdamp,
            levels_per_pass=self.levels_per_pass,
        )
        return DenseVariants(weights=weights, sparsity=s)
