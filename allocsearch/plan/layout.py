"""The model and one block's supernet as the formulas see them (config.json, a manifest)."""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from allocsearch.config import RunConfig

# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class _Model:
    """What the formulas need of a model, from its config.json.

    Blocks are assumed identical (true of every supported family), so the adapter is
    built for one block: building it for all blocks traces every layer's initialiser and
    takes tens of seconds for a 70B config.
    """

    blocks: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    causal: bool
    outer_params: int  # weights outside the blocks (embeddings, head, final norm)
    block_params: dict[str, int]  # relative name -> weights, one block
    # mixture of experts (0: a dense MLP): routed experts, top-k, shared expert width, and
    # the adapter's dispatch setting (``ffn`` is then one expert's width)
    experts: int = 0
    top_k: int = 0
    shared_ffn: int = 0
    dispatch: str = "auto"

    @property
    def total_params(self) -> int:
        return self.outer_params + self.blocks * sum(self.block_params.values())


@dataclass(frozen=True)
class _Param:
    """One stored parameter of a block's supernet: ``kind`` ``"dense"`` (K weight copies)
    or ``"nested"`` (an int32 rank), ``sparsity`` of its K levels, ``groups``
    (structured primaries: ``group_keep`` bool[K, G]), ``per_row`` (int32[K, out] counts)."""

    name: str  # relative to the block
    shape: tuple[int, int]
    kind: str
    sparsity: tuple[float, ...]
    per_row: bool = False
    groups: int = 0

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def levels(self) -> int:
        return len(self.sparsity)


@dataclass(frozen=True)
class _Layout:
    """One block's supernet (every block has the same): its stored parameters and, per
    unit, the indices of its parameters and its number of levels."""

    params: tuple[_Param, ...]
    unit_params: tuple[tuple[int, ...], ...]
    unit_levels: tuple[int, ...]

    def unit_bytes(self, u: int, itemsize: int) -> int:
        """One level of unit ``u`` as weights of ``itemsize`` bytes."""
        return itemsize * sum(self.params[i].numel for i in self.unit_params[u])

    def moved_bytes(self, n: int, s: int, a: int) -> int:
        """The levels one block moves for ``n`` candidates, at most ``min(n, K_u)`` per
        unit: dense variants in the storage dtype (``s``), nested ones in the model's."""
        return self.group_bytes(range(len(self.params)), n, s, a)

    def group_bytes(self, idx: Iterable[int], n: int, s: int, a: int) -> int:
        """:meth:`moved_bytes` of the parameters ``idx`` only (a unit group's): at most
        ``min(n, K)`` levels of each."""
        return sum(
            min(n, p.levels) * (s if p.kind == "dense" else a) * p.numel
            for p in (self.params[i] for i in idx)
        )


_LAYER_KEYS: Final[tuple[str, ...]] = ("num_hidden_layers", "n_layer")


def _one_block(hf_config: Mapping[str, Any]) -> tuple[Any, int]:
    """(the family adapter of a one-block copy of the config, the real block count)."""
    key = next((k for k in _LAYER_KEYS if k in hf_config), None)
    if key is None:
        adapter = _adapter(json.dumps(dict(hf_config), sort_keys=True))
        return adapter, adapter.num_blocks
    blocks = int(hf_config[key])
    if blocks < 1:
        raise ValueError(f"config.json has {key} = {blocks}; a model needs >= 1 block")
    return _adapter(json.dumps({**hf_config, key: 1}, sort_keys=True)), blocks


@functools.lru_cache(maxsize=8)
def _adapter(config_json: str) -> Any:
    """Adapters by config (building one traces its initialisers: the plan's slowest step,
    and a refusal re-plans several times)."""
    from allocsearch.models.hf import adapter_for_config

    return adapter_for_config(json.loads(config_json))


