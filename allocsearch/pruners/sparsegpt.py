"""SparseGPT: one-shot pruning with Optimal Brain Surgeon weight updates (Frantar & Alistarh, 2023).

The algorithm, for each level, restated from the paper:

1. ``H = sum_t x_t x_t^T`` is made positive definite (dead inputs get a unit diagonal, then
   1% of the mean diagonal is added; :func:`~allocsearch.pruners.base.damped_hessian`), and
   ``U`` is the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``).
2. Columns are processed left to right in blocks of ``blocksize``. At the start of a block
   the mask of the whole block is chosen from the scores ``w_ij^2 / U_jj^2`` of the current
   (already updated) weights ("adaptive mask selection"); for N:M the mask of each group of
   M columns is chosen when the sweep reaches the group.
3. Column ``j`` is then pruned: the error ``e = (w_j - q_j) / U_jj`` is spread over the
   columns not yet processed, ``W[:, j:] -= e U[j, j:]``, which is the OBS update because
   row ``j`` of ``U`` is ``H^-1`` restricted to the remaining columns, scaled. Updates to
   later blocks are applied once per block as one matrix product.

The factorisation is computed once per layer and shared by all levels, which are swept
together (batched over a leading level axis). Differences from the reference code, all so
that every level has *exactly* its sparsity:

* the number of weights pruned in each block is the level's exact total spread over the
  blocks by cumulative rounding (``round(c * N_b / numel)`` differences), and exactly that
  many lowest scores are pruned (the reference thresholds ``int(s * block_numel)``);
* weights of dead inputs (zero on every calibration token) are not zeroed up front: they
  get score 0 so they are pruned first, which costs nothing on the calibration data, and
  those a level keeps stay unchanged (no other column's update reaches them, since the
  unit diagonal decouples them in ``H``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from numpy.typing import ArrayLike

from allocsearch.pruners.base import (
    HIGHEST,
    DenseVariants,
    LayerStats,
    check_sparsities,
    check_stats,
    check_weight,
    damped_hessian,
    dead_inputs,
    exact_counts,
    rank_in_rows,
)


def block_prune_counts(
    counts: np.ndarray, out_features: int, in_features: int, blocksize: int
) -> np.ndarray:
    """int32[K, n_blocks]: a level's exact prune count spread over column blocks.

    Block ``b`` gets ``round(c * N_{b+1} / numel) - round(c * N_b / numel)`` where ``N_b`` is
    the number of weights left of block ``b`` (round half up, in exact integer arithmetic),
    so each block gets its proportional share and the shares sum to ``c`` exactly.
    """
    numel = out_features * in_features
    n_blocks = -(-in_features // blocksize)
    cum = [min(b * blocksize, in_features) * out_features for b in range(n_blocks + 1)]
    table = [[(2 * int(c) * n + numel) // (2 * numel) for n in cum] for c in counts]
    return np.diff(np.asarray(table, dtype=np.int64), axis=1).astype(np.int32)


@jax.jit
def _inverse_cholesky_upper(h: jax.Array) -> jax.Array:
    """Upper ``U`` with ``U^T U = h^-1`` (Cholesky of h, inverse, Cholesky again)."""
    chol = jnp.linalg.cholesky(h)
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    hinv = jax.scipy.linalg.cho_solve((chol, True), eye)
    return jnp.triu(jnp.linalg.cholesky(hinv, upper=True))


def _scores(w: jax.Array, d: jax.Array, free: jax.Array, pad: jax.Array) -> jax.Array:
    """float32[K, c, out]: OBS saliency ``w^2 / d^2`` of columns; free inputs 0, padding inf."""
    s = jnp.square(w) / jnp.square(d)[None, :, None]
    s = jnp.where(free[None, :, None], 0.0, s)
    return jnp.where(pad[None, :, None], jnp.inf, s)


@partial(jax.jit, static_argnames=("blocksize", "m"))
def _obs_sweep(
    wt: jax.Array,
    u: jax.Array,
    free: jax.Array,
    pad: jax.Array,
    block_counts: jax.Array,
    nm_prune: jax.Array,
    *,
    blocksize: int,
    m: int | None,
) -> jax.Array:
    """float32[K, in_p, out]: pruned, transposed weights of all levels.

    Args:
      wt: float32[in_p, out], transposed dense weight (columns padded to blocks).
      u: float32[in_p, in_p], upper Cholesky factor of the damped inverse Hessian.
      free: bool[in_p], dead inputs (pruned first, at no cost).
      pad: bool[in_p], padding columns (never pruned).
      block_counts: int32[K, n_blocks], weights pruned per block (unstructured).
      nm_prune: int32[K], zeros per group of ``m`` (N:M); ignored when ``m`` is None.
    """
    n_levels = block_counts.shape[0] if m is None else nm_prune.shape[0]
    in_p, out = wt.shape
    bs = blocksize
    cols = jnp.arange(in_p)

    def block(b, carry):
        w_all, keep_all = carry
        i1 = b * bs
        w1 = lax.dynamic_slice_in_dim(w_all, i1, bs, axis=1)  # [K, bs, out]
        u1 = lax.dynamic_slice(u, (i1, i1), (bs, bs))
        d = jnp.diagonal(u1)
        free1 = lax.dynamic_slice_in_dim(free, i1, bs)
        pad1 = lax.dynamic_slice_in_dim(pad, i1, bs)
        if m is None:
            # Rank the block's scores in (out, column) row-major order per level.
            s = jnp.swapaxes(_scores(w1, d, free1, pad1), 1, 2).reshape(n_levels, -1)
            rank = rank_in_rows(s).reshape(n_levels, out, bs)
            keep1 = jnp.swapaxes(rank >= block_counts[:, b][:, None, None], 1, 2)
        else:
            keep1 = jnp.ones((n_levels, bs, out), dtype=bool)

        def column(i, c):
            w1, err1, keep1 = c
            if m is not None:
                # Choose the mask of a group of m columns when the sweep reaches it, from
                # the weights as updated so far (SparseGPT's N:M variant).
                g0 = (i // m) * m
                s = _scores(
                    lax.dynamic_slice_in_dim(w1, g0, m, axis=1),
                    lax.dynamic_slice_in_dim(d, g0, m),
                    lax.dynamic_slice_in_dim(free1, g0, m),
                    lax.dynamic_slice_in_dim(pad1, g0, m),
                )
                rank = rank_in_rows(jnp.swapaxes(s, 1, 2))  # [K, out, m]
                group_keep = jnp.swapaxes(rank >= nm_prune[:, None, None], 1, 2)
                old = lax.dynamic_slice_in_dim(keep1, g0, m, axis=1)
                new = jnp.where(i % m == 0, group_keep, old)
                keep1 = lax.dynamic_update_slice_in_dim(keep1, new, g0, axis=1)
            w = lax.dynamic_index_in_dim(w1, i, axis=1, keepdims=False)  # [K, out]
            kept = lax.dynamic_index_in_dim(keep1, i, axis=1, keepdims=False)
            err = (w - jnp.where(kept, w, 0.0)) / d[i]
            # U is upper triangular, so this leaves columns < i alone and sets column i to
            # (numerically) its pruned value; the final where() makes zeros exact.
            w1 = w1 - err[:, None, :] * u1[i][None, :, None]
            err1 = lax.dynamic_update_index_in_dim(err1, err, i, axis=1)
            return w1, err1, keep1

        err0 = jnp.zeros((n_levels, bs, out), dtype=wt.dtype)
        w1, err1, keep1 = lax.fori_loop(0, bs, column, (w1, err0, keep1))
        w1 = jnp.where(keep1, w1, 0.0)
        u_rows = lax.dynamic_slice(u, (i1, 0), (bs, in_p))
        update = jnp.einsum("kbo,bj->kjo", err1, u_rows, precision=HIGHEST)
        w_all = w_all - jnp.where((cols >= i1 + bs)[None, :, None], update, 0.0)
        w_all = lax.dynamic_update_slice_in_dim(w_all, w1, i1, axis=1)
        keep_all = lax.dynamic_update_slice_in_dim(keep_all, keep1, i1, axis=1)
        return w_all, keep_all

    w_all = jnp.broadcast_to(wt, (n_levels, in_p, out))
    keep_all = jnp.ones((n_levels, in_p, out), dtype=bool)
    w_all, keep_all = lax.fori_loop(0, in_p // bs, block, (w_all, keep_all))
    return jnp.where(keep_all, w_all, 0.0)


def obs_prune_levels(
    weight: jax.Array,
    hessian: jax.Array,
    *,
    counts: np.ndarray | None,
    nm_prune: np.ndarray | None,
    m: int | None,
    blocksize: int,
    percdamp: float,
    levels_per_pass: int | None,
) -> jax.Array:
    """float32[K, out, in]: SparseGPT-pruned weights of every level.

    Shared by :class:`SparseGPTPruner` (unstructured: ``counts`` int[K] total weights
    pruned per level) and the N:M variant (``nm_prune`` int[K] zeros per group of ``m``).
    One factorisation of the Hessian serves all levels; ``levels_per_pass`` bounds how
    many levels are swept at once (memory: about 3 * levels * out * in floats).
    """
    out, n_in = weight.shape
    n_levels = len(counts) if m is None else len(nm_prune)
    in_p = -(-n_in // blocksize) * blocksize
    h = damped_hessian(hessian, percdamp)
    free = jnp.pad(dead_inputs(hessian), (0, in_p - n_in))
    pad = jnp.arange(in_p) >= n_in
    if in_p > n_in:  # padding columns are decoupled unit inputs holding zero weights
        h = jnp.pad(h, ((0, in_p - n_in), (0, in_p - n_in)))
        h = h + jnp.diag(pad.astype(h.dtype))
    u = _inverse_cholesky_upper(h)
    if not bool(jnp.all(jnp.isfinite(u))):
        raise ValueError(
            f"the damped Hessian is not positive definite (percdamp={percdamp}); "
            f"use a larger percdamp or more calibration tokens"
        )
    wt = jnp.pad(weight, ((0, 0), (0, in_p - n_in))).T
    bc = (
        block_prune_counts(counts, out, n_in, blocksize)
        if m is None
        else np.zeros((n_levels, in_p // blocksize), np.int32)
    )
    nmp = np.zeros(n_levels, np.int32) if nm_prune is None else nm_prune.astype(np.int32)
    step = n_levels if levels_per_pass is None else levels_per_pass
    parts = []
    for k0 in range(0, n_levels, step):
        sl = slice(k0, k0 + step)
        swept = _obs_sweep(
            wt, u, free, pad, jnp.asarray(bc[sl]), jnp.asarray(nmp[sl]), blocksize=blocksize, m=m
        )
        parts.append(jnp.swapaxes(swept, 1, 2)[:, :, :n_in])
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


def check_obs_options(blocksize: int, percdamp: float, levels_per_pass: int | None) -> None:
    """Raise a ValueError naming the bad SparseGPT option."""
    if not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if not percdamp >= 0:
        raise ValueError(f"percdamp must be >= 0 (fraction of the mean diagonal), got {percdamp!r}")
    if levels_per_pass is not None and (
        not isinstance(levels_per_pass, int) or levels_per_pass < 1
    ):
        raise ValueError(f"levels_per_pass must be None or a positive int, got {levels_per_pass!r}")


@dataclass(frozen=True, kw_only=True)
class SparseGPTPruner:
    """Unstructured SparseGPT; returns compensated weights per level (not nested).

    Attributes:
      blocksize: columns per lazy-update block (and per adaptive-mask block); 128 in the
        paper. Layers whose width is not a multiple are padded internally.
      percdamp: diagonal damping as a fraction of the Hessian's mean diagonal (0.01).
      levels_per_pass: levels swept together (None: all); lower it to save memory.
    """

    blocksize: int = 128
    percdamp: float = 0.01
    levels_per_pass: int | None = None
    name: ClassVar[str] = "sparsegpt"
    nested: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_obs_options(self.blocksize, self.percdamp, self.levels_per_pass)

    def prune(
        self, weight: ArrayLike, stats: LayerStats | None, sparsities: ArrayLike
    ) -> DenseVariants:
        """All levels; see :class:`~allocsearch.pruners.base.LocalPruner`.

        Returns:
          ``DenseVariants`` with weights float32[K, out, in]; a level of sparsity 0 returns
          the dense weight unchanged.
        """
        w = check_weight(weight)
        h = check_stats(stats, w.shape[1], self.name)
        s = check_sparsities(sparsities)
        counts = exact_counts(s, w.size)
        weights = obs_prune_levels(
            w,
            h,
            counts=counts,
            nm_prune=None,
            m=None,
            blocksize=self.blocksize,
            percdamp=self.percdamp,
            levels_per_pass=self.levels_per_pass,
        )
        return DenseVariants(weights=weights, sparsity=s)
