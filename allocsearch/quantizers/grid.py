"""The quantization grid: integer codes with per-group scales (and zero points) along the input.

Conventions (shared by every quantizer in this package):

* A weight is ``float[out, in]`` (Hugging Face ``nn.Linear``, as the pruners). Groups run
  along the *input* dimension: group ``g`` of row ``r`` holds columns
  ``[g * group_size, min((g + 1) * group_size, in))``. There are
  ``G = ceil(in / group_size)`` groups per row; when ``group_size`` does not divide ``in``
  the last group is *partial* (``in % group_size`` columns) and has its own scale. A
  ``group_size >= in`` gives one group per row (per-channel quantization).
* Codes are unsigned integers in ``[0, 2^bits - 1]`` (``uint8[out, in]``), and a weight is
  ``scale * (code - zero)``. Scales are ``float32[out, G]`` holding values exactly
  representable in float16 (the store keeps them as float16; :data:`SCALE_DTYPE`), zero
  points are ``uint8[out, G]`` in ``[0, 2^bits - 1]``.
* Asymmetric (scale + zero point, as GPTQ): the group's range is widened to include 0,
  ``[min(w, 0), max(w, 0)]``; ``scale = (max - min) / (2^b - 1)``,
  ``zero = round(-min / scale)``. Zero is exactly representable.
* Symmetric (scale only; GPTQ's and compressed-tensors' convention): codes are signed
  integers in ``[-2^(b-1), 2^(b-1) - 1]`` stored offset by ``2^(b-1)``, so the zero point is
  the constant ``2^(b-1)``; ``scale = 2 max|w| / (2^b - 1)``. The grid is one step wider on
  the negative side, so ``+max|w|`` rounds to ``2^(b-1) - 1`` steps.
* A group that is all zeros gets scale 1 (its codes are its zero point, dequantizing to 0).
* The scale is rounded to float16 *before* codes are computed, so what the store keeps
  reproduces the variant exactly. Rounding is half to even (``np.rint``, as ``torch.round``
  and ``jnp.round``).
* Bitwidths: 2 to 8 (:data:`MIN_BITS`, :data:`MAX_BITS`); codes fit one byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

MIN_BITS: Final[int] = 2
MAX_BITS: Final[int] = 8
SCALE_DTYPE: Final = np.float16
"""dtype the store keeps scales in; grid scales are rounded to it."""
_SCALE_TINY: Final[float] = float(np.finfo(np.float16).smallest_subnormal)
_SCALE_MAX: Final[float] = float(np.finfo(np.float16).max)


def check_bits(bits: object) -> int:
    """``bits`` as an int after checking it is a whole number in [MIN_BITS, MAX_BITS]."""
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer):
        raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return int(bits)


def check_group_size(group_size: object) -> int:
    """``group_size`` as an int after checking it is a positive whole number."""
    if isinstance(group_size, bool) or not isinstance(group_size, int | np.integer):
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if int(group_size) < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    return int(group_size)


@dataclass(frozen=True)
class QuantLevel:
    """One quantization level: what a variant is quantized to.

    Attributes:
      bits: bits per code, in [MIN_BITS, MAX_BITS].
      group_size: input columns sharing one scale (and zero point); 128 by default.
      symmetric: True for scale only (zero point fixed at ``2^(bits-1)``), False for a
        stored zero point per group.
    """

    bits: int
    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_group_size(self.group_size)
        if not isinstance(self.symmetric, bool | np.bool_):
            raise ValueError(f"symmetric must be a bool, got {self.symmetric!r}")

    @property
    def maxq(self) -> int:
        """Largest code, ``2^bits - 1``."""
        return (1 << self.bits) - 1

    def n_groups(self, in_features: int) -> int:
        """Groups per row of a weight with ``in_features`` columns."""
        return -(-int(in_features) // self.group_size)


class QuantizedWeight(NamedTuple):
    """A weight on the grid: ``weight = scale * (code - zero)`` groupwise.

    Attributes:
      codes: uint8[out, in] in ``[0, 2^bits - 1]``.
      scales: float32[out, G], float16-representable, positive.
      zeros: uint8[out, G]; the constant ``2^(bits-1)`` when symmetric.
    """

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray


def expand_groups(a: np.ndarray, group_size: int, in_features: int) -> np.ndarray:
    """[out, in]: a per-group array ``a`` [out, G] repeated over each group's columns."""
    return np.repeat(a, group_size, axis=1)[:, :in_features]


