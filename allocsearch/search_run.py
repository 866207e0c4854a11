"""`allocsearch search`: one strategy on one supernet, checkpointed every generation,
resumable, on Ray actors (the default backend) or the in-process evaluator; writes
recipe.json, log.jsonl and plots. Ctrl-C writes the best-so-far recipe marked partial.

Also the configured Ray backends (:func:`ray_evaluate`, :func:`ray_layer_map`), which
start on first use, for this and the other commands."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from rich.console import Console

from allocsearch import pipeline
from allocsearch.closing import Closing
from allocsearch.config import AUTO_WORKERS, RunConfig
from allocsearch.console_progress import heartbeat
from allocsearch.distributed.checkpoint import (
    SearchCheckpointer,
    latest_state,
    search_fingerprint,
)
from allocsearch.distributed.progress import make_callbacks
from allocsearch.report.plots import plot_fitness_curves, plot_sparsity_profile
from allocsearch.search import registry
from allocsearch.search.budget import check_feasible_target
from allocsearch.supernet.depth import TiedBlocks
from allocsearch.supernet.store import SupernetStore

SCORED_STRATEGIES = registry.SCORED_STRATEGIES
"""Ask/tell strategies that score candidates with the evaluator (on the configured
backend); the baselines score nothing, and ``tyr`` builds and scores a supernet per round
(on the configured backend too: layer actors prune, evaluator actors score)."""


@dataclass(frozen=True)
class StoreEvaluatorFactory:
    """Builds the evaluator of a supernet inside a Ray actor: loads the model, token sets
    and store once from paths every node can read (picklable: a config and a path)."""

    config: RunConfig
    supernet: str

    def __call__(self) -> Any:
        ws = pipeline.load_workspace(self.config)
        return pipeline.make_evaluator(ws, pipeline.open_store(ws, self.supernet))


@dataclass(frozen=True)
class HeldoutPerplexity:
    """Held-out perplexity (lower is better) of an allocation of the store at
    ``supernet``, computed wherever it is called, e.g. on an evaluator actor through
    :meth:`~allocsearch.distributed.ray_backend.RayEvaluate.run`, so that the driver
    never loads the variants. Picklable: a config and a path every node can read.

    Calling it with ``choice`` int[L] loads the model and token sets, reads only the
    chosen level of each pruned parameter from the store, and returns
    :func:`~allocsearch.pipeline.heldout_perplexity` of the model with those weights
    (what ``Evaluator.perplexity`` gives, to float rounding); for encoders, the held-out
    distance to the dense model (:func:`~allocsearch.pipeline.heldout_score`).
    """

    config: RunConfig
    supernet: str

    def __call__(self, choice: Any) -> float:
        ws = pipeline.load_workspace(self.config)
        store = pipeline.open_store(ws, self.supernet)
        return pipeline.heldout_score(ws, pipeline.pruned_model(ws, store, choice))


@dataclass(frozen=True)
class HeldoutScoring:
    """:func:`~allocsearch.pipeline.heldout_scores` of an allocation of the store at
    ``supernet`` (held-out score and, for encoders, nearest-neighbour agreement), computed
    wherever it is called, as :class:`HeldoutPerplexity` is (picklable)."""

    config: RunConfig
    supernet: str

    def __call__(self, choice: Any) -> pipeline.HeldoutScores:
        ws = pipeline.load_workspace(self.config)
        store = pipeline.open_store(ws, self.supernet)
        return pipeline.heldout_scores(ws, pipeline.pruned_model(ws, store, choice))


def _where(backend: Any, cfg: RunConfig) -> str:
    address = cfg.backend.address or os.environ.get("RAY_ADDRESS")
    cores = [p["cpus"] for p in backend.placement]
    pinned = f", cores {cores}" if any(c is not None for c in cores) else ""
    share = f"{backend.cpus_per_worker:g} CPU" + (
        f" + {backend.gpus_per_worker:g} GPU" if backend.gpus_per_worker else ""
    )
    place = f"the Ray cluster at {address}" if address else "a local Ray instance"
    return f"{backend.workers} x {share} on {place}{pinned}"


class StartedOnFirstCall(Closing):
    """A Ray backend that the ``start`` callable creates when it is first called (or when
    :meth:`start` is), not before.

    Calls pass through to the backend (a
    :class:`~allocsearch.distributed.ray_backend.RayEvaluate` or
    :class:`~allocsearch.distributed.ray_backend.RayLayerMap`). Errors found before the
    first scoring or pruning (budgets, strategy settings, grids, pruners) are then
    reported without starting Ray first. :meth:`close` closes the backend if it started.
    """

    def __init__(self, start: Callable[[], Any]) -> None:
        self._start = start  # builds and returns the backend
        self._backend: Any = None

    def start(self) -> None:
        """Start the backend now (if it has not started)."""
        if self._backend is None:
            self._backend = self._start()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.start()
        return self._backend(*args, **kwargs)

    def run(self, fn: Callable[[Any], Any], item: Any) -> Any:
        """``fn(item)`` on one actor of the backend (a RayEvaluate), started if need be."""
        self.start()
        return self._backend.run(fn, item)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


def ray_evaluate(cfg: RunConfig, supernet: str | Path, console: Console) -> StartedOnFirstCall:
    """Ray evaluator actors for the store at ``supernet`` (``cfg.backend``: workers and
    address), started at the first query; every actor loads the model, token sets and
    store from the paths in ``cfg``. An ``Evaluate`` callable; close it. ``run(fn, item)``
    runs ``fn(item)`` on one of the actors (e.g. :class:`HeldoutPerplexity`)."""

    def start() -> Any:
        from allocsearch.distributed.ray_backend import RayEvaluate

        factory = StoreEvaluatorFactory(cfg, str(Path(supernet).absolute()))
        evaluate = RayEvaluate(factory, **_actor_settings(cfg))
        console.print(f"scoring on {_where(evaluate, cfg)} (--backend local: in process)")
        return evaluate

    return StartedOnFirstCall(start)


def _actor_settings(cfg: RunConfig) -> dict[str, Any]:
    """The Ray backends' settings a config gives: workers, address, replace timeout."""
    b = cfg.backend
    return {"workers": b.workers, "address": b.address, "replace_timeout_s": b.replace_timeout_s}


