"""The build command: a supernet (pruned or quantized levels) from a model and data."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from allocsearch.cli.common import (
    _check_memory,
    _config,
    _data,
    handle_errors,
    out_console,
)
from allocsearch.cli.options import (
    BackendOpts,
    CenterOpt,
    ConfigOpt,
    DataOpts,
    DepthOpt,
    ExpertRemovalOpt,
    InputModeOpt,
    ModelOpt,
    OverwriteOpt,
    ProgressOpt,
    PrunerOpt,
    PruneRouterOpt,
    QuantizeOpts,
    StepsEachSideOpt,
    StorageDtypeOpt,
    StructureOpt,
    with_options,
)


@handle_errors
@with_options
def build(
    out: Annotated[Path, typer.Option("--out", "-o", help="Supernet store directory.")],
    config: ConfigOpt = None,
    model: ModelOpt = None,
    pruner: PrunerOpt = None,
    structure: StructureOpt = None,
    center: CenterOpt = None,
    input_mode: InputModeOpt = None,
    depth: DepthOpt = None,
    expert_removal: ExpertRemovalOpt = None,
    prune_router: PruneRouterOpt = None,
    storage_dtype: StorageDtypeOpt = None,
    steps_each_side: StepsEachSideOpt = None,
    data: DataOpts = DataOpts(),
    run_on: BackendOpts = BackendOpts(),
    overwrite: OverwriteOpt = False,
    progress: ProgressOpt = True,
    quantize: QuantizeOpts = QuantizeOpts(),
) -> None:
    """Build a supernet: every prunable layer pruned at every level of a grid. In this
    process (all cores) on one machine; the layers of a block in parallel on Ray actors on
    a cluster (--address / RAY_ADDRESS) or with --workers N."""
    from allocsearch import pipeline
    from allocsearch.search_run import ray_layer_map, use_ray_build

    if quantize.quantizer is not None:
        calibration = _data(data.calibration, data.seq_len, data.calibration_seqs)
        _build_quantized(out, _config(config, model=model, **calibration), quantize, overwrite)
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
        **data.overrides(),
        **run_on.overrides(),
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


def _build_quantized(out: Path, cfg, quantize: QuantizeOpts, overwrite: bool) -> None:
    """``build --quantizer``: a store of quantized variants (allocsearch.supernet.quantized)."""
    from allocsearch import pipeline
    from allocsearch.quantizers import GPTQQuantizer, RTNQuantizer
    from allocsearch.quantizers.base import check_bits_levels
    from allocsearch.supernet.quantized import build_quantized_supernet

    name, bits = quantize.quantizer, quantize.bits
    makers = {"rtn": RTNQuantizer, "gptq": GPTQQuantizer}
    if name not in makers:
        raise ValueError(f"--quantizer {name!r} is not one of {sorted(makers)}")
    try:
        levels = [int(b) for b in bits.split(",")]
    except ValueError:
        raise ValueError(f"--bits {bits!r} must be comma-separated ints, e.g. 2,3,4,8") from None
    check_bits_levels(levels)
    q = makers[name](group_size=quantize.group_size, symmetric=quantize.symmetric)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    ws = pipeline.load_workspace(cfg)
    t0 = time.perf_counter()
    store = build_quantized_supernet(ws.model, ws.calibration, q, levels, out, overwrite=overwrite)
    out_console.print(
        f"quantized supernet ({name}, bits {levels}): {store.spec.num_units} units, "
        f"{store.num_bytes / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s -> {store.path}"
    )
