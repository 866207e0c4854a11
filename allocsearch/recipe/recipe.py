"""Recipe schema v1: a per-layer sparsity allocation as a self-checking JSON document.

A *recipe* is what a search produces and what every exporter and ``apply`` consume. It
names layers by their Hugging Face module path (``model.layers.3.mlp.down_proj``), gives
each layer's sparsity (fraction of its weights that are zero) and structure, states the
budget the allocation meets and records how it was found. The field-by-field reference
is ``docs/recipe.md``.

Everything is validated when a :class:`Recipe` is built, whether in code or from JSON,
and every problem raises :class:`RecipeError` (a ``ValueError``) naming the bad field,
the bad value and what would be valid. Loading never raises another exception type for
bad content (a missing file still raises ``FileNotFoundError``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from allocsearch.atomic import atomic_write_text
from allocsearch.models.layers import ROLES
from allocsearch.recipe.coerce import (
    RecipeError,
    _as_bool,
    _as_float,
    _as_int,
    _as_str,
    _as_tuple,
    _isclose_rel,
    _kind,
)
from allocsearch.recipe.model_check import check_against_model
from allocsearch.recipe.records import Calibration, Fitness, ModelIdentity, Provenance
from allocsearch.supernet.spec import STRUCTURES

SCHEMA_VERSION = 2
# Versions read: v1 (sparsity only) and v2 (adds per-layer bits, group_size, symmetric).
READABLE_SCHEMA_VERSIONS = (1, 2)
NAMING_CONVENTION = "huggingface-module-path"
BUDGET_KINDS = ("params", "flops", "latency", "sublayers", "bits", "bytes")
# Structure of one layer entry. "heads" / "neurons" mark member layers of a structured unit.
LAYER_STRUCTURES = ("unstructured", "nm", "heads", "neurons")
UNIT_KINDS = ("heads", "neurons")
# Which unit kinds each recipe-level structure (SupernetSpec.STRUCTURES) allows.
_UNIT_KINDS_OF = {
    "unstructured": (),
    "nm": (),
    "heads": ("heads",),
    "neurons": ("neurons",),
    "heads_neurons": ("heads", "neurons"),
}
# Relative tolerance for "the layer sparsities reproduce the stated achieved budget".
BUDGET_RTOL = 1e-6
# Tolerance for quantities that are exact ratios of integers (n/m, removed/total).
_EXACT_TOL = 1e-12
# Largest accepted matrix dimension: keeps every count exact in float64 / int64.
_MAX_DIM = 2**31 - 1


# ``provenance.settings[LEVEL_KIND_KEY] == "bits"`` marks a recipe searched on a quantized
# supernet (allocsearch.supernet.quantized). Schema-v2 recipes carry each layer's bits; in
# older ones the per-layer ``sparsity`` was the stand-in 1 - bits_per_weight / 16.
LEVEL_KIND_KEY = "level_kind"


def check_schema_version(value: Any) -> int:
    """``value`` as a readable schema version, else a :class:`RecipeError` naming them."""
    version = _as_int(value, "schema_version")
    if version not in READABLE_SCHEMA_VERSIONS:
        raise RecipeError(
            f"schema_version {version} is not supported; this allocsearch reads "
            f"schema_version {', '.join(map(str, READABLE_SCHEMA_VERSIONS))}"
        )
    return version


def refuse_bit_recipe(recipe: Recipe, what: str) -> None:
    """Refuse to prune by a recipe whose levels are bitwidths (see :data:`LEVEL_KIND_KEY`).

    Raises:
      RecipeError: naming ``what`` (e.g. ``"apply"``) and why.
    """
    if recipe.provenance.settings.get(LEVEL_KIND_KEY) == "bits" and not recipe.quantized:
        raise RecipeError(
            f"{what}: this recipe allocates bitwidths (searched on a quantized supernet) but "
            "has no per-layer bits: its per-layer 'sparsity' is the stand-in 1 - bits/16 of "
            "an older allocsearch, so it would prune instead of quantize. Search again to get "
            "a schema-v2 recipe with per-layer bits"
        )


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class LayerEntry:
    """One linear layer of the allocation.

    Attributes:
      name: Hugging Face module path (the weight is ``f"{name}.weight"``).
      role: one of ``allocsearch.models.layers.ROLES``.
      block: transformer block index (-1 outside the blocks).
      shape: ``(out_features, in_features)`` of the dense weight.
      sparsity: fraction of this layer's weights that are zero, in [0, 1]. For members
        of a structured unit this is the effective sparsity, counting dead rows.
      structure: one of :data:`LAYER_STRUCTURES`: ``"unstructured"``, ``"nm"`` (then
        ``n``/``m`` are set), or ``"heads"`` / ``"neurons"`` for a member layer of a
        structured unit (see :class:`StructuredUnit`).
      n: N:M only: number of ZEROS in every group of ``m`` consecutive weights along the
        input dimension (the Wanda / SparseGPT / llm-compressor convention); 0 <= n < m.
      m: N:M only: group size; must divide ``in_features``.
      routing_frequency: fraction of tokens that reach the layer, in [0, 1]: 1 for dense
        layers; for a mixture-of-experts expert's layer, the share of calibration tokens
        routed to it (weights its FLOPs; written only when below 1).
      bits: schema v2: the layer's weights are quantized to ``bits``-bit integers (2..8)
        with one float16 scale (and, unless ``symmetric``, one zero point) per
        ``group_size`` input columns; None (all three) for a 16-bit layer.
      group_size: input columns per scale (set with ``bits``).
      symmetric: scale only (True) or scale and zero point (False) (set with ``bits``).
    """

    name: str
    role: str
    block: int
    shape: tuple[int, int]
    sparsity: float
    structure: str = "unstructured"
    n: int | None = None
    m: int | None = None
    routing_frequency: float = 1.0
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None

    def __post_init__(self) -> None:
        name = _as_str(self.name, "layer name")
        what = f"layer {name!r}"
        role = _as_str(self.role, f"{what}: role")
        if role not in ROLES:
            raise RecipeError(f"{what}: role {role!r} is not one of {ROLES}")
        block = _as_int(self.block, f"{what}: block", lo=-1)
        shape = _as_tuple(self.shape, f"{what}: shape")
        if len(shape) != 2:
            raise RecipeError(f"{what}: shape must be [out_features, in_features], got {shape}")
        shape = tuple(_as_int(d, f"{what}: shape entry", lo=1, hi=_MAX_DIM) for d in shape)
        sparsity = _as_float(self.sparsity, f"{what}: sparsity", lo=0.0, hi=1.0)
        structure = _as_str(self.structure, f"{what}: structure")
        if structure not in LAYER_STRUCTURES:
            raise RecipeError(f"{what}: structure {structure!r} is not one of {LAYER_STRUCTURES}")
        n, m = self.n, self.m
        if structure == "nm":
            if n is None or m is None:
                raise RecipeError(f"{what}: structure 'nm' needs both n (zeros) and m")
            m = _as_int(m, f"{what}: m", lo=1)
            n = _as_int(n, f"{what}: n (zeros per group)", lo=0)
            if n >= m:
                raise RecipeError(
                    f"{what}: N:M {n}:{m} has n >= m; n counts the ZEROS per group of m, "
                    f"valid n are 0..{m - 1}"
                )
            if shape[1] % m != 0:
                raise RecipeError(
                    f"{what}: N:M group size m={m} does not divide in_features={shape[1]}; "
                    f"groups run along the input dimension"
                )
            if abs(sparsity - n / m) > _EXACT_TOL:
                raise RecipeError(
                    f"{what}: N:M {n}:{m} means sparsity {n / m!r}, but sparsity is {sparsity!r}"
                )
        elif n is not None or m is not None:
            raise RecipeError(f"{what}: n/m are only valid with structure 'nm', not {structure!r}")
        object.__setattr__(self, "block", block)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "sparsity", sparsity)
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "m", m)
        object.__setattr__(
            self,
            "routing_frequency",
            _as_float(self.routing_frequency, f"{what}: routing_frequency", lo=0.0, hi=1.0),
        )
        self._check_quantization(what)

    def _check_quantization(self, what: str) -> None:
        given = [x is not None for x in (self.bits, self.group_size, self.symmetric)]
        if not any(given):
            return
        if not all(given):
            raise RecipeError(
                f"{what}: bits, group_size and symmetric go together (a quantized layer); got "
                f"bits={self.bits!r}, group_size={self.group_size!r}, symmetric={self.symmetric!r}"
            )
        object.__setattr__(self, "bits", _as_int(self.bits, f"{what}: bits", lo=2, hi=8))
        object.__setattr__(
            self, "group_size", _as_int(self.group_size, f"{what}: group_size", lo=1)
        )
        object.__setattr__(self, "symmetric", _as_bool(self.symmetric, f"{what}: symmetric"))

    @property
    def quantized(self) -> bool:
        """Whether the layer's weights are quantized (``bits`` set)."""
        return self.bits is not None

    def kept_bits(self, sparsity: float | None = None) -> float:
        """Bits the layer keeps: 16 per kept weight, or for a quantized layer its codes,
        scales and zero points (:func:`~allocsearch.quantizers.costs.level_bits`) times
        the kept fraction ``1 - sparsity`` (the entry's own unless given)."""
        s = self.sparsity if sparsity is None else float(sparsity)
        if self.bits is None:
            return 16.0 * self.numel * (1.0 - s)
        from allocsearch.quantizers.costs import level_bits
        from allocsearch.quantizers.grid import QuantLevel

        level = QuantLevel(self.bits, self.group_size, self.symmetric)
        return float(level_bits(level, self.shape)) * (1.0 - s)

    @property
    def numel(self) -> int:
        """Number of weights in the dense matrix."""
        return self.shape[0] * self.shape[1]

    @property
    def flops_per_token(self) -> float:
        """Dense multiply-accumulates per token (out * in, as in ``LayerInfo``) times the
        routing frequency (the expected MACs of an average token)."""
        return self.shape[0] * self.shape[1] * self.routing_frequency

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[0]