def use_ray_build(cfg: RunConfig) -> bool:
    """Whether a supernet build prunes layers on Ray actors: with the Ray backend on a
    cluster (an address, or RAY_ADDRESS) or when ``--workers`` is given. On one machine
    the in-process build already uses every core (XLA threads) and was faster than 2
    pinned Ray actors (docs/RESULTS.md, 34.9 s vs 45.4 s)."""
    on_cluster = bool(cfg.backend.address or os.environ.get("RAY_ADDRESS"))
    return cfg.backend.kind == "ray" and (on_cluster or cfg.backend.workers != AUTO_WORKERS)


def ray_layer_map(cfg: RunConfig, console: Console) -> StartedOnFirstCall:
    """Ray actors that prune supernet layers (``cfg.backend``: workers and address),
    started at the first block's pruning: a ``map_layers`` for
    :func:`~allocsearch.pipeline.build`; close it."""

    def start() -> Any:
        from allocsearch.distributed.ray_backend import RayLayerMap

        layer_map = RayLayerMap(**_actor_settings(cfg))
        console.print(f"pruning layers on {_where(layer_map, cfg)} (--backend local: in process)")
        return layer_map

    return StartedOnFirstCall(start)


def strategy_settings(cfg: RunConfig, strategy: str | None = None) -> registry.ResolvedSettings:
    """The settings ``strategy`` (default: ``cfg``'s) runs with under ``cfg``: the
    config's ``search.settings`` (which belong to ``search.strategy``) resolved by
    :func:`~allocsearch.search.registry.resolve_settings`: keys another strategy owns are
    dropped, and with none left the strategy's defaults (the demo's EvoPress settings for
    the strategies that run EvoPress)."""
    return registry.resolve_settings(
        strategy or cfg.search.strategy, cfg.search.settings, owner=cfg.search.strategy
    )


