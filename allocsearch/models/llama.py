"""Llama-architecture decoders: Llama 2/3, Mistral, Qwen2, Qwen3, OLMo 2, Granite, Gemma,
Gemma 2 and Gemma 3 (text); Phi-3 reuses them with fused projections (``phi3.py``). One
module tree covers them all; a family differs only in config-derived traits
(:class:`LlamaConfig`):

- RMSNorm, optionally stored as ``scale - 1`` (Gemma: ``1 + weight``);
- norm placement: pre-norm (Llama), post-norm on each sublayer's output (OLMo 2), or
  both (Gemma 2/3: input, post-attention, pre- and post-feedforward norms);
- q/k RMSNorm per head (Qwen3, Gemma 3) or over the whole projection (OLMo 2);
- gated MLP with SiLU or tanh-GELU (Gemma), grouped-query attention, optional biases;
- multipliers: embedding (Granite; Gemma's sqrt(hidden)), residual, attention score
  scale (Granite's ``attention_multiplier``, Gemma's ``query_pre_attn_scalar**-0.5``),
  logits divisor (Granite), tanh soft-capping of attention scores and logits (Gemma 2);
- every rope type of :mod:`allocsearch.models.rope`;
- per-layer attention types (``layer_types``: full or sliding-window attention, each type
  with its own rope, as Gemma 2/3 and Qwen2/3 with ``use_sliding_window`` have).

Per-layer attention types are data, not separate programs: :meth:`LlamaAdapter.embed`
builds one mask and one cos/sin table per attention type, and each block carries the
index of its type as a :class:`~allocsearch.models.base.BlockConstant`
(``model.layers.{i}.layer_type_id``) in the parameter dict, so one compiled block serves
every layer. The constant exists only when a model has more than one attention type.

Module paths mirror ``LlamaForCausalLM.named_modules()`` (and the other families', which
use the same names).
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
    BlockConstant,
    Embedding,
    Linear,
    ModelAdapter,
    RMSNorm,
    Taps,
    attention,
    causal_allowed,
)
from allocsearch.models.layers import LayerInfo
from allocsearch.models.rope import RopeSpec, rotate

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
ATTENTION_TYPES = ("full_attention", "sliding_attention")
# Hugging Face model_type -> the traits it adds to a plain Llama (defaults of the
# transformers config classes, used when a config.json omits the key).
MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "olmo2",
    "granite",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
)
_GEMMA = ("gemma", "gemma2", "gemma3_text")


@dataclass(frozen=True)
class LlamaConfig:
    """The subset of a Llama-architecture config.json the forward needs.

    Attributes beyond the usual sizes:
      layer_type_ids: per layer, the index of its attention type in ``attention_types``.
      attention_types: the distinct attention types in use (``ATTENTION_TYPES``), in order.
      windows: per attention type, the sliding window (keys at distance < window are
        visible) or None for full causal attention.
      ropes: per attention type, its rotary embedding.
      qk_norm: None, ``"head"`` (RMSNorm over each head: Qwen3, Gemma 3) or ``"proj"``
        (over the whole q / k projection: OLMo 2).
      norm_layout: ``"pre"`` (Llama), ``"post"`` (OLMo 2) or ``"sandwich"`` (Gemma 2/3).
      norm_offset: 1.0 when norms store ``scale - 1`` (Gemma), else 0.0.
      embedding_multiplier, residual_multiplier, logits_scaling: Granite's multipliers
        (embedding_multiplier is sqrt(hidden_size) for Gemma); logits are divided by
        logits_scaling.
      attention_scale: multiplier of q.k (None: head_dim**-0.5).
      attn_softcap, final_softcap: tanh soft-capping of attention scores and logits.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    layer_type_ids: tuple[int, ...]
    attention_types: tuple[str, ...]
    windows: tuple[int | None, ...]
    ropes: tuple[RopeSpec, ...]
    hidden_act: str = "silu"
    qk_norm: str | None = None
    norm_layout: str = "pre"
    norm_offset: float = 0.0
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    attention_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None

    @property
    def num_attention_types(self) -> int:
        return len(self.attention_types)

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> LlamaConfig:
        model_type = cfg.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not a Llama variant; valid: {MODEL_TYPES}"
            )
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            vocab = int(cfg["vocab_size"])
            inter = int(cfg["intermediate_size"])
            n_layers = int(cfg["num_hidden_layers"])
        except KeyError as e:
            raise ValueError(f"config.json of a {model_type} model lacks {e.args[0]!r}") from None
        gemma = model_type in _GEMMA
        if model_type in ("gemma2", "gemma3_text"):
            act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        elif model_type == "gemma":
            act = cfg.get("hidden_act") or cfg.get("hidden_activation") or "gelu_pytorch_tanh"
        else:
            act = cfg.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act {act!r} is not supported for {model_type}; valid: {list(ACTIVATIONS)}"
            )
        if model_type == "gemma3_text" and cfg.get("use_bidirectional_attention"):
            raise ValueError(
                "gemma3_text with use_bidirectional_attention=true (an encoder) is not supported"
            )
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        types, type_names, windows = _attention_types(cfg, model_type, n_layers)
        ropes = _ropes(cfg, model_type, type_names, head_dim)
        attention_bias = bool(cfg.get("attention_bias", False))
        qkv_bias = model_type == "qwen2" or attention_bias
        o_bias = model_type != "qwen2" and attention_bias
        traits: dict[str, Any] = {}
        if model_type == "qwen3":
            traits.update(qk_norm="head")
        elif model_type == "olmo2":
            traits.update(qk_norm="proj", norm_layout="post")
        elif model_type == "granite":
            traits.update(
                embedding_multiplier=float(cfg.get("embedding_multiplier", 1.0)),
                residual_multiplier=float(cfg.get("residual_multiplier", 1.0)),
                logits_scaling=float(cfg.get("logits_scaling", 1.0)),
                attention_scale=float(cfg.get("attention_multiplier", 1.0)),
            )
        elif gemma:
            traits.update(norm_offset=1.0, embedding_multiplier=math.sqrt(hidden))
            if model_type != "gemma":
                softcaps = (50.0, 30.0) if model_type == "gemma2" else (None, None)
                attn_cap = cfg.get("attn_logit_softcapping", softcaps[0])
                final_cap = cfg.get("final_logit_softcapping", softcaps[1])
                traits.update(
                    norm_layout="sandwich",
                    attention_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5,
                    attn_softcap=float(attn_cap) if attn_cap else None,
                    final_softcap=float(final_cap) if final_cap else None,
                )
            if model_type == "gemma3_text":
                traits.update(qk_norm="head")
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            layer_type_ids=types,
            attention_types=type_names,
            windows=windows,
            ropes=ropes,
            hidden_act=act,
            **traits,
        )