@dataclass(frozen=True)
class StructuredUnit:
    """A structured-pruning unit: the heads of an attention sublayer or an MLP's neurons.

    Attributes:
      name: sublayer module path, e.g. ``model.layers.3.self_attn`` or
        ``model.layers.3.mlp``.
      kind: ``"heads"`` or ``"neurons"``.
      block: transformer block index.
      removed: number of heads / neurons removed.
      total: number of heads / neurons of the dense sublayer (> 0).
      layers: module paths of the member linear layers (each an entry of
        ``Recipe.layers`` whose structure is ``kind``); their sparsities are the effective
        ones, dead rows of q/k/v or gate/up included.
    """

    name: str
    kind: str
    block: int
    removed: int
    total: int
    layers: tuple[str, ...]

    def __post_init__(self) -> None:
        name = _as_str(self.name, "unit name")
        what = f"unit {name!r}"
        kind = _as_str(self.kind, f"{what}: kind")
        if kind not in UNIT_KINDS:
            raise RecipeError(f"{what}: kind {kind!r} is not one of {UNIT_KINDS}")
        block = _as_int(self.block, f"{what}: block", lo=0)
        total = _as_int(self.total, f"{what}: total", lo=1)
        removed = _as_int(self.removed, f"{what}: removed", lo=0, hi=total)
        members = _as_tuple(self.layers, f"{what}: layers")
        if not members:
            raise RecipeError(f"{what}: layers must list at least one member layer")
        members = tuple(_as_str(x, f"{what}: member layer name") for x in members)
        if len(set(members)) != len(members):
            raise RecipeError(f"{what}: member layers listed twice in {list(members)}")
        # An MLP without a module of its own (BERT's intermediate.dense and output.dense
        # are siblings in the block) is a unit named "<block>.mlp": its neurons' layers
        # may lie anywhere in the block.
        parent = name.rpartition(".")[0] + "."
        virtual_mlp = kind == "neurons" and name.endswith(".mlp")
        for member in members:
            if not (member.startswith(name + ".") or virtual_mlp and member.startswith(parent)):
                raise RecipeError(
                    f"{what}: member layer {member!r} is not inside the sublayer (its module "
                    f"path must start with {name + '.'!r}"
                    + (f" or, for an MLP unit, {parent!r})" if virtual_mlp else ")")
                )
        object.__setattr__(self, "block", block)
        object.__setattr__(self, "total", total)
        object.__setattr__(self, "removed", removed)
        object.__setattr__(self, "layers", members)

    @property
    def fraction(self) -> float:
        """Fraction of heads / neurons removed, ``removed / total`` (0 = dense)."""
        return self.removed / self.total


