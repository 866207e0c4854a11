"""The local quantizer protocol and its result type: all bitwidths of one layer at once.

A *local* quantizer turns one linear weight into several quantized variants (one per
bitwidth) from that layer's own calibration statistics, as a
:class:`~allocsearch.pruners.base.LocalPruner` does for sparsities: one call per layer,
so a Hessian factorisation is paid once and serves every level. Conventions (weight
``[out, in]``, :class:`~allocsearch.pruners.base.LayerStats` as the statistics) are the
pruners'; the grid (codes, scales, zero points, groups) is
:mod:`allocsearch.quantizers.grid`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import ArrayLike

from allocsearch.pruners.base import LayerStats
from allocsearch.quantizers.grid import QuantizedWeight, QuantLevel, check_bits, dequantize
from allocsearch.quantizers.packing import PackedWeight, pack_weight


@dataclass(frozen=True, eq=False)
class QuantizedVariants:
    """All levels of one layer, each on its own grid.

    Attributes:
      codes: uint8[K, out, in], codes of each level.
      scales: float32[K, out, G], float16-representable.
      zeros: uint8[K, out, G]; ``2^(bits_k - 1)`` everywhere for symmetric levels.
      bits: int64[K], bits of each level (in the order asked for).
      group_size: input columns per group (the same for every level).
      symmetric: whether every level is symmetric.
    """

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    bits: np.ndarray
    group_size: int
    symmetric: bool

    def __post_init__(self) -> None:
        k, out, n_in = self.codes.shape
        g = -(-n_in // self.group_size)
        if self.scales.shape != (k, out, g) or self.zeros.shape != (k, out, g):
            raise ValueError(
                f"scales and zeros must be [K={k}, out={out}, G={g}], got "
                f"{self.scales.shape} and {self.zeros.shape}"
            )
        if self.bits.shape != (k,):
            raise ValueError(f"bits must be [K={k}], got {self.bits.shape}")

    @property
    def num_levels(self) -> int:
        return len(self.bits)

    def level(self, k: int) -> QuantLevel:
        """The grid of level ``k``."""
        return QuantLevel(int(self.bits[k]), self.group_size, self.symmetric)

    def quantized(self, k: int) -> QuantizedWeight:
        """Level ``k``'s codes, scales and zero points."""
        return QuantizedWeight(self.codes[k], self.scales[k], self.zeros[k])

    def weights(self, k: int) -> np.ndarray:
        """float32[out, in]: level ``k`` dequantized."""
        return dequantize(self.codes[k], self.scales[k], self.zeros[k], group_size=self.group_size)

    def dense(self) -> np.ndarray:
        """float32[K, out, in]: every level dequantized (what a dense store would keep)."""
        return np.stack([self.weights(k) for k in range(self.num_levels)])

    def packed(self, k: int) -> PackedWeight:
        """Level ``k`` packed for the store (:mod:`allocsearch.quantizers.packing`)."""
        return pack_weight(self.quantized(k), self.level(k))


def check_bits_levels(bits_levels: ArrayLike) -> np.ndarray:
    """int64[K]: bitwidths after checking they are a non-empty 1-D list of valid bits."""
    b = np.asarray(bits_levels)
    if b.ndim != 1 or b.size == 0 or not np.issubdtype(b.dtype, np.integer):
        raise ValueError(f"bits must be a non-empty 1-D list of ints, got {bits_levels!r}")
    for x in b.tolist():
        check_bits(x)
    return b.astype(np.int64)


@runtime_checkable
class LocalQuantizer(Protocol):
    """Quantizes one layer to several bitwidths from its calibration statistics.

    Attributes:
      name: short identifier (``"rtn"``, ``"gptq"``), for supernet metadata and recipes.
      group_size: input columns per scale group.
      symmetric: scale only (True) or scale and zero point (False).

    Call order: build statistics with
    :func:`~allocsearch.pruners.base.accumulate_stats`, then call ``quantize`` once per
    layer with every bitwidth wanted.
    """

    name: str
    group_size: int
    symmetric: bool

    def quantize(
        self, weight: ArrayLike, stats: LayerStats | None, bits: ArrayLike
    ) -> QuantizedVariants:
        """All levels of one layer.

        Args:
          weight: float[out, in], the dense weight.
          stats: the layer input's statistics (``None`` only for quantizers that ignore
            them, such as RTN).
          bits: int[K], bitwidth of each level (any order; repeats allowed).

        Returns:
          ``QuantizedVariants`` whose ``bits`` equals ``bits``.
        """
        ...
