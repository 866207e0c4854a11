"""`allocsearch sweep`: recipes for many budget targets from one supernet and one error table."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from rich.console import Console

from allocsearch import pipeline
from allocsearch.atomic import atomic_write_bytes, atomic_write_text
from allocsearch.config import RunConfig, SupernetConfig
from allocsearch.console_progress import heartbeat
from allocsearch.distributed.checkpoint import (
    SearchCheckpointer,
    latest_state,
    search_fingerprint,
)
from allocsearch.distributed.local import step_keys
from allocsearch.report.plots import plot_quality_vs_sparsity
from allocsearch.report.tables import format_column, format_value
from allocsearch.search import registry
from allocsearch.search.base import Evaluate, draw_batch_seed, numpy_rng
from allocsearch.search.budget import Budget, CostModel, InfeasibleBudgetError
from allocsearch.search_run import run_fingerprint
from allocsearch.supernet.spec import SupernetSpec
from allocsearch.supernet.store import MANIFEST_NAME, SupernetStore

TARGET_FORMS = (
    "start:stop:step (inclusive, e.g. 0.4:0.8:0.05) or a comma list (e.g. 0.5,0.6,0.7) of "
    "fractions strictly between 0 and 1"
)
# Reference allocations scored at every target, before DP (and EvoPress).
REFERENCES = ("uniform", "owl")
# The strategy of the optional EvoPress row: EvoPress started from DP's allocation.
SEEDED = "dp+evopress"
# Decimals targets are rounded to (so 0.4 + 3 * 0.05 is 0.55, not 0.5500000000000002).
_TARGET_DECIMALS = 10
MANIFEST = "sweep.json"


def parse_targets(text: str, *, upper: float = 1.0) -> tuple[float, ...]:
    """Budget targets from ``start:stop:step`` (both ends included when ``stop`` lies on the
    step lattice) or a comma list; sorted, duplicates removed; each in ``(0, upper)``
    (``upper=16`` with ``<=`` for average bits per weight).

    Raises:
      ValueError: naming the bad value and :data:`TARGET_FORMS`.
    """
    text = str(text).strip()

    def number(part: str) -> float:
        try:
            value = float(part)
        except ValueError:
            raise ValueError(
                f"--targets {text!r}: {part.strip()!r} is not a number; give {TARGET_FORMS}"
            ) from None
        if not math.isfinite(value):
            raise ValueError(
                f"--targets {text!r}: {part.strip()!r} is not finite; give {TARGET_FORMS}"
            )
        return value

    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise ValueError(f"--targets {text!r} is not start:stop:step; give {TARGET_FORMS}")
        start, stop, step = (number(p) for p in parts)
        if step <= 0 or stop < start:
            raise ValueError(
                f"--targets {text!r}: needs step > 0 and stop >= start; give {TARGET_FORMS}"
            )
        count = int(math.floor((stop - start) / step + 1e-9)) + 1
        values = [start + i * step for i in range(count)]
    else:
        values = [number(p) for p in text.split(",") if p.strip()]
        if not values:
            raise ValueError(f"--targets {text!r} names no target; give {TARGET_FORMS}")
    values = sorted({round(v, _TARGET_DECIMALS) for v in values})
    bad = [v for v in values if not (0.0 < v < 1.0 if upper == 1.0 else 0.0 < v <= upper)]
    if bad:
        span = "(0, 1)" if upper == 1.0 else f"(0, {upper:g}] bits"
        raise ValueError(f"--targets {text!r}: {bad[0]:g} is not in {span}; give {TARGET_FORMS}")
    return tuple(values)


def spanning_config(cfg: SupernetConfig, targets: Sequence[float]) -> SupernetConfig:
    """The supernet settings of one grid that spans ``targets``: centred between the
    smallest and largest target, with the configured step and enough steps each side to
    reach both ends plus half the configured spread (``steps_each_side * step_fraction /
    2``) to spare, so the solver has room to move units at the extreme targets too.

    For N:M grids (fixed patterns) only the centre moves."""
    lo, hi = min(targets), max(targets)
    center = round((lo + hi) / 2, _TARGET_DECIMALS)
    reach = (hi - lo) / 2 + cfg.steps_each_side * cfg.step_fraction / 2
    steps = max(cfg.steps_each_side, math.ceil(reach / cfg.step_fraction - 1e-9))
    if cfg.structure == "nm":
        steps = cfg.steps_each_side
    return dataclasses.replace(cfg, center=center, steps_each_side=steps)


def target_budget(cfg: RunConfig, spec: SupernetSpec, target: float) -> Budget:
    """The budget of ``search --target target`` with the same config."""
    return pipeline.make_budget(dataclasses.replace(cfg.search, target=float(target)), spec)


def check_reachable(cfg: RunConfig, spec: SupernetSpec, targets: Sequence[float]) -> None:
    """Refuse targets no allocation of ``spec`` reaches, naming them and the range.

    Raises:
      InfeasibleBudgetError: some target lies outside the supernet's removable range.
    """
    costs = CostModel.from_spec(spec, target_budget(cfg, spec, targets[0]))
    lo, hi = costs.removable_range()
    outside = [t for t in targets if not lo - 1e-9 <= t <= hi + 1e-9]
    if outside:
        raise InfeasibleBudgetError(
            f"targets {[f'{t:g}' for t in outside]} are outside this supernet's reachable "
            f"range: its allocations remove {lo:.4g} to {hi:.4g} of the dense "
            f"{cfg.search.budget_kind}; drop them or build a supernet that spans them (omit "
            "--supernet and sweep builds one)"
        )


def common_batch_seed(seed: int) -> int:
    """The minibatch id a table search seeded by ``seed`` scores on (the one
    :class:`~allocsearch.search.dp.TableSearcher.init` draws from the init key of
    :func:`~allocsearch.distributed.local.run_search`): every allocation of a sweep is
    scored on it, so DP's own score of its solution is reused."""
    init_key, _ = step_keys(jax.random.key(seed))
    return draw_batch_seed(numpy_rng(init_key))


