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
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Literal

import jax
import jax.numpy as jnp
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
from allocsearch.models.base import ModelAdapter
from allocsearch.models.bert import BertAdapter
from allocsearch.models.gpt2 import GPT2Adapter
from allocsearch.models.hf import HFModel
from allocsearch.models.layers import LayerInfo
from allocsearch.models.llama import RotaryDecoderAdapter
from allocsearch.models.moe import MOE_MODEL_TYPES as MOE_TYPES
from allocsearch.models.moe import MoEAdapter
from allocsearch.models.phi3 import Phi3Adapter
from allocsearch.models.streamed import block_on_device, embed_program, outer_on_device
from allocsearch.pruners.base import (
    LayerStats,
    LocalPruner,
    NestedVariants,
    Variants,
    accumulate_stats,
)
from allocsearch.pruners.magnitude import MagnitudePruner
from allocsearch.pruners.structured import HeadGroups, NeuronGroups, StructuredPruner
from allocsearch.supernet.experts import (
    EXPERT_ROLE,
    check_expert_options,
    model_layers,
    protected_experts,
    with_removed_variant,
)
from allocsearch.supernet.levels import LevelGrid
from allocsearch.supernet.spec import Unit
from allocsearch.supernet.store import (
    STORAGE_DTYPES,
    StoreWriter,
    SupernetStore,
    make_spec,
    resolve_storage_dtype,
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
    "unit_removed_groups",
]

INPUT_MODES: Final[tuple[str, ...]] = ("dense", "expected", "centre")
"""Which weights advance the calibration hidden states past a pruned block."""
BUILD_STRUCTURES: Final[tuple[str, ...]] = (
    "unstructured",
    "nm",
    "heads",
    "neurons",
    "heads_neurons",
)
"""Unit structures ``build_supernet`` can build (the same names as ``SupernetSpec``)."""

InputMode = Literal["dense", "expected", "centre"]
StructuredPrunerFactory = Callable[..., StructuredPruner]
"""Called as ``factory(layout=...)`` once per structured unit, e.g. ``StructuredPruner``
itself or ``functools.partial(StructuredPruner, percdamp=0.02)``."""

LayerMap = Callable[[Callable[[Any], Any], Iterable[Any]], Iterable[Any]]
"""Runs the pruning tasks of one block: ``map_layers(fn, tasks)`` returns ``fn(task)`` for
every task, in order, like the builtin ``map`` (the serial default), e.g.
:class:`~allocsearch.distributed.ray_backend.RayLayerMap` on Ray actors."""

_ATTN_ROLES: Final = frozenset({"q", "k", "v", "qkv", "o"})
_MLP_ROLES: Final = frozenset({"gate", "up", "down", "fc_in", "fc_out"})
_OUTPUT_ROLES: Final = frozenset({"o", "down", "fc_out"})
_STRUCTURED: Final = frozenset({"heads", "neurons", "heads_neurons"})


class NoCalibrationTokensWarning(UserWarning):
    """A mixture-of-experts expert received no calibration token; its layers were pruned
    by magnitude instead of the requested pruner."""


# --------------------------------------------------------------------------- units


@dataclass(frozen=True)
class _UnitPlan:
    """How one unit is pruned.

    ``primary`` is the layer the pruner runs on (the layer itself, or the output
    projection of a structured sublayer); ``dead`` are the input projections whose rows a
    structured level removes; ``layout`` is the sublayer's group geometry.
    """

    unit: Unit
    primary: LayerInfo
    layers: tuple[LayerInfo, ...]
    layout: HeadGroups | NeuronGroups | None = None
    tied: bool = False  # experts tied to one level: each layer pruned on its own
    removable: bool = False  # a whole expert: its last level (removed) is all zeros

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(layer.weight_name for layer in self.layers)