def _round_scale(scale: np.ndarray) -> np.ndarray:
    """float32 scales rounded to float16 values (tiny positives kept at the smallest
    float16 subnormal, so no scale becomes 0); refuses scales float16 cannot hold."""
    if np.any(scale > _SCALE_MAX):
        raise ValueError(
            f"a group's scale {float(scale.max())!r} exceeds float16's range ({_SCALE_MAX}); "
            f"weights this large cannot be stored with float16 scales"
        )
    return np.maximum(scale, _SCALE_TINY).astype(SCALE_DTYPE).astype(np.float32)


def scale_zero_from_range(
    lo: np.ndarray, hi: np.ndarray, level: QuantLevel
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of groups whose weights span ``[lo, hi]`` (any equal shapes).

    Returns:
      (float32 scales, float16-representable; uint8 zero points), shaped like ``lo``.
    """
    lo = np.minimum(np.asarray(lo, np.float32), 0.0)
    hi = np.maximum(np.asarray(hi, np.float32), 0.0)
    if level.symmetric:
        amax = np.maximum(-lo, hi)
        scale = np.where(amax == 0, 1.0, 2.0 * amax / level.maxq).astype(np.float32)
        scale = _round_scale(scale)
        zero = np.full(scale.shape, 1 << (level.bits - 1), np.uint8)
        return scale, zero
    scale = np.where(hi == lo, 1.0, (hi - lo) / level.maxq).astype(np.float32)
    scale = _round_scale(scale)
    zero = np.clip(np.rint(-lo / scale), 0, level.maxq).astype(np.uint8)
    return scale, zero


def group_params(weight: ArrayLike, level: QuantLevel) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest scales and zero points of every group of ``weight`` [out, in].

    Returns:
      (scales float32[out, G], zeros uint8[out, G]); see the module docstring.
    """
    w = check_matrix(weight)
    out, n_in = w.shape
    g = level.n_groups(n_in)
    padded = np.zeros((out, g * level.group_size), np.float32)
    padded[:, :n_in] = w  # padding zeros leave min(w, 0) and max(w, 0) unchanged
    grouped = padded.reshape(out, g, level.group_size)
    return scale_zero_from_range(grouped.min(axis=2), grouped.max(axis=2), level)


def quantize_codes(
    weight: ArrayLike, scales: np.ndarray, zeros: np.ndarray, level: QuantLevel
) -> np.ndarray:
    """uint8[out, in]: codes ``clip(round(w / scale) + zero, 0, 2^bits - 1)`` of ``weight``
    [out, in] under given per-group ``scales`` and ``zeros`` [out, G]."""
    w = check_matrix(weight)
    n_in = w.shape[1]
    s = expand_groups(np.asarray(scales, np.float32), level.group_size, n_in)
    z = expand_groups(np.asarray(zeros, np.float32), level.group_size, n_in)
    return np.clip(np.rint(w / s) + z, 0, level.maxq).astype(np.uint8)


def quantize(weight: ArrayLike, level: QuantLevel) -> QuantizedWeight:
    """Round-to-nearest quantization of ``weight`` float[out, in] to ``level``."""
    scales, zeros = group_params(weight, level)
    return QuantizedWeight(quantize_codes(weight, scales, zeros, level), scales, zeros)


def dequantize(
    codes: ArrayLike, scales: ArrayLike, zeros: ArrayLike, *, group_size: int
) -> np.ndarray:
    """float32[out, in]: ``scale * (code - zero)`` of codes uint[out, in] with per-group
    ``scales`` and ``zeros`` [out, G]."""
    c = np.asarray(codes)
    n_in = c.shape[1]
    s = expand_groups(np.asarray(scales, np.float32), group_size, n_in)
    z = expand_groups(np.asarray(zeros, np.float32), group_size, n_in)
    return s * (c.astype(np.float32) - z)


def check_matrix(weight: ArrayLike) -> np.ndarray:
    """The weight as float32[out, in] after checking it is a finite, non-empty matrix."""
    w = np.asarray(weight, np.float32)
    if w.ndim != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"weight must be a non-empty (out, in) matrix, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weight contains NaN or infinite values")
    return w
