"""Local quantizers: one layer, all bitwidths at once, as variant makers beside the pruners.

See :mod:`allocsearch.quantizers.grid` for the grid (codes, group scales, zero points),
:mod:`allocsearch.quantizers.base` for the protocol and result type, and
:mod:`allocsearch.quantizers.packing` for the compact storage layout.
"""

from allocsearch.quantizers.base import LocalQuantizer, QuantizedVariants
from allocsearch.quantizers.gptq import GPTQQuantizer
from allocsearch.quantizers.grid import (
    MAX_BITS,
    MIN_BITS,
    QuantizedWeight,
    QuantLevel,
    dequantize,
    group_params,
    quantize,
    quantize_codes,
)
from allocsearch.quantizers.packing import (
    PackedWeight,
    dequantize_packed,
    jnp_dequantize_packed,
    pack_codes,
    pack_weight,
    unpack_codes,
)
from allocsearch.quantizers.rtn import RTNQuantizer

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "GPTQQuantizer",
    "LocalQuantizer",
    "PackedWeight",
    "QuantLevel",
    "QuantizedVariants",
    "QuantizedWeight",
    "RTNQuantizer",
    "dequantize",
    "dequantize_packed",
    "group_params",
    "jnp_dequantize_packed",
    "pack_codes",
    "pack_weight",
    "quantize",
    "quantize_codes",
    "unpack_codes",
]
