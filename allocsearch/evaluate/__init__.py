"""Scoring allocations: fitness metrics and the JAX evaluators: resident (evaluator.py)
and block-streaming (streaming.py), one protocol (protocol.py)."""

from allocsearch.evaluate.evaluator import EvalStats, Evaluator, shard_rows
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
    nearest_neighbour_agreement,
    next_token_nll,
    normalized_mse,
    top_k_kl_divergence,
    top_k_log_probs,
)
from allocsearch.evaluate.protocol import AllocationEvaluator
from allocsearch.evaluate.streaming import StreamingEvaluator, StreamStats

__all__ = [
    "AllocationEvaluator",
    "EmbeddingCosineDistance",
    "EvalStats",
    "Evaluator",
    "HiddenStateMSE",
    "KLDivergence",
    "Metric",
    "NegativeLogLikelihood",
    "StreamStats",
    "StreamingEvaluator",
    "TopKKLDivergence",
    "cosine_distance",
    "kl_divergence",
    "log_probs",
    "nearest_neighbour_agreement",
    "next_token_nll",
    "normalized_mse",
    "shard_rows",
    "top_k_kl_divergence",
    "top_k_log_probs",
]
