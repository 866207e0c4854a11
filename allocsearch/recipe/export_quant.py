"""Exports of bitwidth recipes: llm-compressor's GPTQModifier recipe, EvoPress's configuration.

A bitwidth recipe (schema v2) gives each layer ``bits``, ``group_size`` and ``symmetric``
(:class:`~allocsearch.recipe.recipe.LayerEntry`). Two targets:

- llm-compressor: one ``quant_stage`` whose ``GPTQModifier`` has one *config group* per
  distinct (bits, group size, symmetry), each targeting its layers by anchored module-name
  regex (``re:<escaped name>$``) with ``weights: {num_bits, type: int, symmetric,
  strategy: group, group_size}`` (the compressed-tensors scheme; REFERENCES.md,
  "Quantization levels"); ``ignore: ['re:.*lm_head']``. Layers the recipe keeps at 16
  bits are targeted by no group, so GPTQ leaves them alone.
- EvoPress: the text its ``evo_quant_search.py`` writes and its loaders read, one line
  ``<module name>: <bits>`` per layer in forward order.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import yaml

from allocsearch.recipe.exporters import (
    LLMC_IGNORE,
    Export,
    ExportError,
    _budget_check,
    _refuse_depth,
    _refuse_removed_experts,
    llm_compressor_modules,
)
from allocsearch.recipe.recipe import Recipe, fraction_removed

QUANT_STAGE = "quant_stage"
_RESERVED_ARGS = ("config_groups", "ignore", "targets")


def _refuse_unquantized(recipe: Recipe, target: str) -> None:
    if not recipe.quantized:
        raise ExportError(
            f"{target} quantization export: the recipe has no per-layer bits (a sparsity "
            f"recipe); use --format llm-compressor / evopress without bits for pruning recipes"
        )
    if any(x.sparsity > 0 for x in recipe.layers if x.quantized):
        raise ExportError(
            f"{target} quantization export: some quantized layers are also pruned; joint "
            f"sparsity + bits recipes are not exported yet"
        )


def _header(recipe: Recipe, tool: str) -> str:
    return (
        f"# {tool} exported by allocsearch ({recipe.provenance.tool_version})\n"
        f"# model: {recipe.model.name_or_path} ({recipe.model.architecture}), fingerprint "
        f"{recipe.model.fingerprint}\n"
        f"# budget: {recipe.budget.kind} target {recipe.budget.target:.6f}, achieved "
        f"{recipe.budget.achieved:.6f} ({16 * (1 - _bits_removed(recipe)):.4f} bits per "
        f"weight, scales and zero points counted); strategy {recipe.provenance.strategy}"
        f"{' (PARTIAL search)' if recipe.partial else ''}\n"
    )


def _bits_removed(recipe: Recipe) -> float:
    return fraction_removed(recipe.layers, "bits")


def to_llm_compressor_quant(
    recipe: Recipe, *, modifier_args: dict[str, Any] | None = None
) -> Export[str]:
    """llm-compressor recipe YAML giving every quantized layer its own bitwidth.

    Args:
      recipe: a bitwidth recipe (schema v2, layers with ``bits``).
      modifier_args: extra GPTQModifier arguments (e.g. ``{"dampening_frac": 0.01,
        "block_size": 128}``), copied verbatim; they may not set config_groups, ignore or
        targets.

    Returns:
      Export whose content is the YAML text (groups named ``w<bits>g<group>_<sym|asym>``).
    """
    _refuse_depth(recipe, "llm-compressor")
    _refuse_removed_experts(recipe, "llm-compressor")
    _refuse_unquantized(recipe, "llm-compressor")
    extra = dict(modifier_args or {})
    clash = sorted(set(extra) & set(_RESERVED_ARGS))
    if clash:
        raise ExportError(f"modifier_args may not set {clash}: the exporter writes them")
    names, _ = llm_compressor_modules(recipe)
    members: dict[tuple[int, int, bool], list[str]] = defaultdict(list)
    for name, x in zip(names, recipe.layers, strict=True):
        if x.quantized:
            members[(x.bits, x.group_size, x.symmetric)].append(f"re:{re.escape(name)}$")
    groups = {}
    for (bits, group, sym), targets in sorted(members.items()):
        groups[f"w{bits}g{group}_{'sym' if sym else 'asym'}"] = {
            "targets": targets,
            "weights": {
                "num_bits": bits,
                "type": "int",
                "symmetric": sym,
                "strategy": "group",
                "group_size": group,
            },
        }
    args = {**extra, "ignore": list(LLMC_IGNORE), "config_groups": groups}
    doc = {QUANT_STAGE: {"quant_modifiers": {"GPTQModifier": args}}}
    dense = sum(not x.quantized for x in recipe.layers)
    notes = [
        f"{len(groups)} config group(s), one per bitwidth: "
        + ", ".join(f"{k} ({len(v['targets'])} layers)" for k, v in groups.items())
    ]
    if dense:
        notes.append(f"{dense} layer(s) stay 16-bit: no config group targets them")
    what = "the llm-compressor quantization recipe"
    kind, ref, got, budget = _budget_check(recipe, _bits_removed_by_kind(recipe), what)
    text = _header(recipe, "llm-compressor GPTQ recipe") + yaml.safe_dump(
        doc, sort_keys=False, default_flow_style=False, width=1000
    )
    return Export(text, tuple(notes + budget), kind, ref, got)


def _bits_removed_by_kind(recipe: Recipe):
    """The exported bitwidths are the recipe's: the fraction removed is the recipe's own."""
    return lambda kind: fraction_removed(recipe.layers, kind)


def to_evopress_quant(recipe: Recipe) -> Export[str]:
    """EvoPress's quantization configuration: ``<module name>: <bits>`` per layer.

    Every layer must be quantized (EvoPress's database has no 16-bit level), with one
    group size and symmetry (EvoPress's database is built with one; the text has only bits).
    """
    _refuse_depth(recipe, "EvoPress")
    _refuse_unquantized(recipe, "EvoPress")
    dense = [x.name for x in recipe.layers if not x.quantized]
    if dense:
        raise ExportError(
            f"EvoPress's quantization configuration gives every layer a bitwidth; "
            f"{len(dense)} layer(s) are 16-bit in this recipe, e.g. {dense[:3]}"
        )
    grids = {(x.group_size, x.symmetric) for x in recipe.layers}
    if len(grids) > 1:
        raise ExportError(
            f"the layers use {len(grids)} group sizes / symmetries {sorted(grids)}; EvoPress's "
            f"configuration holds bits only, for a database built with one"
        )
    ((group, sym),) = grids
    lines = [f"{x.name}: {x.bits}" for x in recipe.layers]
    notes = [
        f"bits only: build EvoPress's database with group size {group}, "
        f"{'symmetric' if sym else 'asymmetric'} quantization to match"
    ]
    what = "the EvoPress configuration"
    kind, ref, got, budget = _budget_check(recipe, _bits_removed_by_kind(recipe), what)
    return Export("\n".join(lines) + "\n", tuple(notes + budget), kind, ref, got)
