"""Prune one unit at all its levels: the task a block's map runs, and the stored variants.

A task holds what pruning one unit needs (its primary layer's dense weight and input
statistics, the requested levels); :func:`prune_task` is module level so it pickles for
a ``map_layers`` on other processes. Structured units add nested dead-row masks of their
input projections; tied expert units prune each member layer on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from allocsearch.models.layers import LayerInfo
from allocsearch.pruners.base import LayerStats, LocalPruner, NestedVariants, Variants
from allocsearch.pruners.magnitude import MagnitudePruner
from allocsearch.pruners.structured import HeadGroups, NeuronGroups, StructuredPruner
from allocsearch.supernet.experts import with_removed_variant
from allocsearch.supernet.store import STORAGE_DTYPES, StoreWriter
from allocsearch.supernet.units import UnitPlan, layer_plan

__all__ = [
    "StructuredPrunerFactory",
    "UnitTask",
    "advance_weights",
    "prune_task",
    "unit_task",
    "write_unit",
]

StructuredPrunerFactory = Callable[..., StructuredPruner]
"""Called as ``factory(layout=...)`` once per structured unit, e.g. ``StructuredPruner``
itself or ``functools.partial(StructuredPruner, percdamp=0.02)``."""


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
    plan: UnitPlan,
    pruner: LocalPruner | StructuredPrunerFactory,
    weight: jax.Array,
    stats: LayerStats | None,
    levels: np.ndarray,
) -> dict[str, Variants]:
    """All levels of one unit, keyed by parameter name in the unit's layer order."""
    assert not plan.tied, "tied units are pruned layer by layer (UnitTask.members)"
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
class UnitTask:
    """What pruning one unit at all its levels needs: one independent task of a block.

    ``weight`` is the primary layer's dense weight, ``stats`` the statistics of its input
    (``None`` for pruners that need none), ``levels`` float64[K] the requested sparsities.
    ``fallback``: prune by magnitude (an expert that received no calibration token).
    ``members``: for a tied unit, one task per layer (then ``weight`` and ``stats`` are
    None).
    """

    plan: UnitPlan
    weight: jax.Array | None
    stats: LayerStats | None
    levels: np.ndarray
    fallback: bool = False
    members: tuple[UnitTask, ...] = ()
    add_removed: bool = False  # append the removed level (all zeros) after ``levels``


def unit_task(
    plan: UnitPlan,
    block_params: Mapping[str, jax.Array],
    prefix: str,
    stats: Mapping[str, LayerStats | None],
    fallback: set[str],
    levels: np.ndarray,
    *,
    add_removed: bool = False,
) -> UnitTask:
    """The task of one unit of a block: pruned from its primary layer's weight and input
    statistics, or (a tied unit) one member task per layer."""

    def task(p: UnitPlan) -> UnitTask:
        return UnitTask(
            plan=p,
            weight=block_params[p.primary.weight_name[len(prefix) :]],
            stats=stats[p.primary.input_group[len(prefix) :]],
            levels=levels,
            fallback=p.primary.name in fallback,
        )

    if not plan.tied:
        return task(plan)
    members = tuple(task(layer_plan(layer)) for layer in plan.layers)
    return UnitTask(
        plan=plan, weight=None, stats=None, levels=levels, members=members, add_removed=add_removed
    )


def prune_task(
    pruner: LocalPruner | StructuredPrunerFactory, task: UnitTask
) -> dict[str, Variants]:
    """:func:`_prune_unit` of one task (module level, so it pickles for ``map_layers``)."""
    if task.members:
        by_param: dict[str, Variants] = {}
        for member in task.members:
            by_param.update(prune_task(pruner, member))
        if task.add_removed:
            shapes = {layer.weight_name: layer.shape for layer in task.plan.layers}
            by_param = {p: with_removed_variant(v, shapes[p]) for p, v in by_param.items()}
        return by_param
    if task.fallback:
        pruner = MagnitudePruner()
    return _prune_unit(task.plan, pruner, task.weight, task.stats, task.levels)


def write_unit(writer: StoreWriter, by_param: Mapping[str, Variants], storage_dtype: str):
    """Write a unit's variants; returns int64[K], the weights each level removes in total."""
    removed = None
    for param, variants in by_param.items():
        writer.add(param, variants)
        counts = _removed_counts(variants, storage_dtype)
        removed = counts if removed is None else removed + counts
    return removed


def advance_weights(
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
