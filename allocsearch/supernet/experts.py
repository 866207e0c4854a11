"""Whole-expert removal: a "removed" level for mixture-of-experts experts (STUN's structured
step and task-specific expert pruning, in the same search as the unstructured levels).

With ``supernet.expert_removal`` (``build --expert-removal``) an unstructured supernet of a
MoE model has one unit per routed expert (role ``"expert"``, named
``model.layers.3.mlp.experts.7``, covering its gate, up and down projections, which take
the unit's level together; each is still pruned on its own statistics), and every expert
unit gets a last level at sparsity 1.0, *removed* (:func:`with_removed_level`):

* **Costs.** A removed expert keeps 0 weights and 0 MACs, so params and FLOPs tables
  charge it 0. Under a FLOPs budget the other experts' costs stay weighted by their
  routing frequencies on the *unpruned* router; the removed expert's tokens go to the
  other experts, which the table does not charge (a token still runs ``top_k`` experts):
  FLOPs budgets under-count what removal leaves, params budgets are exact.
* **Routing.** A removed expert's weights are all zero, and the model masks its router
  logit to -inf before the softmax and top-k (:meth:`~allocsearch.models.moe.
  SparseMoeBlock.routing`), so the kept experts are renormalised exactly as if the removed
  ones did not exist. Both evaluators hand the candidate's weights to the model, so they
  score the masked model with no change of their own.
* **At least ``top_k`` experts per block.** A block that kept fewer than ``top_k`` experts
  could not route a token to ``top_k`` experts. Instead of a cross-unit constraint that
  every searcher would have to honour, the ``top_k`` experts of each block that receive the
  most calibration tokens (ties: lower index) have no removed level
  (:func:`protected_experts`; the build drops it from their rows once the block's routing
  counts are known). Every allocation any searcher can propose then keeps them: DP,
  knapsack and EvoPress only ever pick valid levels, so none needs to know about experts.
  The store's manifest records them (``routing.protected``).
* **Apply / export** (:mod:`allocsearch.recipe.experts`): a removed expert is an expert
  whose three layers have sparsity 1.0 in the recipe.

The router can also be a unit (``supernet.prune_router``, ``build --prune-router``): each
block's router linear ``{module}.gate`` (role ``"router"``) is pruned like any layer.
"""

from __future__ import annotations

from typing import Any, Final

import jax.numpy as jnp
import numpy as np

from allocsearch.models.layers import LayerInfo
from allocsearch.pruners.base import DenseVariants, NestedVariants, Variants
from allocsearch.supernet.levels import LevelGrid, equal_step_grid
from allocsearch.supernet.spec import SupernetSpec, Unit

__all__ = [
    "EXPERT_ROLE",
    "check_expert_options",
    "member_exact_grid",
    "model_layers",
    "protected_experts",
    "removal_grid",
    "removed_levels",
    "with_removed_level",
    "with_removed_variant",
]

EXPERT_ROLE: Final = "expert"
"""Unit role of a whole routed expert (gate, up and down) in an expert-removal supernet."""
_ATOL: Final = 1e-12


def model_layers(adapter: Any, *, routers: bool = False) -> list[LayerInfo]:
    """``adapter.layers()``, with each MoE block's router when ``routers`` (other families
    have no router and ignore it)."""
    from allocsearch.models.moe import MoEAdapter  # the model zoo, imported late

    if routers and isinstance(adapter, MoEAdapter):
        return adapter.layers(include_router=True)
    return adapter.layers()


def check_expert_options(
    adapter: Any, structure: str, *, expert_removal: bool, prune_router: bool, tie_experts: bool
) -> None:
    """Refuse expert removal / router units where they do not apply.

    Raises:
      ValueError: a model that is not a mixture of experts, expert removal with a structure
        other than ``"unstructured"`` or with ``tie_experts`` (which would remove every
        expert of a block at once), naming the option and what is valid.
    """
    from allocsearch.models.moe import MOE_MODEL_TYPES, MoEAdapter

    for flag, name in ((expert_removal, "expert_removal"), (prune_router, "prune_router")):
        if flag and not isinstance(adapter, MoEAdapter):
            raise ValueError(
                f"{name} needs a mixture-of-experts model (one of {sorted(MOE_MODEL_TYPES)}), "
                f"got model_type {adapter.model_type!r}"
            )
    if expert_removal and structure != "unstructured":
        raise ValueError(
            f"expert_removal adds a removed level to unstructured expert units; structure "
            f"{structure!r} is not supported (valid: 'unstructured')"
        )
    if expert_removal and tie_experts:
        raise ValueError(
            "expert_removal and tie_experts exclude each other: tied units give every expert "
            "of a block one level, so removing one would remove all; set one of them"
        )


