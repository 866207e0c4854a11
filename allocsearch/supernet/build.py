"""Build a supernet: every unit of a model pruned at every level of a grid, into a store.

The model is processed block by block over the calibration sequences, so memory holds one
block's statistics and variants at a time, plus the hidden states of all calibration
sequences at the current block boundary:

1. **Capture.** Block ``b`` runs with its *dense* weights on the current hidden states,
   batch by batch; the input of every needed input group (q/k/v share one, gate/up share
   one) is added to a float32 Gram matrix ``H = sum_t x_t x_t^T``
   (:func:`~allocsearch.pruners.base.accumulate_stats`).
2. **Prune.** For every unit of the block the pruner produces all of the unit's levels at
   once, and each parameter's variants are written to the store.
3. **Advance.** The hidden states of all sequences go through block ``b`` with the weights
   chosen by ``input_mode``:

   * ``"dense"`` (EvoPress): the dense weights, so every variant of every layer is built
     from the dense model's activations;
   * ``"expected"`` (Týr-the-Pruner's expectation error accumulation): every pruned
     parameter replaced by the density-weighted mean of its variants,
     ``W_bar = sum_i (1 - s_i) W_i / sum_i (1 - s_i)`` over the unit's valid levels ``i``
     (``s_i`` the unit's exact sparsity at level ``i``), so the next block is calibrated
     on the expected output of a block whose levels are not chosen yet (the released Týr
     code makes this a no-op by mistake; this is the intended behaviour);
   * ``"centre"``: every pruned parameter at its unit's centre level (the cheaper
     variant of the same idea).

**Inputs inside a block are dense.** All layers of a block are calibrated on the
activations of the block with its dense weights (given the block input, which depends on
``input_mode``), not SparseGPT's sequential mode in which later layers see the output of
already-pruned earlier layers of the block. This is what EvoPress does, and it is the
only choice consistent with a search that picks each unit's level independently: a
sequential build would calibrate ``o_proj`` on one particular level of ``q/k/v``, which
the search may not pick.

**Units.** ``"unstructured"`` and ``"nm"``: one unit per prunable linear layer
(``adapter.layers()``). Structured: one unit per attention sublayer (``"heads"``; the
pruner removes key/value groups as input-column groups of ``o_proj``, and the matching
rows of q/k/v become dead) and one per MLP sublayer (``"neurons"``; columns of
``down_proj``, rows of gate/up dead); ``"heads_neurons"`` has both. Dead rows are stored
as nested masks of the input projections, so a unit's sparsity (and cost) counts them,
and the spec records the *exact* achieved sparsity of every level: the number of weights
the stored variants remove (zero entries of dense variants, pruned positions of nested
ones) divided by the unit's dense weight count.

**Mixtures of experts** (:class:`~allocsearch.models.moe.MoEAdapter`): every expert layer
is a unit (or, with ``tie_experts``, one unit per block and projection covers all experts).
An expert's statistics come from the tokens routed to it, weighted by its routing weight
(the adapter's taps; ``n_tokens`` is the routed count). An expert that receives no
calibration token has no statistics: it is reported (a :class:`NoCalibrationTokensWarning`
and the manifest's ``routing.no_tokens``) and its layers are pruned by magnitude. Each
expert unit's ``routing_frequency`` is its measured share of calibration tokens, which
weights its FLOPs in the cost tables; the manifest's ``routing`` entry keeps the counts.

**Stages as data.** Which layers form a unit and how it is pruned (per layer, structured
sublayer, tied or removable experts) is a :class:`~allocsearch.supernet.units.UnitPlan`
(:mod:`allocsearch.supernet.units`); the stages take the plans as data: capture
(:mod:`allocsearch.supernet.capture`), prune a unit at its levels
(:mod:`allocsearch.supernet.prune_unit`), MoE routing (:mod:`allocsearch.supernet.routing`),
and write the store (:class:`~allocsearch.supernet.store.StoreWriter`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, Literal

import jax
import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

import allocsearch
from allocsearch.console_progress import progress_display
from allocsearch.data.tokenset import TokenSet
from allocsearch.models.hf import HFModel
from allocsearch.models.moe import MoEAdapter
from allocsearch.models.streamed import block_on_device
from allocsearch.pruners.base import LocalPruner
from allocsearch.pruners.structured import StructuredPruner
from allocsearch.supernet.capture import advance_block, capture_block, embed_batches, input_norms
from allocsearch.supernet.experts import model_layers
from allocsearch.supernet.levels import LevelGrid
from allocsearch.supernet.prune_unit import (
    StructuredPrunerFactory,
    UnitTask,
    advance_weights,
    prune_task,
    unit_task,
    write_unit,
)
from allocsearch.supernet.routing import NoCalibrationTokensWarning, RoutingLog, routing_frequencies
from allocsearch.supernet.spec import Unit
from allocsearch.supernet.store import StoreWriter, SupernetStore, make_spec, resolve_storage_dtype
from allocsearch.supernet.units import (
    BUILD_STRUCTURES,
    STRUCTURED,
    UnitPlan,
    structured_layouts,
    supernet_units,
    unit_group_counts,
    unit_min_steps,
    unit_plans,
    unit_removed_groups,
)

__all__ = [
    "BUILD_STRUCTURES",
    "INPUT_MODES",
    "LayerMap",
    "NoCalibrationTokensWarning",
    "build_supernet",
    "structured_layouts",
    "routing_frequencies",
    "supernet_units",
    "unit_group_counts",
    "unit_min_steps",
    "unit_removed_groups",
]

# The names tests and older callers import from here (they moved with their stage).
_plans = unit_plans
_prune_task = prune_task
_UnitTask = UnitTask
_UnitPlan = UnitPlan

INPUT_MODES: Final[tuple[str, ...]] = ("dense", "expected", "centre")
"""Which weights advance the calibration hidden states past a pruned block."""

InputMode = Literal["dense", "expected", "centre"]

LayerMap = Callable[[Callable[[Any], Any], Iterable[Any]], Iterable[Any]]
"""Runs the pruning tasks of one block: ``map_layers(fn, tasks)`` returns ``fn(task)`` for
every task, in order, like the builtin ``map`` (the serial default), e.g.
:class:`~allocsearch.distributed.ray_backend.RayLayerMap` on Ray actors (then the pruner
must pickle).

