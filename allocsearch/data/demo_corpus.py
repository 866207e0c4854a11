"""The demo corpus: Python standard-library source code, read from the running Python.

The bundled demo model is trained on the source files of :data:`TRAIN_MODULES`; its
calibration set is drawn from the same modules and its held-out set is cut from
:data:`HELDOUT_MODULES`, a disjoint list. Nothing is downloaded: each module's source
is the file ``importlib.util.find_spec(name).origin`` of the interpreter running
allocsearch (for a package, its ``__init__.py``).

Both lists were checked to resolve to ``.py`` source files on CPython 3.11, 3.12 and
3.13 (modules frozen into the interpreter, such as ``os`` or ``abc``, are left out: they
have no ``origin`` file). A module that cannot be found, or is not ``.py`` source, is an
error naming it; nothing is skipped silently.

Sizes in bytes (train, 102 modules / held-out, 31 modules): CPython 3.11.7 4,348,106 /
450,629; 3.12.1 4,269,736 / 463,742; 3.13.0 4,388,128 / 497,162.

**The contents differ slightly between Python versions** (and patch releases), so the
token sets built here can differ too; their ``TokenSet.fingerprint`` captures exactly
which tokens were used, so results record it (and the sources name the Python version).
"""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path
from typing import Final, Literal

from allocsearch.data.sources import Document
from allocsearch.data.tokenizers import ByteTokenizer
from allocsearch.data.tokenset import (
    TokenSet,
    calibration_tokenset,
    encode_documents,
    heldout_tokenset,
    validation_tokenset,
)

__all__ = [
    "HELDOUT_MODULES",
    "TRAIN_MODULES",
    "demo_documents",
    "demo_tokensets",
    "module_source_path",
]

TRAIN_MODULES: Final[tuple[str, ...]] = (
    # single-file modules
    "_compat_pickle", "_compression", "_markupbase", "_py_abc", "_pydecimal", "_pyio",
    "_strptime", "_threading_local", "_weakrefset", "argparse", "ast", "bdb", "bz2",
    "cProfile", "code", "codeop", "compileall", "configparser", "contextlib", "copyreg",
    "dataclasses", "datetime", "difflib", "dis", "doctest", "enum", "fileinput",
    "functools", "getpass", "gettext", "gzip", "hashlib", "hmac", "imaplib", "inspect",
    "ipaddress", "linecache", "locale", "lzma", "mailbox", "mimetypes", "modulefinder",
    "opcode", "operator", "optparse", "pdb", "pickle", "pickletools", "pkgutil",
    "platform", "plistlib", "profile", "pstats", "pty", "py_compile", "pyclbr", "pydoc",
    "random", "rlcompleter", "selectors", "shelve", "shutil", "signal", "smtplib",
    "socket", "socketserver", "ssl", "stringprep", "subprocess", "symtable", "tarfile",
    "tempfile", "threading", "token", "tokenize", "trace", "traceback", "tracemalloc",
    "types", "typing", "uuid", "warnings", "weakref", "webbrowser", "zipapp",
    # modules inside packages, and package __init__ files
    "collections", "logging", "logging.handlers", "email.message",
    "email._header_value_parser", "http.client", "http.server", "http.cookiejar",
    "urllib.parse", "urllib.request", "xml.dom.minidom", "xml.etree.ElementTree",
    "unittest.case", "unittest.mock", "json.decoder", "json.encoder", "html.parser",
)  # fmt: skip
"""Modules whose source trains the demo model and feeds its calibration set."""

HELDOUT_MODULES: Final[tuple[str, ...]] = (
    "base64", "bisect", "calendar", "cmd", "colorsys", "copy", "csv", "filecmp",
    "fnmatch", "fractions", "ftplib", "getopt", "glob", "graphlib", "heapq", "netrc",
    "numbers", "poplib", "pprint", "queue", "quopri", "reprlib", "sched", "secrets",
    "shlex", "statistics", "string", "tabnanny", "textwrap", "timeit", "wave",
)  # fmt: skip
"""Modules whose source forms the demo held-out set (disjoint from TRAIN_MODULES)."""

