"""Llama family (Llama 2/3, Mistral, Qwen2): RMSNorm, rotary embeddings with Llama-3 /
linear rope scaling, SwiGLU MLP, grouped-query attention, optional q/k/v(/o) biases, tied
or untied embeddings, causal (optionally sliding-window) mask.

Module paths mirror ``LlamaForCausalLM.named_modules()``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from allocsearch.models.base import (
    Embedding,
    Linear,
    ModelAdapter,
    RMSNorm,
    Taps,
    attention,
    causal_allowed,
)
from allocsearch.models.layers import LayerInfo

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class LlamaConfig:
    """The subset of a Hugging Face Llama/Mistral/Qwen2 config.json the forward needs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> LlamaConfig:
        model_type = cfg.get("model_type", "llama")
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            vocab = int(cfg["vocab_size"])
            inter = int(cfg["intermediate_size"])
            n_layers = int(cfg["num_hidden_layers"])
        except KeyError as e:
            raise ValueError(f"config.json of a {model_type} model lacks {e.args[0]!r}") from None
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported for {model_type}; valid: 'silu'")
        rope_params = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or None
        if scaling is None and rope_params.get("rope_type", "default") != "default":
            scaling = rope_params
        theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        if scaling is not None:
            rtype = scaling.get("rope_type", scaling.get("type", "default"))
            if rtype not in ROPE_TYPES:
                raise ValueError(
                    f"rope scaling type {rtype!r} is not supported; valid: {ROPE_TYPES}"
                )
            scaling = tuple(sorted((k, v) for k, v in scaling.items() if not isinstance(v, list)))
        qkv_bias = model_type == "qwen2" or bool(cfg.get("attention_bias", False))
        o_bias = model_type != "qwen2" and bool(cfg.get("attention_bias", False))
        window = None
        if model_type == "mistral":
            window = cfg.get("sliding_window")
        elif model_type == "qwen2" and cfg.get("use_sliding_window", False):
            raise ValueError("Qwen2 with use_sliding_window=true is not supported")
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=int(window) if window else None,
        )


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """float32[head_dim/2]: rotary inverse frequencies with the config's scaling."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float64) / dim))
    inv = inv.astype(np.float32).astype(np.float64)
    if cfg.rope_scaling is None:
        return inv.astype(np.float32)
    sc = dict(cfg.rope_scaling)
    rtype = sc.get("rope_type", sc.get("type", "default"))
    if rtype == "linear":
        inv = inv / float(sc["factor"])
    elif rtype == "llama3":
        # Llama 3.1: leave high frequencies, divide low ones by `factor`, and blend
        # smoothly in between (wavelengths measured against the original context).
        factor = float(sc["factor"])
        low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old_ctx = float(sc["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Apply rotary embedding (half-split convention of Hugging Face) to float[B,T,H,D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class LlamaContext(NamedTuple):
    cos: jax.Array  # float[B or 1, T, head_dim]
    sin: jax.Array
    allowed: jax.Array  # bool[B or 1, 1, T, T]


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(d, cfg.num_attention_heads * hd, bias=cfg.qkv_bias, rngs=rngs)
        self.k_proj = Linear(d, cfg.num_key_value_heads * hd, bias=cfg.qkv_bias, rngs=rngs)
        self.v_proj = Linear(d, cfg.num_key_value_heads * hd, bias=cfg.qkv_bias, rngs=rngs)
        self.o_proj = Linear(cfg.num_attention_heads * hd, d, bias=cfg.o_bias, rngs=rngs)
        self.num_heads = cfg.num_attention_heads
        self.num_kv = cfg.num_key_value_heads
        self.head_dim = hd

    def __call__(self, x: jax.Array, ctx: LlamaContext, taps: Taps | None) -> jax.Array:
        b, t, _ = x.shape
        if taps is not None:
            taps["self_attn.q_proj"] = x
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv, self.head_dim)
        q, k = rotate(q, ctx.cos, ctx.sin), rotate(k, ctx.cos, ctx.sin)
        out = attention(q, k, v, ctx.allowed).reshape(b, t, -1)
        if taps is not None:
            taps["self_attn.o_proj"] = out
        return self.o_proj(out)


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, bias=cfg.mlp_bias, rngs=rngs)
        self.up_proj = Linear(d, f, bias=cfg.mlp_bias, rngs=rngs)
        self.down_proj = Linear(f, d, bias=cfg.mlp_bias, rngs=rngs)

    def __call__(self, x: jax.Array, taps: Taps | None) -> jax.Array:
        if taps is not None:
            taps["mlp.gate_proj"] = x
        hidden = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        if taps is not None:
            taps["mlp.down_proj"] = hidden
        return self.down_proj(hidden)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg, rngs)

    def __call__(self, h: jax.Array, ctx: LlamaContext, taps: Taps | None = None) -> jax.Array:
        h = h + self.self_attn(self.input_layernorm(h), ctx, taps)
        return h + self.mlp(self.post_attention_layernorm(h), taps)


class LlamaModel(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.layers = nnx.List([LlamaDecoderLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.model = LlamaModel(cfg, rngs)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, bias=False, rngs=rngs)
        )


class LlamaAdapter(ModelAdapter):
    """Llama / Mistral / Qwen2 causal language models."""

    family = "llama"
    is_causal_lm = True

    def __init__(self, hf_config: Mapping[str, Any]):
        self.cfg = LlamaConfig.from_hf(hf_config)
        self._inv_freq = rope_inv_freq(self.cfg)
        super().__init__(hf_config)

    def build_module(self, rngs: nnx.Rngs) -> nnx.Module:
        return LlamaForCausalLM(self.cfg, rngs)

    def block_module(self, module: nnx.Module, i: int) -> nnx.Module:
        return module.model.layers[i]

    @property
    def num_blocks(self) -> int:
        return self.cfg.num_hidden_layers

    def block_prefix(self, i: int) -> str:
        return f"model.layers.{i}."

    def embed(self, params, input_ids, attention_mask=None):
        emb = jnp.take(params["model.embed_tokens.weight"], input_ids, axis=0)
        t = input_ids.shape[1]
        freqs = jnp.arange(t, dtype=jnp.float32)[:, None] * jnp.asarray(self._inv_freq)[None, :]
        angles = jnp.concatenate([freqs, freqs], axis=-1)[None]
        ctx = LlamaContext(
            cos=jnp.cos(angles).astype(emb.dtype),
            sin=jnp.sin(angles).astype(emb.dtype),
            allowed=causal_allowed(t, attention_mask, self.cfg.sliding_window),
        )
        return emb, ctx

    def finish(self, params, h, ctx):
        mod = self.module(params)
        h = mod.model.norm(h)
        if self.cfg.tie_word_embeddings:
            w = params["model.embed_tokens.weight"]
        else:
            w = params["lm_head.weight"]
        return jnp.einsum("btd,vd->btv", h, w.astype(h.dtype))

    def layers(self, *, include_embeddings=False, include_head=False) -> list[LayerInfo]:
        c = self.cfg
        d, hd, f = c.hidden_size, c.head_dim, c.intermediate_size
        q_out, kv_out = c.num_attention_heads * hd, c.num_key_value_heads * hd
        out: list[LayerInfo] = []
        if include_embeddings:
            out.append(LayerInfo("model.embed_tokens", "embed", -1, (c.vocab_size, d), 0, "embed"))
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            spec = [
                ("self_attn.q_proj", "q", (q_out, d), "self_attn.q_proj"),
                ("self_attn.k_proj", "k", (kv_out, d), "self_attn.q_proj"),
                ("self_attn.v_proj", "v", (kv_out, d), "self_attn.q_proj"),
                ("self_attn.o_proj", "o", (d, q_out), "self_attn.o_proj"),
                ("mlp.gate_proj", "gate", (f, d), "mlp.gate_proj"),
                ("mlp.up_proj", "up", (f, d), "mlp.gate_proj"),
                ("mlp.down_proj", "down", (d, f), "mlp.down_proj"),
            ]
            for rel, role, shape, group in spec:
                out.append(LayerInfo(p + rel, role, i, shape, shape[0] * shape[1], p + group))
        if include_head and not c.tie_word_embeddings:
            out.append(
                LayerInfo("lm_head", "lm_head", -1, (c.vocab_size, d), c.vocab_size * d, "lm_head")
            )
        return out

    def from_hf_tensors(self, tensors):
        params = dict(tensors)
        # Tied checkpoints may or may not carry a copy of the head; the model reads
        # the embedding, so a stored copy is dropped.
        if self.cfg.tie_word_embeddings:
            params.pop("lm_head.weight", None)
        # Rotary inverse frequencies are buffers in some exports, not parameters.
        for name in [n for n in params if n.endswith("rotary_emb.inv_freq")]:
            params.pop(name)
        return params
