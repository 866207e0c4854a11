"""What every evaluator offers: the resident :class:`~allocsearch.evaluate.evaluator.Evaluator`
and the block-streaming :class:`~allocsearch.evaluate.streaming.StreamingEvaluator` both
satisfy :class:`AllocationEvaluator`, and give the same scores (to float rounding), so a
search, a Ray actor or the pipeline can take either.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import ArrayLike

from allocsearch.data.tokenset import TokenSet
from allocsearch.evaluate.metrics import Metric
from allocsearch.supernet.spec import SupernetSpec

__all__ = ["AllocationEvaluator"]


@runtime_checkable
class AllocationEvaluator(Protocol):
    """Scores sparsity allocations of one supernet against the dense model.

    An :class:`~allocsearch.search.base.Evaluate` (``choices`` int32[n, L] ->
    float32[n], lower is better) with what drivers and actors also use.

    Attributes:
      spec: the search space (units x levels) the level vectors index.
      metric: the fitness; every score is its mean over the minibatch's sequences.
      calibration: the token set minibatches are drawn from.
      last_stats: a NamedTuple describing the last call (fields ``candidates``,
        ``reused``, ``computed_reference``, ``blocks_run`` at least), None before one.
    """

    spec: SupernetSpec
    metric: Metric
    calibration: TokenSet
    last_stats: Any

    def __call__(
        self,
        choices: ArrayLike,
        *,
        fidelity: int,
        batch_seed: int,
        shard: tuple[int, int] = (0, 1),
    ) -> np.ndarray:
        """float32[n] scores of ``choices`` int[n, L] on the minibatch of ``fidelity``
        calibration tokens drawn with ``batch_seed`` (equal arguments, equal scores);
        with ``shard=(index, count)`` only that split of its sequences
        (:func:`~allocsearch.evaluate.evaluator.shard_rows`)."""
        ...

    def set_reference(self, choice: ArrayLike | None) -> None:
        """Reuse this allocation's (int[L]) hidden states in later calls; None goes back
        to the automatic reference."""
        ...

    def reference_for(self, choices: ArrayLike) -> np.ndarray | None:
        """int32[L]: the reference a call with ``choices`` would reuse, or None."""
        ...

    def minibatch_rows(
        self, fidelity: int, batch_seed: int, shard: tuple[int, int] = (0, 1)
    ) -> np.ndarray:
        """int64[rows]: the calibration sequences a query is scored on."""
        ...

    def perplexity(self, choice: ArrayLike | None, tokenset: TokenSet) -> float:
        """Perplexity of allocation ``choice`` (None: the dense model) over ``tokenset``
        (lower is better)."""
        ...
