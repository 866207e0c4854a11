"""Packed sparse layout of dense variants: per level a bitmask of the non-zero entries and
the kept values, so that one level is read from its own bytes of a memory-mapped file.

Tensors of a packed parameter file (``K`` levels of an ``[out, in]`` weight)::

    shape    int64[3]                 (K, out, in)
    mask     uint8[K, out, ceil(in/8)] np.packbits of "entry k, i, j is kept", along in
    values   <storage dtype>[nnz]     the kept entries of level 0, then level 1, ...
                                      (row-major within a level)
    offsets  int64[K + 1]             level k's values are values[offsets[k]:offsets[k+1]]

"Kept" means a non-zero *bit pattern*, so ``-0.0`` is stored like any other value and a
round trip is bit-identical. Level ``k`` unpacks from ``mask[k]`` and its slice of
``values`` only: ``out * ceil(in/8) + nnz_k * itemsize`` bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import numpy as np

__all__ = [
    "PACKED_TENSORS",
    "dense_nbytes",
    "kept_counts",
    "pack",
    "packed_nbytes",
    "unpack_levels",
]

PACKED_TENSORS: Final[tuple[str, ...]] = ("shape", "mask", "values", "offsets")
"""Tensor names a packed file holds (besides ``sparsity`` and ``group_keep``)."""


def _bits(a: np.ndarray) -> np.ndarray:
    """The same bytes as unsigned integers of the same width (``x != 0`` on bit patterns)."""
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def kept_counts(weights: np.ndarray) -> np.ndarray:
    """int64[K]: entries of each level of ``weights`` [K, out, in] with a non-zero bit
    pattern (what the packed layout stores as values)."""
    w = np.ascontiguousarray(weights)
    return np.array([np.count_nonzero(_bits(w[k])) for k in range(w.shape[0])], np.int64)


def packed_nbytes(shape: Sequence[int], nnz: int, itemsize: int) -> int:
    """Bytes of a packed file's tensors (header excluded) for ``shape`` (K, out, in) with
    ``nnz`` kept values in all, ``itemsize`` bytes each."""
    k, out, n_in = (int(x) for x in shape)
    return 3 * 8 + k * out * ((n_in + 7) // 8) + int(nnz) * itemsize + (k + 1) * 8


def dense_nbytes(shape: Sequence[int], itemsize: int) -> int:
    """Bytes of the dense ``weights`` tensor [K, out, in] (header excluded)."""
    return int(np.prod(shape, dtype=np.int64)) * itemsize


def pack(weights: np.ndarray) -> dict[str, np.ndarray]:
    """The packed tensors (see the module docstring) of host ``weights`` [K, out, in], in
    their own dtype; one level at a time, so the peak is one level's mask on top."""
    w = np.ascontiguousarray(weights)
    if w.ndim != 3:
        raise ValueError(f"weights must be [K, out, in], got shape {w.shape}")
    masks, values = [], []
    for k in range(w.shape[0]):
        keep = _bits(w[k]) != 0
        masks.append(np.packbits(keep, axis=-1))
        values.append(w[k][keep])
    offsets = np.zeros(w.shape[0] + 1, np.int64)
    offsets[1:] = np.cumsum([len(v) for v in values])
    return {
        "shape": np.array(w.shape, np.int64),
        "mask": np.stack(masks) if masks else np.zeros((0, w.shape[1], 0), np.uint8),
        "values": np.concatenate(values) if values else np.zeros(0, w.dtype),
        "offsets": offsets,
    }


def unpack_levels(
    tensors: Mapping[str, np.ndarray], levels: Sequence[int], out: np.ndarray | None = None
) -> np.ndarray:
    """[len(levels), out, in] host weights of ``levels`` (repeats allowed) in the values'
    dtype, reading only those levels' bytes of ``tensors`` (e.g. memory-mapped views);
    written into ``out`` (C-contiguous, that shape and dtype) when given."""
    _, rows, n_in = (int(x) for x in np.asarray(tensors["shape"]))
    mask, values = tensors["mask"], tensors["values"]
    offsets = np.asarray(tensors["offsets"])
    if out is None:
        result = np.zeros((len(levels), rows, n_in), values.dtype)
    else:
        result = out
        result[...] = 0
    flat = _bits(result).reshape(len(levels), rows * n_in)
    for i, k in enumerate(levels):
        keep = np.unpackbits(np.asarray(mask[k]), axis=-1, count=n_in).reshape(-1).view(bool)
        kept = _bits(np.asarray(values[offsets[k] : offsets[k + 1]]))
        positions = np.flatnonzero(keep)
        if len(positions) != len(kept):
            raise ValueError(
                f"level {k}: the mask keeps {len(positions)} entries but {len(kept)} values "
                f"are stored"
            )
        flat[i, positions] = kept  # index assignment: several times faster than a bool mask
    return result
