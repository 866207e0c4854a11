"""The in-process ask/tell loop: the one search loop (Ray backends call the same API)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from allocsearch.search.base import Evaluate, Searcher, SearchResult, evaluate_kwargs
from allocsearch.search.budget import Budget
from allocsearch.supernet.spec import SupernetSpec


def step_keys(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(init key, root of the ask keys) for a search seeded by ``key``.

    The ask key of step ``i`` is ``jax.random.fold_in(root, i)``, so a resumed search
    draws the same keys as an uninterrupted one.
    """
    init_key, root = jax.random.split(key)
    return init_key, root


def run_search(
    searcher: Searcher,
    evaluate: Evaluate,
    spec: SupernetSpec,
    budget: Budget,
    *,
    key: jax.Array,
    on_generation: Callable[[Any], None] | None = None,
    state: Any = None,
) -> SearchResult:
    """Run ``searcher`` to completion, scoring its queries with ``evaluate`` in process.

    Args:
      searcher: the strategy (hyperparameters only).
      evaluate: scores candidates int32[n, L] -> float[n], lower is better.
      spec, budget: the search space and the budget (used by ``init``).
      key: JAX key; the whole trajectory is a function of it.
      on_generation: called with the state after every tell that completes a
        generation (progress, logging, checkpoints). Its return value is ignored.
      state: a state saved from an earlier run with the same ``key`` (e.g. a pickled
        checkpoint) to resume from instead of calling ``init``.

    Returns:
      ``searcher.result`` of the final state.
    """
    init_key, root = step_keys(key)
    if state is None:
        state = searcher.init(spec, budget, init_key)
    while not searcher.done(state):
        query, state = searcher.ask(state, jax.random.fold_in(root, state.step))
        scores = evaluate(query.choices, **evaluate_kwargs(query))
        generation = state.generation
        state = searcher.tell(state, query, scores)
        if on_generation is not None and state.generation != generation:
            on_generation(state)
    return searcher.result(state)
