"""`allocsearch demo` and `allocsearch compare`: several strategies on one supernet, scored
on equal terms, written as a recipe, a markdown table and plots.

The searches score candidates on the configured backend (``cfg.backend``: Ray actors or
in process), and so do the final scoring of every outcome on the whole calibration set and
its held-out perplexity (encoders: distance to the dense model and nearest-neighbour
agreement): with Ray this process never holds the supernet's variants."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from allocsearch import pipeline
from allocsearch.atomic import atomic_write_text
from allocsearch.config import RunConfig
from allocsearch.console_progress import heartbeat
from allocsearch.distributed.ray_backend import ray_session
from allocsearch.report import CompareRow, markdown_table
from allocsearch.report.plots import plot_compare, plot_fitness_curves, plot_sparsity_profile
from allocsearch.search import registry
from allocsearch.search.base import Evaluate
from allocsearch.search.budget import Budget, CostModel
from allocsearch.search_run import (
    HeldoutScoring,
    check_target_before_loading,
    no_shared_scoring,
    ray_evaluate,
    ray_layer_map,
)


def _settings_for(cfg: RunConfig, strategy: str, generations: int | None = None) -> dict:
    """The settings ``strategy`` runs with under ``cfg``
    (:func:`~allocsearch.search.registry.resolve_settings`: the config's settings where
    they mean the same for it, else its defaults, the demo's EvoPress settings for the
    strategies that run EvoPress); ``generations`` (``--generations``) replaces theirs."""
    s = registry.resolve_settings(strategy, cfg.search.settings, owner=cfg.search.strategy).settings
    if generations is not None and registry.get(strategy).runs_evopress:
        s["generations"] = generations
    return s


def _run_strategies(
    cfg: RunConfig,
    ws: pipeline.Workspace,
    store,
    out: Path,
    strategies: Sequence[str],
    *,
    budget: Budget,
    evaluate: Evaluate,
    progress: bool,
    console: Console,
    generations: int | None,
) -> list[pipeline.Outcome]:
    """Each strategy's outcome in order, its candidates scored by ``evaluate``."""
    outcomes = []
    for name in strategies:
        t0 = time.perf_counter()
        console.print(f"[bold]{name}[/]: searching ...")
        with heartbeat(f"{name}: searching", enabled=progress):
            outcome = pipeline.run_strategy(
                name,
                ws,
                store,
                budget,
                evaluate=evaluate,
                seed=cfg.search.seed,
                settings=_settings_for(cfg, name, generations),
                work_dir=out / "work",
                progress=progress,
            )
        outcomes.append(outcome)
        console.print(
            f"  {name}: {outcome.evaluations} evaluations, {time.perf_counter() - t0:.1f} s"
        )
    return outcomes


def _search_and_score_one(
    cfg, ws, store, out, name, *, budget, progress, console, generations, shared, layer_map,
    round_evaluate, rounds,
) -> pipeline.Scored:  # fmt: skip
    """One strategy of :func:`_search_and_score_on_ray`."""
    t0 = time.perf_counter()
    console.print(f"[bold]{name}[/]: searching ...")
    tyr = registry.get(name).kind == "driver"
    with heartbeat(f"{name}: searching", enabled=progress):
        outcome = pipeline.run_strategy(
            name,
            ws,
            store,
            budget,
            evaluate=no_shared_scoring if tyr else shared,
            seed=cfg.search.seed,
            settings=_settings_for(cfg, name, generations),
            work_dir=out / "work",
            progress=progress,
            map_layers=layer_map if tyr else None,
            round_evaluate=round_evaluate if tyr else None,
        )
    console.print(f"  {name}: {outcome.evaluations} evaluations, {time.perf_counter() - t0:.1f} s")
    own = outcome.store is not None
    evaluate, path = (rounds[-1], outcome.store.path) if own else (shared, store.path)
    with heartbeat(f"{name}: scoring", enabled=progress):
        outcome = pipeline.with_split_fitness(ws, evaluate, outcome)
        held = evaluate.run(HeldoutScoring(cfg, str(Path(path).absolute())), outcome.choice)
    achieved = CostModel.from_spec((outcome.store or store).spec, budget).achieved(outcome.choice)
    split = outcome.split
    return pipeline.Scored(
        outcome,
        split.calibration,
        float(held.score),
        float(achieved),
        held.nn_agreement,
        split.validation,
    )