def structured_layouts(
    adapter: ModelAdapter, *, query_heads: bool = False
) -> tuple[HeadGroups, NeuronGroups]:
    """Group geometry of the attention and MLP sublayers of a model (same in every block).

    Args:
      adapter: the model family adapter.
      query_heads: attention groups are single query heads instead of kv groups (see
        :mod:`allocsearch.pruners.structured`; the same for multi-head attention).

    Returns:
      ``(HeadGroups, NeuronGroups)`` with the model's widths, head counts and biases and
      the default minimum steps (1 kv group or query head, 32 neurons).

    Raises:
      ValueError: a model family without a structured layout (naming the valid ones).
    """
    if isinstance(adapter, RotaryDecoderAdapter) and not isinstance(adapter, MoEAdapter):
        c = adapter.cfg  # the Llama family and Phi-3
        fused = isinstance(adapter, Phi3Adapter)  # qkv_proj and gate_up_proj
        heads = HeadGroups(
            hidden_size=c.hidden_size,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            qkv_bias=c.qkv_bias,
            o_bias=c.o_bias,
            query_heads=query_heads,
            fused_qkv=fused,
        )
        mlp = NeuronGroups(
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            gated=True,
            fused_gate_up=fused,
            in_bias=c.mlp_bias,
            out_bias=c.mlp_bias,
        )
        return heads, mlp
    if isinstance(adapter, GPT2Adapter | BertAdapter):
        c = adapter.cfg
        d, n_heads, inter = (
            (c.n_embd, c.n_head, c.n_inner)
            if isinstance(adapter, GPT2Adapter)
            else (c.hidden_size, c.num_attention_heads, c.intermediate_size)
        )
        heads = HeadGroups(
            hidden_size=d,
            num_heads=n_heads,
            num_kv_heads=n_heads,
            head_dim=d // n_heads,
            qkv_bias=True,
            o_bias=True,
            query_heads=query_heads,
            fused_qkv=isinstance(adapter, GPT2Adapter),
        )
        mlp = NeuronGroups(
            hidden_size=d, intermediate_size=inter, gated=False, in_bias=True, out_bias=True
        )
        return heads, mlp
    raise ValueError(
        f"structured pruning has no layout for model family {adapter.family!r}; "
        f"valid families: 'llama', 'phi3', 'gpt2', 'bert'"
    )


def _common_module(names: Sequence[str], block_path: str, fallback: str) -> str:
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    name = ".".join(common)
    # BERT's MLP spans two modules (intermediate, output) with no common parent but the
    # block itself; name it after the block.
    return name if name != block_path else f"{block_path}.{fallback}"


def _layer_plan(layer: LayerInfo) -> _UnitPlan:
    unit = Unit(
        name=layer.name,
        role=layer.role,
        block=layer.block,
        layers=(layer.name,),
        numel=layer.numel,
        flops_per_token=layer.flops_per_token,
    )
    return _UnitPlan(unit=unit, primary=layer, layers=(layer,))


def _tied_plans(
    adapter: MoEAdapter, layers: Sequence[LayerInfo], *, by_expert: bool = False
) -> tuple[_UnitPlan, ...]:
    """One unit per (block, projection) over all routed experts, or with ``by_expert`` one
    per routed expert over its projections (expert removal), at its first member's place
    in forward order; every other layer is its own unit."""
    plans: list[_UnitPlan | tuple[int, str]] = []  # (block, projection) of a tied unit
    tied: dict[tuple[int, str], list[LayerInfo]] = {}
    for layer in layers:
        where = adapter.expert_of(layer.name)
        if where is None:
            plans.append(_layer_plan(layer))
            continue
        proj = str(where[1]) if by_expert else layer.name.rsplit(".", 1)[1]
        key = (layer.block, proj)
        if key not in tied:
            tied[key] = []
            plans.append(key)
        tied[key].append(layer)
    out = []
    for p in plans:
        if isinstance(p, _UnitPlan):
            out.append(p)
            continue
        members = tuple(tied[p])
        first = members[0]
        unit = Unit(
            name=f"{adapter.block_prefix(p[0])}{adapter.moe.module}.experts.{p[1]}",
            role=EXPERT_ROLE if by_expert else first.role,
            block=first.block,
            layers=tuple(m.name for m in members),
            numel=sum(m.numel for m in members),
            flops_per_token=sum(m.flops_per_token for m in members),
        )
        out.append(
            _UnitPlan(unit=unit, primary=first, layers=members, tied=True, removable=by_expert)
        )
    return tuple(out)


def _plans(
    adapter: ModelAdapter,
    structure: str,
    *,
    query_heads: bool = False,
    tie_experts: bool = False,
    expert_removal: bool = False,
    prune_router: bool = False,
) -> tuple[_UnitPlan, ...]:
    if structure not in BUILD_STRUCTURES:
        raise ValueError(f"structure {structure!r} is not supported; valid: {BUILD_STRUCTURES}")
    check_expert_options(
        adapter,
        structure,
        expert_removal=expert_removal,
        prune_router=prune_router,
        tie_experts=tie_experts,
    )
    layers = model_layers(adapter, routers=prune_router)
    if expert_removal:
        return _tied_plans(adapter, layers, by_expert=True)
    if tie_experts:
        if not isinstance(adapter, MoEAdapter):
            raise ValueError(
                f"tie_experts needs a mixture-of-experts model (one of {sorted(MOE_TYPES)}), "
                f"got model_type {adapter.model_type!r}"
            )
        if structure not in ("unstructured", "nm"):
            raise ValueError(
                f"tie_experts works with structure 'unstructured' or 'nm', not {structure!r}"
            )
        return _tied_plans(adapter, layers)
    if structure in ("unstructured", "nm"):
        return tuple(_layer_plan(layer) for layer in layers)
    heads, neurons = structured_layouts(adapter, query_heads=query_heads)
    kinds = []
    if structure in ("heads", "heads_neurons"):
        kinds.append(("attn", _ATTN_ROLES, heads))
    if structure in ("neurons", "heads_neurons"):
        kinds.append(("mlp", _MLP_ROLES, neurons))
    plans = []
    for b in range(adapter.num_blocks):
        block_layers = [layer for layer in layers if layer.block == b]
        block_path = adapter.block_prefix(b).rstrip(".")
        for role, roles, layout in kinds:
            members = tuple(layer for layer in block_layers if layer.role in roles)
            outputs = [layer for layer in members if layer.role in _OUTPUT_ROLES]
            if len(outputs) != 1:
                raise ValueError(
                    f"block {b}: expected one output projection among {[m.name for m in members]}"
                )
            primary = outputs[0]
            if primary.shape != (layout.hidden_size, layout.in_features):
                raise ValueError(
                    f"{primary.name} has shape {primary.shape}, but the {role} layout expects "
                    f"({layout.hidden_size}, {layout.in_features})"
                )
            names = [m.name for m in members]
            unit = Unit(
                name=_common_module(names, block_path, role),
                role=role,
                block=b,
                layers=tuple(names),
                numel=sum(m.numel for m in members),
                flops_per_token=sum(m.flops_per_token for m in members),
            )
            plans.append(_UnitPlan(unit=unit, primary=primary, layers=members, layout=layout))
    return tuple(plans)


