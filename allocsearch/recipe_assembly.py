"""A schema-v1 recipe from a search's outcome on a supernet store: exact per-layer
sparsities (or bitwidths) of the chosen levels, with the run's provenance."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

import allocsearch
from allocsearch.models.hf import ARCHITECTURES
from allocsearch.quantizers.costs import level_to_json, spec_quant_levels
from allocsearch.recipe.recipe import (
    LEVEL_KIND_KEY,
    Calibration,
    Fitness,
    LayerEntry,
    ModelIdentity,
    Provenance,
    Recipe,
    RecipeBudget,
    StructuredUnit,
)
from allocsearch.search.budget import Budget, CostModel
from allocsearch.supernet.build import routing_frequencies, unit_group_counts, unit_removed_groups
from allocsearch.supernet.experts import model_layers
from allocsearch.supernet.store import SupernetStore
from allocsearch.workspace import Workspace

if TYPE_CHECKING:  # the pipeline's Outcome, read only (pipeline imports this module)
    from allocsearch.pipeline import Outcome


def recipe_from_choice(
    ws: Workspace,
    store: SupernetStore,
    budget: Budget,
    outcome: Outcome,
    *,
    partial: bool = False,
) -> Recipe:
    """A schema-v1 recipe of ``outcome.choice`` on ``store`` (exact per-layer sparsities
    of the stored variants, dead rows of structured units included)."""
    store = outcome.store or store
    spec = store.spec
    choice = np.asarray(outcome.choice)
    adapter = ws.model.adapter
    routers = any(u.role == "router" for u in spec.units)
    info = {layer.name: layer for layer in model_layers(adapter, routers=routers)}
    layer_sparsity: dict[str, float] = {}
    for u, params in enumerate(store.unit_params):
        for p in params:
            v = store.variants(p)
            layer_sparsity[p[: -len(".weight")]] = float(v.sparsity[int(choice[u])])
    structured = spec.structure in ("heads", "neurons", "heads_neurons")
    entries = []
    units = []
    member_kind: dict[str, str] = {}
    if structured:
        # group counts as the store was built (kv groups or query heads), read from its
        # keep masks: a query-head level's fraction of weights is not its fraction of heads
        layouts = store.manifest["pruner"].get("layouts") or {}
        query_heads = bool(layouts.get("attn", {}).get("query_heads", False))
        counts = unit_group_counts(adapter, spec.structure, query_heads=query_heads)
        removed_at = unit_removed_groups(store)
        for u, unit in enumerate(spec.units):
            kind = "heads" if unit.role == "attn" else "neurons"
            total = int(counts[u])
            removed = int(removed_at[u, int(choice[u])])
            units.append(StructuredUnit(unit.name, kind, unit.block, removed, total, unit.layers))
            member_kind.update(dict.fromkeys(unit.layers, kind))
    nm = spec.structure == "nm"
    unit_of_layer = {layer: u for u, unit in enumerate(spec.units) for layer in unit.layers}
    frequency = routing_frequencies(store)
    quant = spec_quant_levels(spec.level_labels)  # bitwidth levels: each layer's bits
    for name, layer in info.items():
        s = layer_sparsity.get(name, 0.0)
        kw: dict[str, Any] = {}
        if quant is not None and name in unit_of_layer:
            u = unit_of_layer[name]
            s, kw = 0.0, level_to_json(quant[u][int(choice[u])])
        if name in frequency:
            kw["routing_frequency"] = frequency[name]
        if structured:
            kw["structure"] = member_kind.get(name, "heads")
        elif nm:
            label = spec.level_labels[unit_of_layer[name]][int(choice[unit_of_layer[name]])]
            n, m = (int(x) for x in label.split(":"))
            kw.update(structure="nm", n=n, m=m)
        entries.append(LayerEntry(name, layer.role, layer.block, layer.shape, s, **kw))
    achieved = float(CostModel.from_spec(spec, budget).achieved(choice))
    fitness_name = ws.config.evaluator.metric
    return Recipe(
        model=ModelIdentity(
            name_or_path=ws.config.model,
            architecture=ARCHITECTURES.get(adapter.model_type, adapter.model_type),
            model_type=adapter.model_type,
            fingerprint=ws.model.fingerprint,
        ),
        layers=tuple(entries),
        # on bitwidth levels a params / FLOPs budget is the same fraction of the 16-bit bits
        budget=RecipeBudget(
            "bits" if quant is not None and budget.kind in ("params", "flops") else budget.kind,
            float(budget.target),
            achieved,
        ),
        provenance=Provenance(
            strategy=outcome.strategy,
            settings=_recipe_settings(store, outcome),
            fitness=_fitness(fitness_name, outcome),
            calibration=Calibration(
                ws.calibration.source, ws.calibration.fingerprint, int(ws.config.data.seed)
            ),
            tool_version=allocsearch.__version__,
            wall_time_s=float(outcome.wall_time_s),
            evaluations=int(outcome.evaluations),
        ),
        structure=spec.structure,
        units=tuple(units),
        partial=partial,
    )


def _fitness(metric: str, outcome: Outcome) -> Fitness:
    """The recipe's fitness: the search's own, and the split scores when measured."""
    s = outcome.split
    if s is None:
        return Fitness(metric, outcome.fitness)
    validation_tokens = s.validation_tokens if s.validation is not None else None
    return Fitness(
        metric,
        outcome.fitness,
        s.calibration,
        s.calibration_tokens,
        s.validation,
        validation_tokens,
    )


def _recipe_settings(store: SupernetStore, outcome: Outcome) -> dict[str, Any]:
    """The outcome's settings, marked when the store's levels are bitwidths."""
    settings = dict(outcome.settings)
    if store.manifest.get("pruner", {}).get("kind") == "quantizer":
        settings[LEVEL_KIND_KEY] = "bits"
    return settings
