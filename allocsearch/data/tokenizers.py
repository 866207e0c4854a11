"""Tokenizers: text <-> int32 token ids.

:class:`Tokenizer` is the protocol the rest of allocsearch relies on. Two
implementations:

- :class:`ByteTokenizer`: the UTF-8 bytes of the text, vocabulary 256. Exact round trip
  for any text; used by the bundled demo model.
- :class:`HFTokenizer`: a Hugging Face ``tokenizer.json`` (the file every HF model
  directory ships), run by the ``tokenizers`` package, fully offline.

``identity`` is a stable string that goes into token-set fingerprints: equal identities
mean the same text gives the same ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Protocol, final, runtime_checkable

import numpy as np

__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer"]


@runtime_checkable
class Tokenizer(Protocol):
    """Maps text to token ids and back.

    Implementations must be deterministic: the same text always gives the same ids.
    """

    @property
    def vocab_size(self) -> int:
        """Number of distinct ids; every id is in ``[0, vocab_size)``."""
        ...

    @property
    def identity(self) -> str:
        """Stable description used in fingerprints (same identity, same encoding)."""
        ...

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text``: int32[n_tokens] (no special tokens added)."""
        ...

    def decode(self, ids: np.ndarray | Sequence[int]) -> str:
        """Text of int ids[n_tokens], each in ``[0, vocab_size)``."""
        ...


def _check_ids(ids: np.ndarray | Sequence[int], vocab_size: int) -> np.ndarray:
    """ids as int64[n], checked to be 1-D integers in [0, vocab_size)."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"token ids must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= vocab_size)
    if np.any(bad):
        first = int(arr[np.flatnonzero(bad)[0]])
        raise ValueError(f"token id {first} out of range; valid ids are 0..{vocab_size - 1}")
    return arr.astype(np.int64)


@final
class ByteTokenizer:
    """UTF-8 byte tokenizer: one token per byte, vocabulary 256.

    ``decode(encode(text)) == text`` for every Python string, including lone
    surrogates (encoded with the ``surrogatepass`` rule). Ids that are not valid UTF-8
    (e.g. a model sample cut inside a character) decode with U+FFFD replacements.
    """

    IDENTITY: Final[str] = "bytes-utf8"

    @property
    def vocab_size(self) -> int:
        """Always 256."""
        return 256

    @property
    def identity(self) -> str:
        """``"bytes-utf8"``."""
        return self.IDENTITY

    def encode(self, text: str) -> np.ndarray:
        """int32[n_bytes]: the UTF-8 bytes of ``text``."""
        data = text.encode("utf-8", errors="surrogatepass")
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids: np.ndarray | Sequence[int]) -> str:
        """Text of byte ids[n] in [0, 256)."""
        data = _check_ids(ids, 256).astype(np.uint8).tobytes()
        try:
            return data.decode("utf-8", errors="surrogatepass")
        except UnicodeDecodeError:
            return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


@final
class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` run by the ``tokenizers`` package (offline).

    ``encode`` adds no special tokens (no BOS/EOS): token sets are plain text streams. A
    tokenizer.json's own padding and truncation (sentence-transformers checkpoints such as
    all-MiniLM-L6-v2 ship "pad to 128, truncate at 128") are switched off: they would turn
    every calibration document into one fixed-length, mostly padded piece.
    Whether ``decode(encode(text)) == text`` depends on the tokenizer (byte-level BPE
    round-trips exactly; normalising tokenizers may not).

    Args:
      path: a ``tokenizer.json`` file.
    """

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file {str(p)!r} does not exist")
        data = p.read_bytes()
        try:
            self._tokenizer = _HFTokenizer.from_str(data.decode("utf-8"))
        except Exception as err:  # the Rust side raises plain Exception subclasses
            raise ValueError(f"{p} is not a valid tokenizer.json: {err}") from err
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self._path = p
        self._identity = "hf-tokenizer-json:" + hashlib.sha256(data).hexdigest()[:16]
        self._vocab_size = int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def vocab_size(self) -> int:
        """Vocabulary size including added tokens."""
        return self._vocab_size

    @property
    def identity(self) -> str:
        """``"hf-tokenizer-json:"`` + first 16 hex digits of sha256 of the file's bytes.

        Depends on the file's content only, not on where it lies.
        """
        return self._identity

    def encode(self, text: str) -> np.ndarray:
        """int32[n_tokens] ids of ``text``, without special tokens."""
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids: np.ndarray | Sequence[int]) -> str:
        """Text of ids[n] in [0, vocab_size), special tokens kept."""
        arr = _check_ids(ids, self._vocab_size)
        return self._tokenizer.decode(arr.tolist(), skip_special_tokens=False)

    def special_wrapping(self) -> tuple[np.ndarray, np.ndarray]:
        """The ids this tokenizer's post-processor puts before and after one sequence,
        int32[p] and int32[s]: ``[CLS]`` and ``[SEP]`` for BERT (``BertProcessing`` or a
        ``TemplateProcessing`` "[CLS] $A [SEP]"), ``<s>`` and ``</s>`` for RoBERTa; both
        empty when the file has no post-processor. Read by encoding a probe text with and
        without special tokens (the post-processor's own output, whatever its type)."""
        enc = self._tokenizer.encode("a", add_special_tokens=True)
        plain = [i for i, special in enumerate(enc.special_tokens_mask) if not special]
        if not plain:
            raise ValueError(f"{self._path}: the probe text 'a' encodes to special tokens only")
        ids = np.asarray(enc.ids, dtype=np.int32)
        return ids[: plain[0]], ids[plain[-1] + 1 :]

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self._path)!r})"


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """Parse a tokenizer spec (CLI / config edge).

    Args:
      spec: ``"bytes"`` for :class:`ByteTokenizer`; a path to a ``tokenizer.json`` file;
        or a directory holding ``tokenizer.json`` (e.g. a Hugging Face model directory).

    Raises:
      FileNotFoundError: the spec is neither ``"bytes"`` nor such a file or directory.
    """
    if isinstance(spec, str) and spec == "bytes":
        return ByteTokenizer()
    p = Path(spec)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"tokenizer {str(spec)!r} not found; valid specs: 'bytes', a tokenizer.json "
            "file, or a directory containing tokenizer.json"
        )
    return HFTokenizer(p)
