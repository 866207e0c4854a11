"""Scoring allocations: fitness metrics and the JAX evaluator (see evaluator.py)."""

from allocsearch.evaluate.evaluator import EvalStats, Evaluator
from allocsearch.evaluate.metrics import (
    EmbeddingCosineDistance,
    HiddenStateMSE,
    KLDivergence,
    Metric,
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

__all__ = [
    "EmbeddingCosineDistance",
    "EvalStats",
    "Evaluator",
    "HiddenStateMSE",
    "KLDivergence",
    "Metric",
    "NegativeLogLikelihood",
    "TopKKLDivergence",
    "cosine_distance",
    "kl_divergence",
    "log_probs",
    "next_token_nll",
    "normalized_mse",
    "top_k_kl_divergence",
    "top_k_log_probs",
]
