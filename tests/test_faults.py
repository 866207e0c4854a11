"""Disk-full and permission faults while saving (issue #10).

Every writer either completes or leaves the directory it writes into exactly as it was:
the error propagates, no file or directory appears at the target, a file or directory that
was there before is byte-identical afterwards, and no temporary file is left behind.

Faults are injected at the lowest level the writers use from Python:

* ``write``: a filesystem with a few bytes free. Files opened for writing under the
  output directory (``open`` / ``io.open`` / ``Path.write_*`` / ``os.fdopen``) store the
  bytes that fit, then raise ``OSError(ENOSPC)``, as ``write(2)`` does on a full disk.
* ``commit``: the rename that moves a finished temporary file or directory onto the
  target (``os.replace`` / ``os.rename`` / ``os.link``) fails with ``ENOSPC``.
* ``permission``: the output directory is read-only, by ``chmod 0o500`` (skipped as root,
  whom permissions do not stop) and simulated (creating, renaming or removing an entry in
  it raises ``PermissionError(EACCES)``), so root runs the case too.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from resume_worker import BUDGET, SEED, AdditiveFactory, evo_searcher, tiny_spec
from test_cli import run
from test_error_catalogue import wide_console  # noqa: F401 (a fixture)
from test_exporters import GRID, _unit_spec
from test_recipe import structured_recipe, unstructured_recipe
from test_report import HISTORIES, PPL_TABLE, ROWS
from test_store import write_store
from test_supernet_build import BATCH, CFG, calib, grid, model  # noqa: F401 (fixtures)
from tiny_workspace import quiet_build

from allocsearch.atomic import atomic_write_bytes, atomic_write_text
from allocsearch.distributed.checkpoint import (
    SearchCheckpointer,
    complete_generations,
    latest_checkpoint,
    search_fingerprint,
)
from allocsearch.distributed.local import run_search
from allocsearch.distributed.progress import make_callbacks, read_log
from allocsearch.models import HFModel, adapter_for_config, save_model
from allocsearch.models.safetensors_io import write_safetensors
from allocsearch.pruners import MagnitudePruner
from allocsearch.recipe import (
    to_evopress,
    to_jaxpruner,
    to_llm_compressor,
    to_owl,
    to_torch_pruning,
    write_export,
)
from allocsearch.recipe.apply import write_pruned
from allocsearch.report import (
    plot_compare,
    plot_fitness_curves,
    plot_ppl_by_strategy,
    plot_sparsity_profile,
)
from allocsearch.supernet.store import SupernetStore

OLD_BYTES = b"the previous version, which must survive a failed write\n"


# ----------------------------------------------------------------------------- snapshots


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (relative, hidden ones included) -> its bytes, or None
    for a directory. Equal snapshots: nothing appeared, vanished or changed."""
    out: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = None if path.is_dir() else path.read_bytes()
    return out


def _inside(path: Any, root: Path) -> bool:
    """Whether ``path`` (str, bytes or PathLike; relative to the cwd) lies under ``root``."""
    if isinstance(path, int):  # a file descriptor: not a name in any directory
        return False
    p = Path(os.path.abspath(os.fsdecode(path)))
    return p == root or root in p.parents


