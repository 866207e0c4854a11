"""The entry points: plan_memory (plan a run, choose the mode), check_run and execution_for."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from allocsearch.config import RunConfig, with_model_defaults
from allocsearch.plan.base import (
    _CANDIDATES_PER_CALL,
    _ITEMSIZE,
    _MICRO_BATCH_TOKENS,
    DEFAULT_MARGIN,
    EXECUTION_MODES,
    MemoryPlanError,
    detect_memory,
    load_hf_config,
    parse_bytes,
)
from allocsearch.plan.layout import (
    _Layout,
    _layout,
    _layout_from_store,
    _Model,
    _model,
    _one_block,
    _store_bytes,
)
from allocsearch.plan.remedies import _shortfall, _what_fits
from allocsearch.plan.report import UNIT_STREAMING, MemoryPlan, ProcessMemory, _allowed, _need
from allocsearch.plan.resident import _resident, _single_process
from allocsearch.plan.streaming import _block_group, _page_cache, _streaming, _unit_groups
from allocsearch.plan.workload import (
    _evaluator_setting,
    _moe_setting,
    _queries,
    _resolve_workers,
)
from allocsearch.search import registry


def plan_memory(
    hf_config: Mapping[str, Any],
    cfg: RunConfig,
    *,
    model: str = "",
    command: str = "search",
    device_memory: int | None = None,
    host_memory: int | None = None,
    device_kind: str | None = None,
    workers: int | None = None,
    execution: str = "auto",
    storage_dtype: str | None = None,
    micro_batch_tokens: int | None = None,
    store: str | os.PathLike | None = None,
    margin: float = DEFAULT_MARGIN,
    suggest: bool = True,
) -> MemoryPlan:
    """Plan a run's memory from ``config.json`` and the run config; choose the mode.

    Args:
      hf_config: the model's config.json dict (no weights are read).
      cfg: the run config (supernet, data, search settings, metric, backend).
      model: a label for the table (the model argument).
      command: ``search`` or ``compare`` (a driver and scoring actors), ``build``,
        ``apply`` or ``eval`` (one process that loads the model; no evaluator).
      device_memory, host_memory: bytes available; None: detected (:func:`detect_memory`).
      device_kind: ``"cpu"`` (the device is host memory) or ``"gpu"``; None: detected
        when ``device_memory`` is, else ``"gpu"``.
      workers: scoring actors, each on its own device; None: from ``cfg.backend``
        (``local``: none, the driver scores; ``auto``: one per GPU, or one per CPU core
        on a CPU device).
      execution: ``auto``, ``resident`` or ``streaming``: the mode(s) to accept.
      storage_dtype: ``"float32"``, ``"bfloat16"`` or ``"auto"`` (the model's dtype) for
        dense variants; None: ``cfg.supernet.storage_dtype`` if the config has it, else
        ``"auto"``.
      micro_batch_tokens: None: ``cfg.evaluator.micro_batch_tokens`` if the config has
        it, else the evaluator's default (8192).
      store: an existing supernet store: its manifest gives the levels, variant kinds,
        storage dtype and size on disk instead of ``cfg.supernet`` (nothing else is read).
      margin: fraction of each memory kept free.
      suggest: on failure, re-plan with single changes to name what would fit.

    Returns:
      The plan; ``plan.mode`` is the chosen mode.

    Raises:
      MemoryPlanError: nothing fits (one line: the shortfall, what would fit).
      ValueError: an unknown execution mode or command, a model family without a plan.
    """
    _check_plan_args(execution, command, margin)
    device_kind, device_memory, host_memory = _machine(device_kind, device_memory, host_memory)
    run, storage, store_bytes, store_layout = _plan_run(
        hf_config,
        cfg,
        command=command,
        device_kind=device_kind,
        workers=workers,
        storage_dtype=storage_dtype,
        micro_batch_tokens=micro_batch_tokens,
        store=store,
    )
    modes, moved, notes = _modes(run, command)
    usable = (device_memory * (1 - margin), host_memory * (1 - margin))
    stream_unit = getattr(cfg.evaluator, "stream_unit", "auto")
    fits, chosen = _choose(modes, device_kind, usable, command, execution, stream_unit)
    estimate, parent_disk, child_disk = _evopress_traffic(run, moved)
    result = MemoryPlan(
        model=model or str(hf_config.get("model_type")),
        command=command,
        settings=_settings(run, storage, store_layout, from_store=store is not None),
        device_kind=device_kind,
        device_memory=int(device_memory),
        host_memory=int(host_memory),
        workers=run.workers,
        margin=margin,
        modes=modes,
        fits=fits,
        mode=chosen,
        store_bytes=store_bytes,
        moved_per_generation=moved,
        notes=tuple(notes),
        moved_estimate=estimate,
        parent_disk_bytes=parent_disk,
        disk_per_generation=child_disk,
    )
    if chosen is None:
        overrides = {"storage_dtype": storage, "micro_batch_tokens": run.mb, "store": store}
        remedies = _what_fits(result, hf_config, cfg, execution, overrides) if suggest else []
        message = _shortfall(result, _allowed(list(modes), execution, stream_unit), suggest,
                             remedies)  # fmt: skip
        raise MemoryPlanError(message, result, remedies)
    return result


def _check_plan_args(execution: str, command: str, margin: float) -> None:
    """Refuse an unknown execution mode or command, or a margin outside [0, 1)."""
    if execution not in EXECUTION_MODES:
        raise ValueError(f"execution {execution!r} is not valid; choose one of {EXECUTION_MODES}")
    commands = ("search", "compare", "build", "apply", "eval")
    if command not in commands:
        raise ValueError(f"command {command!r} has no plan; valid: {commands}")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin {margin!r} must be in [0, 1)")


def _plan_run(
    hf_config: Mapping[str, Any],
    cfg: RunConfig,
    *,
    command: str,
    device_kind: str,
    workers: int | None,
    storage_dtype: str | None,
    micro_batch_tokens: int | None,
    store: str | os.PathLike | None,
) -> tuple[_Run, str, int, Any]:
    """The run to plan (model, supernet layout, workload), its storage dtype, the store's
    bytes on disk and the store's layout (as :func:`_supernet` gives them)."""
    adapter, blocks = _one_block(hf_config)
    m = _model(adapter, blocks)
    cfg = with_model_defaults(cfg, encoder=not m.causal)  # data.n_calibration_seqs
    a = _ITEMSIZE[cfg.dtype]
    layout, storage, store_bytes, store_layout = _supernet(adapter, cfg, a, storage_dtype, store)
    if store_bytes is None:
        store_bytes = _store_bytes(m, layout, _ITEMSIZE[storage], store_layout)
    run = _Run(
        m=m,
        layout=layout,
        groups=_groups(adapter, m, layout, cfg),
        cfg=cfg,
        a=a,
        s=_ITEMSIZE[storage],
        mb=micro_batch_tokens or _evaluator_setting(cfg, "micro_batch_tokens", _MICRO_BATCH_TOKENS),
        g=_evaluator_setting(cfg, "candidates_per_call", _CANDIDATES_PER_CALL),
        workers=_resolve_workers(cfg, workers, device_kind),
        device_kind=device_kind,
        generations=registry.get(cfg.search.strategy).kind in ("evolutionary", "driver"),
        queries=tuple(_queries(cfg, command, _calibration_tokens(cfg), layout, blocks)),
    )
    return run, storage, store_bytes, store_layout


def _choose(
    modes: Mapping[str, tuple[ProcessMemory, ...]],
    device_kind: str,
    usable: tuple[float, float],
    command: str,
    execution: str,
    stream_unit: str = "auto",
) -> tuple[dict[str, bool], str | None]:
    """(mode -> fits within the usable device and host bytes, the chosen mode or None):
    the first that fits of resident, block streaming and unit streaming, among those
    ``execution`` (``auto``: all) and ``stream_unit`` (``auto``: both streamings) allow."""
    fits = {}
    for mode, procs in modes.items():
        d, h = _need(procs, device_kind)
        fits[mode] = d <= usable[0] and h <= usable[1]
    if command not in ("search", "compare"):
        return fits, "resident" if fits["resident"] else None
    allowed = _allowed(list(modes), execution, stream_unit)
    return fits, next((mode for mode in allowed if fits[mode]), None)


def _groups(adapter: Any, m: _Model, layout: _Layout, cfg: RunConfig) -> dict[str, tuple]:
    """Streaming mode -> the groups it holds a block in: the block, and unit groups where
    unit streaming can split the block (not on depth supernets)."""
    out = {"streaming": _block_group(m, layout)}
    depth = getattr(cfg.supernet, "depth", "none") != "none"
    units = None if depth else _unit_groups(adapter, m, layout)
    if units is not None:
        out[UNIT_STREAMING] = units
    return out


@dataclass(frozen=True)
class _Run:
    """What every formula of one plan reads: the model, one block's supernet, the run
    config, itemsizes (``a`` model, ``s`` dense storage), micro-batch tokens ``mb``,
    candidates per call ``g``, actors, device kind and the queries of a generation."""

    m: _Model
    layout: _Layout
    groups: dict[str, tuple]
    cfg: RunConfig
    a: int
    s: int
    mb: int
    g: int
    workers: int
    device_kind: str
    generations: bool
    queries: tuple[tuple[int, int], ...]

    @property
    def device_is_host(self) -> bool:
        return self.device_kind == "cpu"


def _calibration_tokens(cfg: RunConfig) -> int:
    return cfg.data.n_calibration_seqs * cfg.data.seq_len


def _machine(
    device_kind: str | None, device_memory: int | None, host_memory: int | None
) -> tuple[str, int, int]:
    """(device kind, device bytes, host bytes): the given ones, the rest detected."""
    if device_memory is None or host_memory is None:
        kind, dev, host = detect_memory()
        device_kind = device_kind or (kind if device_memory is None else "gpu")
        host_memory = host if host_memory is None else host_memory
        if device_memory is None:  # a CPU device is the host's memory
            device_memory = host_memory if device_kind == "cpu" else dev
    return device_kind or "gpu", int(device_memory), int(host_memory)


def _supernet(
    adapter: Any,
    cfg: RunConfig,
    a: int,
    storage_dtype: str | None,
    store: str | os.PathLike | None,
) -> tuple[_Layout, str, int | None, str]:
    """(one block's layout, dense storage dtype, store bytes when a store is given, the
    store layout's label): from the config's grid, or from an existing store."""
    from allocsearch.supernet.store import resolve_storage_dtype

    if store is not None:
        layout, storage, store_bytes = _layout_from_store(store, adapter)
        return layout, storage, store_bytes, f"as stored in {store}"
    layout = _layout(adapter, cfg)
    request = storage_dtype or getattr(cfg.supernet, "storage_dtype", None) or "auto"
    storage = resolve_storage_dtype(request, np.float32 if a == 4 else _bf16())
    return layout, storage, None, getattr(cfg.supernet, "layout", None) or "auto"


def _evaluator(run: _Run, mode: str) -> tuple[dict[str, int], dict[str, int], int]:
    """(device, host, bytes moved per generation) of one scoring process in ``mode``."""
    common = dict(a=run.a, s=run.s, cfg=run.cfg, queries=run.queries, mb=run.mb, g=run.g)
    if mode == "resident":
        dev, host = _resident(run.m, run.layout, **common, device_is_host=run.device_is_host)
        return dev, host, 0
    return _streaming(
        run.m,
        run.layout,
        groups=run.groups[mode],
        **common,
        workers=max(run.workers, 1),
        generations=run.generations,
        device_is_host=run.device_is_host,
    )


def _modes(run: _Run, command: str) -> tuple[dict[str, tuple[ProcessMemory, ...]], int, list[str]]:
    """(mode -> processes, streaming bytes moved per generation, notes)."""
    modes: dict[str, tuple[ProcessMemory, ...]] = {}
    moved = 0
    notes: list[str] = []
    if command not in ("search", "compare"):
        one = _single_process(command, run.m, run.layout, a=run.a, cfg=run.cfg)
        return {"resident": (one,)}, 0, notes
    for mode in ("resident", *run.groups):
        dev, host, mv = _evaluator(run, mode)
        if mode == "streaming":
            moved = mv  # unit streaming reads and moves the same bytes
        if run.workers == 0:
            modes[mode] = (ProcessMemory("driver", dev, host),)
            continue
        # The driver keeps the model memory-mapped on the host (page cache, shared,
        # not counted) and the search state; the actors score, the final held-out
        # perplexity included, so it needs no device memory of its own.
        fdev = dict.fromkeys(dev, 0)
        fhost = dict.fromkeys(host, 0)
        modes[mode] = (
            ProcessMemory("driver", fdev, fhost),
            ProcessMemory("actor", dev, host, count=run.workers),
        )
    if run.workers == 0:
        notes.append("backend local: the driver process scores (no actors)")
    elif run.device_kind != "cpu":
        notes.append(
            "each process on its own device; a driver sharing a GPU with an actor "
            "needs the sum of both"
        )
    if UNIT_STREAMING not in run.groups:
        notes.append("no unit streaming: this block layout (or a depth supernet) streams by block")
    return modes, moved, notes


def _settings(run: _Run, storage: str, store_layout: str, *, from_store: bool) -> dict[str, str]:
    """The table's settings rows: what the numbers follow."""
    m, cfg, layout, mb = run.m, run.cfg, run.layout, run.mb
    seq = cfg.data.seq_len
    n_cal = _calibration_tokens(cfg)
    levels = sorted(set(layout.unit_levels))
    kinds = sorted({p.kind for p in layout.params})
    topk = f" (k={cfg.evaluator.topk})" if cfg.evaluator.metric == "topk_kl" else ""
    vocab = f" (V={m.vocab})" if cfg.evaluator.metric == "kl" else ""
    supernet = "the store's" if from_store else f"{cfg.supernet.pruner} {cfg.supernet.structure},"
    return {
        "model": f"{m.blocks} blocks, hidden {m.hidden}, MLP {m.ffn}, heads "
        f"{m.heads}/{m.kv_heads}, vocab {m.vocab}, "
        f"{m.total_params / 1e9:.3f} B parameters ({cfg.dtype})",
        **_moe_setting(m, min(mb // seq, cfg.data.n_calibration_seqs) * seq),
        "supernet": supernet
        + f" {m.blocks * len(layout.unit_levels)} units x {levels[0]}..{levels[-1]} levels, "
        f"{'/'.join(kinds)} variants, storage {storage}, {store_layout} layout",
        "tokens": f"calibration {n_cal:,} ({cfg.data.n_calibration_seqs} x {seq}), "
        f"micro-batch {mb:,}",
        "queries (candidates x tokens)": ", ".join(f"{n} x {t:,}" for n, t in run.queries),
        "metric": cfg.evaluator.metric + topk + vocab,
        "candidates per call (resident)": str(run.g),
        "workers": f"{run.workers} actor(s)" if run.workers else "none (the driver scores)",
    }


def _evopress_traffic(run: _Run, moved: int) -> tuple[int, int, int]:
    """(bytes moved per generation for EvoPress children of one parent, bytes every query
    reads for the parent, bytes a generation reads from disk beyond them); zeros without
    generations."""
    if not (run.generations and moved):
        return 0, 0, 0
    from allocsearch.search.evolutionary import EvolutionarySearcher

    layout, blocks, n_cal = run.layout, run.m.blocks, _calibration_tokens(run.cfg)
    settings = dict(run.cfg.search.settings or {})
    switches = int(settings.get("max_switches", EvolutionarySearcher.max_switches))
    units = blocks * len(layout.unit_levels)
    mean_unit = blocks * layout.moved_bytes(1, run.s, run.a) / max(units, 1)
    workers = max(run.workers, 1)
    estimate = 0
    for n, tokens in run.queries:
        if n == 1 and tokens == n_cal and len(run.queries) > 1:
            continue
        # every level used: min(n, workers) actors each move their share of the query
        per_query = min(n, workers) * blocks * layout.moved_bytes(-(-n // workers), run.s, run.a)
        estimate += min(per_query, int((units + 2 * switches * n) * mean_unit))
    children = run.queries[0][0]
    parent, child = _page_cache(
        run.m, layout, s=run.s, a=run.a, children=children, switches=switches
    )
    return estimate, parent, child


def _bf16() -> Any:
    import ml_dtypes

    return ml_dtypes.bfloat16


# --------------------------------------------------------------------------- CLI check


def check_run(
    cfg: RunConfig,
    command: str,
    *,
    model: str | None = None,
    store: str | os.PathLike | None = None,
    suggest: bool = True,
) -> MemoryPlan | None:
    """The check the CLI runs before loading anything: plan ``command`` for ``cfg`` (in
    ``cfg.evaluator.execution``) on this machine's detected memory and raise
    :class:`MemoryPlanError` when nothing fits. ``ALLOCSEARCH_DEVICE_MEMORY`` and
    ``ALLOCSEARCH_HOST_MEMORY`` (e.g. ``80GB``) override the detected sizes.

    Returns None without checking when the model's config.json cannot be read or the
    model has no plan (the command then reports its own, more precise error), and for
    ``search``/``compare`` on a Ray cluster (``backend.address``/``RAY_ADDRESS``) unless
    ``ALLOCSEARCH_DEVICE_MEMORY`` says what the actors' devices hold: they are not this
    machine's. ``store``: an existing supernet (its manifest gives the levels), else the
    config's grid. ``suggest``: name what would fit in the refusal (re-plans; False when
    only the verdict matters).
    """
    from allocsearch.models.hf import ModelLoadError

    try:
        hf_config = load_hf_config(model or cfg.model)
    except (OSError, ValueError):
        return None
    env_dev = os.environ.get("ALLOCSEARCH_DEVICE_MEMORY")
    env_host = os.environ.get("ALLOCSEARCH_HOST_MEMORY")
    device = parse_bytes(env_dev) if env_dev else None
    host = parse_bytes(env_host) if env_host else None
    on_cluster = bool(cfg.backend.address or os.environ.get("RAY_ADDRESS"))
    if on_cluster and device is None and command in ("search", "compare"):
        return None
    if store is not None and not (Path(store) / "manifest.json").is_file():
        store = None
    try:
        return plan_memory(
            hf_config,
            cfg,
            model=str(model or cfg.model),
            command=command,
            device_memory=device,
            host_memory=host,
            execution=getattr(cfg.evaluator, "execution", "auto"),
            store=store,
            suggest=suggest,
        )
    except MemoryPlanError:
        raise
    except (ModelLoadError, KeyError, TypeError, ValueError):
        return None


def execution_for(
    cfg: RunConfig, *, store: str | os.PathLike | None = None, model: str | None = None
) -> str:
    """``"resident"`` or ``"streaming"``: what ``evaluator.execution = "auto"`` should run
    on this machine (:func:`check_run`'s plan; the detected memory, or the
    ``ALLOCSEARCH_*_MEMORY`` overrides). Resident when the plan cannot be made (a model
    without a config.json here); streaming when nothing fits (the smaller of the two).
    """
    probe = dataclasses.replace(cfg, evaluator=dataclasses.replace(cfg.evaluator, execution="auto"))
    try:
        plan = check_run(probe, "search", model=model, store=store, suggest=False)
    except MemoryPlanError:
        return "streaming"
    if plan is None or plan.mode is None:
        return "resident"
    return "streaming" if plan.mode == UNIT_STREAMING else plan.mode


def stream_unit_for(
    cfg: RunConfig, *, store: str | os.PathLike | None = None, model: str | None = None
) -> str:
    """``"block"`` or ``"unit"``: what a streaming evaluator holds at a time,
    ``cfg.evaluator.stream_unit`` unless ``auto``; then block when the plan fits block
    streaming on this machine (or cannot be made), else unit where the model's blocks
    split (the smaller, also when nothing fits)."""
    unit = getattr(cfg.evaluator, "stream_unit", "auto")
    if unit != "auto":
        return unit
    ev = dataclasses.replace(cfg.evaluator, execution="streaming", stream_unit="auto")
    try:
        plan = check_run(dataclasses.replace(cfg, evaluator=ev), "search", model=model,
                         store=store, suggest=False)  # fmt: skip
    except MemoryPlanError as e:
        return "unit" if e.plan is not None and UNIT_STREAMING in e.plan.modes else "block"
    return "unit" if plan is not None and plan.mode == UNIT_STREAMING else "block"
