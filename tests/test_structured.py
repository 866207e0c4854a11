"""Structured (heads / neurons) pruner: physical slicing, least squares, OBS order, counts."""

from __future__ import annotations

import numpy as np
import pytest

from allocsearch.pruners import (
    DenseVariants,
    HeadGroups,
    LocalPruner,
    NeuronGroups,
    StructuredPruner,
    accumulate_stats,
)

# Tiny grouped-query attention: 4 query heads sharing 2 kv heads, head_dim 4.
ATTN = HeadGroups(hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=4)
SEQ, BATCH = 6, 24


def attention(
    x: np.ndarray, wq, wk, wv, wo, *, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """Causal GQA self-attention in float64 (Hugging Face layout and repeat_kv order).

    Returns the output [B, T, hidden] and the input of o_proj [B, T, heads*head_dim].
    """
    b, t, _ = x.shape
    q = (x @ wq.T).reshape(b, t, num_heads, head_dim)
    k = (x @ wk.T).reshape(b, t, num_kv_heads, head_dim)
    v = (x @ wv.T).reshape(b, t, num_kv_heads, head_dim)
    rep = num_heads // num_kv_heads
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
    logits = np.where(np.tril(np.ones((t, t), dtype=bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    heads = np.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, t, num_heads * head_dim)
    return heads @ wo.T, heads


def gated_mlp(x: np.ndarray, w_gate, w_up, w_down) -> tuple[np.ndarray, np.ndarray]:
    """Llama MLP in float64; returns the output and the input of down_proj."""
    g = x @ w_gate.T
    act = g / (1.0 + np.exp(-g)) * (x @ w_up.T)
    return act @ w_down.T, act


@pytest.fixture(scope="module")
def attn_case():
    rng = np.random.default_rng(0)
    h = ATTN.hidden_size
    weights = {
        "q": rng.normal(size=(ATTN.num_heads * ATTN.head_dim, h)) / 4,
        "k": rng.normal(size=(ATTN.num_kv_heads * ATTN.head_dim, h)) / 4,
        "v": rng.normal(size=(ATTN.num_kv_heads * ATTN.head_dim, h)),
        "o": rng.normal(size=(h, ATTN.in_features)),
    }
    x = rng.normal(size=(BATCH, SEQ, h))
    geo = dict(num_heads=4, num_kv_heads=2, head_dim=4)
    _, heads = attention(x, weights["q"], weights["k"], weights["v"], weights["o"], **geo)
    stats = accumulate_stats(None, heads.astype(np.float32))
    variants = StructuredPruner(layout=ATTN).prune(
        weights["o"].astype(np.float32), stats, [0.0, 0.5, 1.0]
    )
    return x, weights, heads.reshape(-1, ATTN.in_features), variants


def test_attention_variant_equals_the_physically_sliced_module(attn_case):
    x, w, _, variants = attn_case
    assert isinstance(variants, DenseVariants)
    np.testing.assert_array_equal(variants.group_keep, [[True, True], [True, False], [False] * 2])
    keep = variants.group_keep[1]
    wo = np.asarray(variants.weights[1], np.float64)
    dead = ATTN.dead_rows(keep)
    # Full-size model: dead rows of q/k/v zeroed, compensated o_proj with zero columns.
    full, _ = attention(
        x,
        np.where(dead["q"][:, None], 0.0, w["q"]),
        np.where(dead["k"][:, None], 0.0, w["k"]),
        np.where(dead["v"][:, None], 0.0, w["v"]),
        wo,
        num_heads=4,
        num_kv_heads=2,
        head_dim=4,
    )
    # Physically smaller model: 2 query heads sharing 1 kv head.
    cols = ATTN.column_keep(keep)
    small = {"q": w["q"][~dead["q"]], "k": w["k"][~dead["k"]], "v": w["v"][~dead["v"]]}
    sliced, _ = attention(
        x, small["q"], small["k"], small["v"], wo[:, cols], num_heads=2, num_kv_heads=1, head_dim=4
    )
    np.testing.assert_allclose(full, sliced, rtol=1e-12, atol=1e-12)
    n_params = sum(a.size for a in small.values()) + wo[:, cols].size
    assert ATTN.kept_params(keep) == n_params == 16 * 8 + 2 * 16 * 4 + 16 * 8


def test_kept_columns_alone_reproduce_the_variant_output(attn_case):
    _, _, heads, variants = attn_case
    for k in range(variants.num_levels):
        w_k = np.asarray(variants.weights[k], np.float64)
        cols = ATTN.column_keep(variants.group_keep[k])
        assert np.all(w_k[:, ~cols] == 0)
        np.testing.assert_allclose(
            heads[:, cols] @ w_k[:, cols].T, heads @ w_k.T, rtol=1e-12, atol=1e-12
        )
        assert variants.sparsity[k] == 1 - cols.mean() == np.mean(w_k == 0)


@pytest.fixture(scope="module")
def mlp_case():
    rng = np.random.default_rng(1)
    layout = NeuronGroups(hidden_size=8, intermediate_size=64, min_step=4)
    w = {
        "gate": rng.normal(size=(64, 8)),
        "up": rng.normal(size=(64, 8)),
        "down": rng.normal(size=(8, 64)),
    }
    x = rng.normal(size=(300, 8))
    x = x @ np.diag([4.0, 3.0, 1.0, 1.0, 0.5, 0.5, 0.2, 0.1])  # uneven input directions
    _, act = gated_mlp(x, w["gate"], w["up"], w["down"])
    stats = accumulate_stats(None, act.astype(np.float32))
    levels = np.array([0, 8, 32, 48]) / 64
    variants = StructuredPruner(layout=layout).prune(w["down"].astype(np.float32), stats, levels)
    return layout, x, w, act, variants


def test_mlp_variant_equals_the_physically_sliced_module(mlp_case):
    layout, x, w, _, variants = mlp_case
    for k in range(variants.num_levels):
        keep = variants.group_keep[k]
        assert keep.sum() == 64 - round(variants.sparsity[k] * 64)
        down = np.asarray(variants.weights[k], np.float64)
        dead = layout.dead_rows(keep)
        full, _ = gated_mlp(
            x,
            np.where(dead["gate"][:, None], 0.0, w["gate"]),
            np.where(dead["up"][:, None], 0.0, w["up"]),
            down,
        )
        sliced, _ = gated_mlp(x, w["gate"][keep], w["up"][keep], down[:, keep])
        np.testing.assert_allclose(full, sliced, rtol=1e-12, atol=1e-12)
        assert layout.kept_params(keep) == 3 * 8 * keep.sum()


def test_refit_is_the_damped_least_squares_optimum_and_beats_no_refit(mlp_case):
    _, _, w, act, variants = mlp_case
    h = act.T @ act
    h_damped = h + 0.01 * np.mean(np.diag(h)) * np.eye(64)
    dense_out = act @ w["down"].T
    for k in range(1, variants.num_levels):
        keep = variants.group_keep[k]
        w_k = np.asarray(variants.weights[k], np.float64)
        want = (w["down"] @ h_damped)[:, keep] @ np.linalg.inv(h_damped[np.ix_(keep, keep)])
        np.testing.assert_allclose(w_k[:, keep], want, rtol=2e-3, atol=2e-3)
        refit_err = np.linalg.norm(dense_out - act @ w_k.T)
        no_refit_err = np.linalg.norm(dense_out - act[:, keep] @ w["down"][:, keep].T)
        assert refit_err < 0.9 * no_refit_err


def test_mlp_levels_are_nested(mlp_case):
    _, _, _, _, variants = mlp_case
    keep = variants.group_keep
    assert np.all(keep[1:] <= keep[:-1])
    dense = mlp_case[2]["down"].astype(np.float32)
    np.testing.assert_array_equal(np.asarray(variants.weights[0]), dense)


def greedy_least_squares_order(w: np.ndarray, h: np.ndarray, width: int) -> list[int]:
    """Brute force: repeatedly remove the group whose removal (with an optimal refit of the
    rest) increases the damped objective tr((W - W') H (W - W')^T) the least."""
    n_groups = w.shape[1] // width
    removed: list[int] = []
    for _ in range(n_groups):
        best, best_err = -1, np.inf
        for g in range(n_groups):
            if g in removed:
                continue
            gone = np.zeros(w.shape[1], dtype=bool)
            for r in [*removed, g]:
                gone[r * width : (r + 1) * width] = True
            keep = ~gone
            fit = np.zeros_like(w)
            fit[:, keep] = (w @ h)[:, keep] @ np.linalg.inv(h[np.ix_(keep, keep)])
            err = np.trace((w - fit) @ h @ (w - fit).T)
            if err < best_err:
                best, best_err = g, err
        removed.append(best)
    return removed


def test_head_removal_order_matches_brute_force_greedy_least_squares():
    rng = np.random.default_rng(2)
    layout = HeadGroups(hidden_size=6, num_heads=5, num_kv_heads=5, head_dim=3)
    x = rng.normal(size=(400, 15)) + rng.normal(size=(400, 2)) @ rng.normal(size=(2, 15))
    w = rng.normal(size=(6, 15)) * np.repeat([1.0, 0.3, 2.0, 0.6, 1.3], 3)[None, :]
    stats = accumulate_stats(None, x.astype(np.float32))
    greedy = StructuredPruner(layout=layout, enumeration_limit=0, max_swaps=0)
    variants = greedy.prune(w.astype(np.float32), stats, np.arange(6) / 5)
    keep = variants.group_keep
    order = [int(np.flatnonzero(keep[k] & ~keep[k + 1])[0]) for k in range(5)]
    h = np.asarray(stats.hessian, np.float64)
    h_damped = h + 0.01 * np.mean(np.diag(h)) * np.eye(15)
    assert order == greedy_least_squares_order(w, h_damped, 3)


def test_removing_a_head_with_zero_output_columns_costs_nothing(attn_case):
    x, w, heads, _ = attn_case
    wo = w["o"].copy()
    wo[:, 8:16] = 0.0  # kv group 1 (query heads 2 and 3) contributes nothing
    stats = accumulate_stats(None, heads.astype(np.float32))
    variants = StructuredPruner(layout=ATTN).prune(wo.astype(np.float32), stats, [0.5])
    np.testing.assert_array_equal(variants.group_keep, [[True, False]])
    w_k = np.asarray(variants.weights[0], np.float64)
    np.testing.assert_allclose(heads @ w_k.T, heads @ wo.T, rtol=1e-5, atol=1e-5)


def test_neurons_that_never_fire_are_removed_first():
    rng = np.random.default_rng(3)
    layout = NeuronGroups(hidden_size=4, intermediate_size=32, min_step=1)
    act = rng.normal(size=(100, 32))
    act[:, [5, 17]] = 0.0
    w = rng.normal(size=(4, 32)).astype(np.float32)
    stats = accumulate_stats(None, act.astype(np.float32))
    variants = StructuredPruner(layout=layout).prune(w, stats, [2 / 32])
    assert set(np.flatnonzero(~variants.group_keep[0])) == {5, 17}
    # The other weights are refit on live inputs only: they stay the dense ones.
    np.testing.assert_allclose(
        np.delete(np.asarray(variants.weights[0]), [5, 17], axis=1),
        np.delete(w, [5, 17], axis=1),
        rtol=1e-4,
        atol=1e-4,
    )


def test_parameter_counts_include_dead_rows_and_biases():
    llama = HeadGroups(hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128)
    dense = 2 * 4096 * 4096 + 2 * 1024 * 4096  # q, o + k, v
    assert llama.dense_params == dense
    keep = np.array([[True] * 8, [False] + [True] * 7])
    np.testing.assert_array_equal(llama.kept_params(keep), [dense, dense * 7 // 8])
    biased = HeadGroups(
        hidden_size=6, num_heads=2, num_kv_heads=2, head_dim=3, qkv_bias=True, o_bias=True
    )
    # One head left: q, k, v rows 3 x (6 weights + 1 bias) each; o: 6 x 3 + 6 bias.
    assert biased.kept_params([True, False]) == 3 * 3 * 7 + 6 * 3 + 6
    mlp = NeuronGroups(
        hidden_size=6, intermediate_size=10, gated=False, in_bias=True, out_bias=True
    )
    assert mlp.kept_params(np.ones(10, bool)) == 10 * 7 + 6 * 10 + 6 == mlp.dense_params
    assert mlp.kept_params(np.arange(10) < 4) == 4 * 7 + 6 * 4 + 6
    assert set(mlp.dead_rows(np.ones(10, bool))) == {"fc_in"}


def test_dead_rows_follow_repeat_kv_order_and_fused_layout():
    gqa = HeadGroups(hidden_size=8, num_heads=4, num_kv_heads=2, head_dim=2, fused_qkv=True)
    rows = gqa.dead_rows([False, True])["qkv"]
    q, k, v = rows[:8], rows[8:12], rows[12:]
    np.testing.assert_array_equal(q, [True] * 4 + [False] * 4)  # heads 0, 1 share kv head 0
    np.testing.assert_array_equal(k, [True, True, False, False])
    np.testing.assert_array_equal(v, k)


def test_structured_pruner_contract_and_errors(attn_case):
    _, w, heads, _ = attn_case
    pruner = StructuredPruner(layout=ATTN)
    assert isinstance(pruner, LocalPruner) and not pruner.nested
    stats = accumulate_stats(None, heads.astype(np.float32))
    with pytest.raises(ValueError, match="not achievable exactly with 2 groups"):
        pruner.prune(w["o"], stats, [0.25])
    with pytest.raises(ValueError, match=r"output projection is \(16, 16\)"):
        pruner.prune(w["o"][:, :8], stats, [0.5])
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=4"):
        HeadGroups(hidden_size=8, num_heads=4, num_kv_heads=3, head_dim=2)
    with pytest.raises(ValueError, match="round_size must be a positive int"):
        StructuredPruner(layout=ATTN, round_size=0)
