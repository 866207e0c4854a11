"""What applying a recipe produced: per-layer sparsities and parameter counts (ApplyReport)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AppliedLayer:
    """What one recipe layer became.

    Attributes:
      name: Hugging Face module path.
      role: layer role (``q``, ``down``, ...).
      block: transformer block index.
      sparsity_recipe: the recipe's sparsity (fraction of the dense weights removed).
      sparsity_applied: zero entries of the full-size pruned weight over its dense weight
        count, measured before any physical slicing (equal to ``sparsity_recipe`` unless
        the pruned weights happen to hold extra exact zeros).
      level: index of the store level applied (0 for the one-level supernet built without
        a store).
      shape: ``(out_features, in_features)`` of the weight as written (smaller than the
        dense shape after physical slicing).
    """

    name: str
    role: str
    block: int
    sparsity_recipe: float
    sparsity_applied: float
    level: int
    shape: tuple[int, int]


@dataclass(frozen=True)
class ApplyReport:
    """Summary of an applied recipe.

    Attributes:
      source: ``"store:<path>"`` or ``"pruner:<name>"`` (re-run without a store).
      structure: the recipe's structure.
      physical: True when structured matrices were made physically smaller.
      layers: one entry per recipe layer, in forward order.
      num_params_dense: parameters of the dense model's forward (tied weights once;
        checkpoint extras such as BERT's pooler excluded).
      num_params_recipe: parameters the recipe leaves: the dense count minus the weights
        its layers remove and, for structured units, the biases of their dead rows.
      num_params: parameters stored in the pruned model (zeros included). Lower = smaller.
      config_updates: config.json keys changed by physical slicing (empty otherwise).
      notes: what could not be done as asked, or deserves attention.
    """

    source: str
    structure: str
    physical: bool
    layers: tuple[AppliedLayer, ...]
    num_params_dense: int
    num_params_recipe: int
    num_params: int
    config_updates: Mapping[str, Any]
    notes: tuple[str, ...] = ()

    @property
    def padding_params(self) -> int:
        """Stored parameters above the recipe's count (``num_params - num_params_recipe``):
        the zero rows / columns that keep blocks at one width, or, without physical
        slicing, every removed weight (stored as a zero). Lower is better."""
        return self.num_params - self.num_params_recipe

    @property
    def padding_fraction(self) -> float:
        """``padding_params / num_params_recipe`` (0 = no padding; lower is better)."""
        return self.padding_params / max(self.num_params_recipe, 1)

    def summary(self) -> str:
        """A few human-readable lines (for the CLI)."""
        sliced = ", ".join(f"{k}={v}" for k, v in self.config_updates.items())
        differ = sum(x.sparsity_applied != x.sparsity_recipe for x in self.layers)
        lines = [
            f"weights from: {self.source}",
            f"structure: {self.structure}" + (f" (physically smaller: {sliced})" if sliced else ""),
            f"parameters: dense {self.num_params_dense:,}, recipe {self.num_params_recipe:,}, "
            f"stored {self.num_params:,} ({self.padding_params:,} = "
            f"{100 * self.padding_fraction:.2f}% above the recipe"
            + (", zeros kept at dense shapes)" if not self.physical else " as padding)"),
            f"layers: {len(self.layers)} pruned as the recipe says"
            + (f"; {differ} hold extra exact zeros" if differ else ""),
        ]
        return "\n".join(lines + [f"note: {note}" for note in self.notes])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (for the CLI and logs)."""
        return {
            "source": self.source,
            "structure": self.structure,
            "physical": self.physical,
            "num_params_dense": self.num_params_dense,
            "num_params_recipe": self.num_params_recipe,
            "num_params": self.num_params,
            "padding_params": self.padding_params,
            "padding_fraction": self.padding_fraction,
            "config_updates": dict(self.config_updates),
            "notes": list(self.notes),
            "layers": [
                {
                    "name": x.name,
                    "sparsity_recipe": x.sparsity_recipe,
                    "sparsity_applied": x.sparsity_applied,
                    "level": x.level,
                    "shape": list(x.shape),
                }
                for x in self.layers
            ],
        }
