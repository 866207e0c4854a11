"""What every command shares: the typer app, the consoles, user errors (one line, exit 2),
output directories, and the config a command's options override."""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from allocsearch.cli.options import backend_overrides, data_overrides, heldout_overrides
from allocsearch.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    load_config,
)
from allocsearch.search import registry

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Search per-layer sparsity allocations for pruning under a global budget.",
)
console = Console(stderr=True)
out_console = Console()

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error in what the user asked for (printed without a traceback)."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from allocsearch.distributed.ray_backend import WorkerFailedError, WorkerStartError
    from allocsearch.models.safetensors_io import SafetensorsError

    return (
        UserError,
        WorkerStartError,
        WorkerFailedError,
        ConfigError,
        ValueError,
        FileExistsError,
        FileNotFoundError,
        NotADirectoryError,
        KeyError,
        SafetensorsError,
    )


def _print_error(e: BaseException, msg: str) -> None:
    """One line, verbatim: no markup parsing of the message, no wrapping at 80 columns."""
    console.print(
        f"[bold red]error:[/] {type(e).__name__}: {escape(msg)}", highlight=False, soft_wrap=True
    )


def handle_errors(fn):
    """Turn user errors into a one-line message and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _CREATED_DIRS.clear()
        try:
            return fn(*args, **kwargs)
        except BaseException:
            _remove_empty_created_dirs()
            raise

    @functools.wraps(fn)
    def reporting(*args, **kwargs):
        try:
            return wrapper(*args, **kwargs)
        except KeyboardInterrupt:
            console.print("[red]interrupted[/]")
            raise typer.Exit(130) from None
        except _user_errors() as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            _print_error(e, msg)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except OSError as e:  # disk full, permission denied: the machine, not a bug
            out = kwargs.get("out")
            _print_error(e, _os_error_message(e, out))
            raise typer.Exit(EXIT_USER_ERROR) from None

    return reporting


def _os_error_message(e: OSError, out: Path | None) -> str:
    """``e``'s message naming the path the user gave (``--out``), not the hidden temporary
    file or directory the write went through."""
    if not e.filename:
        return str(e) if out is None else f"{e} (writing {out})"
    from allocsearch.atomic import user_path

    shown = user_path(e.filename)
    if shown == os.fspath(e.filename):
        return str(e)
    return f"[Errno {e.errno}] {e.strerror}: {shown!r}"


# Output directories the running command created: a command that fails removes those
# still empty, so a failed run leaves nothing behind (a partial run keeps its files).
_CREATED_DIRS: list[Path] = []


def _remove_empty_created_dirs() -> None:
    for path in reversed(_CREATED_DIRS):
        try:
            path.rmdir()  # only succeeds when empty
        except OSError:
            pass
    _CREATED_DIRS.clear()


# Config keys the command line sets, and the option that sets each (named in errors).
_OPTION_OF_KEY = {
    "model": "--model",
    "data.calibration": "--calibration",
    "data.seq_len": "--seq-len",
    "data.n_calibration_seqs": "--calibration-seqs",
    "data.heldout": "--heldout",
    "data.n_heldout_seqs": "--heldout-seqs",
    "evaluator.metric": "--metric",
    "search.budget_kind": "--budget",
    "evaluator.micro_batch_tokens": "--micro-batch-tokens",
    "supernet.steps_each_side": "--steps-each-side",
    "supernet.storage_dtype": "--storage-dtype",
    "evaluator.execution": "--execution",
    "evaluator.stream_unit": "--stream-unit",
    "backend.replace_timeout_s": "--replace-timeout",
}
_data, _heldout, _backend = data_overrides, heldout_overrides, backend_overrides


def _config(path: Path | None, **overrides) -> RunConfig:
    cfg = load_config(path) if path else config_from_dict({})
    data = cfg.to_dict()
    given = set()
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition("__")
        if key:
            data[section][key] = value
        else:
            data[section] = value
        given.add(f"{section}.{key}" if key else section)
    data["supernet"]["nm_patterns"] = list(data["supernet"]["nm_patterns"])
    try:
        return config_from_dict(data)
    except ConfigError as e:
        for key in given & set(_OPTION_OF_KEY):
            if str(e).startswith(f"{key} ="):
                raise ConfigError(f"{_OPTION_OF_KEY[key]}: {e}") from None
        raise


def _with_generations(cfg: RunConfig, generations: int | None) -> RunConfig:
    """``cfg`` whose search settings run ``generations`` EvoPress generations (the
    strategy's default settings otherwise kept)."""
    if generations is None:
        return cfg
    import dataclasses

    from allocsearch.search_run import default_settings

    if not registry.get(cfg.search.strategy).runs_evopress:
        raise UserError(
            f"--generations sets EvoPress generations, which strategy "
            f"{cfg.search.strategy!r} does not run; use it with {_evopress_names()}"
        )
    settings = {**default_settings(cfg), "generations": generations}
    return dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, settings=settings))


def _evopress_names() -> str:
    """``"evopress, tyr or dp+evopress"``: the strategies that run EvoPress."""
    names = [s.name for s in registry.STRATEGIES.values() if s.runs_evopress]
    return f"{', '.join(names[:-1])} or {names[-1]}"