def supernet_units(
    adapter: ModelAdapter,
    structure: str,
    *,
    tie_experts: bool = False,
    expert_removal: bool = False,
    prune_router: bool = False,
) -> tuple[Unit, ...]:
    """The units a supernet of ``structure`` has, in forward order (the rows a grid for
    :func:`build_supernet` must have).

    Args:
      adapter: the model family adapter.
      structure: one of :data:`BUILD_STRUCTURES`.

    Returns:
      ``Unit`` per prunable layer (``"unstructured"``, ``"nm"``), or per attention
      sublayer (role ``"attn"``, covering q/k/v/o) and/or MLP sublayer (role ``"mlp"``,
      covering gate/up/down) for the structured kinds. With ``tie_experts`` (MoE models)
      one unit per block and expert projection covers every routed expert; with
      ``expert_removal`` one unit per routed expert (role ``"expert"``) covers its three
      projections (:mod:`allocsearch.supernet.experts`); with ``prune_router`` each
      block's router is a unit (role ``"router"``).
    """
    plans = _plans(
        adapter,
        structure,
        tie_experts=tie_experts,
        expert_removal=expert_removal,
        prune_router=prune_router,
    )
    return tuple(p.unit for p in plans)


def unit_group_counts(
    adapter: ModelAdapter, structure: str, *, query_heads: bool = False
) -> np.ndarray:
    """int64[L]: removable groups per structured unit (kv groups, or query heads with
    ``query_heads``, for ``attn`` units; neurons for ``mlp`` units), the ``groups``
    argument of :func:`~allocsearch.supernet.levels.structured_grid`."""
    if structure not in _STRUCTURED:
        raise ValueError(
            f"group counts exist for structured supernets only; structure {structure!r} is "
            f"not one of {sorted(_STRUCTURED)}"
        )
    plans = _plans(adapter, structure, query_heads=query_heads)
    return np.array([p.layout.num_groups for p in plans], dtype=np.int64)


def unit_removed_groups(store: SupernetStore) -> np.ndarray:
    """int64[L, K]: groups each level of a structured store removes (-1 past a unit's
    levels), read from the stored group keep masks of each unit's output projection.

    With kv-group units this is ``round(sparsity * groups)``; with query-head units the
    fraction of weights a level removes is not its fraction of heads (k/v rows die only
    with a kv head's last query head), so the count is read, not derived.
    """
    spec = store.spec
    if spec.structure not in _STRUCTURED:
        raise ValueError(
            f"removed groups exist for structured stores only; {store.path} holds a "
            f"{spec.structure!r} supernet"
        )
    out = np.full(spec.sparsity.shape, -1, np.int64)
    for u, params in enumerate(store.unit_params):
        keeps = [getattr(store.variants(p), "group_keep", None) for p in params]
        keep = next((np.asarray(k, bool) for k in keeps if k is not None), None)
        if keep is None:
            raise ValueError(f"{store.path}: unit {spec.units[u].name!r} has no group keep masks")
        out[u, : keep.shape[0]] = (~keep).sum(axis=1)
    return out


def unit_min_steps(
    adapter: ModelAdapter, structure: str, *, query_heads: bool = False
) -> np.ndarray:
    """int64[L]: the smallest level step of each structured unit, in its groups (Týr: one
    kv group for ``attn`` units, ``MIN_NEURON_STEP`` = 32 neurons for ``mlp`` units), the
    ``min_items`` argument of :func:`~allocsearch.search.coarse_to_fine.centred_grid`."""
    if structure not in _STRUCTURED:
        raise ValueError(
            f"minimum steps exist for structured supernets only; structure {structure!r} is "
            f"not one of {sorted(_STRUCTURED)}"
        )
    plans = _plans(adapter, structure, query_heads=query_heads)
    return np.array([p.layout.min_step for p in plans], dtype=np.int64)


