"""Recipe field coercion: JSON and numpy scalars checked and turned into plain Python values."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


class RecipeError(ValueError):
    """A recipe (object, JSON text or file) is invalid; the message says what and why."""


# ----------------------------------------------------------------------------- coercion
# Each helper accepts Python and numpy scalars, rejects bool where a number is expected,
# and returns a plain Python value so that equality and JSON round trips are exact.


def _kind(value: Any) -> str:
    return type(value).__name__


def _as_str(value: Any, what: str, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise RecipeError(f"{what} must be a string, got {_kind(value)} {value!r}")
    if not empty_ok and not value:
        raise RecipeError(f"{what} must be a non-empty string")
    return value


def _as_int(value: Any, what: str, *, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise RecipeError(f"{what} must be an integer, got {_kind(value)} {value!r}")
    out = int(value)
    if (lo is not None and out < lo) or (hi is not None and out > hi):
        lo_s = "-inf" if lo is None else str(lo)
        hi_s = "inf" if hi is None else str(hi)
        raise RecipeError(f"{what} = {out} is outside the valid range [{lo_s}, {hi_s}]")
    return out


def _as_float(value: Any, what: str, *, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise RecipeError(f"{what} must be a number, got {_kind(value)} {value!r}")
    try:
        out = float(value)
    except OverflowError:
        raise RecipeError(f"{what} = {value!r} is too large to be a finite float") from None
    if not math.isfinite(out):
        raise RecipeError(f"{what} = {out!r} is not finite; valid values are finite numbers")
    if (lo is not None and out < lo) or (hi is not None and out > hi):
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise RecipeError(f"{what} = {out!r} is outside [{lo_s}, {hi_s}]")
    return out


def _as_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise RecipeError(f"{what} must be true or false, got {_kind(value)} {value!r}")
    return bool(value)


def _as_tuple(value: Any, what: str) -> tuple:
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return tuple(value)
    if not isinstance(value, list | tuple):
        raise RecipeError(f"{what} must be a list, got {_kind(value)} {value!r}")
    return tuple(value)


def _json_default(obj: Any) -> Any:
    """Lets numpy scalars / arrays appear in strategy settings."""
    if isinstance(obj, np.generic | np.ndarray):
        return obj.tolist()
    raise TypeError(f"{_kind(obj)} is not JSON serialisable")


def _normalise_json_value(value: Any, what: str) -> Any:
    """Return ``value`` as it reads back from JSON (tuples -> lists, numpy -> Python)."""
    try:
        text = json.dumps(value, allow_nan=False, default=_json_default, sort_keys=False)
    except (TypeError, ValueError, RecursionError) as err:
        raise RecipeError(
            f"{what} must hold only JSON values (dict, list, str, finite number, bool, null): {err}"
        ) from None
    return json.loads(text)


def _isclose_rel(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b)) + 1e-15
