"""GPT-2: learned positions, pre-LayerNorm blocks, fused q/k/v projection, GELU MLP,
LM head tied to the token embedding (or, with ``tie_word_embeddings: false``, its own
``lm_head.weight``, loaded, used and saved). Hugging Face stores the projections as
``Conv1D`` with weights of shape (in, out); they are transposed to the (out, in) layout
on load and back on save.

Module paths mirror ``GPT2LMHeadModel.named_modules()``. Checkpoints of the bare
``GPT2Model`` load too, and task models (``GPT2ForSequenceClassification``...) load with
their head kept untouched as an extra tensor (not prunable, not used by the forward,
written back on save); the forward gives the language-model logits of the tied head.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from allocsearch.models.base import (
    Embedding,
    LayerNorm,
    Linear,
    ModelAdapter,
    Taps,
    attention,
    causal_allowed,
)
from allocsearch.models.layers import LayerInfo

ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# Architectures with a task head on top of the transformer -> the head's tensor prefixes.
TASK_HEADS = {
    "GPT2ForSequenceClassification": ("score.",),
    "GPT2ForTokenClassification": ("classifier.",),
    "GPT2ForQuestionAnswering": ("qa_outputs.",),
    "GPT2DoubleHeadsModel": ("multiple_choice_head.",),
}
BARE = ("GPT2Model", "GPT2LMHeadModel")


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    layer_norm_epsilon: float
    activation: str
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> GPT2Config:
        act = cfg.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise ValueError(
                f"activation_function {act!r} not supported; valid: {list(ACTIVATIONS)}"
            )
        if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn"):
            raise ValueError(
                "GPT-2 variants with scale_attn_by_inverse_layer_idx or "
                "reorder_and_upcast_attn are not supported"
            )
        d = int(cfg.get("n_embd", 768))
        return cls(
            vocab_size=int(cfg.get("vocab_size", 50257)),
            n_positions=int(cfg.get("n_positions", 1024)),
            n_embd=d,
            n_layer=int(cfg.get("n_layer", 12)),
            n_head=int(cfg.get("n_head", 12)),
            n_inner=int(cfg.get("n_inner") or 4 * d),
            layer_norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-5)),
            activation=act,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            scale_attn_weights=bool(cfg.get("scale_attn_weights", True)),
        )


class GPT2Context(NamedTuple):
    allowed: jax.Array


class GPT2Attention(nnx.Module):
    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd, bias=True, rngs=rngs)
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd, bias=True, rngs=rngs)
        self.n_head = cfg.n_head
        self.scale = None if cfg.scale_attn_weights else 1.0

    def __call__(self, x, ctx: GPT2Context, taps: Taps | None):
        b, t, d = x.shape
        if taps is not None:
            taps["attn.c_attn"] = x
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
        shape = (b, t, self.n_head, d // self.n_head)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        out = attention(q, k, v, ctx.allowed, scale=self.scale)
        out = out.reshape(b, t, d)
        if taps is not None:
            taps["attn.c_proj"] = out
        return self.c_proj(out)


class GPT2MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        self.c_fc = Linear(cfg.n_embd, cfg.n_inner, bias=True, rngs=rngs)
        self.c_proj = Linear(cfg.n_inner, cfg.n_embd, bias=True, rngs=rngs)
        self.act = cfg.activation

    def __call__(self, x, taps: Taps | None):
        if taps is not None:
            taps["mlp.c_fc"] = x
        hidden = ACTIVATIONS[self.act](self.c_fc(x))
        if taps is not None:
            taps["mlp.c_proj"] = hidden
        return self.c_proj(hidden)


class GPT2Block(nnx.Module):
    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.attn = GPT2Attention(cfg, rngs)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)
        self.mlp = GPT2MLP(cfg, rngs)

    def __call__(self, h, ctx: GPT2Context, taps: Taps | None = None):
        h = h + self.attn(self.ln_1(h), ctx, taps)
        return h + self.mlp(self.ln_2(h), taps)


class GPT2Model(nnx.Module):
    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        self.wte = Embedding(cfg.vocab_size, cfg.n_embd, rngs=rngs)
        self.wpe = Embedding(cfg.n_positions, cfg.n_embd, rngs=rngs)
        self.h = nnx.List([GPT2Block(cfg, rngs) for _ in range(cfg.n_layer)])
        self.ln_f = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon)


class GPT2LMHeadModel(nnx.Module):
    def __init__(self, cfg: GPT2Config, rngs: nnx.Rngs):
        self.transformer = GPT2Model(cfg, rngs)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(cfg.n_embd, cfg.vocab_size, bias=False, rngs=rngs)
        )


class GPT2Adapter(ModelAdapter):
    """GPT-2 causal language models (tied or untied LM head)."""

    family = "gpt2"
    is_causal_lm = True

    def __init__(self, hf_config: Mapping[str, Any]):
        self.cfg = GPT2Config.from_hf(hf_config)
        arch = (hf_config.get("architectures") or [None])[0]
        if arch is not None and arch not in BARE and arch not in TASK_HEADS:
            raise ValueError(
                f"GPT-2 architecture {arch!r} is not supported; valid: "
                f"{sorted(BARE + tuple(TASK_HEADS))}"
            )
        # Tensors of a task head: kept as extras, never renamed, pruned or used.
        self.passthrough_prefixes = TASK_HEADS.get(arch, ())
        super().__init__(hf_config)

    def build_module(self, rngs):
        return GPT2LMHeadModel(self.cfg, rngs)

    def block_module(self, module, i):
        return module.transformer.h[i]

    @property
    def num_blocks(self) -> int:
        return self.cfg.n_layer

    def block_prefix(self, i: int) -> str:
        return f"transformer.h.{i}."

    def embed(self, params, input_ids, attention_mask=None):
        t = input_ids.shape[1]
        if t > self.cfg.n_positions:
            raise ValueError(f"sequence length {t} exceeds n_positions={self.cfg.n_positions}")
        h = jnp.take(params["transformer.wte.weight"], input_ids, axis=0)
        h = h + params["transformer.wpe.weight"][:t][None].astype(h.dtype)
        return h, GPT2Context(allowed=causal_allowed(t, attention_mask))

    def finish(self, params, h, ctx):
        h = self.module(params).transformer.ln_f(h)
        tied = self.cfg.tie_word_embeddings
        w = params["transformer.wte.weight" if tied else "lm_head.weight"]
        return jnp.einsum("btd,vd->btv", h, w.astype(h.dtype))

    def layers(self, *, include_embeddings=False, include_head=False) -> list[LayerInfo]:
        c = self.cfg
        d, f = c.n_embd, c.n_inner
        out: list[LayerInfo] = []
        if include_embeddings:
            out.append(LayerInfo("transformer.wte", "embed", -1, (c.vocab_size, d), 0, "embed"))
        for i in range(c.n_layer):
            p = f"transformer.h.{i}."
            for rel, role, shape in [
                ("attn.c_attn", "qkv", (3 * d, d)),
                ("attn.c_proj", "o", (d, d)),
                ("mlp.c_fc", "fc_in", (f, d)),
                ("mlp.c_proj", "fc_out", (d, f)),
            ]:
                out.append(LayerInfo(p + rel, role, i, shape, shape[0] * shape[1], p + rel))
        # A tied head is the token embedding, so only an untied one is a layer.
        if include_head and not c.tie_word_embeddings:
            out.append(
                LayerInfo("lm_head", "lm_head", -1, (c.vocab_size, d), c.vocab_size * d, "lm_head")
            )
        return out

    def from_hf_tensors(self, tensors):
        params = {}
        for name, arr in tensors.items():
            if name.startswith(self.passthrough_prefixes):
                params[name] = arr  # a task head, kept as is
                continue
            if not name.startswith("transformer.") and name != "lm_head.weight":
                name = "transformer." + name  # GPT2Model checkpoints lack the prefix
            if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
                continue  # causal-mask buffers of old exports
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue  # tied to transformer.wte.weight
            if name.endswith(".weight") and name.rsplit(".", 1)[0].split(".", 3)[-1] in CONV1D:
                arr = np.asarray(arr).T
            params[name] = arr
        return params

    def to_hf_tensors(self, params):
        out = {}
        for name, arr in params.items():
            if name.endswith(".weight") and name.rsplit(".", 1)[0].split(".", 3)[-1] in CONV1D:
                arr = np.ascontiguousarray(np.asarray(arr).T)
            out[name] = arr
        return out
