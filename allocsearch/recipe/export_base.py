"""What every exporter returns (:class:`Export`), its error, and the checks exporters share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from allocsearch.recipe.depth import dropped_units
from allocsearch.recipe.experts import removed_experts
from allocsearch.recipe.recipe import BUDGET_RTOL, Recipe, fraction_removed

T = TypeVar("T")


class ExportError(ValueError):
    """A recipe cannot be exported to the requested format; the message says why."""


@dataclass(frozen=True)
class Export(Generic[T]):
    """Result of an exporter.

    Attributes:
      content: the exported text, dict or list.
      notes: human-readable notes: what was averaged or dropped, what the target tool
        cannot express, and the budget check.
      budget_kind: the cost the budget check used (``"params"`` or ``"flops"``; a latency
        recipe is checked on params, as latency cannot be recomputed from shapes).
      budget_recipe: fraction of that cost the recipe removes.
      budget_exported: fraction of that cost the exported values remove.
    """

    content: T
    notes: tuple[str, ...]
    budget_kind: str
    budget_recipe: float
    budget_exported: float

    @property
    def budget_error(self) -> float:
        """``budget_exported - budget_recipe`` (positive: the export prunes more)."""
        return self.budget_exported - self.budget_recipe


# ----------------------------------------------------------------------------- helpers


def _budget_check(
    recipe: Recipe, exported: Callable[[str], float], what: str
) -> tuple[str, float, float, list[str]]:
    """Compare the budget the exported values give with the recipe's.

    ``exported(kind)`` returns the fraction of the ``kind`` cost the exported values
    remove. Returns (kind, recipe fraction, exported fraction, notes).
    """
    notes: list[str] = []
    kind = recipe.budget.kind
    if kind in ("latency", "sublayers"):
        notes.append(
            f"the recipe's budget is {kind}, which cannot be recomputed from shapes; the "
            f"budget check below compares the fraction of parameters removed instead"
        )
        kind = "params"
        reference = fraction_removed(recipe.layers, "params")
    else:
        reference = recipe.budget.achieved
    got = exported(kind)
    diff = got - reference
    if abs(diff) <= BUDGET_RTOL * max(abs(reference), abs(got)) + 1e-15:
        notes.append(
            f"budget check: {what} removes {got:.6f} of the {kind}, as the recipe does "
            f"({reference:.6f}; difference {diff:+.1e})"
        )
    else:
        notes.append(
            f"budget check: {what} removes {got:.6f} of the {kind} instead of the recipe's "
            f"{reference:.6f} (difference {diff:+.6f}, {100 * diff / max(reference, 1e-12):+.2f}% "
            f"relative)"
        )
    return kind, reference, got, notes


def _layer_budget(recipe: Recipe, per_layer: np.ndarray) -> Callable[[str], float]:
    return lambda kind: fraction_removed(recipe.layers, kind, per_layer)


def _refuse_depth(recipe: Recipe, target: str) -> None:
    """Raise when ``recipe`` drops sublayers, which ``target`` cannot express."""
    dropped = dropped_units(recipe)
    if dropped:
        more = f" (and {len(dropped) - 1} more)" if len(dropped) > 1 else ""
        raise ExportError(
            f"{target} cannot remove a whole sublayer; the recipe drops {dropped[0].name!r}"
            f"{more}. Use --format evopress (its depth format) or `allocsearch apply`"
        )


def _refuse_removed_experts(recipe: Recipe, target: str) -> None:
    """Raise when ``recipe`` removes whole experts, which ``target`` cannot express (its
    router would still route tokens to a zero expert), or prunes a router (transformers 5's
    routers are not ``nn.Linear`` modules, which the target's modifiers prune)."""
    removed = [e for v in removed_experts(recipe).values() for e in v]
    if removed:
        more = f" (and {len(removed) - 1} more)" if len(removed) > 1 else ""
        raise ExportError(
            f"{target} cannot remove a whole expert (the router would still route tokens to "
            f"it); the recipe removes {removed[0]!r}{more}. Use `allocsearch apply`"
        )
    routers = [x.name for x in recipe.layers if x.role == "router" and x.sparsity > 0]
    if routers:
        raise ExportError(
            f"{target} prunes Linear modules; transformers' MoE router is not one, and the "
            f"recipe prunes router {routers[0]!r}. Use `allocsearch apply`"
        )
