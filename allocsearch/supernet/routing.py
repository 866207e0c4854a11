"""Mixture-of-experts routing in a build: routed token counts, experts without tokens, frequencies.

An expert's statistics come from the tokens routed to it (``n_tokens`` is the routed
count); an expert that receives no calibration token is pruned by magnitude and reported.
Each expert unit's ``routing_frequency`` is its measured share of calibration tokens
(weights its FLOPs in the cost tables); the manifest's ``routing`` entry keeps the counts.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from allocsearch.models.moe import MoEAdapter
from allocsearch.pruners.base import LayerStats
from allocsearch.supernet.experts import protected_experts
from allocsearch.supernet.spec import Unit
from allocsearch.supernet.units import UnitPlan

if TYPE_CHECKING:
    from allocsearch.supernet.store import SupernetStore

__all__ = ["NoCalibrationTokensWarning", "RoutingLog", "routing_frequencies"]


class NoCalibrationTokensWarning(UserWarning):
    """A mixture-of-experts expert received no calibration token; its layers were pruned
    by magnitude instead of the requested pruner."""


def _routed_stats(
    adapter: MoEAdapter,
    block: int,
    counts: np.ndarray,
    stats: dict[str, LayerStats | None],
    n_tokens: int,
    stacklevel: int,
) -> set[str]:
    """Give each expert input group of block ``block`` its routed token count
    (``counts`` int64[E]) as ``n_tokens``; returns the names of the layers of experts that
    received no token (warned about), which are to be pruned by magnitude."""
    prefix = adapter.block_prefix(block)
    for g, st in stats.items():
        where = adapter.expert_of(prefix + g)
        if where is not None and st is not None:
            stats[g] = st._replace(n_tokens=int(counts[where[1]]))
    empty = [int(e) for e in np.flatnonzero(counts == 0)]
    if not empty:
        return set()
    warnings.warn(
        f"block {block}: expert(s) {empty} of {adapter.moe.num_experts} received no "
        f"calibration token (of {n_tokens}); their layers are pruned by magnitude. Use more "
        f"or more varied calibration data for routing-aware statistics",
        NoCalibrationTokensWarning,
        stacklevel=stacklevel + 1,
    )
    return {
        layer.name
        for layer in adapter.layers()
        if layer.block == block and (adapter.expert_of(layer.name) or (-1, -1))[1] in empty
    }


def routing_frequencies(store: SupernetStore) -> dict[str, float]:
    """Layer name -> measured routing frequency (share of calibration tokens routed to the
    layer's expert) of every expert layer of a mixture-of-experts supernet; empty for
    other models."""
    return {k: float(v) for k, v in store.manifest.get("routing", {}).get("frequency", {}).items()}


@dataclass
class RoutingLog:
    """What a build of a mixture-of-experts model measures of the routing, block by block."""

    adapter: MoEAdapter
    n_tokens: int  # calibration tokens
    expert_removal: bool
    counts: list[np.ndarray] = field(default_factory=list)  # per block: int64[E] tokens
    protected: list[list[int]] = field(default_factory=list)  # per block: experts that stay
    no_tokens: list[str] = field(default_factory=list)  # module paths of experts without any

    def block(
        self,
        b: int,
        counts: np.ndarray,
        stats: dict[str, LayerStats | None],
        block_plans: Sequence[tuple[int, UnitPlan]],
        valid: np.ndarray,
        n_grid: np.ndarray,
        stacklevel: int = 1,
    ) -> set[str]:
        """Record block ``b``'s routed ``counts``, set its experts' statistics' token
        counts, and (expert removal) clear the removed level of its protected experts in
        ``valid``; returns the layers to prune by magnitude (experts without tokens)."""
        fallback = _routed_stats(self.adapter, b, counts, stats, self.n_tokens, stacklevel + 1)
        self.counts.append(counts)
        self.no_tokens += sorted({n.rsplit(".", 1)[0] for n in fallback})
        if self.expert_removal:
            keep = protected_experts(counts, self.adapter.moe.top_k).tolist()
            self.protected.append(keep)
            for u, plan in block_plans:
                where = self.adapter.expert_of(plan.primary.name) if plan.removable else None
                if where is not None and where[1] in keep:
                    valid[u, n_grid[u] - 1] = False
        return fallback

    def units(self, units: Sequence[Unit]) -> tuple[Unit, ...]:
        """Units whose expert layers carry their measured routing frequency (the mean share
        of calibration tokens routed to the unit's experts)."""
        out = []
        for unit in units:
            freqs = []
            for name in unit.layers:
                where = self.adapter.expert_of(name)
                freqs.append(
                    1.0 if where is None else self.counts[where[0]][where[1]] / self.n_tokens
                )
            freq = float(np.mean(freqs))
            out.append(unit if freq == 1.0 else dataclasses.replace(unit, routing_frequency=freq))
        return tuple(out)

    def manifest(self, *, tie_experts: bool, prune_router: bool) -> dict[str, Any]:
        """The manifest's ``routing`` entry."""
        return {
            "n_tokens": self.n_tokens,
            "top_k": self.adapter.moe.top_k,
            "counts": [c.tolist() for c in self.counts],
            "no_tokens": self.no_tokens,
            "tie_experts": bool(tie_experts),
            "expert_removal": bool(self.expert_removal),
            "protected": self.protected,
            "prune_router": bool(prune_router),
            "frequency": {
                layer.name: int(self.counts[where[0]][where[1]]) / self.n_tokens
                for layer in self.adapter.layers()
                if (where := self.adapter.expert_of(layer.name)) is not None
            },
        }
