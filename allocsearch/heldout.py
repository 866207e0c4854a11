"""Held-out scoring of a (pruned) model, as reports show it: perplexity for causal
language models, distance to the dense model and neighbour agreement for encoders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

from allocsearch.data.tokenset import TokenSet
from allocsearch.evaluate.metrics import (
    EmbeddingCosineDistance,
    Metric,
    make_metric,
    nearest_neighbour_agreement,
)
from allocsearch.models.bert import mean_pool
from allocsearch.models.hf import HFModel
from allocsearch.models.streamed import streamed_nll_sum
from allocsearch.supernet.store import SupernetStore
from allocsearch.workspace import Workspace


def heldout_perplexity(model: HFModel, tokenset: TokenSet, *, batch_rows: int = 16) -> float:
    """Perplexity (exp of the mean next-token NLL; lower is better) of ``model`` over
    every sequence of ``tokenset`` (causal language models), streamed block by block
    (:func:`~allocsearch.models.streamed.streamed_nll_sum`), so a lazily loaded model
    never has to fit the device."""
    if not model.adapter.is_causal_lm:
        raise ValueError(f"perplexity needs a causal language model, not {model.adapter.family}")
    total = streamed_nll_sum(model.adapter, model.params, tokenset.tokens, batch_rows=batch_rows)
    return float(np.exp(total / (tokenset.n_seq * (tokenset.seq_len - 1))))


def heldout_metric(ws: Workspace) -> Metric:
    """The encoder metric of held-out scores: the configured one when it is an encoder
    metric, else the embedding cosine distance."""
    metric = make_metric(ws.config.evaluator)
    return metric if not metric.causal_lm else EmbeddingCosineDistance()


def heldout_label(ws: Workspace) -> str:
    """What :func:`heldout_score` measures, for reports: ``"held-out perplexity"`` (causal
    language models) or ``"held-out <metric> to the dense model"`` (encoders)."""
    if ws.model.adapter.is_causal_lm:
        return "held-out perplexity"
    return f"held-out {heldout_metric(ws).name} to the dense model"


@dataclass(frozen=True)
class HeldoutScores:
    """Held-out quality of a model, as reports show it.

    Attributes:
      score: what :func:`heldout_label` names, lower is better: perplexity (causal
        language models) or the mean per-sequence :func:`heldout_metric` to the dense
        model (encoders; 0 = the dense model's outputs).
      nn_agreement: encoders only (else None, and None with fewer than 2 held-out
        sequences): :func:`~allocsearch.evaluate.metrics.nearest_neighbour_agreement` of
        the mean-pooled embeddings of the held-out sequences, in [0, 1], higher is better.
    """

    score: float
    nn_agreement: float | None = None


def heldout_scores(
    ws: Workspace, model: HFModel, *, reference: HFModel | None = None, batch_rows: int = 16
) -> HeldoutScores:
    """Held-out quality of ``model``: :func:`heldout_perplexity` for a causal language
    model; for an encoder, the mean over held-out sequences of :func:`heldout_metric`
    between ``reference`` (default: the workspace's dense model) and ``model`` (e.g.
    embedding cosine distance), and the nearest-neighbour agreement of their mean-pooled
    embeddings. Encoders have no perplexity; they are judged by how far their outputs
    move and whether their embeddings still retrieve the same neighbours."""
    if model.adapter.is_causal_lm:
        return HeldoutScores(heldout_perplexity(model, ws.heldout, batch_rows=batch_rows))
    reference = ws.model if reference is None else reference
    metric = heldout_metric(ws)
    forward = jax.jit(model.adapter.forward)
    ref_forward = (
        forward if reference.adapter is model.adapter else jax.jit(reference.adapter.forward)
    )
    tokens = ws.heldout.tokens
    # encoders are small: both models resident (lazily loaded weights read once here)
    ref_params, params = dict(reference.params), dict(model.params)
    losses, ref_pooled, pooled = [], [], []
    for i in range(0, len(tokens), batch_rows):
        ids = jnp.asarray(tokens[i : i + batch_rows])
        ref_out, out = ref_forward(ref_params, ids), forward(params, ids)
        teacher = metric.teacher_data(ref_out, ids)
        losses.append(np.asarray(metric.sequence_losses(teacher, out, ids)))
        # held-out rows have no padding: every position counts in the pooled embedding
        ref_pooled.append(np.asarray(mean_pool(ref_out.astype(jnp.float32), None)))
        pooled.append(np.asarray(mean_pool(out.astype(jnp.float32), None)))
    agreement = (
        nearest_neighbour_agreement(np.concatenate(ref_pooled), np.concatenate(pooled))
        if len(tokens) >= 2
        else None
    )
    return HeldoutScores(float(np.mean(np.concatenate(losses))), agreement)


def heldout_score(
    ws: Workspace, model: HFModel, *, reference: HFModel | None = None, batch_rows: int = 16
) -> float:
    """:attr:`HeldoutScores.score` of :func:`heldout_scores` (lower is better)."""
    return heldout_scores(ws, model, reference=reference, batch_rows=batch_rows).score


def pruned_model(ws: Workspace, store: SupernetStore, choice: ArrayLike) -> HFModel:
    """The model with every pruned parameter at ``choice``'s level of ``store`` (on the
    host; only the chosen level of each parameter is read)."""
    choice = np.asarray(choice)
    params = dict(ws.model.params)
    for u, names in enumerate(store.unit_params):
        for name in names:
            dense = np.asarray(params[name])
            level = store.read_levels(name, [int(choice[u])], dense)[0]
            params[name] = level.astype(dense.dtype)  # host: perplexity streams blocks
    return HFModel(ws.model.adapter, params)


def evaluated_model(ws: Workspace, evaluator: Any, choice: ArrayLike) -> HFModel:
    """The model an evaluator scores for ``choice``: its materialised parameters
    (resident) or the chosen levels read from its store (streaming)."""
    if hasattr(evaluator, "materialize"):
        return HFModel(ws.model.adapter, evaluator.materialize(choice))
    return pruned_model(ws, evaluator.store, choice)
