"""Resident execution and the one-process commands (build, apply, eval): bytes per process."""

from __future__ import annotations

from collections.abc import Sequence

from allocsearch.config import RunConfig
from allocsearch.plan.base import _BUILD_BATCH
from allocsearch.plan.layout import _Layout, _Model
from allocsearch.plan.report import ProcessMemory
from allocsearch.plan.workload import (
    _block_activation,
    _finish_activation,
    _reference,
    _teacher_per_token,
)


def _resident(
    m: _Model,
    layout: _Layout,
    *,
    a: int,
    s: int,
    cfg: RunConfig,
    queries: Sequence[tuple[int, int]],
    mb: int,
    g: int,
    device_is_host: bool,
) -> tuple[dict[str, int], dict[str, int]]:
    """(device, host) bytes of one resident evaluator (see the module docstring)."""
    seq = cfg.data.seq_len
    n_cal = cfg.data.n_calibration_seqs * seq
    B = m.blocks
    stacked = B * sum(p.numel for p in layout.params if p.kind == "dense")
    variants = 0
    largest_stack = 0  # one parameter role's stack, assembled on the host
    for p in layout.params:
        if p.kind == "dense":
            variants += B * p.levels * p.numel * a  # the stacks only (one device copy)
            stack = B * p.levels * p.numel * a
        else:
            counts = 4 * p.levels * (p.shape[0] if p.per_row else 1)
            variants += B * (4 * p.numel + counts)
            stack = B * (4 + a) * p.numel
        largest_stack = max(largest_stack, stack)
    teacher = _teacher_per_token(cfg, m) * n_cal
    rows = max(1, min(mb // seq, cfg.data.n_calibration_seqs))  # sequences per call
    per_candidate = (
        a * sum(m.block_params.values())  # the block's weights gathered for the candidate
        + 2 * rows * seq * m.hidden * a  # hidden carry in and out
        + max(_block_activation(m, rows, seq, a), _finish_activation(m, rows, seq, a))
    )
    scoring = g * per_candidate + _teacher_per_token(cfg, m) * rows * seq
    if device_is_host and a == 2:
        # XLA's CPU backend computes bfloat16 in float32 and hoists the conversion of the
        # loop-invariant stacks out of the block loop: a float32 copy of every block
        # stack per call (measured on the 150M bf16 model of scripts/bench_plan.py)
        dense_levels = sum(p.levels * p.numel for p in layout.params if p.kind == "dense")
        stacked_elems = B * (dense_levels + sum(m.block_params.values())) - stacked
        scoring += 4 * stacked_elems
    reference = _reference(m, a, queries)
    # construction: the dense copy for the teacher forward, the teacher data, one
    # micro-batch's forward (a second copy of the teacher data while its chunks are
    # concatenated is within this).
    construction = a * m.total_params + teacher + per_candidate
    if device_is_host:
        # On a CPU device, buffers are malloc'ed; glibc keeps freed buffers below its mmap
        # threshold (at most 32 MiB) in the heap, so the construction's temporaries stay in
        # the process's resident memory beside the scoring's (measured by
        # scripts/bench_plan.py: taking the larger of the two instead underestimates the
        # peak by about 20%).
        activations = construction + scoring
    else:
        activations = max(scoring + reference, construction) - reference
    device = {
        "model": a * (2 * m.total_params - stacked),
        "variants": variants,
        "teacher": teacher,
        "activations": activations,
        "reference": reference,
    }
    # stacks are assembled on the host, one parameter role at a time
    host = {} if device_is_host else {"variants": largest_stack}
    return device, host


def _single_process(
    command: str,
    m: _Model,
    layout: _Layout,
    *,
    a: int,
    cfg: RunConfig,
) -> ProcessMemory:
    """The one process of ``build``, ``apply`` or ``eval`` (they load the whole model).

    build: the model, the calibration hidden states at a block boundary (twice: this
    block's and the next's), the float32 Gram matrices of one block's inputs, one unit's
    variants in float32 (twice, as the writer casts them) and a build batch's working
    set. apply: the model twice (the pruned copy) and one unit's variants. eval: the
    model and a batch of 16 held-out sequences' working set.
    """
    seq = cfg.data.seq_len
    model = a * m.total_params
    unit_bytes = 0
    for idx in layout.unit_params:
        unit_bytes = max(
            unit_bytes,
            sum(4 * layout.params[i].levels * layout.params[i].numel for i in idx),
        )
    if command == "build":
        n_cal = cfg.data.n_calibration_seqs * seq
        hidden = 2 * n_cal * m.hidden * a
        gram = 4 * (m.hidden**2 + (m.heads * m.head_dim) ** 2 + m.ffn**2)
        if m.experts:  # each expert's gate and down inputs (and the shared expert's)
            gram += 4 * (m.experts - 1) * (m.hidden**2 + m.ffn**2)
            gram += 4 * (m.hidden**2 + m.shared_ffn**2) if m.shared_ffn else 0
        work = _block_activation(m, _BUILD_BATCH, seq, a, capture=True)
        device = {
            "model": model,
            "variants": 2 * unit_bytes,
            "activations": hidden + gram + work,
        }
    elif command == "apply":
        device = {"model": 2 * model, "variants": unit_bytes}
    else:
        work = _finish_activation(m, 16, seq, a) + _block_activation(m, 16, seq, a)
        device = {"model": model, "activations": work}
    return ProcessMemory(command, device, {})