# --------------------------------------------------------------------------- variants


def _dead_row_variants(
    layout: HeadGroups | NeuronGroups, group_keep: np.ndarray, layer: LayerInfo
) -> NestedVariants:
    """Nested masks removing the rows of ``layer`` that each level's group keep mask
    (bool[K, G], nested) makes dead.

    The pruning order lists rows by the first level at which they die (then by index),
    each row's ``in`` weights consecutively, so ``rank >= dead_rows(k) * in`` keeps exactly
    the rows alive at level ``k``.
    """
    k_levels = group_keep.shape[0]
    dead = np.stack([layout.dead_rows(group_keep[k])[layer.role] for k in range(k_levels)])
    rows, n_in = layer.shape
    if dead.shape != (k_levels, rows):
        raise ValueError(f"{layer.name}: dead-row masks {dead.shape} do not fit shape {rows}")
    if np.any(dead[:-1] & ~dead[1:]):
        raise ValueError(f"{layer.name}: structured levels are not nested; cannot store as ranks")
    first = np.where(dead.any(axis=0), dead.argmax(axis=0), k_levels)
    order = np.lexsort((np.arange(rows), first))
    position = np.empty(rows, np.int64)
    position[order] = np.arange(rows)
    n_dead = dead.sum(axis=1).astype(np.int64)
    assert np.array_equal(position[None, :] >= n_dead[:, None], ~dead)
    rank = (position[:, None] * n_in + np.arange(n_in)[None, :]).astype(np.int32)
    counts = n_dead * n_in
    return NestedVariants(
        rank=jnp.asarray(rank),
        per_row=False,
        prune_counts=counts.astype(np.int32),
        sparsity=counts / layer.numel,
    )


def _removed_counts(variants: Variants, storage_dtype: str) -> np.ndarray:
    """int64[K]: weights each level removes, as stored (zeros of dense variants are
    counted after the cast to the storage dtype)."""
    if isinstance(variants, NestedVariants):
        counts = np.asarray(variants.prune_counts, np.int64)
        return counts.sum(axis=1) if variants.per_row else counts
    return np.asarray(_zeros_per_level(variants.weights, STORAGE_DTYPES[storage_dtype]), np.int64)


@partial(jax.jit, static_argnums=1)
def _zeros_per_level(weights: jax.Array, dtype: np.dtype) -> jax.Array:
    """int32[K]: zero entries of each level's weights after a cast to ``dtype``."""
    return jnp.sum(weights.astype(dtype) == 0, axis=(1, 2), dtype=jnp.int32)


@partial(jax.jit, static_argnames="per_row")
def _nested_expected(
    rank: jax.Array, counts: jax.Array, coef: jax.Array, weight: jax.Array, *, per_row: bool
) -> jax.Array:
    """float32[out, in]: ``W * sum_k coef_k mask_k`` for nested masks (one pass per level)."""

    def add(k, acc):
        c = counts[k][:, None] if per_row else counts[k]
        return acc + coef[k] * (rank >= c).astype(jnp.float32)

    keep = jax.lax.fori_loop(0, coef.shape[0], add, jnp.zeros(rank.shape, jnp.float32))
    return keep * weight.astype(jnp.float32)


@jax.jit
def _dense_expected(weights: jax.Array, coef: jax.Array) -> jax.Array:
    return jnp.tensordot(coef, weights, axes=1, precision=jax.lax.Precision.HIGHEST)


def _expected_weight(variants: Variants, weight: jax.Array, sparsity: np.ndarray) -> jax.Array:
    """float32[out, in]: ``sum_i (1 - s_i) W_i / sum_i (1 - s_i)`` over the levels.

    A unit whose every level removes everything has a zero mean weight.
    """
    density = 1.0 - np.asarray(sparsity, np.float64)
    total = float(density.sum())
    if total <= 0.0:
        return jnp.zeros(weight.shape, jnp.float32)
    coef = jnp.asarray(density / total, jnp.float32)
    if isinstance(variants, NestedVariants):
        return _nested_expected(
            variants.rank,
            jnp.asarray(variants.prune_counts),
            coef,
            weight,
            per_row=variants.per_row,
        )
    return _dense_expected(variants.weights, coef)


def _level_weight(variants: Variants, weight: jax.Array, k: int) -> jax.Array:
    """float32[out, in]: the weight of level ``k``."""
    if isinstance(variants, NestedVariants):
        return variants.weights(weight, k)
    return variants.weights[k]


