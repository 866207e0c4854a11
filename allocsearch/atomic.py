"""Atomic file writes: readers see the old file or the new one, never half of one.

Directories are written the same way: assembled under a temporary sibling
(:func:`temporary_sibling_dir`) and moved into place whole (:func:`commit_directory`).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

# the temporary siblings of this module: tempfile's ".<name>." + 8 random characters + ".tmp"
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")


def user_path(path: str | os.PathLike[str]) -> str:
    """``path`` with each temporary sibling in it (``.<name>.XXXXXXXX.tmp``, from
    :func:`atomic_write_bytes` or :func:`temporary_sibling_dir`) replaced by the ``<name>``
    it becomes: the path the user gave, for an error about writing there."""
    parts = [m.group("name") if (m := _TEMPORARY.fullmatch(p)) else p for p in Path(path).parts]
    return os.fspath(Path(*parts)) if parts else os.fspath(path)


def atomic_write_bytes(
    data: bytes, path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory.

    The temporary file is flushed, fsynced, given mode 0644 (``mkstemp`` makes 0600; what
    we write is meant to be shared), then moved into place: ``os.replace`` when
    ``overwrite``, otherwise a hard link that fails if ``path`` exists (atomic no-clobber;
    check-then-replace on filesystems without hard links). The directory is fsynced; the
    temporary file is removed on every way out, errors included.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False.
      FileNotFoundError, NotADirectoryError: see :func:`require_parent_directory`.
    """
    target = Path(path)
    parent = target.parent
    require_parent_directory(target)
    exists = f"{os.fspath(target)!r} exists; pass overwrite=True (--overwrite) to replace it"
    if not overwrite and target.exists():
        raise FileExistsError(exists)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), 0o644)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)
            except FileExistsError:
                raise FileExistsError(exists) from None
            except OSError:
                if target.exists():
                    raise FileExistsError(exists) from None
                os.replace(tmp, target)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    _fsync_dir(parent)
    return target


def refuse_file_above(target: Path) -> None:
    """NotADirectoryError when the nearest existing parent of ``target`` is a file."""
    above = next((p for p in target.parents if os.path.lexists(p)), None)
    if above is not None and not above.is_dir():
        raise NotADirectoryError(
            f"{os.fspath(above)!r} is a file, expected a directory (to hold {os.fspath(target)!r})"
        )


def require_parent_directory(path: str | os.PathLike[str]) -> None:
    """Check that the directory ``path`` is to be written into exists and is a directory.

    Raises:
      NotADirectoryError: the parent (or the nearest existing one above it) is a file.
      FileNotFoundError: the parent directory does not exist.
    """
    target = Path(path)
    refuse_file_above(target)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"directory {os.fspath(target.parent)!r} does not exist")


def atomic_write_text(text: str, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """:func:`atomic_write_bytes` of UTF-8 ``text`` (newlines written as ``\\n``)."""
    return atomic_write_bytes(text.encode("utf-8"), path, overwrite=overwrite)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_sibling_dir(path: str | os.PathLike[str]) -> Path:
    """A new empty directory beside ``path`` (``.<name>.XXXX.tmp``; the parents of ``path``
    are created) in which to assemble what :func:`commit_directory` moves to ``path``.

    Raises:
      NotADirectoryError: a parent of ``path`` is a file.
    """
    target = Path(path)
    refuse_file_above(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))


def commit_directory(tmp: Path, path: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """Move the finished directory ``tmp`` (from :func:`temporary_sibling_dir`) to ``path``.

    ``tmp`` gets the mode an ordinary new directory gets (``0777 & ~umask``; ``mkdtemp``
    made it 0700). An existing ``path`` is refused unless ``overwrite``; then it is moved
    aside first and deleted only after ``tmp`` took its place (a failed move puts it
    back), so ``path`` always holds the old directory or the new one.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False (``tmp`` is kept: the
        caller removes it).
    """
    target = Path(path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    if not target.exists():
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        return target
    if not overwrite:
        raise FileExistsError(f"{os.fspath(target)!r} exists; pass --overwrite to replace it")
    backup = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    os.replace(target, backup / "old")
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(backup / "old", target)  # a failed commit keeps the old directory
        os.rmdir(backup)
        raise
    shutil.rmtree(backup, ignore_errors=True)
    _fsync_dir(target.parent)
    return target
