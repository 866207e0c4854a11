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
   row ``j`` of ``U`` is ``H^-1`` restricted to the remaining columns, scaled.

The factorisation is computed once per layer and shared by all levels, which are swept
together (batched over a level axis). Differences from the reference code, all so that
every level has *exactly* its sparsity:

* the number of weights pruned in each block is the level's exact total spread over the
  blocks by cumulative rounding (``round(c * N_b / numel)`` differences), and exactly that
  many lowest scores are pruned (the reference thresholds ``int(s * block_numel)``); ties
  are broken by position, row-major over the block's ``(out, column)`` entries;
* weights of dead inputs (zero on every calibration token) are not zeroed up front: they
  get score 0 so they are pruned first, which costs nothing on the calibration data, and
  those a level keeps stay unchanged (no other column's update reaches them, since the
  unit diagonal decouples them in ``H``).

**Arithmetic.** For a weight of ``out x n`` (``n`` inputs), ``K`` levels and blocks of
``B`` columns, the necessary floating-point operations (a multiply and an add count as
two) are (:func:`sparsegpt_flops`)::

    factor      = 2 n^3 / 3                        once per layer, shared by all levels
    obs updates = K * out * n * (n - 1)            every pair (j < i) of columns: 2 flops
                                                   per row; split by blocks into
                  within = K * 2 out * sum_b B_b (B_b - 1) / 2  and  across = the rest
    elementwise = K * 3 out n                      scores w^2 / d^2 (2), errors (1)

