"""The local pruner protocol, its result types, and helpers every pruner shares.

A *local* pruner sparsifies one linear weight matrix from that layer's own calibration
statistics. It produces every level of one layer at once (``prune(weight, stats,
sparsities)``), so the expensive part (a Hessian factorisation, a sort of the scores) is
paid once per layer, not once per level.

Conventions used by every pruner in this package:

* Weight layout is ``(out_features, in_features)`` (Hugging Face ``nn.Linear``); a layer
  input ``X`` is ``(tokens, in_features)``.
* Statistics are :class:`LayerStats`: the Gram matrix ``H = sum_t x_t x_t^T`` of the layer
  inputs (a *sum* over tokens, not a mean) and the token count.
* A level's sparsity is the fraction of the layer's weights the level removes, and it is
  achieved *exactly*: a pruner removes ``round(s * numel)`` weights and refuses a level
  ``s`` for which ``s * numel`` is not (up to float rounding) a whole number, so what the
  supernet records is what the variant holds. ``supernet.levels`` builds such grids.
* All math is float32 JAX with matmul precision ``HIGHEST`` (so a GPU does not silently
  use TF32); host-side integer bookkeeping (counts per level) uses numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

HIGHEST = jax.lax.Precision.HIGHEST

# Tolerance, in units of one weight, for "s * numel is a whole number": a sparsity built as
# count / numel in float64 multiplies back to within ~1e-7 of the count for any layer size
# that fits int32 indices, while the nearest wrong count is a whole unit away.
_COUNT_TOLERANCE = 1e-6
_MAX_NUMEL = 2**31 - 1  # ranks are int32


class LayerStats(NamedTuple):
    """Calibration statistics of one layer's input.

    Attributes:
      hessian: float32[in, in], ``sum_t x_t x_t^T`` over all calibration tokens (a sum,
        not a mean). Its diagonal is Wanda's ``||X_j||_2^2``.
      n_tokens: number of tokens summed into ``hessian``.
    """

    hessian: jax.Array
    n_tokens: int


@jax.jit
def _gram(x: jax.Array) -> jax.Array:
    return jnp.matmul(x.T, x, precision=HIGHEST)


def accumulate_stats(stats: LayerStats | None, x: ArrayLike) -> LayerStats:
    """Add a batch of layer inputs to running statistics.

    Args:
      stats: statistics so far, or ``None`` to start.
      x: float[..., in_features] layer inputs; all leading axes are tokens.

    Returns:
      ``LayerStats`` whose ``hessian`` (float32[in, in]) is the old sum plus ``x^T x``
      accumulated in float32, and whose ``n_tokens`` grew by the number of rows of ``x``.
    """
    x = jnp.asarray(x, dtype=jnp.float32)
    if x.ndim < 1:
        raise ValueError(f"layer input must have a feature axis, got shape {x.shape}")
    x = x.reshape(-1, x.shape[-1])
    h = _gram(x)
    if stats is None:
        return LayerStats(hessian=h, n_tokens=int(x.shape[0]))
    if stats.hessian.shape != h.shape:
        raise ValueError(
            f"layer input has {x.shape[-1]} features but the statistics are for "
            f"{stats.hessian.shape[0]}"
        )
    return LayerStats(hessian=stats.hessian + h, n_tokens=stats.n_tokens + int(x.shape[0]))


def mask_from_rank(rank: jax.Array, prune_count: jax.Array) -> jax.Array:
    """Rebuild a nested mask from ranks and a prune count; works inside ``jit``.

    Args:
      rank: int32[out, in], position of each weight in the pruning order of its
        comparison group (0 = pruned first).
      prune_count: int32[] (the whole matrix is one group) or int32[out] (each row is a
        group): number of weights pruned in each group.

    Returns:
      bool[out, in], True where the weight is kept (``rank >= prune_count``).
    """
    prune_count = jnp.asarray(prune_count)
    if prune_count.ndim == 1:
        prune_count = prune_count[:, None]
    return rank >= prune_count


@dataclass(frozen=True, eq=False)
class NestedVariants:
    """All levels of a pruner whose masks are nested, stored as one rank array.

    The mask of level ``k`` keeps the weights whose ``rank`` is at least the level's
    prune count; weights keep their dense values. Masks at increasing counts are nested.

    Attributes:
      rank: int32[out, in] (device array), position of each weight in the pruning order
        of its comparison group: the whole matrix (``per_row`` False) or its output row
        (``per_row`` True).
      per_row: whether each output row is its own comparison group.
      prune_counts: int32[K] (whole matrix) or int32[K, out] (per row): weights pruned per
        group at each level. Per-row counts of one level differ by at most one and sum to
        the level's exact total.
      sparsity: float64[K], exact fraction of the matrix's weights each level removes.
    """

    rank: jax.Array
    per_row: bool
    prune_counts: np.ndarray
    sparsity: np.ndarray

    def __post_init__(self) -> None:
        if self.rank.ndim != 2:
            raise ValueError(f"rank must be [out, in], got shape {self.rank.shape}")
        want = (len(self.sparsity), self.rank.shape[0]) if self.per_row else (len(self.sparsity),)
        if self.prune_counts.shape != want:
            raise ValueError(f"prune_counts must have shape {want}, got {self.prune_counts.shape}")

    @property
    def num_levels(self) -> int:
        return len(self.sparsity)

    def mask(self, k: int) -> jax.Array:
        """bool[out, in]: True where level ``k`` keeps the weight."""
        return mask_from_rank(self.rank, jnp.asarray(self.prune_counts[k]))

    def weights(self, weight: ArrayLike, k: int) -> jax.Array:
        """float32[out, in]: the dense ``weight`` with level ``k``'s pruned weights zeroed."""
        return jnp.where(self.mask(k), jnp.asarray(weight, dtype=jnp.float32), 0.0)


