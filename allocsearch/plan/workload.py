"""What a run asks of an evaluator: settings, queries, working sets, teacher and reference bytes."""

from __future__ import annotations

import os
from collections.abc import Sequence

from allocsearch.config import AUTO_WORKERS, RunConfig
from allocsearch.plan.base import _MAX_REFERENCE_BYTES, _TABLE_TOKENS
from allocsearch.plan.layout import _Layout, _Model
from allocsearch.search import registry

# --------------------------------------------------------------------------- settings


def _evaluator_setting(cfg: RunConfig, key: str, default: int) -> int:
    value = getattr(cfg.evaluator, key, None)
    return int(value) if value is not None else default


def _teacher_per_token(cfg: RunConfig, m: _Model) -> int:
    metric = cfg.evaluator.metric
    if metric == "kl":
        return 4 * m.vocab
    if metric == "topk_kl":
        return 8 * int(cfg.evaluator.topk or 0)
    return 0


def _queries(
    cfg: RunConfig, command: str, n_cal_tokens: int, layout: _Layout, blocks: int
) -> list[tuple[int, int]]:
    """(candidates, tokens) of every query of one generation (EvoPress), or of the table
    strategies' probe query (the all-lowest allocation and one candidate per other level
    of each unit); ``compare`` adds its one-candidate scoring on the whole calibration
    set."""
    from allocsearch.search.evolutionary import EvolutionarySearcher

    strategy = cfg.search.strategy
    entry = registry.get(strategy)
    settings = dict(cfg.search.settings or {})
    out: list[tuple[int, int]] = []
    if entry.kind in ("evolutionary", "driver"):
        s = settings or dict(registry.DEMO_EVOPRESS)  # search_run._default_settings
        offspring = int(s.get("offspring", EvolutionarySearcher.offspring))
        survivors = [int(x) for x in s.get("survivors", EvolutionarySearcher.survivors)]
        tokens = [int(x) for x in s.get("tokens", EvolutionarySearcher.tokens)]
        for i, t in enumerate(tokens):
            if i == 0:
                n = offspring
            else:
                n = survivors[i - 1] + (1 if i == len(tokens) - 1 else 0)
            out.append((n, min(t, n_cal_tokens)))
        final = int(s.get("final_parents", registry.SEEDED_FINAL_PARENTS if entry.seeded_by else 0))
        if final:  # the final pick: the start and the last parents
            t = int(s.get("final_tokens") or registry.FINAL_TOKENS)
            out.append((final + 1, min(t, n_cal_tokens)))
    if entry.kind == "table" or entry.seeded_by is not None:  # dp+evopress: its table too
        key = "tokens" if entry.kind == "table" else "table_tokens"
        tokens = int(settings.get(key, min(_TABLE_TOKENS, n_cal_tokens)))
        out.append((1 + blocks * sum(k - 1 for k in layout.unit_levels), tokens))
    if command == "compare" or not out:
        out.append((1, n_cal_tokens))
    return out


def _block_activation(m: _Model, rows: int, seq: int, a: int, *, capture: bool = False) -> int:
    """Working set of one block's forward on ``rows`` sequences of ``seq`` tokens: the
    larger of attention (float32 scores and softmax, probabilities in ``a``, q/k/v and
    their rotations) and the MLP (gate, up, product), plus the normalised input (float32)
    and the residual. A MoE block's MLP: the routed experts' working set as
    :func:`~allocsearch.models.moe_dispatch.expert_work_bytes` gives it for the method the
    block uses on these tokens, plus the shared expert's ``3 N F_s``; with ``capture``
    (build) the all-experts path and every expert's input taps, ``N (E (D + F) + D + F_s)``."""
    tokens = rows * seq
    attn = _attention_work(m, rows, seq, a)
    mlp = 3 * tokens * m.ffn * a
    if m.experts:
        from allocsearch.models.moe_dispatch import expert_work_bytes

        mlp = expert_work_bytes(
            num_tokens=tokens,
            top_k=m.top_k,
            num_experts=m.experts,
            hidden=m.hidden,
            ffn=m.ffn,
            itemsize=a,
            method="dense" if capture else m.dispatch,
        )
        mlp += 3 * tokens * m.shared_ffn * a
        if capture:
            shared_taps = m.hidden + m.shared_ffn if m.shared_ffn else 0
            mlp += a * tokens * (m.experts * (m.hidden + m.ffn) + shared_taps)
    return max(attn, mlp) + tokens * m.hidden * (4 + a)


