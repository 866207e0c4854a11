"""BERT-style encoders (as in sentence-transformers MiniLM models): word, position and
token-type embeddings, post-LayerNorm blocks, GELU MLP, bidirectional attention with a
padding mask. The forward returns final hidden states; :func:`mean_pool` gives the
sentence embedding sentence-transformers computes.

Module paths mirror ``BertModel.named_modules()``. Checkpoints of task models
(``BertForSequenceClassification``, ``BertForMaskedLM``... as ``architectures`` in
config.json names them) load too: the encoder's ``bert.`` prefix is removed on load and
restored on save, and the task head (``classifier.``, ``qa_outputs.``, ``cls.``) and the
pooler are kept untouched as extra tensors (not prunable, not used by the forward, written
back on save). ``forward`` takes ``token_type_ids`` (sentence pairs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from allocsearch.models.base import (
    Embedding,
    LayerNorm,
    Linear,
    ModelAdapter,
    Taps,
    attention,
    padding_allowed,
)
from allocsearch.models.layers import LayerInfo

# Architectures -> the tensor prefixes of their task head (kept as extras).
TASK_HEADS = {
    "BertForSequenceClassification": ("classifier.",),
    "BertForTokenClassification": ("classifier.",),
    "BertForMultipleChoice": ("classifier.",),
    "BertForQuestionAnswering": ("qa_outputs.",),
    "BertForMaskedLM": ("cls.",),
    "BertForPreTraining": ("cls.",),
    "BertForNextSentencePrediction": ("cls.",),
    "BertLMHeadModel": ("cls.",),
}
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> BertConfig:
        act = cfg.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {act!r} not supported; valid: {list(ACTIVATIONS)}")
        pos = cfg.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(f"position_embedding_type {pos!r} not supported; valid: 'absolute'")
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=int(cfg["num_attention_heads"]),
            intermediate_size=int(cfg["intermediate_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 512)),
            type_vocab_size=int(cfg.get("type_vocab_size", 2)),
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
            hidden_act=act,
        )


class BertContext(NamedTuple):
    allowed: jax.Array | None


class BertSelfAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.query = Linear(d, d, bias=True, rngs=rngs)
        self.key = Linear(d, d, bias=True, rngs=rngs)
        self.value = Linear(d, d, bias=True, rngs=rngs)
        self.n_head = cfg.num_attention_heads

    def __call__(self, x, ctx: BertContext):
        b, t, d = x.shape
        shape = (b, t, self.n_head, d // self.n_head)
        q, k, v = (m(x).reshape(shape) for m in (self.query, self.key, self.value))
        return attention(q, k, v, ctx.allowed).reshape(b, t, d)


class BertSelfOutput(nnx.Module):
    def __init__(self, cfg: BertConfig, in_features: int, rngs: nnx.Rngs):
        self.dense = Linear(in_features, cfg.hidden_size, bias=True, rngs=rngs)
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def __call__(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.self = BertSelfAttention(cfg, rngs)
        self.output = BertSelfOutput(cfg, cfg.hidden_size, rngs)


class BertIntermediate(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, rngs=rngs)


class BertLayer(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.attention = BertAttention(cfg, rngs)
        self.intermediate = BertIntermediate(cfg, rngs)
        self.output = BertSelfOutput(cfg, cfg.intermediate_size, rngs)
        self.act = cfg.hidden_act

    def __call__(self, h, ctx: BertContext, taps: Taps | None = None):
        if taps is not None:
            taps["attention.self.query"] = h
        a = self.attention.self(h, ctx)
        if taps is not None:
            taps["attention.output.dense"] = a
        h = self.attention.output(a, h)
        if taps is not None:
            taps["intermediate.dense"] = h
        f = ACTIVATIONS[self.act](self.intermediate.dense(h))
        if taps is not None:
            taps["output.dense"] = f
        return self.output(f, h)


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.position_embeddings = Embedding(
            cfg.max_position_embeddings, cfg.hidden_size, rngs=rngs
        )
        self.token_type_embeddings = Embedding(cfg.type_vocab_size, cfg.hidden_size, rngs=rngs)
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)


class BertEncoder(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.layer = nnx.List([BertLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])


class BertModel(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.embeddings = BertEmbeddings(cfg, rngs)
        self.encoder = BertEncoder(cfg, rngs)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """Mean of float[B, T, D] hidden states over unmasked tokens -> float[B, D]."""
    if attention_mask is None:
        return jnp.mean(hidden, axis=1)
    m = attention_mask.astype(hidden.dtype)[..., None]
    return jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


class BertAdapter(ModelAdapter):
    """BERT-style encoders; ``forward`` returns final hidden states float[B, T, D]."""

    family = "bert"
    is_causal_lm = False

    def __init__(self, hf_config: Mapping[str, Any]):
        self.cfg = BertConfig.from_hf(hf_config)
        arch = (hf_config.get("architectures") or [None])[0]
        if arch is not None and arch != "BertModel" and arch not in TASK_HEADS:
            raise ValueError(
                f"BERT architecture {arch!r} is not supported; valid: "
                f"{sorted(('BertModel', *TASK_HEADS))}"
            )
        # Task models keep the encoder under ``bert.``; their head and pooler are extras
        # (tensors the forward does not use but a saved checkpoint keeps).
        self.checkpoint_prefix = "bert." if arch in TASK_HEADS else ""
        self.passthrough_prefixes = ("pooler.", "cls.", "bert.pooler.", *TASK_HEADS.get(arch, ()))
        super().__init__(hf_config)

    def build_module(self, rngs):
        return BertModel(self.cfg, rngs)

    def block_module(self, module, i):
        return module.encoder.layer[i]

    @property
    def num_blocks(self) -> int:
        return self.cfg.num_hidden_layers

    def block_prefix(self, i: int) -> str:
        return f"encoder.layer.{i}."

    def embed(self, params, input_ids, attention_mask=None, token_type_ids=None):
        t = input_ids.shape[1]
        if t > self.cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {t} exceeds max_position_embeddings="
                f"{self.cfg.max_position_embeddings}"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        h = jnp.take(params["embeddings.word_embeddings.weight"], input_ids, axis=0)
        h = h + params["embeddings.position_embeddings.weight"][:t][None].astype(h.dtype)
        h = h + jnp.take(params["embeddings.token_type_embeddings.weight"], token_type_ids, axis=0)
        h = self.module(params).embeddings.LayerNorm(h)
        return h, BertContext(allowed=padding_allowed(attention_mask))

    def finish(self, params, h, ctx):
        return h

    def forward(self, params, input_ids, attention_mask=None, token_type_ids=None):
        """Final hidden states float[B, T, D]; ``token_type_ids`` int[B, T] (segment of
        each token, 0 when omitted)."""
        h, ctx = self.embed(params, input_ids, attention_mask, token_type_ids)
        for i in range(self.num_blocks):
            h = self.block(self.block_params(params, i), h, ctx)
        return self.finish(params, h, ctx)

    def layers(self, *, include_embeddings=False, include_head=False) -> list[LayerInfo]:
        c = self.cfg
        d, f = c.hidden_size, c.intermediate_size
        out: list[LayerInfo] = []
        if include_embeddings:
            out.append(
                LayerInfo("embeddings.word_embeddings", "embed", -1, (c.vocab_size, d), 0, "embed")
            )
        for i in range(c.num_hidden_layers):
            p = f"encoder.layer.{i}."
            for rel, role, shape, group in [
                ("attention.self.query", "q", (d, d), "attention.self.query"),
                ("attention.self.key", "k", (d, d), "attention.self.query"),
                ("attention.self.value", "v", (d, d), "attention.self.query"),
                ("attention.output.dense", "o", (d, d), "attention.output.dense"),
                ("intermediate.dense", "fc_in", (f, d), "intermediate.dense"),
                ("output.dense", "fc_out", (d, f), "output.dense"),
            ]:
                out.append(LayerInfo(p + rel, role, i, shape, shape[0] * shape[1], p + group))
        return out

    def from_hf_tensors(self, tensors):
        params = {}
        for name, arr in tensors.items():
            # A task model's pooler stays under its full name (an extra); a checkpoint
            # read as the bare model drops the prefix everywhere.
            body = ("bert.embeddings.", "bert.encoder.") if self.checkpoint_prefix else ("bert.",)
            if name.startswith(body):
                name = name[len("bert.") :]
            if name in ("embeddings.position_ids", "embeddings.token_type_ids"):
                continue  # buffers in some exports
            params[name] = arr
        return params

    def to_hf_tensors(self, params):
        return {self.checkpoint_prefix + k: v for k, v in params.items()}
