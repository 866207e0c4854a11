"""When nothing fits: the shortfall line and the single changes (remedies) that would fit."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from allocsearch.config import RunConfig
from allocsearch.plan.base import _MICRO_BATCH_TOKENS, MemoryPlanError, Remedy, format_bytes
from allocsearch.plan.report import MemoryPlan


def _shortfall(
    plan: MemoryPlan, tried: Sequence[str], suggest: bool, remedies: Sequence[Remedy]
) -> str:
    """One line: what the smallest of the ``tried`` modes needs against what is
    available, and what would fit."""
    tried = list(tried) or list(plan.modes)
    best = min(tried, key=lambda m: plan.need(m)[0])
    d, h = plan.need(best)
    usable_d = plan.device_memory * (1 - plan.margin)
    usable_h = plan.host_memory * (1 - plan.margin)
    parts = []
    if plan.device_kind != "cpu" and d > usable_d:
        parts.append(
            f"{format_bytes(d)} of device memory per process, {format_bytes(usable_d)} "
            f"available ({format_bytes(plan.device_memory)} less the {plan.margin:.0%} margin)"
        )
    if h > usable_h:
        where = " (the CPU device included)" if plan.device_kind == "cpu" else ""
        parts.append(
            f"{format_bytes(h)} of host memory{where}, {format_bytes(usable_h)} available "
            f"({format_bytes(plan.host_memory)} less the {plan.margin:.0%} margin)"
        )
    others = [m for m in plan.modes if m != best]
    other = ", ".join(f"{m}: {format_bytes(plan.need(m)[0])} per process" for m in others)
    mode = f"{best} execution" if plan.command in ("search", "compare") else "it"
    head = (
        f"{plan.model} does not fit for `{plan.command}`: {mode} needs "
        + "; ".join(parts or ["more memory than is available"])
        + (f" ({other})" if other else "")
    )
    if not suggest:
        return head
    if not remedies:
        return head + "; no single change fits"
    return head + "; would fit: " + ", ".join(str(r) for r in remedies)


def _what_fits(
    plan: MemoryPlan,
    hf_config: Mapping[str, Any],
    cfg: RunConfig,
    execution: str,
    overrides: Mapping[str, Any],
) -> list[str]:
    """Single changes to the run after which :func:`plan_memory` finds a mode."""
    base: dict[str, Any] = {
        "model": plan.model,
        "command": plan.command,
        "device_memory": plan.device_memory,
        "host_memory": plan.host_memory,
        "device_kind": plan.device_kind,
        "workers": plan.workers,
        "margin": plan.margin,
        "execution": execution,
        "suggest": False,
        **overrides,
    }

    from allocsearch.plan.core import plan_memory

    def fits(c: RunConfig, **over: Any) -> bool:
        try:
            plan_memory(hf_config, c, **{**base, **over})
        except MemoryPlanError:
            return False
        return True

    def with_(section: str, **changes: Any) -> RunConfig:
        sub = getattr(cfg, section)
        return dataclasses.replace(cfg, **{section: dataclasses.replace(sub, **changes)})

    out: list[Remedy] = []
    if overrides.get("storage_dtype") == "float32":
        if fits(with_("supernet", storage_dtype="bfloat16"), storage_dtype="bfloat16"):
            key = {"supernet.storage_dtype": "bfloat16"}
            out.append(Remedy("bf16 storage, at build", key, ("--storage-dtype", "bfloat16")))
    if cfg.dtype == "float32" and fits(dataclasses.replace(cfg, dtype="bfloat16")):
        out.append(Remedy("a bfloat16 model", {"dtype": "bfloat16"}))
    if plan.command in ("search", "compare", "build"):
        for steps in range(cfg.supernet.steps_each_side - 1, 0, -1):
            if fits(with_("supernet", steps_each_side=steps)):
                key = {"supernet.steps_each_side": steps}
                what = f"fewer levels: {2 * steps + 1}"
                out.append(Remedy(what, key, ("--steps-each-side", str(steps))))
                break
    if plan.command in ("search", "compare") and cfg.evaluator.metric == "kl":
        if fits(with_("evaluator", metric="topk_kl", topk=1024)):
            keys = {"evaluator.metric": "topk_kl", "evaluator.topk": 1024}
            out.append(Remedy("top-k KL", keys))
    if plan.command in ("search", "compare"):
        out += _runtime_remedies(plan, cfg, execution, overrides, fits, with_)
        if not out and plan.device_kind != "cpu":
            out += _scale_out_remedy(plan, cfg, overrides, fits, with_)
    return out


def _scale_out_remedy(plan, cfg, overrides, fits, with_) -> list[Remedy]:
    """When no single change fits: the fewest workers that fit together with smaller
    micro-batches (more actors split a query's candidates, smaller calls shrink the
    working set); at most one remedy, tried only on a refusal."""
    start = int(overrides.get("micro_batch_tokens") or _MICRO_BATCH_TOKENS)
    for w in (8, 16, 32, 64):
        if w <= max(plan.workers, 1):
            continue
        mb = start
        while mb > cfg.data.seq_len:
            mb = max(mb // 2, cfg.data.seq_len)
            both = with_("backend", kind="ray", workers=w)
            both = dataclasses.replace(
                both, evaluator=dataclasses.replace(both.evaluator, micro_batch_tokens=mb)
            )
            if fits(both, workers=w, micro_batch_tokens=mb):
                keys = {"backend.workers": w, "evaluator.micro_batch_tokens": mb}
                if cfg.backend.kind != "ray":
                    keys = {"backend.kind": "ray", **keys}
                what = f"together, {w} actors (one device each) and {mb}-token micro-batches"
                options = ("--workers", str(w), "--micro-batch-tokens", str(mb))
                return [Remedy(what, keys, options)]
    return []


def _runtime_remedies(plan, cfg, execution, overrides, fits, with_) -> list[Remedy]:
    """The remedies of the scoring run itself: micro-batches, streaming, more workers
    (each re-planned through the config key a user sets, and the argument that
    overrides it)."""
    out = []
    mb = int(overrides.get("micro_batch_tokens") or _MICRO_BATCH_TOKENS)
    while mb > cfg.data.seq_len:
        mb = max(mb // 2, cfg.data.seq_len)
        if fits(with_("evaluator", micro_batch_tokens=mb), micro_batch_tokens=mb):
            key = {"evaluator.micro_batch_tokens": mb}
            what = f"smaller micro-batches: {mb} tokens"
            out.append(Remedy(what, key, ("--micro-batch-tokens", str(mb))))
            break
    streaming = with_("evaluator", execution="streaming")
    if execution == "resident" and fits(streaming, execution="streaming"):
        key = {"evaluator.execution": "streaming"}
        out.append(Remedy("streaming execution", key, ("--execution", "streaming")))
    unit = with_("evaluator", stream_unit="unit")
    if getattr(cfg.evaluator, "stream_unit", "auto") == "block" and fits(unit):
        key = {"evaluator.stream_unit": "unit"}
        out.append(Remedy("unit streaming", key, ("--stream-unit", "unit")))
    if plan.device_kind != "cpu":
        for w in (2, 4, 8, 16, 32, 64):
            more = with_("backend", kind="ray", workers=w)
            if w > max(plan.workers, 1) and fits(more, workers=w):
                keys = {"backend.workers": w}
                if cfg.backend.kind != "ray":
                    keys = {"backend.kind": "ray", **keys}
                what = f"more workers: {w} actors, one device each"
                out.append(Remedy(what, keys, ("--workers", str(w))))
                break
    return out