@dataclass(frozen=True, eq=False)
class DenseVariants:
    """All levels of a pruner that also updates the kept weights (SparseGPT, structured).

    Attributes:
      weights: [K, out, in] (device array; float32, or a store's storage dtype), the pruned
        and compensated weights of each level; pruned weights are exactly zero.
      sparsity: float64[K], exact fraction of the weights each level removes.
      group_keep: bool[K, G] for structured pruners (True where group ``g`` of the input
        columns survives level ``k``), else ``None``.
    """

    weights: jax.Array
    sparsity: np.ndarray
    group_keep: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.weights.ndim != 3 or self.weights.shape[0] != len(self.sparsity):
            raise ValueError(
                f"weights must be [K={len(self.sparsity)}, out, in], got {self.weights.shape}"
            )
        if self.group_keep is not None and self.group_keep.shape[0] != len(self.sparsity):
            raise ValueError(f"group_keep must be [K, G], got {self.group_keep.shape}")

    @property
    def num_levels(self) -> int:
        return len(self.sparsity)

    def mask(self, k: int) -> jax.Array:
        """bool[out, in]: True where level ``k``'s weight is non-zero."""
        return self.weights[k] != 0


Variants = NestedVariants | DenseVariants


@runtime_checkable
class LocalPruner(Protocol):
    """Prunes one layer to several sparsity levels from its calibration statistics.

    Attributes:
      name: short identifier, used in supernet metadata and recipes' provenance.
      nested: True when the pruner's masks are nested across levels and it returns
        :class:`NestedVariants` (the store then keeps one rank array); False when it
        returns :class:`DenseVariants`.

    Call order: build statistics with :func:`accumulate_stats` over the calibration
    tokens, then call ``prune`` once per layer with every level wanted.
    """

    name: str
    nested: bool

    def prune(self, weight: ArrayLike, stats: LayerStats | None, sparsities: ArrayLike) -> Variants:
        """All levels of one layer.

        Args:
          weight: float[out, in], the dense weight.
          stats: the layer input's statistics (``None`` only for pruners that ignore them).
          sparsities: float[K] in [0, 1], fraction of weights removed at each level; each
            must be exactly achievable (see the module docstring).

        Returns:
          ``NestedVariants`` or ``DenseVariants`` with ``sparsity`` equal to ``sparsities``.
        """
        ...


# --------------------------------------------------------------------------- helpers


def check_weight(weight: ArrayLike) -> jax.Array:
    """The weight as a float32 device array, after checking it is a finite matrix."""
    w = jnp.asarray(weight, dtype=jnp.float32)
    if w.ndim != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"weight must be a non-empty (out, in) matrix, got shape {w.shape}")
    if w.size > _MAX_NUMEL:
        raise ValueError(f"weight has {w.size} entries; ranks are int32, at most {_MAX_NUMEL}")
    if not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError("weight contains NaN or infinite values")
    return w


