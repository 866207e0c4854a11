"""Whether a recipe belongs to a model: fingerprint, layer names, shapes, roles, order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from allocsearch.models.layers import LayerInfo
from allocsearch.recipe.coerce import RecipeError

if TYPE_CHECKING:
    from allocsearch.recipe.recipe import Recipe


def check_against_model(recipe: Recipe, layers: Sequence[LayerInfo], fingerprint: str) -> None:
    """Check that ``recipe`` was made for this model; raise :class:`RecipeError` if not.

    Args:
      recipe: the recipe to apply or export.
      layers: the model's prunable layers in forward order (from its ``ModelAdapter``).
      fingerprint: the model's fingerprint, compared with ``recipe.model.fingerprint``.

    Raises:
      RecipeError: fingerprint mismatch; a recipe layer the model does not have; a layer
        whose shape, role or block differ; recipe layers out of the model's order.
    """
    if fingerprint != recipe.model.fingerprint:
        raise RecipeError(
            f"model fingerprint {fingerprint!r} does not match the recipe's "
            f"{recipe.model.fingerprint!r} (recipe made for {recipe.model.name_or_path!r}); "
            f"the recipe belongs to other weights"
        )
    position = {info.name: i for i, info in enumerate(layers)}
    by_name = {info.name: info for info in layers}
    last = -1
    for entry in recipe.layers:
        info = by_name.get(entry.name)
        if info is None:
            near = [n for n in position if n.rsplit(".", 1)[-1] == entry.name.rsplit(".", 1)[-1]]
            hint = f"; model layers with the same leaf name: {near[:3]}" if near else ""
            raise RecipeError(f"recipe layer {entry.name!r} is not a layer of the model{hint}")
        if tuple(info.shape) != entry.shape:
            raise RecipeError(
                f"layer {entry.name!r}: recipe shape {list(entry.shape)} != model shape "
                f"{list(info.shape)} (out_features, in_features)"
            )
        if info.role != entry.role or info.block != entry.block:
            raise RecipeError(
                f"layer {entry.name!r}: recipe role/block {entry.role}/{entry.block} != model "
                f"{info.role}/{info.block}"
            )
        if position[entry.name] < last:
            raise RecipeError(
                f"layer {entry.name!r} comes after a later model layer in the recipe; recipe "
                f"layers must follow the model's forward order"
            )
        last = position[entry.name]
