"""The ``allocsearch`` command line: demo, build, search, compare, sweep, export, apply, eval.

User errors (bad configs, files, budgets, recipes, stores) print one clear message and
exit with status 2, without a traceback; outputs are written atomically and existing
ones are refused unless ``--overwrite``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from allocsearch.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    load_config,
)
from allocsearch.console_progress import heartbeat
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


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="YAML run config (see configs/); default: the demo settings."
    ),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace existing outputs instead of refusing (default: refuse existing outputs).",
    ),
]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
BackendOpt = Annotated[
    str | None,
    typer.Option(
        help="ray (Ray actors) | local (in process, no Ray) (default: the config's "
        "backend.kind, else ray)."
    ),
]
WorkersOpt = Annotated[
    str | None,
    typer.Option(
        help="Ray actors: an integer, or auto (one per CPU core; on a cluster with GPUs, "
        "one per GPU) (default: the config's backend.workers, else auto)."
    ),
]
StorageDtypeOpt = Annotated[
    str | None,
    typer.Option(
        help="Dense variants' storage: auto (the model's dtype) | float32 | bfloat16 "
        "(default: the config's supernet.storage_dtype, else auto)."
    ),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        help="Model directory or 'demo'; overrides the config's `model` (default: the config's "
        "model, else demo)."
    ),
]
CalibrationOpt = Annotated[
    str | None,
    typer.Option(
        help="Calibration text: demo, a text file, a directory, a glob or a .jsonl file "
        "(default: the config's data.calibration, else demo)."
    ),
]
SeqLenOpt = Annotated[
    int | None,
    typer.Option(
        help="Tokens per calibration and held-out sequence (default: the config's "
        "data.seq_len, else 128)."
    ),
]
CalibrationSeqsOpt = Annotated[
    int | None,
    typer.Option(
        help="Calibration sequences; calibration tokens = this x --seq-len (default: the "
        "config's data.n_calibration_seqs, else 64; 256 for encoders)."
    ),
]
MetricOpt = Annotated[
    str | None,
    typer.Option(
        help="Fitness metric: causal LMs kl | topk_kl | nll; encoders embedding_cosine | "
        "hidden_nmse (default: the config's evaluator.metric, else kl)."
    ),
]
HeldoutOpt = Annotated[
    str | None,
    typer.Option(
        help="Held-out text (forms as --calibration) (default: the config's data.heldout, "
        "else the demo's held-out split, or the last --heldout-seqs sequences of the "
        "calibration text)."
    ),
]
HeldoutSeqsOpt = Annotated[
    int | None,
    typer.Option(help="Held-out sequences (default: the config's data.n_heldout_seqs, else 64)."),
]
GenerationsOpt = Annotated[
    int | None,
    typer.Option(
        help="EvoPress generations (evopress, dp+evopress and tyr's inner search) (default: "
        "the config's search.settings, else 30)."
    ),
]
AddressOpt = Annotated[
    str | None,
    typer.Option(help="Existing Ray cluster (or RAY_ADDRESS); default: a local Ray instance."),
]
MicroBatchOpt = Annotated[
    int | None,
    typer.Option(
        help="Tokens per scoring call (whole sequences, at least one): smaller uses less "
        "activation memory, same scores (default: the config's evaluator.micro_batch_tokens, "
        "else 8192)."
    ),
]
ReplaceTimeoutOpt = Annotated[
    float | None,
    typer.Option(
        help="Seconds a dead Ray actor's replacement may take to be placed and started before "
        "its slot is given up (default: the config's backend.replace_timeout_s, else 60)."
    ),
]
StepsEachSideOpt = Annotated[
    int | None,
    typer.Option(
        help="Levels on each side of the grid's centre (2 x this + 1 levels) (default: the "
        "config's supernet.steps_each_side, else 4)."
    ),
]

TargetOpt = Annotated[
    float | None,
    typer.Option(
        help="Fraction of the budget to remove (default: the config's search.target if it "
        "sets one, else the supernet's centre: what a uniform allocation on it removes)."
    ),
]

SearchTargetOpt = Annotated[
    float | None,
    typer.Option(
        help="Fraction of the budget to remove; with --budget sublayers, the number of "
        "sublayers to drop (a whole number; a value below 1 is a fraction of them, as "
        "EvoPress's --sparsity) (default: the config's search.target if it sets one, else "
        "the supernet's centre: what a uniform allocation on it removes)."
    ),
]
BudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--budget",
        help="params | flops | latency (a measured table: search.latency_table) | "
        "sublayers (depth supernets: drop --target of the attention / MLP sublayers, "
        "EvoPress's 'drop k of L') (default: the config's search.budget_kind, else params).",
    ),
]
TieBlocksOpt = Annotated[
    bool | None,
    typer.Option(
        "--tie-blocks/--no-tie-blocks",
        help="Search whole blocks (attention and MLP dropped together) on a depth 'drop' "
        "supernet; the recipe lists both sublayers of each block (default: the config's "
        "search.tie_blocks, else off).",
    ),
]


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
    "backend.replace_timeout_s": "--replace-timeout",
}


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


def _data(calibration: str | None, seq_len: int | None, calibration_seqs: int | None) -> dict:
    """Config overrides of the calibration options."""
    return {
        "data__calibration": calibration,
        "data__seq_len": seq_len,
        "data__n_calibration_seqs": calibration_seqs,
    }


def _heldout(heldout: str | None, heldout_seqs: int | None, metric: str | None = None) -> dict:
    """Config overrides of the held-out and metric options."""
    return {
        "data__heldout": heldout,
        "data__n_heldout_seqs": heldout_seqs,
        "evaluator__metric": metric,
    }


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


def _backend(
    backend: str | None,
    workers: str | None,
    address: str | None,
    replace_timeout: float | None = None,
) -> dict:
    """Config overrides of the backend options (``--workers`` parsed: an integer or a word,
    which the config validates)."""
    count: int | str | None = workers
    if workers is not None:
        try:
            count = int(workers)
        except ValueError:
            count = workers.strip()
    return {
        "backend__kind": backend,
        "backend__workers": count,
        "backend__address": address or os.environ.get("RAY_ADDRESS"),
        "backend__replace_timeout_s": replace_timeout,
    }


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


@app.command()
@handle_errors
def demo(
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("runs/demo"),
    target: Annotated[float, typer.Option(help="Fraction of the weights to remove.")] = 0.7,
    generations: Annotated[int, typer.Option(help="EvoPress generations.")] = 30,
    strategies: Annotated[
        str,
        typer.Option(
            help="Comma-separated strategies to compare; the last one's allocation is the "
            f"recipe (any of: {registry.help_names(', ')})."
        ),
    ] = "uniform,owl,evopress",
    seed: Annotated[int, typer.Option(help="Seed of the search.")] = 0,
    backend: Annotated[
        str,
        typer.Option(
            help="local (in process; the demo's default, see docs/cluster.md) | ray (Ray "
            "actors prune the supernet's layers and score EvoPress's candidates)."
        ),
    ] = "local",
    workers: WorkersOpt = None,
    storage_dtype: StorageDtypeOpt = None,
    micro_batch_tokens: MicroBatchOpt = None,
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """The whole pipeline on the bundled demo model: supernet (SparseGPT, 9 levels), EvoPress
    search, recipe, plots, and a table against uniform and OWL."""
    from allocsearch.demo import run_demo

    _check_generations(generations)
    cfg = _config(
        None,
        search__target=target,
        supernet__center=target,
        search__seed=seed,
        supernet__storage_dtype=storage_dtype,
        evaluator__micro_batch_tokens=micro_batch_tokens,
        **_backend(backend, workers, None),
    )
    names = [s.strip() for s in strategies.split(",") if s.strip()]
    bad = [s for s in names if s not in registry.STRATEGIES]
    if bad or not names:
        raise UserError(
            f"--strategies {strategies!r}: unknown {bad}; valid: {registry.help_names(', ')}"
        )
    run_demo(
        cfg,
        _fresh_dir(out, overwrite),
        generations=generations,
        progress=progress,
        console=out_console,
        strategies=names,
    )


@app.command()
@handle_errors
def build(
    out: Annotated[Path, typer.Option("--out", "-o", help="Supernet store directory.")],
    config: ConfigOpt = None,
    model: ModelOpt = None,
    pruner: Annotated[
        str | None,
        typer.Option(
            help="magnitude | wanda | sparsegpt (default: the config's supernet.pruner, else "
            "sparsegpt)."
        ),
    ] = None,
    structure: Annotated[
        str | None,
        typer.Option(
            help="unstructured | nm | heads_neurons (default: the config's supernet.structure, "
            "else unstructured)."
        ),
    ] = None,
    center: Annotated[
        float | None,
        typer.Option(
            help="Centre sparsity of the grid (default: the config's supernet.center, else 0.6)."
        ),
    ] = None,
    input_mode: Annotated[
        str | None,
        typer.Option(
            help="dense | expected | centre (default: the config's supernet.input_mode, else "
            "dense)."
        ),
    ] = None,
    depth: Annotated[
        str | None,
        typer.Option(
            help="none | sublayers (levels + dropped) | drop (dense or dropped) (default: the "
            "config's supernet.depth, else none)."
        ),
    ] = None,
    expert_removal: Annotated[
        bool | None,
        typer.Option(
            "--expert-removal/--no-expert-removal",
            help="Mixture-of-experts models: one unit per expert (gate, up, down) with a last "
            "'removed' level (router logit masked; the top_k most routed experts of each "
            "block keep theirs) (default: the config's supernet.expert_removal, else off).",
        ),
    ] = None,
    prune_router: Annotated[
        bool | None,
        typer.Option(
            "--prune-router/--no-prune-router",
            help="Mixture-of-experts models: each block's router linear is a unit too "
            "(default: the config's supernet.prune_router, else off).",
        ),
    ] = None,
    storage_dtype: StorageDtypeOpt = None,
    steps_each_side: StepsEachSideOpt = None,
    calibration: CalibrationOpt = None,
    seq_len: SeqLenOpt = None,
    calibration_seqs: CalibrationSeqsOpt = None,
    heldout: HeldoutOpt = None,
    heldout_seqs: HeldoutSeqsOpt = None,
    backend: BackendOpt = None,
    workers: WorkersOpt = None,
    address: AddressOpt = None,
    replace_timeout: ReplaceTimeoutOpt = None,
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
    quantizer: Annotated[
        str | None,
        typer.Option(
            help="rtn | gptq: quantized levels (--bits) instead of pruned ones, in process, "
            "dequantized float32 weights in the store; the spec's level fraction is "
            "1 - bits per weight / 16, so a params budget is an average-bits budget "
            "(default: none, prune)."
        ),
    ] = None,
    bits: Annotated[
        str, typer.Option(help="Bitwidths of a quantized supernet, comma-separated (2..8).")
    ] = "2,3,4,8",
    group_size: Annotated[
        int, typer.Option(help="Input columns per quantization scale (--quantizer).")
    ] = 128,
    symmetric: Annotated[
        bool,
        typer.Option(
            "--symmetric/--asymmetric", help="Scale only, or scale and zero point (--quantizer)."
        ),
    ] = True,
) -> None:
    """Build a supernet: every prunable layer pruned at every level of a grid. In this
    process (all cores) on one machine; the layers of a block in parallel on Ray actors on
    a cluster (--address / RAY_ADDRESS) or with --workers N."""
    from allocsearch import pipeline
    from allocsearch.search_run import ray_layer_map, use_ray_build

    if quantizer is not None:
        _build_quantized(
            out, _config(config, model=model, **_data(calibration, seq_len, calibration_seqs)),
            quantizer, bits, group_size, symmetric, overwrite,
        )  # fmt: skip
        return

    cfg = _config(
        config,
        model=model,
        supernet__pruner=pruner,
        supernet__structure=structure,
        supernet__center=center,
        supernet__input_mode=input_mode,
        supernet__storage_dtype=storage_dtype,
        supernet__depth=depth,
        supernet__expert_removal=expert_removal,
        supernet__prune_router=prune_router,
        supernet__steps_each_side=steps_each_side,
        **_data(calibration, seq_len, calibration_seqs),
        **_heldout(heldout, heldout_seqs),
        **_backend(backend, workers, address, replace_timeout),
    )
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    _check_memory(cfg, "build")
    ws = pipeline.load_workspace(cfg)
    t0 = time.perf_counter()
    layer_map = ray_layer_map(cfg, out_console) if use_ray_build(cfg) else None
    try:
        store = pipeline.build(
            ws, out, overwrite=overwrite, progress=progress, map_layers=layer_map
        )
    finally:
        if layer_map is not None:
            layer_map.close()
    out_console.print(
        f"supernet: {store.spec.num_units} units x up to {store.spec.sparsity.shape[1]} levels, "
        f"{store.num_bytes / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s -> {store.path}"
    )


def _build_quantized(
    out: Path, cfg, name: str, bits: str, group_size: int, symmetric: bool, overwrite: bool
) -> None:
    """``build --quantizer``: a store of quantized variants (allocsearch.supernet.quantized)."""
    from allocsearch import pipeline
    from allocsearch.quantizers import GPTQQuantizer, RTNQuantizer
    from allocsearch.quantizers.base import check_bits_levels
    from allocsearch.supernet.quantized import build_quantized_supernet

    makers = {"rtn": RTNQuantizer, "gptq": GPTQQuantizer}
    if name not in makers:
        raise ValueError(f"--quantizer {name!r} is not one of {sorted(makers)}")
    try:
        levels = [int(b) for b in bits.split(",")]
    except ValueError:
        raise ValueError(f"--bits {bits!r} must be comma-separated ints, e.g. 2,3,4,8") from None
    check_bits_levels(levels)
    q = makers[name](group_size=group_size, symmetric=symmetric)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    ws = pipeline.load_workspace(cfg)
    t0 = time.perf_counter()
    store = build_quantized_supernet(ws.model, ws.calibration, q, levels, out, overwrite=overwrite)
    out_console.print(
        f"quantized supernet ({name}, bits {levels}): {store.spec.num_units} units, "
        f"{store.num_bytes / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s -> {store.path}"
    )


@app.command()
@handle_errors
def search(
    supernet: Annotated[Path, typer.Option(help="Supernet store (from `allocsearch build`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory for the run.")],
    config: ConfigOpt = None,
    strategy: Annotated[
        str | None,
        typer.Option(
            help=f"{registry.help_names()} (default: the config's search.strategy, else "
            "dp+evopress).",
        ),
    ] = None,
    target: SearchTargetOpt = None,
    budget: BudgetOpt = None,
    tie_blocks: TieBlocksOpt = None,
    seed: Annotated[
        int | None,
        typer.Option(help="Seed of the search (default: the config's search.seed, else 0)."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Resume from the run's last checkpoint.")] = False,
    model: ModelOpt = None,
    calibration: CalibrationOpt = None,
    seq_len: SeqLenOpt = None,
    calibration_seqs: CalibrationSeqsOpt = None,
    heldout: HeldoutOpt = None,
    heldout_seqs: HeldoutSeqsOpt = None,
    metric: MetricOpt = None,
    generations: GenerationsOpt = None,
    micro_batch_tokens: MicroBatchOpt = None,
    backend: BackendOpt = None,
    workers: WorkersOpt = None,
    address: AddressOpt = None,
    replace_timeout: ReplaceTimeoutOpt = None,
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Search an allocation on a supernet and write recipe.json, a log and plots."""
    from allocsearch.search_run import for_strategy, run_search_command

    if not resume:
        _refuse_existing(out, overwrite)
    _check_generations(generations)
    base = _config(config, search__budget_kind=budget, search__tie_blocks=tie_blocks)
    if base.search.budget_kind == "sublayers":
        value = _sublayer_target(target, config, supernet, tie_blocks=base.search.tie_blocks)
    else:
        value = _default_target(target, config, supernet)
    cfg = _config(
        config,
        model=model,
        search__strategy=strategy,
        search__target=value,
        search__budget_kind=budget,
        search__tie_blocks=tie_blocks,
        search__seed=seed,
        evaluator__micro_batch_tokens=micro_batch_tokens,
        **_data(calibration, seq_len, calibration_seqs),
        **_heldout(heldout, heldout_seqs, metric),
        **_backend(backend, workers, address, replace_timeout),
    )
    cfg, note = for_strategy(cfg, owner=base.search.strategy)
    cfg = _with_generations(cfg, generations)
    _check_memory(cfg, "search", supernet)
    if not resume:
        _fresh_dir(out, overwrite)
    elif not out.exists():
        raise FileNotFoundError(f"--resume: run directory {out} does not exist")
    run_search_command(
        cfg, supernet, out, resume=resume, progress=progress, console=out_console, note=note
    )
    if (out / "recipe.json").exists():  # a finished run supersedes an interrupted one's
        (out / "recipe.partial.json").unlink(missing_ok=True)