def for_strategy(cfg: RunConfig, *, owner: str) -> tuple[RunConfig, str | None]:
    """``(cfg, note)``: ``cfg`` whose ``search.settings`` are those its strategy runs with,
    when the settings were written for the strategy ``owner`` (a config's
    ``search.strategy`` that ``--strategy`` replaced), and a one-line note naming the keys
    of another strategy that were dropped (None if none); keys no strategy takes stay
    (:func:`registry.check_settings` refuses them)."""
    resolved = registry.resolve_settings(cfg.search.strategy, cfg.search.settings, owner=owner)
    search = dataclasses.replace(cfg.search, settings=resolved.settings)
    return dataclasses.replace(cfg, search=search), resolved.note(cfg.search.strategy, owner)


def default_settings(cfg: RunConfig) -> dict[str, Any]:
    """The search settings of ``cfg``'s strategy (:func:`strategy_settings`)."""
    return strategy_settings(cfg).settings


def check_target_before_loading(cfg: RunConfig, supernet: Path) -> None:
    """Refuse an unreachable budget target from the store's manifest alone, before the
    model and the calibration data load (minutes for a large model).

    Raises:
      StoreError: ``supernet`` is not a store. InfeasibleBudgetError: the target is outside
      what the store's levels can remove (the message states the range).
    """
    spec = search_spec(cfg, SupernetStore.open(supernet, verify="none").spec)
    check_feasible_target(spec, pipeline.make_budget(cfg.search, spec))


def check_tie_blocks(cfg: RunConfig) -> None:
    """Refuse ``search.tie_blocks`` (``--tie-blocks``) with what it cannot run, before
    anything loads: allocators and Týr work on the store's own units, and a latency
    table names sublayer units, not blocks.

    Raises:
      ValueError: naming the strategy or budget kind and what is valid."""
    if not cfg.search.tie_blocks:
        return
    if cfg.search.strategy not in SCORED_STRATEGIES:
        raise ValueError(
            f"--tie-blocks (search.tie_blocks) searches whole blocks with one of "
            f"{list(SCORED_STRATEGIES)}; strategy {cfg.search.strategy!r} works on the "
            f"supernet's own sublayer units"
        )
    if cfg.search.budget_kind == "latency":
        raise ValueError(
            "--tie-blocks (search.tie_blocks) takes a params, flops or sublayers budget; a "
            "latency table times sublayer units, not blocks"
        )


def search_spec(cfg: RunConfig, spec: Any) -> Any:
    """The spec a search runs on: the store's, or its whole blocks with
    ``search.tie_blocks`` (raises ValueError unless the store is a depth ``"drop"``
    supernet, naming how to build one)."""
    if not cfg.search.tie_blocks:
        return spec
    try:
        return TiedBlocks.of(spec).spec
    except ValueError as e:
        raise ValueError(
            f"--tie-blocks (search.tie_blocks): {e}; build one with `allocsearch build "
            f"--structure heads_neurons --depth drop`"
        ) from None


def run_fingerprint(cfg: RunConfig, ws, store, budget, searcher, key, *, spec=None) -> str:
    """What identifies a search for its checkpoints: the searcher, supernet (``spec``: the
    spec searched, default the store's), budget and key, and the model, calibration tokens
    and metric it scores with (a checkpoint of any other search is not resumed)."""
    return search_fingerprint(
        searcher=searcher,
        spec=store.spec if spec is None else spec,
        budget=budget,
        key=key,
        extra={
            "model": ws.model.fingerprint,
            "calibration": ws.calibration.fingerprint,
            "metric": cfg.evaluator.metric,
        },
    )