def _model(adapter: Any, blocks: int) -> _Model:
    from allocsearch.supernet.build import structured_layouts

    try:
        heads, mlp = structured_layouts(adapter)
        dims = (heads.hidden_size, mlp.intermediate_size, heads.num_heads)
        dims += (heads.num_kv_heads, heads.head_dim)
    except ValueError:  # a family without a structured layout: its config.json's names
        c = adapter.hf_config
        hidden, n_heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        dims = (hidden, int(c["intermediate_size"]), n_heads)
        dims += (int(c.get("num_key_value_heads") or n_heads),)
        dims += (int(c.get("head_dim") or hidden // n_heads),)
    moe = getattr(adapter, "moe", None)  # MoEAdapter: experts, router, shared expert
    if moe is not None:
        dims = (dims[0], moe.expert_size, *dims[2:])
    prefix = adapter.block_prefix(0)
    shapes = adapter.param_shapes
    block = {n[len(prefix) :]: math.prod(s) for n, s in shapes.items() if n.startswith(prefix)}
    outer = sum(math.prod(s) for n, s in shapes.items() if not n.startswith(prefix))
    return _Model(
        experts=moe.num_experts if moe else 0,
        top_k=moe.top_k if moe else 0,
        shared_ffn=moe.shared_expert_size if moe else 0,
        dispatch=getattr(adapter, "dispatch", "auto"),
        blocks=blocks,
        hidden=dims[0],
        ffn=dims[1],
        heads=dims[2],
        kv_heads=dims[3],
        head_dim=dims[4],
        vocab=int(adapter.hf_config.get("vocab_size") or 0),
        causal=bool(adapter.is_causal_lm),
        outer_params=outer,
        block_params=block,
    )


def _layout(adapter: Any, cfg: RunConfig) -> _Layout:
    """The units, levels and stored parameters of one block of the supernet
    ``cfg.supernet`` describes (the grid ``factory.make_grid`` builds, on the one-block
    adapter: every grid kind gives a unit levels from its own size and the mean unit
    size, which repeating identical blocks does not change)."""
    from allocsearch.models.hf import HFModel
    from allocsearch.pruners import WandaPruner
    from allocsearch.supernet import factory
    from allocsearch.supernet.build import _plans

    sc = cfg.supernet
    grid = factory.make_grid(sc, HFModel(adapter, {}), target=sc.center)
    plans = _plans(
        adapter,
        sc.structure,
        query_heads=factory.query_heads(sc),
        tie_experts=sc.tie_experts,
        expert_removal=sc.expert_removal,
        prune_router=sc.prune_router,
    )
    pruner = factory.make_pruner(sc)
    structured = sc.structure == "heads_neurons"
    nested = False if structured else bool(pruner.nested)
    per_row = nested and (isinstance(pruner, WandaPruner) or "Wanda" in type(pruner).__name__)
    prefix = adapter.block_prefix(0)
    params: list[_Param] = []
    unit_params, unit_levels = [], []
    sparsity, valid = np.asarray(grid.sparsity), np.asarray(grid.valid)
    for u, plan in enumerate(plans):
        levels = tuple(float(x) for x in sparsity[u][valid[u]])
        idx = []
        for layer in plan.layers:
            primary = layer is plan.primary
            if structured:
                kind, groups, row = (
                    ("dense", plan.layout.num_groups, False)
                    if primary
                    else (
                        "nested",
                        0,
                        False,
                    )
                )
            else:
                kind, groups, row = ("nested" if nested else "dense"), 0, per_row
            idx.append(len(params))
            rel = layer.weight_name[len(prefix) :]
            params.append(_Param(rel, tuple(layer.shape), kind, levels, row, groups))
        unit_params.append(tuple(idx))
        unit_levels.append(len(levels))
    return _Layout(tuple(params), tuple(unit_params), tuple(unit_levels))


def _layout_from_store(path: str | os.PathLike, adapter: Any) -> tuple[_Layout, str, int]:
    """(one block's layout, the dense variants' storage dtype, the variant files' bytes) of
    an existing store, from its ``manifest.json`` alone (block 0's units stand for every
    block's)."""
    from allocsearch.supernet.store import MANIFEST_NAME, StoreError

    file = Path(path) / MANIFEST_NAME
    try:
        manifest = json.loads(file.read_text())
        spec, variants = manifest["spec"], manifest["variants"]
        unit_params = manifest["unit_params"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise StoreError(f"{path}: no readable supernet manifest ({e})") from None
    prefix = adapter.block_prefix(0)
    shapes = adapter.param_shapes
    params: list[_Param] = []
    units, levels = [], []
    dtype = str(manifest.get("storage_dtype") or "float32")
    for u, unit in enumerate(spec["units"]):
        if int(unit["block"]) != 0:
            continue
        row = zip(spec["sparsity"][u], spec["valid"][u], strict=True)
        sparsity = tuple(float(x) for x, ok in row if ok)
        idx = []
        for name in unit_params[u]:
            entry = variants[name]
            shape = tuple(entry.get("shape") or shapes[name])
            if entry["kind"] == "dense":
                dtype = str(entry.get("dtype") or dtype)
            idx.append(len(params))
            per_row = bool(entry.get("per_row", False))
            params.append(_Param(name[len(prefix) :], shape, entry["kind"], sparsity, per_row))
        units.append(tuple(idx))
        levels.append(len(sparsity))
    if not units:
        raise StoreError(f"{path}: the manifest has no units in block 0 of this model")
    total = sum(int(e["bytes"]) for e in variants.values())
    return _Layout(tuple(params), tuple(units), tuple(levels)), dtype, total


def refuse_foreign_store(
    path: str | os.PathLike, model: str | os.PathLike, hf_config: Mapping[str, Any]
) -> None:
    """Raise :class:`~allocsearch.supernet.store.StoreError` when the store at ``path`` was
    built from another model than ``model`` (a directory, ``"demo"``, or a config.json
    path; ``hf_config`` its config), naming both: other weights (fingerprints differ) when
    the directory holds weights, else (config.json alone) another model type, block count
    or block 0 parameter shape than the store's manifest records."""
    from allocsearch.assets_paths import resolve_model_path
    from allocsearch.models.hf import directory_fingerprint
    from allocsearch.supernet.store import MANIFEST_NAME, StoreError

    try:
        manifest = json.loads((Path(path) / MANIFEST_NAME).read_text())
        built, source = manifest["model_fingerprint"], manifest["model"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise StoreError(f"{path}: no readable supernet manifest ({e})") from None
    origin = f"the model {source.get('path')!r}" if source.get("path") else "another model"
    head = f"the supernet {str(path)!r} was built from {origin} (fingerprint {built!r})"
    where = resolve_model_path(str(model))
    fingerprint = None if where.is_file() else directory_fingerprint(where, hf_config)
    if fingerprint is not None:
        if fingerprint != built:
            raise StoreError(
                f"{head}, not from the model {str(model)!r} (fingerprint {fingerprint!r}: "
                f"other weights); plan with --model {source.get('path')} or the store built "
                f"for this model"
            )
        return
    adapter, blocks = _one_block(hf_config)
    ours = (hf_config.get("model_type"), blocks)
    theirs = (source.get("model_type"), source.get("num_blocks"))
    shapes = adapter.param_shapes
    odd = [
        name
        for name, entry in manifest.get("variants", {}).items()
        if name.startswith(adapter.block_prefix(0))
        and ("shape" in entry and tuple(shapes.get(name, ())) != tuple(entry["shape"]))
    ]
    if ours != theirs or odd:
        what = f"parameter {odd[0]!r} has another shape" if odd else "another architecture"
        raise StoreError(
            f"{head}, not from the model {str(model)!r} ({ours[0]}, {ours[1]} blocks; "
            f"config.json alone, no weights to fingerprint; the store's model: {theirs[0]}, "
            f"{theirs[1]} blocks; {what}); plan with --model {source.get('path')} or the "
            f"store built for this model"
        )


def _store_bytes(m: _Model, layout: _Layout, s: int, store_layout: str) -> int:
    """Bytes of the variant files' tensors (headers, input norms and manifest excluded),
    with the packed layout's sizes from :mod:`allocsearch.supernet.packed`."""
    from allocsearch.supernet import packed

    total = 0
    for p in layout.params:
        k = p.levels
        total += 8 * k  # sparsity float64[K]
        if p.kind == "nested":
            total += 4 * p.numel + 4 * k * (p.shape[0] if p.per_row else 1)
            continue
        shape = (k, *p.shape)
        dense = packed.dense_nbytes(shape, s)
        nnz = sum(round((1.0 - x) * p.numel) for x in p.sparsity)
        pk = packed.packed_nbytes(shape, nnz, s)
        if store_layout == "packed" or (store_layout == "auto" and pk < dense):
            total += pk
        else:
            total += dense
        total += k * p.groups
    return m.blocks * total