@app.command()
@handle_errors
def compare(
    supernet: Annotated[Path, typer.Option(help="Supernet store.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
    strategies: Annotated[
        str, typer.Option(help=f"Comma-separated strategies of: {registry.help_names(', ')}.")
    ] = ("uniform,owl,lamp,erk,dp,knapsack,evopress"),
    config: ConfigOpt = None,
    target: TargetOpt = None,
    seed: Annotated[
        int | None,
        typer.Option(help="Seed (default: the config's search.seed, else 0)."),
    ] = None,
    model: ModelOpt = None,
    calibration: CalibrationOpt = None,
    seq_len: SeqLenOpt = None,
    calibration_seqs: CalibrationSeqsOpt = None,
    heldout: HeldoutOpt = None,
    heldout_seqs: HeldoutSeqsOpt = None,
    metric: MetricOpt = None,
    generations: GenerationsOpt = None,
    micro_batch_tokens: MicroBatchOpt = None,
    backend: BackendOpt = None,
    workers: WorkersOpt = None,
    address: AddressOpt = None,
    replace_timeout: ReplaceTimeoutOpt = None,
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Run several strategies on one supernet: markdown table (fitness, held-out perplexity,
    evaluations, wall time), chart and fitness curves."""
    from allocsearch.demo import run_compare

    _refuse_existing(out, overwrite)
    _check_generations(generations)
    cfg = _config(
        config,
        model=model,
        search__target=_default_target(target, config, supernet),
        search__seed=seed,
        evaluator__micro_batch_tokens=micro_batch_tokens,
        **_data(calibration, seq_len, calibration_seqs),
        **_heldout(heldout, heldout_seqs, metric),
        **_backend(backend, workers, address, replace_timeout),
    )
    _refuse_tie_blocks(cfg, "compare")
    names = [s.strip() for s in strategies.split(",") if s.strip()]
    if generations is not None and not any(
        n in registry.STRATEGIES and registry.get(n).runs_evopress for n in names
    ):
        raise UserError(
            f"--generations sets EvoPress generations, which none of {names} runs; add "
            f"{_evopress_names()} to --strategies"
        )
    _check_memory(cfg, "compare", supernet)
    run_compare(
        cfg,
        supernet,
        _fresh_dir(out, overwrite),
        names,
        progress=progress,
        console=out_console,
        generations=generations,
    )


@app.command()
@handle_errors
def sweep(
    targets: Annotated[
        str,
        typer.Option(
            help="Fractions to remove: start:stop:step (inclusive, e.g. 0.4:0.8:0.05) or a "
            "comma list (0.5,0.6,0.7)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory for the sweep.")],
    supernet: Annotated[
        Path | None,
        typer.Option(help="Reuse this supernet (default: build one spanning the targets)."),
    ] = None,
    config: ConfigOpt = None,
    evopress_generations: Annotated[
        int, typer.Option(help="EvoPress per target from DP's allocation; 0 = off.")
    ] = 0,
    seed: Annotated[
        int | None,
        typer.Option(help="Seed of the searches (default: the config's search.seed, else 0)."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted sweep in --out.")] = False,
    micro_batch_tokens: MicroBatchOpt = None,
    backend: BackendOpt = None,
    workers: WorkersOpt = None,
    address: AddressOpt = None,
    replace_timeout: ReplaceTimeoutOpt = None,
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Recipes for many targets from one supernet: the per-layer error table is measured
    once and DP solved at every target; uniform, OWL and optionally EvoPress (started from
    DP) for reference; writes sweep.md, sweep.png and one recipe per target and strategy."""
    from allocsearch.sweep import parse_targets, run_sweep_command

    values = parse_targets(targets)
    if evopress_generations < 0:
        raise UserError(f"--evopress-generations {evopress_generations} must be >= 0 (0 = off)")
    if not resume:
        _refuse_existing(out, overwrite)
    cfg = _config(
        config,
        search__seed=seed,
        evaluator__micro_batch_tokens=micro_batch_tokens,
        **_backend(backend, workers, address, replace_timeout),
    )
    _refuse_tie_blocks(cfg, "sweep")
    _check_memory(cfg, "search" if supernet else "build", supernet)
    if not resume:
        _fresh_dir(out, overwrite)
    elif not out.exists():
        raise FileNotFoundError(f"--resume: sweep directory {out} does not exist")
    run_sweep_command(
        cfg,
        supernet,
        out,
        values,
        evopress_generations=evopress_generations,
        resume=resume,
        progress=progress,
        console=out_console,
    )


def _check_recipe_sources(recipe, model: str | None, supernet: Path | None):
    """Check ``recipe`` against the model (fingerprint and layers, weights memory-mapped,
    not loaded) and the supernet store (fingerprint, units and levels) where given;
    returns the (lazily) loaded model and the opened store, each None when not given."""
    from allocsearch.recipe.apply import choice_for_recipe
    from allocsearch.recipe.recipe import check_against_model
    from allocsearch.supernet.experts import model_layers
    from allocsearch.supernet.store import SupernetStore

    m = None
    if model is not None:
        from allocsearch.assets_paths import resolve_model_path
        from allocsearch.models.hf import load_model

        m = load_model(resolve_model_path(model), lazy=True)
        check_against_model(recipe, model_layers(m.adapter, routers=True), m.fingerprint)
    if supernet is None:
        return m, None
    store = SupernetStore.open(supernet, model_fingerprint=recipe.model.fingerprint)
    choice_for_recipe(recipe, store)  # every recipe layer at one of the store's levels
    return m, store


def _model_matrices(model: str) -> list[str]:
    """Module paths of every 2-D parameter of a model, read from its config.json alone."""
    from allocsearch.assets_paths import resolve_model_path
    from allocsearch.models.hf import ModelLoadError, adapter_for_config

    cfg_path = Path(resolve_model_path(model)) / "config.json"
    try:
        hf_config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"--model {model!r}: cannot read {cfg_path} ({e})") from None
    shapes = adapter_for_config(hf_config).param_shapes
    return [n.rsplit(".", 1)[0] for n, shape in shapes.items() if len(shape) == 2]


EXPORT_FORMATS = (
    "llm-compressor",
    "evopress",
    "evopress-db",
    "owl",
    "torch-pruning",
    "jaxpruner",
)


@app.command()
@handle_errors
def export(
    recipe: Annotated[Path, typer.Argument(help="recipe.json from a search.")],
    format: Annotated[str, typer.Option("--format", "-f", help=" | ".join(EXPORT_FORMATS))],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="File to write (evopress-db: the database directory to create)."
        ),
    ],
    modifier: Annotated[
        str, typer.Option(help="llm-compressor: SparseGPTModifier | WandaPruningModifier.")
    ] = "SparseGPTModifier",
    granularity: Annotated[str, typer.Option(help="llm-compressor: layer | block.")] = "layer",
    supernet: Annotated[
        Path | None,
        typer.Option(
            help="The supernet store the recipe was searched on: the recipe is checked "
            "against it (any format); evopress and evopress-db need it (default: none, no "
            "store check)."
        ),
    ] = None,
    jaxpruner_paths: Annotated[
        str,
        typer.Option(
            help="jaxpruner: parameter path convention: linen (str indices, leaf 'kernel'), "
            "nnx (int indices, leaf 'weight': allocsearch's own Flax models), nnx-kernel, "
            "linen-weight."
        ),
    ] = "linen",
    model: Annotated[
        str | None,
        typer.Option(
            help="The model the recipe was made for (directory or 'demo'): the recipe is "
            "checked against its weights and layers (any format); for jaxpruner its config "
            "also names the matrices the map leaves to jaxpruner's global sparsity; "
            "evopress-db needs it (dense weights, module names) (default: none, no model "
            "check)."
        ),
    ] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Export a recipe to another pruner's format; prints what had to be averaged.
    evopress-db writes EvoPress's database (<out>/<module>/<level>.pth for every level of
    the supernet, and <out>/evopress_levels.txt, the recipe)."""
    from allocsearch.recipe import exporters
    from allocsearch.recipe.recipe import Recipe, refuse_bit_recipe

    if format not in EXPORT_FORMATS:
        raise UserError(f"--format {format!r} is not valid; choose one of {list(EXPORT_FORMATS)}")
    if format == "evopress-db" and (supernet is None or model is None):
        raise UserError(
            "--format evopress-db needs --supernet (the variants it writes) and --model (the "
            "model the supernet was built from: dense weights and module names)"
        )
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    r = Recipe.load(recipe)
    refuse_bit_recipe(r, "export")
    loaded, store = _check_recipe_sources(r, model, supernet)
    if format == "evopress-db":
        from allocsearch.recipe.evopress_db import write_evopress_database

        db = write_evopress_database(r, store, loaded, out, overwrite=overwrite)
        for note in db.export.notes:
            out_console.print(f"note: {note}", highlight=False)
        out_console.print(f"wrote {out}")
        return
    if format == "llm-compressor":
        exp = exporters.to_llm_compressor(r, modifier=modifier, granularity=granularity)
    elif format == "evopress":
        if supernet is None:
            raise UserError("--format evopress needs --supernet (levels are relative to it)")
        from allocsearch.recipe.apply import choice_for_recipe

        exp = exporters.to_evopress(r, store.spec, choice_for_recipe(r, store))
    elif format == "owl":
        exp = exporters.to_owl(r)
    elif format == "torch-pruning":
        exp = exporters.to_torch_pruning(r)
    else:
        if jaxpruner_paths not in exporters.JAXPRUNER_CONVENTIONS:
            raise UserError(
                f"--jaxpruner-paths {jaxpruner_paths!r} is not valid; choose one of "
                f"{list(exporters.JAXPRUNER_CONVENTIONS)}"
            )
        leaf, int_indices = exporters.JAXPRUNER_CONVENTIONS[jaxpruner_paths]
        exp = exporters.to_jaxpruner(
            r,
            kernel_leaf=leaf,
            int_indices=int_indices,
            model_matrices=None if model is None else _model_matrices(model),
        )
    content = exp.content
    if format == "jaxpruner":
        text = exporters.jaxpruner_json(exp, jaxpruner_paths)
    elif isinstance(content, str):
        text = content
    else:
        text = json.dumps(content, indent=2) + "\n"
    exporters.write_export(text, out, overwrite=overwrite)
    for note in exp.notes:
        out_console.print(f"note: {note}", highlight=False)
    out_console.print(f"wrote {out}")


@app.command()
@handle_errors
def apply(
    recipe: Annotated[Path, typer.Argument(help="recipe.json from a search.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Pruned model directory.")],
    model: ModelOpt = None,
    supernet: Annotated[
        Path | None,
        typer.Option(
            help="Use this supernet's variants (default: none, the config's pruner prunes "
            "the dense model at the recipe's sparsities)."
        ),
    ] = None,
    config: ConfigOpt = None,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 storage.")] = "float32",
    physical: Annotated[
        bool,
        typer.Option(
            help="Structured: slice matrices physically. MoE: remove the experts the recipe "
            "removes (refused unless every block removes as many; --no-physical keeps them "
            "as zeros, which transformers still routes to)."
        ),
    ] = True,
    timing: Annotated[
        bool, typer.Option(help="Time a forward pass (one held-out sequence) before and after.")
    ] = True,
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Prune a Hugging Face checkpoint with a recipe and write a Hugging Face checkpoint
    (with the source directory's tokenizer files)."""
    from allocsearch import pipeline
    from allocsearch.recipe.apply import apply_recipe, tokenizer_files, write_pruned
    from allocsearch.recipe.recipe import Recipe
    from allocsearch.supernet.store import SupernetStore

    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    cfg = _config(config, model=model)
    r = Recipe.load(recipe)
    _check_memory(cfg, "apply")
    ws = pipeline.load_workspace(cfg)
    store = (
        SupernetStore.open(supernet, model_fingerprint=ws.model.fingerprint) if supernet else None
    )
    with heartbeat("apply: pruning and writing", enabled=progress):
        pruned, updates, report = apply_recipe(
            ws.model,
            r,
            store=store,
            calibration=ws.calibration,
            pruner=None if store else pipeline.make_pruner(cfg.supernet),
            physical=physical,
            query_heads=cfg.supernet.head_granularity == "query_head",
            progress=progress,
        )
        write_pruned(
            pruned,
            out,
            config_updates=updates,
            dtype=dtype,
            overwrite=overwrite,
            copy_files=tokenizer_files(ws.model.path),  # the pruned model keeps its tokenizer
        )
    out_console.print(report.summary(), highlight=False)
    if timing:
        import jax

        from allocsearch.recipe.timing import forward_times

        ids = ws.heldout.tokens[:1]
        before, after = forward_times([ws.model, pruned], ids, repeats=20)
        out_console.print(
            f"forward ({jax.default_backend()}, {ids.size} tokens): dense {1e3 * before:.2f} ms, "
            f"pruned {1e3 * after:.2f} ms ({before / after:.2f}x); parameters "
            f"{report.num_params_dense:,} -> {report.num_params:,}",
            highlight=False,
        )
    out_console.print(f"wrote {out}")


