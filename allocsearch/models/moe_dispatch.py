"""Sort-and-gather expert dispatch for MoE blocks: each expert computes only its routed tokens.

The all-experts path of :class:`~allocsearch.models.moe.SparseMoeBlock` runs every expert
on every token and weights the outputs by the routing weights (0 where not routed): exact,
but ``E / k`` times the routed work. :func:`routed_expert_outputs` computes the same sum
from the ``N k`` (token, expert) assignments only, with **static shapes**, so one compiled
program serves every candidate (nothing depends on where the tokens go but array values):

1. the assignments are sorted by expert; each expert's run is padded up to a multiple of
   a tile of ``t`` rows, so every tile belongs to one expert. Whatever the routing,
   ``sum_e ceil(c_e / t) <= (N k + E (t - 1)) / t`` tiles suffice (:func:`dispatch_rows`),
   a static bound; padding rows read a zero input row and get weight 0;
2. a ``lax.scan`` over the tiles gathers each tile's ``t`` token rows and computes
   ``down(act(gate(x)) * up(x))`` with its expert's weights (a dynamic index into the
   stacked expert weights, float[E, F, D]);
3. the rows are scatter-added back to their tokens, scaled by their routing weight.

It works unchanged under ``jax.vmap`` over candidates (per-candidate weights and routing,
as the evaluators run) and under ``jax.lax.map``. ``jax.lax.ragged_dot`` (grouped matmul
over the sorted rows, no padding) is the other option (``method="ragged"``); on CPU jax
0.10.2 lowers it to a masked dense matmul over all ``E`` groups (``E`` times the work of
one matmul, slower than the all-experts path: scripts/bench_moe_dispatch.py), and on
accelerators it is not measured here, so :func:`dispatch_method` never picks it by itself.

**The rule** (:func:`dispatch_method`, ``method="auto"``): dispatch (``"sorted"``) when
its padded row count is at most half the all-experts row count ``N E``, else the
all-experts path (``"dense"``): tiny blocks (few tokens, few experts, e.g. ``E / k = 2``)
stay on the all-experts path, where dispatch's sort, gathers and scan cost more than they
save. Calibration captures (``capture=True``) always use the all-experts path: its taps
``g_e x`` are the routed tokens' inputs per expert (see :mod:`allocsearch.models.moe`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import jax
import jax.numpy as jnp

DISPATCH_METHODS: Final[tuple[str, ...]] = ("auto", "dense", "sorted", "ragged")
"""``auto``: :func:`dispatch_method`'s rule; ``dense``: every expert on every token;
``sorted``: tiles of routed rows (:func:`routed_expert_outputs`); ``ragged``:
``jax.lax.ragged_dot`` over the sorted rows."""
MIN_TILE: Final[int] = 16
MAX_TILE: Final[int] = 128


def check_dispatch(method: str) -> str:
    """``method`` if it is one of :data:`DISPATCH_METHODS`, else ValueError naming them."""
    if method not in DISPATCH_METHODS:
        raise ValueError(f"MoE dispatch {method!r} is not one of {DISPATCH_METHODS}")
    if method == "ragged" and not hasattr(jax.lax, "ragged_dot"):
        raise ValueError(
            f"MoE dispatch 'ragged' needs jax.lax.ragged_dot, missing in jax {jax.__version__}; "
            "use 'sorted' or 'dense'"
        )
    return method


def dispatch_tile(num_tokens: int, top_k: int, num_experts: int) -> int:
    """Rows per tile: the power of two at or below half the mean routed tokens per expert
    (``N k / 2E``), clamped to [16, 128] (measured on CPU: half the mean keeps the padding
    small; below 16 rows the scan's per-tile weight reads and overhead dominate)."""
    half_mean = max(1, (num_tokens * top_k) // (2 * num_experts))
    return max(MIN_TILE, min(MAX_TILE, 1 << (half_mean.bit_length() - 1)))


def dispatch_rows(num_tokens: int, top_k: int, num_experts: int, tile: int) -> int:
    """Static bound on the padded rows of :func:`routed_expert_outputs`: ``t x`` the tile
    count ``floor((N k + E (t - 1)) / t)`` (at least one tile)."""
    tiles = (num_tokens * top_k + num_experts * (tile - 1)) // tile
    return tile * max(1, tiles)


def dispatch_method(method: str, *, num_tokens: int, top_k: int, num_experts: int) -> str:
    """The method a block of ``num_tokens`` tokens uses (``"auto"`` resolved: ``"sorted"``
    when :func:`dispatch_rows` ``<= N E / 2``, else ``"dense"``); others are returned."""
    check_dispatch(method)
    if method != "auto":
        return method
    tile = dispatch_tile(num_tokens, top_k, num_experts)
    rows = dispatch_rows(num_tokens, top_k, num_experts, tile)
    return "sorted" if 2 * rows <= num_tokens * num_experts else "dense"


def _assignments(weights: jax.Array, top_k: int):
    """From routing weights float[N, E] (0 where not routed): the ``N k`` assignments'
    token int32[A] and weight float[A], sorted by expert id int32[A] (stable), and the
    routed count per expert int32[E]. Taking the top k of the weights recovers the
    router's choice (a routed expert whose weight is 0 contributes 0 either way)."""
    n, e = weights.shape
    gate, idx = jax.lax.top_k(weights, top_k)
    expert = idx.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(expert, stable=True)
    token = (order // top_k).astype(jnp.int32)
    counts = jnp.zeros((e,), jnp.int32).at[expert].add(1)
    return token, gate.reshape(-1)[order], expert[order], counts


def routed_expert_outputs(
    x: jax.Array,
    weights: jax.Array,
    gate_w: jax.Array,
    up_w: jax.Array,
    down_w: jax.Array,
    act: Callable[[jax.Array], jax.Array],
    *,
    top_k: int,
    method: str = "sorted",
) -> jax.Array:
    """``sum_e weights[..., e] * down_e(act(gate_e(x)) * up_e(x))`` over the routed experts.

    Args:
      x: float[..., D] token inputs (any leading shape, e.g. [B, T]).
      weights: float[..., E] routing weights in ``x``'s dtype, nonzero on at most
        ``top_k`` experts per token (the all-experts path's ``g``).
      gate_w, up_w: float[E, F, D]; down_w: float[E, D, F] (torch ``(out, in)`` layout).
      act: the experts' activation.
      top_k: experts each token is routed to.
      method: ``"sorted"`` (tiles, see the module docstring) or ``"ragged"``.
    Returns:
      float[..., D] in ``x``'s dtype; equal to the all-experts sum up to float rounding.
    """
    if method not in ("sorted", "ragged"):
        raise ValueError(f"routed_expert_outputs: method {method!r} must be 'sorted' or 'ragged'")
    lead, d = x.shape[:-1], x.shape[-1]
    e = weights.shape[-1]
    x2 = x.reshape(-1, d)
    n = x2.shape[0]
    token, gate, expert, counts = _assignments(weights.reshape(n, e), top_k)
    gate_w, up_w, down_w = (w.astype(x.dtype) for w in (gate_w, up_w, down_w))
    if method == "ragged":
        xs = x2[token]
        h = act(jax.lax.ragged_dot(xs, jnp.swapaxes(gate_w, 1, 2), counts))
        h = h * jax.lax.ragged_dot(xs, jnp.swapaxes(up_w, 1, 2), counts)
        y = jax.lax.ragged_dot(h, jnp.swapaxes(down_w, 1, 2), counts)
        out = jnp.zeros_like(x2).at[token].add(y * gate[:, None].astype(x.dtype))
        return out.reshape(*lead, d)

    tile = dispatch_tile(n, top_k, e)
    rows = dispatch_rows(n, top_k, e, tile)
    tiles = (counts + tile - 1) // tile
    tile_end = jnp.cumsum(tiles)
    first_row = (tile_end - tiles) * tile  # padded row where each expert's run starts
    rank = jnp.arange(n * top_k, dtype=jnp.int32) - (jnp.cumsum(counts) - counts)[expert]
    pos = first_row[expert] + rank
    src = jnp.full((rows,), n, jnp.int32).at[pos].set(token)  # n: the zero row
    scale = jnp.zeros((rows,), x.dtype).at[pos].set(gate.astype(x.dtype))
    tile_expert = jnp.searchsorted(tile_end, jnp.arange(rows // tile), side="right")
    tile_expert = jnp.minimum(tile_expert, e - 1).astype(jnp.int32)  # unused tiles: any
    padded = jnp.concatenate([x2, jnp.zeros((1, d), x.dtype)])

    def one_tile(_, inputs):
        rows_t, k = inputs
        xt = padded[rows_t]
        h = act(xt @ gate_w[k].T) * (xt @ up_w[k].T)
        return None, h @ down_w[k].T

    _, y = jax.lax.scan(one_tile, None, (src.reshape(-1, tile), tile_expert))
    y = y.reshape(rows, d) * scale[:, None]
    out = jnp.zeros((n + 1, d), x.dtype).at[src].add(y)[:n]
    return out.reshape(*lead, d)


def expert_work_bytes(
    *,
    num_tokens: int,
    top_k: int,
    num_experts: int,
    hidden: int,
    ffn: int,
    itemsize: int,
    method: str = "auto",
) -> int:
    """Bytes of the working set of one MoE block's routed experts on ``num_tokens`` tokens
    (for the memory plan; ``itemsize`` the activations' dtype, ``method`` as
    :func:`dispatch_method`, ``"auto"`` resolved by its rule).

    Router logits and probabilities (float32 ``2 N E``) and the routing weights (``N E``),
    plus: ``dense``: one expert's gate, up and product ``3 N F`` and the accumulated output
    ``N D`` (experts run one after another); ``sorted``: the stacked expert weights
    ``3 E F D`` (per candidate), the assignment arrays (int32 ``4 N k``), the padded rows'
    sources and scales, their outputs and scaled outputs ``2 R D``, the padded input and the
    scatter target ``2 (N + 1) D`` and one tile's ``t (2 F + D)``; ``ragged``: the stacked
    weights and jax's masked dense lowering on CPU, ``E N k max(D, F)`` per matmul.
    """
    n, k, e, d, f, a = num_tokens, top_k, num_experts, hidden, ffn, itemsize
    method = dispatch_method(method, num_tokens=n, top_k=k, num_experts=e)
    routing = 8 * n * e + a * n * e
    if method == "dense":
        return routing + a * (3 * n * f + n * d)
    weights = 3 * e * f * d * a
    if method == "ragged":
        return routing + weights + a * (e * n * k * max(d, f) + n * k * (d + 2 * f) + n * d)
    t = dispatch_tile(n, k, e)
    r = dispatch_rows(n, k, e, t)
    return (
        routing
        + weights
        + 16 * n * k
        + r * (4 + a)
        + a * (2 * r * d + 2 * (n + 1) * d)
        + (a * t * (2 * f + d))
    )


__all__ = [
    "DISPATCH_METHODS",
    "check_dispatch",
    "dispatch_method",
    "dispatch_rows",
    "dispatch_tile",
    "expert_work_bytes",
    "routed_expert_outputs",
]
