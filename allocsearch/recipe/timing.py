"""Measured forward time of models on fixed tokens (apply's before / after report)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from allocsearch.models.hf import HFModel

__all__ = ["forward_seconds", "forward_times"]


def forward_times(
    models: Sequence[HFModel], tokens: np.ndarray, *, repeats: int = 5
) -> list[float]:
    """Wall-clock seconds of one full forward pass of each model on ``tokens``: for each,
    the fastest of ``repeats`` runs (the least disturbed by other work on the machine).

    Every forward is compiled and run once untimed first; then the models run in turn,
    ``repeats`` rounds of one run each, so a burst of other load on the machine slows
    all of them alike rather than the one that happened to run then. Parameters are on
    JAX's default device (CPU here); each run waits for its result. Lower is faster.

    Args:
      models: the models to compare (e.g. dense and as ``apply_recipe`` returns it).
      tokens: int[B, T] token ids, the same for every model.
      repeats: timed runs per model (>= 1).

    Returns:
      float seconds, one per model, in order.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    ids = np.asarray(tokens)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
        raise ValueError(f"tokens must be a non-empty int[B, T] array, got {ids.dtype}{ids.shape}")
    ids = jnp.asarray(ids, jnp.int32)
    runs = []
    for model in models:
        params = {k: jnp.asarray(v) for k, v in model.params.items()}
        fn = jax.jit(model.adapter.forward)
        jax.block_until_ready(fn(params, ids))
        runs.append((fn, params))
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for i, (fn, params) in enumerate(runs):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, ids))
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def forward_seconds(model: HFModel, tokens: np.ndarray, *, repeats: int = 5) -> float:
    """:func:`forward_times` of one model."""
    return forward_times([model], tokens, repeats=repeats)[0]
