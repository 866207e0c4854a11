"""Exporters: turn a :class:`Recipe` into what other pruning tools take as input.

Every exporter returns an :class:`Export`: the content (text or a dict / list), human
readable notes on what it had to average or could not express, and the result of a
budget check: the fraction of the budget's cost that the exported values remove,
recomputed from the recipe's layer shapes, next to the recipe's own value. When an
exporter must approximate (per-block averaging, channel ratios), the notes say by how
much the budget moves; when the exported values cannot be made consistent with the
recipe at all, the exporter raises :class:`ExportError`.

Targets (see docs/recipe.md for the formats and the sources they were matched against):
  - :func:`to_llm_compressor`: llm-compressor YAML (SparseGPTModifier /
    WandaPruningModifier, list form of ``sparsity``), per linear layer or per block.
  - :func:`to_evopress`: EvoPress ``module.name: level`` lines, levels relative to the
    supernet's uniform (center) level; for a depth recipe (dropped sublayers, see
    :mod:`allocsearch.recipe.depth`) EvoPress's drop configuration, one line per block.

The other formats have no way to remove a sublayer: they refuse a depth recipe, naming a
dropped unit.
  - :func:`to_owl`: OWL-style list, one sparsity per decoder block.
  - :func:`to_torch_pruning`: Torch-Pruning ``pruning_ratio_dict`` (fractions of
    channels), structured recipes only.
  - :func:`to_jaxpruner`: jaxpruner ``custom_sparsity_map`` keyed by flattened Flax
    parameter paths.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import yaml

from allocsearch.recipe.depth import dropped_units
from allocsearch.recipe.export_base import (
    Export,
    ExportError,
    _budget_check,
    _layer_budget,
    _refuse_depth,
    _refuse_removed_experts,
)
from allocsearch.recipe.export_jaxpruner import (
    JAXPRUNER_CONVENTIONS,
    JAXPRUNER_FORMAT,
    jaxpruner_json,
    jaxpruner_key,
    to_jaxpruner,
)
from allocsearch.recipe.recipe import (
    LayerEntry,
    Recipe,
    atomic_write_text,
    fraction_removed,
)
from allocsearch.supernet.experts import EXPERT_ROLE
from allocsearch.supernet.spec import SupernetSpec

T = TypeVar("T")

LLMC_MODIFIERS = ("SparseGPTModifier", "WandaPruningModifier")
LLMC_GRANULARITIES = ("layer", "block")
# llm-compressor matches "re:" targets with re.match on module names; lm_head is ignored.
LLMC_IGNORE = ("re:.*lm_head",)
_LLMC_RESERVED_ARGS = ("sparsity", "mask_structure", "targets", "ignore")
# Mixture-of-experts checkpoints store one tensor per expert, but transformers 5 fuses the
# experts in memory and llm-compressor linearizes them back into per-expert modules
# ``<mlp>.experts.<e>.{gate,up,down}_proj`` whose up_proj is registered before gate_proj.
# Mixtral's checkpoint keys (block_sparse_moe, w1/w3/w2) name those modules differently.
_LLMC_EXPERT = re.compile(r"^(.*)\.(block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)$")
_MIXTRAL_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_LLMC_EXPERT_ORDER = {"up_proj": 0, "gate_proj": 1, "down_proj": 2}


def llm_compressor_modules(recipe: Recipe) -> tuple[list[str], list[int]]:
    """llm-compressor's module name of every recipe layer, and the recipe layer indices in
    the order its ``named_modules()`` yields them.

    Equal to the recipe's names and forward order except for routed experts of
    mixture-of-experts models (see ``_LLMC_EXPERT``): Mixtral's
    ``block_sparse_moe.experts.<e>.w1`` is ``mlp.experts.<e>.gate_proj`` (w3 up, w2 down),
    and within each expert ``up_proj`` comes before ``gate_proj``.
    """
    names: list[str] = []
    keys: list[tuple[int, int]] = []
    first: dict[tuple[str, str], int] = {}  # (block path, expert) -> its first layer index
    for i, x in enumerate(recipe.layers):
        m = _LLMC_EXPERT.match(x.name)
        if m is None:
            names.append(x.name)
            keys.append((i, 0))
            continue
        head, _, expert, proj = m.groups()
        proj = _MIXTRAL_PROJ.get(proj, proj)
        names.append(f"{head}.mlp.experts.{expert}.{proj}")
        start = first.setdefault((head, expert), i)
        keys.append((start, _LLMC_EXPERT_ORDER.get(proj, 3)))
    return names, sorted(range(len(recipe.layers)), key=lambda i: keys[i])


def _evopress_depth(recipe: Recipe) -> Export[str]:
    """EvoPress's drop configuration: line ``b`` is ``none``, ``attn``, ``mlp`` or
    ``attn+mlp``, the sublayers of block ``b`` dropped (its depth search's format)."""
    partial = [u for u in recipe.units if 0 < u.removed < u.total]
    if partial:
        u = partial[0]
        raise ExportError(
            f"EvoPress's depth format drops whole sublayers only; unit {u.name!r} removes "
            f"{u.removed} of {u.total} {u.kind} (use `allocsearch apply` for mixed recipes)"
        )
    n_blocks = _require_blocks(recipe, "EvoPress's drop configuration")
    dropped: list[list[str]] = [[] for _ in range(n_blocks)]
    for u in dropped_units(recipe):
        dropped[u.block].append("attn" if u.kind == "heads" else "mlp")
    text = "".join(("+".join(sorted(d)) or "none") + "\n" for d in dropped)
    kind, ref, got, notes = _budget_check(
        recipe, lambda k: fraction_removed(recipe.layers, k), "the drop configuration"
    )
    first = "line b is block b: none, attn, mlp or attn+mlp (the sublayers dropped)"
    return Export(text, (first, *notes), kind, ref, got)


def _require_blocks(recipe: Recipe, what: str) -> int:
    """Check every layer sits in a block and blocks are 0..B-1 without gaps; return B."""
    outside = [x.name for x in recipe.layers if x.block < 0]
    if outside:
        raise ExportError(
            f"{what} needs every layer inside a decoder block, but {outside[:3]} have block -1"
        )
    present = sorted({x.block for x in recipe.layers})
    if present != list(range(len(present))):
        missing = sorted(set(range(present[-1] + 1)) - set(present))
        raise ExportError(
            f"{what} gives one value per decoder block, but the recipe has no layers in "
            f"blocks {missing[:10]}; blocks must be 0..B-1 without gaps"
        )
    return len(present)


def block_sparsities(recipe: Recipe) -> np.ndarray:
    """One sparsity per decoder block: the weight-count-weighted mean of its layers.

    Args:
      recipe: a recipe whose layers all lie in blocks 0..B-1 (no gaps).

    Returns:
      float64[B]; block b gets sum_{l in b} s_l * numel_l / sum_{l in b} numel_l, so the
      total number of removed weights is unchanged (the params budget is preserved
      exactly; flops too, as a linear layer's MACs per token equal its weight count).
    """
    n_blocks = _require_blocks(recipe, "a per-block sparsity list")
    removed = np.zeros(n_blocks, dtype=np.float64)
    total = np.zeros(n_blocks, dtype=np.float64)
    for x in recipe.layers:
        removed[x.block] += x.sparsity * x.numel
        total[x.block] += x.numel
    return removed / total


def _per_layer_from_blocks(recipe: Recipe, blocks: np.ndarray) -> np.ndarray:
    return np.array([blocks[x.block] for x in recipe.layers], dtype=np.float64)


def _block_spread_note(recipe: Recipe, blocks: np.ndarray) -> str:
    dev = np.abs(recipe.sparsities() - _per_layer_from_blocks(recipe, blocks))
    worst = int(np.argmax(dev))
    return (
        f"averaged {len(recipe.layers)} per-layer sparsities into {len(blocks)} per-block "
        f"values (weighted by weight count); the largest change of a layer is "
        f"{dev[worst]:.4f} ({recipe.layers[worst].name})"
    )


def _block_prefix(recipe: Recipe) -> str:
    """Module path of the block list, e.g. ``model.layers`` (``transformer.h`` for GPT-2)."""
    prefixes = set()
    for x in recipe.layers:
        parts = x.name.split(".")
        idx = [i for i, p in enumerate(parts) if p == str(x.block) and i > 0]
        if not idx:
            raise ExportError(
                f"cannot find the block index {x.block} in the module path {x.name!r}"
            )
        prefixes.add(".".join(parts[: idx[0]]))
    if len(prefixes) != 1:
        raise ExportError(f"layers disagree on the block list's module path: {sorted(prefixes)}")
    prefix = prefixes.pop()
    if not re.fullmatch(r"[A-Za-z0-9_.]+", prefix):
        raise ExportError(f"block module path {prefix!r} has characters a target regex can't hold")
    return prefix


# ----------------------------------------------------------------------------- llm-compressor


def to_llm_compressor(
    recipe: Recipe,
    *,
    modifier: str = "SparseGPTModifier",
    granularity: str = "layer",
    modifier_args: Mapping[str, Any] | None = None,
) -> Export[str]:
    """llm-compressor recipe YAML with per-module sparsities (list form of ``sparsity``).

    The YAML is one stage, ``sparsity_stage``, with a ``sparsity_modifiers`` group
    holding ``modifier`` with ``sparsity`` (a list: one value per module matched by
    ``targets``, in module order), ``mask_structure`` ("0:0" unstructured, "N:M" with N
    zeros per M) and ``ignore: ['re:.*lm_head']``.

    Args:
      recipe: an unstructured or N:M recipe (llm-compressor's SparseGPT / Wanda modifiers
        do not remove heads or neurons).
      modifier: ``"SparseGPTModifier"`` or ``"WandaPruningModifier"``.
      granularity: ``"layer"``: one anchored regex target per pruned linear layer with its
        own sparsity (dense layers are left out); ``"block"``: ``targets:
        ['re:<blocks>.\\d+$']`` and one weight-weighted mean sparsity per decoder block
        (every Linear inside the block gets it, including any the recipe does not list).
      modifier_args: extra modifier arguments (e.g. ``{"dampening_frac": 0.01}``), copied
        verbatim; they may not set sparsity, mask_structure, targets or ignore.

    Returns:
      Export whose content is the YAML text. llm-compressor assigns the list entries to
      the matched modules in the order the model's ``named_modules()`` yields them; the
      list is in that order (:func:`llm_compressor_modules`: the recipe's forward order,
      except that mixture-of-experts experts carry llm-compressor's module names and
      order).
    """
    extra = _llmc_checked_args(recipe, modifier, granularity, modifier_args)
    notes: list[str] = []
    if granularity == "layer":
        groups, exported = _llmc_layer_groups(recipe, extra, notes)
        what = "the per-layer llm-compressor recipe"
    else:
        groups, exported = _llmc_block_groups(recipe, extra, notes)
        what = "the per-block llm-compressor recipe"

    stage: dict[str, Any] = {"run_type": "oneshot"}
    for name, args in groups:
        stage[name] = {modifier: args}
    doc = {"sparsity_stage": stage}
    kind, ref, got, budget_notes = _budget_check(recipe, _layer_budget(recipe, exported), what)
    header = _llmc_header(recipe, granularity)
    text = header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=1000)
    return Export(text, tuple(notes + budget_notes), kind, ref, got)