def _fd_path(fd: int) -> str | None:
    """The path of an open file descriptor (Linux), or None where that is not known."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _writing(mode: str) -> bool:
    return any(c in mode for c in "wax+")


def _enospc(path: Any = None) -> OSError:
    if path is None:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fsdecode(path))


# ----------------------------------------------------------------------------- faults


class _FullDiskFile:
    """A file object of a full disk: writes what fits in ``disk.free``, then ENOSPC."""

    def __init__(self, raw: Any, disk: FullDisk):
        self._raw = raw
        self._disk = disk

    def write(self, data):
        disk = self._disk
        if len(data) <= disk.free:
            disk.free -= len(data)
            return self._raw.write(data)
        if disk.free:
            self._raw.write(data[: disk.free])  # write(2) stores what fits, then fails
            self._raw.flush()
        disk.free = 0
        disk.fired = True
        raise _enospc()

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __enter__(self) -> _FullDiskFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._raw.close()

    def __iter__(self):
        return iter(self._raw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class FullDisk:
    """A filesystem under ``root`` with ``free`` bytes left (see the module docstring)."""

    def __init__(self, root: Path, free: int):
        self.root = root.absolute()
        self.free = free
        self.fired = False

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_open, real_fdopen = builtins.open, os.fdopen

        def opener(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if _writing(mode) and _inside(file, self.root):
                return _FullDiskFile(f, self)
            return f

        def fdopener(fd, mode="r", *args, **kwargs):
            f = real_fdopen(fd, mode, *args, **kwargs)
            if _writing(mode) and _inside(_fd_path(fd) or self.root, self.root):
                return _FullDiskFile(f, self)
            return f

        monkeypatch.setattr(builtins, "open", opener)
        monkeypatch.setattr(io, "open", opener)  # pathlib's Path.open / write_text
        monkeypatch.setattr(os, "fdopen", fdopener)


class FailingCommit:
    """Moving new content onto ``target`` (``os.replace`` / ``os.rename`` / ``os.link``)
    fails with ENOSPC, every time; moving the target's old content back (a writer
    restoring what it had set aside) and every other rename work."""

    def __init__(self, target: Path):
        self.target = target.absolute()
        self.fired = False
        self._old = self._inode(self.target)

    @staticmethod
    def _inode(path: Any) -> int | None:
        try:
            return os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            return None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in ("replace", "rename", "link"):
            real = getattr(os, name)

            def renamer(src, dst, *args, _real=real, **kwargs):
                onto_target = Path(os.path.abspath(os.fsdecode(dst))) == self.target
                if onto_target and (self._old is None or self._inode(src) != self._old):
                    self.fired = True
                    raise _enospc(dst)
                return _real(src, dst, *args, **kwargs)

            monkeypatch.setattr(os, name, renamer)


class ReadOnlyDir:
    """``directory`` behaves as if mode 0o500 for a user other than root: creating,
    renaming or removing an entry in it (or below it) raises PermissionError(EACCES)."""

    _CREATE = os.O_CREAT | os.O_WRONLY | os.O_RDWR | os.O_TRUNC

    def __init__(self, directory: Path):
        self.directory = directory.absolute()
        self.fired = False

    def _check(self, *paths: Any, dir_fd: Any = None) -> None:
        if dir_fd is not None:
            return  # relative to an open directory (shutil.rmtree): not ours to judge
        for p in paths:
            if (
                _inside(p, self.directory)
                and Path(os.path.abspath(os.fsdecode(p))) != self.directory
            ):
                self.fired = True
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(p))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_open = builtins.open
        real_os_open = os.open

        def opener(file, mode="r", *args, **kwargs):
            if _writing(mode):
                self._check(file)
            return real_open(file, mode, *args, **kwargs)

        def os_opener(path, flags, *args, dir_fd=None, **kwargs):
            if flags & self._CREATE:
                self._check(path, dir_fd=dir_fd)
            return real_os_open(path, flags, *args, dir_fd=dir_fd, **kwargs)

        monkeypatch.setattr(builtins, "open", opener)
        monkeypatch.setattr(io, "open", opener)
        monkeypatch.setattr(os, "open", os_opener)
        for name in ("mkdir", "unlink", "remove", "rmdir"):
            real = getattr(os, name)

            def one(path, *args, _real=real, dir_fd=None, **kwargs):
                self._check(path, dir_fd=dir_fd)
                return _real(path, *args, dir_fd=dir_fd, **kwargs)

            monkeypatch.setattr(os, name, one)
        for name in ("replace", "rename", "link"):
            real = getattr(os, name)

            def two(src, dst, *args, _real=real, **kwargs):
                self._check(src, dst)
                return _real(src, dst, *args, **kwargs)

            monkeypatch.setattr(os, name, two)


@contextlib.contextmanager
def chmod_read_only(directory: Path) -> Iterator[None]:
    """The real thing: ``chmod 0o500`` (restored afterwards so pytest can clean up)."""
    mode = stat.S_IMODE(directory.stat().st_mode)
    directory.chmod(0o500)
    try:
        yield
    finally:
        directory.chmod(mode)


# ----------------------------------------------------------------------------- writers


@dataclass(frozen=True)
class Writer:
    """A way to write ``target``: ``write(target, overwrite)``.

    Attributes:
      kind: ``"file"`` or ``"dir"``, what the writer puts at the target.
      mid: free bytes that run out in the middle of the write (a partial file on disk).
    """

    name: str
    write: Callable[[Path, bool], object]
    kind: str
    mid: int


@cache
def _tiny_model() -> HFModel:
    """The 2-block Llama of test_supernet_build (hidden 16), weights 0.01 * index."""
    adapter = adapter_for_config(CFG)
    params = {
        name: np.arange(np.prod(shape), dtype=np.float32).reshape(shape) * 0.01
        for name, shape in adapter.param_shapes.items()
    }
    return HFModel(adapter, params)


def _export_text(fmt: str) -> str:
    r = unstructured_recipe()
    if fmt == "llm-compressor":
        return to_llm_compressor(r).content
    if fmt == "evopress":
        choice = np.array([GRID.index(x.sparsity) for x in r.layers], dtype=np.int32)
        return to_evopress(r, _unit_spec(r), choice).content
    if fmt == "owl":
        content = to_owl(r).content
    elif fmt == "torch-pruning":
        content = to_torch_pruning(structured_recipe()).content
    else:
        content = to_jaxpruner(r).content
    if isinstance(content, dict):  # as `allocsearch export` serialises dict / list content
        content = {str(k): v for k, v in content.items()}
    return json.dumps(content, indent=2) + "\n"


def _exporter(fmt: str) -> Writer:
    text = _export_text(fmt)
    return Writer(
        f"export-{fmt}", lambda t, o: write_export(text, t, overwrite=o), "file", len(text) // 2
    )


FILE_WRITERS = [
    Writer(
        "atomic_write_bytes",
        lambda t, o: atomic_write_bytes(bytes(range(256)) * 8, t, overwrite=o),
        "file",
        1000,
    ),
    Writer(
        "atomic_write_text",
        lambda t, o: atomic_write_text("écrit en entier ou pas du tout\n" * 40, t, overwrite=o),
        "file",
        500,
    ),
    Writer("Recipe.save", lambda t, o: unstructured_recipe().save(t, overwrite=o), "file", 1000),
    *(
        _exporter(fmt)
        for fmt in ("llm-compressor", "evopress", "owl", "torch-pruning", "jaxpruner")
    ),
    Writer(
        "write_safetensors",  # overwrites by design: the building block of the two below
        lambda t, o: write_safetensors(t, {"w": np.arange(300, dtype=np.float32)}),
        "file",
        600,
    ),
]
DIR_WRITERS = [
    Writer("save_model", lambda t, o: save_model(_tiny_model(), t, overwrite=o), "dir", 20_000),
    Writer(
        "save_model-sharded",
        lambda t, o: save_model(_tiny_model(), t, overwrite=o, max_shard_bytes=4000),
        "dir",
        20_000,
    ),
    Writer(
        "write_pruned",
        lambda t, o: write_pruned(_tiny_model(), t, dtype="bfloat16", overwrite=o),
        "dir",
        5_000,
    ),
]
PLOT_WRITERS = [
    Writer(
        "plot_sparsity_profile",
        lambda t, o: plot_sparsity_profile(unstructured_recipe(), t, overwrite=o),
        "file",
        2000,
    ),
    Writer(
        "plot_fitness_curves",
        lambda t, o: plot_fitness_curves(HISTORIES, t, metric_name="KL", overwrite=o),
        "file",
        2000,
    ),
    Writer("plot_compare", lambda t, o: plot_compare(ROWS, t, overwrite=o), "file", 2000),
    Writer(
        "plot_ppl_by_strategy",
        lambda t, o: plot_ppl_by_strategy(PPL_TABLE, t, overwrite=o),
        "file",
        2000,
    ),
]


def _target(writer: Writer, directory: Path) -> Path:
    return directory / (f"{writer.name}.png" if writer in PLOT_WRITERS else writer.name)


def _put_old(writer: Writer, target: Path, old: bytes) -> None:
    if writer.kind == "file":
        target.write_bytes(old)
    else:
        target.mkdir()
        (target / "config.json").write_bytes(old)


def _run_fault(
    writer: Writer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    fault: str,
    existing: bool,
    old: bytes = OLD_BYTES,
) -> BaseException:
    """Write ``writer``'s target in ``tmp_path/out`` under ``fault`` (over an old version
    holding ``old`` if ``existing``); check the directory is unchanged; return the error."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "neighbour.txt").write_bytes(b"unrelated file\n")
    target = _target(writer, out)
    if existing:
        _put_old(writer, target, old)
    before = snapshot(out)
    with pytest.raises(OSError) as info, injected(fault, monkeypatch, out, target, writer.mid):
        writer.write(target, existing)
    assert snapshot(out) == before
    return info.value


