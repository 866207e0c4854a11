"""Compact storage of quantized weights: bit-packed codes, float16 scales, packed zero points.

Layout of ``b``-bit codes (any ``b`` in 2..8, also 3, 5, 6, 7 that do not divide 8): the
codes of a ``[out, in]`` matrix, flattened row-major, form one little-endian bit stream:
code ``i`` occupies bits ``[i b, (i + 1) b)``, bit 0 being the least significant bit of
byte 0. Codes therefore cross byte boundaries when ``b`` does not divide 8. The stream is
padded with zero codes to a whole number of *chunks* of 8 codes, each chunk exactly ``b``
bytes, so a matrix of ``n`` codes takes ``ceil(n / 8) * b`` bytes (``uint8[ceil(n/8) * b]``).
Unpacking a chunk needs only static slices and shifts (code ``j`` of a chunk starts at bit
``j b``: byte ``j b // 8``, shift ``j b % 8``), so the same few lines serve numpy and a
jitted JAX program, with no gather.

A :class:`PackedWeight` holds the packed codes, the scales as float16 ``[out, G]``, and for
asymmetric levels the zero points packed the same way at ``b`` bits (symmetric levels store
none: the zero point is ``2^(b-1)``). Its bytes are ``ceil(n/8) b + 2 out G (+ ceil(out G /
8) b)``, i.e. ``b + 16 / group_size (+ b / group_size)`` bits per weight up to padding.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

from allocsearch.quantizers.grid import (
    SCALE_DTYPE,
    QuantizedWeight,
    QuantLevel,
    check_bits,
    dequantize,
)

__all__ = [
    "PackedWeight",
    "dequantize_packed",
    "jnp_dequantize_packed",
    "jnp_unpack_codes",
    "pack_codes",
    "pack_weight",
    "packed_code_bytes",
    "unpack_codes",
]


def packed_code_bytes(n_codes: int, bits: int) -> int:
    """Bytes that ``n_codes`` codes of ``bits`` bits take packed: ``ceil(n / 8) * bits``."""
    return -(-int(n_codes) // 8) * check_bits(bits)


def pack_codes(codes: ArrayLike, bits: int) -> np.ndarray:
    """uint8[ceil(n/8) * bits]: codes (any integer shape, ``n`` entries, each in
    ``[0, 2^bits - 1]``) packed in the module's layout."""
    b = check_bits(bits)
    c = np.asarray(codes)
    if not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {c.dtype}")
    flat = c.reshape(-1).astype(np.uint64)
    if flat.size and (int(flat.max()) >> b or np.any(c < 0)):
        raise ValueError(f"codes must lie in [0, {(1 << b) - 1}] for {b} bits")
    n_chunks = -(-flat.size // 8)
    chunks = np.zeros(n_chunks * 8, np.uint64)
    chunks[: flat.size] = flat
    chunks = chunks.reshape(n_chunks, 8)
    shifts = (np.arange(8, dtype=np.uint64) * np.uint64(b))[None, :]
    words = np.bitwise_or.reduce(chunks << shifts, axis=1)  # 8 b <= 64 bits per chunk
    as_bytes = words.astype("<u8").view(np.uint8).reshape(n_chunks, 8)
    return np.ascontiguousarray(as_bytes[:, :b]).reshape(-1)


def _unpack(xp, packed, bits: int, n_codes: int):
    """Codes int32[n_codes] from packed bytes, with ``xp`` numpy or jax.numpy (static
    slices and shifts only)."""
    chunks = packed.reshape(-1, bits).astype(xp.int32)
    chunks = xp.concatenate([chunks, xp.zeros_like(chunks[:, :1])], axis=1)  # for byte + 1
    mask = (1 << bits) - 1
    cols = []
    for j in range(8):
        byte, shift = divmod(j * bits, 8)
        window = chunks[:, byte] | (chunks[:, byte + 1] << 8)
        cols.append((window >> shift) & mask)
    return xp.stack(cols, axis=1).reshape(-1)[:n_codes]


def _check_packed(packed: np.ndarray, bits: int, n_codes: int) -> None:
    want = packed_code_bytes(n_codes, bits)
    if packed.ndim != 1 or packed.shape[0] != want or packed.dtype != np.uint8:
        raise ValueError(
            f"packed codes must be uint8[{want}] for {n_codes} codes of {bits} bits, got "
            f"{packed.dtype}{list(packed.shape)}"
        )


def unpack_codes(packed: ArrayLike, bits: int, shape: tuple[int, ...]) -> np.ndarray:
    """uint8[shape]: the codes :func:`pack_codes` packed (numpy)."""
    b = check_bits(bits)
    p = np.asarray(packed)
    n = int(np.prod(shape, dtype=np.int64))
    _check_packed(p, b, n)
    return _unpack(np, p, b, n).astype(np.uint8).reshape(shape)


@partial(jax.jit, static_argnames=("bits", "shape"))
def jnp_unpack_codes(packed: jax.Array, *, bits: int, shape: tuple[int, ...]) -> jax.Array:
    """int32[shape]: the codes :func:`pack_codes` packed, in JAX (usable inside ``jit``;
    ``bits`` and ``shape`` are static)."""
    n = int(np.prod(shape, dtype=np.int64))
    return _unpack(jnp, packed, bits, n).reshape(shape)


class PackedWeight(NamedTuple):
    """One quantized matrix as the store keeps it.

    Attributes:
      codes: uint8[ceil(out * in / 8) * bits], packed codes of the [out, in] matrix.
      scales: float16[out, G].
      zeros: uint8[ceil(out * G / 8) * bits], packed zero points; None when symmetric.
      level: the level (bits, group_size, symmetric).
      shape: (out, in).
    """

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    level: QuantLevel
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        """Bytes of the packed codes, scales and zero points."""
        zb = 0 if self.zeros is None else self.zeros.nbytes
        return int(self.codes.nbytes + self.scales.nbytes + zb)

    def unpack(self) -> QuantizedWeight:
        """The codes, float32 scales and zero points (the constant ``2^(b-1)`` when
        symmetric), each [out, in] or [out, G]."""
        b = self.level.bits
        out, n_in = self.shape
        g = self.level.n_groups(n_in)
        codes = unpack_codes(self.codes, b, (out, n_in))
        if self.zeros is None:
            zeros = np.full((out, g), 1 << (b - 1), np.uint8)
        else:
            zeros = unpack_codes(self.zeros, b, (out, g))
        return QuantizedWeight(codes, self.scales.astype(np.float32), zeros)


def pack_weight(q: QuantizedWeight, level: QuantLevel) -> PackedWeight:
    """Pack a quantized weight (codes [out, in], scales and zeros [out, G]) at ``level``.

    Raises:
      ValueError: when a scale is not float16-representable or, for a symmetric level, a
        zero point is not ``2^(bits-1)`` (the packed form could not reproduce the weight).
    """
    codes = np.asarray(q.codes)
    out, n_in = codes.shape
    g = level.n_groups(n_in)
    scales = np.asarray(q.scales, np.float32)
    zeros = np.asarray(q.zeros)
    if scales.shape != (out, g) or zeros.shape != (out, g):
        raise ValueError(
            f"scales and zeros must be [{out}, {g}], got {scales.shape}, {zeros.shape}"
        )
    half = scales.astype(SCALE_DTYPE)
    if not np.array_equal(half.astype(np.float32), scales):
        raise ValueError("scales must be float16-representable (quantize through the grid)")
    if level.symmetric and np.any(zeros != 1 << (level.bits - 1)):
        raise ValueError(f"a symmetric level's zero points must all be {1 << (level.bits - 1)}")
    packed_zeros = None if level.symmetric else pack_codes(zeros, level.bits)
    return PackedWeight(pack_codes(codes, level.bits), half, packed_zeros, level, (out, n_in))


def dequantize_packed(p: PackedWeight) -> np.ndarray:
    """float32[out, in]: the weight a packed matrix holds (numpy)."""
    q = p.unpack()
    return dequantize(q.codes, q.scales, q.zeros, group_size=p.level.group_size)


@partial(jax.jit, static_argnames=("bits", "group_size", "shape"))
def jnp_dequantize_packed(
    codes: jax.Array,
    scales: jax.Array,
    zeros: jax.Array | None,
    *,
    bits: int,
    group_size: int,
    shape: tuple[int, int],
) -> jax.Array:
    """float32[out, in]: a packed matrix's weight in JAX, for use inside a jitted block
    program; equal to :func:`dequantize_packed` bit for bit.

    Args:
      codes: uint8[ceil(out * in / 8) * bits] packed codes.
      scales: float16 (or float32) [out, G].
      zeros: uint8 packed zero points, or None for a symmetric level.
      bits, group_size, shape: static; ``shape`` is (out, in).
    """
    out, n_in = shape
    g = scales.shape[1]
    c = _unpack(jnp, codes, bits, out * n_in).reshape(out, n_in).astype(jnp.float32)
    if zeros is None:
        z = jnp.full((out, g), float(1 << (bits - 1)), jnp.float32)
    else:
        z = _unpack(jnp, zeros, bits, out * g).reshape(out, g).astype(jnp.float32)
    s = jnp.repeat(scales.astype(jnp.float32), group_size, axis=1)[:, :n_in]
    z = jnp.repeat(z, group_size, axis=1)[:, :n_in]
    return s * (c - z)