class QueryCache:
    """An ``Evaluate`` that scores each distinct query once and keeps the scores on disk.

    A query (choices int32[n, L], fidelity, batch_seed) seen before, in this process or
    in an earlier one writing to the same ``directory``, is answered from its file
    (``<digest>.npz``, written atomically) without calling ``evaluate``. So the
    per-unit error table is measured once for every target of a sweep, and once across
    an interruption.

    Attributes:
      evaluated: candidates this cache passed to ``evaluate`` (lower is cheaper).
    """

    def __init__(self, evaluate: Evaluate, directory: str | Path) -> None:
        self._evaluate = evaluate
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.evaluated = 0

    @staticmethod
    def digest(choices: np.ndarray, fidelity: int, batch_seed: int) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(choices, dtype=np.int32).tobytes())
        h.update(json.dumps([list(choices.shape), int(fidelity), int(batch_seed)]).encode())
        return h.hexdigest()[:24]

    def __call__(self, choices: np.ndarray, *, fidelity: int, batch_seed: int) -> np.ndarray:
        choices = np.asarray(choices, dtype=np.int32)
        path = self.directory / f"{self.digest(choices, fidelity, batch_seed)}.npz"
        if path.exists():
            with np.load(path) as saved:
                if np.array_equal(saved["choices"], choices):
                    return np.array(saved["scores"])
        scores = np.asarray(
            self._evaluate(choices, fidelity=fidelity, batch_seed=batch_seed), dtype=np.float64
        )
        self.evaluated += int(choices.shape[0])
        buf = io.BytesIO()
        np.savez(buf, choices=choices, scores=scores)
        atomic_write_bytes(buf.getvalue(), path, overwrite=True)
        return scores

    def query_sizes(self) -> list[int]:
        """Candidates of every cached query (in this process and earlier ones)."""
        sizes = []
        for path in sorted(self.directory.glob("*.npz")):
            with np.load(path) as saved:
                sizes.append(int(saved["choices"].shape[0]))
        return sizes


@dataclass(frozen=True)
class SweepRow:
    """One strategy at one target (lower fitness and perplexity are better).

    Attributes:
      target: fraction of the dense cost to remove.
      strategy: ``uniform``, ``owl``, ``dp`` or ``dp+evopress``.
      achieved: fraction actually removed (the recipe's ``budget.achieved``).
      heldout_ppl: held-out perplexity of the pruned model.
      fitness: the evaluator's metric on the sweep's common calibration minibatch.
      evaluations: candidates the strategy scored (DP: the table and its solution, as
        ``search --strategy dp`` reports; the table was measured once for all targets;
        dp+evopress: DP's and EvoPress's, as ``search --strategy dp+evopress`` reports).
      recipe: file name of the recipe, in the target's directory.
    """

    target: float
    strategy: str
    achieved: float
    heldout_ppl: float
    fitness: float
    evaluations: int
    recipe: str