def _attention_types(
    cfg: Mapping[str, Any], model_type: str, n_layers: int
) -> tuple[tuple[int, ...], tuple[str, ...], tuple[int | None, ...]]:
    """(per-layer type index, distinct type names, per-type window) from ``layer_types``
    or, for configs written without it, the family's default pattern."""
    window = cfg.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        window = None
    if model_type not in ("qwen2", "qwen3", "gemma2", "gemma3_text"):
        # Mistral and Phi-3 slide in every layer; the other families never slide.
        window = window if model_type in ("mistral", "phi3") else None
        name = "sliding_attention" if window else "full_attention"
        return (0,) * n_layers, (name,), (int(window) if window else None,)
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        if model_type in ("qwen2", "qwen3"):
            start = int(cfg.get("max_window_layers", 28))
            layer_types = [
                "sliding_attention" if window and i >= start else "full_attention"
                for i in range(n_layers)
            ]
        else:
            period = 2 if model_type == "gemma2" else int(cfg.get("sliding_window_pattern", 6))
            layer_types = [
                "sliding_attention" if (i + 1) % period else "full_attention"
                for i in range(n_layers)
            ]
    layer_types = list(layer_types)
    if len(layer_types) != n_layers:
        raise ValueError(
            f"layer_types has {len(layer_types)} entries for num_hidden_layers={n_layers}"
        )
    bad = sorted(set(layer_types) - set(ATTENTION_TYPES))
    if bad:
        raise ValueError(f"layer_types {bad} are not supported; valid: {ATTENTION_TYPES}")
    if "sliding_attention" in layer_types and not window:
        raise ValueError(
            f"{model_type}: layer_types has sliding layers but sliding_window is unset"
        )
    names = tuple(t for t in ATTENTION_TYPES if t in layer_types)
    ids = tuple(names.index(t) for t in layer_types)
    windows = tuple(int(window) if t == "sliding_attention" else None for t in names)
    return ids, names, windows


