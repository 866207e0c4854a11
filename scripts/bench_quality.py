"""Allocation quality on the demo model: held-out perplexity of every strategy.

    python scripts/bench_quality.py                        # all settings, seeds 0 1 2
    python scripts/bench_quality.py --settings u70 u60 --seeds 0
    python scripts/bench_quality.py --report-only          # tables from results.jsonl

Settings: ``u50``, ``u60``, ``u70`` remove 50/60/70% of the decoder's linear weights
(unstructured SparseGPT supernet, 9 equal-weight levels per layer around the target);
``s25``, ``s50`` remove 25/50% of the parameters of attention kv-groups and MLP neurons
(structured OBS supernet). For each setting one supernet is built from the calibration
set (``--data-seed``) and every strategy runs on it:

* allocators: uniform, OWL (M=5, lambda=0.08), LAMP, ERK (no evaluations);
* table solvers: DP and knapsack (MILP) over one per-layer error table (L x K
  evaluations at 4,096 tokens, measured once per setting and shared: the knapsack's
  wall time excludes the table, its evaluations count it);
* EvoPress: 30 generations, 12 offspring, survivors 3 -> 1 on 512 -> 2,048 tokens;
* dp+evopress: the registry's strategy (as ``search --strategy dp+evopress`` runs it):
  DP's table on the seed's minibatch, EvoPress as above started from DP's allocation,
  then a final pick among the start and the last 4 parents on the calibration set; its
  evaluations and wall time include the table's;
* Týr coarse-to-fine: 2 rounds of an expected-input supernet rebuilt around the current
  best (step 12.5% then 6.25%), each searched by EvoPress for 15 generations with the
  same offspring and stages, so Týr and EvoPress spend the same number of evaluations.

Seeds are the search seeds (EvoPress mutations and minibatches, Týr); the calibration
and held-out sets stay fixed unless ``--vary-data`` also sets the data seed, which
rebuilds the supernet and the error table per seed. Strategies that use no random
numbers (uniform, OWL, LAMP, ERK, DP, knapsack) run once per setting and are marked
deterministic; ``--strategies`` picks a subset. Every finished run is appended to
``<out>/results.jsonl`` as soon as it is scored, and runs already there are skipped, so
an interrupted benchmark resumes. The
report (``<out>/quality.md`` and one ``<out>/ppl-<setting>.png`` per setting) gives the
median and min-max over seeds of held-out perplexity, calibration KL, evaluations and
wall time, the dense model's perplexity, and the targets of issue 9 as measured.
Wall times include whatever else ran on the machine (the load average is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from allocsearch import pipeline
from allocsearch.atomic import atomic_write_text
from allocsearch.config import DataConfig, RunConfig, SearchConfig, SupernetConfig
from allocsearch.report.plots import plot_ppl_by_strategy
from allocsearch.report.tables import median_spread

SETTINGS = {
    "u50": ("unstructured", 0.5),
    "u60": ("unstructured", 0.6),
    "u70": ("unstructured", 0.7),
    "s25": ("heads_neurons", 0.25),
    "s50": ("heads_neurons", 0.5),
}
STRATEGIES = ("uniform", "owl", "lamp", "erk", "dp", "knapsack", "evopress", "tyr", "dp+evopress")
DETERMINISTIC = ("uniform", "owl", "lamp", "erk", "dp", "knapsack")
EVOPRESS = dict(pipeline.DEMO_EVOPRESS)  # 30 generations
TYR = {
    "rounds": 2,
    "initial_step": 0.125,
    "min_step": 0.0625,
    **dict(EVOPRESS, generations=EVOPRESS["generations"] // 2),
}
TABLE_TOKENS = 4096


def run_config(setting: str, data_seed: int, heldout_seqs: int) -> RunConfig:
    structure, target = SETTINGS[setting]
    supernet = (
        SupernetConfig(pruner="sparsegpt", structure=structure, center=target)
        if structure == "unstructured"
        else SupernetConfig(structure=structure, center=target, step_fraction=0.125)
    )
    cfg = RunConfig(
        model="demo",
        data=DataConfig(
            seq_len=128, n_calibration_seqs=64, n_heldout_seqs=heldout_seqs, seed=data_seed
        ),
        supernet=supernet,
        search=SearchConfig(target=target),
    )
    cfg.validate()
    return cfg


def load_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"{path}:{n}: skipping a torn line (an interrupted write)", file=sys.stderr)
    return rows


def append_result(path: Path, row: dict) -> None:
    with open(path, "a") as f:  # one line per run, flushed: a crash loses at most this run
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


class RowCache:
    """An ``Evaluate`` that remembers each row's score per (fidelity, batch seed), so DP
    and knapsack (same seed, same minibatch) measure the error table once."""

    def __init__(self, evaluate) -> None:
        self.evaluate = evaluate
        self.memo: dict[tuple[bytes, int, int], float] = {}

    def __call__(self, choices: np.ndarray, *, fidelity: int, batch_seed: int) -> np.ndarray:
        choices = np.asarray(choices, np.int32)
        keys = [(row.tobytes(), fidelity, batch_seed) for row in choices]
        miss = [i for i, k in enumerate(keys) if k not in self.memo]
        if miss:
            scores = self.evaluate(choices[miss], fidelity=fidelity, batch_seed=batch_seed)
            self.memo.update(zip((keys[i] for i in miss), map(float, scores), strict=True))
        return np.array([self.memo[k] for k in keys], np.float32)


def settings_of(strategy: str) -> dict:
    if strategy == "evopress":
        return dict(EVOPRESS)
    if strategy == "tyr":
        return dict(TYR)
    if strategy in ("dp", "knapsack"):
        return {"tokens": TABLE_TOKENS}
    return {}


def run_one(strategy, ws, store, budget, evaluator, tables, seed, work, args) -> pipeline.Outcome:
    """One strategy's search. ``dp+evopress`` runs as the registry defines it (the CLI's):
    DP's table on this seed's minibatch, EvoPress started from DP's allocation, then the
    final pick among the start and the last parents; its evaluations count the table's."""
    common = dict(work_dir=work / f"tyr-seed-{seed}", progress=args.progress)
    settings = settings_of(strategy)
    if strategy == "dp+evopress":
        settings = dict(settings_of("evopress"), table_tokens=TABLE_TOKENS)
    return pipeline.run_strategy(
        strategy,
        ws,
        store,
        budget,
        evaluate=tables if strategy in ("dp", "knapsack", "dp+evopress") else evaluator,
        seed=seed,
        settings=settings,
        **common,
    )