@dataclass(frozen=True)
class RecipeBudget:
    """The global budget the allocation was searched under.

    Attributes:
      kind: ``"params"`` (weights), ``"flops"`` (multiply-accumulates per token),
        ``"latency"`` (from a measured table) or ``"sublayers"`` (attention / MLP
        sublayers dropped, whatever their sizes: a structured recipe's units).
      target: fraction of the dense cost of the recipe's layers to remove, in [0, 1]
        (``"sublayers"``: ``k / n``, drop at least ``k`` of the ``n`` units).
      achieved: fraction actually removed by the recipe, in [0, 1]. For params / flops
        it is recomputed from the layer shapes and sparsities on validation, for
        sublayers from the units (those with ``removed == total`` over all).
    """

    kind: str
    target: float
    achieved: float

    def __post_init__(self) -> None:
        kind = _as_str(self.kind, "budget.kind")
        if kind not in BUDGET_KINDS:
            raise RecipeError(f"budget.kind {kind!r} is not one of {BUDGET_KINDS}")
        target = _as_float(self.target, "budget.target", lo=0.0, hi=1.0)
        achieved = _as_float(self.achieved, "budget.achieved", lo=0.0, hi=1.0)
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "achieved", achieved)


# ----------------------------------------------------------------------------- budget


def layer_costs(layers: Sequence[LayerEntry], kind: str) -> np.ndarray:
    """Dense cost of each layer for a budget kind.

    Args:
      layers: recipe layer entries.
      kind: ``"params"`` (weights), ``"flops"`` (MACs per token, out * in), ``"bits"`` or
        ``"bytes"`` (of the 16-bit layer).

    Returns:
      float64[L], the dense cost per layer (units: weights or MACs per token).
    """
    if kind == "params":
        return np.array([float(x.numel) for x in layers], dtype=np.float64)
    if kind in ("bits", "bytes"):  # the dense 16-bit model
        per_weight = 16.0 if kind == "bits" else 2.0
        return np.array([per_weight * x.numel for x in layers], dtype=np.float64)
    if kind == "flops":
        return np.array([float(x.flops_per_token) for x in layers], dtype=np.float64)
    raise RecipeError(
        f"budget kind {kind!r} cannot be recomputed from shapes; valid kinds: 'params', 'flops'"
    )


