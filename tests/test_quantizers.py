"""Quantizers: the grid by hand, packing round trips and sizes, JAX == numpy, GPTQ vs a
textbook per-column port."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allocsearch.pruners.base import accumulate_stats
from allocsearch.quantizers import (
    GPTQQuantizer,
    LocalQuantizer,
    QuantLevel,
    RTNQuantizer,
    dequantize,
    dequantize_packed,
    jnp_dequantize_packed,
    pack_codes,
    pack_weight,
    quantize,
    unpack_codes,
)
from allocsearch.quantizers.costs import (
    bits_per_weight,
    level_bits,
    level_from_json,
    level_label,
    level_to_json,
    packed_bytes,
    quant_cost_tables,
)
from allocsearch.quantizers.gptq import gptq_block_size
from allocsearch.quantizers.packing import jnp_unpack_codes, packed_code_bytes
from allocsearch.quantizers.tensors import (
    QUANTIZED_TENSORS,
    level_from_tensors,
    tensors_nbytes,
    variants_to_tensors,
)

ALL_BITS = (2, 3, 4, 5, 6, 8)

# ----------------------------------------------------------------------------- grid by hand


def test_rtn_symmetric_by_hand():
    # 4 bits: codes 0..15, zero 8; group 0: max|w| = 3.75 -> scale 2*3.75/15 = 0.5;
    # w/s = 7.5, -2, 0.6, -7.5 -> rint (half even) 8, -2, 1, -8 -> +8, clipped: 15, 6, 9, 0.
    # Partial group 1 (2 columns): max|w| = 0.9375 -> scale 0.125; 7.5 -> 8 -> 15; -1.6 -> -2.
    w = np.array([[3.75, -1.0, 0.3, -3.75, 0.9375, -0.2], [0, 0, 0, 0, 0, 0]], np.float32)
    q = quantize(w, QuantLevel(4, group_size=4, symmetric=True))
    np.testing.assert_array_equal(q.codes, [[15, 6, 9, 0, 15, 6], [8, 8, 8, 8, 8, 8]])
    np.testing.assert_array_equal(q.scales, [[0.5, 0.125], [1.0, 1.0]])
    np.testing.assert_array_equal(q.zeros, [[8, 8], [8, 8]])
    deq = dequantize(*q, group_size=4)
    np.testing.assert_array_equal(deq, [[3.5, -1.0, 0.5, -4.0, 0.875, -0.25], [0] * 6])


def test_rtn_asymmetric_by_hand():
    # 2 bits: codes 0..3. Group 0: range [-1, 2] -> scale 1, zero round(1) = 1; codes
    # rint(w) + 1 = 0, 1 (0.5 -> 0, half even), 3, 2. Partial group 1: range widened to
    # [0, 0.75] -> scale 0.25, zero 0; codes 3, 1. Row 2, group 0: [-3, 0] -> scale 1,
    # zero 3; -1.5 -> -2 (half even) -> code 1 -> -2. Group 1 all zero: scale 1, zero 0.
    w = np.array([[-1.0, 0.5, 2.0, 1.25, 0.75, 0.25], [-3.0, -1.5, 0, 0, 0, 0]], np.float32)
    q = quantize(w, QuantLevel(2, group_size=4, symmetric=False))
    np.testing.assert_array_equal(q.codes, [[0, 1, 3, 2, 3, 1], [0, 1, 3, 3, 0, 0]])
    np.testing.assert_array_equal(q.scales, [[1.0, 0.25], [1.0, 1.0]])
    np.testing.assert_array_equal(q.zeros, [[1, 0], [3, 0]])
    deq = dequantize(*q, group_size=4)
    np.testing.assert_array_equal(deq, [[-1, 0, 2, 1, 0.75, 0.25], [-3, -2, 0, 0, 0, 0]])


def test_rtn_quantizer_stacks_levels_in_order():
    w = np.random.default_rng(0).standard_normal((5, 9)).astype(np.float32)
    v = RTNQuantizer(group_size=4, symmetric=False).quantize(w, None, [8, 2, 4])
    assert isinstance(RTNQuantizer(), LocalQuantizer)
    np.testing.assert_array_equal(v.bits, [8, 2, 4])
    for k, b in enumerate((8, 2, 4)):
        q = quantize(w, QuantLevel(b, 4, False))
        np.testing.assert_array_equal(v.codes[k], q.codes)
        np.testing.assert_array_equal(v.weights(k), dequantize(*q, group_size=4))
    assert v.dense().shape == (3, 5, 9)


def test_scales_are_float16_values():
    w = np.random.default_rng(1).standard_normal((7, 300)).astype(np.float32) * 0.01
    for b in ALL_BITS:
        s = quantize(w, QuantLevel(b, 128, True)).scales
        np.testing.assert_array_equal(s.astype(np.float16).astype(np.float32), s)


@pytest.mark.parametrize(
    "kwargs",
    [dict(bits=1), dict(bits=9), dict(bits=4.0), dict(bits=4, group_size=0), dict(bits=True)],
)
def test_bad_level_is_refused(kwargs):
    with pytest.raises(ValueError, match="bits|group_size"):
        QuantLevel(**kwargs)


def test_bad_bits_list_and_weight_are_refused():
    with pytest.raises(ValueError, match="bits"):
        RTNQuantizer().quantize(np.ones((2, 2)), None, [4, 9])
    with pytest.raises(ValueError, match="bits"):
        RTNQuantizer().quantize(np.ones((2, 2)), None, [])
    with pytest.raises(ValueError, match="NaN"):
        RTNQuantizer().quantize(np.array([[np.nan, 1.0]]), None, [4])
    with pytest.raises(ValueError, match="statistics"):
        GPTQQuantizer().quantize(np.ones((2, 2)), None, [4])


# ----------------------------------------------------------------------------- packing


def test_pack_layout_by_hand():
    # 3-bit codes 7, 7, 7: bits 0-8 set, little-endian -> bytes 0xFF, 0x01, then padding.
    np.testing.assert_array_equal(pack_codes(np.array([7, 7, 7]), 3), [255, 1, 0])
    # 1 | 2 << 3 | 3 << 6 = 209
    np.testing.assert_array_equal(pack_codes(np.array([1, 2, 3]), 3), [209, 0, 0])
    # 4 bits: two codes per byte, low nibble first.
    np.testing.assert_array_equal(pack_codes(np.array([1, 2, 15]), 4), [0x21, 0x0F, 0, 0])


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 13), (17, 129), (2, 8)])
def test_pack_round_trip(bits, shape):
    codes = np.random.default_rng(bits).integers(0, 1 << bits, size=shape).astype(np.uint8)
    codes.flat[0] = (1 << bits) - 1  # the extreme codes are in every case
    packed = pack_codes(codes, bits)
    n = codes.size
    assert packed.dtype == np.uint8 and packed.shape == (-(-n // 8) * bits,)
    np.testing.assert_array_equal(unpack_codes(packed, bits, shape), codes)
    jax_codes = np.asarray(jnp_unpack_codes(jnp.asarray(packed), bits=bits, shape=shape))
    np.testing.assert_array_equal(jax_codes, codes)


def test_pack_refuses_out_of_range_codes_and_bad_buffers():
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_codes(np.array([8]), 3)
    with pytest.raises(ValueError, match="uint8"):
        unpack_codes(np.zeros(5, np.uint8), 3, (2, 8))
    q = quantize(np.ones((2, 4), np.float32), QuantLevel(4, 4, False))
    with pytest.raises(ValueError, match="zero points"):
        pack_weight(q, QuantLevel(4, 4, True))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_jnp_dequantize_equals_numpy(bits, symmetric):
    rng = np.random.default_rng(bits)
    for shape, gs in (((6, 37), 16), ((3, 128), 128), ((4, 50), 64)):
        w = rng.standard_normal(shape).astype(np.float32)
        level = QuantLevel(bits, gs, symmetric)
        q = quantize(w, level)
        p = pack_weight(q, level)
        ref = dequantize(*q, group_size=gs)
        np.testing.assert_array_equal(dequantize_packed(p), ref)
        zeros = None if p.zeros is None else jnp.asarray(p.zeros)
        got = jnp_dequantize_packed(
            jnp.asarray(p.codes),
            jnp.asarray(p.scales),
            zeros,
            bits=bits,
            group_size=gs,
            shape=shape,
        )
        np.testing.assert_array_equal(np.asarray(got), ref)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_packed_bytes_within_5_percent_of_bit_count(bits, symmetric):
    out, n_in, gs = 256, 384, 128
    w = np.random.default_rng(0).standard_normal((out, n_in)).astype(np.float32)
    level = QuantLevel(bits, gs, symmetric)
    p = pack_weight(quantize(w, level), level)
    groups = out * (n_in // gs)
    bit_count = bits * out * n_in / 8 + 2 * groups + (0 if symmetric else bits * groups / 8)
    assert abs(p.nbytes - bit_count) <= 0.05 * bit_count
    assert p.codes.nbytes == packed_code_bytes(out * n_in, bits) == bits * out * n_in // 8
    if bits == 4 and symmetric:  # about a quarter of bf16: 4 + 16/128 bits of 16
        assert p.nbytes / (2 * out * n_in) == pytest.approx((4 + 16 / 128) / 16)


# ----------------------------------------------------------------------------- GPTQ


def _round_half(x: np.ndarray) -> np.ndarray:
    return (
        np.maximum(x, np.finfo(np.float16).smallest_subnormal).astype(np.float16).astype(np.float64)
    )


def reference_gptq(w, x, *, bits, group_size, symmetric, percdamp=0.01):
    """Textbook GPTQ in float64, one column at a time, no blocks: H = X^T X damped,
    U = chol(H^-1) (upper), each group's grid from its current weights at its first
    column, error (w - q) / U_jj spread over the remaining columns by U's row."""
    W = np.asarray(w, np.float64).copy()
    X = np.asarray(x, np.float64)
    H = X.T @ X
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    H += percdamp * np.mean(np.diag(H)) * np.eye(H.shape[0])
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    maxq = 2**bits - 1
    Q = np.zeros_like(W)
    for j in range(W.shape[1]):
        if j % group_size == 0:
            grp = W[:, j : j + group_size]
            lo, hi = np.minimum(grp.min(axis=1), 0), np.maximum(grp.max(axis=1), 0)
            if symmetric:
                amax = np.maximum(-lo, hi)
                scale = _round_half(np.where(amax == 0, 1.0, 2 * amax / maxq))
                zero = np.full_like(scale, (maxq + 1) / 2)
            else:
                scale = _round_half(np.where(hi == lo, 1.0, (hi - lo) / maxq))
                zero = np.clip(np.round(-lo / scale), 0, maxq)
        q = np.clip(np.round(W[:, j] / scale) + zero, 0, maxq)
        Q[:, j] = scale * (q - zero)
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j:] -= np.outer(err, U[j, j:])
    return Q