def _ropes(
    cfg: Mapping[str, Any], model_type: str, type_names: tuple[str, ...], head_dim: int
) -> tuple[RopeSpec, ...]:
    """One rope per attention type: ``rope_parameters`` nested by layer type (Gemma 3) or
    one dict for all; legacy ``rope_scaling`` / ``rope_theta`` / ``rope_local_base_freq``."""
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or None
    theta = float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)) or 10000.0)
    max_pos = int(cfg.get("max_position_embeddings", 2048))
    original = cfg.get("original_max_position_embeddings")
    nested = {t: params[t] for t in ATTENTION_TYPES if isinstance(params.get(t), Mapping)}
    out = []
    for name in type_names:
        if nested:
            rope = dict(nested.get(name) or {})
        else:
            rope = dict(legacy) if legacy is not None and not params.get("rope_type") else params
        if model_type == "phi3" and rope.get("rope_type", rope.get("type")) in ("su", "yarn"):
            rope = {**rope, "rope_type": "longrope"}  # as transformers' Phi3Config renames them
        base = theta
        if model_type == "gemma3_text":
            if name == "sliding_attention":
                base = float(cfg.get("rope_local_base_freq", 10000.0))
                if not nested:  # legacy configs scale only the global rope
                    rope = {}
            elif "rope_theta" not in cfg and "rope_theta" not in rope:
                base = 1_000_000.0
        out.append(
            RopeSpec.from_config(
                rope,
                theta=base,
                head_dim=head_dim,
                max_position_embeddings=max_pos,
                original_max_position_embeddings=original,
                where=f"{model_type} ({name})",
            )
        )
    return tuple(out)


class LlamaContext(NamedTuple):
    """What every block reads besides its weights, one entry per attention type."""

    cos: jax.Array  # float[A, 1, T, head_dim]
    sin: jax.Array
    allowed: jax.Array  # bool[A, B or 1, 1, T, T]


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
        self.q_proj = Linear(d, q_out, bias=cfg.qkv_bias, rngs=rngs)
        self.k_proj = Linear(d, kv_out, bias=cfg.qkv_bias, rngs=rngs)
        self.v_proj = Linear(d, kv_out, bias=cfg.qkv_bias, rngs=rngs)
        self.o_proj = Linear(q_out, d, bias=cfg.o_bias, rngs=rngs)
        q_dim, k_dim = (hd, hd) if cfg.qk_norm == "head" else (q_out, kv_out)
        eps, offset = cfg.rms_norm_eps, cfg.norm_offset
        self.q_norm = RMSNorm(q_dim, eps, offset=offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(k_dim, eps, offset=offset) if cfg.qk_norm else None
        self.qk_norm = cfg.qk_norm
        self.num_heads = cfg.num_attention_heads
        self.num_kv = cfg.num_key_value_heads
        self.head_dim = hd
        self.scale = cfg.attention_scale
        self.softcap = cfg.attn_softcap

    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, allowed: jax.Array, taps: Taps | None
    ) -> jax.Array:
        b, t, _ = x.shape
        if taps is not None:
            taps["self_attn.q_proj"] = x
        out = self.core(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin, allowed)
        if taps is not None:
            taps["self_attn.o_proj"] = out
        return self.o_proj(out)

    def core(
        self, q: jax.Array, k: jax.Array, v: jax.Array, cos: jax.Array, sin: jax.Array, allowed
    ) -> jax.Array:
        """Attention between the projections: q, k, v float[B, T, heads x head_dim] (as
        the q/k/v projections give them) -> float[B, T, H x head_dim], the o projection's
        input (unit streaming computes the projections one at a time around it)."""
        b, t, _ = q.shape
        if self.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(b, t, self.num_heads, self.head_dim)
        k = k.reshape(b, t, self.num_kv, self.head_dim)
        v = v.reshape(b, t, self.num_kv, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = attention(q, k, v, allowed, scale=self.scale, softcap=self.softcap)
        return out.reshape(b, t, -1)


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, bias=cfg.mlp_bias, rngs=rngs)
        self.up_proj = Linear(d, f, bias=cfg.mlp_bias, rngs=rngs)
        self.down_proj = Linear(f, d, bias=cfg.mlp_bias, rngs=rngs)
        self.act = cfg.hidden_act

    def __call__(self, x: jax.Array, taps: Taps | None) -> jax.Array:
        if taps is not None:
            taps["mlp.gate_proj"] = x
        hidden = ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x)
        if taps is not None:
            taps["mlp.down_proj"] = hidden
        return self.down_proj(hidden)