A block's units are independent (all levels of one unit, from its dense weight and input
statistics, are one task). Results are consumed in unit order as they come, so a lazy
map keeps one unit's variants in memory at a time. The store is the same whichever map
runs the tasks, as long as the pruner computes the same result in another process
(which, for XLA on CPU, takes the same thread-pool sizes:
``RayLayerMap(like_driver=True)``)."""


# --------------------------------------------------------------------------- provenance


def _json_value(v: Any) -> Any:
    if isinstance(v, bool | int | float | str) or v is None:
        return v
    if isinstance(v, np.generic):
        return v.item()
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _json_value(getattr(v, f.name)) for f in dataclasses.fields(v)}
    return repr(v)


def _pruner_record(pruner: Any) -> dict[str, Any]:
    return {
        "name": pruner.name,
        "nested": bool(pruner.nested),
        "params": {
            f.name: _json_value(getattr(pruner, f.name))
            for f in dataclasses.fields(pruner)
            if f.name != "layout"
        }
        if dataclasses.is_dataclass(pruner)
        else {},
    }


# --------------------------------------------------------------------------- checks


def _check_grid(grid: LevelGrid, units: Sequence[Unit], structure: str) -> None:
    for attr in ("sparsity", "valid", "center"):
        if not hasattr(grid, attr):
            raise ValueError(f"grid must be a LevelGrid (sparsity, valid, center), got {grid!r}")
    n = len(units)
    s = np.asarray(grid.sparsity)
    if s.ndim != 2 or s.shape[0] != n:
        raise ValueError(
            f"grid.sparsity has shape {s.shape}, but a {structure!r} supernet of this model has "
            f"{n} units (rows); build the grid from supernet_units(adapter, {structure!r})"
        )
    # SupernetSpec validates the rest (prefix, monotonicity, centre) with the grid's values.
    make_spec(units, s, np.asarray(grid.valid, bool), grid.center, structure, grid.labels)


def _check_pruner(pruner: Any, structure: str) -> None:
    if structure in STRUCTURED:
        if isinstance(pruner, StructuredPruner) or not callable(pruner):
            raise ValueError(
                f"for structure {structure!r} pass a factory called as factory(layout=...), "
                f"e.g. StructuredPruner or functools.partial(StructuredPruner, percdamp=0.02): "
                f"each sublayer's layout comes from the model; got {pruner!r}"
            )
        return
    if (
        isinstance(pruner, type | StructuredPruner)  # a class or a structured pruner
        or not isinstance(pruner, LocalPruner)
    ):
        raise ValueError(
            f"for structure {structure!r} pass a LocalPruner instance (MagnitudePruner(), "
            f"WandaPruner(), SparseGPTPruner(), an N:M pruner), got {pruner!r}"
        )


# --------------------------------------------------------------------------- manifest


def manifest_model(model: HFModel) -> dict[str, Any]:
    """The manifest's ``model`` entry."""
    adapter = model.adapter
    return {
        "family": adapter.family,
        "model_type": adapter.model_type,
        "num_blocks": adapter.num_blocks,
        "path": model.path,
    }


