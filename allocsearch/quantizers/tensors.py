"""The tensors one store file of quantized variants would hold: every level packed.

Tensors of a file for ``K`` levels of an ``[out, in]`` weight with ``G`` groups per row
(a proposed store kind ``"quantized"``; the store does not write it yet)::

    shape         int64[2]               (out, in)
    bits          int64[K]               bits of each level
    group_size    int64[1]
    symmetric     uint8[1]               1: no zero points stored
    codes         uint8[sum_k C_k]       level k's packed codes (packing.py layout) at
    code_offsets  int64[K + 1]           codes[code_offsets[k]:code_offsets[k + 1]]
    scales        float16[K, out, G]
    zeros         uint8[sum_k Z_k]       level k's packed zero points (empty if symmetric)
    zero_offsets  int64[K + 1]

Level ``k`` is read from its own slices only (``C_k + 2 out G + Z_k`` bytes), as a
streaming read of one level needs.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from allocsearch.quantizers.base import QuantizedVariants
from allocsearch.quantizers.grid import QuantLevel
from allocsearch.quantizers.packing import PackedWeight

QUANTIZED_TENSORS = (
    "shape",
    "bits",
    "group_size",
    "symmetric",
    "codes",
    "code_offsets",
    "scales",
    "zeros",
    "zero_offsets",
)
"""Tensor names a quantized variants file holds."""


def _concat(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(parts) + 1, np.int64)
    offsets[1:] = np.cumsum([p.size for p in parts])
    data = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return data.astype(np.uint8), offsets


def variants_to_tensors(v: QuantizedVariants) -> dict[str, np.ndarray]:
    """The file's tensors (see the module docstring) of all levels of ``v``."""
    packed = [v.packed(k) for k in range(v.num_levels)]
    codes, code_offsets = _concat([p.codes for p in packed])
    zeros, zero_offsets = _concat([p.zeros for p in packed if p.zeros is not None])
    if v.symmetric:
        zero_offsets = np.zeros(v.num_levels + 1, np.int64)
    return {
        "shape": np.array(v.codes.shape[1:], np.int64),
        "bits": np.asarray(v.bits, np.int64),
        "group_size": np.array([v.group_size], np.int64),
        "symmetric": np.array([int(v.symmetric)], np.uint8),
        "codes": codes,
        "code_offsets": code_offsets,
        "scales": np.stack([p.scales for p in packed]),
        "zeros": zeros,
        "zero_offsets": zero_offsets,
    }


def level_from_tensors(tensors: Mapping[str, np.ndarray], k: int) -> PackedWeight:
    """Level ``k`` of a file's tensors, reading only that level's slices."""
    missing = [n for n in QUANTIZED_TENSORS if n not in tensors]
    if missing:
        raise ValueError(f"not a quantized variants file: missing tensors {missing}")
    bits = np.asarray(tensors["bits"])
    if not 0 <= k < bits.size:
        raise ValueError(f"level {k} out of range: the file has {bits.size} levels")
    symmetric = bool(np.asarray(tensors["symmetric"])[0])
    level = QuantLevel(int(bits[k]), int(np.asarray(tensors["group_size"])[0]), symmetric)
    co, zo = np.asarray(tensors["code_offsets"]), np.asarray(tensors["zero_offsets"])
    out, n_in = (int(x) for x in np.asarray(tensors["shape"]))
    return PackedWeight(
        codes=np.asarray(tensors["codes"][co[k] : co[k + 1]]),
        scales=np.asarray(tensors["scales"][k]),
        zeros=None if symmetric else np.asarray(tensors["zeros"][zo[k] : zo[k + 1]]),
        level=level,
        shape=(out, n_in),
    )


def tensors_nbytes(tensors: Mapping[str, np.ndarray]) -> int:
    """Bytes of a file's tensors (header excluded)."""
    return int(sum(np.asarray(t).nbytes for t in tensors.values()))
