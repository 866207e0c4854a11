"""Mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): the sparse MoE block.

Attention, norms and rope are those of :mod:`allocsearch.models.llama` (Mixtral is a
Mistral, Qwen2/3-MoE a Qwen2/3, OLMoE a pre-norm Llama with OLMo 2's q/k norms over the
whole projection); the MLP of every block is a router plus ``num_experts`` gated experts,
and for Qwen2-MoE a shared expert scaled by ``sigmoid(shared_expert_gate(x))``.

**Names are checkpoint keys.** transformers 5 fuses the experts of a block into 3-D
parameters in memory (``mlp.experts.gate_up_proj``) but reads and writes one tensor per
expert and projection; parameters, layers and recipe entries here use those keys:
``model.layers.3.mlp.experts.7.gate_proj`` (Qwen, OLMoE) and
``model.layers.3.block_sparse_moe.experts.7.w1`` (Mixtral: ``w1`` gate, ``w3`` up,
``w2`` down). The router (``...mlp.gate``, float[E, D]) is a prunable layer only on
request (``layers(include_router=True)``); the shared-expert gate never is.

**Routing** (as transformers): ``p = softmax(router(x))`` in float32, the ``top_k``
largest are kept, renormalised to sum 1 when the family does (Mixtral always; the others
when ``norm_topk_prob``), and expert ``e``'s output is scaled by its weight ``g_e``
(0 for unrouted tokens). An expert whose weights are all zero is *removed*: its router
logit is -inf, so the others are renormalised as if it did not exist (the checkpoint with
the expert physically removed computes the same). Experts compute only their routed tokens
(:mod:`allocsearch.models.moe_dispatch`, static shapes: one program serves every block and
candidate) when that saves at least half the work; otherwise, and always for calibration
captures, every expert runs on every token weighted by ``g_e``, which gives the same sum.

**Calibration taps.** With ``capture`` an expert's input taps are its inputs *scaled by
the weight its output gets* (``g_e x`` and ``g_e z`` for the down projection's input ``z``;
the shared expert's by its sigmoid gate): the Gram matrix of the tap is then
``sum_t g_t^2 x_t x_t^T``, the second-order error of the block output, and it covers only
the tokens routed to the expert. The tap ``{mlp}.routed`` (float32[B, T, E], 1 where a
token is routed to an expert) gives the routing counts (:data:`ROUTED_TAP`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from allocsearch.models.base import Linear, Taps
from allocsearch.models.layers import LayerInfo
from allocsearch.models.llama import (
    ACTIVATIONS,
    LlamaConfig,
    LlamaForCausalLM,
    RotaryDecoderAdapter,
)
from allocsearch.models.moe_dispatch import (
    check_dispatch,
    dispatch_method,
    routed_expert_outputs,
)

MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
ROUTED_TAP = "routed"
"""Relative tap name (after the MoE module name) of the routing indicator float32[B, T, E]."""

# model_type -> (attention family it reuses, MoE module name, (gate, up, down) names)
_TRAITS = {
    "mixtral": ("mistral", "block_sparse_moe", ("w1", "w3", "w2")),
    "qwen2_moe": ("qwen2", "mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": ("qwen3", "mlp", ("gate_proj", "up_proj", "down_proj")),
    "olmoe": ("llama", "mlp", ("gate_proj", "up_proj", "down_proj")),
}


@dataclass(frozen=True)
class MoEConfig:
    """The mixture-of-experts part of a config.json.

    Attributes:
      num_experts: routed experts per block (E).
      top_k: experts each token is routed to.
      expert_size: intermediate width of each expert.
      norm_topk_prob: renormalise the top-k probabilities to sum 1.
      shared_expert_size: intermediate width of the shared expert (0: none).
      module: attribute name of the MoE block (``mlp`` or Mixtral's ``block_sparse_moe``).
      proj_names: names of the expert's (gate, up, down) projections.
      hidden_act: the experts' activation.
    """

    num_experts: int
    top_k: int
    expert_size: int
    norm_topk_prob: bool
    shared_expert_size: int
    module: str
    proj_names: tuple[str, str, str]
    hidden_act: str

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> MoEConfig:
        model_type = cfg.get("model_type")
        if model_type not in _TRAITS:
            raise ValueError(
                f"model_type {model_type!r} is not a MoE family; valid: {MOE_MODEL_TYPES}"
            )
        _, module, names = _TRAITS[model_type]
        n_exp = cfg.get("num_local_experts", cfg.get("num_experts"))
        if n_exp is None or int(n_exp) < 1:
            raise ValueError(
                f"{model_type}: num_experts / num_local_experts must be >= 1, got {n_exp!r}"
            )
        top_k = int(cfg.get("num_experts_per_tok", 2))
        if not 1 <= top_k <= int(n_exp):
            raise ValueError(f"{model_type}: num_experts_per_tok={top_k} must be in 1..{n_exp}")
        if cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step", 1) or 1) != 1:
            raise ValueError(
                f"{model_type}: blocks with a dense MLP (mlp_only_layers="
                f"{cfg.get('mlp_only_layers')!r}, decoder_sparse_step="
                f"{cfg.get('decoder_sparse_step')!r}) are not supported; every block must be "
                f"a MoE block (mlp_only_layers=[] and decoder_sparse_step=1)"
            )
        if model_type == "olmoe" and cfg.get("clip_qkv") is not None:
            raise ValueError(
                f"olmoe with clip_qkv={cfg['clip_qkv']!r} is not supported (only null)"
            )
        size_key = (
            "intermediate_size" if model_type in ("mixtral", "olmoe") else "moe_intermediate_size"
        )
        if size_key not in cfg:
            raise ValueError(f"config.json of a {model_type} model lacks {size_key!r}")
        act = cfg.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {act!r} is not supported; valid: {list(ACTIVATIONS)}")
        return cls(
            num_experts=int(n_exp),
            top_k=top_k,
            expert_size=int(cfg[size_key]),
            norm_topk_prob=model_type == "mixtral" or bool(cfg.get("norm_topk_prob", False)),
            shared_expert_size=(
                int(cfg.get("shared_expert_intermediate_size") or 0)
                if model_type == "qwen2_moe"
                else 0
            ),
            module=module,
            proj_names=names,
            hidden_act=act,
        )


def attention_config(cfg: Mapping[str, Any]) -> LlamaConfig:
    """The Llama-architecture traits of a MoE config (attention, norms, rope)."""
    model_type = cfg["model_type"]
    base, _, _ = _TRAITS[model_type]
    lc = LlamaConfig.from_hf({**cfg, "model_type": base, "intermediate_size": 1})
    if model_type == "olmoe":  # pre-norm, with q/k RMSNorm over the whole projection
        lc = dataclasses.replace(lc, qk_norm="proj")
    return lc


class Expert(nnx.Module):
    """A gated MLP ``down(act(gate(x)) * up(x))`` whose attributes carry the family's names."""

    def __init__(self, d: int, f: int, names: tuple[str, str, str], act: str, rngs: nnx.Rngs):
        gate, up, down = names
        setattr(self, gate, Linear(d, f, bias=False, rngs=rngs))
        setattr(self, up, Linear(d, f, bias=False, rngs=rngs))
        setattr(self, down, Linear(f, d, bias=False, rngs=rngs))
        self.names = names
        self.act = act

    def __call__(self, x: jax.Array, scale: jax.Array | None, taps: Taps | None, where: str):
        """``x`` float[B, T, D] -> float[B, T, D]; taps (scaled by ``scale`` float[B, T, 1]
        when given) under ``where + name``."""
        gate, up, down = (getattr(self, n) for n in self.names)
        if taps is not None:
            taps[where + self.names[0]] = x if scale is None else x * scale
        hidden = ACTIVATIONS[self.act](gate(x)) * up(x)
        if taps is not None:
            taps[where + self.names[2]] = hidden if scale is None else hidden * scale
        return down(hidden)


class SparseMoeBlock(nnx.Module):
    """Router + experts (+ Qwen2-MoE's gated shared expert); see the module docstring.
    ``dispatch`` is one of :data:`~allocsearch.models.moe_dispatch.DISPATCH_METHODS`."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs, *, moe: MoEConfig, dispatch: str = "auto"):
        d = cfg.hidden_size
        self.gate = Linear(d, moe.num_experts, bias=False, rngs=rngs)
        self.experts = nnx.List(
            [
                Expert(d, moe.expert_size, moe.proj_names, moe.hidden_act, rngs)
                for _ in range(moe.num_experts)
            ]
        )
        if moe.shared_expert_size:
            self.shared_expert = Expert(
                d,
                moe.shared_expert_size,
                ("gate_proj", "up_proj", "down_proj"),
                moe.hidden_act,
                rngs,
            )
            self.shared_expert_gate = Linear(d, 1, bias=False, rngs=rngs)
        else:
            self.shared_expert = None
            self.shared_expert_gate = None
        self.moe = moe
        self.dispatch = check_dispatch(dispatch)

    def expert_kept(self) -> jax.Array:
        """bool[E]: False for a removed expert, one whose gate, up and down weights are all
        zero (the "removed" level of :mod:`allocsearch.supernet.experts`)."""
        return jnp.stack(
            [
                jnp.any(jnp.stack([jnp.any(getattr(e, n).weight[...] != 0) for n in e.names]))
                for e in self.experts
            ]
        )

    def routing(self, x: jax.Array, kept: jax.Array | None = None) -> jax.Array:
        """float32[B, T, E]: each token's weight on each expert (0 where not routed). The
        logits of removed experts (:meth:`expert_kept`, or ``kept`` bool[E] when the
        experts' weights are not at hand) are -inf, so the softmax and top-k run over the
        kept experts as if the removed ones did not exist."""
        m = self.moe
        kept = self.expert_kept() if kept is None else kept
        logits = jnp.where(kept, self.gate(x).astype(jnp.float32), -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1)
        top, idx = jax.lax.top_k(probs, m.top_k)
        if m.norm_topk_prob:
            top = top / jnp.sum(top, axis=-1, keepdims=True)
        return jnp.sum(
            jax.nn.one_hot(idx, m.num_experts, dtype=top.dtype) * top[..., None], axis=-2
        )

    def __call__(self, x: jax.Array, taps: Taps | None) -> jax.Array:
        name = self.moe.module
        if taps is not None:
            taps[f"{name}.gate"] = x
        weights = self.routing(x)
        if taps is not None:
            taps[f"{name}.{ROUTED_TAP}"] = (weights > 0).astype(jnp.float32)
        out = self.routed_experts(x, weights.astype(x.dtype), taps)
        if self.shared_expert is not None:
            s = jax.nn.sigmoid(self.shared_expert_gate(x))
            if taps is not None:
                taps[f"{name}.shared_expert_gate"] = x
            out = out + s * self.shared_expert(x, s, taps, f"{name}.shared_expert.")
        return out

    def routed_experts(self, x: jax.Array, w: jax.Array, taps: Taps | None) -> jax.Array:
        """``sum_e w[..., e] expert_e(x)``: ``x`` float[B, T, D], routing weights ``w``
        float[B, T, E] in ``x``'s dtype. Sorted dispatch or all experts, by
        :func:`~allocsearch.models.moe_dispatch.dispatch_method`; captures use all experts."""
        m = self.moe
        method = dispatch_method(
            self.dispatch,
            num_tokens=x.size // x.shape[-1],
            top_k=m.top_k,
            num_experts=m.num_experts,
        )
        if taps is None and method != "dense":
            stacked = [
                jnp.stack([getattr(ex, p).weight[...] for ex in self.experts]) for p in m.proj_names
            ]
            return routed_expert_outputs(
                x, w, *stacked, ACTIVATIONS[m.hidden_act], top_k=m.top_k, method=method
            )
        out = jnp.zeros_like(x)
        for e, expert in enumerate(self.experts):
            scale = w[..., e : e + 1]
            out = out + scale * expert(x, scale, taps, f"{m.module}.experts.{e}.")
        return out


class MoEAdapter(RotaryDecoderAdapter):
    """Mixture-of-experts causal language models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).

    Attributes:
      moe: the :class:`MoEConfig`.
      dispatch: how experts compute (:data:`~allocsearch.models.moe_dispatch.DISPATCH_METHODS`;
        ``"auto"`` by default): fixed at construction, part of the compiled programs.
    """

    family = "moe"

    def __init__(self, hf_config: Mapping[str, Any], *, dispatch: str = "auto"):
        self.moe = MoEConfig.from_hf(hf_config)
        self.dispatch = check_dispatch(dispatch)
        self.cfg = attention_config(hf_config)
        super(RotaryDecoderAdapter, self).__init__(hf_config)

    def build_module(self, rngs: nnx.Rngs) -> nnx.Module:
        return LlamaForCausalLM(
            self.cfg,
            rngs,
            mlp_cls=partial(SparseMoeBlock, moe=self.moe, dispatch=self.dispatch),
            mlp_name=self.moe.module,
        )

    def expert_prefix(self, block: int, expert: int) -> str:
        """Module path of one routed expert, ending in a dot."""
        return f"model.layers.{block}.{self.moe.module}.experts.{expert}."

    @property
    def routed_tap(self) -> str:
        """Block-relative name of the routing indicator tap (see the module docstring)."""
        return f"{self.moe.module}.{ROUTED_TAP}"

    def expert_of(self, layer_name: str) -> tuple[int, int] | None:
        """``(block, expert)`` of a routed expert's layer name, None for other layers."""
        parts = layer_name.split(".")
        if len(parts) >= 6 and parts[3] == self.moe.module and parts[4] == "experts":
            return int(parts[2]), int(parts[5])
        return None

    def layers(
        self, *, include_embeddings=False, include_head=False, include_router=False
    ) -> list[LayerInfo]:
        """The prunable layers; ``include_router`` adds each block's router
        (``{module}.gate``, role ``"router"``, float[E, D]) before its experts."""
        c, m = self.cfg, self.moe
        d, hd = c.hidden_size, c.head_dim
        q_out, kv_out = c.num_attention_heads * hd, c.num_key_value_heads * hd
        first, last = self._outer_layers(include_embeddings, include_head)
        out: list[LayerInfo] = list(first)
        gate, up, down = m.proj_names
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            spec = [
                ("self_attn.q_proj", "q", (q_out, d), "self_attn.q_proj"),
                ("self_attn.k_proj", "k", (kv_out, d), "self_attn.q_proj"),
                ("self_attn.v_proj", "v", (kv_out, d), "self_attn.q_proj"),
                ("self_attn.o_proj", "o", (d, q_out), "self_attn.o_proj"),
            ]
            if include_router:
                spec.append((f"{m.module}.gate", "router", (m.num_experts, d), f"{m.module}.gate"))
            experts = [(f"{m.module}.experts.{e}.", m.expert_size) for e in range(m.num_experts)]
            if m.shared_expert_size:
                experts.append((f"{m.module}.shared_expert.", m.shared_expert_size))
            for ep, f in experts:
                names = (
                    (gate, up, down) if "experts." in ep else ("gate_proj", "up_proj", "down_proj")
                )
                spec += [
                    (ep + names[0], "gate", (f, d), ep + names[0]),
                    (ep + names[1], "up", (f, d), ep + names[0]),
                    (ep + names[2], "down", (d, f), ep + names[2]),
                ]
            for rel, role, shape, group in spec:
                out.append(LayerInfo(p + rel, role, i, shape, shape[0] * shape[1], p + group))
        return out + last


__all__ = ["MOE_MODEL_TYPES", "ROUTED_TAP", "MoEAdapter", "MoEConfig", "SparseMoeBlock"]
