"""`allocsearch search`: one strategy on one supernet, checkpointed every generation,
resumable, on the in-process evaluator or on Ray actors; writes recipe.json, log.jsonl
and plots. Ctrl-C writes the best-so-far recipe marked partial."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from rich.console import Console

from allocsearch import pipeline
from allocsearch.config import RunConfig
from allocsearch.distributed.checkpoint import (
    SearchCheckpointer,
    latest_state,
    search_fingerprint,
)
from allocsearch.distributed.progress import make_callbacks
from allocsearch.report.plots import plot_fitness_curves, plot_sparsity_profile


@dataclass(frozen=True)
class StoreEvaluatorFactory:
    """Builds the evaluator of a supernet inside a Ray actor: loads the model, token sets
    and store once from paths every node can read (picklable: a config and a path)."""

    config: RunConfig
    supernet: str

    def __call__(self) -> Any:
        ws = pipeline.load_workspace(self.config)
        return pipeline.make_evaluator(ws, pipeline.open_store(ws, self.supernet))


def _default_settings(cfg: RunConfig) -> dict[str, Any]:
    if cfg.search.settings:
        return dict(cfg.search.settings)
    if cfg.search.strategy == "evopress":
        return dict(pipeline.DEMO_EVOPRESS)
    return {}


def run_search_command(
    cfg: RunConfig,
    supernet: Path,
    out: Path,
    *,
    resume: bool,
    progress: bool,
    console: Console,
) -> None:
    ws = pipeline.load_workspace(cfg)
    store = pipeline.open_store(ws, supernet)
    budget = pipeline.make_budget(cfg.search, store.spec)
    strategy = cfg.search.strategy
    settings = _default_settings(cfg)
    local = pipeline.make_evaluator(ws, store)
    t0 = time.perf_counter()

    if strategy not in ("evopress", "dp", "knapsack", "knapsack_lagrange"):
        if resume:
            raise ValueError(f"--resume: strategy {strategy!r} has no search state to resume")
        outcome = pipeline.run_strategy(
            strategy,
            ws,
            store,
            budget,
            evaluate=local,
            seed=cfg.search.seed,
            settings=settings,
            work_dir=out / "work",
            progress=progress,
        )
        _finish(ws, store, budget, outcome, local, out, console, partial=False)
        return

    searcher = pipeline.make_searcher(strategy, settings)
    key = jax.random.key(cfg.search.seed)
    fingerprint = search_fingerprint(
        searcher=searcher,
        spec=store.spec,
        budget=budget,
        key=key,
        extra={
            "model": ws.model.fingerprint,
            "calibration": ws.calibration.fingerprint,
            "metric": cfg.evaluator.metric,
        },
    )
    ckpt_dir = out / "checkpoints"
    state = latest_state(ckpt_dir, fingerprint=fingerprint) if resume else None
    if resume and state is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint in {ckpt_dir}")
    if resume:
        console.print(f"resuming at generation {state.generation} from {ckpt_dir}")

    evaluate: Any = local
    ray_eval = None
    if cfg.backend.kind == "ray":
        from allocsearch.distributed.ray_backend import RayEvaluate

        ray_eval = RayEvaluate(
            StoreEvaluatorFactory(cfg, str(Path(supernet).absolute())),
            workers=cfg.backend.workers,
            address=cfg.backend.address,
        )
        evaluate = ray_eval
    last: list[Any] = [state]
    with SearchCheckpointer(ckpt_dir, fingerprint=fingerprint) as checkpointer:
        callbacks = make_callbacks(
            searcher,
            log_path=out / "log.jsonl",
            checkpointer=checkpointer,
            progress=progress,
            total_generations=getattr(searcher, "generations", None),
            start_state=state,
        )

        def on_generation(s: Any) -> None:
            callbacks(s)
            last[0] = s

        try:
            outcome = pipeline.run_strategy(
                strategy,
                ws,
                store,
                budget,
                evaluate=evaluate,
                seed=cfg.search.seed,
                settings=settings,
                on_generation=on_generation,
                state=state,
            )
        except KeyboardInterrupt:
            if last[0] is not None:
                result = searcher.result(last[0])
                partial = pipeline.Outcome(
                    strategy,
                    result.best_choice,
                    float(result.best_fitness),
                    int(result.evaluations),
                    int(result.tokens),
                    time.perf_counter() - t0,
                    settings,
                    tuple(result.history),
                )
                path = _write_recipe(ws, store, budget, partial, out, partial=True)
                console.print(
                    f"interrupted: best-so-far recipe (partial) -> {path}; resume with --resume"
                )
            raise
        finally:
            if ray_eval is not None:
                ray_eval.close()
    _finish(ws, store, budget, outcome, local, out, console, partial=False)


def _write_recipe(ws, store, budget, outcome, out: Path, *, partial: bool) -> Path:
    recipe = pipeline.recipe_from_choice(ws, store, budget, outcome, partial=partial)
    path = out / ("recipe.partial.json" if partial else "recipe.json")
    recipe.save(path, overwrite=True)
    return path


def _finish(ws, store, budget, outcome, evaluator, out: Path, console, *, partial: bool) -> None:
    path = _write_recipe(ws, store, budget, outcome, out, partial=partial)
    recipe_store = outcome.store or store
    ev = evaluator if outcome.store is None else pipeline.make_evaluator(ws, recipe_store)
    ppl = ev.perplexity(outcome.choice, ws.heldout)
    recipe = pipeline.recipe_from_choice(ws, store, budget, outcome, partial=partial)
    plot_sparsity_profile(recipe, out / "profile.png", overwrite=True)
    if outcome.history:
        plot_fitness_curves(
            {outcome.strategy: outcome.history},
            out / "fitness.png",
            metric_name=ws.config.evaluator.metric,
            overwrite=True,
        )
    console.print(
        f"{outcome.strategy}: fitness {outcome.fitness if outcome.fitness is not None else '-'}"
        f", held-out perplexity {ppl:.4f}, removes {recipe.budget.achieved:.2%} of "
        f"{budget.kind}, {outcome.evaluations} evaluations, {outcome.wall_time_s:.1f} s "
        f"-> {path}",
        highlight=False,
    )