def run_setting(setting: str, seeds: list[int], strategies: list[str], args, console) -> None:
    results_path = args.out / "results.jsonl"
    done = {
        (r["setting"], r["seed"], r["data_seed"], r["strategy"]) for r in load_results(results_path)
    }
    data_seeds = seeds if args.vary_data else [args.data_seed]
    for data_seed in data_seeds:
        cfg = run_config(setting, data_seed, args.heldout_seqs)
        run_seeds = [data_seed] if args.vary_data else seeds
        todo = [
            (seed, s)
            for seed in run_seeds
            for s in strategies
            if not (s in DETERMINISTIC and seed != run_seeds[0])
            and (setting, seed, data_seed, s) not in done
        ]
        if not todo:
            continue
        ws = pipeline.load_workspace(cfg)
        work = args.out / setting / f"data-{data_seed}"
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            store = pipeline.open_store(ws, work / "supernet")
            build_s = None
        except Exception:  # noqa: BLE001 (absent or stale: build it again)
            store = pipeline.build(ws, work / "supernet", overwrite=True, progress=args.progress)
            build_s = time.perf_counter() - t0
        budget = pipeline.make_budget(cfg.search, store.spec)
        evaluator = pipeline.make_evaluator(ws, store)
        dense_ppl = pipeline.heldout_perplexity(ws.model, ws.heldout)
        tables = RowCache(evaluator)
        for seed, strategy in todo:
            load0 = os.getloadavg()[0]
            console.print(f"[bold]{setting}[/] seed {seed}: {strategy} ...")
            try:
                outcome = run_one(strategy, ws, store, budget, evaluator, tables, seed, work, args)
            except Exception as err:  # noqa: BLE001 (record why a strategy cannot run here)
                console.print(f"  {strategy} failed: {type(err).__name__}: {err}")
                append_result(
                    results_path,
                    {
                        "setting": setting,
                        "seed": seed,
                        "data_seed": data_seed,
                        "strategy": strategy,
                        "error": f"{type(err).__name__}: {err}",
                    },
                )
                continue
            [scored] = pipeline.score_outcomes(ws, evaluator, [outcome], budget)
            row = {
                "setting": setting,
                "structure": cfg.supernet.structure,
                "target": cfg.search.target,
                "seed": seed,
                "data_seed": data_seed,
                "strategy": strategy,
                "heldout_ppl": scored.heldout,
                "kl": scored.fitness,
                "achieved": scored.achieved,
                "evaluations": outcome.evaluations,
                "wall_time_s": outcome.wall_time_s,
                "dense_ppl": dense_ppl,
                "build_s": build_s,
                "calibration_tokens": ws.calibration.n_tokens,
                "heldout_tokens": ws.heldout.n_tokens,
                "load_average": [load0, os.getloadavg()[0]],
                "info": {k: float(v) for k, v in outcome.info.items()},
            }
            append_result(results_path, row)
            console.print(
                f"  held-out ppl {scored.heldout:.4f} (dense {dense_ppl:.4f}), KL "
                f"{scored.fitness:.4f}, {outcome.evaluations} evaluations, "
                f"{outcome.wall_time_s:.0f} s"
            )


