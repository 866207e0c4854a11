"""The ask/tell search protocol shared by every strategy, and its value types.

A searcher proposes level vectors (allocations) for a
:class:`~allocsearch.supernet.spec.SupernetSpec` under a
:class:`~allocsearch.search.budget.Budget`; someone else scores them (an :class:`Evaluate`,
in process or on Ray workers) and tells the scores back. The searcher holds only its
hyperparameters; everything that changes during a search lives in an explicit,
picklable *state* value, so a driver can checkpoint and resume it.
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np

from allocsearch.search.budget import Budget
from allocsearch.supernet.spec import SupernetSpec


class Query(NamedTuple):
    """Candidates to score, all on the same data.

    Attributes:
      choices: int32[n, L], one level vector per candidate.
      fidelity: number of calibration tokens to score each candidate on (more = less
        noisy, slower).
      batch_seed: which fresh random minibatch of that many tokens to use; the same for
        every candidate of the query, so their scores are comparable.
      probe: False for proposed allocations (each meets the budget); True for
        measurements that are not allocations, e.g. the per-unit error table of
        :class:`~allocsearch.search.dp.TableSearcher` (one unit pruned, the rest at
        level 0), which need not meet the budget.
      split: ``"calibration"``, or ``"validation"``: score on the validation rows, which
        the search never scores otherwise (e.g. EvoPress's final pick); ``fidelity`` then
        counts validation tokens (see :mod:`allocsearch.evaluate.splits`).
    """

    choices: np.ndarray
    fidelity: int
    batch_seed: int
    probe: bool = False
    split: str = "calibration"


def evaluate_kwargs(query: Query) -> dict[str, Any]:
    """The keyword arguments an :class:`Evaluate` scores ``query`` with: ``fidelity``,
    ``batch_seed`` and, for a validation query only, ``split`` (so evaluators without
    validation rows keep the two-argument signature)."""
    return {"fidelity": query.fidelity, "batch_seed": query.batch_seed, **split_kwargs(query.split)}


def split_kwargs(split: str) -> dict[str, str]:
    """``split`` as keywords of an evaluator call: none for ``"calibration"`` (evaluators
    without validation rows take only ``fidelity`` and ``batch_seed``)."""
    return {} if split == "calibration" else {"split": split}


class HistoryEntry(NamedTuple):
    """Progress after one generation (lower fitness is better)."""

    generation: int
    evaluations: int
    tokens: int
    best_fitness: float


class SearchResult(NamedTuple):
    """What a search found.

    Attributes:
      best_choice: int32[L], the best allocation (feasible).
      best_fitness: its score, lower is better (``inf`` if it was never scored), as
        measured by the searcher's last evaluation of it.
      evaluations: candidate scorings used (rows over all queries).
      tokens: calibration tokens used, sum over queries of rows x fidelity.
      history: progress, one entry per generation that ended with the best allocation
        scored (the table search's probe generation has none).
      info: strategy-specific numbers (e.g. additivity of a table search).
    """

    best_choice: np.ndarray
    best_fitness: float
    evaluations: int
    tokens: int
    history: tuple[HistoryEntry, ...]
    info: dict[str, float]


class Evaluate(Protocol):
    """Scores candidates: ``choices`` int32[n, L] -> float32[n], lower is better.

    ``fidelity`` is the number of calibration tokens and ``batch_seed`` picks the random
    minibatch; equal arguments must give equal scores. Evaluators with validation rows
    also take ``split="validation"`` (:func:`evaluate_kwargs` passes it only then).
    """

    def __call__(self, choices: np.ndarray, *, fidelity: int, batch_seed: int) -> np.ndarray: ...


class Searcher(abc.ABC):
    """Base of every search strategy (ask/tell over an explicit state).

    Call order (one *step* is one ask and its tell)::

        state = searcher.init(spec, budget, key)
        while not searcher.done(state):
            query, state = searcher.ask(state, key_i)      # a fresh key per step
            scores = evaluate(query.choices, fidelity=query.fidelity,
                              batch_seed=query.batch_seed)
            state = searcher.tell(state, query, scores)    # scores: float[n], lower better
        result = searcher.result(state)

    :func:`allocsearch.distributed.local.run_search` is that loop. Rules every subclass
    follows (a contract test checks them):

    - constructor arguments are keyword-only hyperparameters; the searcher never stores
      anything that changes during a search;
    - a state is a picklable value (NamedTuple of numpy arrays, ints, floats and
      tuples) with int fields ``step`` (completed ask/tell pairs) and ``generation``
      (completed generations; one generation may take several steps);
    - randomness comes only from the keys given to ``init`` and ``ask`` (a JAX key, or
      a numpy Generator seeded from it by :func:`numpy_rng`): same keys, same trajectory;
    - each ``ask`` must be followed by ``tell`` with that same query before the next ask;
    - ``ask`` never proposes an infeasible allocation: every row of a non-probe query is
      within the allowed levels and the budget;
    - a NaN score (a diverged evaluation) counts as ``+inf``, the worst.
    """

    @abc.abstractmethod
    def init(self, spec: SupernetSpec, budget: Budget, key: jax.Array) -> Any:
        """The initial state; raises InfeasibleBudgetError if the target cannot be met."""

    @abc.abstractmethod
    def ask(self, state: Any, key: jax.Array) -> tuple[Query, Any]:
        """The next candidates to score, and the state that awaits their scores."""

    @abc.abstractmethod
    def tell(self, state: Any, query: Query, scores: np.ndarray) -> Any:
        """The state after learning ``scores`` float[n] (lower is better) of ``query``."""

    @abc.abstractmethod
    def done(self, state: Any) -> bool:
        """True when the search has finished."""

    @abc.abstractmethod
    def result(self, state: Any) -> SearchResult:
        """The best allocation so far (valid at any point of the search)."""


def numpy_rng(key: jax.Array) -> np.random.Generator:
    """A numpy Generator seeded from a JAX key (typed ``jax.random.key`` or raw uint32)."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    words = np.asarray(key, dtype=np.uint32).ravel()
    return np.random.default_rng([int(w) for w in words])


def draw_batch_seed(rng: np.random.Generator) -> int:
    """A fresh minibatch id in [0, 2**31 - 1)."""
    return int(rng.integers(0, 2**31 - 1))


def check_told(pending: Query | None, query: Query, scores: np.ndarray) -> np.ndarray:
    """Validate a tell against the pending query; float64[n] scores with NaN -> +inf."""
    if pending is None:
        raise ValueError("tell() was called without a pending ask(); call ask() first")
    if (
        query.fidelity != pending.fidelity
        or query.batch_seed != pending.batch_seed
        or query.split != pending.split
        or not np.array_equal(query.choices, pending.choices)
    ):
        raise ValueError("tell() got a query that is not the one the last ask() returned")
    scores = np.asarray(scores)
    n = pending.choices.shape[0]
    if scores.shape != (n,) or not np.issubdtype(scores.dtype, np.floating):
        raise ValueError(f"scores must be float[n={n}], got {scores.dtype} {scores.shape}")
    scores = scores.astype(np.float64)
    return np.where(np.isnan(scores), np.inf, scores)
