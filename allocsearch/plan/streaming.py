"""Streaming execution: bytes per process, bytes moved per generation, the page cache."""

from __future__ import annotations

from collections.abc import Sequence

from allocsearch.config import RunConfig
from allocsearch.plan.layout import _Layout, _Model
from allocsearch.plan.workload import (
    _block_activation,
    _finish_activation,
    _reference,
    _teacher_per_token,
)


def _streaming(
    m: _Model,
    layout: _Layout,
    *,
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
    evaluator (:mod:`allocsearch.evaluate.streaming`; see the module docstring)."""
    seq = cfg.data.seq_len
    n_cal = cfg.data.n_calibration_seqs * seq
    owned = {p.name for p in layout.params}
    unowned = sum(n for name, n in m.block_params.items() if name not in owned)
    per_token = _teacher_per_token(cfg, m)
    rows = max(1, min(mb // seq, cfg.data.n_calibration_seqs))  # sequences per call
    # one call: g candidates of one micro-batch through a block (or the head), each with
    # its slot of every stack gathered; XLA's CPU backend computes bfloat16 in float32:
    # a float32 copy of the gathered weights too, and float32 working sets
    w = 4 if device_is_host and a == 2 else a
    call = g * (
        (a + (w if w != a else 0)) * sum(m.block_params.values())
        + 2 * rows * seq * m.hidden * a
        + max(_block_activation(m, rows, seq, w), _finish_activation(m, rows, seq, w))
    )
    variants = hidden = teacher_rows = moved = host_slabs = 0
    for n, tokens in queries:
        per_actor = -(-n // workers)
        # the distinct levels read and moved for a block (at most min(n, K_u) per unit),
        # in the storage dtype for dense variants, the model's for nested ones
        slabs = layout.moved_bytes(per_actor, s, a)
        # a block's stacks hold P_u = min(members, K_u) level slots per unit in the same
        # dtypes (members: the query's candidates and the reference riding along)
        stacks = layout.moved_bytes(per_actor + 1, s, a)
        if device_is_host:
            # levels read straight into aligned host buffers that device_put aliases:
            # this block's and the next one's (prefetch); unused slots are never touched
            variants = max(variants, 2 * stacks)
        else:
            # this block's stacks in use, the next block's stacks and its moved slabs
            # (unused slots repeat a moved level on the device), staged twice on the host
            variants = max(variants, 2 * stacks + slabs)
            host_slabs = max(host_slabs, 2 * slabs)
        hidden = max(hidden, per_actor * tokens * m.hidden * a)
        teacher_rows = max(teacher_rows, tokens // max(workers, 1) * per_token)
        if generations and not (n == 1 and tokens == n_cal and len(queries) > 1):
            moved += min(n, workers) * m.blocks * slabs
    activations = hidden + call
    if device_is_host:
        # on a CPU device the construction's temporaries (the teacher's streamed dense
        # forward: all calibration states, one call, the teacher before it moves to the
        # host) are process memory too; they are freed before any query (a streaming
        # evaluator keeps no stacks from its construction), so the larger of the two
        # (and the dense weights of two blocks, this one and the prefetched next one)
        construction = n_cal * m.hidden * a + call + per_token * n_cal
        construction += 2 * a * sum(m.block_params.values())
        activations = max(activations, construction)
    device = {
        "model": a * (m.outer_params + 2 * unowned),
        "variants": variants,
        "teacher": teacher_rows,
        "activations": activations,
        "reference": _reference(m, a, queries),
    }
    host = {"variants": host_slabs, "teacher": per_token * n_cal}
    return device, host, moved


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