def _fmt_spread(values: list[float], digits: int) -> str:
    med, lo, hi = median_spread(values)
    if len(values) == 1 or lo == hi:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def report(out: Path) -> str:
    rows = [r for r in load_results(out / "results.jsonl") if "error" not in r]
    errors = [r for r in load_results(out / "results.jsonl") if "error" in r]
    lines = [
        "Held-out perplexity: median over search seeds (min-max); deterministic strategies "
        "ran once. KL: per token on the whole calibration set. Evaluations and wall time: "
        "median over seeds.",
        "",
    ]
    verdicts = []
    for setting in SETTINGS:
        mine = [r for r in rows if r["setting"] == setting]
        if not mine:
            continue
        structure, target = SETTINGS[setting]
        dense = float(np.median([r["dense_ppl"] for r in mine]))
        by = {}
        for r in mine:
            by.setdefault(r["strategy"], []).append(r)
        seeds = sorted({r["seed"] for r in mine})
        lines += [
            f"### {setting}: {structure}, remove {target:.0%} of the parameters",
            "",
            f"Dense held-out perplexity {dense:.4f}; "
            f"{mine[0]['calibration_tokens']:,} calibration tokens, "
            f"{mine[0]['heldout_tokens']:,} held-out tokens; seeds {seeds}.",
            "",
            "| strategy | held-out ppl | KL | achieved | evaluations | wall s | seeds |",
            "|---|---|---|---|---|---|---|",
        ]
        order = [s for s in STRATEGIES if s in by] + [s for s in by if s not in STRATEGIES]
        for s in order:
            rs = by[s]
            lines.append(
                f"| {s} | {_fmt_spread([r['heldout_ppl'] for r in rs], 4)} | "
                f"{_fmt_spread([r['kl'] for r in rs], 4)} | "
                f"{np.median([r['achieved'] for r in rs]):.4f} | "
                f"{int(np.median([r['evaluations'] for r in rs]))} | "
                f"{np.median([r['wall_time_s'] for r in rs]):.0f} | "
                f"{'deterministic' if s in DETERMINISTIC else len(rs)} |"
            )
        lines.append("")
        table = {target: {s: [r["heldout_ppl"] for r in by[s]] for s in order}}
        plot_ppl_by_strategy(table, out / f"ppl-{setting}.png", dense_ppl=dense, overwrite=True)
        # Issue 9 targets: EvoPress and Týr beat uniform and OWL on every seed (60, 70%
        # unstructured); the best closes >= 1/3 of the uniform-dense gap at 70%.
        base = {s: min(r["heldout_ppl"] for r in by[s]) for s in ("uniform", "owl") if s in by}
        if structure == "unstructured" and target >= 0.6 and base:
            for s in ("evopress", "tyr", "dp+evopress"):
                if s in by:
                    worst = max(r["heldout_ppl"] for r in by[s])
                    ok = all(worst < v for v in base.values())
                    verdicts.append(
                        f"- {setting}: {s} worst seed {worst:.4f} vs "
                        + ", ".join(f"{b} {v:.4f}" for b, v in base.items())
                        + (" -> beats both on every seed" if ok else " -> NOT met")
                    )
        if setting == "u70" and "uniform" in by:
            uni = float(np.median([r["heldout_ppl"] for r in by["uniform"]]))
            best_s, best = min(
                ((s, float(np.median([r["heldout_ppl"] for r in by[s]]))) for s in order),
                key=lambda t: t[1],
            )
            closed = (uni - best) / (uni - dense) if uni > dense else float("nan")
            verdicts.append(
                f"- u70: best median {best_s} {best:.4f} closes {closed:.0%} of the "
                f"uniform-dense gap ({uni:.4f} -> {dense:.4f}); target >= 33% -> "
                + ("met" if closed >= 1 / 3 else "NOT met")
            )
    if verdicts:
        lines += ["Targets (issue 9), as measured:", "", *verdicts, ""]
    if errors:
        lines += ["Runs that failed:", ""]
        lines += [
            f"- {r['setting']} seed {r['seed']} {r['strategy']}: {r['error']}" for r in errors
        ]
        lines.append("")
    text = "\n".join(lines)
    atomic_write_text(text, out / "quality.md", overwrite=True)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--vary-data", action="store_true", help="data seed = search seed")
    ap.add_argument("--heldout-seqs", type=int, default=256, help="held-out sequences of 128")
    ap.add_argument("--out", type=Path, default=Path("runs/quality"))
    ap.add_argument("--progress", action="store_true", help="progress bars")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    console = Console()
    if not args.report_only:
        import jax

        console.print(
            f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
            f"python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}"
        )
        for setting in args.settings:
            run_setting(setting, args.seeds, args.strategies, args, console)
    console.print(report(args.out), highlight=False, markup=False, soft_wrap=True)
    console.print(f"wrote {args.out / 'quality.md'} and {args.out}/ppl-*.png")


if __name__ == "__main__":
    main()
