"""Round-to-nearest quantization: each group's weights rounded to its grid, no compensation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from numpy.typing import ArrayLike

from allocsearch.pruners.base import LayerStats
from allocsearch.quantizers.base import QuantizedVariants, check_bits_levels
from allocsearch.quantizers.grid import QuantLevel, check_group_size, check_matrix, quantize


@dataclass(frozen=True, kw_only=True)
class RTNQuantizer:
    """Round-to-nearest (the uncompensated baseline GPTQ improves on); ignores statistics.

    Attributes:
      group_size: input columns per scale group (128).
      symmetric: scale only (True) or scale and zero point (False).
    """

    group_size: int = 128
    symmetric: bool = True
    name: ClassVar[str] = "rtn"

    def __post_init__(self) -> None:
        check_group_size(self.group_size)

    def quantize(
        self, weight: ArrayLike, stats: LayerStats | None, bits: ArrayLike
    ) -> QuantizedVariants:
        """All levels; see :class:`~allocsearch.quantizers.base.LocalQuantizer`."""
        w = check_matrix(weight)
        b = check_bits_levels(bits)
        parts = [quantize(w, QuantLevel(int(x), self.group_size, self.symmetric)) for x in b]
        return QuantizedVariants(
            codes=np.stack([p.codes for p in parts]),
            scales=np.stack([p.scales for p in parts]),
            zeros=np.stack([p.zeros for p in parts]),
            bits=b,
            group_size=self.group_size,
            symmetric=self.symmetric,
        )
