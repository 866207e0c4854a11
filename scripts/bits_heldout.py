"""Score bitwidth recipes on their quantized supernet: bits per weight, KL, held-out perplexity.

Each recipe's per-layer bits select the supernet's levels (``quant_choice_for_recipe``);
KL is on the whole calibration set, perplexity on the held-out set of the default config
(the bundled demo model unless ``--config``). Prints one Markdown row per recipe, with
4 decimals (the compare tables round perplexity to 2).

    python scripts/bits_heldout.py runs/qdemo/supernet runs/qdemo/recipe-*.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from allocsearch import pipeline
from allocsearch.config import config_from_dict, load_config
from allocsearch.recipe.apply_quant import quant_choice_for_recipe
from allocsearch.recipe.recipe import Recipe, fraction_removed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("supernet", type=Path)
    p.add_argument("recipes", type=Path, nargs="+")
    p.add_argument("--config", type=Path)
    args = p.parse_args()
    cfg = load_config(args.config) if args.config else config_from_dict({})
    ws = pipeline.load_workspace(cfg)
    store = pipeline.open_store(ws, args.supernet)
    evaluator = pipeline.make_evaluator(ws, store)
    print("| recipe | strategy | bits per weight | KL (calibration) | held-out ppl |")
    print("|---|---|---|---|---|")
    for path in args.recipes:
        r = Recipe.load(path)
        choice = quant_choice_for_recipe(r, store)
        kl = float(evaluator(choice[None], fidelity=ws.calibration.n_tokens, batch_seed=0)[0])
        ppl = float(evaluator.perplexity(choice, ws.heldout))
        bits = 16 * (1 - fraction_removed(r.layers, "bits"))
        print(f"| {path} | {r.provenance.strategy} | {bits:.4f} | {kl:.5f} | {ppl:.4f} |")
    print(f"| dense | - | 16 | 0 | {pipeline.heldout_perplexity(ws.model, ws.heldout):.4f} |")


if __name__ == "__main__":
    main()