def run_search_command(
    cfg: RunConfig,
    supernet: Path,
    out: Path,
    *,
    resume: bool,
    progress: bool,
    console: Console,
    note: str | None = None,
) -> None:
    """Run ``cfg``'s search on the store at ``supernet`` into ``out`` (``note``: printed
    once the settings and target are checked, e.g. :func:`for_strategy`'s)."""
    run = _prepare(cfg, supernet, out, progress=progress, console=console, note=note)
    if run.strategy not in SCORED_STRATEGIES:
        if resume:
            raise ValueError(f"--resume: strategy {run.strategy!r} has no search state to resume")
        _run_unscored(cfg, run.ws, run.store, run.budget, run.settings, out, progress, console)
        return
    searcher = registry.make_searcher(run.strategy, run.settings)  # refuses bad settings early
    seeded = registry.split_seeded(run.strategy, run.settings)[0] is not None
    key = jax.random.key(cfg.search.seed)
    start = None
    if not seeded:  # a seeded search knows its EvoPress start after its seed stage
        start = run.resume_point(searcher, key, resume)
    # An unreachable target is reported before Ray starts or any file is written.
    check_feasible_target(run.spec, run.budget)
    # A search that fails before its first generation (e.g. a fidelity the calibration
    # set cannot give) removes the log and checkpoint directory it created, so the same
    # command can be run again without --overwrite.
    created = [path for path in (run.ckpt_dir, out / "log.jsonl") if not path.exists()]
    # With Ray, the held-out perplexity of the result is computed on an actor too: the
    # driver never builds an evaluator (nor holds the variants).
    ray_eval = None
    if cfg.backend.kind == "ray":
        # Ray starts before the checkpoints and the log are set up, so a failed start
        # leaves nothing behind.
        ray_eval = ray_evaluate(cfg, supernet, console)
        ray_eval.start()
    evaluate: Any = ray_eval if ray_eval is not None else pipeline.make_evaluator(run.ws, run.store)
    last: list[Any] = [None]
    try:
        outcome, ppl = _search(run, searcher, key, start, evaluate, ray_eval, last, resume)
    except Exception:
        if last[0] is None:  # no generation finished: nothing worth keeping was written
            _remove(created)
        raise
    finally:
        if ray_eval is not None:
            ray_eval.close()
    if ray_eval is None:
        with heartbeat(f"{run.strategy}: scoring the result", enabled=progress):
            outcome = pipeline.with_split_fitness(run.ws, evaluate, outcome)
            ppl = _local_ppl(run.ws, outcome, evaluate)
    _finish(run.ws, run.store, run.budget, outcome, ppl, out, console)


@dataclasses.dataclass
class _SearchRun:
    """What a search command has loaded and checked before it searches."""

    cfg: RunConfig
    supernet: Path
    out: Path
    progress: bool
    console: Console
    strategy: str
    settings: dict[str, Any]
    ws: Any  # pipeline.Workspace
    store: Any  # SupernetStore
    tied: TiedBlocks | None
    spec: Any  # the searched spec: whole blocks with --tie-blocks
    budget: Any
    t0: float

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def sublayer_outcome(self, o: pipeline.Outcome) -> pipeline.Outcome:
        """``o`` with the per-sublayer allocation (``--tie-blocks`` searches whole blocks)."""
        if self.tied is None:
            return o
        return dataclasses.replace(
            o, choice=self.tied.expand(o.choice), settings={**o.settings, "tie_blocks": True}
        )

    def resume_point(self, searcher: Any, key: Any, resume: bool) -> tuple[str, Any]:
        """(checkpoint fingerprint, the state to start from)."""
        return _resume_point(
            self.cfg,
            self.ws,
            self.store,
            self.budget,
            searcher,
            key,
            self.spec,
            self.ckpt_dir,
            resume=resume,
            console=self.console,
        )


