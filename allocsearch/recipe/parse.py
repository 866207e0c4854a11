"""Recipe JSON parsing: a recipe's JSON object (schema v1 or v2) checked field by field."""

from __future__ import annotations

from typing import Any

from allocsearch.recipe.coerce import RecipeError, _as_float, _as_tuple, _kind
from allocsearch.recipe.recipe import (
    _EXACT_TOL,
    Calibration,
    Fitness,
    LayerEntry,
    ModelIdentity,
    Provenance,
    Recipe,
    RecipeBudget,
    StructuredUnit,
    check_schema_version,
)
from allocsearch.recipe.records import FITNESS_SPLIT_FIELDS


def _reject_constant(name: str) -> Any:
    raise RecipeError(f"non-finite number {name} in recipe JSON; valid values are finite numbers")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise RecipeError(f"duplicate JSON key {key!r}")
        out[key] = value
    return out


# ----------------------------------------------------------------------------- parsing


def _fields(
    value: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Check ``value`` is an object with exactly the known fields; return it."""
    if not isinstance(value, dict):
        raise RecipeError(f"{where} must be a JSON object, got {_kind(value)} {value!r:.80}")
    unknown = sorted(set(value) - set(required) - set(optional))
    if unknown:
        raise RecipeError(
            f"{where}: unknown field(s) {unknown}; valid fields: {list(required + optional)}"
        )
    missing = [k for k in required if k not in value]
    if missing:
        raise RecipeError(f"{where}: missing field(s) {missing}")
    return value


def _parse_recipe(data: Any) -> Recipe:
    top = (
        "schema_version",
        "naming",
        "model",
        "structure",
        "partial",
        "budget",
        "provenance",
        "layers",
        "units",
    )
    if isinstance(data, dict) and "schema_version" in data:
        # Check the version first so a future file gets the helpful message, not
        # "unknown field".
        check_schema_version(data["schema_version"])
    d = _fields(data, "recipe", top)
    m = _fields(d["model"], "model", ("name_or_path", "architecture", "model_type", "fingerprint"))
    b = _fields(d["budget"], "budget", ("kind", "target", "achieved"))
    p = _fields(
        d["provenance"],
        "provenance",
        (
            "strategy",
            "settings",
            "fitness",
            "calibration",
            "tool_version",
            "wall_time_s",
            "evaluations",
        ),
    )
    f = _fields(p["fitness"], "provenance.fitness", ("metric", "value"), FITNESS_SPLIT_FIELDS)
    c = _fields(p["calibration"], "provenance.calibration", ("description", "fingerprint", "seed"))
    if not isinstance(p["settings"], dict):
        raise RecipeError(f"provenance.settings must be a JSON object, got {_kind(p['settings'])}")
    layers = _parse_layers(d["layers"])
    units = _parse_units(d["units"])
    return Recipe(
        schema_version=d["schema_version"],
        naming=d["naming"],
        model=ModelIdentity(
            name_or_path=m["name_or_path"],
            architecture=m["architecture"],
            model_type=m["model_type"],
            fingerprint=m["fingerprint"],
        ),
        structure=d["structure"],
        partial=d["partial"],
        budget=RecipeBudget(kind=b["kind"], target=b["target"], achieved=b["achieved"]),
        provenance=Provenance(
            strategy=p["strategy"],
            settings=p["settings"],
            fitness=Fitness(**f),
            calibration=Calibration(
                description=c["description"], fingerprint=c["fingerprint"], seed=c["seed"]
            ),
            tool_version=p["tool_version"],
            wall_time_s=p["wall_time_s"],
            evaluations=p["evaluations"],
        ),
        layers=layers,
        units=units,
    )


def _parse_layers(value: Any) -> tuple[LayerEntry, ...]:
    """The recipe's ``layers`` array as :class:`LayerEntry` records."""
    layers = []
    for i, item in enumerate(_as_tuple(value, "layers")):
        x = _fields(
            item,
            f"layers[{i}]",
            ("name", "role", "block", "shape", "sparsity", "structure"),
            ("n", "m", "routing_frequency", "bits", "group_size", "symmetric"),
        )
        if x["structure"] != "nm" and ("n" in x or "m" in x):
            raise RecipeError(f"layers[{i}]: fields n/m are only valid with structure 'nm'")
        layers.append(
            LayerEntry(
                name=x["name"],
                role=x["role"],
                block=x["block"],
                shape=x["shape"],
                sparsity=x["sparsity"],
                structure=x["structure"],
                n=x.get("n"),
                m=x.get("m"),
                routing_frequency=x.get("routing_frequency", 1.0),
                bits=x.get("bits"),
                group_size=x.get("group_size"),
                symmetric=x.get("symmetric"),
            )
        )
    return tuple(layers)


def _parse_units(value: Any) -> tuple[StructuredUnit, ...]:
    """The recipe's ``units`` array, each unit's stated fraction checked against
    removed/total."""
    units = []
    for i, item in enumerate(_as_tuple(value, "units")):
        u = _fields(
            item, f"units[{i}]", ("name", "kind", "block", "removed", "total", "fraction", "layers")
        )
        unit = StructuredUnit(
            name=u["name"],
            kind=u["kind"],
            block=u["block"],
            removed=u["removed"],
            total=u["total"],
            layers=u["layers"],
        )
        stated = _as_float(u["fraction"], f"units[{i}] ({unit.name}).fraction", lo=0.0, hi=1.0)
        if abs(stated - unit.fraction) > _EXACT_TOL:
            raise RecipeError(
                f"units[{i}] ({unit.name}).fraction = {stated!r} but removed/total = "
                f"{unit.removed}/{unit.total} = {unit.fraction!r}"
            )
        units.append(unit)
    return tuple(units)
