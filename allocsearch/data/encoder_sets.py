"""Calibration and held-out token sets for encoders: sentence-aligned rows wrapped in the
model's own special tokens (``[CLS] ... [SEP]`` for BERT).

An encoder is trained and used on single inputs that its tokenizer wraps, never on a
window cut out of a token stream, so its token sets follow these rules (the causal
rules of :mod:`allocsearch.data.tokenset` otherwise: seeded, disjoint, reproducible):

- **Sentences.** Each document is split into paragraphs (blank lines) and sentences
  (after ``.``, ``!`` or ``?`` followed by white space); every sentence is tokenised on
  its own without special tokens, and a document's sentences are joined into its token
  stream. Documents never share a row.
- **Rows.** A row is ``prefix + body + suffix``, where prefix and suffix are the ids the
  tokenizer's post-processor adds around one sequence
  (:meth:`~allocsearch.data.tokenizers.HFTokenizer.special_wrapping`: its own ``[CLS]``
  and ``[SEP]`` ids) and the body is ``seq_len - len(prefix) - len(suffix)`` tokens of a
  document's stream, truncated as the tokenizer's truncation would (a row never holds
  padding: scores pool over every position). The first row of a document starts at its
  first token; each next row starts at the first sentence start at or after the end of
  the previous row, or right at that end when no sentence starts later in the document
  (a sentence longer than a body continues in the next row). A document's tail shorter
  than a body is dropped.
- **Sets.** Calibration rows are drawn from the rows of the first document list before
  its *last* ``n_heldout_seqs`` rows (else ``heldout_fraction`` of them, at least one).
  Given one list, those last rows are the held-out set; given two, the held-out rows are
  the first ``n_heldout_seqs`` rows of the second (all rows when None) and the last rows
  of the first are left out all the same, so giving a held-out list or not never changes
  the calibration rows (nor the supernets built on them). Calibration rows: ``n_seq``
  distinct rows chosen by ``numpy.random.default_rng(seed)``, kept in corpus order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

import numpy as np

from allocsearch.data.sources import Document, describe_documents
from allocsearch.data.tokenizers import HFTokenizer, Tokenizer
from allocsearch.data.tokenset import TokenSet
from allocsearch.data.validation import AtMost, draw_validation

__all__ = ["document_rows", "encoder_tokensets", "split_sentences"]

_SENTENCE_END: Final = re.compile(r"(?<=[.!?])\s+|\n\s*\n")


def split_sentences(text: str) -> list[str]:
    """Paragraphs (split at blank lines) split into sentences (after ``.``, ``!`` or ``?``
    followed by white space); surrounding white space stripped, empty pieces dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def document_rows(sentences: Sequence[np.ndarray], body: int) -> list[np.ndarray]:
    """The bodies of one document's rows (see the module docstring).

    Args:
      sentences: int[n_i] ids of each sentence of the document, in order.
      body: tokens per row body, >= 1.

    Returns:
      int32[body] arrays, in document order.
    """
    if body < 1:
        raise ValueError(f"body must be >= 1 token, got {body}")
    parts = [np.asarray(s, dtype=np.int32) for s in sentences if len(s)]
    if not parts:
        return []
    stream = np.concatenate(parts)
    starts = np.cumsum([0] + [len(p) for p in parts[:-1]])
    rows, pos = [], 0
    while pos + body <= stream.size:
        rows.append(stream[pos : pos + body])
        end = pos + body
        nxt = int(np.searchsorted(starts, end))  # first sentence start >= end
        pos = int(starts[nxt]) if nxt < starts.size else end
    return rows


