"""Apply a recipe to its model: the pruned checkpoint the searched allocation describes.

:func:`apply_recipe` returns the pruned model; :func:`write_pruned` also saves it as a
Hugging Face directory (atomically, see :func:`allocsearch.models.hf.save_model`).

**Where the weights come from.**

* With the supernet store the recipe was searched on, every unit takes the stored variants
  of the level whose exact sparsity equals the recipe's: the very weights the evaluator
  scored (the same selection as :meth:`~allocsearch.evaluate.evaluator.Evaluator.materialize`).
  A recipe sparsity that is not a level of the store is an error naming the layer and the
  store's levels.
* Without a store, a local pruner is re-run at the recipe's exact sparsities: a supernet
  with one level per unit (the recipe's count of weights, N:M zeros or groups, so nothing
  is rounded) is built with :func:`~allocsearch.supernet.build.build_supernet` into a
  temporary directory and read back like any store. Units the recipe does not list stay
  dense. ``input_mode="dense"`` (the default) calibrates every block on the dense model's
  activations, as EvoPress stores do, so the same pruner and calibration data reproduce
  the stored variants; ``"centre"`` calibrates each block on the output of the already
  pruned blocks (SparseGPT's sequential mode across blocks).

**Structured recipes** (heads / neurons) zero the removed groups' weights and the biases
of their dead rows. With ``physical=True`` the matrices are also made smaller where the
Hugging Face config can express it. The config has one ``num_attention_heads`` /
``num_key_value_heads`` / ``intermediate_size`` for all blocks, so every block is sliced
to the same width, the largest kept count over the blocks; blocks that removed more keep
some removed groups as zero rows and columns, which changes no output (a zero head has
zero values and zero ``o_proj`` columns; a zero neuron has zero ``down_proj`` columns).
Heads are removed in whole key/value groups (see :mod:`allocsearch.pruners.structured`),
so ``num_key_value_heads`` shrinks with ``num_attention_heads`` and their ratio is kept;
a query-head store (``HeadGroups.query_heads``) leaves kv heads with different numbers of
query heads, and every block is sliced to ``n_kv`` kv heads of ``n_rep`` query heads (the
most any block / kv head keeps), padded with zero heads (:func:`_query_head_selection`);
``head_dim`` is written explicitly because Llama configs otherwise derive it from the
head count. Fewer heads can be expressed for the Llama family and Phi-3 only (GPT-2 and
BERT derive the head width from the model width); fewer neurons for Llama and Phi-3
(``intermediate_size``), GPT-2 (``n_inner``) and BERT (``intermediate_size``). Phi-3's
fused ``qkv_proj`` and ``gate_up_proj`` lose the rows of their q, k, v (gate, up) parts
together. OLMo 2 normalises q and k over the whole projection, so removing heads would
change the norm's mean; the kept rows are rescaled so that the sliced model computes the
same function (see :func:`_slice_projection_norms`). :class:`ApplyReport` gives the
resulting parameter count and how far the padding leaves it above the recipe's.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import jax
import jax.numpy as jnp
import numpy as np

from allocsearch.data.tokenset import TokenSet
from allocsearch.models.hf import HFModel, adapter_for_config, fingerprint_tensors, save_model
from allocsearch.models.layers import LayerInfo
from allocsearch.pruners.base import LocalPruner, NestedVariants, exact_counts
from allocsearch.pruners.structured import HeadGroups, NeuronGroups
from allocsearch.recipe.apply_pruner import (
    _STRUCTURED,
    _calibration_for,
    _check_pruner,
    _pruner_name,
)
from allocsearch.recipe.apply_report import AppliedLayer, ApplyReport
from allocsearch.recipe.depth import apply_depth
from allocsearch.recipe.experts import apply_experts
from allocsearch.recipe.recipe import (
    Recipe,
    RecipeError,
    StructuredUnit,
    check_against_model,
    refuse_bit_recipe,
)
from allocsearch.recipe.slicing import _layout_of, _slice_structured, _store_layouts
from allocsearch.supernet.build import (
    INPUT_MODES,
    InputMode,
    build_supernet,
    structured_layouts,
    supernet_units,
    unit_group_counts,
    unit_removed_groups,
)
from allocsearch.supernet.experts import model_layers
from allocsearch.supernet.levels import LevelGrid
from allocsearch.supernet.store import SupernetStore

__all__ = [
    "TOKENIZER_FILES",
    "AppliedLayer",
    "ApplyReport",
    "apply_recipe",
    "choice_for_recipe",
    "tokenizer_files",
    "write_pruned",
]


# --------------------------------------------------------------------------- counts


def _layer_count(name: str, sparsity: float, numel: int) -> int:
    """Weights a recipe sparsity removes; refuses one that is not a whole count."""
    try:
        return int(exact_counts(np.array([sparsity], np.float64), numel)[0])
    except ValueError:
        raw = sparsity * numel
        lo, hi = math.floor(raw), math.ceil(raw)
        raise RecipeError(
            f"layer {name!r}: sparsity {sparsity!r} of {numel} weights removes {raw:.4f} "
            f"weights, not a whole number; the nearest exact sparsities are {lo / numel!r} "
            f"({lo} weights) and {hi / numel!r} ({hi})"
        ) from None


def _unit_groups(unit: StructuredUnit, layout: HeadGroups | NeuronGroups) -> int:
    """Groups (kv groups or neurons) a recipe unit removes.

    Attention units may count kv groups (``total == num_kv_heads``, as allocsearch writes
    for kv-group supernets) or query heads (``total == num_heads``). Under a kv-group
    layout query-head counts must be whole kv groups; under a query-head layout
    (``HeadGroups.query_heads``) a kv-group count is that many heads per group times.
    """
    groups = layout.num_groups
    if unit.total == groups:
        return unit.removed
    if isinstance(layout, HeadGroups) and layout.query_heads and unit.total == layout.num_kv_heads:
        return unit.removed * layout.heads_per_group
    if isinstance(layout, HeadGroups) and unit.total == layout.num_heads:
        per_group = layout.heads_per_group
        if unit.removed % per_group:
            raise RecipeError(
                f"unit {unit.name!r} removes {unit.removed} of {unit.total} query heads; with "
                f"{layout.num_kv_heads} key/value heads, heads are removed in whole kv groups "
                f"of {per_group}, so valid counts are multiples of {per_group} (or apply with "
                f"query_heads=True, supernet.head_granularity: query_head, to remove single "
                f"query heads)"
            )
        return unit.removed // per_group
    valid = [groups] + ([layout.num_heads] if isinstance(layout, HeadGroups) else [])
    raise RecipeError(
        f"unit {unit.name!r} has total {unit.total}, but the model's sublayer has "
        f"{' or '.join(map(str, sorted(set(valid))))} groups"
    )


def _dead_bias_count(
    layout: HeadGroups | NeuronGroups,
    removed_groups: int,
    members: Sequence[LayerInfo],
    params: Mapping[str, jax.Array],
    keep: np.ndarray | None = None,
) -> int:
    """Bias entries of dead input-projection rows when ``removed_groups`` groups go (the
    groups ``keep`` bool[G] removes, when given: with query heads, how many k/v rows die
    depends on which heads go)."""
    if keep is None:
        keep = np.arange(layout.num_groups) >= removed_groups
    dead = layout.dead_rows(keep)
    return sum(
        int(dead[m.role].sum()) for m in members if m.role in dead and f"{m.name}.bias" in params
    )


# --------------------------------------------------------------------------- level choice


def _unit_index(store: SupernetStore) -> dict[str, int]:
    """Layer name -> index of the store unit covering it."""
    return {layer: u for u, unit in enumerate(store.spec.units) for layer in unit.layers}


def _level_text(spec, u: int) -> str:
    k = int(spec.num_levels[u])
    levels = [float(x) for x in spec.sparsity[u, :k]]
    labels = spec.level_labels[u] if spec.level_labels is not None else None
    if labels is not None:
        return ", ".join(f"{s!r} ({lab})" for s, lab in zip(levels, labels, strict=True))
    return ", ".join(repr(s) for s in levels)


def _recipe_counts(recipe: Recipe) -> dict[str, int]:
    """Layer name -> weights the recipe removes from it (exact)."""
    return {x.name: _layer_count(x.name, x.sparsity, x.numel) for x in recipe.layers}


def _levels_from_store(recipe: Recipe, store: SupernetStore) -> dict[int, int]:
    """Unit index -> level of ``store`` whose exact sparsity is the recipe's.

    A level matches when it removes exactly the recipe's number of weights from the unit
    (and, for N:M, has the recipe's pattern; for structured units, the recipe's number of
    groups); units the recipe does not cover are absent.
    """
    spec = store.spec
    if recipe.structure != spec.structure:
        raise RecipeError(
            f"the recipe's structure is {recipe.structure!r} but the store {store.path} holds "
            f"a {spec.structure!r} supernet; apply it with its own store, or without one"
        )
    counts = _recipe_counts(recipe)
    unit_of = _unit_index(store)
    entry = {x.name: x for x in recipe.layers}
    for name in entry:
        if name not in unit_of:
            raise RecipeError(
                f"recipe layer {name!r} has no variants in the store {store.path} (its units "
                f"cover {len(unit_of)} layers, e.g. {list(unit_of)[:3]})"
            )
    recipe_units = {x.name: x for x in recipe.units}
    layouts = _store_layouts(store) if recipe.structure in _STRUCTURED else {}
    removed_at = None  # unit_removed_groups(store), read when first needed
    levels: dict[int, int] = {}
    for u in sorted({unit_of[name] for name in entry}):
        unit = spec.units[u]
        missing = [x for x in unit.layers if x not in entry]
        if missing:
            raise RecipeError(
                f"the store's unit {unit.name!r} covers {list(unit.layers)}, but the recipe "
                f"lacks {missing}; a unit's layers are applied together"
            )
        n_levels = int(spec.num_levels[u])
        stored = np.rint(spec.sparsity[u, :n_levels] * unit.numel).astype(np.int64)
        want = sum(counts[x] for x in unit.layers)
        match = np.flatnonzero(stored == want).tolist()
        if recipe.structure == "nm" and spec.level_labels is not None:
            e = entry[unit.layers[0]]
            match = [k for k in match if spec.level_labels[u][k] == f"{e.n}:{e.m}"]
        what = f"layer {unit.name!r}"
        groups = None
        if recipe.structure in _STRUCTURED:
            ru = recipe_units.get(unit.name)
            if ru is None or set(ru.layers) != set(unit.layers):
                raise RecipeError(
                    f"the store's unit {unit.name!r} (layers {list(unit.layers)}) is not a unit "
                    f"of the recipe with the same layers"
                )
            layout = layouts.get(unit.role)
            groups = (
                (_unit_groups(ru, layout), layout.num_groups) if layout else (ru.removed, ru.total)
            )
            what = f"unit {unit.name!r} ({ru.removed} of {ru.total} {ru.kind} removed)"
        if len(match) == 1 and groups is not None:
            # a structured level's fraction of the unit's weights is its fraction of groups
            if removed_at is None:
                removed_at = unit_removed_groups(store)
            at_level = int(removed_at[u, match[0]])
            if at_level != groups[0]:
                raise RecipeError(
                    f"{what}: its layers' sparsities are those of store level {match[0]}, "
                    f"which removes {at_level} of {groups[1]} groups, not {groups[0]}"
                )
        if len(match) != 1:
            pattern = ""
            if recipe.structure == "nm":
                pattern = f" ({entry[unit.layers[0]].n}:{entry[unit.layers[0]].m})"
            raise RecipeError(
                f"{what} has sparsity {want / unit.numel!r}{pattern} in the recipe, which is "
                f"not a level of the store {store.path}; its levels there are sparsities "
                f"[{_level_text(spec, u)}]; use the store the recipe was searched on, or "
                f"apply without a store to re-run a pruner"
            )
        levels[u] = int(match[0])
    return levels


def choice_for_recipe(recipe: Recipe, store: SupernetStore) -> np.ndarray:
    """The level vector of ``store`` that ``recipe`` describes.

    Args:
      recipe: an allocation that covers every unit of the store (e.g. one a search on this
        store wrote).
      store: the supernet the recipe was searched on.

    Returns:
      int32[L]: per store unit, the level whose exact sparsity (and N:M pattern, or number
      of removed groups) is the recipe's; the input of ``Evaluator`` and ``to_evopress``.

    Raises:
      RecipeError: the store belongs to another model, has another structure, lacks a
        recipe layer, has no level with a recipe sparsity (naming the unit and the store's
        levels), or has units the recipe does not cover.
    """
    if store.model_fingerprint != recipe.model.fingerprint:
        raise RecipeError(
            f"the store {store.path} was built for model fingerprint "
            f"{store.model_fingerprint!r}, the recipe is for {recipe.model.fingerprint!r}"
        )
    levels = _levels_from_store(recipe, store)
    uncovered = [u.name for i, u in enumerate(store.spec.units) if i not in levels]
    if uncovered:
        raise RecipeError(
            f"the recipe does not cover the store's units {uncovered[:5]}"
            f"{' ...' if len(uncovered) > 5 else ''}; a level vector needs every unit"
        )
    return np.array([levels[u] for u in range(store.spec.num_units)], np.int32)


# --------------------------------------------------------------------------- one-level store


def _exact_grid(
    recipe: Recipe, adapter, counts: Mapping[str, int], *, query_heads: bool = False
) -> tuple[LevelGrid, list[int]]:
    """One level per unit at the recipe's exact count (0 for units the recipe lacks), and
    the indices of the units the recipe covers (attention units in query heads with
    ``query_heads``)."""
    routers = any(x.role == "router" for x in recipe.layers)
    units = supernet_units(adapter, recipe.structure, prune_router=routers)
    entry = {x.name: x for x in recipe.layers}
    sparsity = np.zeros((len(units), 1), np.float64)
    covered: list[int] = []
    labels = None
    if recipe.structure in _STRUCTURED:
        groups = unit_group_counts(adapter, recipe.structure, query_heads=query_heads)
        heads, neurons = structured_layouts(adapter, query_heads=query_heads)
        layouts = {"attn": heads, "mlp": neurons}
        by_name = {x.name: x for x in recipe.units}
        names = {u.name for u in units}
        for ru in recipe.units:
            if ru.name not in names:
                raise RecipeError(
                    f"recipe unit {ru.name!r} is not a {recipe.structure!r} sublayer of the "
                    f"model; its sublayers are e.g. {sorted(names)[:3]}"
                )
        for u, unit in enumerate(units):
            ru = by_name.get(unit.name)
            if ru is None:
                continue
            if set(ru.layers) != set(unit.layers):
                raise RecipeError(
                    f"recipe unit {ru.name!r} lists layers {list(ru.layers)}, but the model's "
                    f"sublayer has {list(unit.layers)}"
                )
            removed = _unit_groups(ru, layouts[unit.role])
            sparsity[u, 0] = removed / int(groups[u])
            covered.append(u)
    else:
        ms = {x.m for x in recipe.layers if x.structure == "nm"}
        m = ms.pop() if len(ms) == 1 else None
        row_labels = []
        for u, unit in enumerate(units):
            (name,) = unit.layers
            if name in entry:
                sparsity[u, 0] = counts[name] / unit.numel
                covered.append(u)
            if m is not None:
                n = entry[name].n if name in entry else 0
                row_labels.append((f"{n}:{m}",))
        labels = tuple(row_labels) if m is not None else None
    grid = LevelGrid(
        sparsity=sparsity,
        valid=np.ones((len(units), 1), bool),
        center=np.zeros(len(units), np.int32),
        labels=labels,
    )
    return grid, covered


# --------------------------------------------------------------------------- materialize


def _materialize(
    model: HFModel,
    store: SupernetStore,
    levels: Mapping[int, int],
    recipe: Recipe,
    counts: Mapping[str, int],
    mismatch: str,
) -> tuple[dict[str, jax.Array], dict[int, np.ndarray]]:
    """Parameters with every covered unit at its level, and the kept-group masks
    (bool[G]) of structured units.

    Nested variants zero the pruned weights of the dense weight; weight-updating variants
    give their stored weights; both in the model's dtype (as ``Evaluator.materialize``).
    Each layer's variant sparsity must be the recipe's (``mismatch`` ends the error).
    """
    params = dict(model.params)
    keeps: dict[int, np.ndarray] = {}
    entry = {x.name: x for x in recipe.layers}
    for u, k in sorted(levels.items()):
        for name in store.unit_params[u]:
            v = store.variants(name)
            layer = name.removesuffix(".weight")
            dense = params[name]
            numel = math.prod(dense.shape)
            stored = round(float(v.sparsity[k]) * numel)
            if layer in entry and stored != counts[layer]:
                raise RecipeError(
                    f"layer {layer!r}: the recipe removes {counts[layer]} of {numel} weights "
                    f"(sparsity {entry[layer].sparsity!r}) but level {k} of its store variants "
                    f"removes {stored} (sparsity {float(v.sparsity[k])!r}); {mismatch}"
                )
            # on the host: the device holds one parameter's variants at a time, never the
            # whole pruned model (a lazily loaded model's weights stay memory-mapped)
            dense = np.asarray(dense)
            if isinstance(v, NestedVariants):
                params[name] = np.where(np.asarray(v.mask(k)), dense, np.zeros((), dense.dtype))
            else:
                params[name] = np.asarray(v.weights[k]).astype(dense.dtype)
                if v.group_keep is not None:
                    keeps[u] = np.asarray(v.group_keep[k], bool)
    return params, keeps


def _zero_dead_biases(
    adapter, store: SupernetStore, params: dict[str, jax.Array], keeps: Mapping[int, np.ndarray]
) -> None:
    """Zero the biases of dead q/k/v and gate/up rows (inert: their outputs meet zero
    columns of the output projection, but a zero bias makes the removal complete)."""
    info = {x.name: x for x in adapter.layers()}
    for u, keep in keeps.items():
        unit = store.spec.units[u]
        dead = _layout_of(adapter, unit.role, store).dead_rows(keep)
        for layer in unit.layers:
            bias = f"{layer}.bias"
            role = info[layer].role
            if role in dead and bias in params:
                b = params[bias]
                params[bias] = jnp.where(jnp.asarray(dead[role]), jnp.zeros((), b.dtype), b)


def apply_recipe(
    model: HFModel,
    recipe: Recipe,
    *,
    store: SupernetStore | None = None,
    calibration: TokenSet | None = None,
    pruner: LocalPruner | Callable[..., Any] | None = None,
    physical: bool = True,
    input_mode: InputMode = "dense",
    query_heads: bool = False,
    batch_size: int = 8,
    work_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> tuple[HFModel, dict[str, Any], ApplyReport]:
    """Prune ``model`` as ``recipe`` says.

    Args:
      model: the dense model the recipe was made for (its fingerprint must match).
      recipe: the allocation.
      store: the supernet the recipe was searched on; its variants at the recipe's levels
        are used (see the module docstring). ``calibration``, ``pruner`` and
        ``input_mode`` are then ignored.
      calibration: without a store: calibration sequences for the re-run pruner (required
        for all but magnitude pruners).
      pruner: without a store: a ``LocalPruner`` (unstructured / N:M, with the recipe's M)
        or, for structured recipes, a factory called as ``pruner(layout=...)`` such as
        ``StructuredPruner``.
      physical: make structured matrices physically smaller (see the module docstring),
        remove blocks whose two sublayers the recipe drops
        (:mod:`allocsearch.recipe.depth`) and experts it removes
        (:mod:`allocsearch.recipe.experts`); False keeps the dense shapes with zeros.
      input_mode: without a store: ``"dense"`` or ``"centre"`` (see the module docstring).
      query_heads: without a store: the re-run structured pruner removes single query
        heads (the recipe's attention units count query heads, ``total == num_heads``)
        instead of whole kv groups. A store records its own granularity.
      batch_size: without a store: calibration sequences per forward batch.
      work_dir: without a store: where the temporary one-level supernet is built (default:
        the system's temporary directory); it is removed afterwards.
      progress: without a store: show the build's progress bar.

    Returns:
      ``(pruned model, config_updates, report)``: the pruned :class:`HFModel` (its
      adapter's config already holds ``config_updates``; its fingerprint is that of the
      pruned weights in their dtype), the config.json keys physical slicing changed (pass
      them to :func:`write_pruned`), and an :class:`ApplyReport`.

    Raises:
      RecipeError: the recipe is for another model (fingerprint, layer names, shapes), a
        store level matching one of its sparsities is missing (naming the layer and the
        store's levels), or it does not fit the store.
      ValueError: bad arguments: no store and no pruner, a pruner that needs calibration
        data without it, a pruner of the wrong kind, a store built for another model.
    """
    refuse_bit_recipe(recipe, "apply")
    if recipe.quantized:
        raise RecipeError(
            "apply_recipe prunes; this recipe quantizes (per-layer bits): use "
            "allocsearch.recipe.apply_quant.apply_quant_recipe"
        )
    adapter = model.adapter
    check_against_model(recipe, model_layers(adapter, routers=True), model.fingerprint)
    counts = _recipe_counts(recipe)
    notes: list[str] = []
    if recipe.partial:
        notes.append("the recipe is partial: the best allocation of an interrupted search")
    if store is not None:
        return _apply_from_store(model, recipe, store, counts, physical, notes)
    return _apply_by_repruning(
        model,
        recipe,
        counts,
        notes,
        calibration=calibration,
        pruner=pruner,
        physical=physical,
        input_mode=input_mode,
        query_heads=query_heads,
        batch_size=batch_size,
        work_dir=work_dir,
        progress=progress,
    )


def _apply_from_store(
    model: HFModel,
    recipe: Recipe,
    store: SupernetStore,
    counts: dict[str, int],
    physical: bool,
    notes: list[str],
) -> tuple[HFModel, dict[str, Any], ApplyReport]:
    """:func:`apply_recipe` with the store the recipe was searched on: its variants at the
    recipe's levels."""
    if store.model_fingerprint != model.fingerprint:
        raise ValueError(
            f"the store {store.path} was built for model fingerprint "
            f"{store.model_fingerprint!r}, not this model's {model.fingerprint!r}"
        )
    if store.tokens_fingerprint != recipe.provenance.calibration.fingerprint:
        notes.append(
            f"the store was built from calibration tokens {store.tokens_fingerprint}, the "
            f"recipe was scored on {recipe.provenance.calibration.fingerprint}"
        )
    levels = _levels_from_store(recipe, store)
    params, keeps = _materialize(
        model, store, levels, recipe, counts, f"the recipe was not made from {store.path}"
    )
    source = f"store:{store.path}"
    return _finish(model, recipe, store, levels, params, keeps, counts, physical, source, notes)


def _apply_by_repruning(
    model: HFModel,
    recipe: Recipe,
    counts: dict[str, int],
    notes: list[str],
    *,
    calibration: TokenSet | None,
    pruner: LocalPruner | Callable[..., Any] | None,
    physical: bool,
    input_mode: InputMode,
    query_heads: bool,
    batch_size: int,
    work_dir: str | os.PathLike | None,
    progress: bool,
) -> tuple[HFModel, dict[str, Any], ApplyReport]:
    """:func:`apply_recipe` without a store: re-run ``pruner`` at the recipe's exact
    sparsities into a temporary one-level supernet, then take its variants."""
    adapter = model.adapter
    if input_mode not in INPUT_MODES:
        raise ValueError(f"input_mode {input_mode!r} is not supported; valid: {INPUT_MODES}")
    _check_pruner(recipe, pruner)
    tokens = _calibration_for(pruner, calibration)
    grid, covered = _exact_grid(recipe, adapter, counts, query_heads=query_heads)
    with tempfile.TemporaryDirectory(prefix=".allocsearch-apply-", dir=work_dir) as tmp:
        one_level = build_supernet(
            model,
            tokens,
            pruner=pruner,
            grid=grid,
            structure=recipe.structure,
            input_mode=input_mode,
            out_dir=Path(tmp) / "supernet",
            batch_size=batch_size,
            progress=progress,
            query_heads=query_heads,
            prune_router=any(x.role == "router" for x in recipe.layers),
        )
        levels = dict.fromkeys(covered, 0)
        params, keeps = _materialize(
            model,
            one_level,
            levels,
            recipe,
            counts,
            "the recipe's layer sparsities disagree with its units' removed groups",
        )
        # Device copies are made before the temporary store is removed.
        jax.block_until_ready(params)
        return _finish(
            model,
            recipe,
            one_level,
            levels,
            params,
            keeps,
            counts,
            physical,
            f"pruner:{_pruner_name(pruner)}",
            notes,
        )


def _finish(
    model: HFModel,
    recipe: Recipe,
    store: SupernetStore,
    levels: Mapping[int, int],
    params: dict[str, jax.Array],
    keeps: Mapping[int, np.ndarray],
    counts: Mapping[str, int],
    physical: bool,
    source: str,
    notes: list[str],
) -> tuple[HFModel, dict[str, Any], ApplyReport]:
    adapter = model.adapter
    info = {x.name: x for x in model_layers(adapter, routers=True)}
    level_of = {layer: levels[u] for u in levels for layer in store.spec.units[u].layers}
    applied = {x.name: int(jnp.sum(params[info[x.name].weight_name] == 0)) for x in recipe.layers}
    _zero_dead_biases(adapter, store, params, keeps)
    updates: dict[str, Any] = {}
    if physical and keeps:
        params, updates, more = _slice_structured(adapter, store, params, keeps)
        notes.extend(more)
    new_adapter = adapter_for_config({**adapter.hf_config, **updates}) if updates else adapter
    shapes = new_adapter.param_shapes
    wrong = {
        k: (tuple(v.shape), shapes.get(k))
        for k, v in params.items()
        if tuple(v.shape) != shapes.get(k)
    }
    assert not wrong and set(shapes) == set(params), f"sliced shapes do not fit: {wrong}"
    host = {k: np.asarray(v) for k, v in params.items()}
    raw = new_adapter.to_hf_tensors(host)
    raw.update(model.extras)
    fingerprint = fingerprint_tensors(new_adapter.hf_config, raw)
    del host, raw
    pruned = HFModel(new_adapter, params, dict(model.extras), fingerprint, None)

    removed_biases = 0
    layouts = {}
    keep_of = {store.spec.units[u].name: keep for u, keep in keeps.items()}
    for ru in recipe.units:
        role = "attn" if ru.kind == "heads" else "mlp"
        layout = layouts.setdefault(role, _layout_of(adapter, role, store))
        members = [info[x] for x in ru.layers]
        removed_biases += _dead_bias_count(
            layout, _unit_groups(ru, layout), members, params, keep_of.get(ru.name)
        )
    dense_count = adapter.num_params()
    layers = tuple(
        AppliedLayer(
            name=x.name,
            role=x.role,
            block=x.block,
            sparsity_recipe=x.sparsity,
            sparsity_applied=applied[x.name] / x.numel,
            level=level_of[x.name],
            shape=tuple(int(d) for d in params[info[x.name].weight_name].shape),
        )
        for x in recipe.layers
    )
    report = ApplyReport(
        source=source,
        structure=recipe.structure,
        physical=bool(updates),
        layers=layers,
        num_params_dense=dense_count,
        num_params_recipe=dense_count - sum(counts.values()) - removed_biases,
        num_params=new_adapter.num_params(),
        config_updates=dict(updates),
        notes=tuple(notes),
    )
    if physical:  # dropped blocks leave the model (allocsearch.recipe.depth)
        pruned, updates, report = apply_depth(pruned, updates, report, recipe)
    # removed experts leave it too, or stay as zeros (allocsearch.recipe.experts)
    return apply_experts(pruned, updates, report, recipe, physical=physical)


def write_pruned(
    model: HFModel,
    path: str | os.PathLike,
    *,
    config_updates: Mapping[str, Any] | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    copy_files: Sequence[str | os.PathLike] = (),
) -> Path:
    """Save a model returned by :func:`apply_recipe` as a Hugging Face directory
    (config.json with ``config_updates`` + safetensors in ``dtype``), with
    :func:`~allocsearch.models.hf.save_model`: assembled under a temporary name and renamed
    into place, so an interrupted or failed write leaves nothing at ``path``.

    Args:
      model: the pruned model.
      path: the directory to create.
      config_updates: the config.json keys :func:`apply_recipe` returned; they must
        describe ``model``'s parameter shapes.
      dtype: ``"float32"`` or ``"bfloat16"`` storage.
      overwrite: replace an existing ``path``; otherwise it is refused before writing.
      copy_files: files copied into the directory under their own names (e.g.
        :func:`tokenizer_files` of the source model, so the pruned one has its tokenizer).

    Returns:
      The written directory.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False.
      ValueError: ``config_updates`` (with the model's config) do not describe the model's
        parameter shapes, naming the first parameter that differs.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
    updates = dict(config_updates or {})
    shapes = adapter_for_config({**model.adapter.hf_config, **updates}).param_shapes
    for name, value in model.params.items():
        if tuple(value.shape) != shapes.get(name):
            raise ValueError(
                f"config_updates {updates} do not describe the model: {name} has shape "
                f"{tuple(value.shape)}, the updated config gives {shapes.get(name)}; pass the "
                f"updates apply_recipe returned with this model"
            )
    return save_model(
        model,
        target,
        dtype=dtype,
        overwrite=overwrite,
        config_updates=updates,
        copy_files=copy_files,
    )


TOKENIZER_FILES: Final = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
"""Tokenizer files of a Hugging Face model directory that a pruned copy keeps."""


def tokenizer_files(model_dir: str | os.PathLike | None) -> list[Path]:
    """The :data:`TOKENIZER_FILES` present in ``model_dir`` (none for ``None``)."""
    if model_dir is None:
        return []
    return [Path(model_dir) / n for n in TOKENIZER_FILES if (Path(model_dir) / n).is_file()]