def fraction_removed(
    layers: Sequence[LayerEntry], kind: str, sparsity: np.ndarray | None = None
) -> float:
    """Fraction of the dense cost of ``layers`` removed (higher = smaller model).

    Args:
      layers: recipe layer entries (L of them).
      kind: ``"params"``, ``"flops"``, ``"bits"`` or ``"bytes"`` (bits/bytes: kept bits
        of quantized layers from their bits, group size and symmetry).
      sparsity: float[L] per-layer sparsities to use instead of the entries' own (an
        exporter's approximation, for instance).

    Returns:
      sum_l s_l * cost_l / sum_l cost_l, in [0, 1].
    """
    cost = layer_costs(layers, kind)
    if kind in ("bits", "bytes"):  # quantized layers keep their codes, scales and zeros
        given = [None] * len(layers) if sparsity is None else list(np.asarray(sparsity, float))
        if len(given) != len(layers):
            raise RecipeError(f"sparsity has {len(given)} entries, expected {len(layers)}")
        kept = sum(x.kept_bits(g) for x, g in zip(layers, given, strict=True))
        return float(1.0 - kept / (16.0 * sum(x.numel for x in layers)))
    s = (
        np.array([x.sparsity for x in layers], dtype=np.float64)
        if sparsity is None
        else np.asarray(sparsity, dtype=np.float64)
    )
    if s.shape != cost.shape:
        raise RecipeError(f"sparsity has shape {s.shape}, expected ({len(layers)},)")
    return float(np.dot(s, cost) / cost.sum())


