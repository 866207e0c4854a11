"""Magnitude pruning: drop the weights with the smallest absolute value, matrix-wide."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

from allocsearch.pruners.base import (
    LayerStats,
    NestedVariants,
    check_sparsities,
    check_weight,
    exact_counts,
    rank_in_matrix,
)


@dataclass(frozen=True)
class MagnitudePruner:
    """Unstructured magnitude pruning; masks are nested across levels.

    The whole matrix is one comparison group: level ``s`` removes the ``round(s * numel)``
    weights of smallest ``|w|`` (ties: lower row-major index first). Statistics are not
    used (``stats`` may be ``None``).
    """

    name: ClassVar[str] = "magnitude"
    nested: ClassVar[bool] = True

    def prune(
        self, weight: ArrayLike, stats: LayerStats | None, sparsities: ArrayLike
    ) -> NestedVariants:
        """All levels; see :class:`~allocsearch.pruners.base.LocalPruner`.

        Returns:
          ``NestedVariants`` with ``per_row`` False and ``prune_counts`` int32[K].
        """
        del stats  # magnitude needs no calibration data
        w = check_weight(weight)
        s = check_sparsities(sparsities)
        counts = exact_counts(s, w.size)
        rank = rank_in_matrix(jnp.abs(w))
        return NestedVariants(
            rank=rank, per_row=False, prune_counts=counts.astype(np.int32), sparsity=s
        )
