"""Fitness metrics against hand-computed values and float64 numpy references."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from allocsearch.evaluate.metrics import (
    EmbeddingCosineDistance,
    HiddenStateMSE,
    KLDivergence,
    NegativeLogLikelihood,
    TopKKLDivergence,
    cosine_distance,
    kl_divergence,
    log_probs,
    next_token_nll,
    normalized_mse,
    top_k_kl_divergence,
    top_k_log_probs,
)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def np_kl(teacher_logits: np.ndarray, student_logits: np.ndarray) -> np.ndarray:
    lp, lq = np_log_softmax(teacher_logits), np_log_softmax(student_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def test_kl_hand_computed():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3).
    teacher = jnp.log(jnp.array([0.5, 0.5]))
    student = jnp.log(jnp.array([0.25, 0.75])) + 7.0  # logits: any shift
    got = float(kl_divergence(teacher, student))
    assert got == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)


def test_kl_matches_numpy_and_is_zero_on_itself():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(2, 3, 11)) * 3
    s = t + rng.normal(size=t.shape)
    got = np.asarray(kl_divergence(log_probs(jnp.asarray(t)), jnp.asarray(s)))
    np.testing.assert_allclose(got, np_kl(t, s), rtol=1e-5, atol=1e-7)
    assert got.shape == (2, 3) and np.all(got > 0)
    same = np.asarray(kl_divergence(log_probs(jnp.asarray(t)), jnp.asarray(t)))
    np.testing.assert_allclose(same, 0.0, atol=1e-6)


def test_top_k_log_probs_keeps_the_largest():
    logits = jnp.array([[1.0, 4.0, 2.0, 3.0]])
    values, indices = top_k_log_probs(logits, 2)
    np.testing.assert_array_equal(np.asarray(indices), [[1, 3]])
    full = np_log_softmax(np.array([[1.0, 4.0, 2.0, 3.0]]))
    np.testing.assert_allclose(np.asarray(values), full[:, [1, 3]], rtol=1e-6)
    assert indices.dtype == jnp.int32


def test_top_k_kl_hand_computed():
    # Teacher top-2 tokens {1, 3} with probabilities renormalised to (3/4, 1/4); the
    # student's probabilities of those tokens renormalised to (1/2, 1/2).
    teacher_values = jnp.log(jnp.array([0.3, 0.1]))  # any common normalisation
    teacher_indices = jnp.array([1, 3])
    student = jnp.log(jnp.array([0.4, 0.2, 0.2, 0.2]))
    got = float(top_k_kl_divergence(teacher_values, teacher_indices, student))
    want = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert got == pytest.approx(want, rel=1e-6)


def test_top_k_kl_with_whole_vocabulary_equals_kl_and_numpy_for_small_k():
    rng = np.random.default_rng(1)
    t = rng.normal(size=(4, 9)) * 2
    s = t + 0.5 * rng.normal(size=t.shape)
    values, indices = top_k_log_probs(jnp.asarray(t), 9)
    full = np.asarray(top_k_kl_divergence(values, indices, jnp.asarray(s)))
    np.testing.assert_allclose(full, np_kl(t, s), rtol=1e-5)
    values, indices = top_k_log_probs(jnp.asarray(t), 3)
    idx = np.argsort(-t, axis=-1)[:, :3]
    want = np_kl(np.take_along_axis(t, idx, -1), np.take_along_axis(s, idx, -1))
    got = np.asarray(top_k_kl_divergence(values, indices, jnp.asarray(s)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # float32 cancellation


def test_next_token_nll_hand_computed():
    # Uniform logits over V tokens: every next token costs ln V.
    assert np.asarray(next_token_nll(jnp.zeros((1, 3, 5)), jnp.zeros((1, 3), jnp.int32))) == (
        pytest.approx(math.log(5))
    )
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 4, 6))
    tokens = rng.integers(0, 6, size=(2, 4))
    got = np.asarray(next_token_nll(jnp.asarray(logits), jnp.asarray(tokens)))
    lp = np_log_softmax(logits)
    want = -np.take_along_axis(lp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_normalized_mse_hand_computed():
    t = jnp.array([[3.0, 4.0], [1.0, 0.0]])
    s = jnp.array([[3.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(np.asarray(normalized_mse(t, s)), [16 / 25, 1.0], rtol=1e-6)
    assert float(normalized_mse(t[0], t[0])) == 0.0


def test_cosine_distance_hand_computed():
    t = jnp.array([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    s = jnp.array([[0.0, 3.0], [1.0, 1.0], [5.0, 0.0], [-1.0, 0.0]])
    want = [1.0, 1.0 - 1.0 / math.sqrt(2.0), 0.0, 2.0]
    np.testing.assert_allclose(np.asarray(cosine_distance(t, s)), want, rtol=1e-6, atol=1e-7)


def test_metric_objects_reduce_per_sequence():
    rng = np.random.default_rng(3)
    t = rng.normal(size=(2, 5, 7))
    s = t + rng.normal(size=t.shape)
    tokens = jnp.asarray(rng.integers(0, 7, size=(2, 5)))
    kl = KLDivergence()
    got = np.asarray(kl.sequence_losses(kl.teacher_data(jnp.asarray(t), tokens), s, tokens))
    np.testing.assert_allclose(got, np_kl(t, s).mean(axis=1), rtol=1e-5)

    topk = TopKKLDivergence(k=7)
    teacher = topk.teacher_data(jnp.asarray(t), tokens)
    assert [a.shape for a in teacher] == [(2, 5, 7), (2, 5, 7)]
    np.testing.assert_allclose(
        np.asarray(topk.sequence_losses(teacher, jnp.asarray(s), tokens)), got, rtol=1e-5
    )

    nll = NegativeLogLikelihood()
    assert nll.teacher_data(jnp.asarray(t), tokens) == ()
    want = np.asarray(next_token_nll(jnp.asarray(s), tokens)).mean(axis=1)
    np.testing.assert_allclose(np.asarray(nll.sequence_losses((), jnp.asarray(s), tokens)), want)

    mse = HiddenStateMSE()
    got = mse.sequence_losses(mse.teacher_data(jnp.asarray(t), tokens), jnp.asarray(s), tokens)
    want = (((s - t) ** 2).sum(-1) / (t**2).sum(-1)).mean(axis=1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)

    cos = EmbeddingCosineDistance()
    teacher = cos.teacher_data(jnp.asarray(t), tokens)
    assert teacher[0].shape == (2, 7)
    pt, ps = t.mean(axis=1), s.mean(axis=1)
    want = 1 - (pt * ps).sum(-1) / np.linalg.norm(pt, axis=-1) / np.linalg.norm(ps, axis=-1)
    got = cos.sequence_losses(teacher, jnp.asarray(s), tokens)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_top_k_validation():
    with pytest.raises(ValueError, match="positive int, got 0"):
        TopKKLDivergence(k=0)
    with pytest.raises(ValueError, match="k=9 exceeds the vocabulary size 7"):
        TopKKLDivergence(k=9).teacher_data(jnp.zeros((1, 2, 7)), jnp.zeros((1, 2), jnp.int32))
