"""Sorted MoE dispatch (allocsearch.models.moe_dispatch): the routed-only expert sum equals
the all-experts sum (worst-case routings included) under vmap and lax.map over candidates,
the auto rule by hand, parity with transformers for the four families with dispatch forced
on, and calibration captures unchanged by the dispatch setting."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allocsearch.models.moe import MoEAdapter
from allocsearch.models.moe_dispatch import (
    dispatch_method,
    dispatch_rows,
    dispatch_tile,
    expert_work_bytes,
    routed_expert_outputs,
)

E, K, D, F = 6, 2, 8, 5


def _weights(logits: np.ndarray, k: int) -> jax.Array:
    """Routing weights float32[..., E]: softmax, top k, renormalised (zeros elsewhere)."""
    p = jax.nn.softmax(jnp.asarray(logits), axis=-1)
    top, idx = jax.lax.top_k(p, k)
    top = top / top.sum(-1, keepdims=True)
    return jnp.sum(jax.nn.one_hot(idx, p.shape[-1]) * top[..., None], axis=-2)


def _all_experts(x, w, gw, uw, dw):
    h = jax.nn.silu(jnp.einsum("btd,efd->btef", x, gw)) * jnp.einsum("btd,efd->btef", x, uw)
    return jnp.einsum("btef,edf,bte->btd", h, dw, w)


def _experts(rng):
    return tuple(
        jnp.asarray(rng.normal(size=s).astype(np.float32))
        for s in [(E, F, D), (E, F, D), (E, D, F)]
    )


@pytest.mark.parametrize("method", ["sorted", "ragged"])
def test_routed_outputs_equal_all_experts(method):
    """Random routing, every token's first choice one expert (the padding bound), and every
    token routed to the same pair."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 7, D)).astype(np.float32))
    experts = _experts(rng)
    run = jax.jit(
        lambda x, w, *ex: routed_expert_outputs(x, w, *ex, jax.nn.silu, top_k=K, method=method)
    )
    for shift in [None, [3], [1, 4]]:
        logits = rng.normal(size=(2, 7, E))
        if shift is not None:
            logits[..., shift] += 20
        w = _weights(logits, K)
        want = _all_experts(x, w, *experts)
        np.testing.assert_allclose(run(x, w, *experts), want, atol=1e-5, rtol=1e-5)


def test_vmap_and_lax_map_over_candidates():
    """Per-candidate weights and routings (as the evaluators batch candidates)."""
    rng = np.random.default_rng(1)
    n = 3
    x = jnp.asarray(rng.normal(size=(n, 2, 5, D)).astype(np.float32))
    w = _weights(rng.normal(size=(n, 2, 5, E)) * 3, K)
    experts = tuple(jnp.stack([a * (1 + 0.1 * c) for c in range(n)]) for a in _experts(rng))

    def one(x, w, *ex):
        return routed_expert_outputs(x, w, *ex, jax.nn.silu, top_k=K)

    want = jnp.stack([_all_experts(x[c], w[c], *(a[c] for a in experts)) for c in range(n)])
    np.testing.assert_allclose(jax.jit(jax.vmap(one))(x, w, *experts), want, atol=1e-5, rtol=1e-5)
    mapped = jax.jit(lambda *a: jax.lax.map(lambda t: one(*t), a))(x, w, *experts)
    np.testing.assert_allclose(mapped, want, atol=1e-5, rtol=1e-5)


def test_auto_rule_by_hand():
    # 24 tokens, top-2 of 4 (the parity tests' blocks): tile 16 (mean 12 -> 6 -> clamp 16),
    # floor((48 + 4 * 15) / 16) = 6 tiles = 96 rows > 96 / 2: all experts
    assert dispatch_tile(24, 2, 4) == 16
    assert dispatch_rows(24, 2, 4, 16) == 96
    assert dispatch_rows(1, 1, 4, 16) == 48 and dispatch_rows(1, 1, 1, 16) == 16
    assert dispatch_method("auto", num_tokens=24, top_k=2, num_experts=4) == "dense"
    # 1024 tokens, top-8 of 64: mean 128, tile 64; floor((8192 + 64 * 63) / 64) = 191 tiles
    # = 12224 rows <= 65536 / 2: dispatch
    assert dispatch_tile(1024, 8, 64) == 64
    assert dispatch_rows(1024, 8, 64, 64) == 191 * 64
    assert dispatch_method("auto", num_tokens=1024, top_k=8, num_experts=64) == "sorted"
    assert dispatch_method("dense", num_tokens=1024, top_k=8, num_experts=64) == "dense"
    assert dispatch_tile(10**6, 2, 4) == 128
    with pytest.raises(ValueError, match="'sparse' is not one of"):
        dispatch_method("sparse", num_tokens=1, top_k=1, num_experts=1)


