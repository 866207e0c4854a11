"""The search space seen by every searcher: units x levels with their sparsities and costs.

Search code sees only this object, never weights (STYLE.md habit 1).

A *unit* is what a searcher assigns one level to. For unstructured and N:M pruning a unit
is one linear layer; for structured pruning it is a sublayer (the attention heads of a
block, which spans q/k/v/o, or the MLP neurons of a block, which spans gate/up/down).
Levels are ordered by increasing sparsity; units may have different numbers of levels,
so the tables are padded to ``K = max levels`` and ``valid`` marks the real entries,
which are contiguous from level 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

STRUCTURES = ("unstructured", "nm", "heads", "neurons", "heads_neurons")


@dataclass(frozen=True)
class Unit:
    """One searchable unit.

    Attributes:
      name: Hugging Face module path of the layer (unstructured) or of the sublayer
        (``model.layers.3.self_attn`` / ``model.layers.3.mlp`` for structured).
      role: layer role (q, k, ..., see ``LayerInfo``) or ``attn`` / ``mlp``.
      block: transformer block index.
      layers: module paths of the linear layers the unit covers.
      numel: dense weight count of those layers together.
      flops_per_token: dense multiply-accumulates per token of those layers together, for
        a token that reaches them.
      routing_frequency: mean over the unit's layers of the fraction of tokens that reach
        each: 1 for dense layers; for a mixture-of-experts expert, the share of calibration
        tokens routed to it (measured when the supernet is built). A unit below 1 has
        layers of equal shape, so its expected MACs per token are
        ``flops_per_token * routing_frequency``.
    """

    name: str
    role: str
    block: int
    layers: tuple[str, ...]
    numel: int
    flops_per_token: int
    routing_frequency: float = 1.0


@dataclass(frozen=True, eq=False)
class SupernetSpec:
    """Units x levels table.

    Attributes:
      units: the L units in forward order.
      sparsity: float64[L, K], fraction of the unit's weights removed at each level
        (0 = dense); ``nan`` where ``valid`` is False. Increasing along K.
      valid: bool[L, K]; True for real levels (a contiguous prefix of each row).
      center: int32[L], the level a uniform allocation at the target picks.
      structure: one of :data:`STRUCTURES`; ``nm`` levels are N:M patterns.
      level_labels: optional per-unit, per-level labels (e.g. ``"2:4"`` or ``"6 heads"``).
    """

    units: tuple[Unit, ...]
    sparsity: np.ndarray
    valid: np.ndarray
    center: np.ndarray
    structure: str = "unstructured"
    level_labels: tuple[tuple[str, ...], ...] | None = field(default=None)

    def __post_init__(self) -> None:
        L = len(self.units)
        if self.sparsity.ndim != 2 or self.sparsity.shape[0] != L:
            raise ValueError(f"sparsity must be [L={L}, K], got {self.sparsity.shape}")
        if self.valid.shape != self.sparsity.shape:
            raise ValueError(f"valid {self.valid.shape} != sparsity {self.sparsity.shape}")
        if self.center.shape != (L,):
            raise ValueError(f"center must be [L={L}], got {self.center.shape}")
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure {self.structure!r} not in {STRUCTURES}")
        n_valid = self.valid.sum(axis=1)
        if np.any(n_valid < 1):
            bad = [self.units[i].name for i in np.flatnonzero(n_valid < 1)]
            raise ValueError(f"units with no valid level: {bad}")
        prefix = np.arange(self.sparsity.shape[1])[None, :] < n_valid[:, None]
        if not np.array_equal(prefix, self.valid):
            raise ValueError("valid levels must be a contiguous prefix of each row")
        s = np.where(self.valid, self.sparsity, 0.0)
        if np.any(s < 0) or np.any(s > 1):
            raise ValueError("sparsities must lie in [0, 1]")
        steps = np.diff(np.where(self.valid, self.sparsity, 0.0), axis=1)
        if np.any(steps[self.valid[:, 1:]] <= 0):
            raise ValueError("sparsities must increase strictly with the level index")
        if np.any(self.center < 0) or np.any(self.center >= n_valid):
            raise ValueError("center level outside the valid levels")

    @property
    def num_units(self) -> int:
        return len(self.units)

    @property
    def num_levels(self) -> np.ndarray:
        """int32[L]: number of valid levels per unit."""
        return self.valid.sum(axis=1).astype(np.int32)

    @property
    def numel(self) -> np.ndarray:
        """int64[L]: dense weight count per unit."""
        return np.array([u.numel for u in self.units], dtype=np.int64)

    @property
    def flops_per_token(self) -> np.ndarray:
        """float64[L]: dense MACs per token per unit, experts' weighted by their routing
        frequency (the expected MACs of an average token)."""
        return np.array(
            [u.flops_per_token * u.routing_frequency for u in self.units], dtype=np.float64
        )

    def kept_params(self) -> np.ndarray:
        """float64[L, K]: weights kept at each level (``inf`` at invalid levels)."""
        kept = self.numel[:, None] * (1.0 - self.sparsity)
        return np.where(self.valid, kept, np.inf)

    def kept_flops(self) -> np.ndarray:
        """float64[L, K]: MACs per token kept at each level (``inf`` at invalid levels)."""
        kept = self.flops_per_token[:, None] * (1.0 - self.sparsity)
        return np.where(self.valid, kept, np.inf)

    def sparsities_of(self, choice: np.ndarray) -> np.ndarray:
        """float64[L]: per-unit sparsity of a level vector ``choice`` (int[L])."""
        choice = np.asarray(choice)
        return self.sparsity[np.arange(self.num_units), choice]
