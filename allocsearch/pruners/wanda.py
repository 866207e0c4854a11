"""Wanda: score ``|w_ij| * ||X_j||_2``, compared within each output row (Sun et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
from numpy.typing import ArrayLike

from allocsearch.pruners.base import (
    LayerStats,
    NestedVariants,
    check_sparsities,
    check_stats,
    check_weight,
    exact_counts,
    per_row_counts,
    rank_in_rows,
)


def wanda_scores(weight: jax.Array, hessian: jax.Array) -> jax.Array:
    """float32[out, in]: ``|w_ij| * ||X_j||_2`` with ``||X_j||_2^2 = H_jj``.

    Lower scores are pruned first.
    """
    return jnp.abs(weight) * jnp.sqrt(jnp.diagonal(hessian))[None, :]


@dataclass(frozen=True)
class WandaPruner:
    """Unstructured Wanda pruning; masks are nested across levels.

    Each output row is its own comparison group (as in the paper). A level removing ``c``
    weights gives every row ``c // out`` and the first ``c % out`` rows one more, so the
    matrix total is exact; within a row the lowest scores go first (ties: lower column).
    """

    name: ClassVar[str] = "wanda"
    nested: ClassVar[bool] = True

    def prune(
        self, weight: ArrayLike, stats: LayerStats | None, sparsities: ArrayLike
    ) -> NestedVariants:
        """All levels; see :class:`~allocsearch.pruners.base.LocalPruner`.

        Returns:
          ``NestedVariants`` with ``per_row`` True and ``prune_counts`` int32[K, out].
        """
        w = check_weight(weight)
        h = check_stats(stats, w.shape[1], self.name)
        s = check_sparsities(sparsities)
        counts = exact_counts(s, w.size)
        rank = rank_in_rows(wanda_scores(w, h))
        return NestedVariants(
            rank=rank,
            per_row=True,
            prune_counts=per_row_counts(counts, w.shape[0]),
            sparsity=s,
        )
