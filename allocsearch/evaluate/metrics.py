"""Fitness metrics: how far a pruned model's outputs are from the dense model's.

Two layers:

* pure ``jnp`` functions over per-token (or per-sequence) arrays, computed in float32,
  that can be tested against hand-computed values and used inside ``jit``;
* :class:`Metric` objects that the :class:`~allocsearch.evaluate.evaluator.Evaluator` is
  given: each says what to keep of the dense model's outputs (``teacher_data``, computed
  once per calibration set) and how to turn a candidate's outputs into one loss per
  sequence (``sequence_losses``). Every loss is *lower is better* and is a mean over the
  sequence's positions, so the mean over sequences of equal length is the mean over
  tokens.

KL is measured as ``KL(dense || candidate)`` (the dense model's distribution first), as
EvoPress does. The top-k variant keeps only the dense model's ``k`` most likely tokens per
position and renormalises both distributions over them (Týr-the-Pruner uses k = 8192 for
128k vocabularies), which makes the stored teacher ``k / V`` the size of full
log-probabilities; with ``k = V`` it equals the full KL.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from allocsearch.models.bert import mean_pool

if TYPE_CHECKING:  # a typed config in, read only (the config module sits above this one)
    from allocsearch.config import EvaluatorConfig

TeacherData = tuple[jax.Array, ...]
"""Arrays kept from the dense model's outputs, each with a leading sequence axis."""

# Guards the denominators of normalised MSE and cosine distance against all-zero vectors.
_TINY = 1e-12


# --------------------------------------------------------------------------- pure functions


def log_probs(logits: jax.Array) -> jax.Array:
    """float32[..., V] log-softmax of logits float[..., V] (computed in float32)."""
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def kl_divergence(teacher_log_probs: jax.Array, student_logits: jax.Array) -> jax.Array:
    """Per-position ``KL(teacher || student)`` in nats (>= 0, lower is better).

    Args:
      teacher_log_probs: float[..., V], the dense model's log-probabilities.
      student_logits: float[..., V], the candidate's logits (normalised here).

    Returns:
      float32[...]: ``sum_v p_v (log p_v - log q_v)``.
    """
    lp = teacher_log_probs.astype(jnp.float32)
    lq = log_probs(student_logits)
    return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


