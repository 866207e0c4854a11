"""Depth recipes: which sublayers a recipe drops, and removing dropped blocks from a model.

A recipe drops a sublayer when its structured unit removes every group
(``removed == total``; see :mod:`allocsearch.supernet.depth`). What ``apply`` makes of it:

* **A whole block** (its attention *and* MLP units both dropped) is removed: its weights
  leave the checkpoint, the later blocks are renumbered, ``num_hidden_layers`` shrinks and
  per-layer config lists (``layer_types``, ``no_rope_layers``) lose its entry; families
  whose attention pattern is derived from the layer index (Qwen2/3 windows, Gemma 2/3
  sliding patterns) get an explicit ``layer_types`` so the kept blocks keep theirs.
* **A single sublayer** stays in the checkpoint with zero weights (sliced to the common
  width like any structured unit): Hugging Face decoder layers always run both sublayers
  and no config key can switch one off, so its output is exactly zero (the residual
  passes) but its compute is still spent by transformers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np

from allocsearch.models.hf import HFModel, adapter_for_config, fingerprint_tensors
from allocsearch.recipe.recipe import Recipe, StructuredUnit

__all__ = ["apply_depth", "dropped_blocks", "dropped_units", "remove_blocks"]

PER_LAYER_KEYS: Final = ("layer_types", "no_rope_layers")
"""config.json lists with one entry per decoder block."""
_DERIVED_LAYER_TYPES: Final = frozenset({"qwen2", "qwen3", "gemma2", "gemma3_text"})
_LAYER_COUNT_KEYS: Final = ("num_hidden_layers", "n_layer")


def dropped_units(recipe: Recipe) -> tuple[StructuredUnit, ...]:
    """The units of ``recipe`` that remove every head / neuron (dropped sublayers)."""
    return tuple(u for u in recipe.units if u.removed == u.total)


def dropped_blocks(recipe: Recipe) -> tuple[int, ...]:
    """Blocks whose attention and MLP units are both dropped, ascending."""
    kinds: dict[int, set[str]] = {}
    for u in dropped_units(recipe):
        kinds.setdefault(u.block, set()).add(u.kind)
    return tuple(sorted(b for b, k in kinds.items() if k == {"heads", "neurons"}))


def _block_of(name: str, prefixes: Sequence[str]) -> int | None:
    for b, prefix in enumerate(prefixes):
        if name.startswith(prefix):
            return b
    return None


def remove_blocks(
    model: HFModel,
    config_updates: Mapping[str, Any],
    report: Any,
    blocks: Sequence[int],
) -> tuple[HFModel, dict[str, Any], Any]:
    """Remove whole ``blocks`` from a model returned by ``apply_recipe``.

    Args:
      model: the pruned model (its adapter already holds ``config_updates``).
      config_updates: config.json keys apply changed so far.
      report: apply's :class:`~allocsearch.recipe.apply.ApplyReport`.
      blocks: block indices to remove (each dropped by the recipe).

    Returns:
      ``(model, config_updates, report)``: parameters renamed so the kept blocks are
      numbered 0..B'-1, the config updates plus the layer count and per-layer lists, and
      the report with the new parameter count, the norms of the removed blocks taken off
      the recipe's count, shape ``(0, 0)`` for the layers of removed blocks and a note.

    Raises:
      ValueError: every block would be removed, or a block index is out of range.
    """
    adapter = model.adapter
    nb = adapter.num_blocks
    drop = sorted({int(b) for b in blocks})
    if not drop:
        return model, dict(config_updates), report
    if drop[0] < 0 or drop[-1] >= nb:
        raise ValueError(f"blocks {drop} are not all in 0..{nb - 1}")
    if len(drop) == nb:
        raise ValueError(f"the recipe drops all {nb} blocks; a model needs at least one")
    kept = [b for b in range(nb) if b not in drop]
    prefixes = [adapter.block_prefix(b) for b in range(nb)]
    new_index = {old: new for new, old in enumerate(kept)}

    def rename(name: str) -> str | None:
        b = _block_of(name, prefixes)
        if b is None:
            return name
        if b not in new_index:
            return None
        return adapter.block_prefix(new_index[b]) + name[len(prefixes[b]) :]

    params = {n2: v for n, v in model.params.items() if (n2 := rename(n)) is not None}
    extras = {n2: v for n, v in model.extras.items() if (n2 := rename(n)) is not None}

    hf = {**adapter.hf_config, **config_updates}
    updates = dict(config_updates)
    count_key = next((k for k in _LAYER_COUNT_KEYS if k in hf), "num_hidden_layers")
    updates[count_key] = len(kept)
    for key in PER_LAYER_KEYS:
        value = hf.get(key)
        if isinstance(value, list) and len(value) == nb:
            updates[key] = [value[b] for b in kept]
    cfg = getattr(adapter, "cfg", None)
    if (
        "layer_types" not in updates
        and adapter.model_type in _DERIVED_LAYER_TYPES
        and cfg is not None
    ):
        names = [cfg.attention_types[i] for i in cfg.layer_type_ids]
        updates["layer_types"] = [names[b] for b in kept]

    new_adapter = adapter_for_config({**adapter.hf_config, **updates})
    shapes = new_adapter.param_shapes
    wrong = sorted(set(shapes) ^ set(params))
    assert not wrong, f"parameters after removing blocks {drop} do not fit: {wrong[:5]}"
    host = {k: np.asarray(v) for k, v in params.items()}
    raw = new_adapter.to_hf_tensors(host)
    raw.update(extras)
    fingerprint = fingerprint_tensors(new_adapter.hf_config, raw)
    del host, raw
    pruned = HFModel(new_adapter, params, extras, fingerprint, None)

    # The recipe's count already lacks the dropped blocks' linear weights and dead-row
    # biases; their norms (any other block parameter) go too.
    linear = {x.name for x in report.layers}
    others = sum(
        math.prod(v.shape)
        for n, v in model.params.items()
        if _block_of(n, prefixes) in drop and n.rsplit(".", 1)[0] not in linear
    )
    layers = tuple(
        dataclasses.replace(x, shape=(0, 0)) if x.block in drop else x for x in report.layers
    )
    note = (
        f"blocks {drop} dropped (attention and MLP): removed from the weights and the config "
        f"({count_key}={len(kept)}); later blocks renumbered"
    )
    new_report = dataclasses.replace(
        report,
        layers=layers,
        num_params_recipe=report.num_params_recipe - others,
        num_params=new_adapter.num_params(),
        config_updates=dict(updates),
        notes=(*report.notes, note),
    )
    return pruned, updates, new_report


def apply_depth(
    model: HFModel, config_updates: Mapping[str, Any], report: Any, recipe: Recipe
) -> tuple[HFModel, dict[str, Any], Any]:
    """What ``apply_recipe`` does for a depth recipe after slicing: remove its dropped
    blocks (:func:`remove_blocks`) and note the dropped sublayers that stay as zeros.
    A recipe that drops nothing is returned unchanged."""
    blocks = dropped_blocks(recipe)
    model, updates, report = remove_blocks(model, config_updates, report, blocks)
    lone = [u.name for u in dropped_units(recipe) if u.block not in blocks]
    if lone:
        note = (
            f"dropped sublayers {lone} stay as zero weights (their output is zero, the residual "
            f"passes): Hugging Face decoder layers cannot skip one sublayer, so transformers "
            f"still computes them"
        )
        report = dataclasses.replace(report, notes=(*report.notes, note))
    return model, updates, report