def _attention_work(m: _Model, rows: int, seq: int, a: int) -> int:
    """Attention between the projections: float32 scores and softmax, probabilities in
    ``a``, q/k/v and their rotations."""
    attn = rows * m.heads * seq * seq * (8 + a)
    return attn + rows * seq * (m.heads + 2 * m.kv_heads) * m.head_dim * a * 2


def _unit_work(m: _Model, sublayer: str, rows: int, seq: int, a: int) -> int:
    """Working set of one unit-streaming step of ``sublayer`` (``attention``, ``mlp`` or
    ``moe``) on ``rows`` sequences, plus the normalised input and the residual: the
    attention's (the o step), a dense MLP's ``3 N F`` (gate, up, product), or one
    expert's on every token ``3 N max(F, F_s)`` and the float32 routing ``4 N E``."""
    tokens = rows * seq
    if sublayer == "attention":
        work = _attention_work(m, rows, seq, a)
    elif sublayer == "moe":
        work = 3 * tokens * max(m.ffn, m.shared_ffn) * a + 4 * tokens * m.experts
    else:
        work = 3 * tokens * m.ffn * a
    return work + tokens * m.hidden * (4 + a)


def _unit_intermediate(m: _Model, sublayer: str, a: int) -> int:
    """Bytes per token a unit-streaming sublayer keeps between its steps: q, k and v;
    the MLP's hidden activations ``F``; a MoE's routing weights and partial sum."""
    if sublayer == "attention":
        return (m.heads + 2 * m.kv_heads) * m.head_dim * a
    if sublayer == "moe":
        return (m.experts + m.hidden) * a
    return m.ffn * a


def _moe_setting(m: _Model, tokens: int) -> dict[str, str]:
    """The table's row for a mixture of experts (none for a dense MLP): experts, their
    share of the parameters, and how a scoring call of ``tokens`` tokens computes them."""
    if not m.experts:
        return {}
    from allocsearch.models.moe_dispatch import dispatch_method, dispatch_rows, dispatch_tile

    experts = sum(n for name, n in m.block_params.items() if ".experts." in name)
    method = dispatch_method(m.dispatch, num_tokens=tokens, top_k=m.top_k, num_experts=m.experts)
    how = "all experts on every token"
    if method == "sorted":
        rows = dispatch_rows(tokens, m.top_k, m.experts, dispatch_tile(tokens, m.top_k, m.experts))
        how = f"sorted dispatch, {rows / tokens:.2f} expert rows per token"
    shared = f", shared expert {m.shared_ffn}" if m.shared_ffn else ""
    return {
        "experts": f"{m.experts} per block, top-{m.top_k}, width {m.ffn}{shared}; "
        f"{m.blocks * experts / m.total_params:.0%} of the parameters; scoring: {how}"
    }


def _finish_activation(m: _Model, rows: int, seq: int, a: int) -> int:
    """Logits (``a``), their float32 log-softmax and one float32 temporary."""
    width = m.vocab if m.causal else m.hidden
    return rows * seq * width * (a + 8)


def _reference(m: _Model, a: int, queries: Sequence[tuple[int, int]]) -> int:
    """The evaluator's cached reference states, ``(B + 1) x tokens x D x a``, for the
    largest query whose states stay within ``max_reference_bytes`` (larger ones skip
    reuse)."""
    sizes = [(m.blocks + 1) * t * m.hidden * a for _, t in queries]
    return max([x for x in sizes if x <= _MAX_REFERENCE_BYTES], default=0)


def _resolve_workers(cfg: RunConfig, workers: int | None, device_kind: str) -> int:
    """Actors that score (0 with the local backend: the driver scores)."""
    if workers is not None:
        return int(workers)
    if cfg.backend.kind == "local":
        return 0
    if cfg.backend.workers != AUTO_WORKERS:
        return int(cfg.backend.workers)
    if device_kind != "cpu":
        import jax

        return max(1, len(jax.devices()))
    if hasattr(os, "sched_getaffinity"):  # ray_backend.local_cpu_count, without Ray
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
