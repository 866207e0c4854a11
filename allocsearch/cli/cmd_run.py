"""Commands that search: demo, search, compare, sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from allocsearch.cli.common import (
    UserError,
    _backend,
    _bits_target,
    _check_generations,
    _check_memory,
    _config,
    _default_target,
    _evopress_names,
    _fresh_dir,
    _refuse_existing,
    _refuse_tie_blocks,
    _sublayer_target,
    _with_generations,
    handle_errors,
    out_console,
)
from allocsearch.cli.options import (
    BackendOpts,
    BudgetOpt,
    ConfigOpt,
    MicroBatchOpt,
    OverwriteOpt,
    ProgressOpt,
    ScoringOpts,
    SearchTargetOpt,
    StorageDtypeOpt,
    StreamUnitOpt,
    TargetOpt,
    TieBlocksOpt,
    WorkersOpt,
    with_options,
)
from allocsearch.search import registry


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
    quantizer: Annotated[
        str | None,
        typer.Option(
            help="rtn | gptq: allocate bitwidths (--bits) instead of sparsities; --target is "
            "then average bits per weight, scales counted (default: none, prune)."
        ),
    ] = None,
    bits: Annotated[
        str, typer.Option(help="Bitwidths of the quantized demo, comma-separated (2..8).")
    ] = "2,3,4,8",
    group_size: Annotated[int, typer.Option(help="Columns per scale (--quantizer).")] = 128,
) -> None:
    """The whole pipeline on the bundled demo model: supernet (SparseGPT, 9 levels), EvoPress
    search, recipe, plots, and a table against uniform and OWL. With --quantizer: per-layer
    bitwidths under an average-bits budget against every uniform bitwidth."""
    from allocsearch.demo import run_demo

    _check_generations(generations)
    if quantizer is not None:
        _quant_demo(out, target, generations, strategies, seed, quantizer, bits, group_size,
                    overwrite, progress)  # fmt: skip
        return
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


def _quant_demo(
    out, target, generations, strategies, seed, quantizer, bits, group_size, overwrite, progress
) -> None:
    """``demo --quantizer``: allocsearch.demo_quant on the bundled model (in process)."""
    from allocsearch.demo_quant import QUANT_DEMO_STRATEGIES, run_quant_demo

    try:
        levels = [int(b) for b in bits.split(",")]
    except ValueError:
        raise UserError(f"--bits {bits!r} must be comma-separated ints, e.g. 2,3,4,8") from None
    if not min(levels) <= target <= 16:
        raise UserError(
            f"--target {target:g} with --quantizer is average bits per weight: at least the "
            f"lowest of --bits {bits} (plus scales), e.g. --target 3.0"
        )
    names = [s.strip() for s in strategies.split(",") if s.strip()]
    if strategies == "uniform,owl,evopress":  # the pruning demo's default
        names = list(QUANT_DEMO_STRATEGIES)
    bad = [s for s in names if s not in registry.STRATEGIES or registry.get(s).kind == "driver"]
    if bad or not names:
        raise UserError(f"--strategies {strategies!r}: unknown or unsupported here: {bad}")
    cfg = _config(
        None, search__budget_kind="bits", search__target=_bits_target(target), search__seed=seed
    )
    run_quant_demo(
        cfg, _fresh_dir(out, overwrite), quantizer=quantizer, bits=levels,
        group_size=group_size, generations=generations, progress=progress,
        console=out_console, strategies=names,
    )  # fmt: skip


@handle_errors
@with_options
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
    scoring: ScoringOpts = ScoringOpts(),
    stream_unit: StreamUnitOpt = None,
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Search an allocation on a supernet and write recipe.json, a log and plots."""
    from allocsearch.search_run import for_strategy, run_search_command

    if not resume:
        _refuse_existing(out, overwrite)
    generations = scoring.generations
    _check_generations(generations)
    base = _config(config, search__budget_kind=budget, search__tie_blocks=tie_blocks)
    if base.search.budget_kind == "sublayers":
        value = _sublayer_target(target, config, supernet, tie_blocks=base.search.tie_blocks)
    elif base.search.budget_kind == "bits" and target is not None:
        value = _bits_target(target)
    else:
        value = _default_target(target, config, supernet)
    cfg = _config(
        config,
        search__strategy=strategy,
        search__target=value,
        search__budget_kind=budget,
        search__tie_blocks=tie_blocks,
        search__seed=seed,
        evaluator__stream_unit=stream_unit,
        **scoring.overrides(),
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


@handle_errors
@with_options
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
    scoring: ScoringOpts = ScoringOpts(),
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Run several strategies on one supernet: markdown table (fitness, held-out perplexity,
    evaluations, wall time), chart and fitness curves."""
    from allocsearch.demo import run_compare

    _refuse_existing(out, overwrite)
    generations = scoring.generations
    _check_generations(generations)
    cfg = _config(
        config,
        search__target=_default_target(target, config, supernet),
        search__seed=seed,
        **scoring.overrides(),
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


@handle_errors
@with_options
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
    run_on: BackendOpts = BackendOpts(),
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
    budget: Annotated[
        str | None,
        typer.Option(
            "--budget",
            help="bits: --targets are average bits per weight (scales counted) on a quantized "
            "supernet, e.g. 2.5:4:0.25 (default: the config's search.budget_kind).",
        ),
    ] = None,
) -> None:
    """Recipes for many targets from one supernet: the per-layer error table is measured
    once and DP solved at every target; uniform, OWL and optionally EvoPress (started from
    DP) for reference; writes sweep.md, sweep.png and one recipe per target and strategy."""
    from allocsearch.sweep import parse_targets, run_sweep_command

    if budget == "bits":
        from allocsearch.search.budget import average_bits_to_target

        if supernet is None:
            raise UserError(
                "--budget bits needs --supernet: a quantized one (`allocsearch build --quantizer`)"
            )

        values = tuple(sorted(average_bits_to_target(b) for b in parse_targets(targets, upper=16)))
    else:
        values = parse_targets(targets)
    if evopress_generations < 0:
        raise UserError(f"--evopress-generations {evopress_generations} must be >= 0 (0 = off)")
    if not resume:
        _refuse_existing(out, overwrite)
    cfg = _config(
        config,
        search__seed=seed,
        search__budget_kind=budget,
        evaluator__micro_batch_tokens=micro_batch_tokens,
        **run_on.overrides(),
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