# ----------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class Recipe:
    """A per-layer sparsity allocation, schema v1 (see ``docs/recipe.md``).

    Attributes:
      model: which model (and which weights, by fingerprint) the recipe belongs to.
      layers: per-layer entries in forward order (non-decreasing block index).
      budget: budget kind, target and achieved fraction removed.
      provenance: strategy, settings, fitness (lower is better), calibration, version,
        wall time and evaluations.
      structure: one of ``SupernetSpec`` STRUCTURES: ``"unstructured"``, ``"nm"``,
        ``"heads"``, ``"neurons"``, ``"heads_neurons"``.
      units: structured recipes only: the heads / neurons units (the searched unit is
        the sublayer); empty otherwise.
      partial: True when the search was interrupted and this is its best-so-far.
      schema_version: always :data:`SCHEMA_VERSION`.
      naming: always :data:`NAMING_CONVENTION` (layers named by HF module path).
    """

    model: ModelIdentity
    layers: tuple[LayerEntry, ...]
    budget: RecipeBudget
    provenance: Provenance
    structure: str = "unstructured"
    units: tuple[StructuredUnit, ...] = ()
    partial: bool = False
    schema_version: int = SCHEMA_VERSION
    naming: str = NAMING_CONVENTION

    def __post_init__(self) -> None:
        version = check_schema_version(self.schema_version)
        naming = _as_str(self.naming, "naming")
        if naming != NAMING_CONVENTION:
            raise RecipeError(f"naming {naming!r} is not supported; valid: {NAMING_CONVENTION!r}")
        for attr, cls in (
            ("model", ModelIdentity),
            ("budget", RecipeBudget),
            ("provenance", Provenance),
        ):
            if not isinstance(getattr(self, attr), cls):
                raise RecipeError(
                    f"{attr} must be a {cls.__name__}, got {_kind(getattr(self, attr))}"
                )
        structure = _as_str(self.structure, "structure")
        if structure not in STRUCTURES:
            raise RecipeError(f"structure {structure!r} is not one of {STRUCTURES}")
        layers = _as_tuple(self.layers, "layers")
        units = _as_tuple(self.units, "units")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "units", units)
        object.__setattr__(self, "partial", _as_bool(self.partial, "partial"))
        self._check_layers(structure)
        if version < 2 and self.quantized:
            raise RecipeError(
                f"per-layer bits, group_size and symmetric need schema_version 2, this recipe "
                f"says {version}"
            )
        self._check_units(structure)
        self._check_budget()

    def _check_layers(self, structure: str) -> None:
        if not self.layers:
            raise RecipeError("layers is empty; a recipe needs at least one layer")
        seen: dict[str, int] = {}
        last_block = -1
        for i, entry in enumerate(self.layers):
            if not isinstance(entry, LayerEntry):
                raise RecipeError(f"layers[{i}] must be a LayerEntry, got {_kind(entry)}")
            if entry.name in seen:
                raise RecipeError(
                    f"duplicate layer name {entry.name!r} at layers[{seen[entry.name]}] and "
                    f"layers[{i}]; each layer may appear once"
                )
            seen[entry.name] = i
            if entry.block >= 0:
                if entry.block < last_block:
                    raise RecipeError(
                        f"layers[{i}] ({entry.name}) is in block {entry.block} after a layer of "
                        f"block {last_block}; layers must be in forward order"
                    )
                last_block = entry.block
            allowed = (structure,) if structure in ("unstructured", "nm") else UNIT_KINDS
            if entry.structure not in allowed:
                raise RecipeError(
                    f"layers[{i}] ({entry.name}) has structure {entry.structure!r}, which a "
                    f"{structure!r} recipe does not allow; valid: {allowed}"
                )

    def _check_units(self, structure: str) -> None:
        kinds = _UNIT_KINDS_OF[structure]
        if not kinds:
            if self.units:
                raise RecipeError(
                    f"units are only valid in structured recipes, not in a {structure!r} recipe"
                )
            return
        if not self.units:
            raise RecipeError(f"a {structure!r} recipe needs its structured units in 'units'")
        by_name = {x.name: x for x in self.layers}
        owner: dict[str, str] = {}
        unit_names: set[str] = set()
        for i, unit in enumerate(self.units):
            if not isinstance(unit, StructuredUnit):
                raise RecipeError(f"units[{i}] must be a StructuredUnit, got {_kind(unit)}")
            if unit.name in unit_names:
                raise RecipeError(f"duplicate unit name {unit.name!r} at units[{i}]")
            unit_names.add(unit.name)
            if unit.kind not in kinds:
                raise RecipeError(
                    f"units[{i}] ({unit.name}) has kind {unit.kind!r}; a {structure!r} recipe "
                    f"allows {kinds}"
                )
            for member in unit.layers:
                entry = by_name.get(member)
                if entry is None:
                    raise RecipeError(
                        f"units[{i}] ({unit.name}) lists member layer {member!r}, which is not "
                        f"in layers"
                    )
                if member in owner:
                    raise RecipeError(
                        f"layer {member!r} belongs to two units: {owner[member]!r} and "
                        f"{unit.name!r}"
                    )
                owner[member] = unit.name
                if entry.structure != unit.kind or entry.block != unit.block:
                    raise RecipeError(
                        f"layer {member!r} (structure {entry.structure!r}, block {entry.block}) "
                        f"does not match its unit {unit.name!r} (kind {unit.kind!r}, block "
                        f"{unit.block})"
                    )
                # Dead rows only come from removed heads / neurons, so no member can lose a
                # larger fraction of its weights than the unit loses of its groups.
                if entry.sparsity > unit.fraction + 1e-9:
                    raise RecipeError(
                        f"layer {member!r} has sparsity {entry.sparsity!r}, more than its unit "
                        f"{unit.name!r} removes ({unit.removed}/{unit.total} = "
                        f"{unit.fraction!r})"
                    )
        orphans = [x.name for x in self.layers if x.name not in owner]
        if orphans:
            raise RecipeError(
                f"layers {orphans[:5]} belong to no unit; in a structured recipe every layer is "
                f"a member of exactly one unit"
            )

    def _check_budget(self) -> None:
        if self.budget.kind == "latency":
            return  # needs the latency table; stated value is trusted (docs/recipe.md)
        if self.budget.kind == "sublayers":
            if not self.units:
                raise RecipeError(
                    "budget.kind 'sublayers' counts dropped sublayers, the units of a "
                    "structured recipe; this recipe has no units"
                )
            computed = sum(u.removed == u.total for u in self.units) / len(self.units)
        else:
            computed = fraction_removed(self.layers, self.budget.kind)
        if not _isclose_rel(computed, self.budget.achieved, BUDGET_RTOL):
            raise RecipeError(
                f"budget.achieved = {self.budget.achieved!r} does not match the layer "
                f"sparsities: they remove {computed!r} of the {self.budget.kind} "
                f"(relative tolerance {BUDGET_RTOL:g})"
            )

    # -- queries -------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """Number of transformer blocks covered (max block index + 1; 0 if none)."""
        return max((x.block for x in self.layers), default=-1) + 1

    def layer(self, name: str) -> LayerEntry:
        """The entry of the layer with module path ``name``."""
        for entry in self.layers:
            if entry.name == name:
                return entry
        raise KeyError(f"layer {name!r} is not in the recipe")

    @property
    def quantized(self) -> bool:
        """Whether any layer is quantized (carries ``bits``): a bitwidth allocation."""
        return any(x.quantized for x in self.layers)

    def sparsities(self) -> np.ndarray:
        """float64[L]: per-layer sparsity in forward order (fraction zero, higher = sparser)."""
        return np.array([x.sparsity for x in self.layers], dtype=np.float64)

    # -- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this recipe (plain dicts, lists, str, numbers, bool, None)."""
        layers = []
        for x in self.layers:
            item: dict[str, Any] = {
                "name": x.name,
                "role": x.role,
                "block": x.block,
                "shape": list(x.shape),
                "sparsity": x.sparsity,
                "structure": x.structure,
            }
            if x.structure == "nm":
                item["n"] = x.n
                item["m"] = x.m
            if x.routing_frequency != 1.0:
                item["routing_frequency"] = x.routing_frequency
            if x.quantized:
                item.update(bits=x.bits, group_size=x.group_size, symmetric=x.symmetric)
            layers.append(item)
        units = [
            {
                "name": u.name,
                "kind": u.kind,
                "block": u.block,
                "removed": u.removed,
                "total": u.total,
                "fraction": u.fraction,
                "layers": list(u.layers),
            }
            for u in self.units
        ]
        p = self.provenance
        return {
            "schema_version": self.schema_version,
            "naming": self.naming,
            "model": {
                "name_or_path": self.model.name_or_path,
                "architecture": self.model.architecture,
                "model_type": self.model.model_type,
                "fingerprint": self.model.fingerprint,
            },
            "structure": self.structure,
            "partial": self.partial,
            "budget": {
                "kind": self.budget.kind,
                "target": self.budget.target,
                "achieved": self.budget.achieved,
            },
            "provenance": {
                "strategy": p.strategy,
                "settings": p.settings,
                "fitness": p.fitness.to_dict(),
                "calibration": {
                    "description": p.calibration.description,
                    "fingerprint": p.calibration.fingerprint,
                    "seed": p.calibration.seed,
                },
                "tool_version": p.tool_version,
                "wall_time_s": p.wall_time_s,
                "evaluations": p.evaluations,
            },
            "layers": layers,
            "units": units,
        }

    def to_json(self) -> str:
        """JSON text of the recipe: 2-space indent, one line per layer / unit entry."""
        data = self.to_dict()
        rows = {key: data.pop(key) for key in ("layers", "units")}
        head = json.dumps(data, indent=2, allow_nan=False)  # "{ ... \n}"
        parts = []
        for key, items in rows.items():
            body = ",\n".join("    " + json.dumps(x, allow_nan=False) for x in items)
            parts.append(f'  "{key}": [\n{body}\n  ]' if items else f'  "{key}": []')
        return head[: -len("\n}")] + ",\n" + ",\n".join(parts) + "\n}\n"

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        """Build and validate a recipe from its JSON object; raises :class:`RecipeError`."""
        from allocsearch.recipe.parse import _parse_recipe

        return _parse_recipe(data)

    @classmethod
    def from_json(cls, text: str | bytes) -> Recipe:
        """Parse and validate JSON text; raises :class:`RecipeError` for any bad content."""
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as err:
                raise RecipeError(f"recipe is not UTF-8 text: {err}") from None
        if not isinstance(text, str):
            raise RecipeError(f"recipe JSON must be str or bytes, got {_kind(text)}")
        from allocsearch.recipe.parse import _parse_recipe, _reject_constant, _reject_duplicates

        try:
            data = json.loads(
                text, parse_constant=_reject_constant, object_pairs_hook=_reject_duplicates
            )
        except json.JSONDecodeError as err:
            raise RecipeError(f"recipe is not valid JSON: {err}") from None
        except RecursionError:
            raise RecipeError("recipe JSON is nested too deeply") from None
        return _parse_recipe(data)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the recipe atomically (see :func:`atomic_write_text`); returns the path."""
        return atomic_write_text(self.to_json(), path, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Recipe:
        """Read and validate a recipe file; raises :class:`RecipeError` for bad content."""
        data = Path(path).read_bytes()
        try:
            return cls.from_json(data)
        except RecipeError as err:
            raise RecipeError(f"{os.fspath(path)}: {err}") from None


# ----------------------------------------------------------------------------- file writing


__all__ = [
    "LEVEL_KIND_KEY",
    "refuse_bit_recipe",
    "BUDGET_KINDS",
    "BUDGET_RTOL",
    "LAYER_STRUCTURES",
    "NAMING_CONVENTION",
    "SCHEMA_VERSION",
    "UNIT_KINDS",
    "Calibration",
    "Fitness",
    "LayerEntry",
    "ModelIdentity",
    "Provenance",
    "Recipe",
    "RecipeBudget",
    "RecipeError",
    "StructuredUnit",
    "atomic_write_text",
    "check_against_model",
    "fraction_removed",
    "layer_costs",
]
