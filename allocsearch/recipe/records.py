"""Recipe provenance records: which model, how it was scored, on what data, by which search."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from allocsearch.recipe.coerce import (
    RecipeError,
    _as_float,
    _as_int,
    _as_str,
    _kind,
    _normalise_json_value,
)


@dataclass(frozen=True)
class ModelIdentity:
    """Which model a recipe belongs to.

    Attributes:
      name_or_path: local path or hub name the model was loaded from.
      architecture: Hugging Face class name, e.g. ``"LlamaForCausalLM"``.
      model_type: Hugging Face ``config.model_type``, e.g. ``"llama"``.
      fingerprint: a stable hash of the dense weights (and config) computed by the model
        loader; :func:`check_against_model` compares it with the model at hand.
    """

    name_or_path: str
    architecture: str
    model_type: str
    fingerprint: str

    def __post_init__(self) -> None:
        for attr in ("name_or_path", "architecture", "model_type", "fingerprint"):
            _as_str(getattr(self, attr), f"model.{attr}")


@dataclass(frozen=True)
class Fitness:
    """Score of the allocation.

    Attributes:
      metric: name, e.g. ``"kl"`` (KL(dense || pruned) per token) or ``"ppl"``.
      value: the score, lower is better; ``None`` when the allocation was not scored
        (e.g. a baseline exported without evaluation).
      calibration, calibration_tokens: the metric on the whole calibration set and its
        token count (None when not measured).
      validation, validation_tokens: the metric on the validation rows, which the search
        never scored but to pick its final allocation (None without validation rows).
    """

    metric: str
    value: float | None
    calibration: float | None = None
    calibration_tokens: int | None = None
    validation: float | None = None
    validation_tokens: int | None = None

    def __post_init__(self) -> None:
        _as_str(self.metric, "provenance.fitness.metric")
        for key in ("value", "calibration", "validation"):
            if getattr(self, key) is not None:
                value = _as_float(getattr(self, key), f"provenance.fitness.{key}")
                object.__setattr__(self, key, value)
        for key in ("calibration_tokens", "validation_tokens"):
            if getattr(self, key) is not None:
                value = _as_int(getattr(self, key), f"provenance.fitness.{key}", lo=0)
                object.__setattr__(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        """JSON fields: metric and value, and the split scores that were measured."""
        out: dict[str, Any] = {"metric": self.metric, "value": self.value}
        for key in FITNESS_SPLIT_FIELDS:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


FITNESS_SPLIT_FIELDS = ("calibration", "calibration_tokens", "validation", "validation_tokens")


@dataclass(frozen=True)
class Calibration:
    """Calibration data the search scored on.

    Attributes:
      description: human-readable source (files, split, sequence length, token count).
      fingerprint: hash of the calibration tokens (``TokenSet.fingerprint``).
      seed: seed that drew the calibration sequences (>= 0).
    """

    description: str
    fingerprint: str
    seed: int

    def __post_init__(self) -> None:
        _as_str(self.description, "provenance.calibration.description", empty_ok=True)
        _as_str(self.fingerprint, "provenance.calibration.fingerprint")
        object.__setattr__(self, "seed", _as_int(self.seed, "provenance.calibration.seed", lo=0))


@dataclass(frozen=True)
class Provenance:
    """How the allocation was found.

    Attributes:
      strategy: searcher / allocator name, e.g. ``"evopress"``, ``"dp"``, ``"owl"``.
      settings: the strategy's settings as JSON values (tuples become lists and numpy
        scalars Python numbers on construction, so a file round trip is exact).
      fitness: metric and score of the allocation (lower is better).
      calibration: calibration data description, fingerprint and seed.
      tool_version: allocsearch version that wrote the recipe.
      wall_time_s: search wall-clock time in seconds (>= 0).
      evaluations: number of candidate evaluations the search used (>= 0).
    """

    strategy: str
    settings: Mapping[str, Any] = field(hash=False)  # a dict: kept out of __hash__
    fitness: Fitness
    calibration: Calibration
    tool_version: str
    wall_time_s: float
    evaluations: int

    def __post_init__(self) -> None:
        _as_str(self.strategy, "provenance.strategy")
        if not isinstance(self.settings, Mapping):
            raise RecipeError(
                f"provenance.settings must be a JSON object (dict), got {_kind(self.settings)}"
            )
        if not all(isinstance(k, str) for k in self.settings):
            raise RecipeError("provenance.settings keys must be strings")
        settings = _normalise_json_value(dict(self.settings), "provenance.settings")
        if not isinstance(self.fitness, Fitness):
            raise RecipeError(f"provenance.fitness must be a Fitness, got {_kind(self.fitness)}")
        if not isinstance(self.calibration, Calibration):
            raise RecipeError(
                f"provenance.calibration must be a Calibration, got {_kind(self.calibration)}"
            )
        _as_str(self.tool_version, "provenance.tool_version")
        wall = _as_float(self.wall_time_s, "provenance.wall_time_s", lo=0.0)
        evaluations = _as_int(self.evaluations, "provenance.evaluations", lo=0)
        object.__setattr__(self, "settings", settings)
        object.__setattr__(self, "wall_time_s", wall)
        object.__setattr__(self, "evaluations", evaluations)