class LlamaDecoderLayer(nnx.Module):
    """One block. ``attention_cls`` / ``mlp_cls`` swap in fused projections (Phi-3) or a
    mixture of experts with the same call signatures; ``mlp_name`` is the MLP's attribute
    (Mixtral's checkpoints call it ``block_sparse_moe``)."""

    def __init__(
        self,
        cfg: LlamaConfig,
        layer: int,
        rngs: nnx.Rngs,
        *,
        attention_cls: type[nnx.Module] = LlamaAttention,
        mlp_cls: type[nnx.Module] = LlamaMLP,
        mlp_name: str = "mlp",
    ):
        def norm():
            return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=cfg.norm_offset)

        layout = cfg.norm_layout
        # Attribute names are the Hugging Face ones of each layout.
        self.input_layernorm = norm() if layout in ("pre", "sandwich") else None
        self.self_attn = attention_cls(cfg, rngs)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm() if layout == "sandwich" else None
        self.post_feedforward_layernorm = norm() if layout in ("post", "sandwich") else None
        setattr(self, mlp_name, mlp_cls(cfg, rngs))
        self.mlp_name = mlp_name
        self.layout = layout
        self.residual_multiplier = cfg.residual_multiplier
        self.layer_type_id = (
            BlockConstant(jnp.asarray(float(cfg.layer_type_ids[layer]), jnp.float32))
            if cfg.num_attention_types > 1
            else None
        )

    def __call__(
        self,
        h: jax.Array,
        ctx: LlamaContext,
        taps: Taps | None = None,
        skip: Mapping[str, jax.Array] | None = None,
    ) -> jax.Array:
        """One block; ``skip`` maps sublayer names (``self_attn``, the MLP's name) to bool
        scalars: a true one is not computed and the residual passes unchanged (dropped
        sublayers; pre-norm layout only)."""
        cos, sin, allowed = self.context(ctx)
        r = self.residual_multiplier
        if self.layout == "pre":

            def attention(h: jax.Array) -> jax.Array:
                a = self.self_attn(self.input_layernorm(h), cos, sin, allowed, taps)
                return h + a * r if r != 1.0 else h + a

            def mlp(h: jax.Array) -> jax.Array:
                m = getattr(self, self.mlp_name)(self.post_attention_layernorm(h), taps)
                return h + m * r if r != 1.0 else h + m

            h = _unless_skipped(skip, "self_attn", attention, h)
            return _unless_skipped(skip, self.mlp_name, mlp, h)
        if skip:
            raise ValueError(
                f"sublayers can be skipped in pre-norm blocks only, not {self.layout!r}"
            )
        x = h if self.input_layernorm is None else self.input_layernorm(h)
        h = h + self.post_attention_layernorm(self.self_attn(x, cos, sin, allowed, taps))
        x = h if self.pre_feedforward_layernorm is None else self.pre_feedforward_layernorm(h)
        return h + self.post_feedforward_layernorm(getattr(self, self.mlp_name)(x, taps))

    def context(self, ctx: LlamaContext) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(cos, sin, allowed) of this block's attention type."""
        if self.layer_type_id is None:
            return ctx.cos[0], ctx.sin[0], ctx.allowed[0]
        idx = self.layer_type_id[...].astype(jnp.int32)
        return ctx.cos[idx], ctx.sin[idx], ctx.allowed[idx]


def _unless_skipped(skip, name: str, sublayer, h: jax.Array) -> jax.Array:
    """``sublayer(h)``, or ``h`` when ``skip[name]`` is true: a real branch (its compute
    is not spent) when the caller runs candidates one at a time, a select under vmap."""
    if skip is None or name not in skip:
        return sublayer(h)
    return jax.lax.cond(skip[name], lambda x: x, sublayer, h)


class LlamaModel(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs, **layer_kw: Any):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.layers = nnx.List(
            [LlamaDecoderLayer(cfg, i, rngs, **layer_kw) for i in range(cfg.num_hidden_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=cfg.norm_offset)


class LlamaForCausalLM(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs, **layer_kw: Any):
        self.model = LlamaModel(cfg, rngs, **layer_kw)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, bias=False, rngs=rngs)
        )


