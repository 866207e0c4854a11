"""Physically smaller matrices for structured recipes: one width per sublayer kind (apply)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import jax
import jax.numpy as jnp
import numpy as np

from allocsearch.models.bert import BertAdapter
from allocsearch.models.gpt2 import GPT2Adapter
from allocsearch.models.layers import LayerInfo
from allocsearch.models.llama import RotaryDecoderAdapter
from allocsearch.pruners.structured import HeadGroups, NeuronGroups
from allocsearch.supernet.build import structured_layouts
from allocsearch.supernet.store import SupernetStore

# Output projection of each structured sublayer kind (unit roles of supernet.build).
_OUTPUT_ROLES: Final = {"attn": frozenset({"o"}), "mlp": frozenset({"down", "fc_out"})}


def _layout_of(adapter, role: str, store: SupernetStore | None = None) -> HeadGroups | NeuronGroups:
    """The geometry of ``role`` (``attn`` / ``mlp``) units: as recorded in ``store``'s
    manifest (kv groups or query heads), else the model's default (kv groups)."""
    recorded = _store_layouts(store) if store is not None else {}
    if role in recorded:
        return recorded[role]
    heads, neurons = structured_layouts(adapter)
    return heads if role == "attn" else neurons


def _store_layouts(store: SupernetStore) -> dict[str, HeadGroups | NeuronGroups]:
    """Sublayer geometry (``{"attn": HeadGroups, "mlp": NeuronGroups}``) recorded by the
    builder in a structured store's manifest; empty when it is not recorded."""
    recorded = store.manifest["pruner"].get("layouts") or {}
    kinds = {"attn": HeadGroups, "mlp": NeuronGroups}
    return {role: kinds[role](**fields) for role, fields in recorded.items() if role in kinds}


def _mlp_width_key(adapter) -> str | None:
    """The config.json key of the MLP width, for families whose config can express it."""
    if isinstance(adapter, RotaryDecoderAdapter | BertAdapter):  # Llama family, Phi-3
        return "intermediate_size"
    if isinstance(adapter, GPT2Adapter):
        return "n_inner"
    return None


def _slice_structured(
    adapter, store: SupernetStore, params: dict[str, jax.Array], keeps: Mapping[int, np.ndarray]
) -> tuple[dict[str, jax.Array], dict[str, Any], list[str]]:
    """Physically smaller matrices at one width per sublayer kind (see the docstring of
    :mod:`allocsearch.recipe.apply`).

    Returns the new parameters, the config.json updates and notes.
    """
    updates: dict[str, Any] = {}
    notes: list[str] = []
    out = dict(params)
    nb = adapter.num_blocks
    by_block: dict[int, list[LayerInfo]] = {}
    for layer in adapter.layers():
        by_block.setdefault(layer.block, []).append(layer)
    for kind in ("attn", "mlp"):
        units = {
            store.spec.units[u].block: keep
            for u, keep in keeps.items()
            if store.spec.units[u].role == kind
        }
        if not units:
            continue
        layout = _layout_of(adapter, kind, store)
        g = layout.num_groups
        block_keep = [units.get(b, np.ones(g, bool)) for b in range(nb)]
        if isinstance(layout, HeadGroups) and layout.query_heads:
            selections, n_kv, n_rep = _query_head_selection(layout, block_keep)
            width = n_kv * n_rep  # query heads per block
        else:
            width = max(1, max(int(k.sum()) for k in block_keep))
            selections = [_pad_groups(k, width) for k in block_keep]
            n_kv = width
            n_rep = layout.heads_per_group if isinstance(layout, HeadGroups) else 1
        if width == g:
            continue
        if kind == "attn":
            if not isinstance(adapter, RotaryDecoderAdapter):
                notes.append(
                    f"{adapter.model_type} configs derive the head width from the model width, "
                    f"so removed heads stay as zero rows / columns (shapes unchanged)"
                )
                continue
            updates.update(
                num_attention_heads=n_kv * n_rep,
                num_key_value_heads=n_kv,
                head_dim=layout.head_dim,
            )
        else:
            key = _mlp_width_key(adapter)
            if key is None:
                notes.append(
                    f"no config key for the MLP width of {adapter.model_type}; removed "
                    f"neurons stay as zero rows / columns"
                )
                continue
            updates[key] = width
        outputs = _OUTPUT_ROLES[kind]
        padded = 0
        for b in range(nb):
            keep, sel = block_keep[b], selections[b]
            padded += int(sel.sum() - keep.sum())
            dead = layout.dead_rows(sel)
            cols = layout.column_keep(sel)
            for layer in by_block[b]:
                w, bias = layer.weight_name, f"{layer.name}.bias"
                if layer.role in dead:
                    rows = jnp.asarray(np.flatnonzero(~dead[layer.role]))
                    out[w] = out[w][rows]
                    if bias in out:
                        out[bias] = out[bias][rows]
                elif layer.role in outputs:
                    out[w] = out[w][:, jnp.asarray(np.flatnonzero(cols))]
            if kind == "attn":
                _slice_projection_norms(adapter, out, b, dead)
        if padded:
            what = "neurons"
            if kind == "attn":
                what = "query heads" if layout.query_heads else "kv groups"
            shape = f"{width} of {g} {what}"
            if kind == "attn" and layout.query_heads:
                shape = f"{n_kv} kv heads with {n_rep} query heads each"
            notes.append(
                f"{kind}: every block keeps {shape} (the most any block keeps); "
                f"{padded} removed {what} over the blocks stay as zero padding"
            )
    return out, updates, notes