@dataclass
class SweepResult:
    """Everything a sweep wrote: rows per target and strategy, the dense perplexity, and
    what was scored (``table_rows`` once, ``scorings`` single allocations, ``evopress``
    EvoPress candidates); ``fidelity``: calibration tokens of the common minibatch."""

    rows: list[SweepRow]
    dense_ppl: float
    table_rows: int
    scorings: int
    evopress: int
    fidelity: int


def target_dir(out: Path, target: float) -> Path:
    return out / f"target-{target:.4f}"


def _manifest(
    cfg: RunConfig,
    ws: pipeline.Workspace,
    store: SupernetStore,
    targets: Sequence[float],
    dp_settings: dict[str, Any],
    evopress_settings: dict[str, Any] | None,
) -> dict[str, Any]:
    """What identifies a sweep, for refusing to resume a different one."""
    fp = search_fingerprint(
        searcher=registry.make_searcher("dp", dp_settings),
        spec=store.spec,
        budget=target_budget(cfg, store.spec, targets[0]),
        key=jax.random.key(cfg.search.seed),
        extra={
            "model": ws.model.fingerprint,
            "calibration": ws.calibration.fingerprint,
            "heldout": ws.heldout.fingerprint,
            "metric": cfg.evaluator.metric,
        },
    )
    return {
        "format": 1,
        "targets": [float(t) for t in targets],
        "fingerprint": dict(fp.parts),
        "evopress": evopress_settings,
        "supernet": str(Path(store.path).absolute()),
    }


def _check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    saved = json.loads(path.read_text())
    differ = [k for k in manifest if k != "supernet" and saved.get(k) != manifest[k]]
    if differ:
        raise ValueError(
            f"--resume: {path.parent} holds a different sweep ({', '.join(differ)} differ); "
            "use the same command, or a new --out"
        )


def run_sweep(
    cfg: RunConfig,
    ws: pipeline.Workspace,
    store: SupernetStore,
    out: Path,
    targets: Sequence[float],
    *,
    evaluate: Evaluate,
    heldout_ppl: Callable[[np.ndarray], float],
    evopress_generations: int = 0,
    resume: bool = False,
    console: Console | None = None,
) -> SweepResult:
    """Recipes for every target from one supernet, writing into ``out``.

    At each target: uniform and OWL (references), DP from the per-unit error table, and
    with ``evopress_generations > 0`` EvoPress started from DP's allocation. DP runs
    exactly as ``search --strategy dp`` does (same searcher, key and queries), so its
    recipe is the same; its error-table query is identical at every target (the allowed
    levels do not depend on the target) and is scored once through a :class:`QueryCache`
    under ``out/cache``. Every allocation is scored on DP's minibatch (its solution's
    score is reused) and its held-out perplexity measured by ``heldout_ppl``.

    Writes ``target-<t>/recipe-<strategy>.json`` and ``target-<t>/rows.json`` (a finished
    target), ``sweep.md`` and ``sweep.png``. With ``resume`` a sweep of the same settings
    in ``out`` continues: finished targets are read back, the table comes from the
    cache, and EvoPress resumes from its last checkpoint (``target-<t>/checkpoints``).

    Args:
      evaluate: scores candidates (the in-process evaluator or Ray actors).
      heldout_ppl: held-out perplexity (lower is better) of an allocation int[L].

    Raises:
      InfeasibleBudgetError: a target outside the supernet's reachable range.
      ValueError: ``--resume`` of a different sweep, or bad settings.
    """
    console = console or Console(stderr=True)
    targets = tuple(sorted(float(t) for t in targets))
    dp_settings, evo_settings = _start(cfg, ws, store, out, targets, evopress_generations, resume)
    cache = QueryCache(evaluate, out / "cache")
    fidelity = int(dp_settings.get("tokens", min(4096, ws.calibration.n_tokens)))
    batch_seed = common_batch_seed(cfg.search.seed)
    ppl_memo: dict[bytes, float] = {}

    def score(choice: np.ndarray) -> tuple[float, float]:
        choice = np.asarray(choice, dtype=np.int32)
        fit = float(cache(choice[None], fidelity=fidelity, batch_seed=batch_seed)[0])
        key = choice.tobytes()
        if key not in ppl_memo:
            ppl_memo[key] = float(heldout_ppl(choice))
        return fit, ppl_memo[key]

    rows: list[SweepRow] = []
    for i, target in enumerate(targets):
        tdir = target_dir(out, target)
        done = tdir / "rows.json"
        if resume and done.exists():
            rows.extend(SweepRow(**r) for r in json.loads(done.read_text()))
            console.print(
                f"target {target:g}: finished earlier ({done})", highlight=False, soft_wrap=True
            )
            continue
        tdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        budget = target_budget(cfg, store.spec, target)
        outcomes = _target_outcomes(
            cfg, ws, store, budget, cache, evaluate, tdir, dp_settings, evo_settings, fidelity
        )
        target_rows = _write_target(ws, store, budget, target, outcomes, score, tdir, done)
        rows.extend(target_rows)
        shown = ", ".join(f"{r.strategy} {r.heldout_ppl:.3f}" for r in target_rows)
        console.print(
            f"target {target:g} ({i + 1}/{len(targets)}): held-out ppl {shown} "
            f"({time.perf_counter() - t0:.1f} s)",
            highlight=False,
            soft_wrap=True,
        )
    result = _result(cfg, ws, store, out, targets, rows, cache, fidelity)
    write_report(cfg, ws, result, out, targets)
    return result


