"""The local pruner :func:`~allocsearch.recipe.apply.apply_recipe` re-runs without a
store: checked against the recipe's structure, and the calibration data it needs."""

from __future__ import annotations

from typing import Any, Final

import numpy as np

from allocsearch.data.tokenset import TokenSet
from allocsearch.pruners.magnitude import MagnitudePruner
from allocsearch.pruners.nm import NMMagnitudePruner
from allocsearch.recipe.recipe import Recipe

_STRUCTURED: Final = frozenset({"heads", "neurons", "heads_neurons"})
# Pruners whose variants depend on the weights only; they get a placeholder token set.
_NEEDS_NO_DATA: Final = (MagnitudePruner, NMMagnitudePruner)


def _pruner_name(pruner: Any) -> str:
    """``pruner.name`` of a pruner, a pruner class or a ``functools.partial`` of one."""
    target = getattr(pruner, "func", pruner)
    return str(getattr(target, "name", None) or getattr(target, "__name__", repr(pruner)))


def _check_pruner(recipe: Recipe, pruner: Any) -> None:
    structured = recipe.structure in _STRUCTURED
    if pruner is None:
        options = (
            "StructuredPruner (or functools.partial(StructuredPruner, percdamp=...))"
            if structured
            else "MagnitudePruner(), WandaPruner(), SparseGPTPruner()"
            if recipe.structure == "unstructured"
            else "NMMagnitudePruner(m=...), NMWandaPruner(m=...), NMSparseGPTPruner(m=...)"
        )
        raise ValueError(
            f"without a store, apply_recipe re-runs a local pruner: pass store=<the supernet "
            f"the recipe was searched on> or pruner=, e.g. {options}"
        )
    if recipe.structure == "nm":
        ms = sorted({x.m for x in recipe.layers})
        if len(ms) != 1:
            raise ValueError(
                f"the recipe mixes N:M group sizes {ms}; one pruner handles one M, so apply "
                f"it with its store, or split it by group size"
            )
        if getattr(pruner, "m", None) != ms[0]:
            raise ValueError(
                f"the recipe is N:M with M={ms[0]}, so the pruner must be an N:M pruner with "
                f"m={ms[0]} (NMMagnitudePruner, NMWandaPruner, NMSparseGPTPruner), got {pruner!r}"
            )
    elif recipe.structure == "unstructured" and hasattr(pruner, "m"):
        raise ValueError(
            f"the recipe is unstructured but {pruner!r} is an N:M pruner; use "
            f"MagnitudePruner(), WandaPruner() or SparseGPTPruner()"
        )


def _calibration_for(pruner: Any, calibration: TokenSet | None) -> TokenSet:
    if calibration is not None:
        return calibration
    if isinstance(pruner, _NEEDS_NO_DATA):
        # The builder still runs the model to capture statistics; the pruner ignores them.
        return TokenSet(
            tokens=np.zeros((1, 2), np.int32),
            source="placeholder (the pruner uses no calibration data)",
            tokenizer_identity="none",
            seed=None,
        )
    raise ValueError(
        f"the {_pruner_name(pruner)} pruner needs calibration data: pass "
        f"calibration=<TokenSet> (the calibration set the recipe was searched with "
        f"reproduces its weights); only MagnitudePruner and NMMagnitudePruner run without one"
    )
