"""Validation rows: calibration-source sequences that are neither calibration nor held-out
rows, drawn apart from the calibration draw so that the calibration rows never change.

The search never scores them during its generations; they pick among its final candidates
and report how well an allocation generalises beyond the rows it was chosen on
(``data.n_validation_seqs``; 0 turns them off). Rules:

- **Streams** (causal language models, :func:`~allocsearch.data.tokenset.build_tokensets`):
  each gap of the calibration region that no calibration window covers is cut into
  consecutive windows of ``seq_len`` tokens from its start (:func:`free_windows`).
- **Rows** (encoders, :func:`~allocsearch.data.encoder_sets.encoder_tokensets`): the
  candidate rows of the calibration pool that were not chosen for calibration.
- Either way ``n_seq`` candidates are drawn uniformly without replacement by
  ``numpy.random.default_rng([seed, VALIDATION_SALT])`` and kept in corpus order
  (:func:`draw_validation`): same seed, same rows; the calibration draw is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

VALIDATION_SALT: Final[int] = 0x7A11D
"""Second word of the validation draw's seed (the calibration draw uses the seed alone)."""

DEFAULT_VALIDATION_SEQS: Final[int] = 16
"""Validation rows when ``data.n_validation_seqs`` is not set (fewer where the corpus has
fewer free sequences)."""


@dataclass(frozen=True)
class AtMost:
    """A validation count the user did not set: up to ``n`` rows, fewer where the corpus
    has fewer free sequences, none (no validation split) where it has none."""

    n: int

    def __bool__(self) -> bool:
        return self.n > 0


def validation_request(n_validation_seqs: int | None) -> int | AtMost:
    """What the token-set builders draw for ``data.n_validation_seqs``: a set count exactly
    (an error where the corpus has fewer), unset (None) :class:`AtMost` the default."""
    return AtMost(DEFAULT_VALIDATION_SEQS) if n_validation_seqs is None else n_validation_seqs


def free_windows(size: int, taken: np.ndarray, seq_len: int) -> np.ndarray:
    """int64[m]: starts of the windows of ``seq_len`` tokens of a stream of ``size`` tokens
    that overlap none of the windows starting at ``taken`` (sorted, non-overlapping): each
    free gap cut into consecutive windows from its start, in stream order."""
    taken = np.sort(np.asarray(taken, np.int64))
    lo = np.concatenate([[0], taken + seq_len])
    hi = np.concatenate([taken, [size]])
    parts = [np.arange(a, b - seq_len + 1, seq_len) for a, b in zip(lo, hi, strict=True)]
    return np.concatenate([np.zeros(0, np.int64), *parts]).astype(np.int64)


def draw_validation(candidates: int, n_seq: int | AtMost, seed: int, what: str) -> np.ndarray:
    """int64[n_seq]: sorted indices of ``n_seq`` of ``candidates`` free sequences, drawn by
    ``default_rng([seed, VALIDATION_SALT])``; for :class:`AtMost` as many as there are up
    to its count (possibly none: an empty array).

    Raises:
      ValueError: fewer candidates than an ``int`` ``n_seq``; the message names ``what``
        (the corpus), both counts and how to ask for fewer.
    """
    if isinstance(n_seq, AtMost):
        n_seq = min(n_seq.n, int(candidates))
        if n_seq == 0:
            return np.zeros(0, np.int64)
    if isinstance(n_seq, bool) or not isinstance(n_seq, int | np.integer) or n_seq < 1:
        raise ValueError(f"n_validation_seqs must be a positive integer here, got {n_seq!r}")
    if candidates < n_seq:
        raise ValueError(
            f"{what} has {candidates} sequences outside the calibration and held-out rows; "
            f"data.n_validation_seqs = {n_seq} needs {n_seq} (set it to at most "
            f"{candidates}, or 0 to turn the validation split off)"
        )
    rng = np.random.default_rng([int(seed), VALIDATION_SALT])
    return np.sort(rng.choice(candidates, size=n_seq, replace=False)).astype(np.int64)


__all__ = [
    "DEFAULT_VALIDATION_SEQS",
    "VALIDATION_SALT",
    "AtMost",
    "draw_validation",
    "free_windows",
    "validation_request",
]
