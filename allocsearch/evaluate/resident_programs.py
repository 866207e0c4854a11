"""The resident evaluator's device variant stacks (one :class:`_Source` per parameter role)
and the compiled programs that run a candidate through them."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from allocsearch.evaluate.metrics import next_token_nll
from allocsearch.models.base import ModelAdapter
from allocsearch.pruners.base import NestedVariants, Variants, mask_from_rank


class _Source(NamedTuple):
    """Device arrays that give one parameter role's weight for any slot and level.

    A *slot* is a block index (block parameters) or 0 (a parameter outside the blocks).
    Exactly one of three layouts is used, told apart by which fields are None:

    * plain: ``dense`` only (no slot is controlled by a unit);
    * nested: ``dense``, ``rank`` int32[S, out, in] and ``counts`` int32[S, K] or
      int32[S, K, out] (uncontrolled slots have rank 0 and counts 0: everything kept);
    * stacked: ``stack`` [S, K, *shape] with every level's weights (uncontrolled slots hold
      the dense weight at level 0).

    ``unit`` int32[S] is the unit controlling each slot, -1 for none (level 0 is used).
    """

    unit: jax.Array
    dense: jax.Array | None = None
    rank: jax.Array | None = None
    counts: jax.Array | None = None
    stack: jax.Array | None = None


def _select(src: _Source, slot: jax.Array | int, choice: jax.Array | None) -> jax.Array:
    """The weight of ``slot`` at the level ``choice`` (int32[L]) gives it; jit-friendly."""
    if src.rank is None and src.stack is None:
        return src.dense[slot]
    unit = src.unit[slot]
    level = jnp.where(unit >= 0, choice[jnp.maximum(unit, 0)], 0)
    if src.stack is not None:
        return src.stack[slot, level]
    w = src.dense[slot]
    keep = mask_from_rank(src.rank[slot], src.counts[slot, level])
    return jnp.where(keep, w, jnp.zeros((), w.dtype))


def _host_weights(variants: Variants, dense: np.ndarray, k: int) -> np.ndarray:
    """Level ``k`` of ``variants`` as a host array in ``dense``'s dtype. Nested masks follow
    :func:`~allocsearch.pruners.base.mask_from_rank` (kept where rank >= count), in numpy so
    that building stacks compiles nothing."""
    if isinstance(variants, NestedVariants):
        count = np.asarray(variants.prune_counts[k])
        keep = np.asarray(variants.rank) >= (count[:, None] if count.ndim == 1 else count)
        return np.where(keep, dense, np.zeros((), dense.dtype))
    return np.asarray(variants.weights[k]).astype(dense.dtype)


def _build_source(
    dense: Sequence[np.ndarray], variants: Sequence[Variants | None], units: Sequence[int]
) -> _Source:
    """Stack one role's slots (dense host weights, their variants or None, controlling
    units) on the host, then move the stacks to the default device."""
    unit = jnp.asarray(np.asarray(units, dtype=np.int32))
    controlled = [v for v in variants if v is not None]
    if not controlled:
        return _Source(unit=unit, dense=jnp.asarray(np.stack(dense)))
    n_levels = max(v.num_levels for v in controlled)
    nested = all(isinstance(v, NestedVariants) for v in controlled)
    per_row = {v.per_row for v in controlled} if nested else set()
    if nested and len(per_row) == 1:
        row_axis = (dense[0].shape[0],) if per_row.pop() else ()
        ranks, counts = [], []
        for w, v in zip(dense, variants, strict=True):
            if v is None:
                ranks.append(np.zeros(w.shape, np.int32))
                counts.append(np.zeros((n_levels, *row_axis), np.int32))
            else:
                ranks.append(np.asarray(v.rank, np.int32))
                c = np.asarray(v.prune_counts, np.int32)
                pad = [(0, n_levels - c.shape[0])] + [(0, 0)] * (c.ndim - 1)
                counts.append(np.pad(c, pad, mode="edge"))  # padding is never selected
        return _Source(
            unit=unit,
            dense=jnp.asarray(np.stack(dense)),
            rank=jnp.asarray(np.stack(ranks)),
            counts=jnp.asarray(np.stack(counts)),
        )
    stack = np.zeros((len(dense), n_levels, *dense[0].shape), dense[0].dtype)
    for i, (w, v) in enumerate(zip(dense, variants, strict=True)):
        if v is None:
            stack[i, 0] = w  # other levels are never selected
        else:
            for k in range(v.num_levels):
                stack[i, k] = _host_weights(v, w, k)
    return _Source(unit=unit, stack=jnp.asarray(stack))


# ----------------------------------------------------------------------- compiled programs
# Module-level so that evaluators of one model and metric share compiled programs; the
# adapter and metric are static (hashed by identity and by value), the arrays are inputs.


def _full_params(adapter: ModelAdapter, arrays, choice: jax.Array | None) -> dict[str, jax.Array]:
    """Parameters for ``embed``/``finish``: the ones outside the blocks selected for
    ``choice``; block ones are shape-only placeholders (those functions do not read them,
    and XLA drops the unused broadcasts)."""
    params = {name: _select(src, 0, choice) for name, src in arrays["outer"].items()}
    for i in range(adapter.num_blocks):
        for rel, src in arrays["blocks"].items():
            like = src.dense if src.dense is not None else src.stack[:, 0]
            zero = jnp.zeros((), like.dtype)
            params[adapter.block_prefix(i) + rel] = jnp.broadcast_to(zero, like.shape[1:])
    return params


def _block_params(arrays, i: jax.Array, choice: jax.Array | None) -> dict[str, jax.Array]:
    return {rel: _select(src, i, choice) for rel, src in arrays["blocks"].items()}


def _depth_skip(adapter: ModelAdapter, arrays, i: jax.Array, choice) -> dict | None:
    """{sublayer name: bool scalar} of the sublayers ``choice`` drops in block ``i``, or
    None without a depth table (``arrays["depth"]``: the unit of each block's sublayer,
    int32[nb, S] with -1 for none, and the dropped levels bool[L, K])."""
    if choice is None or "depth" not in arrays:
        return None
    table, dropped = arrays["depth"]
    units = table[i]
    safe = jnp.maximum(units, 0)
    flags = (units >= 0) & dropped[safe, choice[safe]]
    return {name: flags[s] for s, name in enumerate(adapter.sublayer_names)}


def _run(adapter: ModelAdapter, arrays, choice, tokens, start=None, lo=None, ref=None):
    """Model outputs for one candidate (``choice`` int32[L]; None for all-plain arrays).

    With ``ref`` (the reference's block inputs float[nb+1, B, T, D]) blocks below ``lo``
    are skipped and blocks below ``start`` take the reference's output.
    """
    full = _full_params(adapter, arrays, choice)
    h, ctx = adapter.embed(full, tokens)
    if ref is not None:
        h = jnp.where(lo == 0, h, ref[lo])

    def body(i, h):
        skip = _depth_skip(adapter, arrays, i, choice)
        out = adapter.block(_block_params(arrays, i, choice), h, ctx, skip=skip)
        if ref is not None:
            out = jnp.where(start > i, ref[i + 1], out)
        return out

    h = jax.lax.fori_loop(0 if ref is None else lo, adapter.num_blocks, body, h)
    return adapter.finish(full, h, ctx)


@partial(jax.jit, static_argnums=(0, 1))
def _score_program(adapter, metric, arrays, teacher, calib, choices, starts, lo, rows, ref):
    """float32[n, R]: per-sequence losses of candidates choices int32[n, L] on the
    calibration rows int32[R]."""
    tokens = calib[rows]
    teacher_rows = tuple(a[rows] for a in teacher)

    def one(choice, start):
        out = _run(adapter, arrays, choice, tokens, start, lo, ref)
        return metric.sequence_losses(teacher_rows, out, tokens)

    if choices.shape[0] == 1:  # no batch axis in the matmuls
        return one(choices[0], starts[0])[None]
    if "depth" in arrays:  # one at a time, so that dropped sublayers are really skipped
        return jax.lax.map(lambda a: one(*a), (choices, starts))
    return jax.vmap(one)(choices, starts)


@partial(jax.jit, static_argnums=(0,))
def _states_program(adapter, arrays, calib, choice, rows):
    """float[nb+1, R, T, D]: hidden states of ``choice`` at every block input (and the
    last block's output) on the calibration rows int32[R]."""
    tokens = calib[rows]
    h, ctx = adapter.embed(_full_params(adapter, arrays, choice), tokens)

    def body(h, i):
        skip = _depth_skip(adapter, arrays, i, choice)
        out = adapter.block(_block_params(arrays, i, choice), h, ctx, skip=skip)
        return out, out

    _, hs = jax.lax.scan(body, h, jnp.arange(adapter.num_blocks))
    return jnp.concatenate([h[None], hs], axis=0)


@partial(jax.jit, static_argnums=(0, 1))
def _teacher_program(adapter, metric, arrays, calib, rows):
    """The metric's teacher data of the dense model (all-plain ``arrays``) on rows int32[R]."""
    tokens = calib[rows]
    return metric.teacher_data(_run(adapter, arrays, None, tokens), tokens)


@partial(jax.jit, static_argnums=(0,))
def _nll_program(adapter, params, tokens, weights):
    """Sum over sequences (weighted by float32[B]) of next-token NLL of tokens int[B, T]."""
    nll = next_token_nll(adapter.forward(params, tokens), tokens)
    return jnp.sum(weights[:, None] * nll)
