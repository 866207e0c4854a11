"""Measured forward time of a model on fixed tokens (apply's before / after report)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from allocsearch.models.hf import HFModel

__all__ = ["forward_seconds"]


def forward_seconds(model: HFModel, tokens: np.ndarray, *, repeats: int = 5) -> float:
    """Wall-clock seconds of one full forward pass of ``model`` on ``tokens``: the fastest
    of ``repeats`` runs (the least disturbed by other work on the machine).

    The forward is compiled once and run once untimed, then ``repeats`` times; the
    parameters are on JAX's default device (CPU here), each run waits for its result.
    Lower is faster. Compare two models only on the same tokens and machine.

    Args:
      model: the model (dense or as ``apply_recipe`` returns it).
      tokens: int[B, T] token ids.
      repeats: timed runs (>= 1).
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    ids = np.asarray(tokens)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
        raise ValueError(f"tokens must be a non-empty int[B, T] array, got {ids.dtype}{ids.shape}")
    adapter = model.adapter
    params = {k: jnp.asarray(v) for k, v in model.params.items()}
    run = jax.jit(adapter.forward)
    ids = jnp.asarray(ids, jnp.int32)
    jax.block_until_ready(run(params, ids))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(params, ids))
        times.append(time.perf_counter() - t0)
    return float(np.min(times))