def _correlated_problem(seed, out=48, n_in=320, tokens=1536):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((tokens, n_in))
    a = rng.standard_normal((n_in, n_in)) / np.sqrt(n_in) + 0.5 * np.eye(n_in)
    x = (z @ a).astype(np.float32)
    w = rng.standard_normal((out, n_in)).astype(np.float32)
    return w, x


def _rel_error(w, q, x):
    x = np.asarray(x, np.float64)
    return np.linalg.norm((w - q) @ x.T) / np.linalg.norm(w @ x.T)


@pytest.mark.parametrize(
    ("group_size", "blocksize", "symmetric"),
    [
        (128, 128, True),
        (128, 128, False),
        pytest.param(32, 128, True, marks=pytest.mark.slow),
        pytest.param(128, 64, False, marks=pytest.mark.slow),
        pytest.param(1024, 128, True, marks=pytest.mark.slow),
    ],
)
def test_gptq_matches_reference_port_and_beats_rtn(group_size, blocksize, symmetric):
    # n_in = 320: a partial last group of 64 (group 128), padding to whole blocks; group
    # 128 over blocks of 64 has groups spanning blocks; 1024 >= n_in is one group per row.
    w, x = _correlated_problem(seed=group_size + blocksize)
    stats = accumulate_stats(None, x)
    gptq = GPTQQuantizer(group_size=group_size, blocksize=blocksize, symmetric=symmetric)
    assert isinstance(gptq, LocalQuantizer)
    got = gptq.quantize(w, stats, ALL_BITS)
    rtn = RTNQuantizer(group_size=group_size, symmetric=symmetric).quantize(w, None, ALL_BITS)
    for k, bits in enumerate(ALL_BITS):
        ref = reference_gptq(w, x, bits=bits, group_size=group_size, symmetric=symmetric)
        e_ref = _rel_error(w, ref, x)
        e_got = _rel_error(w, got.weights(k), x)
        assert abs(e_got - e_ref) <= 0.01 * e_ref, (bits, e_got, e_ref)
        assert e_got < _rel_error(w, rtn.weights(k), x), bits
        # the variant is exactly what its packed form holds
        np.testing.assert_array_equal(dequantize_packed(got.packed(k)), got.weights(k))


