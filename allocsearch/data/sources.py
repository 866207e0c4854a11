"""Text sources: where calibration and held-out documents come from.

Every reader returns a list of :class:`Document` (name, text) in a deterministic order:
paths are sorted by their POSIX string, JSONL records keep their line order. Files are
read as strict UTF-8; a file that is not valid UTF-8 is an error naming it.

One rule decides how a file is parsed, wherever it was found (a single path, a
directory walk or a glob): a name ending in ``.jsonl`` is JSON Lines (one document per
non-blank line, text taken from ``text_field``), anything else is one plain-text
document. :func:`load_documents` turns the string a user writes (CLI, config file) into
documents; library code calls the typed readers directly.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "Document",
    "check_source",
    "describe_documents",
    "load_documents",
    "read_directory",
    "read_glob",
    "read_hf_dataset",
    "read_jsonl",
    "read_text_file",
]

_GLOB_CHARS = frozenset("*?[")


class Document(NamedTuple):
    """One text document.

    Attributes:
      name: where it came from: a file path, ``path:line`` for a JSONL record, a module
        name for the demo corpus, ``dataset/split:index`` for a Hugging Face row.
      text: its full text (Unicode).
    """

    name: str
    text: str


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not valid UTF-8 text (bad byte at offset {err.start}); "
            "only UTF-8 text files are supported"
        ) from err


def _require_exists(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"text source {str(path)!r} does not exist")


def read_text_file(path: str | Path) -> Document:
    """Read one plain-text file as a single document named by its path.

    Raises:
      FileNotFoundError: the path does not exist.
      ValueError: the path is a directory, or the file is not valid UTF-8.
    """
    p = Path(path)
    _require_exists(p)
    if not p.is_file():
        raise ValueError(f"text source {str(p)!r} is not a file; use read_directory for folders")
    return Document(name=str(p), text=_read_utf8(p))


def read_jsonl(path: str | Path, *, text_field: str = "text") -> list[Document]:
    """Read a JSON Lines file: one document per non-blank line, from ``text_field``.

    Documents are named ``f"{path}:{line}"`` with 1-based line numbers, in file order.

    Raises:
      FileNotFoundError: the path does not exist.
      ValueError: a line is not valid JSON, is not a JSON object, lacks ``text_field``
        or holds a non-string there; the message names the line number and the field.
    """
    p = Path(path)
    _require_exists(p)
    documents: list[Document] = []
    for lineno, line in enumerate(_read_utf8(p).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{p}:{lineno}: invalid JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise ValueError(
                f"{p}:{lineno}: expected a JSON object with field {text_field!r}, "
                f"got {type(record).__name__}"
            )
        if text_field not in record:
            raise ValueError(
                f"{p}:{lineno}: missing text field {text_field!r}; fields present: {sorted(record)}"
            )
        text = record[text_field]
        if not isinstance(text, str):
            raise ValueError(
                f"{p}:{lineno}: field {text_field!r} must be a string, got {type(text).__name__}"
            )
        documents.append(Document(name=f"{p}:{lineno}", text=text))
    return documents


def _read_file(path: Path, text_field: str) -> list[Document]:
    """The one parsing rule: ``*.jsonl`` is JSON Lines, any other file plain text."""
    if path.name.endswith(".jsonl"):
        return read_jsonl(path, text_field=text_field)
    return [read_text_file(path)]


def read_directory(
    path: str | Path, *, pattern: str = "*.txt", text_field: str = "text"
) -> list[Document]:
    """Read every file under ``path`` (recursively) whose name matches ``pattern``.

    Args:
      path: a directory.
      pattern: shell-style pattern matched against file names at any depth, e.g.
        ``"*.py"`` or ``"*.jsonl"``.
      text_field: text field for ``*.jsonl`` files.

    Returns:
      Documents of all matching files, files in sorted order of their relative path.

    Raises:
      FileNotFoundError: the directory does not exist, or no file under it matches.
      ValueError: the path is not a directory, or a file cannot be parsed.
    """
    root = Path(path)
    _require_exists(root)
    if not root.is_dir():
        raise ValueError(f"text source {str(root)!r} is not a directory")
    files = sorted(
        (p for p in root.rglob(pattern) if p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise FileNotFoundError(f"no file matching {pattern!r} under directory {str(root)!r}")
    return [doc for f in files for doc in _read_file(f, text_field)]


def read_glob(pattern: str, *, text_field: str = "text") -> list[Document]:
    """Read every file matching a shell-style glob (``**`` matches any depth).

    Returns:
      Documents of the matching files (directories are ignored), sorted by path.

    Raises:
      FileNotFoundError: no file matches the pattern.
      ValueError: a file cannot be parsed.
    """
    files = sorted({Path(m) for m in glob.glob(pattern, recursive=True)}, key=Path.as_posix)
    files = [f for f in files if f.is_file()]
    if not files:
        raise FileNotFoundError(f"no file matches the glob pattern {pattern!r}")
    return [doc for f in files for doc in _read_file(f, text_field)]


def load_documents(
    source: str | Path, *, pattern: str = "*.txt", text_field: str = "text"
) -> list[Document]:
    """Parse a user-written text source (CLI / config edge) and read its documents.

    ``source`` is an existing file (``*.jsonl`` is JSON Lines, anything else plain
    text), an existing directory (walked recursively for ``pattern``), or, when no such
    path exists and it contains ``*``, ``?`` or ``[``, a glob pattern.

    Raises:
      FileNotFoundError: the path does not exist (and is not a glob), or nothing matches.
    """
    p = Path(source)
    check_source(source)
    if p.is_dir():
        return read_directory(p, pattern=pattern, text_field=text_field)
    if p.is_file():
        return _read_file(p, text_field)
    return read_glob(str(source), text_field=text_field)


def check_source(source: str | Path) -> None:
    """Check, reading nothing, that ``source`` is something :func:`load_documents` reads:
    an existing file or directory, or a glob pattern (matches are checked when read).

    Raises:
      FileNotFoundError: the path does not exist and is not a glob pattern.
    """
    p = Path(source)
    if p.exists() or _GLOB_CHARS.intersection(str(source)):
        return
    raise FileNotFoundError(
        f"text source {str(source)!r} does not exist; expected a file, a directory or a "
        "glob pattern containing * ? or ["
    )


def read_hf_dataset(
    path: str,
    *,
    split: str,
    text_field: str = "text",
    name: str | None = None,
    max_documents: int | None = None,
) -> list[Document]:
    """Read documents from a Hugging Face ``datasets`` dataset (optional extra).

    Needs the ``datasets`` package (``pip install 'allocsearch[datasets]'``) and whatever
    access the dataset needs (network or a local cache); nothing else in allocsearch
    does. Rows are read in dataset order; documents are named ``f"{path}/{split}:{i}"``.

    Args:
      path: dataset name or local path, as for ``datasets.load_dataset``.
      split: split to read, e.g. ``"train"``.
      text_field: column holding the text.
      name: dataset configuration name, e.g. ``"wikitext-2-raw-v1"``.
      max_documents: read at most this many rows (all when None); must be >= 1.

    Raises:
      ImportError: ``datasets`` is not installed.
      ValueError: the column is missing or a row's text is not a string.
    """
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be >= 1 or None, got {max_documents}")
    try:
        import datasets  # optional extra: imported only when used
    except ImportError as err:
        raise ImportError(
            "read_hf_dataset needs the optional 'datasets' package: "
            "pip install 'allocsearch[datasets]'"
        ) from err
    dataset = datasets.load_dataset(path, name, split=split)
    if text_field not in dataset.column_names:
        raise ValueError(
            f"dataset {path!r} split {split!r} has no column {text_field!r}; "
            f"columns: {dataset.column_names}"
        )
    n = len(dataset) if max_documents is None else min(len(dataset), max_documents)
    documents: list[Document] = []
    for i, text in enumerate(dataset.select(range(n))[text_field]):
        if not isinstance(text, str):
            raise ValueError(
                f"{path}/{split}:{i}: column {text_field!r} must hold strings, "
                f"got {type(text).__name__}"
            )
        documents.append(Document(name=f"{path}/{split}:{i}", text=text))
    return documents


def describe_documents(documents: Sequence[Document], *, limit: int = 3) -> str:
    """A short human-readable description of a document list, for provenance strings.

    Example: ``"3 documents: a.txt, b.txt, c.txt"`` or
    ``"120 documents: a.txt, b.txt, c.txt, ... (117 more)"``.
    """
    names = [d.name for d in documents[:limit]]
    more = len(documents) - len(names)
    suffix = f", ... ({more} more)" if more > 0 else ""
    noun = "document" if len(documents) == 1 else "documents"
    if not documents:
        return "0 documents"
    return f"{len(documents)} {noun}: {', '.join(names)}{suffix}"
