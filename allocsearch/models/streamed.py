"""Block-streamed forward passes of a model whose weights stay on the host.

A model loaded with ``load_model(..., lazy=True)`` keeps its parameters as memory-mapped
host arrays; a whole-model ``jit(forward)(params, ...)`` would move every one of them to
the device at once. These helpers move one block at a time instead: the parameters
outside the blocks (embeddings, final norm, head) once, then each block's parameters for
every batch before the next block's, so the device holds one block plus the hidden states.
Build, ``eval`` and the final perplexity of a search use them; the block-streaming
evaluator does the same for supernet variants.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from allocsearch.evaluate.metrics import next_token_nll
from allocsearch.models.base import ModelAdapter

__all__ = [
    "block_on_device",
    "outer_names",
    "outer_on_device",
    "placeholders",
    "streamed_nll_sum",
]


def outer_names(adapter: ModelAdapter) -> list[str]:
    """Parameter names outside every block (embeddings, final norm, head), in tree order."""
    inside = {
        adapter.block_prefix(i) + rel
        for i in range(adapter.num_blocks)
        for rel in adapter.block_param_names
    }
    return [n for n in adapter.param_names if n not in inside]


def outer_on_device(adapter: ModelAdapter, params: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The parameters outside the blocks as device arrays (the rest stays where it is)."""
    return {name: jnp.asarray(params[name]) for name in outer_names(adapter)}


def block_on_device(adapter: ModelAdapter, params: Mapping[str, Any], i: int) -> dict:
    """Block ``i``'s parameters (names relative to the block) as device arrays."""
    prefix = adapter.block_prefix(i)
    return {rel: jnp.asarray(params[prefix + rel]) for rel in adapter.block_param_names}


def placeholders(adapter: ModelAdapter, dtype: Any) -> dict[str, jax.Array]:
    """Shape-only stand-ins for every block parameter, to be built inside ``jit``:
    ``embed``/``finish`` merge the whole module but read no block parameter, and XLA
    drops the unused broadcasts."""
    zero = jnp.zeros((), dtype)
    shapes = adapter.param_shapes
    names = (
        adapter.block_prefix(i) + rel
        for i in range(adapter.num_blocks)
        for rel in adapter.block_param_names
    )
    return {name: jnp.broadcast_to(zero, shapes[name]) for name in names}


@partial(jax.jit, static_argnums=0)
def embed_program(adapter: ModelAdapter, outer: Mapping[str, jax.Array], ids: jax.Array):
    """(hidden, ctx) of tokens ``ids`` int32[B, T] from the outer parameters alone."""
    dtype = next(iter(outer.values())).dtype
    return adapter.embed({**placeholders(adapter, dtype), **outer}, ids)


@partial(jax.jit, static_argnums=0)
def block_program(adapter: ModelAdapter, block_params, h, ctx):
    """One block: hidden float[B, T, D] -> float[B, T, D]."""
    return adapter.block(block_params, h, ctx)


@partial(jax.jit, static_argnums=0)
def _nll_finish(adapter: ModelAdapter, outer, h, ctx, ids, weights):
    dtype = next(iter(outer.values())).dtype
    out = adapter.finish({**placeholders(adapter, dtype), **outer}, h, ctx)
    return jnp.sum(weights[:, None] * next_token_nll(out, ids))


def streamed_nll_sum(
    adapter: ModelAdapter, params: Mapping[str, Any], tokens: np.ndarray, *, batch_rows: int
) -> float:
    """Sum of next-token NLL (nats) over every sequence of ``tokens`` int32[N, T], run
    block by block: each block's weights are moved to the device once for all batches.

    Batches hold ``batch_rows`` sequences (the last one padded, with weight 0), so every
    batch has one shape and each program compiles once. Causal language models only."""
    if not adapter.is_causal_lm:
        raise ValueError(f"perplexity needs a causal language model, not {adapter.family}")
    tokens = np.asarray(tokens, np.int32)
    n = len(tokens)
    rows = max(1, min(int(batch_rows), n))
    pad = -n % rows
    padded = np.concatenate([tokens, np.repeat(tokens[-1:], pad, axis=0)])
    weights = (np.arange(len(padded)) < n).astype(np.float32)
    batches = [jnp.asarray(padded[i : i + rows]) for i in range(0, len(padded), rows)]
    outer = outer_on_device(adapter, params)
    embedded = [embed_program(adapter, outer, ids) for ids in batches]
    hidden = [h for h, _ in embedded]
    contexts = [ctx for _, ctx in embedded]
    for i in range(adapter.num_blocks):
        block = block_on_device(adapter, params, i)
        hidden = [
            block_program(adapter, block, h, c) for h, c in zip(hidden, contexts, strict=True)
        ]
        del block
    total = 0.0
    for j, (h, c, ids) in enumerate(zip(hidden, contexts, batches, strict=True)):
        w = jnp.asarray(weights[j * rows : (j + 1) * rows])
        total += float(_nll_finish(adapter, outer, h, c, ids, w))
    return total