_TINY = dict(
    vocab_size=61,
    hidden_size=16,
    intermediate_size=12,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    num_experts=8,
    num_local_experts=8,
    moe_intermediate_size=8,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
)
FAMILIES = {
    "mixtral": {},
    "qwen2_moe": {"shared_expert_intermediate_size": 12},
    "qwen3_moe": {"norm_topk_prob": True},
    "olmoe": {},
}


def _random_params(adapter) -> dict:
    """Random float32 parameters from numpy (init_params traces every initialiser eagerly)."""
    rng = np.random.default_rng(0)
    params = {
        name: jnp.asarray(0.3 * rng.normal(size=shape).astype(np.float32))
        for name, shape in adapter.param_shapes.items()
    }
    return {**params, **{k: jnp.asarray(v) for k, v in adapter.constant_params().items()}}


@partial(jax.jit, static_argnums=0)
def _moe_block_both_ways(adapter, params, x):
    """Block 0's MoE module on x float[B, T, D]: (all experts, sorted dispatch)."""
    block = getattr(adapter.module(params).model.layers[0], adapter.moe.module)
    out = []
    for method in ("dense", "sorted"):
        block.dispatch = method  # the same block and weights, the dispatch switched
        out.append(block(x, None))
    return tuple(out)


@pytest.mark.slow
def test_dispatch_matches_all_experts_in_every_family():
    """Each family's MoE block (router normalisation, projection names, shared expert) with
    dispatch forced on equals its all-experts path (whose parity with transformers
    tests/test_moe.py checks); nothing else in the model depends on the dispatch."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 16)).astype(np.float32))
    for family, extra in FAMILIES.items():
        adapter = MoEAdapter({**_TINY, **extra, "model_type": family})
        want, got = _moe_block_both_ways(adapter, _random_params(adapter), x)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=family)


@pytest.mark.slow
def test_dispatch_matches_transformers_with_shared_expert(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from allocsearch.models import load_model

    hf_cfg = {k: v for k, v in _TINY.items() if k != "num_local_experts"}
    hf = transformers.Qwen2MoeForCausalLM(
        transformers.Qwen2MoeConfig(**hf_cfg, shared_expert_intermediate_size=12)
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    hf.eval().save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_model(tmp_path)
    ids = np.random.default_rng(0).integers(0, 61, size=(2, 9))
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    routed = MoEAdapter(loaded.adapter.hf_config, dispatch="sorted")
    got = jax.jit(routed.forward)(loaded.params, jnp.asarray(ids))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_captures_are_the_all_experts_taps():
    """Calibration (capture=True) sees the same taps, routing indicator included, whatever
    the dispatch; the block outputs agree."""
    cfg = {**_TINY, **FAMILIES["qwen2_moe"], "model_type": "qwen2_moe"}
    dense, routed = MoEAdapter(cfg, dispatch="dense"), MoEAdapter(cfg, dispatch="sorted")
    params = _random_params(dense)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 61, size=(2, 9)))
    h, ctx = dense.embed(params, ids)
    bp = dense.block_params(params, 0)
    run = jax.jit(lambda ad, capture: ad.block(bp, h, ctx, capture=capture), static_argnums=(0, 1))
    out_d, taps_d = run(dense, True)
    out_r, taps_r = run(routed, True)
    assert taps_d.keys() == taps_r.keys() and "mlp.routed" in taps_r
    for name in taps_d:
        np.testing.assert_array_equal(taps_r[name], taps_d[name])
    np.testing.assert_array_equal(out_r, out_d)
    np.testing.assert_allclose(run(routed, False), out_d, atol=1e-5, rtol=1e-5)


def test_expert_work_bytes_by_hand():
    """The memory plan's MoE working set: 1024 tokens, top-8 of 64, D 256, F 128, float32."""
    kw = dict(num_tokens=1024, top_k=8, num_experts=64, hidden=256, ffn=128, itemsize=4)
    routing = 8 * 1024 * 64 + 4 * 1024 * 64  # float32 logits and probabilities, weights
    dense = routing + 4 * (3 * 1024 * 128 + 1024 * 256)
    assert expert_work_bytes(**kw, method="dense") == dense == 3_407_872
    rows = 191 * 64  # tiles of 64 (test_auto_rule_by_hand)
    routed = routing + 3 * 64 * 128 * 256 * 4  # stacked expert weights
    routed += 16 * 1024 * 8 + rows * 8  # assignments; padded rows' sources and scales
    routed += 4 * (2 * rows * 256 + 2 * 1025 * 256) + 4 * 64 * (2 * 128 + 256)
    assert expert_work_bytes(**kw) == expert_work_bytes(**kw, method="sorted") == routed