def with_removed_level(grid: LevelGrid, units: tuple[Unit, ...] | list[Unit]) -> LevelGrid:
    """``grid`` with a last level at sparsity 1.0 (removed) in the row of every expert unit
    (role :data:`EXPERT_ROLE`); other rows unchanged.

    Args:
      grid: an unstructured grid over ``units`` (float64[L, K]); no expert row may
        already reach 1.0.

    Returns:
      LevelGrid with K or K + 1 levels; ``center`` unchanged, labels dropped (unstructured
      grids have none).
    """
    s = np.asarray(grid.sparsity, np.float64)
    valid = np.asarray(grid.valid, bool)
    if len(units) != len(s):
        raise ValueError(f"the grid has {len(s)} rows but there are {len(units)} units")
    n_valid = valid.sum(axis=1)
    expert = np.array([u.role == EXPERT_ROLE for u in units], bool)
    if not expert.any():
        raise ValueError("no expert units: build the units with expert_removal=True")
    last = s[np.arange(len(s)), n_valid - 1]
    if np.any(expert & (last >= 1.0 - _ATOL)):
        i = int(np.flatnonzero(expert & (last >= 1.0 - _ATOL))[0])
        raise ValueError(f"unit {units[i].name!r} already has a level at sparsity 1.0")
    k = int(np.max(n_valid + expert))
    sparsity = np.full((len(s), k), np.nan)
    new_valid = np.zeros((len(s), k), bool)
    for i in range(len(s)):
        row = list(s[i, : n_valid[i]]) + ([1.0] if expert[i] else [])
        sparsity[i, : len(row)] = row
        new_valid[i, : len(row)] = True
    return LevelGrid(sparsity, new_valid, np.asarray(grid.center, np.int32), None)


def member_exact_grid(
    units: tuple[Unit, ...] | list[Unit],
    *,
    center: float,
    step_weights: int,
    steps_each_side: int,
) -> LevelGrid:
    """EvoPress's equal-step grid (:func:`~allocsearch.supernet.levels.equal_step_grid`)
    for units whose level applies to each of their ``m`` equal-size layers (an expert
    unit's gate/up/down, or one projection tied over a block's experts): a unit's levels
    are taken on one layer (``numel / m`` weights, steps of ``step_weights / m``), so
    every layer removes a whole number of weights; ``step_weights`` is rounded to a
    multiple of the largest ``m`` so that a step of every unit still trades the same
    number of weights.

    Raises:
      ValueError: a unit's layers differ in size.

    Returns:
      LevelGrid over ``units`` (float64[L, K]), no labels.
    """
    members = np.array([len(u.layers) for u in units])
    m_max = int(members.max())
    step = m_max * max(1, round(step_weights / m_max))
    parts = {}
    for m in sorted(set(members.tolist())):
        idx = np.flatnonzero(members == m)
        numel = np.array([units[i].numel // m for i in idx], np.int64)
        if np.any(numel * m != [units[i].numel for i in idx]):
            raise ValueError(f"units with {m} layers must have layers of equal size")
        parts[m] = (idx, equal_step_grid(
            numel, center=center, step_weights=step // m, steps_each_side=steps_each_side
        ))  # fmt: skip
    k = max(g.sparsity.shape[1] for _, g in parts.values())
    sparsity = np.full((len(units), k), np.nan)
    valid = np.zeros((len(units), k), bool)
    center_idx = np.zeros(len(units), np.int32)
    for idx, g in parts.values():
        kk = g.sparsity.shape[1]
        sparsity[idx, :kk] = g.sparsity
        valid[idx, :kk] = g.valid
        center_idx[idx] = g.center
    return LevelGrid(sparsity, valid, center_idx, None)


def removal_grid(
    units: tuple[Unit, ...] | list[Unit],
    *,
    center: float,
    step_weights: int,
    steps_each_side: int,
) -> LevelGrid:
    """:func:`member_exact_grid` for an expert-removal supernet (an expert unit's levels
    apply to its gate, up and down alike), plus the removed level of every expert unit.

    Returns:
      LevelGrid over ``units`` (float64[L, K]), no labels.
    """
    grid = member_exact_grid(
        units, center=center, step_weights=step_weights, steps_each_side=steps_each_side
    )
    return with_removed_level(grid, units)


def removed_levels(spec: SupernetSpec) -> np.ndarray:
    """bool[L, K]: the levels that remove a whole expert (sparsity 1.0 of an expert unit)."""
    expert = np.array([u.role == EXPERT_ROLE for u in spec.units], bool)
    with np.errstate(invalid="ignore"):
        full = np.abs(np.where(spec.valid, spec.sparsity, 0.0) - 1.0) <= _ATOL
    return spec.valid & full & expert[:, None]


def protected_experts(counts: np.ndarray, top_k: int) -> np.ndarray:
    """int64[top_k]: the experts of a block that may not be removed, ascending: the
    ``top_k`` with the most calibration tokens (``counts`` int[E]; ties: lower index)."""
    counts = np.asarray(counts, np.int64)
    if not 1 <= top_k <= len(counts):
        raise ValueError(f"top_k={top_k} must be in 1..{len(counts)} (the block's experts)")
    order = np.lexsort((np.arange(len(counts)), -counts))
    return np.sort(order[:top_k])


def with_removed_variant(variants: Variants, shape: tuple[int, int]) -> Variants:
    """``variants`` with one more level that removes every weight (all zero), for a
    layer of ``shape`` (out, in)."""
    out_f, in_f = shape
    sparsity = np.append(np.asarray(variants.sparsity, np.float64), 1.0)
    if isinstance(variants, NestedVariants):
        counts = np.asarray(variants.prune_counts)
        full = (
            np.full((1, out_f), in_f, counts.dtype)
            if variants.per_row
            else np.array([out_f * in_f], counts.dtype)
        )
        return NestedVariants(
            rank=variants.rank,
            per_row=variants.per_row,
            prune_counts=np.concatenate([counts, full]),
            sparsity=sparsity,
        )
    if not isinstance(variants, DenseVariants) or variants.group_keep is not None:
        raise ValueError(f"cannot add a removed level to {type(variants).__name__} variants")
    w = variants.weights
    zero = jnp.zeros((1, *w.shape[1:]), w.dtype)
    return DenseVariants(weights=jnp.concatenate([w, zero]), sparsity=sparsity)