def _search_and_score_on_ray(
    cfg: RunConfig,
    ws: pipeline.Workspace,
    store,
    out: Path,
    strategies: Sequence[str],
    *,
    budget: Budget,
    progress: bool,
    console: Console,
    generations: int | None,
) -> list[pipeline.Scored]:
    """Each strategy searched and then scored (fitness on the whole calibration set,
    held-out perplexity) on Ray actors, as :func:`pipeline.score_outcomes` scores in
    process: one set of evaluator actors for the supernet at ``store``, started at the
    first query (lists of baselines never start Ray); Týr's rounds pruned by layer actors
    and scored by actors of each round's supernet, its outcome scored on the last round's
    actors. The shared actors are stopped while Týr runs, so that its actors get the
    CPUs (a full cluster would otherwise wait for resources that never free)."""
    shared = ray_evaluate(cfg, store.path, console)
    layer_map = ray_layer_map(cfg, console)
    rounds: list = []

    def round_evaluate(round_store):
        rounds.append(ray_evaluate(cfg, Path(round_store.path), console))
        return rounds[-1]

    scored = []
    try:
        for name in strategies:
            if registry.get(name).kind == "driver":
                shared.close()  # started again at the next query that needs it
            # Týr's many layer maps and evaluators share one connection
            session = (
                ray_session(workers=cfg.backend.workers, address=cfg.backend.address)
                if registry.get(name).kind == "driver"
                else contextlib.nullcontext()
            )
            with session:
                try:
                    scored.append(
                        _search_and_score_one(
                            cfg, ws, store, out, name, budget=budget, progress=progress,
                            console=console, generations=generations, shared=shared,
                            layer_map=layer_map, round_evaluate=round_evaluate, rounds=rounds,
                        )
                    )  # fmt: skip
                finally:  # inside the session their actors belong to
                    layer_map.close()
                    while rounds:
                        rounds.pop().close()
    finally:
        shared.close()
    return scored


def compare_strategies(
    cfg: RunConfig,
    ws: pipeline.Workspace,
    store,
    out: Path,
    strategies: Sequence[str],
    *,
    progress: bool,
    console: Console,
    generations: int | None = None,
) -> tuple[list[pipeline.Scored], float | None]:
    """Run ``strategies`` on ``store``, score them on the whole calibration set and the
    held-out set, write compare.md / compare.png / fitness.png and one recipe per
    strategy into ``out``. Returns the scored outcomes and the dense perplexity (None for
    encoders: their held-out scores are distances to the dense model, which has none).

    With ``cfg.backend.kind == "ray"`` everything that reads variants runs on Ray actors
    (:func:`_search_and_score_on_ray`), else on this process's evaluator."""
    budget = pipeline.make_budget(cfg.search, store.spec)
    if cfg.backend.kind == "ray":
        scored = _search_and_score_on_ray(
            cfg, ws, store, out, strategies, budget=budget, progress=progress,
            console=console, generations=generations,
        )  # fmt: skip
    else:
        evaluator = pipeline.make_evaluator(ws, store)
        outcomes = _run_strategies(
            cfg,
            ws,
            store,
            out,
            strategies,
            budget=budget,
            evaluate=evaluator,
            progress=progress,
            console=console,
            generations=generations,
        )
        with heartbeat("scoring the allocations", enabled=progress):
            scored = pipeline.score_outcomes(ws, evaluator, outcomes, budget)
    causal = ws.model.adapter.is_causal_lm
    with heartbeat("scoring the dense model", enabled=progress):
        dense_ppl = pipeline.heldout_perplexity(ws.model, ws.heldout) if causal else None
    rows = [
        CompareRow(
            strategy=s.outcome.strategy,
            fitness=s.fitness,
            heldout_ppl=s.heldout if causal else None,
            evaluations=s.outcome.evaluations,
            wall_time_s=s.outcome.wall_time_s,
            achieved=s.achieved,
            heldout_distance=None if causal else s.heldout,
            nn_agreement=s.nn_agreement,
            validation=s.validation,
        )
        for s in scored
    ]
    table = markdown_table(rows, dense_ppl=dense_ppl)
    if causal:
        held = f"held-out perplexity on {ws.heldout.n_tokens:,} tokens"
    else:
        held = (
            f"held-out distance: {pipeline.heldout_metric(ws).name} to the dense model "
            f"(lower is better); NN agreement: share of the {ws.heldout.n_seq:,} held-out "
            f"sequences whose nearest neighbour (pooled embedding cosine) is the dense "
            f"model's (higher is better)"
        )
    header = _compare_header(cfg, ws, held)
    atomic_write_text(header + table + "\n", out / "compare.md", overwrite=True)
    plot_compare(
        rows,
        out / "compare.png",
        dense_ppl=dense_ppl,
        overwrite=True,
    )
    histories = {s.outcome.strategy: s.outcome.history for s in scored if s.outcome.history}
    if histories:
        # the settings each ran with (a table search's tokens) over the config's (Týr's inner)
        ran = {s.outcome.strategy: s.outcome.settings for s in scored}
        tokens = {
            name: registry.fitness_tokens(
                name, {**_settings_for(cfg, name, generations), **ran[name]}
            )
            for name in histories
        }
        plot_fitness_curves(
            histories,
            out / "fitness.png",
            metric_name=cfg.evaluator.metric,
            tokens={k: v for k, v in tokens.items() if v is not None},
            overwrite=True,
        )
    for s in scored:
        recipe = pipeline.recipe_from_choice(ws, store, budget, s.outcome)
        recipe.save(out / f"recipe-{s.outcome.strategy}.json", overwrite=True)
    console.print(table, soft_wrap=True, highlight=False, markup=False)
    return scored, dense_ppl


