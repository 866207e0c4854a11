"""Commands on a recipe or a model: export, apply, eval, plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from allocsearch.cli.common import (
    UserError,
    _check_memory,
    _config,
    _data,
    _heldout,
    handle_errors,
    out_console,
)
from allocsearch.cli.options import (
    CalibrationOpt,
    ConfigOpt,
    HeldoutOpt,
    HeldoutSeqsOpt,
    MetricOpt,
    MicroBatchOpt,
    ModelOpt,
    OverwriteOpt,
    ProgressOpt,
    SeqLenOpt,
    StepsEachSideOpt,
    StorageDtypeOpt,
    StreamUnitOpt,
)
from allocsearch.console_progress import heartbeat


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
    if r.quantized:
        _export_quant(r, format, out, overwrite)
        return
    loaded, store = _check_recipe_sources(r, model, supernet)
    if format == "evopress-db":
        from allocsearch.recipe.evopress_db import write_evopress_database

        db = write_evopress_database(r, store, loaded, out, overwrite=overwrite)
        for note in db.export.notes:
            out_console.print(f"note: {note}", highlight=False)
        out_console.print(f"wrote {out}")
        return
    exp = _exported(format, r, store, modifier, granularity, jaxpruner_paths, model)
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


def _exported(format: str, r, store, modifier: str, granularity: str, jaxpruner_paths, model):
    """The recipe ``r`` in ``format`` (all but evopress-db): an exporter's result."""
    from allocsearch.recipe import exporters

    if format == "llm-compressor":
        return exporters.to_llm_compressor(r, modifier=modifier, granularity=granularity)
    if format == "evopress":
        if store is None:
            raise UserError("--format evopress needs --supernet (levels are relative to it)")
        from allocsearch.recipe.apply import choice_for_recipe

        return exporters.to_evopress(r, store.spec, choice_for_recipe(r, store))
    if format == "owl":
        return exporters.to_owl(r)
    if format == "torch-pruning":
        return exporters.to_torch_pruning(r)
    if jaxpruner_paths not in exporters.JAXPRUNER_CONVENTIONS:
        raise UserError(
            f"--jaxpruner-paths {jaxpruner_paths!r} is not valid; choose one of "
            f"{list(exporters.JAXPRUNER_CONVENTIONS)}"
        )
    leaf, int_indices = exporters.JAXPRUNER_CONVENTIONS[jaxpruner_paths]
    return exporters.to_jaxpruner(
        r,
        kernel_leaf=leaf,
        int_indices=int_indices,
        model_matrices=None if model is None else _model_matrices(model),
    )


def _export_quant(r, format: str, out: Path, overwrite: bool) -> None:
    """``export`` of a bitwidth recipe: llm-compressor's GPTQ recipe or EvoPress's
    quantization configuration (allocsearch.recipe.export_quant)."""
    from allocsearch.recipe import export_quant, exporters

    makers = {
        "llm-compressor": export_quant.to_llm_compressor_quant,
        "evopress": export_quant.to_evopress_quant,
    }
    if format not in makers:
        raise UserError(
            f"--format {format!r} exports sparsities; this recipe allocates bitwidths: use "
            f"one of {list(makers)}"
        )
    exp = makers[format](r)
    exporters.write_export(exp.content, out, overwrite=overwrite)
    for note in exp.notes:
        out_console.print(f"note: {note}", highlight=False)
    out_console.print(f"wrote {out}")


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
    if r.quantized:
        _apply_quant(ws, r, store, out, dtype, overwrite)
        return
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


def _apply_quant(ws, r, store, out: Path, dtype: str, overwrite: bool) -> None:
    """``apply`` of a bitwidth recipe: dequantized weights (allocsearch.recipe.apply_quant)."""
    from allocsearch.recipe.apply import tokenizer_files, write_pruned
    from allocsearch.recipe.apply_quant import apply_quant_recipe

    quantized, report = apply_quant_recipe(ws.model, r, store=store)
    files = tokenizer_files(ws.model.path)
    write_pruned(quantized, out, dtype=dtype, overwrite=overwrite, copy_files=files)
    out_console.print(report.summary(), highlight=False)
    out_console.print(f"wrote {out}")


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
    stream_unit: StreamUnitOpt = None,
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
        evaluator__stream_unit=stream_unit,
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