def _check_generations(generations: int | None) -> None:
    if generations is not None and generations < 1:
        raise UserError(f"--generations must be an integer >= 1, got {generations}")


def _default_target(target: float | None, config: Path | None, supernet: Path) -> float | None:
    """``--target`` if given, else the config's ``search.target`` if it sets one, else the
    supernet's own target: the parameter-weighted sparsity of its centre levels (what a
    uniform allocation on it removes), not a silent default."""
    if target is not None:
        return target
    import numpy as np

    if _config_sets_target(config):
        return None
    from allocsearch.supernet.store import SupernetStore

    spec = SupernetStore.open(supernet, verify="none").spec
    centre = spec.sparsity[np.arange(spec.num_units), spec.center]
    numel = spec.numel.astype(np.float64)
    # down to 4 decimals: what the centre removes at least (0.7000009 is "0.7"; rounding
    # to nearest made it 0.700001, a target the uniform allocation does not reach)
    value = math.floor(float(np.dot(centre, numel) / numel.sum()) * 1e4 + 1e-9) / 1e4
    out_console.print(f"target {value:g}: the supernet's centre (--target to change)")
    return value


def _sublayer_target(
    target: float | None, config: Path | None, supernet: Path, *, tie_blocks: bool
) -> float | None:
    """The ``search.target`` of a ``--budget sublayers`` search: ``--target k`` (a whole
    number of sublayers) as ``k / n`` of the supernet's ``n`` sublayers, a ``--target``
    below 1 as given (a fraction of them, taken down to whole sublayers), else None when the
    config sets ``search.target``.

    Raises:
      UserError: no target, a count that is not a whole number in 1..n-1 (1..n-2 with
        ``--tie-blocks``: dropping every sublayer leaves one allocation, nothing to search),
        or an odd count with ``--tie-blocks``. ValueError: the supernet has no dropped level
        (the message names how to build one)."""
    if target is None:
        if _config_sets_target(config):
            return None
        raise UserError(
            "--budget sublayers needs --target: the number of sublayers to drop (e.g. "
            "--target 2), or a fraction of them below 1"
        )
    from allocsearch.supernet.depth import sublayers_per_unit
    from allocsearch.supernet.store import SupernetStore

    n = int(sublayers_per_unit(SupernetStore.open(supernet, verify="none").spec).sum())
    if target < 1:
        return target
    most = n - 2 if tie_blocks else n - 1  # dropping all leaves one allocation: no search
    if target != int(target) or not 1 <= target <= most:
        raise UserError(
            f"--target {target:g} with --budget sublayers is the number of sublayers to drop: "
            f"a whole number from 1 to {most} (this supernet has {n} sublayers; dropping all "
            f"of them leaves nothing to search), or a fraction below 1"
        )
    if tie_blocks and int(target) % 2:
        raise UserError(
            f"--tie-blocks drops whole blocks of 2 sublayers: --target {int(target)} sublayers "
            f"is not a whole number of blocks; use an even --target"
        )
    out_console.print(f"target: drop {int(target)} of {n} sublayers")
    return int(target) / n


def _bits_target(target: float) -> float:
    """``--budget bits --target B`` (B average bits per weight) as the budget's fraction
    of the 16-bit cost removed, ``1 - B / 16``."""
    from allocsearch.search.budget import average_bits_to_target

    try:
        value = average_bits_to_target(target)
    except ValueError as e:
        raise UserError(f"--target {target:g} with --budget bits: {e}") from None
    out_console.print(f"target: {target:g} bits per weight on average")
    return value


def _config_sets_target(config: Path | None) -> bool:
    """Whether the config file sets ``search.target``."""
    import yaml

    if config is None:
        return False
    raw = yaml.safe_load(Path(config).read_text()) or {}
    return isinstance(raw, dict) and "target" in (raw.get("search") or {})


def _refuse_tie_blocks(cfg: RunConfig, command: str) -> None:
    if cfg.search.tie_blocks:
        raise UserError(
            f"search.tie_blocks (whole blocks as units) is for `allocsearch search`; "
            f"`{command}` searches the supernet's own sublayer units: set it to false"
        )


def _check_memory(cfg: RunConfig, command: str, supernet: Path | None = None) -> None:
    """Refuse, before anything loads, a run the memory plan finds cannot fit this machine
    (``MemoryPlanError``: one line, exit 2; see ``allocsearch plan``)."""
    from allocsearch.plan import check_run

    check_run(cfg, command, store=supernet)


def _refuse_existing(path: Path, overwrite: bool) -> None:
    """An output directory that holds files is refused (before any work) without
    ``--overwrite``; one that is a file (or lies under one) always."""
    from allocsearch.atomic import refuse_file_above

    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{str(path)!r} is a file, expected a directory")
    refuse_file_above(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass --overwrite to reuse it")


def _fresh_dir(path: Path, overwrite: bool) -> Path:
    _refuse_existing(path, overwrite)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    _CREATED_DIRS.extend(reversed(missing))  # outermost first
    return path