@app.command(name="eval")
@handle_errors
def eval_(
    model: ModelOpt = None,
    config: ConfigOpt = None,
    reference: Annotated[
        str | None,
        typer.Option(
            help="Encoders: the dense model the pruned one is measured against (default: "
            "the config's model)."
        ),
    ] = None,
    calibration: CalibrationOpt = None,
    seq_len: SeqLenOpt = None,
    heldout: HeldoutOpt = None,
    heldout_seqs: HeldoutSeqsOpt = None,
    metric: MetricOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """Held-out perplexity of a (possibly pruned) model on the configured held-out set (for
    sources other than demo: the end of the calibration corpus unless data.heldout); for
    encoders, the held-out distance of its outputs to a reference (dense) model's and the
    nearest-neighbour agreement of their pooled embeddings."""
    from allocsearch import pipeline
    from allocsearch.assets_paths import resolve_model_path
    from allocsearch.models.hf import load_model

    data = {**_data(calibration, seq_len, None), **_heldout(heldout, heldout_seqs, metric)}
    dense = reference or _config(config, **data).model
    cfg = _config(config, model=model, **data)
    _check_memory(cfg, "eval")
    ws = pipeline.load_workspace(cfg)
    if not ws.model.adapter.is_causal_lm:
        if dense == "demo":  # no config model to measure against: the demo is a causal LM
            raise UserError(
                f"{cfg.model} is an encoder: its held-out score is a distance to the dense "
                f"model; pass --reference <dense model directory> (or a config whose `model` "
                f"is it)"
            )
        ref = load_model(resolve_model_path(dense))
        with heartbeat("eval: scoring", enabled=progress):
            held = pipeline.heldout_scores(ws, ws.model, reference=ref)
        agreement = (
            ""
            if held.nn_agreement is None
            else f", nearest-neighbour agreement {held.nn_agreement:.1%}"
        )
        out_console.print(
            f"{cfg.model}: {pipeline.heldout_label(ws).replace('the dense model', dense)} "
            f"{held.score:.6f}{agreement} on {ws.heldout.n_seq:,} sequences "
            f"({ws.heldout.source})",
            highlight=False,
        )
        return
    with heartbeat("eval: scoring", enabled=progress):
        ppl = pipeline.heldout_perplexity(ws.model, ws.heldout)
    out_console.print(
        f"{cfg.model}: held-out perplexity {ppl:.4f} on {ws.heldout.n_tokens:,} tokens "
        f"({ws.heldout.source})",
        highlight=False,
    )


@app.command()
@handle_errors
def plan(
    model: Annotated[
        str | None,
        typer.Option(
            help="Model directory (a config.json alone is enough) or 'demo' (default: the "
            "config's model, else demo)."
        ),
    ] = None,
    config: ConfigOpt = None,
    supernet: Annotated[
        Path | None,
        typer.Option(
            help="An existing store: its levels instead of the config's (default: none, the "
            "config's levels)."
        ),
    ] = None,
    device_memory: Annotated[
        str | None,
        typer.Option(help="Per device, e.g. 80GB, 80GiB or 141e9 (default: detected)."),
    ] = None,
    host_memory: Annotated[
        str | None, typer.Option(help="This machine's memory (default: detected, available).")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Scoring actors, one device each (default: the config).")
    ] = None,
    execution: Annotated[
        str | None,
        typer.Option(
            help="auto (resident if it fits, else streaming) | resident | streaming (default: "
            "the config's evaluator.execution, else auto)."
        ),
    ] = None,
    command: Annotated[
        str, typer.Option("--for", help="search | compare | build | apply | eval.")
    ] = "search",
    micro_batch_tokens: MicroBatchOpt = None,
    steps_each_side: StepsEachSideOpt = None,
    storage_dtype: StorageDtypeOpt = None,
) -> None:
    """Memory plan, from config.json alone: bytes per process (model, variants, teacher,
    activations, reference states) in resident and streaming execution, the mode that
    fits, the store's size and the bytes moved per generation. When nothing fits: the
    table, then one line naming the shortfall and what would fit, exit 2."""
    from allocsearch.plan import (
        MemoryPlanError,
        load_hf_config,
        parse_bytes,
        plan_memory,
        refuse_foreign_store,
    )

    cfg = _config(
        config,
        model=model,
        backend__workers=workers,  # workers checked as search checks them
        evaluator__micro_batch_tokens=micro_batch_tokens,
        evaluator__execution=execution,
        supernet__steps_each_side=steps_each_side,
        supernet__storage_dtype=storage_dtype,
    )
    hf_config = load_hf_config(cfg.model)
    if supernet is not None:
        refuse_foreign_store(supernet, cfg.model, hf_config)
    try:
        result = plan_memory(
            hf_config,
            cfg,
            model=cfg.model,
            command=command,
            device_memory=parse_bytes(device_memory) if device_memory else None,
            host_memory=parse_bytes(host_memory) if host_memory else None,
            workers=workers,
            execution=cfg.evaluator.execution,
            store=supernet,
        )
    except MemoryPlanError as e:  # the table of what did not fit, then the one line
        if e.plan is not None:
            out_console.print(e.plan.table(), highlight=False, markup=False, soft_wrap=True)
        raise
    out_console.print(result.table(), highlight=False, markup=False, soft_wrap=True)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