def _compare_header(cfg: RunConfig, ws: pipeline.Workspace, held: str) -> str:
    """compare.md's title and the line that says what each score column measures."""
    validation = (
        ""
        if ws.validation is None
        else f"validation: {cfg.evaluator.metric} on {ws.validation.n_tokens:,} validation "
        "tokens of the calibration source that no search scored (EvoPress picks its final "
        "allocation on them); "
    )
    return (
        f"# {cfg.model}: {cfg.search.budget_kind} budget, remove {cfg.search.target:.0%}\n\n"
        f"Fitness: {cfg.evaluator.metric} on {ws.calibration.n_tokens:,} calibration tokens "
        f"(lower is better); {validation}{held}.\n\n"
    )


def run_compare(
    cfg: RunConfig,
    supernet: Path,
    out: Path,
    strategies: Sequence[str],
    *,
    progress: bool,
    console: Console,
    generations: int | None = None,
) -> None:
    """`allocsearch compare`: ``strategies`` on the store at ``supernet`` (``generations``:
    EvoPress generations of evopress and tyr, None: their settings')."""
    bad = [s for s in strategies if s not in registry.STRATEGIES]
    if bad:
        raise ValueError(f"unknown strategies {bad}; valid: {list(registry.STRATEGY_NAMES)}")
    for name in strategies:  # bad settings are refused before anything loads
        registry.check_settings(name, _settings_for(cfg, name, generations))
    check_target_before_loading(cfg, supernet)
    ws = pipeline.load_workspace(cfg)
    store = pipeline.open_store(ws, supernet)
    compare_strategies(
        cfg, ws, store, out, strategies, progress=progress, console=console, generations=generations
    )
    console.print(f"wrote {out}/compare.md, compare.png, recipes")


DEMO_STRATEGIES = ("uniform", "owl", "evopress")
"""What `allocsearch demo` compares; the last one's allocation is its recipe."""


def run_demo(
    cfg: RunConfig,
    out: Path,
    *,
    generations: int,
    progress: bool,
    console: Console,
    strategies: Sequence[str] = DEMO_STRATEGIES,
) -> None:
    """Supernet -> EvoPress -> recipe, plots, and a table against uniform and OWL
    (``strategies``: the ones compared, any registered; the last one's allocation is
    ``recipe.json``, judged against uniform's when uniform is among them); with
    ``cfg.backend.kind == "ray"`` the supernet's layers are pruned and the candidates
    scored on Ray actors."""
    bad = [s for s in strategies if s not in registry.STRATEGIES]
    if bad or not strategies:
        raise ValueError(f"unknown strategies {bad}; valid: {list(registry.STRATEGY_NAMES)}")
    t0 = time.perf_counter()
    ws = pipeline.load_workspace(cfg)
    console.print(
        f"demo model: {ws.model.adapter.num_params():,} parameters, "
        f"{len(ws.model.adapter.layers())} prunable layers; calibration "
        f"{ws.calibration.n_tokens:,} tokens, held-out {ws.heldout.n_tokens:,} tokens"
    )
    console.print(f"building the supernet ({cfg.supernet.pruner}, 9 levels per layer) ...")
    layer_map = ray_layer_map(cfg, console) if cfg.backend.kind == "ray" else None
    try:
        store = pipeline.build(
            ws, out / "supernet", overwrite=True, progress=progress, map_layers=layer_map
        )
    finally:
        if layer_map is not None:
            layer_map.close()
    console.print(f"  {store.num_bytes / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s")
    scored, dense_ppl = compare_strategies(
        cfg,
        ws,
        store,
        out,
        list(strategies),
        progress=progress,
        console=console,
        generations=generations,
    )
    featured = strategies[-1]
    label = "EvoPress" if featured == "evopress" else featured
    best = next(s for s in scored if s.outcome.strategy == featured)
    recipe = pipeline.recipe_from_choice(
        ws, best.outcome.store or store, pipeline.make_budget(cfg.search, store.spec), best.outcome
    )
    recipe.save(out / "recipe.json", overwrite=True)
    plot_sparsity_profile(
        recipe,
        out / "profile.png",
        overwrite=True,
        title=f"{label} allocation, {cfg.search.target:.0%} sparsity",
    )
    uniform = next((s for s in scored if s.outcome.strategy == "uniform"), None)
    versus = "" if uniform is None else f" vs uniform {uniform.heldout:.3f}"
    dense = "" if dense_ppl is None else f" (dense {dense_ppl:.3f})"
    console.print(
        f"\n{label} {pipeline.heldout_label(ws)} {best.heldout:.3f}{versus}{dense}; recipe: "
        f"{out / 'recipe.json'}; plots: profile.png, fitness.png, compare.png; total "
        f"{time.perf_counter() - t0:.0f} s"
    )