``factor`` is one Cholesky of ``H`` with its rows and columns reversed, ``J H J = M M^T``
(``n^3 / 3``), and one triangular inverse (``n^3 / 3``): ``U = J M^-1 J`` is upper with
``U^T U = H^-1``, so it *is* the Cholesky factor of ``H^-1``, without forming ``H^-1``
(the code inverts ``M`` with a triangular solve against the identity, which performs
``n^3``). Mask selection adds comparisons, not flops: a linear-time selection of the
``c``-th smallest score per block and level, ``O(K out n)`` in all. For ``out = n`` the
updates dominate: ``K n^3`` against ``2 n^3 / 3``. The errors are dense in this count (a
kept weight's error is an exact 0 that the products still multiply).

**Implementation** (``impl="recursive"``, the default), the recursive form of the lazy
batched update:

* *Across blocks* (exact): a range of blocks is split in two, the left half is swept,
  its errors update the right half in *one* matrix product, ``W_R -= U_LR^T E_L``, then
  the right half is swept. Every column pair across blocks is computed once, most of the
  arithmetic runs in the few largest products (half of it in the first one, sized by the
  layer, not by ``B``), and nothing is done for finished columns. The recursion runs in
  Python over compiled pieces of static shape (:func:`_sweep_block` per block shape,
  :func:`_lazy_update` per pair of range widths), shared by every block and by every
  layer of the same width and level count: nothing is recompiled per layer. The last
  block is padded to ``B`` columns (zero weights, unit diagonal, never pruned).
* *A block*: its mask is chosen when the recursion reaches it, i.e. after every earlier
  column's update, as in the sequential algorithm (on the host, :func:`_select_keep`).
  Then leaves of ``LEAF_COLUMNS`` columns: each receives the errors of the earlier
  leaves of its block in one product with a ``B``-deep contraction (it multiplies the
  still-zero errors of later leaves too, so the updates within blocks, a share of about
  ``B / n`` of all, cost about twice their count) and is swept column by column.
* Levels that prune nothing or everything are not swept.

``impl="reference"`` keeps the previous implementation (each block updates all columns
of all levels in a ``fori_loop``: about twice the update arithmetic, four times the
factorisation, and a stable sort per block and level for the mask); it gives the same
masks and weights up to float rounding, and serves as the test and benchmark reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar, Final, NamedTuple

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

LEAF_COLUMNS: Final[int] = 16
"""Columns swept one at a time (rank-1 updates) inside a block; all other OBS updates are
matrix products. The leaf is the largest divisor of the block size up to this, in whole
groups of M for N:M."""

IMPLS: Final[tuple[str, ...]] = ("recursive", "reference")
"""SparseGPT sweep implementations (see the module docstring)."""


class SweepFlops(NamedTuple):
    """Necessary floating-point operations of one layer's SparseGPT build (see the module
    docstring); a multiply and an add count as two.

    Attributes:
      factor: Cholesky of the reversed ``H`` and the triangular inverse, ``2 n^3 / 3``.
      within: OBS updates between columns of the same mask block, all levels.
      across: OBS updates from a block's columns to later blocks, all levels.
      elementwise: scores and errors, ``3 K out n``.
    """

    factor: int
    within: int
    across: int
    elementwise: int

    @property
    def total(self) -> int:
        return self.factor + self.within + self.across + self.elementwise


def sparsegpt_flops(out_features: int, in_features: int, levels: int, blocksize: int) -> SweepFlops:
    """Flops a SparseGPT build of an ``out x in`` weight at ``levels`` levels needs.

    Args:
      out_features, in_features: the weight's shape.
      levels: levels swept (those pruning neither nothing nor everything).
      blocksize: columns per mask block; it splits the updates into ``within`` and
        ``across`` but does not change their sum.

    Returns:
      :class:`SweepFlops`; ``.total`` is the sum.
    """
    for key, value in dict(
        out_features=out_features, in_features=in_features, blocksize=blocksize
    ).items():
        if not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}")
    if not isinstance(levels, int | np.integer) or levels < 0:
        raise ValueError(f"levels must be a non-negative int, got {levels!r}")
    n = int(in_features)
    sizes = [min(blocksize, n - b) for b in range(0, n, blocksize)]
    within_pairs = sum(s * (s - 1) // 2 for s in sizes)
    per_pair = 2 * int(out_features) * int(levels)
    return SweepFlops(
        factor=2 * n**3 // 3,
        within=per_pair * within_pairs,
        across=per_pair * (n * (n - 1) // 2 - within_pairs),
        elementwise=3 * int(levels) * int(out_features) * n,
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


# --------------------------------------------------------------------------- recursive sweep


@jax.jit
def _obs_factor(h: jax.Array) -> jax.Array:
    """float32[n, n]: ``L = U^T`` (lower), where ``U`` is the upper Cholesky factor of
    ``h^-1``: ``J h J = M M^T`` with ``J`` the reversal, ``U = J M^-1 J``."""
    m = jnp.linalg.cholesky(h[::-1, ::-1])
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    m_inv = jax.scipy.linalg.solve_triangular(m, eye, lower=True)
    return m_inv[::-1, ::-1].T


def _block_scores(w: jax.Array, d: jax.Array, free: jax.Array) -> jax.Array:
    """float32[c, K, out]: OBS saliency ``w^2 / d^2`` of columns ``w[c, K, out]``; free
    (dead) inputs 0."""
    s = jnp.square(w) / jnp.square(d)[:, None, None]
    return jnp.where(free[:, None, None], 0.0, s)


def _select_keep(scores: np.ndarray, count: np.ndarray) -> np.ndarray:
    """bool[c, K, out]: False on the ``count[k]`` lowest of each level's scores
    ``[c, K, out]``, ties broken by position, row-major over ``(out, c)``, i.e. exactly
    what a stable sort of the level's ``[out, c]`` block would prune.

    Runs on the host: a selection (``np.partition``, linear time) finds the ``count``-th
    smallest score, then the ties equal to it are taken in that order. XLA has no
    selection; its sorts cost 40-400 ns per element on a CPU, and an in-program bisection
    costs more to compile per layer shape than the whole demo sweep runs.
    """
    by_level = np.ascontiguousarray(scores.transpose(1, 0, 2))  # [K, c, out], rows copied
    keep = np.ones(by_level.shape, bool)
    for k, level in enumerate(by_level):
        c = int(count[k])
        if c == 0:
            continue
        t = np.partition(level, c - 1, axis=None)[c - 1]
        below = level < t
        ties = np.flatnonzero((level == t).T)[: c - int(below.sum())]  # (out, c) order
        below[ties % level.shape[0], ties // level.shape[0]] = True
        keep[k] = ~below
    return np.ascontiguousarray(keep.transpose(1, 0, 2))


def _nm_keep(scores: jax.Array, n_prune: jax.Array) -> jax.Array:
    """bool[m, K, out]: False on the ``n_prune[k]`` lowest of each group of ``m`` scores
    ``[m, K, out]`` (ties: lower column first), by pairwise comparison."""
    m = scores.shape[0]
    a, b = scores[:, None], scores[None, :]  # [i, j, K, out]: does i come before j?
    earlier = (jnp.arange(m)[:, None] < jnp.arange(m)[None, :])[:, :, None, None]
    rank = jnp.sum((a < b) | ((a == b) & earlier), axis=0, dtype=jnp.int32)  # [m, K, out]
    return rank >= n_prune[None, :, None]


def _sweep_leaf(
    w: jax.Array,
    keep: jax.Array | None,
    u: jax.Array,
    free: jax.Array,
    nm_prune: jax.Array,
    m: int | None,
) -> tuple[jax.Array, jax.Array]:
    """Sweep ``c`` columns one by one: (pruned weights, errors), both float32[c, K, out].

    ``u`` is the float32[c, c] upper diagonal block of ``U``. ``keep`` is the mask of the
    columns (unstructured), or ``None`` for N:M, whose groups of ``m`` are chosen as the
    sweep reaches them.
    """
    d = jnp.diagonal(u)
    c = w.shape[0]

    def column(i, carry):
        w, err, keep = carry
        x = lax.dynamic_index_in_dim(w, i, axis=0, keepdims=False)  # [K, out]
        kept = lax.dynamic_index_in_dim(keep, i, axis=0, keepdims=False)
        # The barrier keeps XLA from recomputing e for every element of the update below.
        e = lax.optimization_barrier(jnp.where(kept, 0.0, x) / d[i])
        # U is upper triangular, so this leaves earlier columns alone and sets column i to
        # (numerically) its pruned value; the final where() makes zeros exact.
        w = w - e[None] * u[i][:, None, None]
        return w, lax.dynamic_update_index_in_dim(err, e, i, axis=0), keep

    err = jnp.zeros_like(w)
    if m is None:
        w, err, keep = lax.fori_loop(0, c, column, (w, err, keep))
        return jnp.where(keep, w, 0.0), err

    def group(g, carry):
        w, err, keep = carry
        g0 = g * m
        scores = _block_scores(
            lax.dynamic_slice_in_dim(w, g0, m, axis=0),
            lax.dynamic_slice_in_dim(d, g0, m),
            lax.dynamic_slice_in_dim(free, g0, m),
        )
        keep = lax.dynamic_update_slice_in_dim(keep, _nm_keep(scores, nm_prune), g0, axis=0)
        return lax.fori_loop(g0, g0 + m, column, (w, err, keep))

    keep = jnp.ones(w.shape, bool)
    w, err, keep = lax.fori_loop(0, c // m, group, (w, err, keep))
    return jnp.where(keep, w, 0.0), err


def _leaf_columns(blocksize: int, leaf: int, m: int | None) -> int:
    """Columns per leaf: the largest divisor of ``blocksize`` in whole groups of ``m`` (N:M)
    that is at most ``leaf`` (and at least one group), so leaves tile every block."""
    group = m or 1
    groups = blocksize // group
    fits = [g for g in range(1, groups + 1) if groups % g == 0 and g * group <= max(leaf, group)]
    return fits[-1] * group


@partial(jax.jit, static_argnames="blocksize")
def _factor_program(
    hessian: jax.Array, percdamp: jax.Array, *, blocksize: int
) -> tuple[jax.Array, ...]:
    """The factorisation every level and pass shares, padded to whole blocks (padding
    columns are decoupled unit inputs): ``L = U^T`` float32[n_p, n_p], dead inputs
    bool[n_p], padding bool[n_p], and bool[] whether ``L`` is finite."""
    n = hessian.shape[0]
    n_p = -(-n // blocksize) * blocksize
    lower = _obs_factor(damped_hessian(hessian, percdamp))
    finite = jnp.all(jnp.isfinite(lower))
    pad = jnp.arange(n_p) >= n
    lower = jnp.pad(lower, ((0, n_p - n), (0, n_p - n))) + jnp.diag(pad.astype(lower.dtype))
    return lower, jnp.pad(dead_inputs(hessian), (0, n_p - n)), pad, finite


@partial(jax.jit, static_argnames="n_p")
def _padded_columns(weight: jax.Array, *, n_p: int) -> jax.Array:
    """float32[n_p, out]: the weight transposed, zero columns appended up to ``n_p``."""
    return jnp.pad(weight, ((0, 0), (0, n_p - weight.shape[1]))).T


@partial(jax.jit, static_argnames=("blocksize", "n_levels"))
def _block_inputs(
    columns: jax.Array,
    lower: jax.Array,
    free: jax.Array,
    pad: jax.Array,
    start: jax.Array,
    *,
    blocksize: int,
    n_levels: int,
) -> tuple[jax.Array, ...]:
    """Block ``[start, start + B)`` of a layer (``columns`` from :func:`_padded_columns`):
    its dense weights for every level float32[B, K, out], ``U``'s diagonal block
    float32[B, B], and its free and padding flags bool[B]."""
    cols = lax.dynamic_slice_in_dim(columns, start, blocksize)
    return (
        jnp.broadcast_to(cols[:, None, :], (blocksize, n_levels, columns.shape[1])),
        lax.dynamic_slice(lower, (start, start), (blocksize, blocksize)).T,
        lax.dynamic_slice_in_dim(free, start, blocksize),
        lax.dynamic_slice_in_dim(pad, start, blocksize),
    )


@jax.jit
def _scores_for_selection(
    w: jax.Array, upper: jax.Array, free: jax.Array, pad: jax.Array
) -> jax.Array:
    """float32[B, K, out]: a block's OBS saliencies (padding +inf)."""
    scores = _block_scores(w, jnp.diagonal(upper), free)
    return jnp.where(pad[:, None, None], jnp.inf, scores)


@partial(jax.jit, static_argnames=("leaf", "m"))
def _sweep_block(
    w: jax.Array,
    keep: jax.Array | None,
    upper: jax.Array,
    free: jax.Array,
    nm_prune: jax.Array,
    *,
    leaf: int,
    m: int | None,
) -> tuple[jax.Array, jax.Array]:
    """One mask block, all levels: (pruned weights float32[K, out, B], errors
    float32[B, K, out]).

    ``w`` holds every update from earlier blocks and ``keep`` is the block's mask
    bool[B, K, out] (unstructured; ``None`` for N:M, whose groups are chosen in the
    leaves). Leaves of ``leaf`` columns are swept one at a time; before its sweep, a
    leaf receives the errors of all earlier leaves of the block in one product with its
    columns of ``upper`` (float32[B, B], ``U``'s diagonal block; the error rows of later
    leaves are still zero there).
    """
    bs = w.shape[0]

    def body(i, state):
        w, err = state  # err: rows of leaves not swept yet are zero
        c0 = i * leaf
        # Left-looking: the leaf takes the errors of every earlier leaf of the block in one
        # product (later rows of err are zero); the block is not rewritten per leaf.
        cols = lax.dynamic_slice_in_dim(upper, c0, leaf, axis=1)  # U[:, leaf]
        pending = jnp.matmul(cols.T, err.reshape(bs, -1), precision=HIGHEST)
        w_leaf, e_leaf = _sweep_leaf(
            lax.dynamic_slice_in_dim(w, c0, leaf) - pending.reshape((leaf, *w.shape[1:])),
            None if keep is None else lax.dynamic_slice_in_dim(keep, c0, leaf),
            lax.dynamic_slice(upper, (c0, c0), (leaf, leaf)),
            lax.dynamic_slice_in_dim(free, c0, leaf),
            nm_prune,
            m,
        )
        w = lax.dynamic_update_slice_in_dim(w, w_leaf, c0, axis=0)
        return w, lax.dynamic_update_slice_in_dim(err, e_leaf, c0, axis=0)

    w, err = lax.fori_loop(0, bs // leaf, body, (w, jnp.zeros_like(w)))
    return jnp.transpose(w, (1, 2, 0)), err


@partial(jax.jit, donate_argnums=0)
def _lazy_update(
    right: tuple[jax.Array, ...],
    lower: jax.Array,
    errors: tuple[jax.Array, ...],
    c_right: jax.Array,
    c_left: jax.Array,
) -> tuple[jax.Array, ...]:
    """``W_R -= L[R, L] E_L``: the errors of the left blocks (float32[B, K, out] each)
    applied to the right blocks (same), one matrix product; ``c_right``, ``c_left`` are
    the first columns of the two ranges."""
    e = jnp.concatenate(errors).reshape(-1, errors[0][0].size)
    rows = sum(r.shape[0] for r in right)
    lo = lax.dynamic_slice(lower, (c_right, c_left), (rows, e.shape[0]))
    update = jnp.matmul(lo, e, precision=HIGHEST)
    out, r0 = [], 0
    for r in right:
        out.append(r - update[r0 : r0 + r.shape[0]].reshape(r.shape))
        r0 += r.shape[0]
    return tuple(out)


@partial(jax.jit, static_argnames="n")
def _join_blocks(blocks: tuple[jax.Array, ...], *, n: int) -> jax.Array:
    """float32[K, out, n]: the swept blocks [K, out, B] joined, padding dropped."""
    return jnp.concatenate(blocks, axis=2)[:, :, :n]


def _recursive_sweep(
    weight: jax.Array,
    factor: tuple[jax.Array, jax.Array, jax.Array],
    block_counts: np.ndarray,
    nm_prune: jax.Array,
    *,
    blocksize: int,
    leaf: int,
    m: int | None,
) -> jax.Array:
    """float32[K, out, in]: pruned weights of all levels (see the module docstring).

    The recursion over blocks runs here, in Python: every piece is a compiled program of
    static shape (:func:`_sweep_block` per block shape, :func:`_lazy_update` per pair of
    range widths), shared by all blocks and by all layers of the same width and level
    count, so no work is spent on finished columns and nothing is recompiled per layer.

    Args:
      weight: float32[out, in], the dense weight.
      factor: ``(L, free, pad)`` from :func:`_factor_program`.
      block_counts: int[K, n_blocks] (host), weights pruned per block (unstructured).
      nm_prune: int32[K], zeros per group of ``m`` (N:M); ignored when ``m`` is None.
    """
    lower, free, pad = factor
    n_levels = block_counts.shape[0] if m is None else nm_prune.shape[0]
    n_blocks = lower.shape[0] // blocksize
    w: list[jax.Array | None] = [None] * n_blocks
    err: list[jax.Array | None] = [None] * n_blocks
    inputs = []
    columns = _padded_columns(weight, n_p=lower.shape[0])
    for j in range(n_blocks):
        w[j], *rest = _block_inputs(
            columns,
            lower,
            free,
            pad,
            jnp.int32(j * blocksize),
            blocksize=blocksize,
            n_levels=n_levels,
        )
        inputs.append(rest)
    lf = _leaf_columns(blocksize, leaf, m)

    def solve(a: int, b: int) -> None:
        if b - a == 1:
            upper, free_a, pad_a = inputs[a]
            keep = None
            if m is None:  # choose the block's mask from its weights as updated so far
                scores = np.asarray(_scores_for_selection(w[a], upper, free_a, pad_a))
                keep = jnp.asarray(_select_keep(scores, block_counts[:, a]))
            w[a], err[a] = _sweep_block(w[a], keep, upper, free_a, nm_prune, leaf=lf, m=m)
            return
        mid = (a + b) // 2
        solve(a, mid)
        w[mid:b] = _lazy_update(
            tuple(w[mid:b]),
            lower,
            tuple(err[a:mid]),
            jnp.int32(mid * blocksize),
            jnp.int32(a * blocksize),
        )
        solve(mid, b)

    solve(0, n_blocks)
    return _join_blocks(tuple(w), n=weight.shape[1])


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
    impl: str = "recursive",
    leaf: int = LEAF_COLUMNS,
) -> jax.Array:
    """float32[K, out, in]: SparseGPT-pruned weights of every level.

    Shared by :class:`SparseGPTPruner` (unstructured: ``counts`` int[K] total weights
    pruned per level) and the N:M variant (``nm_prune`` int[K] zeros per group of ``m``).
    One factorisation of the Hessian serves all levels; ``levels_per_pass`` bounds how
    many levels are swept at once (memory: about 3 * levels * out * in floats). A level
    that prunes nothing is the dense weight, one that prunes everything is zeros; neither
    is swept. ``impl`` and ``leaf``: see the module docstring.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return _reference_prune_levels(
            weight,
            hessian,
            counts=counts,
            nm_prune=nm_prune,
            m=m,
            blocksize=blocksize,
            percdamp=percdamp,
            levels_per_pass=levels_per_pass,
        )
    if not isinstance(leaf, int) or leaf < 1:
        raise ValueError(f"leaf must be a positive int, got {leaf!r}")
    out, n_in = weight.shape
    if m is None:
        pruned, full = np.asarray(counts, np.int64), out * n_in
    else:
        pruned, full = np.asarray(nm_prune, np.int64), m
        leaf = -(-leaf // m) * m  # whole groups in every leaf
    active = np.flatnonzero((pruned > 0) & (pruned < full))
    parts = []
    if m is None:
        bc = block_prune_counts(pruned[active], out, n_in, blocksize)
        nmp = np.zeros(active.size, np.int32)
    else:
        bc = np.zeros((active.size, -(-n_in // blocksize)), np.int32)
        nmp = pruned[active].astype(np.int32)
    if active.size:
        lower, free, pad, finite = _factor_program(
            hessian, jnp.float32(percdamp), blocksize=blocksize
        )
        if not bool(finite):
            raise ValueError(
                f"the damped Hessian is not positive definite (percdamp={percdamp}); "
                f"use a larger percdamp or more calibration tokens"
            )
    step = active.size if levels_per_pass is None else levels_per_pass
    for k0 in range(0, active.size, step):
        sl = slice(k0, k0 + step)
        parts.append(
            _recursive_sweep(
                weight,
                (lower, free, pad),
                bc[sl],
                jnp.asarray(nmp[sl]),
                blocksize=blocksize,
                leaf=leaf,
                m=m,
            )
        )
    if active.size == len(pruned):
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
    # Unswept levels: index 0 is the dense weight, 1 all zeros, 2 + i the i-th swept level.
    source = np.where(pruned == 0, 0, 1)
    source[active] = 2 + np.arange(active.size)
    stacked = jnp.concatenate([weight[None], jnp.zeros_like(weight)[None], *parts], axis=0)
    return jnp.take(stacked, jnp.asarray(source), axis=0)


# --------------------------------------------------------------------------- reference


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
      block_counts: int[K, n_blocks] (host), weights pruned per block (unstructured).
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


def _reference_prune_levels(
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
    """float32[K, out, in]: the previous implementation (``impl="reference"``): every block
    sweeps all ``in`` columns for all levels (fixed shapes, one ``fori_loop``), columns padded
    to whole blocks, and ``U`` from a Cholesky of the explicit inverse."""
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
      impl: ``"recursive"`` (recursive lazy updates, the necessary arithmetic) or
        ``"reference"`` (the previous fixed-shape sweep, about twice the arithmetic; the
        same masks and weights up to float rounding). See the module docstring.
    """

    blocksize: int = 128
    percdamp: float = 0.01
    levels_per_pass: int | None = None
    impl: str = "recursive"
    name: ClassVar[str] = "sparsegpt"
    nested: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_obs_options(self.blocksize, self.percdamp, self.levels_per_pass)
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")

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
            impl=self.impl,
        )
        return DenseVariants(weights=weights, sparsity=s)
