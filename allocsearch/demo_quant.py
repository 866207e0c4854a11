"""`allocsearch demo --quantizer`: per-layer bitwidths on the bundled model, end to end.

A quantized supernet (every layer at every bitwidth, :mod:`allocsearch.supernet.quantized`)
is built, the strategies search it under a ``bits`` budget (average bits per weight,
scales and zero points counted), and every allocation, plus each uniform bitwidth of the
supernet as a reference, is scored on the calibration set and on held-out text. Writes
compare.md / compare.png, quant.md (the reference rows with their bits per weight) and
one recipe per strategy (schema v2, per-layer bits); ``recipe.json`` is the last
strategy's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.console import Console

from allocsearch import pipeline
from allocsearch.atomic import atomic_write_text
from allocsearch.config import RunConfig
from allocsearch.console_progress import heartbeat
from allocsearch.demo import compare_strategies
from allocsearch.quantizers import GPTQQuantizer, RTNQuantizer
from allocsearch.search.budget import CostModel, target_to_average_bits
from allocsearch.supernet.quantized import build_quantized_supernet

QUANT_DEMO_STRATEGIES = ("uniform", "owl", "dp", "evopress")
"""What `allocsearch demo --quantizer` compares by default."""

QUANTIZERS = {"rtn": RTNQuantizer, "gptq": GPTQQuantizer}


def uniform_rows(ws, store, budget, bits: Sequence[int]) -> list[tuple[int, float, float, float]]:
    """(bits, bits per weight, calibration fitness, held-out perplexity) of every layer at
    each of ``bits``: the uniform-bitwidth references, whatever the budget."""
    evaluator = pipeline.make_evaluator(ws, store)
    costs = CostModel.from_spec(store.spec, budget)
    rows = []
    for k, b in enumerate(bits):
        choice = np.full(store.spec.num_units, k, np.int32)
        fit = float(evaluator(choice[None], fidelity=ws.calibration.n_tokens, batch_seed=0)[0])
        ppl = float(evaluator.perplexity(choice, ws.heldout))
        per_weight = target_to_average_bits(float(costs.achieved(choice)))
        rows.append((int(b), per_weight, fit, ppl))
    return rows


def run_quant_demo(
    cfg: RunConfig,
    out: Path,
    *,
    quantizer: str,
    bits: Sequence[int],
    group_size: int,
    generations: int,
    progress: bool,
    console: Console,
    strategies: Sequence[str] = QUANT_DEMO_STRATEGIES,
) -> None:
    """The quantized demo (see the module docstring); ``cfg.search`` holds the ``bits``
    budget (``budget_kind="bits"``, ``target = 1 - average bits / 16``)."""
    if quantizer not in QUANTIZERS:
        raise ValueError(f"--quantizer {quantizer!r} is not one of {sorted(QUANTIZERS)}")
    t0 = time.perf_counter()
    ws = pipeline.load_workspace(cfg)
    levels = sorted({int(b) for b in bits}, reverse=True)
    console.print(f"building the quantized supernet ({quantizer}, bits {levels}) ...")
    with heartbeat("quantizing", enabled=progress):
        store = build_quantized_supernet(
            ws.model,
            ws.calibration,
            QUANTIZERS[quantizer](group_size=group_size),
            levels,
            out / "supernet",
            overwrite=True,
        )
    console.print(f"  {store.num_bytes / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s")
    avg = target_to_average_bits(cfg.search.target)
    scored, dense_ppl = compare_strategies(
        cfg, ws, store, out, list(strategies), progress=progress, console=console,
        generations=generations,
    )  # fmt: skip
    budget = pipeline.make_budget(cfg.search, store.spec)
    with heartbeat("scoring the uniform bitwidths", enabled=progress):
        refs = uniform_rows(ws, store, budget, levels)
    lines = [
        f"# {cfg.model}: {quantizer} bitwidths {levels}, group size {group_size}, budget "
        f"{avg:g} bits per weight (scales counted)\n",
        "| allocation | bits per weight | fitness (KL) | held-out ppl |",
        "|---|---|---|---|",
    ]
    lines += [f"| uniform {b}-bit | {w:.4f} | {f:.4f} | {p:.3f} |" for b, w, f, p in refs]
    lines += [
        f"| {s.outcome.strategy} | {target_to_average_bits(s.achieved):.4f} | {s.fitness:.4f} "
        f"| {s.heldout:.3f} |"
        for s in scored
    ]
    if dense_ppl is not None:
        lines.append(f"| dense (16-bit) | 16 | 0 | {dense_ppl:.3f} |")
    atomic_write_text("\n".join(lines) + "\n", out / "quant.md", overwrite=True)
    best = scored[-1]
    recipe = pipeline.recipe_from_choice(ws, store, budget, best.outcome)
    recipe.save(out / "recipe.json", overwrite=True)
    console.print("\n".join(lines), highlight=False, markup=False)
    console.print(
        f"\n{best.outcome.strategy} at {avg:g} bits: held-out perplexity {best.heldout:.3f}; "
        f"recipe {out / 'recipe.json'}; total {time.perf_counter() - t0:.0f} s"
    )
