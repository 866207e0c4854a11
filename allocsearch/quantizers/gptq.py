"""GPTQ: quantization with Optimal Brain Surgeon error compensation (Frantar et al., 2022).

The algorithm, restated from the paper, for every bitwidth at once:

1. ``H = sum_t x_t x_t^T`` is damped as SparseGPT does (dead inputs get a unit diagonal,
   then ``percdamp`` = 1% of the mean diagonal is added) and ``U``, the upper Cholesky
   factor of ``H^-1``, is computed once per layer for all levels; both steps are
   SparseGPT's own (:func:`~allocsearch.pruners.sparsegpt._factor_program`).
2. Columns are quantized left to right. Column ``j``'s error ``e = (w_j - q_j) / U_jj`` is
   spread over the columns not yet quantized, ``W[:, j:] -= e U[j, j:]``. Columns run in
   blocks; inside a block the updates are rank-1, and at a block's end its errors update
   all later columns in one product (the lazy batch update).
3. Groups (:mod:`allocsearch.quantizers.grid`): a group's scale and zero point are fixed
   from the group's *current* weights (every earlier column's update applied) when the
   sweep reaches the group's first column, by the grid's round-to-nearest rule; its
   columns are then rounded to that grid. This is GPTQ's dynamic-group handling
   (``static_groups=False``), and with one group per row it is GPTQ's per-channel rule
   (parameters of the original weight).

Block size. So that "current weights" is exact, the block is fitted to the groups: with
``group_size <= blocksize`` it is the largest multiple of ``group_size`` up to
``blocksize`` (every group lies inside one block); with a larger group it is
``blocksize`` when that divides ``group_size`` (groups start on block starts, when all
earlier blocks' lazy updates are in) and ``group_size`` otherwise; with one group per row
(``group_size >= in``) it is ``blocksize``. Columns are padded to whole blocks with zero
weights and unit, decoupled diagonals (they quantize to exactly 0 and change no group's
range, which always includes 0).

Difference from the reference code: dead inputs (zero on every calibration token) are not
zeroed; they are rounded like any weight (the decoupled unit diagonal sends their error
nowhere), so a variant is still a valid quantization of the layer off the calibration
data. The sweep updates all later columns of every block in a fixed-shape product (about
twice the necessary arithmetic, like SparseGPT's ``impl="reference"``).
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

from allocsearch.pruners.base import HIGHEST, LayerStats, check_stats, check_weight
from allocsearch.pruners.sparsegpt import _factor_program, _padded_columns
from allocsearch.quantizers.base import QuantizedVariants, check_bits_levels
from allocsearch.quantizers.grid import SCALE_DTYPE, check_group_size

_SCALE_TINY = float(np.finfo(np.float16).smallest_subnormal)


def gptq_block_size(blocksize: int, group_size: int, in_features: int) -> int:
    """Columns per block such that every group's parameters are taken from fully updated
    weights (see the module docstring)."""
    if group_size >= in_features:
        return blocksize
    if group_size <= blocksize:
        return (blocksize // group_size) * group_size
    return blocksize if group_size % blocksize == 0 else group_size


def _group_params(
    w: jax.Array, member: jax.Array, maxq: jax.Array, symmetric: bool
) -> tuple[jax.Array, jax.Array]:
    """Scale and zero float32[K, out] of the group whose columns of ``w`` [c, K, out] are
    ``member`` bool[c], by the grid's rule (range widened to 0, scale rounded to float16;
    an overflowing scale becomes inf and is refused by the caller)."""
    masked = jnp.where(member[:, None, None], w, 0.0)
    lo, hi = jnp.min(masked, axis=0), jnp.max(masked, axis=0)  # <= 0 and >= 0
    mq = maxq[:, None]
    if symmetric:
        amax = jnp.maximum(-lo, hi)
        scale = jnp.where(amax == 0, 1.0, 2.0 * amax / mq)
        zero = jnp.broadcast_to((mq + 1.0) / 2.0, scale.shape)
    else:
        scale = jnp.where(hi == lo, 1.0, (hi - lo) / mq)
    scale = jnp.maximum(scale, _SCALE_TINY).astype(SCALE_DTYPE).astype(jnp.float32)
    if not symmetric:
        zero = jnp.clip(jnp.round(-lo / scale), 0.0, mq)
    return scale, zero


@partial(jax.jit, static_argnames=("block", "group_size", "symmetric"))
def _gptq_sweep(
    wt: jax.Array,
    u: jax.Array,
    maxq: jax.Array,
    n_valid: jax.Array,
    *,
    block: int,
    group_size: int,
    symmetric: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Codes float32[n_p, K, out] and per-group scales and zeros float32[G_p, K, out].

    Args:
      wt: float32[n_p, out], the transposed weight padded to whole blocks.
      u: float32[n_p, n_p], upper Cholesky factor of the damped, padded ``H^-1``.
      maxq: float32[K], ``2^bits - 1`` of each level.
      n_valid: int32[], real (unpadded) columns.
    """
    n_p, out = wt.shape
    k = maxq.shape[0]
    n_groups = -(-n_p // group_size)
    cols = jnp.arange(n_p)
    real = cols < n_valid
    in_block = group_size <= block and group_size < n_p  # else groups start on block starts

    def block_step(b, carry):
        w_all, codes, scales, zeros, cur = carry
        i1 = b * block
        if not in_block:  # a group starting here: its params from the updated weights
            g = i1 // group_size
            cur = lax.cond(
                i1 % group_size == 0,
                lambda: _group_params(w_all, real & (cols // group_size == g), maxq, symmetric),
                lambda: cur,
            )
        w1 = lax.dynamic_slice_in_dim(w_all, i1, block, axis=0)  # [B, K, out]
        u1 = lax.dynamic_slice(u, (i1, i1), (block, block))
        local = jnp.arange(block) + i1

        def column(i, c):
            w1, err1, codes1, scales, zeros, cur = c
            j = i1 + i
            if in_block:
                member = real[local] & (local // group_size == j // group_size)
                cur = lax.cond(
                    j % group_size == 0,
                    lambda: _group_params(w1, member, maxq, symmetric),
                    lambda: cur,
                )
            scale, zero = cur
            g = j // group_size
            scales = lax.dynamic_update_index_in_dim(scales, scale, g, axis=0)
            zeros = lax.dynamic_update_index_in_dim(zeros, zero, g, axis=0)
            w = lax.dynamic_index_in_dim(w1, i, axis=0, keepdims=False)  # [K, out]
            q = jnp.clip(jnp.round(w / scale) + zero, 0.0, maxq[:, None])
            err = lax.optimization_barrier((w - scale * (q - zero)) / u1[i, i])
            # U is upper triangular: columns before i are untouched.
            w1 = w1 - err[None] * u1[i][:, None, None]
            err1 = lax.dynamic_update_index_in_dim(err1, err, i, axis=0)
            codes1 = lax.dynamic_update_index_in_dim(codes1, q, i, axis=0)
            return w1, err1, codes1, scales, zeros, cur

        zero_block = jnp.zeros((block, k, out), jnp.float32)
        w1, err1, codes1, scales, zeros, cur = lax.fori_loop(
            0, block, column, (w1, zero_block, zero_block, scales, zeros, cur)
        )
        # rows of U for this block, restricted to later columns (masking the small factor,
        # not the large product)
        u_rows = lax.dynamic_slice_in_dim(u, i1, block, axis=0)  # [B, n_p]
        u_rows = jnp.where((cols >= i1 + block)[None, :], u_rows, 0.0)
        w_all = w_all - jnp.einsum("bko,bj->jko", err1, u_rows, precision=HIGHEST)
        w_all = lax.dynamic_update_slice_in_dim(w_all, w1, i1, axis=0)
        codes = lax.dynamic_update_slice_in_dim(codes, codes1, i1, axis=0)
        return w_all, codes, scales, zeros, cur

    w_all = jnp.broadcast_to(wt[:, None, :], (n_p, k, out))
    params = jnp.zeros((n_groups, k, out), jnp.float32)
    cur = (jnp.ones((k, out), jnp.float32), jnp.zeros((k, out), jnp.float32))
    init = (w_all, jnp.zeros_like(w_all), params, params, cur)
    _, codes, scales, zeros, _ = lax.fori_loop(0, n_p // block, block_step, init)
    return codes, scales, zeros


@dataclass(frozen=True, kw_only=True)
class GPTQQuantizer:
    """GPTQ with per-group scales; all bitwidths of a layer from one factorisation.

    Attributes:
      group_size: input columns per scale group (128); ``>= in`` means one per row.
      symmetric: scale only (True) or scale and zero point (False).
      blocksize: columns per lazy-update block (128), fitted to the groups (see the
        module docstring).
      percdamp: diagonal damping as a fraction of the Hessian's mean diagonal (0.01).
    """

    group_size: int = 128
    symmetric: bool = True
    blocksize: int = 128
    percdamp: float = 0.01
    name: ClassVar[str] = "gptq"

    def __post_init__(self) -> None:
        check_group_size(self.group_size)
        if not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ValueError(f"blocksize must be a positive int, got {self.blocksize!r}")
        if not self.percdamp >= 0:
            raise ValueError(f"percdamp must be >= 0, got {self.percdamp!r}")

    def quantize(
        self, weight: ArrayLike, stats: LayerStats | None, bits: ArrayLike
    ) -> QuantizedVariants:
        """All levels; see :class:`~allocsearch.quantizers.base.LocalQuantizer`."""
        w = check_weight(weight)
        h = check_stats(stats, w.shape[1], self.name)
        b = check_bits_levels(bits)
        n_in = w.shape[1]
        block = gptq_block_size(self.blocksize, self.group_size, n_in)
        lower, _, _, finite = _factor_program(h, jnp.float32(self.percdamp), blocksize=block)
        if not bool(finite):
            raise ValueError(
                f"the damped Hessian is not positive definite (percdamp={self.percdamp}); "
                f"use a larger percdamp or more calibration tokens"
            )
        wt = _padded_columns(w, n_p=lower.shape[0])
        maxq = jnp.asarray((1 << b) - 1, jnp.float32)
        codes, scales, zeros = _gptq_sweep(
            wt,
            lower.T,
            maxq,
            jnp.int32(n_in),
            block=block,
            group_size=self.group_size,
            symmetric=self.symmetric,
        )
        g = -(-n_in // self.group_size)
        scales = np.asarray(scales)[:g].transpose(1, 2, 0)
        if not np.all(np.isfinite(scales)):
            raise ValueError("a group's scale exceeds float16's range; cannot store this layer")
        return QuantizedVariants(
            codes=np.asarray(codes)[:n_in].transpose(1, 2, 0).astype(np.uint8),
            scales=np.ascontiguousarray(scales),
            zeros=np.asarray(zeros)[:g].transpose(1, 2, 0).astype(np.uint8),
            bits=b,
            group_size=self.group_size,
            symmetric=self.symmetric,
        )