def _prune_unit(
    plan: _UnitPlan,
    pruner: LocalPruner | StructuredPrunerFactory,
    weight: jax.Array,
    stats: LayerStats | None,
    levels: np.ndarray,
) -> dict[str, Variants]:
    """All levels of one unit, keyed by parameter name in the unit's layer order."""
    assert not plan.tied, "tied units are pruned layer by layer (_UnitTask.members)"
    if plan.layout is None:
        by_param = {plan.primary.weight_name: pruner.prune(weight, stats, levels)}
    else:
        structured = pruner(layout=plan.layout)
        if not isinstance(structured, StructuredPruner):
            raise ValueError(
                f"the structured pruner factory returned {structured!r}, not a StructuredPruner"
            )
        primary = structured.prune(weight, stats, levels)
        keep = np.asarray(primary.group_keep, bool)
        by_param = {
            layer.weight_name: primary
            if layer is plan.primary
            else _dead_row_variants(plan.layout, keep, layer)
            for layer in plan.layers
        }
    for param, variants in by_param.items():
        if variants.num_levels != len(levels):
            raise ValueError(
                f"the pruner returned {variants.num_levels} levels for {param}, "
                f"{len(levels)} were asked for"
            )
    return {param: by_param[param] for param in plan.params}


@dataclass(frozen=True)
class _UnitTask:
    """What pruning one unit at all its levels needs: one independent task of a block.

    ``weight`` is the primary layer's dense weight, ``stats`` the statistics of its input
    (``None`` for pruners that need none), ``levels`` float64[K] the requested sparsities.
    ``fallback``: prune by magnitude (an expert that received no calibration token).
    ``members``: for a tied unit, one task per layer (then ``weight`` and ``stats`` are
    None).
    """

    plan: _UnitPlan
    weight: jax.Array | None
    stats: LayerStats | None
    levels: np.ndarray
    fallback: bool = False
    members: tuple[_UnitTask, ...] = ()
    add_removed: bool = False  # append the removed level (all zeros) after ``levels``


def _layer_task(
    plan: _UnitPlan,
    block_params: Mapping[str, jax.Array],
    prefix: str,
    stats: Mapping[str, LayerStats | None],
    fallback: set[str],
    levels: np.ndarray,
) -> _UnitTask:
    """The task of a unit pruned from its primary layer's weight and input statistics."""
    return _UnitTask(
        plan=plan,
        weight=block_params[plan.primary.weight_name[len(prefix) :]],
        stats=stats[plan.primary.input_group[len(prefix) :]],
        levels=levels,
        fallback=plan.primary.name in fallback,
    )


def _prune_task(
    pruner: LocalPruner | StructuredPrunerFactory, task: _UnitTask
) -> dict[str, Variants]:
    """:func:`_prune_unit` of one task (module level, so it pickles for ``map_layers``)."""
    if task.members:
        by_param: dict[str, Variants] = {}
        for member in task.members:
            by_param.update(_prune_task(pruner, member))
        if task.add_removed:
            shapes = {layer.weight_name: layer.shape for layer in task.plan.layers}
            by_param = {p: with_removed_variant(v, shapes[p]) for p, v in by_param.items()}
        return by_param
    if task.fallback:
        pruner = MagnitudePruner()
    return _prune_unit(task.plan, pruner, task.weight, task.stats, task.levels)


def _write_unit(writer: StoreWriter, by_param: Mapping[str, Variants], storage_dtype: str):
    """Write a unit's variants; returns int64[K], the weights each level removes in total."""
    removed = None
    for param, variants in by_param.items():
        writer.add(param, variants)
        counts = _removed_counts(variants, storage_dtype)
        removed = counts if removed is None else removed + counts
    return removed


def _advance_weights(
    by_param: Mapping[str, Variants],
    block_params: Mapping[str, jax.Array],
    prefix: str,
    input_mode: str,
    sparsity: np.ndarray,
    center: int,
) -> dict[str, jax.Array]:
    """{relative name: weight} advancing the hidden states in ``input_mode`` (``expected``
    or ``centre``), in the dtype of the model's weights."""
    out = {}
    for param, variants in by_param.items():
        rel = param[len(prefix) :]
        weight = block_params[rel]
        if input_mode == "expected":
            w = _expected_weight(variants, weight, sparsity)
        else:
            w = _level_weight(variants, weight, center)
        out[rel] = w.astype(weight.dtype)
    return out


# --------------------------------------------------------------------------- experts


