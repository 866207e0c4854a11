"""Unit layouts: which layers form each unit of a supernet and how a unit is pruned.

One unit per prunable layer (``"unstructured"``, ``"nm"``), per attention or MLP sublayer
(structured, with its :class:`~allocsearch.pruners.structured.HeadGroups` /
:class:`~allocsearch.pruners.structured.NeuronGroups` geometry), per (block, projection)
over all routed experts (``tie_experts``) or per routed expert (``expert_removal``). The
build stages (:mod:`allocsearch.supernet.build`) take these plans as data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

from allocsearch.models.base import ModelAdapter
from allocsearch.models.bert import BertAdapter
from allocsearch.models.gpt2 import GPT2Adapter
from allocsearch.models.layers import LayerInfo
from allocsearch.models.llama import RotaryDecoderAdapter
from allocsearch.models.moe import MOE_MODEL_TYPES as MOE_TYPES
from allocsearch.models.moe import MoEAdapter
from allocsearch.models.phi3 import Phi3Adapter
from allocsearch.pruners.structured import HeadGroups, NeuronGroups
from allocsearch.supernet.experts import EXPERT_ROLE, check_expert_options, model_layers
from allocsearch.supernet.spec import Unit

if TYPE_CHECKING:
    from allocsearch.supernet.store import SupernetStore

__all__ = [
    "BUILD_STRUCTURES",
    "STRUCTURED",
    "UnitPlan",
    "structured_layouts",
    "supernet_units",
    "unit_group_counts",
    "unit_min_steps",
    "unit_plans",
    "unit_removed_groups",
]

BUILD_STRUCTURES: Final[tuple[str, ...]] = (
    "unstructured",
    "nm",
    "heads",
    "neurons",
    "heads_neurons",
)
"""Unit structures ``build_supernet`` can build (the same names as ``SupernetSpec``)."""
STRUCTURED: Final = frozenset({"heads", "neurons", "heads_neurons"})
"""The structured kinds: units are sublayers pruned by groups (heads, neurons)."""

_ATTN_ROLES: Final = frozenset({"q", "k", "v", "qkv", "o"})
_MLP_ROLES: Final = frozenset({"gate", "up", "down", "fc_in", "fc_out"})
_OUTPUT_ROLES: Final = frozenset({"o", "down", "fc_out"})


@dataclass(frozen=True)
class UnitPlan:
    """How one unit is pruned.

    ``primary`` is the layer the pruner runs on (the layer itself, or the output
    projection of a structured sublayer); ``dead`` are the input projections whose rows a
    structured level removes; ``layout`` is the sublayer's group geometry.
    """

    unit: Unit
    primary: LayerInfo
    layers: tuple[LayerInfo, ...]
    layout: HeadGroups | NeuronGroups | None = None
    tied: bool = False  # experts tied to one level: each layer pruned on its own
    removable: bool = False  # a whole expert: its last level (removed) is all zeros

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(layer.weight_name for layer in self.layers)


def structured_layouts(
    adapter: ModelAdapter, *, query_heads: bool = False
) -> tuple[HeadGroups, NeuronGroups]:
    """Group geometry of the attention and MLP sublayers of a model (same in every block).

    Args:
      adapter: the model family adapter.
      query_heads: attention groups are single query heads instead of kv groups (see
        :mod:`allocsearch.pruners.structured`; the same for multi-head attention).

    Returns:
      ``(HeadGroups, NeuronGroups)`` with the model's widths, head counts and biases and
      the default minimum steps (1 kv group or query head, 32 neurons).

    Raises:
      ValueError: a model family without a structured layout (naming the valid ones).
    """
    if isinstance(adapter, RotaryDecoderAdapter) and not isinstance(adapter, MoEAdapter):
        c = adapter.cfg  # the Llama family and Phi-3
        fused = isinstance(adapter, Phi3Adapter)  # qkv_proj and gate_up_proj
        heads = HeadGroups(
            hidden_size=c.hidden_size,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            qkv_bias=c.qkv_bias,
            o_bias=c.o_bias,
            query_heads=query_heads,
            fused_qkv=fused,
        )
        mlp = NeuronGroups(
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            gated=True,
            fused_gate_up=fused,
            in_bias=c.mlp_bias,
            out_bias=c.mlp_bias,
        )
        return heads, mlp
    if isinstance(adapter, GPT2Adapter | BertAdapter):
        c = adapter.cfg
        d, n_heads, inter = (
            (c.n_embd, c.n_head, c.n_inner)
            if isinstance(adapter, GPT2Adapter)
            else (c.hidden_size, c.num_attention_heads, c.intermediate_size)
        )
        heads = HeadGroups(
            hidden_size=d,
            num_heads=n_heads,
            num_kv_heads=n_heads,
            head_dim=d // n_heads,
            qkv_bias=True,
            o_bias=True,
            query_heads=query_heads,
            fused_qkv=isinstance(adapter, GPT2Adapter),
        )
        mlp = NeuronGroups(
            hidden_size=d, intermediate_size=inter, gated=False, in_bias=True, out_bias=True
        )
        return heads, mlp
    raise ValueError(
        f"structured pruning has no layout for model family {adapter.family!r}; "
        f"valid families: 'llama', 'phi3', 'gpt2', 'bert'"
    )


def _common_module(names: Sequence[str], block_path: str, fallback: str) -> str:
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    name = ".".join(common)
    # BERT's MLP spans two modules (intermediate, output) with no common parent but the
    # block itself; name it after the block.
    return name if name != block_path else f"{block_path}.{fallback}"


def layer_plan(layer: LayerInfo) -> UnitPlan:
    """The plan of a unit that is one layer."""
    unit = Unit(
        name=layer.name,
        role=layer.role,
        block=layer.block,
        layers=(layer.name,),
        numel=layer.numel,
        flops_per_token=layer.flops_per_token,
    )
    return UnitPlan(unit=unit, primary=layer, layers=(layer,))


def _tied_plans(
    adapter: MoEAdapter, layers: Sequence[LayerInfo], *, by_expert: bool = False
) -> tuple[UnitPlan, ...]:
    """One unit per (block, projection) over all routed experts, or with ``by_expert`` one
    per routed expert over its projections (expert removal), at its first member's place
    in forward order; every other layer is its own unit."""
    plans: list[UnitPlan | tuple[int, str]] = []  # (block, projection) of a tied unit
    tied: dict[tuple[int, str], list[LayerInfo]] = {}
    for layer in layers:
        where = adapter.expert_of(layer.name)
        if where is None:
            plans.append(layer_plan(layer))
            continue
        proj = str(where[1]) if by_expert else layer.name.rsplit(".", 1)[1]
        key = (layer.block, proj)
        if key not in tied:
            tied[key] = []
            plans.append(key)
        tied[key].append(layer)
    out = []
    for p in plans:
        if isinstance(p, UnitPlan):
            out.append(p)
            continue
        members = tuple(tied[p])
        first = members[0]
        unit = Unit(
            name=f"{adapter.block_prefix(p[0])}{adapter.moe.module}.experts.{p[1]}",
            role=EXPERT_ROLE if by_expert else first.role,
            block=first.block,
            layers=tuple(m.name for m in members),
            numel=sum(m.numel for m in members),
            flops_per_token=sum(m.flops_per_token for m in members),
        )
        out.append(
            UnitPlan(unit=unit, primary=first, layers=members, tied=True, removable=by_expert)
        )
    return tuple(out)


def unit_plans(
    adapter: ModelAdapter,
    structure: str,
    *,
    query_heads: bool = False,
    tie_experts: bool = False,
    expert_removal: bool = False,
    prune_router: bool = False,
) -> tuple[UnitPlan, ...]:
    """The plan of every unit of a ``structure`` supernet of ``adapter``, in forward order
    (see :func:`supernet_units` for the units and the options)."""
    if structure not in BUILD_STRUCTURES:
        raise ValueError(f"structure {structure!r} is not supported; valid: {BUILD_STRUCTURES}")
    check_expert_options(
        adapter,
        structure,
        expert_removal=expert_removal,
        prune_router=prune_router,
        tie_experts=tie_experts,
    )
    layers = model_layers(adapter, routers=prune_router)
    if expert_removal:
        return _tied_plans(adapter, layers, by_expert=True)
    if tie_experts:
        if not isinstance(adapter, MoEAdapter):
            raise ValueError(
                f"tie_experts needs a mixture-of-experts model (one of {sorted(MOE_TYPES)}), "
                f"got model_type {adapter.model_type!r}"
            )
        if structure not in ("unstructured", "nm"):
            raise ValueError(
                f"tie_experts works with structure 'unstructured' or 'nm', not {structure!r}"
            )
        return _tied_plans(adapter, layers)
    if structure in ("unstructured", "nm"):
        return tuple(layer_plan(layer) for layer in layers)
    heads, neurons = structured_layouts(adapter, query_heads=query_heads)
    kinds = []
    if structure in ("heads", "heads_neurons"):
        kinds.append(("attn", _ATTN_ROLES, heads))
    if structure in ("neurons", "heads_neurons"):
        kinds.append(("mlp", _MLP_ROLES, neurons))
    plans = []
    for b in range(adapter.num_blocks):
        block_layers = [layer for layer in layers if layer.block == b]
        block_path = adapter.block_prefix(b).rstrip(".")
        for role, roles, layout in kinds:
            members = tuple(layer for layer in block_layers if layer.role in roles)
            outputs = [layer for layer in members if layer.role in _OUTPUT_ROLES]
            if len(outputs) != 1:
                raise ValueError(
                    f"block {b}: expected one output projection among {[m.name for m in members]}"
                )
            primary = outputs[0]
            if primary.shape != (layout.hidden_size, layout.in_features):
                raise ValueError(
                    f"{primary.name} has shape {primary.shape}, but the {role} layout expects "
                    f"({layout.hidden_size}, {layout.in_features})"
                )
            names = [m.name for m in members]
            unit = Unit(
                name=_common_module(names, block_path, role),
                role=role,
                block=b,
                layers=tuple(names),
                numel=sum(m.numel for m in members),
                flops_per_token=sum(m.flops_per_token for m in members),
            )
            plans.append(UnitPlan(unit=unit, primary=primary, layers=members, layout=layout))
    return tuple(plans)


def supernet_units(
    adapter: ModelAdapter,
    structure: str,
    *,
    tie_experts: bool = False,
    expert_removal: bool = False,
    prune_router: bool = False,
) -> tuple[Unit, ...]:
    """The units a supernet of ``structure`` has, in forward order (the rows a grid for
    :func:`build_supernet` must have).

    Args:
      adapter: the model family adapter.
      structure: one of :data:`BUILD_STRUCTURES`.

    Returns:
      ``Unit`` per prunable layer (``"unstructured"``, ``"nm"``), or per attention
      sublayer (role ``"attn"``, covering q/k/v/o) and/or MLP sublayer (role ``"mlp"``,
      covering gate/up/down) for the structured kinds. With ``tie_experts`` (MoE models)
      one unit per block and expert projection covers every routed expert; with
      ``expert_removal`` one unit per routed expert (role ``"expert"``) covers its three
      projections (:mod:`allocsearch.supernet.experts`); with ``prune_router`` each
      block's router is a unit (role ``"router"``).
    """
    plans = unit_plans(
        adapter,
        structure,
        tie_experts=tie_experts,
        expert_removal=expert_removal,
        prune_router=prune_router,
    )
    return tuple(p.unit for p in plans)


def unit_group_counts(
    adapter: ModelAdapter, structure: str, *, query_heads: bool = False
) -> np.ndarray:
    """int64[L]: removable groups per structured unit (kv groups, or query heads with
    ``query_heads``, for ``attn`` units; neurons for ``mlp`` units), the ``groups``
    argument of :func:`~allocsearch.supernet.levels.structured_grid`."""
    if structure not in STRUCTURED:
        raise ValueError(
            f"group counts exist for structured supernets only; structure {structure!r} is "
            f"not one of {sorted(STRUCTURED)}"
        )
    plans = unit_plans(adapter, structure, query_heads=query_heads)
    return np.array([p.layout.num_groups for p in plans], dtype=np.int64)


def unit_removed_groups(store: SupernetStore) -> np.ndarray:
    """int64[L, K]: groups each level of a structured store removes (-1 past a unit's
    levels), read from the stored group keep masks of each unit's output projection.

    With kv-group units this is ``round(sparsity * groups)``; with query-head units the
    fraction of weights a level removes is not its fraction of heads (k/v rows die only
    with a kv head's last query head), so the count is read, not derived.
    """
    spec = store.spec
    if spec.structure not in STRUCTURED:
        raise ValueError(
            f"removed groups exist for structured stores only; {store.path} holds a "
            f"{spec.structure!r} supernet"
        )
    out = np.full(spec.sparsity.shape, -1, np.int64)
    for u, params in enumerate(store.unit_params):
        keeps = [getattr(store.variants(p), "group_keep", None) for p in params]
        keep = next((np.asarray(k, bool) for k in keeps if k is not None), None)
        if keep is None:
            raise ValueError(f"{store.path}: unit {spec.units[u].name!r} has no group keep masks")
        out[u, : keep.shape[0]] = (~keep).sum(axis=1)
    return out


def unit_min_steps(
    adapter: ModelAdapter, structure: str, *, query_heads: bool = False
) -> np.ndarray:
    """int64[L]: the smallest level step of each structured unit, in its groups (Týr: one
    kv group for ``attn`` units, ``MIN_NEURON_STEP`` = 32 neurons for ``mlp`` units), the
    ``min_items`` argument of :func:`~allocsearch.search.coarse_to_fine.centred_grid`."""
    if structure not in STRUCTURED:
        raise ValueError(
            f"minimum steps exist for structured supernets only; structure {structure!r} is "
            f"not one of {sorted(STRUCTURED)}"
        )
    plans = unit_plans(adapter, structure, query_heads=query_heads)
    return np.array([p.layout.min_step for p in plans], dtype=np.int64)


# --------------------------------------------------------------------------- variants
