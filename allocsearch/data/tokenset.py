"""Fixed, seeded calibration and held-out token sets.

Rules (the same everywhere in allocsearch):

- **Stream.** Each document is tokenised on its own; the id arrays are joined into one
  int32 stream with the ids of :data:`DOCUMENT_SEPARATOR` (``"\\n\\n"``, a blank line)
  between consecutive documents (not before the first nor after the last). Documents
  with empty text are skipped. Document boundaries are therefore token boundaries,
  whatever the tokenizer. A tokenizer that encodes the separator to no ids simply
  concatenates documents.
- **Calibration set.** ``n_seq`` windows of ``seq_len`` tokens drawn from the stream by a
  ``numpy.random.Generator`` seeded with an explicit ``seed``: every placement of
  ``n_seq`` pairwise non-overlapping windows is equally likely. Windows are kept in
  stream order. Same seed, same tokens.
- **Held-out set.** Consecutive non-overlapping windows from the start of its stream
  (``[0, L)``, ``[L, 2L)``, ...; the tail shorter than one window is dropped): the
  standard perplexity evaluation. No randomness (``seed`` is None).
- **Disjointness.** Calibration and held-out sets always come from disjoint text. Given
  two document lists, the calibration set is drawn from the first and the held-out set
  from the second, and a document text present in both lists is an error. Given one
  list, its stream is cut in two: the held-out set is the *last* ``H`` tokens
  (``H = n_heldout_seqs * seq_len``, or else ``heldout_fraction`` of the stream rounded
  down to whole windows, at least one window) and calibration windows are drawn from
  the tokens before them, so no token position is used by both.
- **Validation set** (``n_validation_seqs > 0``): windows of the calibration region
  disjoint from the calibration windows, drawn apart from them
  (:mod:`allocsearch.data.validation`), so the calibration windows never change.
- **Multi-fidelity.** :func:`minibatch` picks a seeded subset of a token set's sequences
  with an exact token count, fresh for every ``batch_seed``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Final

import numpy as np

from allocsearch.data.sources import Document, describe_documents
from allocsearch.data.tokenizers import Tokenizer
from allocsearch.data.validation import AtMost, draw_validation, free_windows

__all__ = [
    "DOCUMENT_SEPARATOR",
    "TokenSet",
    "build_tokensets",
    "calibration_tokenset",
    "encode_documents",
    "heldout_tokenset",
    "minibatch",
    "validation_tokenset",
]

DOCUMENT_SEPARATOR: Final[str] = "\n\n"
"""Text placed between consecutive documents of a stream (tokenised once)."""

_FINGERPRINT_TAG: Final[bytes] = b"allocsearch.tokenset.v1\n"
_FINGERPRINT_HEX_DIGITS: Final[int] = 16


def _check_positive_int(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _check_seed(seed: int, what: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {seed!r}")
    return int(seed)


@dataclass(frozen=True, eq=False)
class TokenSet:
    """A fixed set of token sequences with its provenance.

    Attributes:
      tokens: int32[n_seq, seq_len], read-only (a private copy of what was passed).
      source: human-readable description of the text it came from (documents and, for
        a single-source split, the token range of the stream).
      tokenizer_identity: ``Tokenizer.identity`` of the tokenizer that made it.
      seed: the seed its windows were drawn with; None for consecutive (held-out) windows.
    """

    tokens: np.ndarray
    source: str
    tokenizer_identity: str
    seed: int | None

    def __post_init__(self) -> None:
        tokens = self.tokens
        if not isinstance(tokens, np.ndarray) or tokens.dtype != np.int32 or tokens.ndim != 2:
            desc = (
                f"{tokens.dtype}{list(tokens.shape)}"
                if isinstance(tokens, np.ndarray)
                else type(tokens).__name__
            )
            raise ValueError(f"TokenSet.tokens must be an int32[n_seq, seq_len] array, got {desc}")
        if tokens.shape[0] < 1 or tokens.shape[1] < 1:
            raise ValueError(f"TokenSet.tokens must hold at least one token, shape {tokens.shape}")
        if self.seed is not None:
            _check_seed(self.seed)
        frozen = np.array(tokens, dtype=np.int32, copy=True, order="C")
        frozen.setflags(write=False)
        object.__setattr__(self, "tokens", frozen)

    @property
    def n_seq(self) -> int:
        """Number of sequences."""
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        """Tokens per sequence."""
        return int(self.tokens.shape[1])

    @property
    def n_tokens(self) -> int:
        """Total number of tokens, ``n_seq * seq_len``."""
        return int(self.tokens.size)

    @cached_property
    def fingerprint(self) -> str:
        """16 hex digits of sha256 over the token bytes (int32 little-endian), the shape
        and the tokenizer identity. Changes when any token, the shape or the tokenizer
        changes; does not depend on ``source`` or ``seed``."""
        h = hashlib.sha256(_FINGERPRINT_TAG)
        h.update(self.tokenizer_identity.encode("utf-8") + b"\n")
        h.update(f"{self.n_seq}x{self.seq_len}\n".encode())
        h.update(self.tokens.astype("<i4", copy=False).tobytes())
        return h.hexdigest()[:_FINGERPRINT_HEX_DIGITS]

    def provenance(self) -> dict[str, str | int | None]:
        """Plain-value summary for recipes and reports (no token data)."""
        return {
            "source": self.source,
            "tokenizer": self.tokenizer_identity,
            "seed": self.seed,
            "n_seq": self.n_seq,
            "seq_len": self.seq_len,
            "fingerprint": self.fingerprint,
        }

    def __reduce__(self) -> tuple[type[TokenSet], tuple[np.ndarray, str, str, int | None]]:
        # Rebuild through __init__ so an unpickled copy (e.g. on a Ray worker) is
        # validated and read-only again.
        return (TokenSet, (self.tokens, self.source, self.tokenizer_identity, self.seed))

    def __repr__(self) -> str:
        return (
            f"TokenSet(n_seq={self.n_seq}, seq_len={self.seq_len}, source={self.source!r}, "
            f"tokenizer={self.tokenizer_identity!r}, seed={self.seed}, "
            f"fingerprint={self.fingerprint!r})"
        )


def encode_documents(documents: Sequence[Document], tokenizer: Tokenizer) -> np.ndarray:
    """Tokenise documents into one stream joined by :data:`DOCUMENT_SEPARATOR`.

    Returns:
      int32[n_tokens]; empty when there are no documents with text.

    Raises:
      ValueError: the tokenizer returned ids outside ``[0, vocab_size)``.
    """
    separator = np.asarray(tokenizer.encode(DOCUMENT_SEPARATOR), dtype=np.int32)
    parts: list[np.ndarray] = []
    for doc in documents:
        if not doc.text:
            continue
        if parts:
            parts.append(separator)
        parts.append(np.asarray(tokenizer.encode(doc.text), dtype=np.int32))
    if not parts:
        return np.zeros((0,), dtype=np.int32)
    stream = np.concatenate(parts)
    if stream.size and (stream.min() < 0 or stream.max() >= tokenizer.vocab_size):
        bad = int(stream.min()) if stream.min() < 0 else int(stream.max())
        raise ValueError(
            f"tokenizer {tokenizer.identity!r} produced id {bad}, outside its vocabulary "
            f"0..{tokenizer.vocab_size - 1}"
        )
    return stream


def _check_stream(stream: np.ndarray) -> np.ndarray:
    arr = np.asarray(stream)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token stream must be 1-D integers, got {arr.dtype}{list(arr.shape)}")
    return arr.astype(np.int32, copy=False)


def calibration_tokenset(
    stream: np.ndarray,
    *,
    seq_len: int,
    n_seq: int,
    seed: int,
    tokenizer_identity: str,
    source: str,
) -> TokenSet:
    """Draw ``n_seq`` non-overlapping windows of ``seq_len`` tokens from a stream.

    Every placement of the windows is equally likely under the Generator seeded with
    ``seed`` (a uniform random combination of start offsets); windows are returned in
    stream order.

    Args:
      stream: int[n_tokens] token stream (see :func:`encode_documents`).
      seq_len: tokens per sequence, >= 1.
      n_seq: number of sequences, >= 1.
      seed: non-negative seed of ``numpy.random.default_rng``.
      tokenizer_identity: identity of the tokenizer that made the stream.
      source: description of the text, kept in the token set.

    Raises:
      ValueError: the stream has fewer than ``n_seq * seq_len`` tokens (the message
        gives both numbers), or an argument is out of range.
    """
    seq_len = _check_positive_int(seq_len, "seq_len")
    n_seq = _check_positive_int(n_seq, "n_seq")
    seed = _check_seed(seed)
    arr = _check_stream(stream)
    needed = n_seq * seq_len
    if arr.size < needed:
        raise ValueError(
            f"calibration corpus ({source}) has {arr.size} tokens; {n_seq} sequences of "
            f"{seq_len} tokens need at least {needed}"
        )
    starts = _window_starts(arr.size, seq_len, n_seq, seed)
    tokens = arr[starts[:, None] + np.arange(seq_len)[None, :]]
    return TokenSet(tokens=tokens, source=source, tokenizer_identity=tokenizer_identity, seed=seed)


def _window_starts(size: int, seq_len: int, n_seq: int, seed: int) -> np.ndarray:
    """int64[n_seq]: sorted starts of the calibration windows :func:`calibration_tokenset`
    draws from a stream of ``size >= n_seq * seq_len`` tokens."""
    rng = np.random.default_rng(seed)
    slack = size - n_seq * seq_len
    # Placements of n_seq non-overlapping windows <-> non-decreasing gaps g_0 <= ... <=
    # g_{n-1} in [0, slack] (start_i = i * seq_len + g_i) <-> n_seq-subsets c of
    # range(slack + n_seq) with g_i = c_i - i. A uniform subset is a uniform placement.
    combo = np.sort(rng.choice(slack + n_seq, size=n_seq, replace=False))
    return combo + np.arange(n_seq) * (seq_len - 1)


def validation_tokenset(
    stream: np.ndarray,
    *,
    seq_len: int,
    n_seq: int | AtMost,
    n_calibration_seqs: int,
    seed: int,
    tokenizer_identity: str,
    source: str,
) -> TokenSet | None:
    """``n_seq`` windows of ``stream`` that overlap none of the calibration windows
    :func:`calibration_tokenset` draws from it with ``n_calibration_seqs`` and ``seed``
    (rules: :mod:`allocsearch.data.validation`); its ``seed`` is ``seed``. None where an
    :class:`~allocsearch.data.validation.AtMost` count finds no free window.

    Raises:
      ValueError: the stream has fewer free windows than ``n_seq`` (counts in the message).
    """
    arr = _check_stream(stream)
    taken = _window_starts(arr.size, seq_len, n_calibration_seqs, seed)
    free = free_windows(arr.size, taken, seq_len)
    starts = free[draw_validation(free.size, n_seq, seed, f"calibration corpus ({source})")]
    if starts.size == 0:
        return None
    tokens = arr[starts[:, None] + np.arange(seq_len)[None, :]]
    return TokenSet(
        tokens=tokens,
        source=f"{source}, validation windows",
        tokenizer_identity=tokenizer_identity,
        seed=seed,
    )


def heldout_tokenset(
    stream: np.ndarray,
    *,
    seq_len: int,
    n_seq: int | None = None,
    tokenizer_identity: str,
    source: str,
) -> TokenSet:
    """Cut a stream into consecutive non-overlapping windows (perplexity evaluation).

    Args:
      stream: int[n_tokens] token stream.
      seq_len: tokens per sequence, >= 1.
      n_seq: keep the first ``n_seq`` windows; None keeps all ``n_tokens // seq_len``.
      tokenizer_identity: identity of the tokenizer that made the stream.
      source: description of the text, kept in the token set.

    Raises:
      ValueError: the stream is shorter than the windows asked for (at least one); the
        message gives the token count found and the count needed.
    """
    seq_len = _check_positive_int(seq_len, "seq_len")
    arr = _check_stream(stream)
    available = arr.size // seq_len
    wanted = available if n_seq is None else _check_positive_int(n_seq, "n_seq")
    if available < max(wanted, 1):
        what = "one sequence" if n_seq is None else f"{wanted} sequences"
        raise ValueError(
            f"held-out corpus ({source}) has {arr.size} tokens; {what} of {seq_len} tokens "
            f"need at least {max(wanted, 1) * seq_len}"
        )
    tokens = arr[: wanted * seq_len].reshape(wanted, seq_len)
    return TokenSet(tokens=tokens, source=source, tokenizer_identity=tokenizer_identity, seed=None)


def _shared_document(a: Sequence[Document], b: Sequence[Document]) -> tuple[str, str] | None:
    texts = {d.text: d.name for d in a if d.text}
    for d in b:
        if d.text in texts:
            return texts[d.text], d.name
    return None


def build_tokensets(
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
    """Build a calibration and a held-out token set from disjoint text.

    With ``heldout_documents`` the two sets come from the two lists (which must share
    no document text); without it, from disjoint regions of one stream (held-out = the
    last tokens; see the module docstring).

    Args:
      calibration_documents: documents to draw calibration windows from (and, when
        ``heldout_documents`` is None, the held-out tail too).
      tokenizer: tokenizer for both sets.
      seq_len: tokens per sequence for both sets.
      n_calibration_seqs: number of calibration sequences.
      seed: seed of the calibration windows.
      heldout_documents: a separate held-out document list, or None.
      n_heldout_seqs: number of held-out windows; None takes all windows of the
        held-out documents, or ``heldout_fraction`` of a single stream.
      heldout_fraction: share of a single stream reserved for held-out, in (0, 1);
        ignored when ``heldout_documents`` or ``n_heldout_seqs`` is given.
      n_validation_seqs: > 0: also that many validation windows (returned third).

    Returns:
      ``(calibration, heldout[, validation])`` (:func:`validation_tokenset`).

    Raises:
      ValueError: a document appears in both lists, the corpus is too short (message
        gives tokens found and needed), or an argument is out of range.
    """
    seq_len = _check_positive_int(seq_len, "seq_len")
    n_calibration_seqs = _check_positive_int(n_calibration_seqs, "n_calibration_seqs")
    identity = tokenizer.identity
    calib_desc = describe_documents(calibration_documents)
    calib_stream = encode_documents(calibration_documents, tokenizer)

    if heldout_documents is not None:
        shared = _shared_document(calibration_documents, heldout_documents)
        if shared is not None:
            raise ValueError(
                f"calibration document {shared[0]!r} and held-out document {shared[1]!r} "
                "have the same text; the two lists must be disjoint"
            )
        calibration = calibration_tokenset(
            calib_stream,
            seq_len=seq_len,
            n_seq=n_calibration_seqs,
            seed=seed,
            tokenizer_identity=identity,
            source=calib_desc,
        )
        heldout = heldout_tokenset(
            encode_documents(heldout_documents, tokenizer),
            seq_len=seq_len,
            n_seq=n_heldout_seqs,
            tokenizer_identity=identity,
            source=describe_documents(heldout_documents),
        )
        return _with_validation(calibration, heldout, calib_stream, n_validation_seqs, seed)

    total = int(calib_stream.size)
    if n_heldout_seqs is not None:
        n_heldout_tokens = _check_positive_int(n_heldout_seqs, "n_heldout_seqs") * seq_len
    else:
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        n_heldout_tokens = max(1, int(heldout_fraction * total) // seq_len) * seq_len
    needed = n_calibration_seqs * seq_len + n_heldout_tokens
    if total < needed:
        raise ValueError(
            f"corpus ({calib_desc}) has {total} tokens; {n_calibration_seqs} calibration "
            f"sequences of {seq_len} tokens plus {n_heldout_tokens} held-out tokens need at "
            f"least {needed}"
        )
    cut = total - n_heldout_tokens
    calibration = calibration_tokenset(
        calib_stream[:cut],
        seq_len=seq_len,
        n_seq=n_calibration_seqs,
        seed=seed,
        tokenizer_identity=identity,
        source=f"{calib_desc} [tokens 0:{cut}]",
    )
    heldout = heldout_tokenset(
        calib_stream[cut:],
        seq_len=seq_len,
        tokenizer_identity=identity,
        source=f"{calib_desc} [tokens {cut}:{total}]",
    )
    return _with_validation(calibration, heldout, calib_stream[:cut], n_validation_seqs, seed)


def _with_validation(
    calibration: TokenSet, heldout: TokenSet, region: np.ndarray, n_validation_seqs: int, seed: int
) -> tuple[TokenSet, ...]:
    """``(calibration, heldout)``, and the validation windows of ``region`` (the stream
    the calibration windows were drawn from) when ``n_validation_seqs > 0``."""
    if not n_validation_seqs:
        return calibration, heldout
    validation = validation_tokenset(
        region,
        seq_len=calibration.seq_len,
        n_seq=n_validation_seqs,
        n_calibration_seqs=calibration.n_seq,
        seed=seed,
        tokenizer_identity=calibration.tokenizer_identity,
        source=calibration.source,
    )
    return calibration, heldout, validation


def minibatch(tokenset: TokenSet, n_tokens: int, batch_seed: int) -> np.ndarray:
    """A seeded subset of a token set's sequences holding exactly ``n_tokens`` tokens.

    The ``n_tokens // seq_len`` sequences are drawn without replacement by
    ``numpy.random.default_rng(batch_seed)`` and returned in their order in the token
    set: same ``batch_seed``, same batch; another ``batch_seed``, a fresh draw. Asking
    for all tokens returns every sequence.

    Args:
      tokenset: the token set to draw from.
      n_tokens: tokens wanted; a multiple of ``seq_len`` between ``seq_len`` and
        ``tokenset.n_tokens``.
      batch_seed: non-negative seed of this batch.

    Returns:
      int32[n_tokens // seq_len, seq_len], a fresh (writable) array.

    Raises:
      ValueError: ``n_tokens`` is not one of the valid values (the message lists them).
    """
    batch_seed = _check_seed(batch_seed, "batch_seed")
    seq_len, total = tokenset.seq_len, tokenset.n_tokens
    valid = (
        not isinstance(n_tokens, bool)
        and isinstance(n_tokens, int | np.integer)
        and n_tokens % seq_len == 0
        and seq_len <= n_tokens <= total
    )
    if not valid:
        raise ValueError(
            f"n_tokens={n_tokens!r} is not valid for a token set of {tokenset.n_seq} "
            f"sequences x {seq_len} tokens; valid values are multiples of seq_len={seq_len} "
            f"from {seq_len} to {total}"
        )
    n_seq = int(n_tokens) // seq_len
    rng = np.random.default_rng(batch_seed)
    index = np.sort(rng.choice(tokenset.n_seq, size=n_seq, replace=False))
    return tokenset.tokens[index]
