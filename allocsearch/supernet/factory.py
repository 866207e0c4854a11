"""Grid and pruner factories of a supernet config: which levels every unit gets
(:func:`make_grid`) and which local pruner makes them (:func:`make_pruner`).

Shared by the build (:func:`allocsearch.pipeline.build`), Týr's per-round rebuilds and
the memory plan, which sizes the same grid without building it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from allocsearch.models.hf import HFModel
from allocsearch.pruners import (
    MagnitudePruner,
    NMMagnitudePruner,
    NMSparseGPTPruner,
    NMWandaPruner,
    SparseGPTPruner,
    StructuredPruner,
    WandaPruner,
)
from allocsearch.supernet.build import supernet_units, unit_group_counts, unit_min_steps
from allocsearch.supernet.depth import check_depth_supported, depth_grid
from allocsearch.supernet.experts import member_exact_grid, model_layers, removal_grid
from allocsearch.supernet.levels import LevelGrid, centred_grid, equal_step_grid, nm_grid

if TYPE_CHECKING:  # a typed config in, read only (the config module sits above this one)
    from allocsearch.config import SupernetConfig

__all__ = ["make_grid", "make_pruner", "nm_patterns", "query_heads"]


def make_pruner(cfg: SupernetConfig) -> Any:
    """The local pruner (or, for structured supernets, the pruner factory) of a config."""
    if cfg.structure == "heads_neurons":
        return StructuredPruner
    if cfg.structure == "nm":
        m = nm_patterns(cfg)[0][1]
        cls = {"magnitude": NMMagnitudePruner, "wanda": NMWandaPruner}.get(
            cfg.pruner, NMSparseGPTPruner
        )
        return cls(m=m)
    return {"magnitude": MagnitudePruner, "wanda": WandaPruner, "sparsegpt": SparseGPTPruner}[
        cfg.pruner
    ]()


def nm_patterns(cfg: SupernetConfig) -> list[tuple[int, int]]:
    """The (N, M) patterns of an N:M config, sorted, the dense (0, M) first; refuses a
    mix of group sizes M."""
    pats = sorted({tuple(int(x) for x in p.split(":")) for p in cfg.nm_patterns})
    ms = {m for _, m in pats}
    if len(ms) != 1:
        raise ValueError(
            f"supernet.nm_patterns {list(cfg.nm_patterns)} mix group sizes {sorted(ms)}; one "
            "supernet uses one M (e.g. ['0:4', '1:4', '2:4', '3:4'])"
        )
    m = ms.pop()
    if (0, m) not in pats:
        pats.insert(0, (0, m))  # dense is always a level
    return pats


def query_heads(cfg: SupernetConfig) -> bool:
    """Whether structured attention units remove single query heads (not kv groups)."""
    return cfg.head_granularity == "query_head"


def make_grid(cfg: SupernetConfig, model: HFModel, *, target: float) -> LevelGrid:
    """Level grid of every unit: EvoPress equal-weight steps around the target
    (unstructured), N:M patterns, or whole heads/neurons (structured)."""
    adapter = model.adapter
    units = supernet_units(
        adapter,
        cfg.structure,
        tie_experts=cfg.tie_experts,
        expert_removal=cfg.expert_removal,
        prune_router=cfg.prune_router,
    )
    if cfg.structure == "nm":
        pats = nm_patterns(cfg)
        center = min(pats, key=lambda p: abs(p[0] / p[1] - target))
        in_features = {
            layer.name: layer.in_features
            for layer in model_layers(adapter, routers=cfg.prune_router)
        }
        widths = [in_features[u.layers[0]] for u in units]
        return nm_grid(pats, in_features=widths, center=center)
    if cfg.structure == "heads_neurons":
        if cfg.depth != "none":
            check_depth_supported(adapter)
        if cfg.depth == "drop":
            return depth_grid("drop", None, len(units))
        qh = query_heads(cfg)
        grid = centred_grid(
            units,
            np.full(len(units), target),
            cfg.step_fraction,
            groups=unit_group_counts(adapter, cfg.structure, query_heads=qh),
            steps_each_side=cfg.steps_each_side,
            # 1 kv group (or query head), 32 neurons
            min_items=unit_min_steps(adapter, cfg.structure, query_heads=qh),
        )
        return depth_grid(cfg.depth, grid, len(units))
    numel = np.array([u.numel for u in units], np.int64)
    step = max(1, int(round(cfg.step_fraction * float(numel.mean()))))
    if cfg.expert_removal:
        return removal_grid(
            units, center=target, step_weights=step, steps_each_side=cfg.steps_each_side
        )
    if cfg.tie_experts:  # a level applies to every tied expert's layer: exact on each
        return member_exact_grid(
            units, center=target, step_weights=step, steps_each_side=cfg.steps_each_side
        )
    return equal_step_grid(
        numel, center=target, step_weights=step, steps_each_side=cfg.steps_each_side
    )