def _prepare(
    cfg: RunConfig, supernet: Path, out: Path, *, progress: bool, console: Console, note
) -> _SearchRun:
    """Check the settings and target (before anything loads), then load the workspace and
    the store and make the budget."""
    strategy = cfg.search.strategy
    settings = default_settings(cfg)
    check_tie_blocks(cfg)  # before anything loads
    registry.check_settings(strategy, settings)
    check_target_before_loading(cfg, supernet)
    if note:
        console.print(note, highlight=False, soft_wrap=True)
    ws = pipeline.load_workspace(cfg)
    store = pipeline.open_store(ws, supernet)
    # --tie-blocks: the search runs over whole blocks; everything after it (held-out
    # score, recipe) sees the per-sublayer allocation (tied.expand)
    tied = TiedBlocks.of(store.spec) if cfg.search.tie_blocks else None
    spec = store.spec if tied is None else tied.spec
    budget = pipeline.make_budget(cfg.search, spec)
    return _SearchRun(
        cfg, supernet, out, progress, console, strategy, settings, ws, store, tied, spec, budget,
        time.perf_counter(),
    )  # fmt: skip


def _search(run: _SearchRun, searcher, key, start, evaluate, ray_eval, last, resume: bool):
    """The search with checkpoints and a log (after a seed stage, if any): (outcome, the
    held-out perplexity scored on Ray, or None). ``last[0]``: the last state reached."""
    cfg, strategy, settings, tied = run.cfg, run.strategy, run.settings, run.tied
    search_evaluate = evaluate if tied is None else tied.scorer(evaluate)
    first, ppl = None, None
    if start is None:  # a seeded search
        first, settings = _run_seed_stage(
            cfg, run.ws, run.store, run.budget, strategy, settings, search_evaluate,
            None if tied is None else run.spec, run.console,
        )  # fmt: skip
        searcher = registry.make_searcher(strategy, settings)
        start = run.resume_point(searcher, key, resume)
    fingerprint, state = start
    last[0] = state
    with SearchCheckpointer(run.ckpt_dir, fingerprint=fingerprint) as checkpointer:
        callbacks = make_callbacks(
            searcher,
            log_path=run.out / "log.jsonl",
            checkpointer=checkpointer,
            progress=run.progress,
            total_generations=getattr(searcher, "generations", None),
            start_state=state,
            fitness_label=_fitness_label(
                cfg, strategy, pipeline.table_settings(run.ws, strategy, settings)
            ),
        )

        def on_generation(s: Any) -> None:
            callbacks(s)
            last[0] = s

        try:
            with heartbeat(f"{strategy}: searching", enabled=run.progress):
                outcome = pipeline.run_strategy(
                    strategy,
                    run.ws,
                    run.store,
                    run.budget,
                    evaluate=search_evaluate,
                    seed=cfg.search.seed,
                    settings=settings,
                    on_generation=on_generation,
                    state=state,
                    spec=None if tied is None else run.spec,
                    seed_stage=first,
                )
            outcome = run.sublayer_outcome(outcome)
            if ray_eval is not None:
                with heartbeat(f"{strategy}: scoring the result", enabled=run.progress):
                    outcome = pipeline.with_split_fitness(run.ws, ray_eval, outcome)
                    ppl = ray_eval.run(
                        HeldoutPerplexity(cfg, str(Path(run.supernet).absolute())), outcome.choice
                    )
        except KeyboardInterrupt:
            if last[0] is not None:
                partial = _partial_outcome(strategy, searcher, last[0], settings, first, run.t0)
                path = _write_recipe(
                    run.ws, run.store, run.budget, run.sublayer_outcome(partial), run.out,
                    partial=True,
                )  # fmt: skip
                run.console.print(
                    f"interrupted: best-so-far recipe (partial) -> {path}; resume with --resume"
                )
            raise
    return outcome, ppl


