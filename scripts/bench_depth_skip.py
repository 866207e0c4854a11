"""Scoring cost of dropped sublayers: skipped (lax.cond) against run as zero weights.

    python scripts/bench_depth_skip.py [--repeats 5] [--per-call 4]

On the demo model's depth ``drop`` supernet (12 sublayers, levels dense / dropped), both
evaluators score queries of candidates that each drop k sublayers (k = 0, 3, 6, 9; the
same k for every candidate, random sets, seed 0) on the whole calibration set, with
``skip_dropped=True`` (candidates ``lax.map``-ed, each dropped sublayer branched around)
and ``skip_dropped=False`` (candidates ``vmap``-ed, zero weights computed). Prints the
median seconds per candidate of ``--repeats`` timed queries (after one compile query)
and the ratio skip / compute, and checks that the scores agree. The sublayers' share of
a candidate's compute shrinks with k when skipping; the embeddings, head and loss stay.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from allocsearch import pipeline
from allocsearch.config import DataConfig, RunConfig, SearchConfig, SupernetConfig
from allocsearch.evaluate.evaluator import Evaluator
from allocsearch.evaluate.metrics import KLDivergence
from allocsearch.evaluate.streaming import StreamingEvaluator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-depth-skip"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--per-call", type=int, default=4, help="candidates per program call")
    args = ap.parse_args()
    cfg = RunConfig(
        model="demo",
        data=DataConfig(seq_len=128, n_calibration_seqs=64, n_heldout_seqs=16, seed=0),
        supernet=SupernetConfig(structure="heads_neurons", depth="drop"),
        search=SearchConfig(strategy="evopress"),
    )
    cfg.validate()
    ws = pipeline.load_workspace(cfg)
    try:
        store = pipeline.open_store(ws, args.out)
    except Exception:  # noqa: BLE001 (absent or stale: build it)
        store = pipeline.build(ws, args.out, overwrite=True)
    spec, calib = store.spec, ws.calibration
    fid = calib.n_tokens
    rng = np.random.default_rng(0)
    n = args.per_call
    # reuse off: identical candidates (k = 0) would otherwise start at the last block
    kw = dict(metric=KLDivergence(), candidates_per_call=n, reuse=False)
    lazy = pipeline.load_workspace(cfg).model  # the streaming evaluator reads lazily
    makers = {
        "resident": lambda skip: Evaluator(
            ws.model,
            spec,
            store.all_variants(),
            store.unit_params,
            calib,
            skip_dropped=skip,
            **kw,
        ),
        "streaming": lambda skip: StreamingEvaluator(lazy, store, calib, skip_dropped=skip, **kw),
    }
    print(f"demo depth supernet: {spec.num_units} sublayers, {fid} tokens, {n} per call")
    print("| evaluator | dropped k | skip s/cand | compute s/cand | skip / compute |")
    print("|---|---:|---:|---:|---:|")
    for name, make in makers.items():
        evs = {skip: make(skip) for skip in (True, False)}
        for k in (0, 3, 6, 9):
            choices = np.zeros((n, spec.num_units), np.int32)
            for row in choices:
                row[rng.choice(spec.num_units, size=k, replace=False)] = 1
            times, scores = {}, {}
            for skip, ev in evs.items():
                scores[skip] = ev(choices, fidelity=fid, batch_seed=0)  # compile
                runs = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    ev(choices, fidelity=fid, batch_seed=0)
                    runs.append((time.perf_counter() - t) / n)
                times[skip] = statistics.median(runs)
            np.testing.assert_allclose(scores[True], scores[False], rtol=1e-4, atol=1e-6)
            print(
                f"| {name} | {k} | {times[True]:.4f} | {times[False]:.4f} | "
                f"{times[True] / times[False]:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
