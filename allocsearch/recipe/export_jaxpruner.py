"""The jaxpruner export: a ``custom_sparsity_map`` keyed by flattened Flax parameter paths."""

from __future__ import annotations

import json
from collections.abc import Sequence

from allocsearch.recipe.export_base import (
    Export,
    ExportError,
    _budget_check,
    _layer_budget,
    _refuse_depth,
)
from allocsearch.recipe.recipe import Recipe


def jaxpruner_key(
    name: str, *, kernel_leaf: str = "kernel", int_indices: bool = False
) -> tuple[str | int, ...]:
    """Flattened Flax parameter path of a layer's kernel, e.g.
    ``("model", "layers", "3", "mlp", "down_proj", "kernel")``.

    Args:
      name: HF module path.
      kernel_leaf: the weight leaf's name in the Flax tree (``"kernel"`` for nn.Dense /
        nnx.Linear).
      int_indices: write numeric path parts as ints (Flax NNX state paths of list
        entries) instead of strings (dict keys, Linen).
    """
    parts: list[str | int] = list(name.split("."))
    if int_indices:
        parts = [int(p) if isinstance(p, str) and p.isdigit() else p for p in parts]
    return (*parts, kernel_leaf)


JAXPRUNER_FORMAT = "allocsearch.jaxpruner_map/1"
"""``format`` of the JSON file :func:`jaxpruner_json` writes."""

JAXPRUNER_CONVENTIONS = {
    "linen": ("kernel", False),
    "nnx": ("weight", True),
    "nnx-kernel": ("kernel", True),
    "linen-weight": ("weight", False),
}
"""Path conventions of the jaxpruner export: name -> (kernel leaf, int block indices).
``linen``: ``flax.traverse_util.flatten_dict`` of a Linen tree (``"3"``, ``kernel``);
``nnx``: NNX state paths of a model that keeps torch names (``3``, ``weight``), such as
allocsearch's own Flax models."""


def to_jaxpruner(
    recipe: Recipe,
    *,
    kernel_leaf: str = "kernel",
    int_indices: bool = False,
    model_matrices: Sequence[str] | None = None,
) -> Export[dict[tuple[str | int, ...], float]]:
    """jaxpruner ``custom_sparsity_map``: {flattened Flax parameter path: sparsity}.

    For a Flax model whose parameter tree mirrors the HF module path (see
    :func:`jaxpruner_key`). Values are the fraction of the kernel's weights removed
    (jaxpruner's ``sparsity``); a Flax kernel is (in, out), the transpose of the HF
    weight, which does not change the fraction.

    N:M recipes: jaxpruner's ``NByM(n, m)`` counts n as KEPT, is one sparsity type for
    the whole updater (the map holds only fractions) and groups along the kernel's last
    axis, the OUTPUT axis, whereas the recipe groups M consecutive weights along the
    INPUT axis. The exported value is the zero fraction n/m per kernel; the notes give
    the matching ``NByM`` setting and what differs.

    ``model_matrices``: the model's 2-D parameters (HF module paths of their modules,
    e.g. from the model's config); those the map does not cover (embeddings, the LM
    head) are named in the notes, since jaxpruner prunes every matrix outside
    ``custom_sparsity_map`` at its global ``sparsity``.
    """
    _refuse_depth(recipe, "jaxpruner")
    if not kernel_leaf:
        raise ExportError("kernel_leaf must be a non-empty string, e.g. 'kernel'")
    content = {
        jaxpruner_key(x.name, kernel_leaf=kernel_leaf, int_indices=int_indices): x.sparsity
        for x in recipe.layers
    }
    notes: list[str] = [
        f"keys assume a Flax tree mirroring the HF module path with leaf {kernel_leaf!r}, "
        f"e.g. {next(iter(content))}"
    ]
    if model_matrices is not None:
        covered = {x.name for x in recipe.layers}
        left = [m for m in model_matrices if m not in covered]
        if left:
            notes.append(
                f"not in the map, so jaxpruner prunes them at its global sparsity unless its "
                f"filter excludes them: {left}"
            )
    if recipe.structure == "nm":
        pats = sorted({(x.n, x.m) for x in recipe.layers})
        notes.append(
            "N:M cannot be expressed exactly through custom_sparsity_map: it carries only "
            "fractions (exported: n/m zeros per kernel), jaxpruner's sparsity_type is one "
            "NByM for the whole updater with N counting KEPT weights, and its default groups "
            "run along the kernel's last axis (outputs), not along the inputs as in this "
            f"recipe (patterns, N = zeros: {[f'{n}:{m}' for n, m in pats]})"
        )
        if len(pats) == 1:
            n, m = pats[0]
            notes.append(
                f"closest setting: sparsity_type=NByM(n={m - n}, m={m}) keeps {m - n} of every "
                f"{m} (same density, groups along outputs); on jaxpruner versions whose NByM "
                f"has an axis field, NByM(n={m - n}, m={m}, axis=0) groups along the kernel's "
                f"input axis and reproduces the recipe's pattern exactly"
            )
        else:
            notes.append(
                "the recipe mixes N:M patterns, which one jaxpruner updater cannot apply; "
                "run one updater per pattern or use unstructured sparsity with these fractions"
            )
    elif recipe.units:
        notes.append(
            "jaxpruner has no head / neuron pruning: the map holds each member layer's "
            "effective sparsity, and the row / column structure of the recipe is lost"
        )
    kind, ref, got, budget_notes = _budget_check(
        recipe, _layer_budget(recipe, recipe.sparsities()), "the custom_sparsity_map"
    )
    return Export(content, tuple(notes + budget_notes), kind, ref, got)


def jaxpruner_json(export: Export[dict[tuple[str | int, ...], float]], convention: str) -> str:
    """The text of a jaxpruner export file: JSON whose ``custom_sparsity_map`` is a list of
    ``{"path": [...], "sparsity": s}`` (paths keep int indices as JSON numbers), loaded
    without eval as ``{tuple(e["path"]): e["sparsity"] for e in
    json.load(f)["custom_sparsity_map"]}`` (docs/recipe.md)."""
    body = {
        "format": JAXPRUNER_FORMAT,
        "convention": convention,
        "custom_sparsity_map": [
            {"path": list(path), "sparsity": float(v)} for path, v in export.content.items()
        ],
        "notes": list(export.notes),
    }
    return json.dumps(body, indent=1) + "\n"
