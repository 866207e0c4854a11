"""Which rows a query scores: a minibatch of the calibration split or of the validation split.

An evaluator built with a validation token set keeps one token array, the calibration
rows then the validation rows, and one teacher for both; ``split="validation"`` draws the
minibatch ``(fidelity, batch_seed)`` from the validation rows exactly as a query draws it
from the calibration rows, so a validation score equals the score of an evaluator whose
calibration set is the validation set (tests check this for every backend).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from allocsearch.data.tokenset import TokenSet, minibatch

SPLITS: Final[tuple[str, ...]] = ("calibration", "validation")
"""The splits a query can score (``Query.split``; the ``split`` argument of evaluators)."""


def checked_validation(calibration: TokenSet, validation: TokenSet | None) -> TokenSet | None:
    """``validation`` after checking its sequences are as long as the calibration set's."""
    if validation is not None and validation.seq_len != calibration.seq_len:
        raise ValueError(
            f"validation sequences have {validation.seq_len} tokens, calibration sequences "
            f"{calibration.seq_len}; both splits need the same seq_len"
        )
    return validation


def joined_tokens(calibration: TokenSet, validation: TokenSet | None) -> np.ndarray:
    """int32[n_cal + n_val, seq_len]: the calibration rows, then the validation rows."""
    if validation is None:
        return calibration.tokens
    return np.concatenate([calibration.tokens, validation.tokens])


def split_rows(
    split: str, fidelity: int, batch_seed: int, *, positions: TokenSet, validation: TokenSet | None
) -> np.ndarray:
    """int64[fidelity // seq_len]: rows of :func:`joined_tokens` a query scores.

    ``positions`` is the evaluator's token set of calibration positions (row ``i`` holds
    ``i * seq_len ...``), whose :func:`~allocsearch.data.tokenset.minibatch` draws the
    calibration rows; validation rows are drawn the same way from the validation set and
    come after the ``positions.n_seq`` calibration rows.

    Raises:
      ValueError: an unknown split, or ``"validation"`` without validation rows.
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    seq_len = positions.seq_len
    if split == "calibration":
        return minibatch(positions, fidelity, batch_seed)[:, 0].astype(np.int64) // seq_len
    if validation is None:
        raise ValueError(
            "a validation query needs validation rows; this evaluator has none (set "
            "data.n_validation_seqs > 0)"
        )
    n = validation.n_seq
    rows = TokenSet(
        tokens=np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len),
        source="validation positions",
        tokenizer_identity="positions",
        seed=None,
    )
    drawn = minibatch(rows, fidelity, batch_seed)[:, 0].astype(np.int64) // seq_len
    return drawn + positions.n_seq


@dataclass(frozen=True)
class SplitFitness:
    """An allocation's fitness on the whole calibration set and on the validation rows
    (lower is better), as compare tables and recipe provenance report it.

    Attributes:
      calibration: the metric on all ``calibration_tokens`` calibration tokens.
      validation: the metric on all ``validation_tokens`` validation tokens; None (and 0
        tokens) without validation rows.
    """

    calibration: float
    calibration_tokens: int
    validation: float | None
    validation_tokens: int


def split_fitness(
    evaluate: Any, choice: np.ndarray, calibration: TokenSet, validation: TokenSet | None
) -> SplitFitness:
    """:class:`SplitFitness` of ``choice`` (int[L]) scored by ``evaluate`` (any evaluator or
    backend of the store) on every calibration row, then every validation row (batch seed
    0: the whole set either way)."""
    row = np.asarray(choice, np.int32)[None]
    cal = float(evaluate(row, fidelity=calibration.n_tokens, batch_seed=0)[0])
    if validation is None:
        return SplitFitness(cal, calibration.n_tokens, None, 0)
    val = float(evaluate(row, fidelity=validation.n_tokens, batch_seed=0, split="validation")[0])
    return SplitFitness(cal, calibration.n_tokens, val, validation.n_tokens)


__all__ = [
    "SPLITS",
    "SplitFitness",
    "checked_validation",
    "joined_tokens",
    "split_fitness",
    "split_rows",
]