def _pad_groups(keep: np.ndarray, width: int) -> np.ndarray:
    """bool[G]: the kept groups plus the first removed ones, ``width`` in all (the removed
    ones stay as zero padding)."""
    sel = keep.copy()
    sel[np.flatnonzero(~keep)[: width - int(keep.sum())]] = True
    return sel


def _query_head_selection(
    layout: HeadGroups, block_keep: Sequence[np.ndarray]
) -> tuple[list[np.ndarray], int, int]:
    """Query heads each block keeps when sliced to one regular GQA layout.

    A query-head supernet leaves kv heads with different numbers of query heads (and
    blocks with different numbers of kv heads), but a config has one
    ``num_key_value_heads`` and one ratio. Every block keeps ``n_kv`` kv heads (the most
    any block keeps alive) with ``n_rep`` query heads each (the most any live kv head
    keeps): its live kv heads padded with dead ones, and in each its kept query heads
    padded with removed ones. A padded query head has zero q rows and zero ``o_proj``
    columns, so it adds nothing (its attention averages live values, which meet zero
    columns); a padded kv head only serves padded query heads.

    Args:
      layout: a query-head layout (``layout.query_heads``).
      block_keep: per block, the kept query heads bool[num_heads].

    Returns:
      ``(selections, n_kv, n_rep)``: per block bool[num_heads], the heads kept after
      slicing (exactly ``n_rep`` in each of ``n_kv`` kv groups, in Hugging Face's
      ``repeat_kv`` order), and the two counts.
    """
    kv, per = layout.num_kv_heads, layout.heads_per_group
    grouped = [k.reshape(kv, per) for k in block_keep]
    n_kv = max(1, max(int(k.any(axis=1).sum()) for k in grouped))
    n_rep = max(1, max(int(k.sum(axis=1).max()) for k in grouped))
    selections = []
    for k in grouped:
        groups = _pad_groups(k.any(axis=1), n_kv)
        sel = np.zeros_like(k)
        for j in np.flatnonzero(groups):
            sel[j] = _pad_groups(k[j], n_rep)
        selections.append(sel.reshape(-1))
    return selections, n_kv, n_rep


def _slice_projection_norms(
    adapter, params: dict[str, jax.Array], block: int, dead: Mapping[str, np.ndarray]
) -> None:
    """Slice OLMo 2's q/k RMSNorms (over the whole projection) to the kept rows, exactly.

    ``RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w`` averages over all ``n`` features of the
    projection. The removed features of the pruned model are exact zeros (zero rows, zero
    biases), so they add nothing to the sum but count in ``n``; dropping them would change
    the mean to ``sum / n'``. Scaling the kept rows of the projection (and its bias) by
    ``c = sqrt(n' / n)`` restores ``mean = sum / n`` exactly (eps included), and the norm's
    scale divided by ``c`` undoes the factor ``c`` on its output, so the sliced model
    computes the same function (up to float rounding) with ``n'`` features. ``params``
    must already hold the sliced projections; the norms are updated in place.
    """
    cfg = getattr(adapter, "cfg", None)
    if getattr(cfg, "qk_norm", None) != "proj":
        return
    prefix = adapter.block_prefix(block)
    for proj, norm in (("q_proj", "q_norm"), ("k_proj", "k_norm")):
        rows = dead[proj[0]]
        c = math.sqrt(int((~rows).sum()) / rows.size)
        w, bias, scale = (
            f"{prefix}self_attn.{proj}.weight",
            f"{prefix}self_attn.{proj}.bias",
            f"{prefix}self_attn.{norm}.weight",
        )
        params[w] = params[w] * jnp.asarray(c, params[w].dtype)
        if bias in params:
            params[bias] = params[bias] * jnp.asarray(c, params[bias].dtype)
        g = params[scale][jnp.asarray(np.flatnonzero(~rows))]
        offset = cfg.norm_offset
        params[scale] = ((offset + g.astype(jnp.float32)) / c - offset).astype(g.dtype)


# --------------------------------------------------------------------------- public API