_SPLITS: Final[dict[str, tuple[str, ...]]] = {"train": TRAIN_MODULES, "heldout": HELDOUT_MODULES}


def module_source_path(name: str) -> Path:
    """Path of the ``.py`` source of a standard-library module in the running Python.

    Raises:
      ValueError: the module is not found, or has no ``.py`` source file (frozen,
        built-in or compiled); the message names the module and what was found.
    """
    try:
        spec = importlib.util.find_spec(name)
    except ImportError as err:  # a parent package is missing
        raise ValueError(f"demo corpus module {name!r} not found: {err}") from err
    if spec is None:
        raise ValueError(f"demo corpus module {name!r} not found in this Python installation")
    origin = spec.origin
    if origin is None or not origin.endswith(".py") or not Path(origin).is_file():
        raise ValueError(
            f"demo corpus module {name!r} has no .py source file (origin: {origin!r}); "
            "the demo corpus needs pure-Python standard-library modules"
        )
    return Path(origin)


def demo_documents(split: Literal["train", "heldout"]) -> list[Document]:
    """The demo corpus documents of one split, in the order of the module list.

    Args:
      split: ``"train"`` (:data:`TRAIN_MODULES`) or ``"heldout"`` (:data:`HELDOUT_MODULES`).

    Returns:
      ``Document(name=module name, text=source code)`` for each module.

    Raises:
      ValueError: unknown split, or a module has no readable ``.py`` source.
    """
    if split not in _SPLITS:
        raise ValueError(f"unknown demo split {split!r}; valid splits: {sorted(_SPLITS)}")
    documents = []
    for name in _SPLITS[split]:
        path = module_source_path(name)
        # Standard-library sources are UTF-8 (PEP 3120); strict decoding keeps it honest.
        documents.append(Document(name=name, text=path.read_bytes().decode("utf-8")))
    return documents


def demo_tokensets(
    seq_len: int,
    n_calibration_seqs: int,
    seed: int,
    *,
    n_heldout_seqs: int | None = None,
    n_validation_seqs: int = 0,
) -> tuple[TokenSet, ...]:
    """Calibration and held-out token sets of the demo corpus with the byte tokenizer.

    Calibration windows are drawn (seeded) from the :data:`TRAIN_MODULES` stream; the
    held-out set is consecutive windows of the :data:`HELDOUT_MODULES` stream (the two
    module lists are disjoint). Sources name the Python version the text came from.

    Args:
      seq_len: tokens (bytes) per sequence.
      n_calibration_seqs: number of calibration sequences.
      seed: seed of the calibration windows.
      n_heldout_seqs: number of held-out windows (from the start); None takes all
        (about 450,000 // seq_len).
      n_validation_seqs: > 0: also that many validation windows of the train stream
        disjoint from the calibration windows (:mod:`allocsearch.data.validation`).

    Returns:
      ``(calibration, heldout)`` token sets, and ``validation`` third when
      ``n_validation_seqs > 0``; tokenizer identity ``"bytes-utf8"``.
    """
    tokenizer = ByteTokenizer()
    version = f"Python {platform.python_version()} standard-library source"
    train = encode_documents(demo_documents("train"), tokenizer)
    calibration = calibration_tokenset(
        train,
        seq_len=seq_len,
        n_seq=n_calibration_seqs,
        seed=seed,
        tokenizer_identity=tokenizer.identity,
        source=f"{version}, demo train split ({len(TRAIN_MODULES)} modules)",
    )
    heldout = heldout_tokenset(
        encode_documents(demo_documents("heldout"), tokenizer),
        seq_len=seq_len,
        n_seq=n_heldout_seqs,
        tokenizer_identity=tokenizer.identity,
        source=f"{version}, demo held-out split ({len(HELDOUT_MODULES)} modules)",
    )
    if not n_validation_seqs:
        return calibration, heldout
    validation = validation_tokenset(
        train,
        seq_len=seq_len,
        n_seq=n_validation_seqs,
        n_calibration_seqs=n_calibration_seqs,
        seed=seed,
        tokenizer_identity=tokenizer.identity,
        source=calibration.source,
    )
    return calibration, heldout, validation
