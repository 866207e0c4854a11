"""Capture stage of a build: embed the calibration batches, accumulate each block's input
statistics with its dense weights, and advance the hidden states past a block.

The jitted model pieces are module level with the adapter as a static argument (hashed by
identity), so repeated builds with one adapter reuse the compiled programs, and all blocks
of a model share one (``ModelAdapter.block`` has one graph for every block).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from allocsearch.models.base import ModelAdapter
from allocsearch.models.layers import LayerInfo
from allocsearch.models.moe import MoEAdapter
from allocsearch.models.streamed import embed_program, outer_on_device
from allocsearch.pruners.base import LayerStats, accumulate_stats

__all__ = ["BlockInputs", "advance_block", "capture_block", "embed_batches", "input_norms"]

OnBatch = Callable[[int], Any]
"""Called before each batch (its index) and returning a callable called after it, e.g.
a progress bar's update then advance."""


@partial(jax.jit, static_argnums=0)
def _capture_and_run(adapter: ModelAdapter, block_params, h, ctx):
    return adapter.block(block_params, h, ctx, capture=True)


@partial(jax.jit, static_argnums=0)
def _capture(adapter: ModelAdapter, block_params, h, ctx):
    return adapter.block(block_params, h, ctx, capture=True)[1]


@partial(jax.jit, static_argnums=0)
def _run(adapter: ModelAdapter, block_params, h, ctx):
    return adapter.block(block_params, h, ctx)


def embed_batches(
    adapter: ModelAdapter, params: Mapping[str, Any], tokens: np.ndarray, batch_size: int
) -> tuple[list, list]:
    """(hidden states, block contexts) of every batch of ``batch_size`` sequences, with
    the model's outer weights on the device only while they are needed."""
    batches = [jnp.asarray(tokens[i : i + batch_size]) for i in range(0, len(tokens), batch_size)]
    outer = outer_on_device(adapter, params)  # one block at a time after this
    embedded = [embed_program(adapter, outer, ids) for ids in batches]
    del outer
    return [h for h, _ in embedded], [ctx for _, ctx in embedded]


@dataclass
class BlockInputs:
    """What the capture of one block measured over every calibration batch.

    ``stats``: the Gram matrix of every needed input group; ``squares``: squared channel
    sums of the other inputs (for OWL's norms); ``counts``: int64[E] tokens routed to each
    expert (mixture of experts, else None); ``output``: the block's dense outputs when
    asked for (else None).
    """

    stats: dict[str, LayerStats | None]
    squares: dict[str, jax.Array]
    counts: np.ndarray | None
    output: list | None


def capture_block(
    adapter: ModelAdapter,
    block_params: Mapping[str, jax.Array],
    hidden: Sequence[jax.Array],
    contexts: Sequence[Any],
    groups: Iterable[str] | None,
    *,
    keep_output: bool,
    on_batch: OnBatch = lambda i: lambda: None,
) -> BlockInputs:
    """Run one block with its dense weights over every batch and accumulate the float32
    Gram matrix ``H = sum_t x_t x_t^T`` of each input group in ``groups`` (``None``: every
    input the block taps)."""
    stats: dict[str, LayerStats | None] = {} if groups is None else dict.fromkeys(groups)
    moe = adapter if isinstance(adapter, MoEAdapter) else None
    counts = None if moe is None else np.zeros(moe.moe.num_experts, np.int64)
    squares: dict[str, jax.Array] = {}
    output = [] if keep_output else None
    for i, (h, ctx) in enumerate(zip(hidden, contexts, strict=True)):
        done = on_batch(i)
        if keep_output:
            out, taps = _capture_and_run(adapter, block_params, h, ctx)
            output.append(out)
        else:
            taps = _capture(adapter, block_params, h, ctx)
        if moe is not None:
            routed = taps.pop(moe.routed_tap)
            counts += np.asarray(jnp.sum(routed, axis=(0, 1))).round().astype(np.int64)
        for g, x in taps.items():
            if groups is None or g in stats:
                stats[g] = accumulate_stats(stats.get(g), x)
            else:
                x = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
                squares[g] = squares.get(g, 0.0) + jnp.sum(jnp.square(x), axis=0)
        del taps
        done()
    return BlockInputs(stats, squares, counts, output)


def input_norms(
    layers: Iterable[LayerInfo], prefix: str, captured: BlockInputs
) -> dict[str, np.ndarray]:
    """Wanda/OWL input norms ``||X_j||_2`` (layer name -> float32[in]) of the block's
    layers, from their Gram matrix diagonal or squared channel sums."""
    norms = {}
    for layer in layers:
        rel = layer.input_group[len(prefix) :]
        g = captured.stats.get(rel)
        if g is not None:
            norms[layer.name] = np.sqrt(np.maximum(np.diag(np.asarray(g.hessian)), 0.0))
        elif rel in captured.squares:
            norms[layer.name] = np.sqrt(np.asarray(captured.squares[rel], np.float32))
    return norms


def advance_block(
    adapter: ModelAdapter,
    block_params: Mapping[str, jax.Array],
    hidden: Sequence[jax.Array],
    contexts: Sequence[Any],
    on_batch: OnBatch = lambda i: lambda: None,
) -> list:
    """The hidden states of every batch after the block with ``block_params``."""
    out = []
    for i, (h, ctx) in enumerate(zip(hidden, contexts, strict=True)):
        done = on_batch(i)
        out.append(_run(adapter, block_params, h, ctx))
        done()
    return out