FAULTS = ["write-nothing-free", "write-mid", "commit", "permission", "chmod"]


@contextlib.contextmanager
def injected(
    fault: str, monkeypatch: pytest.MonkeyPatch, directory: Path, target: Path, mid: int
) -> Iterator[None]:
    """``fault`` (one of :data:`FAULTS`) for writes of ``target`` into ``directory``;
    ``mid``: free bytes of the ``write-mid`` fault. Checks that the fault was hit."""
    if fault == "chmod":
        with chmod_read_only(directory):
            yield
        return
    injection = {
        "write-nothing-free": lambda: FullDisk(directory, 0),
        "write-mid": lambda: FullDisk(directory, mid),
        "commit": lambda: FailingCommit(target),
        "permission": lambda: ReadOnlyDir(directory),
    }[fault]()
    with monkeypatch.context() as m:
        injection.install(m)
        try:
            yield
        finally:
            assert injection.fired, f"the {fault} fault was never hit"


@cache
def _permissions_enforced() -> bool:
    """Whether a chmod 0o500 directory refuses new files here: not for root (which
    ignores permissions unless it lacks CAP_DAC_OVERRIDE) nor on some filesystems."""
    probe = Path(tempfile.mkdtemp())
    try:
        with chmod_read_only(probe):
            try:
                (probe / "x").touch()
            except PermissionError:
                return True
        return False
    finally:
        shutil.rmtree(probe)