def _run_unscored(cfg, ws, store, budget, settings, out: Path, progress: bool, console) -> None:
    """A strategy with no ask/tell state: an allocator, or Týr (on Ray: its rounds on
    actors, :func:`_run_tyr_on_ray`)."""
    strategy = cfg.search.strategy
    if registry.get(strategy).kind == "driver" and cfg.backend.kind == "ray":
        _run_tyr_on_ray(cfg, ws, store, budget, settings, out, progress, console)
        return
    local = pipeline.make_evaluator(ws, store)
    with heartbeat(f"{strategy}: searching", enabled=progress):
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
    with heartbeat(f"{strategy}: scoring the result", enabled=progress):
        if outcome.store is None:  # Týr's own last supernet: scored there for perplexity
            outcome = pipeline.with_split_fitness(ws, local, outcome)
        ppl = _local_ppl(ws, outcome, local)
    _finish(ws, store, budget, outcome, ppl, out, console)


def _partial_outcome(strategy, searcher, state, settings, first, t0: float) -> pipeline.Outcome:
    """The best-so-far outcome of an interrupted search at ``state`` (a seeded search's
    counts include its seed stage ``first``)."""
    result = searcher.result(state)
    partial = pipeline.Outcome(
        strategy,
        result.best_choice,
        float(result.best_fitness),
        int(result.evaluations),
        int(result.tokens),
        time.perf_counter() - t0,
        pipeline.shown_settings(settings),
        tuple(result.history),
    )
    if first is None:
        return partial
    seeded = pipeline.seeded_outcome(partial, first)
    return dataclasses.replace(seeded, wall_time_s=partial.wall_time_s)


def _resume_point(cfg, ws, store, budget, searcher, key, spec, ckpt_dir: Path, *, resume, console):
    """``(fingerprint, state)``: the search's checkpoint fingerprint and, with ``resume``,
    the state of its last complete checkpoint (FileNotFoundError when there is none)."""
    fingerprint = run_fingerprint(cfg, ws, store, budget, searcher, key, spec=spec)
    state = latest_state(ckpt_dir, fingerprint=fingerprint) if resume else None
    if resume and state is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint in {ckpt_dir}")
    if resume:
        console.print(f"resuming at generation {state.generation} from {ckpt_dir}")
    return fingerprint, state


def _run_seed_stage(cfg, ws, store, budget, strategy, settings, evaluate, spec, console):
    """The seed stage of a seeded search (``dp+evopress``: DP's error table), run before
    its EvoPress search; not checkpointed (deterministic: a resumed search runs it again
    and starts EvoPress from the same allocation). Returns (its outcome, the EvoPress
    settings with their start)."""
    name = registry.split_seeded(strategy, settings)[0]
    console.print(f"{strategy}: {name} first, then EvoPress from its allocation", highlight=False)
    first, settings = pipeline.run_seed_stage(
        strategy, ws, store, budget, evaluate=evaluate, seed=cfg.search.seed,
        settings=settings, spec=spec,
    )  # fmt: skip
    console.print(
        f"  {name}: fitness {first.fitness:.6g}, {first.evaluations} evaluations, "
        f"{first.wall_time_s:.1f} s",
        highlight=False,
    )
    return first, settings


def _run_tyr_on_ray(cfg, ws, store, budget, settings, out: Path, progress: bool, console) -> None:
    """Týr with the Ray backend: each round's layers are pruned by layer actors and its
    candidates scored by evaluator actors that load the round's store (under
    ``out/work``: a path every node must read); the final held-out perplexity is scored
    on the last round's actors. One Ray connection serves every round."""
    from allocsearch.distributed.ray_backend import ray_session

    made: list[StartedOnFirstCall] = []

    def round_evaluate(round_store) -> StartedOnFirstCall:
        made.append(ray_evaluate(cfg, Path(round_store.path), console))
        return made[-1]

    with ray_session(workers=cfg.backend.workers, address=cfg.backend.address):
        layer_map = ray_layer_map(cfg, console)
        try:
            outcome = pipeline.run_strategy(
                "tyr",
                ws,
                store,
                budget,
                evaluate=no_shared_scoring,
                seed=cfg.search.seed,
                settings=settings,
                work_dir=out / "work",
                progress=progress,
                map_layers=layer_map,
                round_evaluate=round_evaluate,
            )
            last = outcome.store or store
            ppl = made[-1].run(
                HeldoutPerplexity(cfg, str(Path(last.path).absolute())), outcome.choice
            )
        finally:
            layer_map.close()
            for evaluate in made:
                evaluate.close()
    _finish(ws, store, budget, outcome, ppl, out, console)