def top_k_log_probs(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The ``k`` largest log-probabilities per position and their token ids.

    Args:
      logits: float[..., V].
      k: how many to keep, 1 <= k <= V.

    Returns:
      ``(values float32[..., k], indices int32[..., k])``, values in decreasing order and
      normalised over the full vocabulary.
    """
    values, indices = jax.lax.top_k(log_probs(logits), k)
    return values, indices.astype(jnp.int32)


def top_k_kl_divergence(
    teacher_values: jax.Array, teacher_indices: jax.Array, student_logits: jax.Array
) -> jax.Array:
    """Per-position KL over the teacher's top-k tokens, both sides renormalised over them.

    With ``p`` the teacher's probabilities of its ``k`` kept tokens and ``q`` the
    student's probabilities of the same tokens, each divided by its own sum over those
    tokens, returns ``sum_i p_i (log p_i - log q_i)`` (>= 0, lower is better; equals
    :func:`kl_divergence` when ``k = V``).

    Args:
      teacher_values: float[..., k], teacher log-probabilities (any normalisation).
      teacher_indices: int[..., k], their token ids.
      student_logits: float[..., V], the candidate's logits.

    Returns:
      float32[...].
    """
    lp = teacher_values.astype(jnp.float32)
    lp = lp - jax.nn.logsumexp(lp, axis=-1, keepdims=True)
    picked = jnp.take_along_axis(student_logits.astype(jnp.float32), teacher_indices, axis=-1)
    lq = picked - jax.nn.logsumexp(picked, axis=-1, keepdims=True)
    return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


def next_token_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Negative log-likelihood of each next token in nats (lower is better).

    Args:
      logits: float[B, T, V]; position ``t`` predicts token ``t + 1``.
      tokens: int[B, T], the input ids.

    Returns:
      float32[B, T - 1]: ``-log p(tokens[:, t + 1] | tokens[:, :t + 1])``. Perplexity is
      ``exp`` of its mean.
    """
    lq = log_probs(logits[:, :-1])
    target = tokens[:, 1:, None].astype(jnp.int32)
    return -jnp.take_along_axis(lq, target, axis=-1)[..., 0]


def normalized_mse(teacher_hidden: jax.Array, student_hidden: jax.Array) -> jax.Array:
    """Per-token squared error relative to the teacher's squared norm (lower is better).

    Args:
      teacher_hidden, student_hidden: float[..., D] hidden states.

    Returns:
      float32[...]: ``||s - t||^2 / ||t||^2`` (0 for identical states, 1 for all-zero
      student states).
    """
    t = teacher_hidden.astype(jnp.float32)
    s = student_hidden.astype(jnp.float32)
    err = jnp.sum(jnp.square(s - t), axis=-1)
    return err / jnp.maximum(jnp.sum(jnp.square(t), axis=-1), _TINY)


def cosine_distance(teacher_embedding: jax.Array, student_embedding: jax.Array) -> jax.Array:
    """``1 - cos(teacher, student)`` per vector, in [0, 2] (lower is better).

    Args:
      teacher_embedding, student_embedding: float[..., D].

    Returns:
      float32[...].
    """
    t = teacher_embedding.astype(jnp.float32)
    s = student_embedding.astype(jnp.float32)
    dot = jnp.sum(t * s, axis=-1)
    norms = jnp.sqrt(jnp.sum(t * t, axis=-1) * jnp.sum(s * s, axis=-1))
    return 1.0 - dot / jnp.maximum(norms, _TINY)


def nearest_neighbour_agreement(reference: np.ndarray, embeddings: np.ndarray) -> float:
    """Fraction of sequences whose nearest neighbour is the same under both embeddings
    (higher is better; 1 = the pruned model ranks the held-out set as the dense one does).

    Sequence ``i``'s nearest neighbour is the ``j != i`` of highest cosine similarity among
    the same set, ties to the lowest ``j``. A retrieval check beside the mean cosine
    distance: small embedding moves can still reorder neighbours.

    Args:
      reference: float[N, D] pooled embeddings of the dense model, N >= 2.
      embeddings: float[N, D] pooled embeddings of the pruned model, same sequences.

    Returns:
      The agreement in [0, 1].
    """
    ref = np.asarray(reference, dtype=np.float64)
    emb = np.asarray(embeddings, dtype=np.float64)
    if ref.ndim != 2 or ref.shape != emb.shape or ref.shape[0] < 2:
        raise ValueError(
            f"reference {ref.shape} and embeddings {emb.shape} must be the same [N, D] "
            "shape with N >= 2 sequences"
        )

    def neighbours(x: np.ndarray) -> np.ndarray:
        unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _TINY)
        sim = unit @ unit.T
        np.fill_diagonal(sim, -np.inf)
        return np.argmax(sim, axis=1)

    return float(np.mean(neighbours(ref) == neighbours(emb)))


# --------------------------------------------------------------------------- metric objects


class Metric(abc.ABC):
    """How a candidate is scored against the dense model; one loss per sequence.

    Call order (the evaluator's): for every chunk of the calibration set, once,
    ``teacher = metric.teacher_data(dense_outputs, tokens)``; the arrays are kept and
    indexed by sequence. Then, for every candidate and minibatch,
    ``metric.sequence_losses(teacher_rows, candidate_outputs, tokens)``. Both run inside
    ``jit``.

    Attributes:
      name: short identifier for reports and recipes' provenance.
      causal_lm: True when the metric reads logits float[B, T, V] of a causal language
        model; False when it reads final hidden states float[B, T, D] of an encoder.
    """

    name: ClassVar[str]
    causal_lm: ClassVar[bool]

    @abc.abstractmethod
    def teacher_data(self, outputs: jax.Array, tokens: jax.Array) -> TeacherData:
        """What to keep of the dense model's outputs float[B, T, *] for tokens int[B, T]:
        a tuple of arrays with leading axis B (empty if the metric needs no teacher)."""

    @abc.abstractmethod
    def sequence_losses(
        self, teacher: TeacherData, outputs: jax.Array, tokens: jax.Array
    ) -> jax.Array:
        """float32[B]: each sequence's loss (mean over its positions; lower is better)."""


@dataclass(frozen=True)
class KLDivergence(Metric):
    """Mean per-token ``KL(dense || candidate)`` over the full vocabulary, in nats.

    Keeps float32[B, T, V] log-probabilities of the dense model (4 V bytes per
    calibration token); use :class:`TopKKLDivergence` for large vocabularies.
    """

    name: ClassVar[str] = "kl"
    causal_lm: ClassVar[bool] = True

    def teacher_data(self, outputs: jax.Array, tokens: jax.Array) -> TeacherData:
        return (log_probs(outputs),)

    def sequence_losses(
        self, teacher: TeacherData, outputs: jax.Array, tokens: jax.Array
    ) -> jax.Array:
        return jnp.mean(kl_divergence(teacher[0], outputs), axis=-1)