def _start(cfg, ws, store, out: Path, targets, evopress_generations: int, resume: bool):
    """Check the targets and settings, and write the sweep's manifest (a fresh sweep
    removes what an earlier one left in ``out``); returns (DP's, EvoPress's settings or
    None)."""
    if not targets:
        raise ValueError("no targets to sweep")
    if evopress_generations < 0:
        raise ValueError(f"evopress_generations must be >= 0 (0 = off), got {evopress_generations}")
    check_reachable(cfg, store.spec, targets)
    dp_settings = _settings(cfg, "dp")
    evo_settings = None
    if evopress_generations:
        evo_settings = {**_settings(cfg, SEEDED), "generations": int(evopress_generations)}
        evo_settings.pop("table_tokens", None)  # the table is DP's, at dp_settings' tokens
        registry.check_settings(SEEDED, evo_settings)
    registry.check_settings("dp", dp_settings)
    manifest = json.loads(json.dumps(_manifest(cfg, ws, store, targets, dp_settings, evo_settings)))
    manifest_path = out / MANIFEST
    if resume and manifest_path.exists():
        _check_manifest(manifest_path, manifest)
    else:  # a fresh sweep: nothing of an earlier one in ``out`` may be taken for its own
        for old in [out / "cache", *out.glob("target-*")]:
            if old.is_dir():
                shutil.rmtree(old)
        atomic_write_text(json.dumps(manifest, indent=2) + "\n", manifest_path, overwrite=True)
    return dp_settings, evo_settings


def _target_outcomes(
    cfg, ws, store, budget, cache, evaluate, tdir, dp_settings, evo_settings, fidelity
) -> list[pipeline.Outcome]:
    """The references, DP and (with ``evo_settings``) EvoPress from DP at one target."""
    seed = cfg.search.seed
    outcomes = [
        pipeline.run_strategy(
            name, ws, store, budget, evaluate=cache, seed=seed, settings=_settings(cfg, name)
        )
        for name in REFERENCES
    ]
    dp = pipeline.run_strategy(
        "dp", ws, store, budget, evaluate=cache, seed=seed, settings=dp_settings
    )
    outcomes.append(dp)
    if evo_settings is not None:
        outcomes.append(
            _evopress(cfg, ws, store, budget, evaluate, tdir, evo_settings, dp, fidelity)
        )
    return outcomes


def _write_target(
    ws, store, budget, target, outcomes, score, tdir: Path, done: Path
) -> list[SweepRow]:
    """Each outcome's recipe and its row (scored), and the target's ``rows.json``."""
    target_rows = []
    for outcome in outcomes:
        fit, ppl = score(outcome.choice)
        recipe = pipeline.recipe_from_choice(ws, store, budget, outcome)
        name = f"recipe-{outcome.strategy}.json"
        recipe.save(tdir / name, overwrite=True)
        target_rows.append(
            SweepRow(
                target,
                outcome.strategy,
                float(recipe.budget.achieved),
                ppl,
                fit,
                int(outcome.evaluations),
                name,
            )
        )
    atomic_write_text(
        json.dumps([dataclasses.asdict(r) for r in target_rows], indent=2) + "\n",
        done,
        overwrite=True,
    )
    return target_rows