def manifest_build(batch_size: int, n_tokens: int, t_start: float, **extra: Any) -> dict:
    """The manifest's ``build`` entry (``extra`` before the totals)."""
    return {
        "batch_size": batch_size,
        "n_tokens": n_tokens,
        **extra,
        "seconds_total": time.perf_counter() - t_start,
        "jax_backend": jax.default_backend(),
        "allocsearch_version": allocsearch.__version__,
    }


# --------------------------------------------------------------------------- stages


@dataclass
class _Levels:
    """The grid's levels as the build fills them: ``valid`` (a copy) loses the removed
    level of protected experts, ``achieved`` gets each stored level's exact sparsity."""

    sparsity: np.ndarray  # float64[L, K] requested
    valid: np.ndarray  # bool[L, K]
    n_grid: np.ndarray  # int[L]: levels of each unit in the grid
    center: np.ndarray  # int64[L]
    achieved: np.ndarray  # float64[L, K], NaN until written

    @classmethod
    def of(cls, grid: LevelGrid, plans: Sequence[UnitPlan]) -> _Levels:
        sparsity = np.asarray(grid.sparsity, np.float64)
        valid = np.array(grid.valid, bool)
        n_grid = valid.sum(axis=1)
        for u, plan in enumerate(plans):
            if plan.removable and sparsity[u, n_grid[u] - 1] != 1.0:
                raise ValueError(
                    f"expert unit {plan.unit.name!r} has no removed level (sparsity 1.0 last) "
                    f"in the grid; add it with supernet.experts.with_removed_level(grid, units)"
                )
        center = np.asarray(grid.center, np.int64)
        return cls(sparsity, valid, n_grid, center, np.full(sparsity.shape, np.nan))

    def adds_removed(self, u: int, plan: UnitPlan) -> bool:
        """Whether unit ``u``'s removed level is stored (as zeros, not pruned)."""
        return bool(plan.removable and self.valid[u, self.n_grid[u] - 1])

    def pruned(self, u: int, plan: UnitPlan) -> np.ndarray:
        """float64[K']: the levels the pruner produces for unit ``u``."""
        if self.adds_removed(u, plan):
            return self.sparsity[u, : self.n_grid[u] - 1]
        return self.sparsity[u, self.valid[u]]