class RotaryDecoderAdapter(ModelAdapter):
    """What every :class:`LlamaConfig` decoder shares: the ``model.layers.{i}`` layout,
    embeddings with per-attention-type rope tables and masks, the final norm and head,
    and the per-block ``layer_type_id`` constants. Subclasses build the module tree and
    list the prunable layers."""

    is_causal_lm = True

    def __init__(self, hf_config: Mapping[str, Any]):
        self.cfg = LlamaConfig.from_hf(hf_config)
        super().__init__(hf_config)

    def block_module(self, module: nnx.Module, i: int) -> nnx.Module:
        return module.model.layers[i]

    @property
    def num_blocks(self) -> int:
        return self.cfg.num_hidden_layers

    def block_prefix(self, i: int) -> str:
        return f"model.layers.{i}."

    def embed(self, params, input_ids, attention_mask=None):
        c = self.cfg
        emb = jnp.take(params["model.embed_tokens.weight"], input_ids, axis=0)
        if c.embedding_multiplier != 1.0:
            # Gemma casts sqrt(hidden) to the activation dtype first (55.4256 -> 55.5 in bf16).
            emb = emb * jnp.asarray(c.embedding_multiplier, emb.dtype)
        t = input_ids.shape[1]
        tables = [rope.tables(t, emb.dtype) for rope in c.ropes]
        ctx = LlamaContext(
            cos=jnp.stack([cos for cos, _ in tables]),
            sin=jnp.stack([sin for _, sin in tables]),
            allowed=jnp.stack([causal_allowed(t, attention_mask, w) for w in c.windows]),
        )
        return emb, ctx

    def finish(self, params, h, ctx):
        c = self.cfg
        mod = self.module(params)
        h = mod.model.norm(h)
        if c.tie_word_embeddings:
            w = params["model.embed_tokens.weight"]
        else:
            w = params["lm_head.weight"]
        logits = jnp.einsum("btd,vd->btv", h, w.astype(h.dtype))
        if c.logits_scaling != 1.0:
            logits = logits / c.logits_scaling
        if c.final_softcap is not None:
            logits = c.final_softcap * jnp.tanh(logits / c.final_softcap)
        return logits

    def constant_params(self) -> dict[str, np.ndarray]:
        c = self.cfg
        if c.num_attention_types == 1:
            return {}
        return {
            f"model.layers.{i}.layer_type_id": np.asarray(float(t), np.float32)
            for i, t in enumerate(c.layer_type_ids)
        }

    def _outer_layers(self, include_embeddings: bool, include_head: bool):
        c = self.cfg
        d = c.hidden_size
        embed = LayerInfo("model.embed_tokens", "embed", -1, (c.vocab_size, d), 0, "embed")
        head = LayerInfo("lm_head", "lm_head", -1, (c.vocab_size, d), c.vocab_size * d, "lm_head")
        return (
            [embed] if include_embeddings else [],
            [head] if include_head and not c.tie_word_embeddings else [],
        )

    def from_hf_tensors(self, tensors):
        params = dict(tensors)
        # Tied checkpoints may or may not carry a copy of the head; the model reads
        # the embedding, so a stored copy is dropped.
        if self.cfg.tie_word_embeddings:
            params.pop("lm_head.weight", None)
        # Rotary inverse frequencies are buffers in some exports, not parameters.
        for name in [n for n in params if n.endswith("rotary_emb.inv_freq")]:
            params.pop(name)
        params.update(self.constant_params())
        return params

    def to_hf_tensors(self, params):
        consts = self.constant_params()
        return {k: v for k, v in params.items() if k not in consts}


class LlamaAdapter(RotaryDecoderAdapter):
    """Llama-architecture causal language models (see the module docstring for the
    families and their traits)."""

    family = "llama"

    @property
    def sublayer_names(self) -> tuple[str, ...]:
        return ("self_attn", "mlp")

    def build_module(self, rngs: nnx.Rngs) -> nnx.Module:
        return LlamaForCausalLM(self.cfg, rngs)

    def layers(self, *, include_embeddings=False, include_head=False) -> list[LayerInfo]:
        c = self.cfg
        d, hd, f = c.hidden_size, c.head_dim, c.intermediate_size
        q_out, kv_out = c.num_attention_heads * hd, c.num_key_value_heads * hd
        first, last = self._outer_layers(include_embeddings, include_head)
        out: list[LayerInfo] = list(first)
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
        return out + last