def check_stats(stats: LayerStats | None, in_features: int, pruner: str) -> jax.Array:
    """The Hessian of ``stats`` as float32[in, in], after checking it fits the weight."""
    if stats is None:
        raise ValueError(f"{pruner} needs calibration statistics (LayerStats), got None")
    h = jnp.asarray(stats.hessian, dtype=jnp.float32)
    if h.shape != (in_features, in_features):
        raise ValueError(
            f"{pruner}: hessian has shape {h.shape}, expected ({in_features}, {in_features}) "
            f"for a weight with {in_features} input features"
        )
    return h


def check_sparsities(sparsities: ArrayLike) -> np.ndarray:
    """float64[K] sparsities after checking they are a non-empty 1-D array in [0, 1]."""
    s = np.asarray(sparsities, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"sparsities must be a non-empty 1-D array, got shape {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s < 0) or np.any(s > 1):
        raise ValueError(f"sparsities must lie in [0, 1], got {s.tolist()}")
    return s


def exact_counts(sparsities: np.ndarray, total: int, what: str = "weights") -> np.ndarray:
    """int64[K]: ``round(s * total)``, refusing levels that are not a whole count.

    Args:
      sparsities: float64[K] in [0, 1].
      total: number of items a level removes a fraction of (weights, N:M groups, heads).
      what: name of the items, for the error message.

    Raises:
      ValueError: naming the level and the two nearest achievable sparsities, when
        ``s * total`` is not within a tiny tolerance of an integer.
    """
    raw = sparsities * total
    counts = np.rint(raw).astype(np.int64)
    bad = np.flatnonzero(np.abs(raw - counts) > _COUNT_TOLERANCE)
    if bad.size:
        i = int(bad[0])
        lo, hi = np.floor(raw[i]), np.ceil(raw[i])
        raise ValueError(
            f"sparsity {float(sparsities[i])!r} is not achievable exactly with {total} "
            f"{what}: it would remove {raw[i]:.4f} {what}; nearest achievable sparsities are "
            f"{float(lo / total)!r} ({int(lo)}) and {float(hi / total)!r} ({int(hi)}); "
            f"build levels with allocsearch.supernet.levels"
        )
    return counts


def per_row_counts(total_counts: np.ndarray, rows: int) -> np.ndarray:
    """int32[K, rows]: spread each level's total over the rows, exactly.

    Every row gets ``total // rows`` and the first ``total % rows`` rows one more, so a
    level's row counts sum to its total and, for increasing totals, each row's count
    never decreases (the masks stay nested).
    """
    base = total_counts // rows
    extra = total_counts % rows
    return (base[:, None] + (np.arange(rows)[None, :] < extra[:, None])).astype(np.int32)


@jax.jit
def rank_in_matrix(scores: jax.Array) -> jax.Array:
    """int32[out, in]: position of each score in the ascending order of the whole matrix.

    Ties are broken by row-major index (stable sort), so results are deterministic.
    """
    flat = scores.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    rank = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    return rank.reshape(scores.shape)


@jax.jit
def rank_in_rows(scores: jax.Array) -> jax.Array:
    """int32[..., n]: position of each score in the ascending order of its last-axis row.

    Ties are broken by column index (stable sort).
    """
    order = jnp.argsort(scores, axis=-1, stable=True)
    n = scores.shape[-1]
    positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), scores.shape)
    return jnp.put_along_axis(
        jnp.zeros(scores.shape, jnp.int32), order, positions, axis=-1, inplace=False
    )


def dead_inputs(hessian: jax.Array) -> jax.Array:
    """bool[in]: inputs that were exactly zero on every calibration token (``H_jj == 0``)."""
    return jnp.diagonal(hessian) == 0


@jax.jit
def damped_hessian(hessian: jax.Array, percdamp: float) -> jax.Array:
    """float32[in, in]: ``H`` made safely positive definite, as SparseGPT does.

    Dead inputs (zero diagonal; their whole row and column are zero) get a diagonal of 1,
    which decouples them from every other input, then ``percdamp`` times the mean diagonal
    is added to the whole diagonal. Pruners treat dead inputs separately (removing their
    weights costs nothing on the calibration data).
    """
    diag = jnp.diagonal(hessian)
    h = hessian + jnp.diag(jnp.where(diag == 0, 1.0, 0.0))
    damp = percdamp * jnp.mean(jnp.diagonal(h))
    return h + damp * jnp.eye(h.shape[0], dtype=h.dtype)