def _llmc_checked_args(
    recipe: Recipe, modifier: str, granularity: str, modifier_args: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The extra modifier arguments, after refusing what llm-compressor cannot take."""
    _refuse_depth(recipe, "llm-compressor")
    _refuse_removed_experts(recipe, "llm-compressor")
    if modifier not in LLMC_MODIFIERS:
        raise ExportError(f"modifier {modifier!r} is not one of {LLMC_MODIFIERS}")
    if granularity not in LLMC_GRANULARITIES:
        raise ExportError(f"granularity {granularity!r} is not one of {LLMC_GRANULARITIES}")
    if recipe.structure not in ("unstructured", "nm"):
        raise ExportError(
            f"llm-compressor's {modifier} prunes individual weights (unstructured or N:M); a "
            f"{recipe.structure!r} recipe removes heads/neurons: use --format torch-pruning "
            f"(to_torch_pruning) instead"
        )
    extra = dict(modifier_args or {})
    clash = sorted(set(extra) & set(_LLMC_RESERVED_ARGS))
    if clash:
        raise ExportError(f"modifier_args may not set {clash}; the exporter writes those")
    ignored = [x.name for x in recipe.layers if re.match(LLMC_IGNORE[0][3:], x.name)]
    if ignored:
        raise ExportError(
            f"the export ignores lm_head ({LLMC_IGNORE[0]}) but the recipe prunes {ignored}"
        )
    return extra


def _llmc_layer_groups(
    recipe: Recipe, extra: Mapping[str, Any], notes: list[str]
) -> tuple[list[tuple[str, dict[str, Any]]], Any]:
    """Per-layer modifier groups (one per N:M pattern) and the sparsities they export."""
    groups: list[tuple[str, dict[str, Any]]] = []
    per_layer = recipe.sparsities()
    if recipe.structure == "unstructured":
        patterns: dict[tuple[int, int], list[int]] = {
            (0, 0): [i for i, x in enumerate(recipe.layers) if x.sparsity > 0]
        }
    else:
        patterns = {}
        for i, x in enumerate(recipe.layers):
            if x.n:
                patterns.setdefault((x.n, x.m), []).append(i)
    dense = [x.name for x in recipe.layers if x.sparsity == 0]
    if dense:
        notes.append(
            f"{len(dense)} dense layer(s) (sparsity 0) are left out of targets and stay "
            f"dense: {dense[:5]}{' ...' if len(dense) > 5 else ''}"
        )
    if not any(patterns.values()):
        raise ExportError("every layer of the recipe is dense; there is nothing to prune")
    if len(patterns) > 1:
        notes.append(
            "llm-compressor takes one mask_structure per modifier; the recipe mixes N:M "
            f"patterns {sorted(f'{n}:{m}' for n, m in patterns)}, so the stage has one "
            "modifier group per pattern"
        )
    modules, order = llm_compressor_modules(recipe)
    position = {i: p for p, i in enumerate(order)}
    for (n, m), idx in sorted(patterns.items()):
        name = "sparsity_modifiers" if len(patterns) == 1 else f"sparsity_{n}of{m}_modifiers"
        idx = sorted(idx, key=position.__getitem__)
        args: dict[str, Any] = {
            "sparsity": [float(per_layer[i]) for i in idx],
            "mask_structure": f"{n}:{m}",
            "targets": ["re:" + re.escape(modules[i]) + "$" for i in idx],
            "ignore": list(LLMC_IGNORE),
        }
        args.update(extra)
        groups.append((name, args))
    return groups, per_layer


def _llmc_block_groups(
    recipe: Recipe, extra: Mapping[str, Any], notes: list[str]
) -> tuple[list[tuple[str, dict[str, Any]]], Any]:
    """The per-block modifier group and the per-layer sparsities it exports."""
    groups: list[tuple[str, dict[str, Any]]] = []
    blocks = block_sparsities(recipe)
    prefix = _block_prefix(recipe)
    if recipe.structure == "nm":
        pats = {(x.n, x.m) for x in recipe.layers}
        if len(pats) != 1 or next(iter(pats))[0] == 0:
            raise ExportError(
                "per-block llm-compressor export of an N:M recipe needs one pattern (n > 0) "
                f"for every layer, found {sorted(f'{n}:{m}' for n, m in pats)}; use "
                "granularity='layer'"
            )
        n, m = pats.pop()
        mask = f"{n}:{m}"
    else:
        mask = "0:0"
        notes.append(_block_spread_note(recipe, blocks))
    args = {
        "sparsity": [float(v) for v in blocks],
        "mask_structure": mask,
        "targets": [f"re:{prefix}.\\d+$"],
        "ignore": list(LLMC_IGNORE),
    }
    args.update(extra)
    groups.append(("sparsity_modifiers", args))
    notes.append(
        f"the sparsity list has {len(blocks)} entries, one per decoder block; llm-compressor "
        f"checks the model has exactly that many blocks and gives every Linear of block b "
        f"the value of entry b"
    )
    return groups, _per_layer_from_blocks(recipe, blocks)


def _llmc_header(recipe: Recipe, granularity: str) -> str:
    """The YAML's comment header: tool, model, budget and how to read the lists."""
    return (
        f"# llm-compressor recipe exported by allocsearch ({recipe.provenance.tool_version})\n"
        f"# model: {recipe.model.name_or_path} ({recipe.model.architecture}), fingerprint "
        f"{recipe.model.fingerprint}\n"
        f"# budget: {recipe.budget.kind} target {recipe.budget.target:.6f}, achieved "
        f"{recipe.budget.achieved:.6f}; strategy {recipe.provenance.strategy}"
        f"{' (PARTIAL search)' if recipe.partial else ''}\n"
        f"# granularity: {granularity}; sparsity[i] belongs to the module matched by "
        f"targets[i]\n"
    )


# ----------------------------------------------------------------------------- EvoPress


def _recipe_unit_table(recipe: Recipe) -> tuple[list[str], np.ndarray, list[list[int]]]:
    """Per searched unit: name, recipe sparsity (weight-weighted) and member layer indices."""
    index = {x.name: i for i, x in enumerate(recipe.layers)}
    if recipe.units:
        names = [u.name for u in recipe.units]
        members = [[index[n] for n in u.layers] for u in recipe.units]
    else:
        names = [x.name for x in recipe.layers]
        members = [[i] for i in range(len(recipe.layers))]
    s = recipe.sparsities()
    numel = np.array([x.numel for x in recipe.layers], dtype=np.float64)
    unit_s = np.array([np.dot(s[m], numel[m]) / numel[m].sum() for m in members])
    return names, unit_s, members


def _refuse_grouped_units(spec: SupernetSpec) -> None:
    """Raise when a unit of ``spec`` covers several modules (a whole expert, tied experts):
    EvoPress's configuration and database give every module a level of its own grid, so
    they cannot express a level shared by several modules, nor an expert's removed level."""
    grouped = [u for u in spec.units if len(u.layers) > 1]
    if grouped:
        u = grouped[0]
        what = "a whole expert" if u.role == EXPERT_ROLE else "a group of modules"
        raise ExportError(
            f"EvoPress's format gives each module a level of its own and cannot express "
            f"expert units: this supernet's unit {u.name!r} is {what} ({len(u.layers)} modules "
            f"sharing one level) and {len(grouped)} units are such groups; use `allocsearch "
            f"apply` (or --format llm-compressor when the recipe removes no expert)"
        )


def to_evopress(recipe: Recipe, spec: SupernetSpec, choice: np.ndarray) -> Export[str]:
    """EvoPress configuration: one ``module.name: level`` line per searched unit.

    ``level = choice[l] - spec.center[l]``: the level index relative to the level a
    uniform allocation picks (0 = uniform; negative = denser, positive = sparser), the
    convention of EvoPress's databases, whose files are ``<database>/<module>/<level>.pth``.

    Args:
      recipe: the recipe made from ``choice``.
      spec: the supernet the search ran on; its units must be the recipe's layers
        (unstructured / N:M) or the recipe's units (structured), in the same order.
      choice: int[L], the chosen level of every unit.

    Raises:
      ExportError: the spec's structure or units differ from the recipe's, ``choice`` is
        not a valid level vector, or the spec's sparsity at a chosen level differs from
        the recipe's (the recipe was not made from this supernet and choice).
    """
    if dropped_units(recipe):
        return _evopress_depth(recipe)
    if recipe.units:
        raise ExportError(
            f"EvoPress has no head/neuron pruning (its databases hold unstructured or N:M "
            f"levels), so it cannot load this {recipe.structure!r} recipe; use --format "
            f"torch-pruning (to_torch_pruning) for heads/neurons"
        )
    if spec.structure != recipe.structure:
        raise ExportError(
            f"supernet structure {spec.structure!r} != recipe structure {recipe.structure!r}"
        )
    _refuse_grouped_units(spec)
    names, unit_s, members = _recipe_unit_table(recipe)
    spec_names = [u.name for u in spec.units]
    if spec_names != names:
        bad = next(
            (i for i, (a, b) in enumerate(zip(spec_names, names, strict=False)) if a != b),
            min(len(spec_names), len(names)),
        )
        raise ExportError(
            f"supernet units do not match the recipe's ({len(spec_names)} vs {len(names)} "
            f"units; first difference at position {bad}: "
            f"{spec_names[bad] if bad < len(spec_names) else None!r} vs "
            f"{names[bad] if bad < len(names) else None!r})"
        )
    choice = np.asarray(choice)
    if choice.shape != (spec.num_units,) or not np.issubdtype(choice.dtype, np.integer):
        raise ExportError(
            f"choice must be int[{spec.num_units}], got {choice.dtype}{list(choice.shape)}"
        )
    bad_level = np.flatnonzero((choice < 0) | (choice >= spec.num_levels))
    if bad_level.size:
        i = int(bad_level[0])
        raise ExportError(
            f"choice[{i}] = {int(choice[i])} for {names[i]!r} is not a valid level; valid "
            f"levels are 0..{int(spec.num_levels[i]) - 1}"
        )
    numel = np.array([x.numel for x in recipe.layers], dtype=np.float64)
    for u, m in zip(spec.units, members, strict=True):
        if u.numel != int(numel[m].sum()):
            raise ExportError(
                f"unit {u.name!r}: supernet numel {u.numel} != recipe layers' {int(numel[m].sum())}"
            )
    spec_s = spec.sparsities_of(choice)
    off = np.flatnonzero(np.abs(spec_s - unit_s) > 1e-9)
    if off.size:
        i = int(off[0])
        raise ExportError(
            f"unit {names[i]!r}: level {int(choice[i])} of the supernet has sparsity "
            f"{float(spec_s[i])!r} but the recipe has {float(unit_s[i])!r}; the recipe was not "
            f"made from this supernet and choice"
        )
    rel = choice.astype(np.int64) - spec.center.astype(np.int64)
    text = "".join(f"{n}: {int(r)}\n" for n, r in zip(names, rel, strict=True))

    def exported(kind: str) -> float:
        cost = spec.numel if kind == "params" else spec.flops_per_token
        cost = cost.astype(np.float64)
        return float(np.dot(spec_s, cost) / cost.sum())

    kind, ref, got, budget_notes = _budget_check(recipe, exported, "the EvoPress configuration")
    notes = [
        f"levels are relative to each unit's uniform (center) level; they range from "
        f"{int(rel.min())} to {int(rel.max())}",
        "EvoPress loads <database>/<module>/<level>.pth: the levels refer to this "
        "allocsearch supernet's grid, so the weights must come from its variant store (or "
        "an EvoPress database built on the same grid)",
    ]
    return Export(text, tuple(notes + budget_notes), kind, ref, got)


# ----------------------------------------------------------------------------- OWL


def to_owl(recipe: Recipe) -> Export[list[float]]:
    """OWL-style allocation: one sparsity per decoder block (weight-weighted mean).

    This is the form OWL and the Wanda / SparseGPT drivers take in memory (every linear
    layer of block b gets ``content[b]``).

    Args:
      recipe: an unstructured recipe with layers in blocks 0..B-1.

    Returns:
      Export whose content is a list of B floats (fraction of weights zero per block).
    """
    _refuse_depth(recipe, "an OWL-style per-block list")
    if recipe.structure != "unstructured":
        raise ExportError(
            f"an OWL-style per-block list holds unstructured sparsities; this recipe is "
            f"{recipe.structure!r} (use --format llm-compressor for N:M, --format "
            f"torch-pruning for heads/neurons)"
        )
    blocks = block_sparsities(recipe)
    notes = [_block_spread_note(recipe, blocks)]
    kind, ref, got, budget_notes = _budget_check(
        recipe,
        _layer_budget(recipe, _per_layer_from_blocks(recipe, blocks)),
        "the per-block list",
    )
    return Export([float(v) for v in blocks], tuple(notes + budget_notes), kind, ref, got)


# ----------------------------------------------------------------------------- Torch-Pruning


def to_torch_pruning(recipe: Recipe) -> Export[dict[str, dict[str, float]]]:
    """Torch-Pruning ratios for a structured (heads / neurons) recipe.

    Returns:
      Export whose content is ``{"pruning_ratio_dict": {input projection: ratio},
      "head_pruning_ratio_dict": {attention sublayer: ratio}}``. Keys are module names;
      Torch-Pruning wants module objects: ``{modules[k]: v for k, v in d.items()}`` with
      ``modules = dict(model.named_modules())``. ``pruning_ratio_dict`` is keyed by each
      unit's first input projection (``model.layers.3.self_attn.q_proj``,
      ``model.layers.3.mlp.gate_proj``), whose output channels are the unit's heads or
      neurons: Torch-Pruning applies a key's ratio to every linear layer inside the key,
      so a sublayer key (``model.layers.3.mlp``) would also prune ``down_proj``'s output
      channels, i.e. the model's hidden size. A ratio is the fraction of CHANNELS removed
      (neurons of the MLP, or heads times head_dim of the attention: the same fraction
      as of heads), not of weights.

    Grouped-query attention (separate q and k projections, ``g = q rows / k rows > 1``
    query heads per k/v head): Torch-Pruning's head pruning removes ``ceil(ratio * g)``
    query heads from EVERY kv group and keeps every k/v head (``k_proj`` / ``v_proj``
    keep their rows; its Llama-3 example halves q_proj and leaves k/v at 1024 rows). So it
    reproduces an attention unit only where ``ratio * g`` is whole and the recipe removes
    no k/v rows; the notes name the units where it does not (a kv-group recipe removes
    whole groups with their k/v; a query-head recipe may remove unevenly, or a group's
    last query head with its k/v), and the budget check counts what Torch-Pruning removes.

    Raises:
      ExportError: the recipe is not structured.
    """
    _refuse_depth(recipe, "Torch-Pruning")
    if not recipe.units:
        raise ExportError(
            f"Torch-Pruning ratios are fractions of channels, which only a structured "
            f"(heads / neurons) recipe has; this recipe is {recipe.structure!r}. Use "
            f"--format llm-compressor, owl or jaxpruner for unstructured / N:M recipes"
        )
    ratios = {u.layers[0]: u.fraction for u in recipe.units}  # q_proj / gate_proj (fc_in)
    heads = {u.name: u.fraction for u in recipe.units if u.kind == "heads"}
    index = {x.name: i for i, x in enumerate(recipe.layers)}
    per_layer, gqa = _torch_pruning_sparsities(recipe, index)
    notes = _torch_pruning_notes(recipe, index, bool(heads), per_layer, gqa)
    kind, ref, got, budget_notes = _budget_check(
        recipe, _layer_budget(recipe, per_layer), "applying the channel ratios to every member"
    )
    content = {"pruning_ratio_dict": ratios, "head_pruning_ratio_dict": heads}
    return Export(content, tuple(notes + budget_notes), kind, ref, got)


def _torch_pruning_sparsities(
    recipe: Recipe, index: Mapping[str, int]
) -> tuple[np.ndarray, list[str]]:
    """Per-layer sparsities as Torch-Pruning applies the channel ratios, and the
    grouped-query attention units it cannot reproduce (described for the notes)."""
    per_layer = recipe.sparsities().copy()
    gqa: list[str] = []
    for u in recipe.units:
        members = [recipe.layers[index[name]] for name in u.layers]
        g = _query_heads_per_kv_head(members) if u.kind == "heads" else 1
        if g == 1:
            for name in u.layers:
                per_layer[index[name]] = u.fraction  # Torch-Pruning removes it from every member
            continue
        # Torch-Pruning: ceil(ratio * num_heads) query heads, spread as ceil(. / kv heads)
        # per kv group, i.e. ceil(ratio * g) of each group's g; k/v untouched.
        per_group = math.ceil(round(u.fraction * g, 9))
        kv_removed = max(m.sparsity for m in members if m.role in ("k", "v"))
        for m in members:
            per_layer[index[m.name]] = 0.0 if m.role in ("k", "v") else per_group / g
        if per_group != round(u.fraction * g, 9) or kv_removed > 0:
            gqa.append(
                f"{u.name} (recipe: {u.fraction:.4g} of the query heads, k/v rows "
                f"{kv_removed:.4g}; Torch-Pruning: {per_group} of {g} per kv group = "
                f"{per_group / g:.4g}, k/v 0)"
            )
    return per_layer, gqa


def _torch_pruning_notes(
    recipe: Recipe, index: Mapping[str, int], heads: bool, per_layer: np.ndarray, gqa: list[str]
) -> list[str]:
    """How to use the ratios, and where Torch-Pruning departs from the recipe."""
    notes = [
        "keys are module names; map them to modules with dict(model.named_modules())",
        "pruning_ratio_dict is keyed by each unit's first input projection (q_proj, "
        "gate_proj): keyed by a whole sublayer, Torch-Pruning would also prune o_proj's / "
        "down_proj's output channels, the hidden size; pass pruning_ratio=0 for the rest",
        "ratios are fractions of channels removed (removed/total heads or neurons), not of "
        "weights; Torch-Pruning turns them into channel counts, so check the pruned counts "
        "match units[].removed",
    ]
    if heads:
        notes.append(
            "attention: to remove whole heads pass num_heads, prune_num_heads=True, "
            "prune_head_dims=False and head_pruning_ratio_dict (the attention entries of "
            "pruning_ratio_dict hold the same values)"
        )
    if any(
        _query_heads_per_kv_head([recipe.layers[index[n]] for n in u.layers]) > 1
        for u in recipe.units
        if u.kind == "heads"
    ):
        notes.append(
            "grouped-query attention: Torch-Pruning removes query heads only, ceil(ratio * g) "
            "of the g query heads of EVERY kv group (chosen by its own importance), and keeps "
            "every k/v head; "
            + (
                f"it cannot reproduce {len(gqa)} attention unit(s): {'; '.join(gqa[:4])}"
                + (f" and {len(gqa) - 4} more" if len(gqa) > 4 else "")
                if gqa
                else "every attention unit's ratio is whole query heads per kv group and the "
                "recipe removes no k/v rows, so the counts match (not which heads)"
            )
        )
    differs = [
        x.name for i, x in enumerate(recipe.layers) if abs(per_layer[i] - x.sparsity) > 1e-12
    ]
    if differs and not gqa:
        notes.append(
            f"{len(differs)} member layer(s) lose fewer weights in the recipe than the unit's "
            f"channel ratio (e.g. k/v under grouped-query attention): {differs[:4]}"
        )
    return notes


def _query_heads_per_kv_head(members: Sequence[LayerEntry]) -> int:
    """Query heads per k/v head of an attention unit with separate q and k projections
    (rows of q / rows of k); 1 without them (fused qkv, MLP units) or without GQA."""
    q = [m for m in members if m.role == "q"]
    k = [m for m in members if m.role == "k"]
    if len(q) != 1 or len(k) != 1 or q[0].out_features % k[0].out_features:
        return 1
    return q[0].out_features // k[0].out_features


# ----------------------------------------------------------------------------- files


def write_export(text: str, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write exported text atomically (temp file in the same directory, fsync, rename).

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False.
      ExportError: ``text`` is not a string (dump dict / list content yourself first).
    """
    if not isinstance(text, str):
        raise ExportError(
            f"write_export writes text, got {type(text).__name__}; serialise dict content "
            f"(e.g. json.dumps) first"
        )
    return atomic_write_text(text, path, overwrite=overwrite)


__all__ = [
    "LLMC_GRANULARITIES",
    "LLMC_IGNORE",
    "LLMC_MODIFIERS",
    "JAXPRUNER_CONVENTIONS",
    "JAXPRUNER_FORMAT",
    "Export",
    "ExportError",
    "block_sparsities",
    "jaxpruner_json",
    "jaxpruner_key",
    "to_evopress",
    "to_jaxpruner",
    "llm_compressor_modules",
    "to_llm_compressor",
    "to_owl",
    "to_torch_pruning",
    "write_export",
]
