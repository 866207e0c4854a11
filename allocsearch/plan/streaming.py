"""Streaming execution, by block or by unit group: bytes per process, bytes moved, page cache."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from allocsearch.config import RunConfig
from allocsearch.plan.layout import _Layout, _Model
from allocsearch.plan.workload import (
    _block_activation,
    _finish_activation,
    _reference,
    _teacher_per_token,
    _unit_intermediate,
    _unit_work,
)


class _Group(NamedTuple):
    """What a streaming evaluator holds of a block at a time: a unit group (or the whole
    block): its stored parameters (indices into the layout), all its weights and those no
    unit owns, and the sublayer it computes (``block``, ``attention``, ``mlp``, ``moe``)."""

    params: tuple[int, ...]
    numel: int
    unowned: int
    sublayer: str


def _block_group(m: _Model, layout: _Layout) -> tuple[_Group, ...]:
    """Block streaming: the block is the one group."""
    owned = sum(p.numel for p in layout.params)
    numel = sum(m.block_params.values())
    return (_Group(tuple(range(len(layout.params))), numel, numel - owned, "block"),)


def _unit_groups(adapter: Any, m: _Model, layout: _Layout) -> tuple[_Group, ...] | None:
    """Unit streaming: the steps :mod:`allocsearch.evaluate.unit_streaming` computes a
    block in (q, k, v, o; gate, up, down; a MoE's router, each expert, the shared
    expert; the block's norms with the first), or None where it cannot split the block."""
    from allocsearch.evaluate.unit_streaming import _block_steps

    try:
        steps = _block_steps(adapter)
    except ValueError:
        return None
    out = []
    for step, names, _ in steps:
        idx = tuple(i for i, p in enumerate(layout.params) if p.name in set(names))
        numel = sum(m.block_params[n] for n in names)
        unowned = numel - sum(layout.params[i].numel for i in idx)
        sublayer = "attention" if step.kind in "qkvo" else "mlp"
        if step.kind in ("router", "expert", "shared"):
            sublayer = "moe"
        out.append(_Group(idx, numel, unowned, sublayer))
    return tuple(out)


def _streaming(
    m: _Model,
    layout: _Layout,
    *,
    groups: Sequence[_Group],
    a: int,
    s: int,
    cfg: RunConfig,
    queries: Sequence[tuple[int, int]],
    mb: int,
    g: int,
    workers: int,
    generations: bool,
    device_is_host: bool,
) -> tuple[dict[str, int], dict[str, int], int]:
    """(device, host, bytes moved per generation over all actors) of one streaming
    evaluator (:mod:`allocsearch.evaluate.streaming`; see the package docstring) that
    holds one of ``groups`` at a time (the block, or a unit group), the next prefetched."""
    seq = cfg.data.seq_len
    n_cal = cfg.data.n_calibration_seqs * seq
    per_token = _teacher_per_token(cfg, m)
    rows = max(1, min(mb // seq, cfg.data.n_calibration_seqs))  # sequences per call
    # XLA's CPU backend computes bfloat16 in float32: a float32 copy of the gathered
    # weights too, and float32 working sets
    w = 4 if device_is_host and a == 2 else a
    calls = _calls(m, groups, rows=rows, seq=seq, a=a, w=w, g=g)
    variants = activations = teacher_rows = moved = host_slabs = 0
    for n, tokens in queries:
        per_actor = -(-n // workers)
        for group in groups:
            # the distinct levels read and moved (at most min(n, K) per parameter), in
            # the storage dtype for dense variants, the model's for nested ones
            slabs = layout.group_bytes(group.params, per_actor, s, a)
            # the stacks hold min(members, K) level slots per parameter (members: the
            # query's candidates and the reference riding along)
            stacks = layout.group_bytes(group.params, per_actor + 1, s, a)
            if device_is_host:
                # levels read straight into aligned host buffers that device_put aliases:
                # this group's and the next one's (prefetch); unused slots never touched
                variants = max(variants, 2 * stacks)
            else:
                # this group's stacks in use, the next group's stacks and its moved slabs
                # (unused slots repeat a moved level on the device), staged twice on the host
                variants = max(variants, 2 * stacks + slabs)
                host_slabs = max(host_slabs, 2 * slabs)
        # the hidden states of all the actor's candidates stay on the device, with the
        # intermediates of the sublayer being streamed (unit groups), and one call
        states = per_actor * tokens
        hidden = states * m.hidden * a
        activations = max(
            activations,
            hidden + max(states * _intermediate(m, k, a) + c for k, c in calls.items()),
        )
        teacher_rows = max(teacher_rows, tokens // max(workers, 1) * per_token)
        if generations and not (n == 1 and tokens == n_cal and len(queries) > 1):
            moved += min(n, workers) * m.blocks * layout.moved_bytes(per_actor, s, a)
    if device_is_host:
        # on a CPU device the construction's temporaries (the teacher's streamed dense
        # forward: all calibration states, one call, the teacher before it moves to the
        # host) are process memory too; they are freed before any query (a streaming
        # evaluator keeps no stacks from its construction), so the larger of the two
        # (and the dense weights of two groups, this one and the prefetched next one)
        construction = n_cal * m.hidden * a + max(calls.values()) + per_token * n_cal
        construction += 2 * a * max(group.numel for group in groups)
        activations = max(activations, construction)
    device = {
        "model": a * (m.outer_params + 2 * max(group.unowned for group in groups)),
        "variants": variants,
        "teacher": teacher_rows,
        "activations": activations,
        "reference": _reference(m, a, queries),
    }
    host = {"variants": host_slabs, "teacher": per_token * n_cal}
    return device, host, moved


def _calls(
    m: _Model, groups: Sequence[_Group], *, rows: int, seq: int, a: int, w: int, g: int
) -> dict[str, int]:
    """Sublayer -> one call's bytes: ``g`` candidates of one micro-batch through the
    largest group of the sublayer (or the head), each with its slot of every stack
    gathered (and a float32 copy when ``w`` != ``a``), its hidden carry in and out, and
    the step's (or block's) working set."""
    out: dict[str, int] = {}
    for group in groups:
        k = group.sublayer
        if k == "block":
            work = _block_activation(m, rows, seq, w)
        else:
            work = _unit_work(m, k, rows, seq, w)
        call = g * (
            (a + (w if w != a else 0)) * group.numel
            + 2 * rows * seq * m.hidden * a
            + max(work, _finish_activation(m, rows, seq, w))
        )
        out[k] = max(out.get(k, 0), call)
    return out


def _intermediate(m: _Model, sublayer: str, a: int) -> int:
    return 0 if sublayer == "block" else _unit_intermediate(m, sublayer, a)


def _page_cache(
    m: _Model, layout: _Layout, *, s: int, a: int, children: int, switches: int
) -> tuple[int, int]:
    """(bytes every streaming query reads for the parent, bytes a generation's
    ``children`` read beyond them), from disk through the page cache.

    Parent: per block, one level of every dense unit (``s N_p``), every nested unit's
    rank file (``4 N_p`` + counts) and dense weight (``a N_p``, from the model), and the
    block weights no unit owns (``a``). Children: each differs from the parent in at most
    ``2 x switches`` units; a new level of a dense unit is ``s N_p`` more, of a nested
    unit nothing (the cached rank serves every level): ``children x 2 switches`` units
    at the mean over units, at most the dense units' other levels."""
    owned = {p.name for p in layout.params}
    unowned = sum(n for name, n in m.block_params.items() if name not in owned)
    parent, level_bytes, other_levels = a * unowned, [], 0
    for u, idx in enumerate(layout.unit_params):
        new = 0
        for i in idx:
            p = layout.params[i]
            if p.kind == "dense":
                parent += s * p.numel
                new += s * p.numel
            else:
                counts = 4 * p.levels * (p.shape[0] if p.per_row else 1)
                parent += (4 + a) * p.numel + counts
        level_bytes.append(new)
        other_levels += (layout.unit_levels[u] - 1) * new
    units = max(len(level_bytes), 1)  # a block's; the mean unit is every block's
    child = min(children * 2 * switches * sum(level_bytes) // units, m.blocks * other_levels)
    return m.blocks * parent, child
