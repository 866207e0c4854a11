"""Depth pruning on the demo model: which sublayers to drop, against simple alternatives.

    python scripts/bench_depth.py                  # writes bench-depth/depth.md
    python scripts/bench_depth.py --out DIR --repeats 200

The demo model has 6 blocks = 12 sublayers (6 attention, 163,840 weights each; 6 MLP,
540,672 each). One ``heads_neurons`` supernet with depth ``drop`` (levels dense and
dropped per sublayer) is built from the calibration set; for k = 1 and 2 dropped
sublayers (a sublayer-count budget, ``Budget(kind="sublayers")``):

* **EvoPress**: the demo's settings (30 generations, 12 offspring, survivors 3 -> 1 on
  512 -> 2,048 tokens), seed 0;
* **brute force**: every set of k sublayers scored on the whole calibration set (KL), the
  best kept (12 and 66 candidates);
* **last k**: the last k sublayers (k = 2: the last block);
* **EvoPress over blocks** (k = 2): the same search over whole blocks as units
  (:func:`~allocsearch.supernet.depth.block_units`), one block dropped;
* **best block** (k = 2): the best whole block, brute force over the 6 blocks;
* **uniform neurons**: every MLP loses the same number of neurons (OBS structured pruner,
  its own one-level supernet), as many weights as the EvoPress row removes or just more
  (attention cannot be thinned evenly: the demo has 2 kv groups per block).

Every allocation becomes a recipe and is applied (``apply_recipe`` with its store): the
table gives the held-out perplexity of the applied model, the weights removed, and the
forward time of the applied model against the dense one on the same 1 x 128 held-out
tokens (JAX on this machine's CPU, fastest of ``--repeats`` runs after a compile run,
dense and pruned run in turn: :func:`~allocsearch.recipe.timing.forward_times`).
"params removed" counts the weights the recipe removes (dropped sublayers included),
"params stored" what the checkpoint holds (a dropped sublayer in a kept block stays as
zeros).
A dropped sublayer whose block keeps the other one stays in the checkpoint as zeros
(see allocsearch/recipe/depth.py), so only removed blocks and narrower MLPs are faster.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

from allocsearch import pipeline
from allocsearch.atomic import atomic_write_text
from allocsearch.config import DataConfig, RunConfig, SearchConfig, SupernetConfig
from allocsearch.distributed.local import run_search
from allocsearch.evaluate.evaluator import Evaluator
from allocsearch.evaluate.metrics import KLDivergence
from allocsearch.pruners import StructuredPruner
from allocsearch.recipe.apply import apply_recipe
from allocsearch.recipe.timing import forward_seconds, forward_times
from allocsearch.search.budget import Budget, CostModel
from allocsearch.search.evolutionary import EvolutionarySearcher
from allocsearch.supernet.build import build_supernet, supernet_units, unit_group_counts
from allocsearch.supernet.depth import block_units
from allocsearch.supernet.levels import structured_grid


def run_config() -> RunConfig:
    cfg = RunConfig(
        model="demo",
        data=DataConfig(seq_len=128, n_calibration_seqs=64, n_heldout_seqs=64, seed=0),
        supernet=SupernetConfig(structure="heads_neurons", depth="drop"),
        search=SearchConfig(strategy="evopress"),
    )
    cfg.validate()
    return cfg


def open_or_build(ws, path: Path, build):
    try:
        return pipeline.open_store(ws, path)
    except Exception:  # noqa: BLE001 (absent or stale: build it again)
        return build()


def uniform_neuron_store(ws, path: Path, neurons: int):
    """A one-level heads_neurons supernet: attention dense, every MLP minus ``neurons``."""
    adapter = ws.model.adapter
    units = supernet_units(adapter, "heads_neurons")
    groups = unit_group_counts(adapter, "heads_neurons")
    centre = np.array(
        [0.0 if u.role == "attn" else neurons / g for u, g in zip(units, groups, strict=True)]
    )
    grid = structured_grid(groups, 1, center=centre, steps_each_side=0)
    return build_supernet(
        ws.model,
        ws.calibration,
        pruner=StructuredPruner,
        grid=grid,
        structure="heads_neurons",
        input_mode="dense",
        out_dir=path,
        batch_size=8,
        progress=False,
        overwrite=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-depth"))
    ap.add_argument("--repeats", type=int, default=100)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = run_config()
    ws = pipeline.load_workspace(cfg)
    t0 = time.perf_counter()
    store = open_or_build(
        ws, args.out / "drop", lambda: pipeline.build(ws, args.out / "drop", overwrite=True)
    )
    build_s = time.perf_counter() - t0
    spec = store.spec
    names = [u.name.removeprefix("model.layers.") for u in spec.units]
    evaluator = pipeline.make_evaluator(ws, store, "resident")
    fid = ws.calibration.n_tokens
    tokens = ws.heldout.tokens[:1]
    dense_s = forward_seconds(ws.model, tokens, repeats=args.repeats)
    dense_ppl = pipeline.heldout_perplexity(ws.model, ws.heldout)
    numel = spec.numel.astype(np.float64)

    rows = []

    def measure(label: str, k: int, st, choice: np.ndarray, ev, budget, what: str) -> None:
        outcome = pipeline.Outcome(label, choice, None, 0, 0, 0.0, {})
        recipe = pipeline.recipe_from_choice(ws, st, budget, outcome)
        pruned, _, report = apply_recipe(ws.model, recipe, store=st)
        kl = float(ev(choice[None].astype(np.int32), fidelity=fid, batch_seed=0)[0])
        ppl = pipeline.heldout_perplexity(pruned, ws.heldout)
        # dense and pruned timed in turn, so both see the same load
        dense, s = forward_times([ws.model, pruned], tokens, repeats=args.repeats)
        removed = 1.0 - report.num_params_recipe / report.num_params_dense
        stored = report.num_params / report.num_params_dense
        rows.append((k, label, what, removed, stored, kl, ppl, 1e3 * s, 1e3 * dense, dense / s))
        print(rows[-1], flush=True)

    for k in (1, 2):
        budget = Budget(kind="sublayers", target=k / 12)
        costs = CostModel.from_spec(spec, budget)

        def dropped(choice, *, names=names):
            return ", ".join(n for n, c in zip(names, choice, strict=True) if c) or "-"

        # EvoPress, the demo's settings
        evo = pipeline.run_strategy(
            "evopress",
            ws,
            store,
            budget,
            evaluate=evaluator,
            seed=0,
            settings=dict(pipeline.DEMO_EVOPRESS),
            progress=False,
        )
        measure("EvoPress", k, store, evo.choice, evaluator, budget, dropped(evo.choice))

        # brute force over all sets of k sublayers
        sets = np.array(
            [[1 if u in c else 0 for u in range(12)] for c in itertools.combinations(range(12), k)],
            np.int32,
        )
        assert costs.is_feasible(sets).all()
        scores = evaluator(sets, fidelity=fid, batch_seed=0)
        best = sets[int(np.argmin(scores))]
        measure(f"brute force ({len(sets)} sets)", k, store, best, evaluator, budget, dropped(best))

        last = np.zeros(12, np.int32)
        last[12 - k :] = 1
        measure(f"last {k}", k, store, last, evaluator, budget, dropped(last))

        if k == 2:
            # whole blocks as units (block_units), EvoPress over them, and all 6 blocks
            bspec, owner = block_units(spec)
            bbudget = Budget(kind="sublayers", target=2 / 12)

            def score_blocks(choices, *, owner=owner, **kw):
                return evaluator(np.asarray(choices)[:, owner], **kw)

            result = run_search(
                EvolutionarySearcher(**pipeline.DEMO_EVOPRESS),
                score_blocks,
                bspec,
                bbudget,
                key=jax.random.key(0),
            )
            choice = np.asarray(result.best_choice)[owner]
            measure("EvoPress over blocks", k, store, choice, evaluator, budget, dropped(choice))
            blocks = np.kron(np.eye(6, dtype=np.int32), np.ones(2, np.int32))
            scores = evaluator(blocks, fidelity=fid, batch_seed=0)
            best = blocks[int(np.argmin(scores))]
            measure("best block (6 sets)", k, store, best, evaluator, budget, dropped(best))

        # uniform neurons removing at least the EvoPress row's weights
        removed = float(np.dot(evo.choice, numel))
        per_neuron = 3 * 256
        n = int(np.ceil(removed / (6 * per_neuron)))
        ustore = open_or_build(
            ws,
            args.out / f"uniform-{n}",
            lambda n=n: uniform_neuron_store(ws, args.out / f"uniform-{n}", n),
        )
        uev = Evaluator(
            ws.model,
            ustore.spec,
            ustore.all_variants(),
            ustore.unit_params,
            ws.calibration,
            metric=KLDivergence(),
        )
        ub = Budget(kind="params", target=0.0)
        zero = np.zeros(12, np.int32)
        measure("uniform neurons", k, ustore, zero, uev, ub, f"{n} of 704 neurons per MLP")

    lines = [
        "| sublayers removed | allocation | dropped / pruned | params removed (recipe) | "
        "params stored | calib KL | held-out ppl | forward ms (dense ms) | speedup |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| 0 | dense | - | 0.00% | 100.00% | 0 | {dense_ppl:.3f} | {1e3 * dense_s:.2f} | 1.00x |",
    ]
    for k, label, what, removed, stored, kl, ppl, ms, dense_ms, speed in rows:
        lines.append(
            f"| {k} | {label} | {what} | {100 * removed:.2f}% | {100 * stored:.2f}% | "
            f"{kl:.4f} | {ppl:.3f} | {ms:.2f} ({dense_ms:.2f}) | {speed:.2f}x |"
        )
    meta = (
        f"\nSupernet build {build_s:.1f} s (0 if reused); forward times: JAX "
        f"{platform.machine()} CPU, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f} at the end; {tokens.shape[0]} x {tokens.shape[1]} held-out "
        f"tokens, fastest of {args.repeats} runs each, dense and pruned in turn.\n"
    )
    text = "\n".join(lines) + "\n" + meta
    atomic_write_text(text, args.out / "depth.md", overwrite=True)
    print(text)


if __name__ == "__main__":
    main()
