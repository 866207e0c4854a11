"""EvoPress's final pick with and without the validation split, on the demo (issue 24 item 3).

    allocsearch build --config configs/demo.yaml --out demo-supernet
    python scripts/bench_validation_pick.py demo-supernet --seeds 0 1 2

For each seed, ``evopress`` and ``dp+evopress`` run once with the demo's EvoPress
settings (30 generations, 12 offspring, survivors 3 -> 1 on 512 -> 2,048 tokens) and the
validation pick (the default with ``data.n_validation_seqs`` = 16: the start and the last
4 distinct parents scored on all 2,048 validation tokens). The generations do not depend
on how the search ends, so the same run gives the allocation each ending picks:

* ``evopress`` without: the last parent (``final_parents: 0``, the published loop);
* ``dp+evopress`` without: the calibration pick (the same candidates scored on the whole
  calibration set, 8,192 tokens: the pick before this change);
* with: the validation pick.

Each allocation is scored on the whole calibration set (KL, 8,192 tokens), on every
validation row (KL, 2,048 tokens) and by held-out perplexity (64 x 128 tokens of the
held-out modules). Prints one markdown table of the per-seed numbers and their means.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from allocsearch import pipeline
from allocsearch.config import load_config
from allocsearch.evaluate.splits import split_fitness


class Recording:
    """The evaluator, remembering the candidates of the last validation query."""

    def __init__(self, evaluate):
        self.evaluate = evaluate
        self.final: np.ndarray | None = None

    def __call__(self, choices, *, fidelity, batch_seed, split="calibration"):
        if split == "validation":
            self.final = np.asarray(choices).copy()
        return self.evaluate(choices, fidelity=fidelity, batch_seed=batch_seed, split=split)


def scores(ws, ev, choice) -> tuple[float, float, float]:
    """(whole-calibration KL, validation KL, held-out perplexity) of ``choice``."""
    split = split_fitness(ev, choice, ws.calibration, ws.validation)
    return split.calibration, split.validation, float(ev.perplexity(choice, ws.heldout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("supernet", help="store built with configs/demo.yaml")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    cfg = load_config(args.config)
    cfg = dataclasses.replace(cfg, backend=dataclasses.replace(cfg.backend, kind="local"))
    ws = pipeline.load_workspace(cfg)
    assert ws.validation is not None, "the config needs data.n_validation_seqs > 0"
    store = pipeline.open_store(ws, args.supernet)
    budget = pipeline.make_budget(cfg.search, store.spec)
    ev = pipeline.make_evaluator(ws, store)
    rows = []
    for strategy in ("evopress", "dp+evopress"):
        for seed in args.seeds:
            rec, last = Recording(ev), {}
            outcome = pipeline.run_strategy(
                strategy, ws, store, budget, evaluate=rec, seed=seed,
                settings=dict(cfg.search.settings), progress=False,
                on_generation=lambda s, last=last: last.update(parent=s.parent.copy()),
            )  # fmt: skip
            cands = rec.final
            if strategy == "evopress":
                without = last["parent"]
            else:  # the calibration pick: the candidates on all 8,192 calibration tokens
                full = ev(cands, fidelity=ws.calibration.n_tokens, batch_seed=0)
                without = cands[int(np.argmin(full))]
            for pick, choice in (("without", without), ("with", outcome.choice)):
                cal, val, ppl = scores(ws, ev, choice)
                rows.append((strategy, pick, seed, cal, val, ppl, len(cands)))
                print(f"{strategy} {pick} seed {seed}: cal {cal:.5f} val {val:.5f} ppl {ppl:.3f}")
    print("\n| strategy | final pick | seed | calibration KL | validation KL | held-out ppl |")
    print("|---|---|---:|---:|---:|---:|")
    for strategy in ("evopress", "dp+evopress"):
        for pick in ("without", "with"):
            mine = [r for r in rows if r[0] == strategy and r[1] == pick]
            for r in mine:
                print(f"| {strategy} | {pick} | {r[2]} | {r[3]:.5f} | {r[4]:.5f} | {r[5]:.3f} |")
            mean = np.mean([r[3:6] for r in mine], axis=0)
            print(f"| {strategy} | {pick} | mean | {mean[0]:.5f} | {mean[1]:.5f} | {mean[2]:.3f} |")


if __name__ == "__main__":
    main()