def test_gptq_block_size_fits_groups():
    assert gptq_block_size(128, 128, 4096) == 128
    assert gptq_block_size(128, 48, 4096) == 96
    assert gptq_block_size(64, 128, 4096) == 64
    assert gptq_block_size(128, 200, 4096) == 200
    assert gptq_block_size(128, 4096, 4096) == 128


def test_gptq_dead_input_is_rounded_not_zeroed():
    # An input that is zero on every token is decoupled (unit diagonal): no error reaches
    # it, so its weights are rounded to their group's grid, within half a step.
    w, x = _correlated_problem(seed=3, out=8, n_in=64, tokens=256)
    x[:, 5] = 0.0
    v = GPTQQuantizer(group_size=64).quantize(w, accumulate_stats(None, x), [4])
    step = v.scales[0][:, 0]
    assert np.all(np.abs(v.weights(0)[:, 5] - w[:, 5]) <= step / 2 + 1e-7)
    assert np.any(v.weights(0)[:, 5] != 0)


# ----------------------------------------------------------------------------- costs


def test_costs_by_hand():
    sym4, asym4 = QuantLevel(4, 128, True), QuantLevel(4, 128, False)
    assert bits_per_weight(sym4, (256, 256)) == 4 + 16 / 128
    assert bits_per_weight(asym4, (256, 256)) == 4 + 20 / 128
    # partial last group (200 = 128 + 72): two scales per row of 200 weights
    assert bits_per_weight(sym4, (10, 200)) == pytest.approx(4 + 2 * 16 / 200)
    assert level_bits(QuantLevel(3, 4, False), (2, 6)) == 3 * 12 + (16 + 3) * 4
    table = quant_cost_tables([[(256, 256)], [(10, 200), (256, 256)]], [sym4, QuantLevel(2)])
    assert table.bits.shape == (2, 2)
    assert table.bits[1, 0] == level_bits(sym4, (10, 200)) + level_bits(sym4, (256, 256))
    assert table.bits_per_weight[0, 1] == 2 + 16 / 128


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_packed_bytes_cost_is_what_packing_takes(bits, symmetric):
    level = QuantLevel(bits, 16, symmetric)
    for shape in ((3, 37), (5, 16), (1, 1)):
        w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        assert packed_bytes(level, shape) == pack_weight(quantize(w, level), level).nbytes


