"""Unit streaming: a block computed one unit group at a time (one group's variants on the device).

With ``StreamingEvaluator(..., stream_unit="unit")`` a pre-norm decoder block (the Llama
family and its mixtures of experts) runs as a sequence of steps, each of which needs the
weights of one group of parameters only:

* attention: ``q``, ``k``, ``v`` (each projection of the normalised input, kept on the
  device), then ``o`` (the attention between them, the o projection, the residual);
* a dense MLP: ``gate`` (``act(gate(x))`` kept), ``up`` (times ``up(x)``), ``down``
  (the down projection, the residual);
* a mixture of experts: ``router`` (the routing weights, with removed experts masked
  from the candidate's levels: a level at sparsity 1.0 is all zero), then one step per
  routed expert (its gate, up and down: one expert group; every token through the
  expert, weighted by its routing weight, as the all-experts path computes it), then the
  shared expert; the last adds the sum to the residual.

The block's norms (and other parameters no step names) come with its first step. The
steps are streamed through the evaluator's loader like blocks (the next group read and
moved while the current one computes: two groups in flight), and the hidden states of
all of a query's candidates, with the step's intermediate (q, k, v, the MLP's hidden
activations, or the routing weights and partial sum), stay on the device. Each step is
one compiled program per step kind, shared by all blocks and, for experts, all experts
(each expert's weights take expert 0's names). Scores equal block streaming's to float
rounding (the same operations, in the same order, as the all-experts path).

Depth supernets (dropped sublayers) and other block layouts stream by block.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from allocsearch.evaluate.stream_programs import _Pass, _per_candidate, _pick, _Stage

__all__ = ["unit_stages", "stream_units"]


class _Step(NamedTuple):
    """One step of a block: ``kind`` (q, k, v, o, gate, up, down, router, expert,
    shared), ``expert`` (the routed expert of an expert step) and ``last`` (the step
    that adds a mixture of experts' output to the residual)."""

    kind: str
    expert: int = -1
    last: bool = False


def _template(adapter: Any) -> Any:
    """Block 0's module (shapes only), to read the block's structure from."""
    return adapter.block_module(nnx.eval_shape(lambda: adapter.build_module(nnx.Rngs(0))), 0)


def _block_steps(adapter: Any) -> list[tuple[_Step, list[str], list[str]]]:
    """(step, the block-relative names of its parameters, the names they take in the
    step's program) of one block, in order; parameters no step names go with the first.

    Raises:
      ValueError: a block this module cannot split (the message names the layout).
    """
    from allocsearch.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP
    from allocsearch.models.moe import SparseMoeBlock

    mod = _template(adapter)
    mlp = getattr(mod, getattr(mod, "mlp_name", "mlp"), None)
    if not (
        isinstance(mod, LlamaDecoderLayer)
        and mod.layout == "pre"
        and type(mod.self_attn) is LlamaAttention
        and isinstance(mlp, LlamaMLP | SparseMoeBlock)
    ):
        raise ValueError(
            f"stream_unit='unit' splits pre-norm decoder blocks with separate q/k/v/o "
            f"projections (Llama, Mistral, Qwen, Mixtral, ...), not a {adapter.model_type} "
            "block; use stream_unit='block'"
        )
    names = list(adapter.block_param_names)

    def take(*prefixes: str) -> list[str]:
        return [n for n in names if n.startswith(prefixes)]

    steps: list[tuple[_Step, list[str], list[str]]] = []
    for p in "qkv":
        got = take(f"self_attn.{p}_proj.")
        steps.append((_Step(p), got, got))
    got = take("self_attn.o_proj.", "self_attn.q_norm.", "self_attn.k_norm.")
    steps.append((_Step("o"), got, got))
    mn = mod.mlp_name
    if isinstance(mlp, LlamaMLP):
        for p in ("gate", "up", "down"):
            got = take(f"{mn}.{p}_proj.")
            steps.append((_Step(p), got, got))
    else:
        shared = take(f"{mn}.shared_expert.", f"{mn}.shared_expert_gate.")
        got = take(f"{mn}.gate.")
        steps.append((_Step("router"), got, got))
        experts = mlp.moe.num_experts
        for e in range(experts):
            got = take(f"{mn}.experts.{e}.")
            as_first = [n.replace(f"{mn}.experts.{e}.", f"{mn}.experts.0.", 1) for n in got]
            steps.append((_Step("expert", e, last=e == experts - 1 and not shared), got, as_first))
        if shared:
            steps.append((_Step("shared", last=True), shared, shared))
    named = {n for _, got, _ in steps for n in got}
    rest = [n for n in names if n not in named]
    first, got, keys = steps[0]
    steps[0] = (first, got + rest, keys + rest)
    return steps


def unit_stages(ev: Any, owner: Mapping[str, int]) -> list[list[tuple[_Step, _Stage]]]:
    """Per block, its steps and their stages (the evaluator's ``_Stage``: parameters no
    unit changes, and those a unit does)."""
    skippable = ev._skippable
    if skippable is not None and (np.asarray(skippable) >= 0).any():
        raise ValueError(
            "stream_unit='unit' does not skip dropped sublayers (a depth supernet); use "
            "stream_unit='block'"
        )
    adapter = ev._adapter
    steps = _block_steps(adapter)
    ev._owner = dict(owner)
    ev._expert_params = []  # [block][expert]: the full names of each routed expert's weights
    out = []
    for i in range(ev._nb):
        prefix = adapter.block_prefix(i)
        ev._expert_params.append(
            [[prefix + n for n in got] for step, got, _ in steps if step.kind == "expert"]
        )
        out.append(
            [
                (step, ev._stage([(k, prefix + n) for n, k in zip(got, keys, strict=True)], owner))
                for step, got, keys in steps
            ]
        )
    return out


# ----------------------------------------------------------------------- the step programs
def _residual(mod: Any, h: jax.Array, out: jax.Array) -> jax.Array:
    r = mod.residual_multiplier
    return h + out * r if r != 1.0 else h + out


def _mlp_input(mod: Any, h: jax.Array) -> tuple[Any, jax.Array]:
    return getattr(mod, mod.mlp_name), mod.post_attention_layernorm(h)


def _step(mod: Any, kind: str, last: bool, h, st, ctx, extra):
    """(new hidden states, new intermediate) of one candidate after one step."""
    from allocsearch.models.llama import ACTIVATIONS

    attn = mod.self_attn
    if kind in ("q", "k", "v"):
        proj = getattr(attn, f"{kind}_proj")
        return h, (*st, proj(mod.input_layernorm(h)))
    if kind == "o":
        out = attn.core(*st, *mod.context(ctx))
        return _residual(mod, h, attn.o_proj(out)), ()
    mlp, x = _mlp_input(mod, h)
    if kind == "gate":
        return h, (ACTIVATIONS[mlp.act](mlp.gate_proj(x)),)
    if kind == "up":
        return h, (st[0] * mlp.up_proj(x),)
    if kind == "down":
        return _residual(mod, h, mlp.down_proj(st[0])), ()
    if kind == "router":
        w = mlp.routing(x, extra).astype(x.dtype)
        return h, (w, jnp.zeros_like(x))
    w, acc = st
    if kind == "expert":
        scale = jax.lax.dynamic_slice_in_dim(w, extra, 1, axis=-1)
        acc = acc + scale * mlp.experts[0](x, scale, None, "")
    else:  # the shared expert
        s = jax.nn.sigmoid(mlp.shared_expert_gate(x))
        acc = acc + s * mlp.shared_expert(x, s, None, "")
    if last:
        return _residual(mod, h, acc), ()
    return h, (w, acc)


@partial(jax.jit, static_argnums=(0, 1, 2))
def _step_program(adapter, kind, last, plain, stacks, slots, h, state, ctx, extra):
    """(float[G, R, T, D], intermediate): one step applied to every candidate's states."""
    prefix = adapter.block_prefix(0)
    zero = jnp.zeros((), h.dtype)
    base = {
        rel: jnp.broadcast_to(zero, adapter.param_shapes[prefix + rel])
        for rel in adapter.block_param_names
    }
    base.update(plain)

    def one(slot, x, st, ex):
        mod = adapter.merge_block(_pick(base, stacks, slot, x.dtype))
        return _step(mod, kind, last, x, st, ctx, ex)

    return _per_candidate(one, slots, h, state, extra)


# ----------------------------------------------------------------------- the streamed pass
def _zero(ev: Any, name: str) -> bool:
    """Whether the dense weight ``name`` is all zero (cached: the model does not change)."""
    cache = ev.__dict__.setdefault("_zero_dense", {})
    if name not in cache:
        cache[name] = not bool(np.any(np.asarray(ev.model.params[name]) != 0))
    return cache[name]


def _kept(ev: Any, i: int, members: np.ndarray | None) -> np.ndarray:
    """bool[m, E]: whether each member keeps each routed expert of block ``i`` (some of
    its weights nonzero; a unit's level at sparsity 1.0 is all zero), what the model's
    ``expert_kept`` finds in the weights the router step does not hold."""
    owner = ev._owner
    experts = ev._expert_params[i]
    m = 1 if members is None else len(members)
    kept = np.zeros((m, len(experts)), bool)
    for e, names in enumerate(experts):
        for name in names:
            u = owner.get(name)
            if members is None or u is None:
                kept[:, e] |= not _zero(ev, name)
            else:
                kept[:, e] |= ev.spec.sparsity[u, members[:, u]] < 1.0
    return kept


def _extra(ev: Any, step: _Step, i: int, members: np.ndarray | None, m: int) -> np.ndarray:
    """Per member: the kept experts (router), the expert's index (expert), else 0."""
    if step.kind == "router":
        return _kept(ev, i, members)
    return np.full(m, max(step.expert, 0), np.int32)


def stream_units(ev: Any, p: _Pass, blocks: Sequence[int]) -> None:
    """Run ``p``'s groups through ``blocks`` step by step (the next step's group read and
    moved while this one computes); hidden states and intermediates stay on the device
    (or are parked on the host with the hidden states)."""
    items = [(i, j) for i in blocks for j in range(len(ev._unit_stages[i]))]
    loads = ev._loader(
        items,
        lambda item: ev._load(
            ev._unit_stages[item[0]][item[1]][1], p.members, p.active_members(item[0])
        ),
    )
    states: dict[tuple[int, int], tuple] = {}
    block_plain: dict[str, jax.Array] = {}
    for (i, j), loaded in zip(items, loads, strict=True):
        p.account(loaded)
        step = ev._unit_stages[i][j][0]
        if j == 0:
            p.start_block(i)
            block_plain = loaded.plain
        plain = {**block_plain, **loaded.plain}
        extra = _extra(ev, step, i, p.members, p.m)
        for g in p.running(i):
            q = p.groups[g]
            for c in range(len(p.chunks)):
                st = tuple(p.device(x) for x in states.get((g, c), ()))
                p.h[g, c], states[g, c] = _step_program(
                    ev._adapter,
                    step.kind,
                    step.last,
                    plain,
                    loaded.stacks,
                    loaded.slots[q],
                    p.device(p.h[g, c]),
                    st,
                    p.ctxs[c],
                    extra[q],
                )
        if j == len(ev._unit_stages[i]) - 1:
            states = {}
            p.end_block(i)
        else:
            p.park_all()
            p.park_all(states)
