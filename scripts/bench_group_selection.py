"""Structured group selection: greedy OBS order, swap local search and exact, against the best.

    python scripts/bench_group_selection.py            # 20 seeds x removal counts 1..7

For 8 removable groups (query heads of a GQA layer, 4 per kv head; kv groups of 2 query
heads; neurons), correlated inputs ``X = Z A`` (``Z`` normal, ``A`` a random square
matrix), one level per (seed, count), each selection is scored by its float64 least-squares
refit error and divided by the exhaustive best over all C(8, count) subsets. Rows:

* ``greedy``: the OBS removal order alone (``enumeration_limit=0, max_swaps=0``);
* ``local search``: that order improved by the swap search (``enumeration_limit=0``);
* ``default``: the pruner's defaults (exact here: C(8, r) <= 5,000).

Prints, per layout and row, the worst ratio, the cases above the best (ratio > 1 + 1e-6)
and the cases more than 1% above it, out of 140.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

from allocsearch.pruners import HeadGroups, NeuronGroups, StructuredPruner, accumulate_stats

LAYOUTS = {
    "query heads": HeadGroups(
        hidden_size=16, num_heads=8, num_kv_heads=2, head_dim=4, query_heads=True
    ),
    "kv groups": HeadGroups(hidden_size=16, num_heads=16, num_kv_heads=8, head_dim=3),
    "neurons": NeuronGroups(hidden_size=16, intermediate_size=8, min_step=1),
}
ROWS = {
    "greedy": {"enumeration_limit": 0, "max_swaps": 0},
    "local search": {"enumeration_limit": 0},
    "default": {},
}


def refit_error(w: np.ndarray, h: np.ndarray, keep_cols: np.ndarray) -> float:
    """float64 ``tr((W - W') H (W - W')^T)`` with ``W'`` refit on the kept columns."""
    fit = np.zeros_like(w)
    fit[:, keep_cols] = np.linalg.solve(h[np.ix_(keep_cols, keep_cols)], (w @ h)[:, keep_cols].T).T
    return float(np.trace((w - fit) @ h @ (w - fit).T))


def ratios(layout, seeds: range, counts: range) -> dict[str, list[float]]:
    """Per row, chosen / best refit error for every (seed, count)."""
    out: dict[str, list[float]] = {row: [] for row in ROWS}
    n = layout.in_features
    for seed in seeds:
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(256, n)) @ rng.normal(size=(n, n))
        w = rng.normal(size=(layout.hidden_size, n)).astype(np.float32)
        stats = accumulate_stats(None, x.astype(np.float32))
        h = np.asarray(stats.hessian, np.float64)
        h += 0.01 * np.mean(np.diag(h)) * np.eye(n)
        w64 = w.astype(np.float64)

        def err(keep: np.ndarray, w64: np.ndarray = w64, h: np.ndarray = h) -> float:
            return refit_error(w64, h, np.flatnonzero(layout.column_keep(keep)))

        for count in counts:
            best = np.inf
            for removed in itertools.combinations(range(layout.num_groups), count):
                keep = np.ones(layout.num_groups, bool)
                keep[list(removed)] = False
                best = min(best, err(keep))
            for row, settings in ROWS.items():
                pruner = StructuredPruner(layout=layout, **settings)
                keep = pruner.prune(w, stats, [count / layout.num_groups]).group_keep[0]
                out[row].append(err(keep) / best)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()
    print("| layout | selection | worst ratio | cases > best | cases > 1% | of |")
    print("|---|---|---:|---:|---:|---:|")
    start = time.perf_counter()
    for name, layout in LAYOUTS.items():
        for row, values in ratios(layout, range(args.seeds), range(1, 8)).items():
            v = np.array(values)
            print(
                f"| {name} | {row} | {v.max():.3f} | {(v > 1 + 1e-6).sum()} | "
                f"{(v > 1.01).sum()} | {len(v)} |"
            )
    print(f"\n{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