def _wrapping(tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.special_wrapping()
    empty = np.zeros((0,), np.int32)
    return empty, empty


def _rows(
    documents: Sequence[Document], tokenizer: Tokenizer, seq_len: int
) -> tuple[np.ndarray, str]:
    """int32[n_rows, seq_len] rows of ``documents`` and a description of how they wrap."""
    prefix, suffix = _wrapping(tokenizer)
    body = seq_len - prefix.size - suffix.size
    if body < 1:
        raise ValueError(
            f"seq_len {seq_len} leaves no room for text between the tokenizer's "
            f"{prefix.size} leading and {suffix.size} trailing special tokens"
        )
    rows = []
    for doc in documents:
        sentences = [tokenizer.encode(s) for s in split_sentences(doc.text)]
        rows += [np.concatenate([prefix, r, suffix]) for r in document_rows(sentences, body)]
    arr = np.stack(rows) if rows else np.zeros((0, seq_len), np.int32)
    if arr.size and (arr.min() < 0 or arr.max() >= tokenizer.vocab_size):
        bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
        raise ValueError(
            f"tokenizer {tokenizer.identity!r} produced id {bad}, outside its vocabulary "
            f"0..{tokenizer.vocab_size - 1}"
        )
    how = f"rows {prefix.tolist()} + {body} tokens from a sentence start + {suffix.tolist()}"
    return arr.astype(np.int32), how


def _check_count(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def encoder_tokensets(
    calibration_documents: Sequence[Document],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    n_calibration_seqs: int,
    seed: int,
    heldout_documents: Sequence[Document] | None = None,
    n_heldout_seqs: int | None = None,
    heldout_fraction: float = 0.1,
    n_validation_seqs: int = 0,
) -> tuple[TokenSet, ...]:
    """Calibration and held-out token sets of wrapped, sentence-aligned rows for an
    encoder (arguments as for :func:`~allocsearch.data.tokenset.build_tokensets`; rules
    in the module docstring).

    Returns:
      ``(calibration, heldout)``, each int32[n, seq_len] rows, and with
      ``n_validation_seqs > 0`` a third, ``validation``: that many rows of the pool that
      are not calibration rows (:mod:`allocsearch.data.validation`).

    Raises:
      ValueError: a document in both lists, too few rows (the message gives rows found
        and needed), ``seq_len`` with no room for text, or an argument out of range.
    """
    seq_len = _check_count(seq_len, "seq_len")
    # an unset count (AtMost): up to its number of rows, all the corpus has where fewer
    at_most = isinstance(n_calibration_seqs, AtMost)
    n_cal = (
        n_calibration_seqs.n if at_most else _check_count(n_calibration_seqs, "n_calibration_seqs")
    )
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    identity = tokenizer.identity
    desc = describe_documents(calibration_documents)
    rows, how = _rows(calibration_documents, tokenizer, seq_len)
    # the calibration corpus's last rows are its own held-out set, and never calibration
    # rows, whether or not a held-out corpus is given: adding one (data.heldout) keeps the
    # calibration rows, and with them every supernet built on them
    if n_heldout_seqs is not None:
        n_tail = _check_count(n_heldout_seqs, "n_heldout_seqs")
    elif not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    else:
        n_tail = max(1, int(heldout_fraction * rows.shape[0]))
    cut = rows.shape[0] - n_tail
    if at_most and 0 < cut < n_cal:
        n_cal = cut
    if cut < n_cal:
        raise ValueError(
            f"corpus ({desc}) gives {rows.shape[0]} rows of {seq_len} tokens; "
            f"{n_cal} calibration rows plus {n_tail} held-out rows are needed (its last "
            f"{n_tail} rows are held out even with a held-out corpus)"
        )
    pool, pool_desc = rows[:cut], f"{desc}, {how} [rows 0:{cut}]"
    if heldout_documents is not None:
        texts = {d.text for d in calibration_documents if d.text}
        shared = next((d.name for d in heldout_documents if d.text in texts), None)
        if shared is not None:
            raise ValueError(
                f"held-out document {shared!r} is also a calibration document; the two "
                "lists must be disjoint"
            )
        held, _ = _rows(heldout_documents, tokenizer, seq_len)
        n_held = max(held.shape[0], 1) if n_heldout_seqs is None else n_tail
        if held.shape[0] < n_held:
            raise ValueError(
                f"held-out corpus ({describe_documents(heldout_documents)}) gives "
                f"{held.shape[0]} rows of {seq_len} tokens; {n_held} are needed"
            )
        held, held_desc = held[:n_held], f"{describe_documents(heldout_documents)}, {how}"
    else:
        held, held_desc = rows[cut:], f"{desc}, {how} [rows {cut}:{rows.shape[0]}]"
    if pool.shape[0] < n_cal:
        raise ValueError(
            f"calibration corpus ({desc}) gives {pool.shape[0]} rows of {seq_len} tokens; "
            f"{n_cal} are needed"
        )
    rng = np.random.default_rng(int(seed))
    chosen = np.sort(rng.choice(pool.shape[0], size=n_cal, replace=False))
    calibration = TokenSet(
        tokens=pool[chosen], source=pool_desc, tokenizer_identity=identity, seed=int(seed)
    )
    heldout = TokenSet(tokens=held, source=held_desc, tokenizer_identity=identity, seed=None)
    if not n_validation_seqs:
        return calibration, heldout
    free = np.setdiff1d(np.arange(pool.shape[0]), chosen)
    picked = free[draw_validation(free.size, n_validation_seqs, seed, f"corpus ({desc})")]
    if picked.size == 0:  # an unset count on a corpus with no free row: no validation
        return calibration, heldout
    validation = TokenSet(
        tokens=pool[picked],
        source=f"{pool_desc}, validation rows",
        tokenizer_identity=identity,
        seed=int(seed),
    )
    return calibration, heldout, validation