@dataclass(frozen=True)
class TopKKLDivergence(Metric):
    """Mean per-token KL over the dense model's top-``k`` tokens, renormalised (nats).

    Keeps float32[B, T, k] log-probabilities and int32[B, T, k] token ids (8 k bytes per
    calibration token). ``k`` must not exceed the vocabulary.

    Attributes:
      k: tokens kept per position, >= 1.
    """

    k: int
    name: ClassVar[str] = "topk_kl"
    causal_lm: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"TopKKLDivergence.k must be a positive int, got {self.k!r}")

    def teacher_data(self, outputs: jax.Array, tokens: jax.Array) -> TeacherData:
        vocab = outputs.shape[-1]
        if self.k > vocab:
            raise ValueError(f"TopKKLDivergence.k={self.k} exceeds the vocabulary size {vocab}")
        return top_k_log_probs(outputs, self.k)

    def sequence_losses(
        self, teacher: TeacherData, outputs: jax.Array, tokens: jax.Array
    ) -> jax.Array:
        return jnp.mean(top_k_kl_divergence(teacher[0], teacher[1], outputs), axis=-1)


@dataclass(frozen=True)
class NegativeLogLikelihood(Metric):
    """Mean next-token negative log-likelihood in nats (``exp`` of it is perplexity).

    Needs no teacher; it measures the pruned model against the data, not the dense model.
    """

    name: ClassVar[str] = "nll"
    causal_lm: ClassVar[bool] = True

    def teacher_data(self, outputs: jax.Array, tokens: jax.Array) -> TeacherData:
        return ()

    def sequence_losses(
        self, teacher: TeacherData, outputs: jax.Array, tokens: jax.Array
    ) -> jax.Array:
        return jnp.mean(next_token_nll(outputs, tokens), axis=-1)


@dataclass(frozen=True)
class HiddenStateMSE(Metric):
    """Encoders: mean per-token :func:`normalized_mse` of the final hidden states.

    Keeps the dense model's float32[B, T, D] final hidden states.
    """

    name: ClassVar[str] = "hidden_nmse"
    causal_lm: ClassVar[bool] = False

    def teacher_data(self, outputs: jax.Array, tokens: jax.Array) -> TeacherData:
        return (outputs.astype(jnp.float32),)

    def sequence_losses(
        self, teacher: TeacherData, outputs: jax.Array, tokens: jax.Array
    ) -> jax.Array:
        return jnp.mean(normalized_mse(teacher[0], outputs), axis=-1)


@dataclass(frozen=True)
class EmbeddingCosineDistance(Metric):
    """Encoders: :func:`cosine_distance` of mean-pooled sentence embeddings, per sequence.

    Keeps the dense model's float32[B, D] mean-pooled embeddings (sentence-transformers'
    pooling; calibration sequences have no padding).
    """

    name: ClassVar[str] = "embedding_cosine"
    causal_lm: ClassVar[bool] = False

    def teacher_data(self, outputs: jax.Array, tokens: jax.Array) -> TeacherData:
        return (mean_pool(outputs.astype(jnp.float32), None),)

    def sequence_losses(
        self, teacher: TeacherData, outputs: jax.Array, tokens: jax.Array
    ) -> jax.Array:
        return cosine_distance(teacher[0], mean_pool(outputs.astype(jnp.float32), None))


__all__ = [
    "EmbeddingCosineDistance",
    "HiddenStateMSE",
    "KLDivergence",
    "Metric",
    "NegativeLogLikelihood",
    "TeacherData",
    "TopKKLDivergence",
    "cosine_distance",
    "kl_divergence",
    "log_probs",
    "make_metric",
    "nearest_neighbour_agreement",
    "next_token_nll",
    "normalized_mse",
    "top_k_kl_divergence",
    "top_k_log_probs",
]


def make_metric(cfg: EvaluatorConfig) -> Metric:
    """The metric object of ``evaluator.metric`` (KL, top-k KL and NLL for causal language
    models; embedding cosine distance and hidden-state NMSE for encoders)."""
    if cfg.metric == "topk_kl":
        return TopKKLDivergence(k=int(cfg.topk))
    if cfg.metric == "nll":
        return NegativeLogLikelihood()
    if cfg.metric == "embedding_cosine":
        return EmbeddingCosineDistance()
    if cfg.metric == "hidden_nmse":
        return HiddenStateMSE()
    return KLDivergence()