def _routed_stats(
    adapter: MoEAdapter,
    block: int,
    counts: np.ndarray,
    stats: dict[str, LayerStats | None],
    n_tokens: int,
) -> set[str]:
    """Give each expert input group of block ``block`` its routed token count
    (``counts`` int64[E]) as ``n_tokens``; returns the names of the layers of experts that
    received no token (warned about), which are to be pruned by magnitude."""
    prefix = adapter.block_prefix(block)
    for g, st in stats.items():
        where = adapter.expert_of(prefix + g)
        if where is not None and st is not None:
            stats[g] = st._replace(n_tokens=int(counts[where[1]]))
    empty = [int(e) for e in np.flatnonzero(counts == 0)]
    if not empty:
        return set()
    warnings.warn(
        f"block {block}: expert(s) {empty} of {adapter.moe.num_experts} received no "
        f"calibration token (of {n_tokens}); their layers are pruned by magnitude. Use more "
        f"or more varied calibration data for routing-aware statistics",
        NoCalibrationTokensWarning,
        stacklevel=3,
    )
    return {
        layer.name
        for layer in adapter.layers()
        if layer.block == block and (adapter.expert_of(layer.name) or (-1, -1))[1] in empty
    }


def routing_frequencies(store: SupernetStore) -> dict[str, float]:
    """Layer name -> measured routing frequency (share of calibration tokens routed to the
    layer's expert) of every expert layer of a mixture-of-experts supernet; empty for
    other models."""
    return {k: float(v) for k, v in store.manifest.get("routing", {}).get("frequency", {}).items()}


def _with_routing_frequency(
    adapter: MoEAdapter, units: Sequence[Unit], counts: Sequence[np.ndarray], n_tokens: int
) -> tuple[Unit, ...]:
    """Units whose expert layers carry their measured routing frequency (the mean share of
    calibration tokens routed to the unit's experts)."""
    out = []
    for unit in units:
        freqs = []
        for name in unit.layers:
            where = adapter.expert_of(name)
            freqs.append(1.0 if where is None else counts[where[0]][where[1]] / n_tokens)
        freq = float(np.mean(freqs))
        out.append(unit if freq == 1.0 else dataclasses.replace(unit, routing_frequency=freq))
    return tuple(out)


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
    if structure in _STRUCTURED:
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


# --------------------------------------------------------------------------- build

# Module-level jitted model pieces with the adapter as a static argument (hashed by
# identity), so repeated builds with one adapter reuse the compiled programs, and all
# blocks of a model share one (ModelAdapter.block has one graph for every block).


@partial(jax.jit, static_argnums=0)
def _capture_and_run(adapter: ModelAdapter, block_params, h, ctx):
    return adapter.block(block_params, h, ctx, capture=True)


@partial(jax.jit, static_argnums=0)
def _capture(adapter: ModelAdapter, block_params, h, ctx):
    return adapter.block(block_params, h, ctx, capture=True)[1]