def _skip_chmod_if_not_enforced(fault: str) -> None:
    if fault == "chmod" and not _permissions_enforced():
        pytest.skip("permissions not enforced (root); the simulated 'permission' case runs")


def _check_error(error: BaseException, fault: str) -> None:
    if fault in ("permission", "chmod"):
        assert isinstance(error, PermissionError)
    else:
        assert error.errno == errno.ENOSPC


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replace"])
@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("writer", FILE_WRITERS + DIR_WRITERS, ids=lambda w: w.name)
def test_failed_write_leaves_the_directory_as_it_was(
    writer, fault, existing, tmp_path, monkeypatch
):
    _skip_chmod_if_not_enforced(fault)
    error = _run_fault(writer, tmp_path, monkeypatch, fault=fault, existing=existing)
    _check_error(error, fault)


@pytest.mark.parametrize("fault", ["write-mid", "commit", "permission", "chmod"])
@pytest.mark.parametrize("writer", PLOT_WRITERS, ids=lambda w: w.name)
def test_failed_plot_leaves_the_directory_as_it_was(writer, fault, tmp_path, monkeypatch):
    # Drawing is the slow part; replacing an old file exercises every branch new files do.
    _skip_chmod_if_not_enforced(fault)
    error = _run_fault(writer, tmp_path, monkeypatch, fault=fault, existing=True)
    _check_error(error, fault)


def test_writers_work_without_faults(tmp_path):
    """The baseline the fault tests compare against: each writer writes its target, more
    bytes than its ``mid`` (so a ``write-mid`` fault lands inside the write)."""
    for writer in FILE_WRITERS + DIR_WRITERS + PLOT_WRITERS:
        target = _target(writer, tmp_path)
        writer.write(target, False)
        size = (
            target.stat().st_size
            if writer.kind == "file"
            else sum(p.stat().st_size for p in target.iterdir())
        )
        assert size > writer.mid, writer.name
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- supernets


@pytest.fixture(scope="module")
def store_layers() -> dict:
    """Two magnitude-pruned 16 x 24 layers at 0, 25, 50, 75 % (one rank array each)."""
    rng = np.random.default_rng(0)
    levels = np.array([0.0, 0.25, 0.5, 0.75])
    out = {}
    for name in ("a.q.weight", "a.k.weight"):
        w = rng.standard_normal((16, 24)).astype(np.float32)
        out[name] = (w, MagnitudePruner().prune(w, None, levels))
    return out


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replace"])
@pytest.mark.parametrize("fault", FAULTS)
def test_failed_store_write_leaves_the_directory_as_it_was(
    store_layers, fault, existing, tmp_path, monkeypatch
):
    _skip_chmod_if_not_enforced(fault)
    writer = Writer("store", lambda t, o: write_store(t, store_layers, overwrite=o), "dir", 1500)
    error = _run_fault(writer, tmp_path, monkeypatch, fault=fault, existing=existing)
    _check_error(error, fault)