def _result(cfg, ws, store, out: Path, targets, rows, cache, fidelity: int) -> SweepResult:
    """The sweep's result: its rows, the dense perplexity and the evaluation counts."""
    dense = _dense_ppl(ws, out)
    # the table query: the baseline and every allowed (unit, level > 0) probe
    allowed = CostModel.from_spec(store.spec, target_budget(cfg, store.spec, targets[0])).allowed
    seeded = {r.target for r in rows if r.strategy == SEEDED}
    return SweepResult(
        rows=rows,
        dense_ppl=dense,
        table_rows=1 + int(np.count_nonzero(allowed[:, 1:])),
        scorings=sum(1 for n in cache.query_sizes() if n == 1),
        # EvoPress's own candidates: its rows count DP's table and solution too
        evopress=sum(r.evaluations for r in rows if r.strategy == SEEDED)
        - sum(r.evaluations for r in rows if r.strategy == "dp" and r.target in seeded),
        fidelity=fidelity,
    )


def _settings(cfg: RunConfig, strategy: str) -> dict[str, Any]:
    """The settings ``strategy`` runs with under this config
    (:func:`~allocsearch.search.registry.resolve_settings`: the config's settings where
    they mean the same for it, else its defaults)."""
    return registry.resolve_settings(
        strategy, cfg.search.settings, owner=cfg.search.strategy
    ).settings


def _evopress(
    cfg, ws, store, budget, evaluate, tdir: Path, settings, dp: pipeline.Outcome, table_tokens
) -> pipeline.Outcome:
    """``dp+evopress``: EvoPress from DP's allocation ``dp.choice``, checkpointed every
    generation into ``tdir/checkpoints`` and resumed from there if a checkpoint of the
    same search is present; its outcome counts DP's evaluations and tokens with its own."""
    settings = {**settings, "start": dp.choice, "table_tokens": int(table_tokens)}
    searcher = registry.make_searcher(SEEDED, settings)
    key = jax.random.key(cfg.search.seed)
    fingerprint = run_fingerprint(cfg, ws, store, budget, searcher, key)
    ckpt = tdir / "checkpoints"
    state = latest_state(ckpt, fingerprint=fingerprint) if ckpt.exists() else None
    with SearchCheckpointer(ckpt, fingerprint=fingerprint) as checkpointer:
        return pipeline.run_strategy(
            SEEDED,
            ws,
            store,
            budget,
            evaluate=evaluate,
            seed=cfg.search.seed,
            settings=settings,
            on_generation=lambda s: checkpointer.save(s, searcher.result(s)),
            state=state,
            seed_stage=dp,
        )


def _dense_ppl(ws: pipeline.Workspace, out: Path) -> float:
    """Held-out perplexity of the unpruned model, kept in ``out/dense.json``."""
    path = out / "dense.json"
    if path.exists():
        return float(json.loads(path.read_text())["heldout_ppl"])
    ppl = pipeline.heldout_perplexity(ws.model, ws.heldout)
    atomic_write_text(json.dumps({"heldout_ppl": ppl}) + "\n", path, overwrite=True)
    return ppl


def markdown(result: SweepResult, metric: str) -> str:
    """The sweep as a Markdown table: target, strategy, achieved, held-out ppl, fitness."""
    header = ["target", "strategy", "achieved", "held-out ppl", metric]
    fits = format_column("fitness", [r.fitness for r in result.rows])
    cells = [
        [
            f"{r.target:.2%}",
            r.strategy,
            format_value("achieved", r.achieved),
            format_value("heldout_ppl", r.heldout_ppl),
            fit,
        ]
        for r, fit in zip(result.rows, fits, strict=True)
    ]
    cells.append(["0.00%", "dense", "0.00%", format_value("heldout_ppl", result.dense_ppl), "-"])
    widths = [max(len(c[j]) for c in [header, *cells]) for j in range(len(header))]

    def line(row: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if j == 1 else c.rjust(w)
            for j, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join("-" * (w + 1) + ":" if j != 1 else "-" * (w + 2) for j, w in enumerate(widths))
        + "|"
    )
    return "\n".join([line(header), rule, *(line(c) for c in cells)])