@partial(jax.jit, static_argnums=0)
def _run(adapter: ModelAdapter, block_params, h, ctx):
    return adapter.block(block_params, h, ctx)


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
      map_layers: runs the pruning of one block's units, which are independent (all
        levels of one unit, from its dense weight and input statistics, are one task):
        ``None`` or ``map``, one after the other in this process; a
        :class:`~allocsearch.distributed.ray_backend.RayLayerMap`, in parallel on Ray
        actors (then ``pruner`` must pickle). Results are consumed in unit order as they
        come, so a lazy map keeps one unit's variants in memory at a time. The store is
        the same whichever map runs the tasks, as long as the pruner computes the same
        result in another process (which, for XLA on CPU, takes the same thread-pool
        sizes: ``RayLayerMap(like_driver=True)``).
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
    plans = _plans(
        model.adapter,
        structure,
        query_heads=query_heads,
        tie_experts=tie_experts,
        expert_removal=expert_removal,
        prune_router=prune_router,
    )
    units = tuple(p.unit for p in plans)
    layer_map: LayerMap = map if map_layers is None else map_layers
    if not callable(layer_map):
        raise ValueError(
            f"map_layers must be a callable like map(fn, tasks) (e.g. a RayLayerMap) or None, "
            f"got {map_layers!r}"
        )
    _check_pruner(pruner, structure)
    _check_grid(grid, units, structure)
    storage_dtype = resolve_storage_dtype(
        storage_dtype, model.params[plans[0].primary.weight_name].dtype
    )

    adapter, params = model.adapter, model.params
    sparsity_grid = np.asarray(grid.sparsity, np.float64)
    valid = np.array(grid.valid, bool)  # a copy: protected experts lose their removed level
    n_grid = valid.sum(axis=1)
    for u, plan in enumerate(plans):
        if plan.removable and sparsity_grid[u, n_grid[u] - 1] != 1.0:
            raise ValueError(
                f"expert unit {plan.unit.name!r} has no removed level (sparsity 1.0 last) in "
                f"the grid; add it with supernet.experts.with_removed_level(grid, units)"
            )
    center = np.asarray(grid.center, np.int64)
    achieved = np.full(sparsity_grid.shape, np.nan)

    tokens = calibration.tokens
    batches = [jnp.asarray(tokens[i : i + batch_size]) for i in range(0, len(tokens), batch_size)]
    n_blocks = adapter.num_blocks
    advance_steps = 0 if input_mode == "dense" else len(batches) * (n_blocks - 1)
    total_steps = n_blocks * len(batches) + len(plans) + advance_steps

    structured = structure in _STRUCTURED
    pruner_record = _pruner_record(pruner(layout=plans[0].layout) if structured else pruner)
    if structured:
        heads, neurons = structured_layouts(adapter, query_heads=query_heads)
        pruner_record["layouts"] = {"attn": _json_value(heads), "mlp": _json_value(neurons)}

    moe = adapter if isinstance(adapter, MoEAdapter) else None
    routed_counts: list[np.ndarray] = []  # per block: int64[E] calibration tokens per expert
    protected: list[list[int]] = []  # per block (expert removal): experts that stay
    no_tokens: list[str] = []  # module paths of experts that received none
    seconds_per_block: list[float] = []
    input_norms: dict[str, np.ndarray] = {}
    block_layers: dict[int, list] = {}
    for layer in model_layers(adapter, routers=prune_router):
        block_layers.setdefault(layer.block, []).append(layer)
    progress_bar = progress_display(
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
        enabled=progress,
    )
    with StoreWriter(out_dir, overwrite=overwrite, storage_dtype=storage_dtype) as writer:
        with progress_bar:
            task = progress_bar.add_task("embedding", total=total_steps)
            outer = outer_on_device(adapter, params)  # one block at a time after this
            embedded = [embed_program(adapter, outer, ids) for ids in batches]
            del outer
            hidden = [h for h, _ in embedded]
            contexts = [ctx for _, ctx in embedded]
            del embedded
            for b in range(n_blocks):
                t_block = time.perf_counter()
                prefix = adapter.block_prefix(b)
                block_plans = [(u, p) for u, p in enumerate(plans) if p.unit.block == b]
                block_params = block_on_device(adapter, params, b)
                groups = sorted(
                    {
                        layer.input_group[len(prefix) :]
                        for _, p in block_plans
                        for layer in (p.layers if p.tied else (p.primary,))
                    }
                )
                keep_output = input_mode == "dense" and b < n_blocks - 1

                # 1. capture: Gram matrices of the needed inputs, with dense weights
                stats: dict[str, LayerStats | None] = dict.fromkeys(groups)
                counts = None if moe is None else np.zeros(moe.moe.num_experts, np.int64)
                # Inputs no unit prunes along (e.g. q/k/v and gate/up inputs of a
                # structured supernet): only their squared channel sums, for OWL.
                squares: dict[str, jax.Array] = {}
                next_hidden = []
                for i, (h, ctx) in enumerate(zip(hidden, contexts, strict=True)):
                    progress_bar.update(
                        task, description=f"block {b + 1}/{n_blocks}: batch {i + 1} inputs"
                    )
                    if keep_output:
                        out, taps = _capture_and_run(adapter, block_params, h, ctx)
                        next_hidden.append(out)
                    else:
                        taps = _capture(adapter, block_params, h, ctx)
                    if moe is not None:
                        routed = taps.pop(moe.routed_tap)
                        counts += np.asarray(jnp.sum(routed, axis=(0, 1))).round().astype(np.int64)
                    for g in groups:
                        stats[g] = accumulate_stats(stats[g], taps[g])
                    for g, x in taps.items():
                        if g not in stats:
                            x = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
                            squares[g] = squares.get(g, 0.0) + jnp.sum(jnp.square(x), axis=0)
                    del taps
                    progress_bar.advance(task)

                fallback: set[str] = set()
                if moe is not None:
                    fallback = _routed_stats(moe, b, counts, stats, calibration.n_tokens)
                    routed_counts.append(counts)
                    no_tokens += sorted({n.rsplit(".", 1)[0] for n in fallback})
                    if expert_removal:
                        keep = protected_experts(counts, moe.moe.top_k).tolist()
                        protected.append(keep)
                        for u, plan in block_plans:
                            where = moe.expert_of(plan.primary.name) if plan.removable else None
                            if where is not None and where[1] in keep:
                                valid[u, n_grid[u] - 1] = False

                # Wanda/OWL input norms ||X_j||_2 of every layer of the block
                for layer in block_layers[b]:
                    rel = layer.input_group[len(prefix) :]
                    g = stats.get(rel)
                    if g is not None:
                        input_norms[layer.name] = np.sqrt(
                            np.maximum(np.diag(np.asarray(g.hessian)), 0.0)
                        )
                    elif rel in squares:
                        input_norms[layer.name] = np.sqrt(np.asarray(squares[rel], np.float32))

                # 2. prune every unit at all its levels (independent tasks, run by
                # map_layers) and write the variants in unit order
                advance: dict[str, jax.Array] = {}

                # a removable expert's removed level is not pruned but appended as zeros
                pruned_levels = {
                    u: sparsity_grid[u, : n_grid[u] - 1]
                    if plan.removable and valid[u, n_grid[u] - 1]
                    else sparsity_grid[u, valid[u]]
                    for u, plan in block_plans
                }
                tasks = [
                    _UnitTask(
                        plan=plan,
                        weight=None,
                        stats=None,
                        levels=pruned_levels[u],
                        members=tuple(
                            _layer_task(
                                _layer_plan(layer),
                                block_params,
                                prefix,
                                stats,
                                fallback,
                                pruned_levels[u],
                            )
                            for layer in plan.layers
                        ),
                        add_removed=bool(plan.removable and valid[u, n_grid[u] - 1]),
                    )
                    if plan.tied
                    else _layer_task(
                        plan, block_params, prefix, stats, fallback, sparsity_grid[u, valid[u]]
                    )
                    for u, plan in block_plans
                ]
                results = iter(layer_map(partial(_prune_task, pruner), tasks))
                for (u, plan), job in zip(block_plans, tasks, strict=True):
                    progress_bar.update(
                        task, description=f"block {b + 1}/{n_blocks}: pruning {plan.unit.name}"
                    )
                    by_param = next(results, None)
                    if by_param is None:
                        raise ValueError(
                            f"map_layers {map_layers!r} returned fewer results than the "
                            f"{len(tasks)} units of block {b}"
                        )
                    n_levels = len(job.levels) + job.add_removed
                    achieved[u, :n_levels] = _write_unit(writer, by_param, storage_dtype) / (
                        plan.unit.numel
                    )
                    if input_mode != "dense" and b < n_blocks - 1:
                        advance.update(
                            _advance_weights(
                                by_param,
                                block_params,
                                prefix,
                                input_mode,
                                achieved[u, :n_levels],
                                int(center[u]),
                            )
                        )
                    del by_param
                    progress_bar.advance(task)
                del tasks, results
                del stats

                # 3. advance the hidden states of every calibration sequence
                if keep_output:
                    hidden = next_hidden
                elif b < n_blocks - 1:
                    advanced_params = {**block_params, **advance}
                    new_hidden = []
                    for i, (h, ctx) in enumerate(zip(hidden, contexts, strict=True)):
                        progress_bar.update(
                            task,
                            description=f"block {b + 1}/{n_blocks}: advancing batch {i + 1} "
                            f"({input_mode} weights)",
                        )
                        new_hidden.append(_run(adapter, advanced_params, h, ctx))
                        progress_bar.advance(task)
                    hidden = new_hidden
                    del advance, advanced_params
                jax.block_until_ready(hidden)
                seconds_per_block.append(time.perf_counter() - t_block)

        del hidden, contexts
        routing_extra = {}
        if moe is not None:
            units = _with_routing_frequency(moe, units, routed_counts, calibration.n_tokens)
            routing_extra = {
                "routing": {
                    "n_tokens": calibration.n_tokens,
                    "top_k": moe.moe.top_k,
                    "counts": [c.tolist() for c in routed_counts],
                    "no_tokens": no_tokens,
                    "tie_experts": bool(tie_experts),
                    "expert_removal": bool(expert_removal),
                    "protected": protected,
                    "prune_router": bool(prune_router),
                    "frequency": {
                        layer.name: int(routed_counts[where[0]][where[1]]) / calibration.n_tokens
                        for layer in adapter.layers()
                        if (where := moe.expert_of(layer.name)) is not None
                    },
                }
            }
        try:
            spec = make_spec(units, achieved, valid, center, structure, grid.labels)
        except ValueError as e:
            raise ValueError(
                f"the achieved sparsities do not form a valid spec ({e}); the stored variants "
                f"remove {achieved.tolist()} of each unit's weights"
            ) from None
        writer.add_input_norms(input_norms)
        path = writer.commit(
            spec=spec,
            unit_params=[p.params for p in plans],
            grid=grid,
            model_fingerprint=model.fingerprint,
            tokens_fingerprint=calibration.fingerprint,
            pruner=pruner_record,
            input_mode=input_mode,
            extra={
                "model": {
                    "family": adapter.family,
                    "model_type": adapter.model_type,
                    "num_blocks": n_blocks,
                    "path": model.path,
                },
                "calibration": calibration.provenance(),
                "structure": structure,
                "within_block_inputs": "dense",
                "storage_dtype": storage_dtype,
                **routing_extra,
                "build": {
                    "batch_size": batch_size,
                    "n_tokens": calibration.n_tokens,
                    "seconds_per_block": seconds_per_block,
                    "seconds_total": time.perf_counter() - t_start,
                    "jax_backend": jax.default_backend(),
                    "allocsearch_version": allocsearch.__version__,
                },
            },
        )
    return SupernetStore.open(
        path,
        model_fingerprint=model.fingerprint,
        tokens_fingerprint=calibration.fingerprint,
        verify="none",  # just written; its digests were computed from these bytes
    )
