"""Shared building blocks of the model families and the adapter every family implements.

Each family is a Flax NNX module tree whose attribute paths are the Hugging Face tensor
names (``model.layers.3.self_attn.q_proj.weight``), so a flat ``{name: array}`` dict is
both the checkpoint and the parameter set. Once split, a model is a pure function of that
dict: :meth:`ModelAdapter.forward` merges the (static) graph with whatever weights it is
given inside ``jit``, so one compiled program serves every pruned variant.

Linear weights are kept in the ``(out, in)`` layout of ``torch.nn.Linear`` for every
family (GPT-2's transposed Conv1D weights are converted on load and save), which is the
layout pruners and :class:`~allocsearch.models.layers.LayerInfo` use.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from allocsearch.models.layers import LayerInfo

Params = dict[str, jax.Array]
Taps = dict[str, jax.Array]

# Large negative logit for masked attention positions (finite so fully masked padding
# rows stay finite instead of producing NaN).
MASK_VALUE = float(np.finfo(np.float32).min) / 2


class Linear(nnx.Module):
    """``y = x W^T + b`` with ``weight`` float[out, in] (torch layout) and optional bias."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, rngs: nnx.Rngs):
        std = 1.0 / math.sqrt(in_features)
        self.weight = nnx.Param(
            jax.random.uniform(rngs.params(), (out_features, in_features), jnp.float32, -std, std)
        )
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight[...]
        y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class Embedding(nnx.Module):
    """Lookup table ``weight`` float[num, dim]."""

    def __init__(self, num: int, dim: int, *, rngs: nnx.Rngs):
        self.weight = nnx.Param(0.02 * jax.random.normal(rngs.params(), (num, dim), jnp.float32))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, normalised in float32.

    With ``offset == 0`` (Llama) the scale is ``weight`` applied in the input dtype; with
    ``offset == 1`` (Gemma, whose checkpoints store ``scale - 1``) the scale is
    ``1 + weight`` applied in float32 before the cast back, as Gemma does.
    """

    def __init__(self, dim: int, eps: float, *, offset: float = 0.0):
        self.weight = nnx.Param(jnp.full((dim,), 1.0 - offset, jnp.float32))
        self.eps = eps
        self.offset = float(offset)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (xf * (self.offset + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...].astype(x.dtype) * xf.astype(x.dtype)


class BlockConstant(nnx.Variable):
    """A per-block attribute carried as data, not as a separate program: e.g. the index
    of the attention type (sliding window, rope base) a block uses. Created by the adapter
    (see :meth:`ModelAdapter.constant_params`), never read from or written to a
    checkpoint; because it sits in the parameter dict under the block's prefix, whatever
    gathers a block's parameters (the evaluator's per-block gather inside one compiled
    loop) carries it along. Values are small integers, exact in every float dtype."""


class LayerNorm(nnx.Module):
    """LayerNorm with ``weight`` and ``bias`` (names as in torch)."""

    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...] + self.bias[...]).astype(x.dtype)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    allowed: jax.Array | None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Scaled dot-product attention with grouped KV heads.

    Args:
      q: float[B, T, H, D]; k, v: float[B, S, Hkv, D] with H a multiple of Hkv.
      allowed: bool[B or 1, 1, T, S] (True where a query may attend) or None.
      scale: multiplier of the scores (default ``1/sqrt(D)``).
      softcap: if set, scores become ``softcap * tanh(scores / softcap)`` before masking
        (Gemma 2).
    Returns:
      float[B, T, H, D]. Softmax is computed in float32.
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    q = q.reshape(b, t, hkv, h // hkv, d)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    scores = jnp.einsum("btgrd,bsgd->bgrts", q, k).astype(jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    if allowed is not None:
        scores = jnp.where(allowed[:, :, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bgrts,bsgd->btgrd", probs, v)
    return out.reshape(b, t, h, d)


def causal_allowed(t: int, attention_mask: jax.Array | None, window: int | None = None):
    """bool[B or 1, 1, T, T]: causal (optionally sliding-window) and padding mask."""
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.astype(bool)[:, None, None, :]
    return allowed


def padding_allowed(attention_mask: jax.Array | None):
    """bool[B, 1, 1, S] for bidirectional encoders, or None without a mask."""
    if attention_mask is None:
        return None
    return attention_mask.astype(bool)[:, None, None, :]


def flat_names(state: nnx.State) -> list[str]:
    """Dotted names of every variable in ``state`` in tree order."""
    return [".".join(map(str, path)) for path, _ in nnx.to_flat_state(state)]


class _StateBuilder:
    """Turns flat ``{dotted name: array}`` dicts into NNX states of one graph."""

    def __init__(self, module: nnx.Module):
        self.graphdef, state = nnx.split(module)
        self._flat = [(p, v, ".".join(map(str, p))) for p, v in nnx.to_flat_state(state)]
        self.names = [name for _, _, name in self._flat]
        self.shapes = {name: tuple(v.get_value().shape) for _, v, name in self._flat}

    def state(self, params: Mapping[str, jax.Array], prefix: str = "") -> nnx.State:
        try:
            return nnx.from_flat_state(
                [(p, v.replace(params[prefix + name])) for p, v, name in self._flat]
            )
        except KeyError as e:
            raise KeyError(f"parameter {e.args[0]!r} missing from the parameter dict") from None

    def merge(self, params: Mapping[str, jax.Array], prefix: str = "") -> Any:
        return nnx.merge(self.graphdef, self.state(params, prefix))


class ModelAdapter(abc.ABC):
    """One model family bound to one configuration.

    Subclasses build the NNX module tree and say how a forward pass splits into
    ``embed`` -> ``block`` x num_blocks -> ``finish``. Every method is a pure function of
    the parameter dict it is given, so it can be jitted once and called with any weights.

    Attributes:
      family: ``"llama"``, ``"gpt2"`` or ``"bert"``.
      model_type: the Hugging Face ``model_type`` (``llama``, ``mistral``, ``qwen2``...).
      hf_config: the ``config.json`` dict the model was built from (written back on save).
      is_causal_lm: True when ``forward`` returns logits over a vocabulary.
    """

    family: str
    is_causal_lm: bool

    def __init__(self, hf_config: Mapping[str, Any]):
        self.hf_config = dict(hf_config)
        self.model_type = str(hf_config.get("model_type", self.family))
        module = nnx.eval_shape(lambda: self.build_module(nnx.Rngs(0)))
        self._full = _StateBuilder(module)
        self._block = _StateBuilder(self.block_module(module, 0))

    # ----- what a family implements -------------------------------------------------
    @abc.abstractmethod
    def build_module(self, rngs: nnx.Rngs) -> nnx.Module:
        """The whole model as an NNX module whose paths are Hugging Face tensor names."""

    @abc.abstractmethod
    def block_module(self, module: nnx.Module, i: int) -> nnx.Module:
        """Block ``i`` of a module built by :meth:`build_module`."""

    @property
    @abc.abstractmethod
    def num_blocks(self) -> int: ...

    @abc.abstractmethod
    def block_prefix(self, i: int) -> str:
        """Name prefix of block ``i``'s tensors, ending in a dot."""

    @abc.abstractmethod
    def embed(
        self, params: Mapping[str, jax.Array], input_ids: jax.Array, attention_mask=None
    ) -> tuple[jax.Array, Any]:
        """Embeddings -> (hidden float[B, T, D], context passed to every block)."""

    @abc.abstractmethod
    def finish(self, params: Mapping[str, jax.Array], h: jax.Array, ctx: Any) -> jax.Array:
        """Hidden states after the last block -> logits float[B, T, V] (causal LMs) or
        final hidden states float[B, T, D] (encoders)."""

    @abc.abstractmethod
    def layers(
        self, *, include_embeddings: bool = False, include_head: bool = False
    ) -> list[LayerInfo]:
        """Prunable linear layers in forward order."""

    def from_hf_tensors(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Checkpoint tensors -> parameter dict (renames, transposes, tied weights)."""
        return dict(tensors)

    def to_hf_tensors(self, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Parameter dict -> tensors as Hugging Face stores them."""
        return dict(params)

    def constant_params(self) -> dict[str, np.ndarray]:
        """Per-block attributes the adapter keeps in the parameter dict as data
        (:class:`BlockConstant`), full name -> value; no checkpoint holds them.
        :meth:`from_hf_tensors` adds them and :meth:`to_hf_tensors` drops them."""
        return {}

    @property
    def sublayer_names(self) -> tuple[str, ...]:
        """Names (relative to a block) of the sublayers :meth:`block` can skip; empty for
        families without depth pruning."""
        return ()

    # ----- shared machinery ----------------------------------------------------------
    @property
    def param_names(self) -> list[str]:
        """Every parameter name of the model, in tree order."""
        return list(self._full.names)

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected shape of every parameter (canonical layout)."""
        return dict(self._full.shapes)

    @property
    def block_param_names(self) -> list[str]:
        """Parameter names inside one block, relative to :meth:`block_prefix`."""
        return list(self._block.names)

    def init_params(self, key: jax.Array) -> Params:
        """Random parameters (for tests and training from scratch)."""
        seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
        module = self.build_module(nnx.Rngs(seed))
        _, state = nnx.split(module)
        return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}

    def module(self, params: Mapping[str, jax.Array]) -> nnx.Module:
        """The NNX module holding ``params`` (a pure merge; usable inside jit)."""
        return self._full.merge(params)

    def block_params(self, params: Mapping[str, jax.Array], i: int) -> Params:
        """Block ``i``'s parameters keyed by their names relative to the block."""
        prefix = self.block_prefix(i)
        return {name: params[prefix + name] for name in self._block.names}

    def merge_block(self, block_params: Mapping[str, jax.Array]) -> nnx.Module:
        """Block modules holding ``block_params`` (relative names; a pure merge, usable
        inside jit): what computes a block piece by piece (unit streaming)."""
        return self._block.merge(block_params)

    def block(
        self,
        block_params: Mapping[str, jax.Array],
        h: jax.Array,
        ctx: Any,
        *,
        capture: bool = False,
        skip: Mapping[str, jax.Array] | None = None,
    ) -> jax.Array | tuple[jax.Array, Taps]:
        """Run one block. All blocks share one graph, so a jitted call of this method
        compiles once for every block. With ``capture`` also returns the inputs of every
        linear layer keyed by input group (relative name of the group's first layer).
        ``skip`` ({sublayer name in :attr:`sublayer_names`: bool scalar}) leaves the
        sublayers marked true out (dropped sublayers: the residual passes unchanged)."""
        mod = self._block.merge(block_params)
        if skip is not None:
            if capture:
                raise ValueError("capture and skip cannot be combined")
            bad = sorted(set(skip) - set(self.sublayer_names))
            if bad:
                raise ValueError(
                    f"cannot skip {bad} in a {self.model_type} block; valid: "
                    f"{list(self.sublayer_names) or 'none (this family has no dropped sublayers)'}"
                )
            return mod(h, ctx, None, skip=skip)
        taps: Taps | None = {} if capture else None
        out = mod(h, ctx, taps)
        return (out, taps) if capture else out

    def forward(
        self, params: Mapping[str, jax.Array], input_ids: jax.Array, attention_mask=None
    ) -> jax.Array:
        """Full forward pass: logits float[B, T, V] or final hidden states float[B, T, D]."""
        h, ctx = self.embed(params, input_ids, attention_mask)
        for i in range(self.num_blocks):
            h = self.block(self.block_params(params, i), h, ctx)
        return self.finish(params, h, ctx)

    def num_params(self) -> int:
        """Number of stored parameters (tied weights counted once; per-block constants,
        which no checkpoint stores, not counted)."""
        consts = self.constant_params()
        return int(sum(math.prod(s) for n, s in self._full.shapes.items() if n not in consts))