def test_level_json_round_trip_and_label():
    level = QuantLevel(3, 64, False)
    assert level_from_json(level_to_json(level)) == level
    assert level_label(level) == "3b g64 asym"
    with pytest.raises(ValueError, match="keys"):
        level_from_json({"bits": 3})
    with pytest.raises(ValueError, match="symmetric"):
        level_from_json({"bits": 3, "group_size": 64, "symmetric": "no"})


def test_jnp_dequantize_inside_a_jitted_program():
    # what an evaluator's block program does: unpack and dequantize next to a matmul
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 40)).astype(np.float32)
    x = rng.standard_normal((3, 40)).astype(np.float32)
    level = QuantLevel(3, 16, False)
    p = pack_weight(quantize(w, level), level)

    @jax.jit
    def forward(codes, scales, zeros, x):
        wq = jnp_dequantize_packed(codes, scales, zeros, bits=3, group_size=16, shape=(8, 40))
        return x @ wq.T

    got = forward(jnp.asarray(p.codes), jnp.asarray(p.scales), jnp.asarray(p.zeros), x)
    np.testing.assert_allclose(np.asarray(got), x @ dequantize_packed(p).T, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- file tensors


@pytest.mark.parametrize("symmetric", [True, False])
def test_variants_file_tensors_round_trip_per_level(symmetric):
    w = np.random.default_rng(5).standard_normal((6, 50)).astype(np.float32)
    v = RTNQuantizer(group_size=16, symmetric=symmetric).quantize(w, None, [8, 3, 2, 5])
    tensors = variants_to_tensors(v)
    assert set(tensors) == set(QUANTIZED_TENSORS)
    for k in range(4):
        p = level_from_tensors(tensors, k)
        assert p.level == v.level(k)
        np.testing.assert_array_equal(dequantize_packed(p), v.weights(k))
    # the whole file: the levels' packed bytes plus bookkeeping (int64 shape[2], bits[4],
    # group_size[1], two offsets[5]; uint8 symmetric[1])
    packed = sum(packed_bytes(v.level(k), (6, 50)) for k in range(4))
    assert tensors_nbytes(tensors) == packed + 8 * (2 + 4 + 1 + 5 + 5) + 1
    with pytest.raises(ValueError, match="level 4"):
        level_from_tensors(tensors, 4)
    with pytest.raises(ValueError, match="missing"):
        level_from_tensors({"bits": tensors["bits"]}, 0)
