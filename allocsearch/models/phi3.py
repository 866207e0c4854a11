"""Phi-3: a Llama-architecture decoder (see :mod:`allocsearch.models.llama`) whose q, k
and v are one fused ``qkv_proj`` (rows q | k | v) and whose gate and up projections are
one fused ``gate_up_proj`` (rows gate | up); sliding-window attention in every layer
when ``sliding_window`` is set; longrope scaling (``su`` / ``yarn`` read as ``longrope``,
as transformers does for Phi-3).

The fused matrices are the prunable layers, with Hugging Face's names: row ``r`` of
``qkv_proj`` belongs to query head ``r // head_dim`` for ``r < H*head_dim``, then to the kv
heads of k, then of v; row ``r`` of ``gate_up_proj`` is gate neuron ``r`` for ``r < I``
and up neuron ``r - I`` after. Module paths mirror ``Phi3ForCausalLM.named_modules()``,
except that layers are listed in forward order (``qkv_proj`` before ``o_proj``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from allocsearch.models.base import Linear, Taps, attention
from allocsearch.models.layers import LayerInfo
from allocsearch.models.llama import (
    ACTIVATIONS,
    LlamaConfig,
    LlamaForCausalLM,
    RotaryDecoderAdapter,
)
from allocsearch.models.rope import rotate


class Phi3Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_out = cfg.num_attention_heads * hd
        self.kv_out = cfg.num_key_value_heads * hd
        self.o_proj = Linear(self.q_out, d, bias=False, rngs=rngs)
        self.qkv_proj = Linear(d, self.q_out + 2 * self.kv_out, bias=False, rngs=rngs)
        self.num_heads = cfg.num_attention_heads
        self.num_kv = cfg.num_key_value_heads
        self.head_dim = hd

    def __call__(self, x, cos, sin, allowed, taps: Taps | None):
        b, t, _ = x.shape
        if taps is not None:
            taps["self_attn.qkv_proj"] = x
        qkv = self.qkv_proj(x)
        q = qkv[..., : self.q_out].reshape(b, t, self.num_heads, self.head_dim)
        k = qkv[..., self.q_out : self.q_out + self.kv_out].reshape(b, t, self.num_kv, -1)
        v = qkv[..., self.q_out + self.kv_out :].reshape(b, t, self.num_kv, self.head_dim)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = attention(q, k, v, allowed).reshape(b, t, -1)
        if taps is not None:
            taps["self_attn.o_proj"] = out
        return self.o_proj(out)


class Phi3MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = Linear(d, 2 * f, bias=False, rngs=rngs)
        self.down_proj = Linear(f, d, bias=False, rngs=rngs)
        self.act = cfg.hidden_act

    def __call__(self, x: jax.Array, taps: Taps | None) -> jax.Array:
        if taps is not None:
            taps["mlp.gate_up_proj"] = x
        gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
        hidden = up * ACTIVATIONS[self.act](gate)
        if taps is not None:
            taps["mlp.down_proj"] = hidden
        return self.down_proj(hidden)


class Phi3Adapter(RotaryDecoderAdapter):
    """Phi-3 causal language models (fused qkv and gate/up projections).

    Structured (heads / neurons) pruning removes kv groups and neurons as in Llama; the
    fused layers lose the rows of all their parts together
    (:class:`~allocsearch.pruners.structured.HeadGroups` ``fused_qkv``,
    :class:`~allocsearch.pruners.structured.NeuronGroups` ``fused_gate_up``).
    """

    family = "phi3"

    def build_module(self, rngs: nnx.Rngs) -> nnx.Module:
        return LlamaForCausalLM(self.cfg, rngs, attention_cls=Phi3Attention, mlp_cls=Phi3MLP)

    def layers(self, *, include_embeddings=False, include_head=False) -> list[LayerInfo]:
        c = self.cfg
        d, hd, f = c.hidden_size, c.head_dim, c.intermediate_size
        q_out, kv_out = c.num_attention_heads * hd, c.num_key_value_heads * hd
        first, last = self._outer_layers(include_embeddings, include_head)
        out: list[LayerInfo] = list(first)
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            # gate_up_proj is the MLP's (fused, gated) input projection: role fc_in.
            for rel, role, shape in [
                ("self_attn.qkv_proj", "qkv", (q_out + 2 * kv_out, d)),
                ("self_attn.o_proj", "o", (d, q_out)),
                ("mlp.gate_up_proj", "fc_in", (2 * f, d)),
                ("mlp.down_proj", "down", (d, f)),
            ]:
                out.append(LayerInfo(p + rel, role, i, shape, shape[0] * shape[1], p + rel))
        return out + last