class _Steps:
    """The build's progress bar: ``step(text)`` describes the next step and returns the
    callable that counts it done."""

    def __init__(self, total: int, enabled: bool):
        self.display = progress_display(
            (
                TextColumn("[bold]supernet[/] {task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            ),
            console=Console(stderr=True),
            label="supernet",
            enabled=enabled,
        )
        self.total = total

    def __enter__(self) -> _Steps:
        self.display.__enter__()
        self.task = self.display.add_task("embedding", total=self.total)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.display.__exit__(*exc)

    def step(self, text: str) -> Callable[[], None]:
        self.display.update(self.task, description=text)
        return partial(self.display.advance, self.task)


@dataclass
class _Build:
    """One build: its fixed inputs, and what it accumulates over the blocks."""

    model: HFModel
    calibration: TokenSet
    plans: tuple[UnitPlan, ...]
    levels: _Levels
    pruner: LocalPruner | StructuredPrunerFactory
    layer_map: LayerMap
    input_mode: str
    batch_size: int
    writer: StoreWriter
    steps: _Steps
    routing: RoutingLog | None
    block_layers: dict[int, list] = field(default_factory=dict)
    input_norms: dict[str, np.ndarray] = field(default_factory=dict)
    seconds_per_block: list[float] = field(default_factory=list)

    @classmethod
    def start(cls, model, calibration, plans, levels, progress, options, batch_size, **fixed):
        """A build of ``plans``: its progress bar's steps, its routing log (mixture of
        experts) and each block's layers (``options``: build_supernet's keywords)."""
        adapter, input_mode = model.adapter, fixed["input_mode"]
        n_blocks, n_batches = adapter.num_blocks, -(-len(calibration.tokens) // batch_size)
        advance_steps = 0 if input_mode == "dense" else n_batches * (n_blocks - 1)
        steps = _Steps(n_blocks * n_batches + len(plans) + advance_steps, progress)
        routing = None
        if isinstance(adapter, MoEAdapter):
            routing = RoutingLog(adapter, calibration.n_tokens, options["expert_removal"])
        build = cls(
            model,
            calibration,
            plans,
            levels,
            batch_size=batch_size,
            steps=steps,
            routing=routing,
            **fixed,
        )
        for layer in model_layers(adapter, routers=options["prune_router"]):
            build.block_layers.setdefault(layer.block, []).append(layer)
        return build

    def run(self) -> None:
        """Every block, from the embedded calibration batches on."""
        with self.steps:
            hidden, contexts = embed_batches(
                self.model.adapter, self.model.params, self.calibration.tokens, self.batch_size
            )
            for b in range(self.model.adapter.num_blocks):
                hidden = self.block(b, hidden, contexts)

    def block(self, b: int, hidden: list, contexts: list) -> list:
        """Capture, prune and write, and advance past block ``b``; returns the hidden
        states at the next block boundary."""
        t_block = time.perf_counter()
        adapter, n_blocks = self.model.adapter, self.model.adapter.num_blocks
        prefix = adapter.block_prefix(b)
        block_plans = [(u, p) for u, p in enumerate(self.plans) if p.unit.block == b]
        block_params = block_on_device(adapter, self.model.params, b)
        groups = sorted(
            {
                layer.input_group[len(prefix) :]
                for _, p in block_plans
                for layer in (p.layers if p.tied else (p.primary,))
            }
        )
        last = b == n_blocks - 1
        where = f"block {b + 1}/{n_blocks}"
        captured = capture_block(
            adapter,
            block_params,
            hidden,
            contexts,
            groups,
            keep_output=self.input_mode == "dense" and not last,
            on_batch=lambda i: self.steps.step(f"{where}: batch {i + 1} inputs"),
        )
        fallback: set[str] = set()
        if self.routing is not None:
            fallback = self.routing.block(
                b,
                captured.counts,
                captured.stats,
                block_plans,
                self.levels.valid,
                self.levels.n_grid,
                stacklevel=4,
            )
        self.input_norms.update(input_norms(self.block_layers[b], prefix, captured))
        advance = self.prune(block_plans, block_params, prefix, captured.stats, fallback, b)
        del captured.stats
        if captured.output is not None:
            hidden = captured.output
        elif not last:
            hidden = advance_block(
                adapter,
                {**block_params, **advance},
                hidden,
                contexts,
                on_batch=lambda i: self.steps.step(
                    f"{where}: advancing batch {i + 1} ({self.input_mode} weights)"
                ),
            )
        jax.block_until_ready(hidden)
        self.seconds_per_block.append(time.perf_counter() - t_block)
        return hidden

    def prune(self, block_plans, block_params, prefix, stats, fallback, b: int) -> dict:
        """Prune every unit of block ``b`` at all its levels (independent tasks, run by the
        layer map) and write the variants in unit order; returns the weights that advance
        the hidden states (``expected`` / ``centre`` input modes, not the last block)."""
        levels, n_blocks = self.levels, self.model.adapter.num_blocks
        tasks = [
            unit_task(
                plan,
                block_params,
                prefix,
                stats,
                fallback,
                levels.pruned(u, plan),
                add_removed=levels.adds_removed(u, plan),
            )
            for u, plan in block_plans
        ]
        advance: dict[str, jax.Array] = {}
        results = iter(self.layer_map(partial(prune_task, self.pruner), tasks))
        for (u, plan), job in zip(block_plans, tasks, strict=True):
            done = self.steps.step(f"block {b + 1}/{n_blocks}: pruning {plan.unit.name}")
            by_param = next(results, None)
            if by_param is None:
                raise ValueError(
                    f"map_layers {self.layer_map!r} returned fewer results than the "
                    f"{len(tasks)} units of block {b}"
                )
            n_levels = len(job.levels) + job.add_removed
            removed = write_unit(self.writer, by_param, self.writer.storage_dtype)
            levels.achieved[u, :n_levels] = removed / plan.unit.numel
            if self.input_mode != "dense" and b < n_blocks - 1:
                advance.update(
                    advance_weights(
                        by_param,
                        block_params,
                        prefix,
                        self.input_mode,
                        levels.achieved[u, :n_levels],
                        int(levels.center[u]),
                    )
                )
            del by_param
            done()
        return advance


def _check_inputs(model: HFModel, calibration: TokenSet, input_mode: str, batch_size: int):
    if input_mode not in INPUT_MODES:
        raise ValueError(f"input_mode {input_mode!r} is not supported; valid: {INPUT_MODES}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (sequences), got {batch_size!r}")
    if not model.fingerprint:
        raise ValueError(
            "model.fingerprint is empty; a store is keyed by it (load the model with "
            "load_model, or set it with models.hf.fingerprint_tensors)"
        )
    if not isinstance(calibration, TokenSet):
        raise ValueError(f"calibration must be a TokenSet, got {type(calibration).__name__}")


def _check_map(map_layers: LayerMap | None) -> LayerMap:
    layer_map: LayerMap = map if map_layers is None else map_layers
    if not callable(layer_map):
        raise ValueError(
            f"map_layers must be a callable like map(fn, tasks) (e.g. a RayLayerMap) or None, "
            f"got {map_layers!r}"
        )
    return layer_map


def _pruner_provenance(pruner, plans, structure: str, adapter, query_heads: bool) -> dict:
    """The manifest's ``pruner`` entry (structured: with the sublayer layouts)."""
    if structure not in STRUCTURED:
        return _pruner_record(pruner)
    record = _pruner_record(pruner(layout=plans[0].layout))
    heads, neurons = structured_layouts(adapter, query_heads=query_heads)
    record["layouts"] = {"attn": _json_value(heads), "mlp": _json_value(neurons)}
    return record


def _commit(build: _Build, grid: LevelGrid, structure: str, options, manifest) -> str:
    """Write the spec of the achieved levels, the input norms and the manifest (its
    ``pruner``, ``storage_dtype`` and ``t_start`` entries in ``manifest``)."""
    lv, units, calibration = build.levels, tuple(p.unit for p in build.plans), build.calibration
    routing = {}
    if build.routing is not None:
        units = build.routing.units(units)
        routing = {
            "routing": build.routing.manifest(
                tie_experts=options["tie_experts"], prune_router=options["prune_router"]
            )
        }
    try:
        spec = make_spec(units, lv.achieved, lv.valid, lv.center, structure, grid.labels)
    except ValueError as e:
        raise ValueError(
            f"the achieved sparsities do not form a valid spec ({e}); the stored variants "
            f"remove {lv.achieved.tolist()} of each unit's weights"
        ) from None
    build.writer.add_input_norms(build.input_norms)
    return build.writer.commit(
        spec=spec,
        unit_params=[p.params for p in build.plans],
        grid=grid,
        model_fingerprint=build.model.fingerprint,
        tokens_fingerprint=calibration.fingerprint,
        pruner=manifest["pruner"],
        input_mode=build.input_mode,
        extra={
            "model": manifest_model(build.model),
            "calibration": calibration.provenance(),
            "structure": structure,
            "within_block_inputs": "dense",
            "storage_dtype": manifest["storage_dtype"],
            **routing,
            "build": manifest_build(
                build.batch_size,
                calibration.n_tokens,
                manifest["t_start"],
                seconds_per_block=build.seconds_per_block,
            ),
        },
    )


def build_supernet(
    model: HFModel,
    calibration: TokenSet,
    *,
    pruner: LocalPruner | StructuredPrunerFactory,
    grid: LevelGrid,
    structure: str,
    input_mode: InputMode,
    out_dir: str | os.PathLike,
    batch_size: int,
    progress: bool = True,
    overwrite: bool = False,
    storage_dtype: str = "auto",
    map_layers: LayerMap | None = None,
    query_heads: bool = False,
    tie_experts: bool = False,
    expert_removal: bool = False,
    prune_router: bool = False,
) -> SupernetStore:
    """Prune every unit of ``model`` at every level of ``grid`` and write the store.

    See the module docstring for the algorithm, the input modes and the units.

    Args:
      model: the dense model; ``model.fingerprint`` must be set (it keys the store).
      calibration: calibration sequences (int32[n_seq, seq_len]); every sequence is used.
      pruner: a :class:`~allocsearch.pruners.base.LocalPruner` for ``"unstructured"`` /
        ``"nm"``; for structured kinds a factory called as ``pruner(layout=...)`` per unit
        (``StructuredPruner`` or a ``functools.partial`` of it).
      grid: requested levels, one row per unit of :func:`supernet_units` (``sparsity``
        float64[L, K], ``valid`` bool[L, K], ``center`` int32[L]); e.g. from
        :mod:`allocsearch.supernet.levels`, centred on any allocation.
      structure: one of :data:`BUILD_STRUCTURES`.
      input_mode: ``"dense"``, ``"expected"`` or ``"centre"`` (see the module docstring).
      out_dir: the store directory to create.
      batch_size: calibration sequences per forward batch (memory vs speed).
      progress: show a progress bar with ETA on stderr.
      overwrite: replace an existing ``out_dir``; otherwise an existing one is refused
        before any work.
      storage_dtype: dtype of dense variant weights (SparseGPT, structured): ``"auto"``
        (default: the model's parameter dtype), ``"float32"`` or ``"bfloat16"``; the
        manifest records the resolved one.
      tie_experts: for mixture-of-experts models, one unit per block and expert
        projection covering every routed expert (all experts of a block share one level;
        each is still pruned from its own statistics) instead of one unit per expert
        layer, for search spaces that must stay small (see :func:`supernet_units`).
      expert_removal: for mixture-of-experts models, one unit per routed expert whose
        last level removes it (:mod:`allocsearch.supernet.experts`): every expert row of
        ``grid`` must end at sparsity 1.0 (:func:`~allocsearch.supernet.experts.
        with_removed_level`); the ``top_k`` most routed experts of each block lose that
        level (recorded in the manifest's ``routing.protected``).
      prune_router: for mixture-of-experts models, each block's router is a unit.
      map_layers: runs each block's unit pruning tasks (:data:`LayerMap`): ``None`` or
        ``map`` here, one after the other; a ``RayLayerMap`` on Ray actors.
      query_heads: structured attention units remove single query heads instead of kv
        groups (the grid's attention rows then count query heads:
        ``unit_group_counts(adapter, structure, query_heads=True)``); recorded in the
        manifest's layouts.

    Returns:
      The opened store. Its ``spec`` holds the exact sparsity of every stored level; its
      manifest's ``build`` entry has seconds per block.

    Raises:
      ValueError: bad structure, input mode, batch size, pruner kind, storage dtype,
        missing model fingerprint, a grid that does not fit the units, or levels a pruner
        refuses.
      FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
    """
    t_start = time.perf_counter()
    _check_inputs(model, calibration, input_mode, batch_size)
    options = dict(
        tie_experts=tie_experts, expert_removal=expert_removal, prune_router=prune_router
    )
    plans = unit_plans(model.adapter, structure, query_heads=query_heads, **options)
    layer_map = _check_map(map_layers)
    _check_pruner(pruner, structure)
    _check_grid(grid, [p.unit for p in plans], structure)
    storage_dtype = resolve_storage_dtype(
        storage_dtype, model.params[plans[0].primary.weight_name].dtype
    )
    levels = _Levels.of(grid, plans)
    manifest = {
        "pruner": _pruner_provenance(pruner, plans, structure, model.adapter, query_heads),
        "storage_dtype": storage_dtype,
        "t_start": t_start,
    }
    with StoreWriter(out_dir, overwrite=overwrite, storage_dtype=storage_dtype) as writer:
        fixed = dict(pruner=pruner, layer_map=layer_map, input_mode=input_mode, writer=writer)
        build = _Build.start(
            model, calibration, plans, levels, progress, options, batch_size, **fixed
        )
        build.run()
        path = _commit(build, grid, structure, options, manifest)
    return SupernetStore.open(
        path,
        model_fingerprint=model.fingerprint,
        tokens_fingerprint=calibration.fingerprint,
        verify="none",  # just written; its digests were computed from these bytes
    )
