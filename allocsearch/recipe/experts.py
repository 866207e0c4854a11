"""Expert recipes: which experts a recipe removes, and removing them from a checkpoint.

A recipe removes an expert of a mixture-of-experts model when every layer of the expert
(gate, up and down) has sparsity 1.0, the "removed" level of an expert-removal supernet
(:mod:`allocsearch.supernet.experts`). allocsearch's model masks the router logits of such
an expert (its weights are all zero), so the kept experts are renormalised without it.

What ``apply`` makes of it (``physical=True``, the default): transformers has one
``num_experts`` (Mixtral: ``num_local_experts``) for every block and cannot mask a router
logit, so

* when **every MoE block removes the same number** ``n`` of experts they are removed
  physically: their tensors leave the checkpoint, the kept experts of each block are
  renumbered 0..E-n-1 in their old order, the router loses the removed experts' rows and
  the config's expert count becomes ``E - n``. This is exactly the masked model: a softmax
  over the kept logits equals the masked softmax, and top-k picks among the same experts;
* otherwise apply **refuses** in one line naming the blocks and their counts.
  ``physical=False`` (``apply --no-physical``) then keeps the removed experts as zero
  weights at the dense shapes: allocsearch (which masks them) computes the searched
  model, but transformers still routes tokens to the zero experts, whose outputs are
  zero and whose routing weights are lost, so its outputs differ.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, Final

import numpy as np

from allocsearch.models.hf import HFModel, adapter_for_config, fingerprint_tensors
from allocsearch.recipe.recipe import Recipe, RecipeError

__all__ = ["EXPERT_COUNT_KEYS", "apply_experts", "removed_experts", "remove_experts"]

_EXPERT = re.compile(r"^(.*)\.experts\.(\d+)\.\w+$")
EXPERT_COUNT_KEYS: Final = ("num_local_experts", "num_experts")
"""config.json keys of the number of routed experts per block (Mixtral; the others)."""


def removed_experts(recipe: Recipe) -> dict[int, tuple[str, ...]]:
    """Block -> module paths of the experts ``recipe`` removes (every layer of the expert
    at sparsity 1.0), in expert order; blocks that remove none are absent."""
    layers: dict[str, list[float]] = {}
    block_of: dict[str, int] = {}
    for x in recipe.layers:
        m = _EXPERT.match(x.name)
        if m is not None:
            expert = f"{m.group(1)}.experts.{m.group(2)}"
            layers.setdefault(expert, []).append(x.sparsity)
            block_of[expert] = x.block
    out: dict[int, list[str]] = {}
    for expert, sparsities in layers.items():
        if all(s == 1.0 for s in sparsities):
            out.setdefault(block_of[expert], []).append(expert)
    return {
        b: tuple(sorted(v, key=lambda e: int(e.rsplit(".", 1)[1]))) for b, v in sorted(out.items())
    }


def remove_experts(
    model: HFModel, config_updates: Mapping[str, Any], report: Any, recipe: Recipe
) -> tuple[HFModel, dict[str, Any], Any]:
    """Physically remove the experts ``recipe`` removes (see the module docstring).

    Args:
      model: the pruned model returned by ``apply_recipe`` (removed experts are zeros).
      config_updates: config.json keys apply changed so far.
      report: apply's :class:`~allocsearch.recipe.apply.ApplyReport`.
      recipe: the recipe.

    Returns:
      ``(model, config_updates, report)``: experts renumbered, router rows removed, the
      expert count updated, the report's parameter counts and a note.

    Raises:
      RecipeError: MoE blocks remove different numbers of experts (naming the blocks
        and counts), or fewer than ``top_k`` experts would remain.
    """
    removed = removed_experts(recipe)
    if not removed:
        return model, dict(config_updates), report
    adapter = model.adapter
    n, kept_count = _removed_per_block(adapter, removed)
    params = _renumbered_params(model, removed)
    hf = {**adapter.hf_config, **config_updates}
    keys = [k for k in EXPERT_COUNT_KEYS if k in hf] or ["num_experts"]
    key = keys[0]
    updates = {**config_updates, **dict.fromkeys(keys, kept_count)}
    new_adapter = adapter_for_config({**adapter.hf_config, **updates})
    shapes = new_adapter.param_shapes
    wrong = sorted(set(shapes) ^ set(params))
    assert not wrong, f"parameters after removing experts do not fit: {wrong[:5]}"
    host = {k: np.asarray(v) for k, v in params.items()}
    raw = new_adapter.to_hf_tensors(host)
    raw.update(model.extras)
    fingerprint = fingerprint_tensors(new_adapter.hf_config, raw)
    del host, raw
    pruned = HFModel(new_adapter, params, dict(model.extras), fingerprint, None)

    # the recipe's count lacks the removed experts' weights, not their router rows
    router_rows = n * adapter.num_blocks * adapter.cfg.hidden_size
    gone_layers = {x.name for b in removed for e in removed[b] for x in recipe.layers
                   if x.name.startswith(e + ".")}  # fmt: skip
    layers = tuple(
        dataclasses.replace(x, shape=(0, 0)) if x.name in gone_layers else x for x in report.layers
    )
    listed = {b: [e.rsplit(".", 1)[1] for e in v] for b, v in removed.items()}
    note = (
        f"experts removed (router rows, weights; {key}={kept_count}, kept experts renumbered "
        f"in order): {listed}"
    )
    new_report = dataclasses.replace(
        report,
        layers=layers,
        num_params_recipe=report.num_params_recipe - router_rows,
        num_params=new_adapter.num_params(),
        physical=True,
        config_updates=dict(updates),
        notes=(*report.notes, note),
    )
    return pruned, updates, new_report


def _removed_per_block(adapter: Any, removed: Mapping[int, Any]) -> tuple[int, int]:
    """(experts removed per block, experts kept); refuses uneven removal across blocks
    and fewer than ``top_k`` experts kept."""
    moe = adapter.moe
    per_block = {b: len(removed.get(b, ())) for b in range(adapter.num_blocks)}
    if len(set(per_block.values())) != 1:
        counts = ", ".join(f"block {b}: {n}" for b, n in per_block.items())
        raise RecipeError(
            f"the recipe removes different numbers of experts per block ({counts}) but "
            f"transformers has one {moe.num_experts}-expert count for all blocks; apply with "
            f"--no-physical (physical=False) to keep them as zero experts, which allocsearch "
            f"masks and transformers still routes to"
        )
    n = per_block[0]
    kept_count = moe.num_experts - n
    if kept_count < moe.top_k:
        raise RecipeError(
            f"the recipe removes {n} of {moe.num_experts} experts per block, leaving fewer than "
            f"top_k={moe.top_k}"
        )
    return n, kept_count


def _renumbered_params(model: HFModel, removed: Mapping[int, Any]) -> dict[str, Any]:
    """``model``'s parameters without the removed experts: kept experts renumbered in
    order, router rows of the removed ones dropped."""
    adapter = model.adapter
    moe = adapter.moe
    index: dict[str, str | None] = {}  # old expert prefix -> new prefix (None: removed)
    rows: dict[int, np.ndarray] = {}
    for b in range(adapter.num_blocks):
        gone = {int(e.rsplit(".", 1)[1]) for e in removed[b]}
        kept = [e for e in range(moe.num_experts) if e not in gone]
        rows[b] = np.array(kept, np.int64)
        for e in range(moe.num_experts):
            new = kept.index(e) if e in kept else None
            index[adapter.expert_prefix(b, e)] = (
                None if new is None else adapter.expert_prefix(b, new)
            )
    router = {f"{adapter.block_prefix(b)}{moe.module}.gate.weight": b for b in rows}

    def rename(name: str) -> str | None:
        m = _EXPERT.match(name.removesuffix(".weight"))
        if m is None:
            return name
        prefix = f"{m.group(1)}.experts.{m.group(2)}."
        new = index.get(prefix, prefix)
        return None if new is None else new + name[len(prefix) :]

    params: dict[str, Any] = {}
    for name, value in model.params.items():
        new = rename(name)
        if new is None:
            continue
        if name in router:
            value = np.asarray(value)[rows[router[name]]]
        params[new] = value
    return params


def apply_experts(
    model: HFModel,
    config_updates: Mapping[str, Any],
    report: Any,
    recipe: Recipe,
    *,
    physical: bool,
) -> tuple[HFModel, dict[str, Any], Any]:
    """What ``apply_recipe`` does for a recipe that removes experts: remove them
    (:func:`remove_experts`) when ``physical``, else note that they stay as zeros. A recipe
    that removes none is returned unchanged."""
    removed = removed_experts(recipe)
    if not removed:
        return model, dict(config_updates), report
    moe = model.adapter.moe
    few = {b: moe.num_experts - len(v) for b, v in removed.items()}
    few = {b: k for b, k in few.items() if k < moe.top_k}
    if few:
        b, k = next(iter(few.items()))
        raise RecipeError(
            f"the recipe leaves block {b} with {k} of {moe.num_experts} experts, fewer than "
            f"top_k={moe.top_k} (every token is routed to top_k experts); blocks short of "
            f"experts: {sorted(few)}"
        )
    if physical:
        return remove_experts(model, config_updates, report, recipe)
    note = (
        f"removed experts {[e for v in removed.values() for e in v]} stay as zero weights: "
        f"allocsearch masks their router logits, transformers still routes tokens to them"
    )
    return model, dict(config_updates), dataclasses.replace(report, notes=(*report.notes, note))
