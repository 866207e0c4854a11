"""What a quantized level costs: bits per weight (scales and zero points counted) and bytes.

These are the per-level costs a ``bits`` or ``bytes`` budget reads. Counts are exact for
the packed layout of :mod:`allocsearch.quantizers.packing`, including a partial last group
(its scale costs as much as a full group's) and the padding of codes to chunks of 8.

* bits of a level of an ``[out, in]`` weight:
  ``b * out * in + 16 * out * G (+ b * out * G asymmetric)``, ``G = ceil(in / group_size)``,
  i.e. ``b + 16 / group_size (+ b / group_size)`` per weight when groups divide ``in``
  (REFERENCES.md, "Quantization levels").
* bytes: what the store keeps, :func:`packed_bytes` (equal to ``PackedWeight.nbytes``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from allocsearch.quantizers.grid import QuantLevel
from allocsearch.quantizers.packing import packed_code_bytes

SCALE_BITS = 16
"""Bits of one stored scale (float16)."""

_LABEL = re.compile(r"(?P<bits>\d+)b g(?P<group>\d+) (?P<sym>sym|asym)")


def _shape(shape: Sequence[int]) -> tuple[int, int]:
    out, n_in = (int(x) for x in shape)
    if out < 1 or n_in < 1:
        raise ValueError(f"a weight shape must be (out, in) with both positive, got {shape!r}")
    return out, n_in


def level_bits(level: QuantLevel, shape: Sequence[int]) -> int:
    """Bits of one level of an ``(out, in)`` weight: codes, scales and zero points (no
    padding); lower is cheaper."""
    out, n_in = _shape(shape)
    groups = out * level.n_groups(n_in)
    zero_bits = 0 if level.symmetric else level.bits
    return level.bits * out * n_in + (SCALE_BITS + zero_bits) * groups


def bits_per_weight(level: QuantLevel, shape: Sequence[int]) -> float:
    """Average bits per weight of one level of an ``(out, in)`` weight, scales and zero
    points counted: ``bits + 16 / group_size (+ bits / group_size)`` for whole groups."""
    out, n_in = _shape(shape)
    return level_bits(level, shape) / (out * n_in)


def packed_bytes(level: QuantLevel, shape: Sequence[int]) -> int:
    """Bytes the store keeps for one level of an ``(out, in)`` weight (codes padded to
    chunks of 8, float16 scales, packed zero points when asymmetric)."""
    out, n_in = _shape(shape)
    groups = out * level.n_groups(n_in)
    zeros = 0 if level.symmetric else packed_code_bytes(groups, level.bits)
    return packed_code_bytes(out * n_in, level.bits) + 2 * groups + zeros


class QuantCosts(NamedTuple):
    """Cost tables of quantized levels, in the layout budgets use (units x levels).

    Attributes:
      bits: float64[L, K], bits each unit keeps at each level (codes, scales, zeros).
      bytes: float64[L, K], packed bytes each unit's variants take at each level.
      bits_per_weight: float64[L, K], ``bits / numel``.
    """

    bits: np.ndarray
    bytes: np.ndarray
    bits_per_weight: np.ndarray


def quant_cost_tables(
    unit_shapes: Sequence[Sequence[Sequence[int]]], levels: Sequence[QuantLevel]
) -> QuantCosts:
    """Costs of every unit at every level.

    Args:
      unit_shapes: for each of the ``L`` units, the ``(out, in)`` shapes of its layers
        (one layer per unit for per-layer bitwidths).
      levels: the ``K`` levels every unit is quantized to.

    Returns:
      :class:`QuantCosts`; lower is cheaper in every table.
    """
    if not levels:
        raise ValueError("levels must be a non-empty list of QuantLevel")
    bits = np.zeros((len(unit_shapes), len(levels)))
    nbytes = np.zeros_like(bits)
    numel = np.zeros(len(unit_shapes))
    for u, shapes in enumerate(unit_shapes):
        if not shapes:
            raise ValueError(f"unit {u} has no layer shapes")
        numel[u] = sum(_shape(s)[0] * _shape(s)[1] for s in shapes)
        for k, level in enumerate(levels):
            bits[u, k] = sum(level_bits(level, s) for s in shapes)
            nbytes[u, k] = sum(packed_bytes(level, s) for s in shapes)
    return QuantCosts(bits, nbytes, bits / numel[:, None])


def level_label(level: QuantLevel) -> str:
    """Short label of a level, e.g. ``"4b g128 sym"`` (the spec's level labels)."""
    return f"{level.bits}b g{level.group_size} {'sym' if level.symmetric else 'asym'}"


def level_from_label(label: str) -> QuantLevel | None:
    """The level a :func:`level_label` label names, or None for any other label (a
    sparsity level's ``"2:4"`` or ``"50%"``)."""
    m = _LABEL.fullmatch(label.strip()) if isinstance(label, str) else None
    if m is None:
        return None
    return QuantLevel(int(m["bits"]), int(m["group"]), m["sym"] == "sym")


def spec_quant_levels(
    level_labels: Sequence[Sequence[str]] | None,
) -> list[list[QuantLevel]] | None:
    """Per unit, the quantization level of each (valid) level, from a spec's
    ``level_labels``; None unless every label names one (a quantized supernet's spec)."""
    if not level_labels:
        return None
    out = []
    for row in level_labels:
        levels = [level_from_label(x) for x in row]
        if not levels or any(lv is None for lv in levels):
            return None
        out.append(levels)
    return out


def level_to_json(level: QuantLevel) -> dict[str, Any]:
    """The level as the JSON a store manifest or recipe would hold."""
    return {"bits": level.bits, "group_size": level.group_size, "symmetric": level.symmetric}


def level_from_json(d: Mapping[str, Any]) -> QuantLevel:
    """The level from :func:`level_to_json`'s JSON; a clear error for missing or extra keys."""
    keys = {"bits", "group_size", "symmetric"}
    if not isinstance(d, Mapping) or set(d) != keys:
        raise ValueError(f"a quantization level needs exactly the keys {sorted(keys)}, got {d!r}")
    return QuantLevel(d["bits"], d["group_size"], d["symmetric"])