def write_report(
    cfg: RunConfig,
    ws: pipeline.Workspace,
    result: SweepResult,
    out: Path,
    targets: Sequence[float],
) -> None:
    """``out/sweep.md`` (the table and what was scored) and ``out/sweep.png``."""
    n = len(targets)
    separate = n * (result.table_rows + 1)
    note = (
        f"Scored: the per-unit error table once ({result.table_rows:,} candidates, reused by "
        f"DP at all {n} targets), {result.scorings:,} single allocations (each strategy's "
        f"result on the common minibatch; DP's own score reused) and {result.evopress:,} "
        f"EvoPress candidates; {n} separate `search --strategy dp` runs would score "
        f"{separate:,}.\n"
    )
    head = (
        f"# {cfg.model}: {cfg.search.budget_kind} budget sweep over {n} targets\n\n"
        f"{cfg.evaluator.metric}: on one minibatch of {result.fidelity:,} calibration tokens "
        f"(DP's; lower is better); held-out perplexity on {ws.heldout.n_tokens:,} tokens.\n\n"
    )
    table = markdown(result, cfg.evaluator.metric)
    atomic_write_text(head + table + "\n\n" + note, out / "sweep.md", overwrite=True)
    series: dict[str, list[tuple[float, float]]] = {}
    for r in result.rows:
        series.setdefault(r.strategy, []).append((r.achieved, r.heldout_ppl))
    plot_quality_vs_sparsity(series, out / "sweep.png", dense_ppl=result.dense_ppl, overwrite=True)


def run_sweep_command(
    cfg: RunConfig,
    supernet: Path | None,
    out: Path,
    targets: Sequence[float],
    *,
    evopress_generations: int,
    resume: bool,
    progress: bool,
    console: Console,
) -> SweepResult:
    """``allocsearch sweep``: open ``supernet`` (or build one spanning the targets into
    ``out/supernet``, reused on ``--resume``), then :func:`run_sweep` on the configured
    backend (Ray evaluator actors, or this process's evaluator)."""
    from allocsearch.search_run import HeldoutPerplexity, ray_evaluate, ray_layer_map, use_ray_build

    ws = pipeline.load_workspace(cfg)
    if not ws.model.adapter.is_causal_lm:
        raise ValueError(
            f"sweep reports held-out perplexity, which an encoder ({cfg.model!r}, model_type "
            f"{ws.model.adapter.model_type!r}) has not; run compare (or search) at each target"
        )
    if supernet is None:
        spanning = spanning_config(cfg.supernet, targets)
        path = out / "supernet"
        store = None
        if resume and (path / MANIFEST_NAME).exists():
            store = pipeline.open_store(ws, path)
        if store is None:
            built_cfg = dataclasses.replace(cfg, supernet=spanning)
            console.print(
                f"building a supernet centred at {spanning.center:g} with "
                f"{2 * spanning.steps_each_side + 1} levels to span the targets ...",
                highlight=False,
            )
            layer_map = ray_layer_map(cfg, console) if use_ray_build(cfg) else None
            try:
                store = pipeline.build(
                    dataclasses.replace(ws, config=built_cfg),
                    path,
                    overwrite=True,
                    progress=progress,
                    map_layers=layer_map,
                )
            finally:
                if layer_map is not None:
                    layer_map.close()
    else:
        store = pipeline.open_store(ws, supernet)
    check_reachable(cfg, store.spec, targets)
    sweep = functools.partial(
        run_sweep,
        cfg,
        ws,
        store,
        out,
        targets,
        evopress_generations=evopress_generations,
        resume=resume,
        console=console,
    )
    if cfg.backend.kind == "ray":
        ray_eval = ray_evaluate(cfg, Path(store.path), console)
        ppl_fn = HeldoutPerplexity(cfg, str(Path(store.path).absolute()))
        try:
            with heartbeat("sweep: searching and scoring", enabled=progress):
                result = sweep(
                    evaluate=ray_eval, heldout_ppl=lambda c: float(ray_eval.run(ppl_fn, c))
                )
        finally:
            ray_eval.close()
    else:
        evaluator = pipeline.make_evaluator(ws, store)
        with heartbeat("sweep: searching and scoring", enabled=progress):
            result = sweep(
                evaluate=evaluator,
                heldout_ppl=lambda c: float(evaluator.perplexity(c, ws.heldout)),
            )
    console.print(
        markdown(result, cfg.evaluator.metric), soft_wrap=True, highlight=False, markup=False
    )
    console.print(
        f"wrote {out}/sweep.md, sweep.png and one recipe per target and strategy",
        soft_wrap=True,
        highlight=False,
    )
    return result