def no_shared_scoring(choices: Any, *, fidelity: int, batch_seed: int) -> Any:
    raise AssertionError("tyr scores each round on its own supernet, never the shared one")


def _local_ppl(ws, outcome, evaluator) -> float:
    """Held-out perplexity of ``outcome`` in this process (``--backend local``)."""
    ev = evaluator if outcome.store is None else pipeline.make_evaluator(ws, outcome.store)
    if not ws.model.adapter.is_causal_lm:
        return pipeline.heldout_score(ws, pipeline.evaluated_model(ws, ev, outcome.choice))
    return float(ev.perplexity(outcome.choice, ws.heldout))


def _remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _write_recipe(ws, store, budget, outcome, out: Path, *, partial: bool) -> Path:
    recipe = pipeline.recipe_from_choice(ws, store, budget, outcome, partial=partial)
    path = out / ("recipe.partial.json" if partial else "recipe.json")
    recipe.save(path, overwrite=True)
    return path


def _fitness_label(cfg: RunConfig, strategy: str, settings: dict[str, Any]) -> str | None:
    """``"kl on 2,048 tokens"``: what a ``strategy`` search run with ``settings`` (those it
    ran with: a table search's tokens are set at the run) measures its best fitness on."""
    tokens = registry.fitness_tokens(strategy, settings)
    return None if tokens is None else f"{cfg.evaluator.metric} on {tokens:,} tokens"


def _finish(ws, store, budget, outcome, ppl: float, out: Path, console, *, partial=False) -> None:
    path = _write_recipe(ws, store, budget, outcome, out, partial=partial)
    recipe = pipeline.recipe_from_choice(ws, store, budget, outcome, partial=partial)
    plot_sparsity_profile(recipe, out / "profile.png", overwrite=True)
    # the settings it ran with (a table search's tokens), over the config's (Týr's inner ones)
    settings = {**default_settings(ws.config), **outcome.settings}
    tokens = registry.fitness_tokens(outcome.strategy, settings)
    if outcome.history:
        plot_fitness_curves(
            {outcome.strategy: outcome.history},
            out / "fitness.png",
            metric_name=ws.config.evaluator.metric,
            tokens=None if tokens is None else {outcome.strategy: tokens},
            overwrite=True,
        )
    held = f"{ppl:.4f}" if ws.model.adapter.is_causal_lm else f"{ppl:.6g}"
    label = _fitness_label(ws.config, outcome.strategy, settings)
    fitness = "-" if outcome.fitness is None else f"{outcome.fitness:.6g}"
    console.print(
        f"{outcome.strategy}: fitness {fitness}{f' ({label})' if label else ''}"
        f", {pipeline.heldout_label(ws)} {held}, {_removes(recipe, budget)}, "
        f"{outcome.evaluations} evaluations, {outcome.wall_time_s:.1f} s "
        f"-> {path}",
        highlight=False,
    )


def _removes(recipe, budget) -> str:
    """``"removes 41.20% of params"``, or for a sublayers budget ``"drops 2 of 6
    sublayers"``."""
    if budget.kind == "sublayers":
        n = len(recipe.units)
        return f"drops {round(recipe.budget.achieved * n)} of {n} sublayers"
    return f"removes {recipe.budget.achieved:.2%} of {budget.kind}"