@pytest.mark.parametrize(
    "fault, existing",
    # the commit itself is StoreWriter's, tested above; building is the slow part
    [("write-mid", True), ("permission", False), ("chmod", False)],
)
def test_failed_supernet_build_leaves_the_directory_as_it_was(
    model,  # noqa: F811 (fixtures imported from test_supernet_build)
    calib,  # noqa: F811
    grid,  # noqa: F811
    fault,
    existing,
    tmp_path,
    monkeypatch,
):
    _skip_chmod_if_not_enforced(fault)

    def build(target: Path, overwrite: bool) -> SupernetStore:
        return quiet_build(
            model,
            calib,
            target,
            pruner=MagnitudePruner(),
            grid=grid,
            batch_size=BATCH,
            overwrite=overwrite,
        )

    # 14 layers x 5 levels; the disk fills up during the first block's variants
    writer = Writer("supernet", build, "dir", 4000)
    error = _run_fault(writer, tmp_path, monkeypatch, fault=fault, existing=existing)
    _check_error(error, fault)


# ----------------------------------------------------------------------------- checkpoints


@cache
def _search_states() -> tuple:
    """States after generations 1 and 2 of the tiny EvoPress search of resume_worker."""
    searcher, spec, key = evo_searcher(2), tiny_spec(), jax.random.key(SEED)
    states: list = []
    run_search(searcher, AdditiveFactory()(), spec, BUDGET, key=key, on_generation=states.append)
    fingerprint = search_fingerprint(searcher=searcher, spec=spec, budget=BUDGET, key=key)
    return searcher, fingerprint, states


@pytest.mark.parametrize("fault", FAULTS)
def test_failed_checkpoint_save_keeps_the_last_checkpoint(fault, tmp_path, monkeypatch):
    _skip_chmod_if_not_enforced(fault)
    searcher, fingerprint, (first, second) = _search_states()
    ckpt = tmp_path / "ckpt"
    with SearchCheckpointer(ckpt, fingerprint=fingerprint) as checkpointer:
        checkpointer.save(first, searcher.result(first))
        before = snapshot(ckpt)
        with pytest.raises(OSError) as info, injected(fault, monkeypatch, ckpt, ckpt / "2", 100):
            checkpointer.save(second, searcher.result(second))
        _check_error(info.value, fault)
        assert snapshot(ckpt) == before
        assert checkpointer.last_generation == 1
    assert complete_generations(ckpt) == [1]
    assert latest_checkpoint(ckpt, fingerprint=fingerprint).generation == 1
    # the search goes on once the disk has room again
    with SearchCheckpointer(ckpt, fingerprint=fingerprint) as checkpointer:
        checkpointer.save(second, searcher.result(second))
    assert complete_generations(ckpt) == [1, 2]


@pytest.mark.parametrize("fault", FAULTS)
def test_failed_log_rewrite_on_resume_keeps_the_log(fault, tmp_path, monkeypatch):
    # A resume first cuts the progress log back to the checkpoint's generation.
    _skip_chmod_if_not_enforced(fault)
    searcher, _, (first, _second) = _search_states()
    records = [{"generation": g, "wall_s": 1.5 * g, "note": "x" * 80} for g in (1, 2, 3)]
    lines = "".join(json.dumps(r) + "\n" for r in records)

    def resume(target: Path, overwrite: bool) -> None:
        with make_callbacks(searcher, log_path=target, progress=False, start_state=first):
            pass

    writer = Writer("log.jsonl", resume, "file", 60)
    error = _run_fault(
        writer, tmp_path, monkeypatch, fault=fault, existing=True, old=lines.encode()
    )
    _check_error(error, fault)
    assert read_log(tmp_path / "out" / "log.jsonl") == records


# ----------------------------------------------------------------------------- command line


def _one_error_line(r, error: str, *values: str) -> None:
    assert r.exit_code == 2, (r.exit_code, r.exception)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {error}: "), r.stderr
    for value in values:
        assert value in lines[0], (value, lines[0])
    assert "Traceback" not in r.output


def test_cli_export_to_a_full_disk(tmp_path, monkeypatch, wide_console):  # noqa: F811
    recipe = unstructured_recipe().save(tmp_path / "recipe.json")
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(out)
    with monkeypatch.context() as m:
        FullDisk(out, 0).install(m)
        r = run("export", recipe, "--format", "owl", "--out", out / "owl.json")
    assert snapshot(out) == before
    _one_error_line(r, "OSError", "No space left on device", str(out / "owl.json"))


def test_cli_export_into_a_read_only_directory(tmp_path, monkeypatch, wide_console):  # noqa: F811
    recipe = unstructured_recipe().save(tmp_path / "recipe.json")
    locked = tmp_path / "locked"
    locked.mkdir()
    with monkeypatch.context() as m:
        ReadOnlyDir(locked).install(m)
        r = run("export", recipe, "--format", "owl", "--out", locked / "owl.json")
    assert os.listdir(locked) == []
    _one_error_line(r, "PermissionError", "Permission denied", str(locked))
