"""The steps the CLI runs, as library functions: load a model and its token sets, build a
supernet, run a strategy under a budget, score it, and turn the result into a recipe.

Everything here takes typed objects (a validated :class:`~allocsearch.config.RunConfig`,
models, stores); strings are parsed only in :mod:`allocsearch.config` and the CLI.
The workspace (:mod:`allocsearch.workspace`), held-out scoring (:mod:`allocsearch.heldout`)
and recipe assembly (:mod:`allocsearch.recipe_assembly`) live in their own modules; their
names stay reachable here (``pipeline.X``) for the commands, scripts and tests.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from allocsearch.assets_paths import DEMO_NAME, resolve_model_path
from allocsearch.config import EXECUTIONS, RunConfig, SearchConfig, with_model_defaults
from allocsearch.data.sources import check_source
from allocsearch.distributed.local import run_search
from allocsearch.evaluate.evaluator import Evaluator
from allocsearch.evaluate.metrics import make_metric
from allocsearch.evaluate.splits import SplitFitness, split_fitness
from allocsearch.evaluate.streaming import StreamingEvaluator
from allocsearch.heldout import (  # noqa: F401
    HeldoutScores,
    evaluated_model,
    heldout_label,
    heldout_metric,
    heldout_perplexity,
    heldout_score,
    heldout_scores,
    pruned_model,
)
from allocsearch.models.hf import load_model
from allocsearch.quantizers.costs import spec_quant_levels
from allocsearch.recipe_assembly import recipe_from_choice  # noqa: F401
from allocsearch.search import registry
from allocsearch.search.base import Evaluate, HistoryEntry
from allocsearch.search.budget import Budget, CostModel, load_latency_table
from allocsearch.search.coarse_to_fine import (
    TYR_INITIAL_STEP,
    TYR_MIN_STEP,
    TYR_ROUNDS,
    coarse_to_fine,
)
from allocsearch.search.registry import (
    DEMO_EVOPRESS,
    TABLE_STRATEGIES,
    make_searcher,
)
from allocsearch.supernet.build import build_supernet, unit_group_counts, unit_min_steps
from allocsearch.supernet.depth import (
    dropped_levels,
    sublayers_per_unit,
    with_dropped_level,
)
from allocsearch.supernet.experts import model_layers
from allocsearch.supernet.factory import make_grid, make_pruner, query_heads
from allocsearch.supernet.levels import centred_grid
from allocsearch.supernet.spec import SupernetSpec
from allocsearch.supernet.store import StoreError, SupernetStore
from allocsearch.workspace import Workspace, load_tokensets  # noqa: F401

# Calibration sequences per forward batch while building a supernet.
BUILD_BATCH = 16


def load_workspace(cfg: RunConfig) -> Workspace:
    """Load the configured model (``"demo"``: the bundled one) and its token sets.

    The weights stay memory-mapped on the host (``load_model(lazy=True)``): whatever runs
    next moves what it needs to the device (one block at a time when streaming), so the
    driver of a search never holds a whole model on its device. Text sources that do not
    exist are reported before the model is read."""
    for source in (cfg.data.calibration, cfg.data.heldout):
        if source is not None and source != DEMO_NAME:
            check_source(source)
    model = load_model(resolve_model_path(cfg.model), dtype=cfg.dtype, lazy=True)
    sets = load_tokensets(cfg.data, model)
    cfg = with_model_defaults(cfg, encoder=not model.adapter.is_causal_lm)
    if cfg.data.n_calibration_seqs != sets[0].n_seq:  # an unset encoder count, small corpus
        cfg = dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, n_calibration_seqs=sets[0].n_seq)
        )
    return Workspace(cfg, model, *sets)


# --------------------------------------------------------------------------- supernet


def build(
    ws: Workspace,
    out_dir: str | Path,
    *,
    target: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
    map_layers: Callable[..., Any] | None = None,
) -> SupernetStore:
    """Build the configured supernet of ``ws.model`` into ``out_dir``; ``map_layers`` (a
    :data:`~allocsearch.supernet.build.LayerMap`) runs each block's layer pruning (``None``:
    one after the other here; a :class:`~allocsearch.distributed.ray_backend.RayLayerMap`:
    on Ray actors)."""
    cfg = ws.config.supernet
    grid = make_grid(cfg, ws.model, target=cfg.center if target is None else target)
    return build_supernet(
        ws.model,
        ws.calibration,
        pruner=make_pruner(cfg),
        grid=grid,
        structure=cfg.structure,
        input_mode=cfg.input_mode,
        out_dir=out_dir,
        batch_size=BUILD_BATCH,
        progress=progress,
        overwrite=overwrite,
        storage_dtype=cfg.storage_dtype,
        query_heads=query_heads(cfg),
        map_layers=map_layers,
        tie_experts=cfg.tie_experts,
        expert_removal=cfg.expert_removal,
        prune_router=cfg.prune_router,
    )


def open_store(ws: Workspace, path: str | Path) -> SupernetStore:
    """Open a store, refusing one built for another model (saying which model it was built
    from and how to pass it) or other calibration data."""
    built = SupernetStore.open(path, verify="none")  # the manifest only
    if built.model_fingerprint != ws.model.fingerprint:
        source = built.manifest.get("model", {}).get("path")
        if source is not None and Path(source) == resolve_model_path(DEMO_NAME):
            source = DEMO_NAME
        origin = f"the model {source!r}" if source else "another model"
        fix = f"pass --model {source}" if source else "pass the model it was built from"
        raise StoreError(
            f"the supernet {str(path)!r} was built from {origin}, not from the model this run "
            f"loads ({ws.config.model!r}: other weights, fingerprint {ws.model.fingerprint!r} "
            f"instead of {built.model_fingerprint!r}); {fix} (or set `model:` in the config), "
            f"or build a supernet for this model"
        )
    return SupernetStore.open(
        path,
        model_fingerprint=ws.model.fingerprint,
        tokens_fingerprint=ws.calibration.fingerprint,
    )


# --------------------------------------------------------------------------- scoring


def choose_execution(ws: Workspace, store: SupernetStore) -> str:
    """``"resident"`` or ``"streaming"``: how ``execution="auto"`` scores ``store``: the
    memory plan's choice for this machine (:func:`~allocsearch.plan.execution_for`:
    resident when everything fits the device with a margin, else streaming)."""
    from allocsearch.plan import execution_for

    return execution_for(ws.config, store=store.path)


def make_evaluator(
    ws: Workspace, store: SupernetStore, execution: str | None = None
) -> Evaluator | StreamingEvaluator:
    """The JAX evaluator of ``store``'s allocations on the calibration set.

    Args:
      ws: the loaded model (lazily loaded parameters suit streaming) and token sets.
      store: the supernet.
      execution: ``"resident"`` (every variant on the device), ``"streaming"`` (block by
        block from the memory-mapped store) or ``"auto"`` (:func:`choose_execution`);
        None takes ``ws.config.evaluator.execution``. Both give the same scores.
    """
    execution = ws.config.evaluator.execution if execution is None else execution
    if execution not in EXECUTIONS:
        raise ValueError(f"execution {execution!r} is not valid; choose one of {list(EXECUTIONS)}")
    if execution == "auto":
        execution = choose_execution(ws, store)
    metric = make_metric(ws.config.evaluator)
    mb = ws.config.evaluator.micro_batch_tokens
    if execution == "streaming":
        from allocsearch.plan import stream_unit_for

        unit = stream_unit_for(ws.config, store=store.path)
        return StreamingEvaluator(
            ws.model,
            store,
            ws.calibration,
            metric=metric,
            micro_batch_tokens=mb,
            stream_unit=unit,
            validation=ws.validation,
        )
    return Evaluator(
        ws.model,
        store.spec,
        store.host_variants(),  # read once each, into the stacks: one device copy
        store.unit_params,
        ws.calibration,
        metric=metric,
        micro_batch_tokens=mb,
        validation=ws.validation,
    )


def make_budget(cfg: SearchConfig, spec: SupernetSpec) -> Budget:
    """The search's budget on ``spec`` (the store's, or its :class:`TiedBlocks` spec).

    A ``"sublayers"`` target is a fraction of the ``n`` sublayers, taken down to a whole
    number as EvoPress does (``int(sparsity * n)`` sublayers dropped): the budget's target
    is ``k / n`` exactly. Raises ValueError when ``spec`` has no dropped level."""
    latency = load_latency_table(cfg.latency_table, spec) if cfg.budget_kind == "latency" else None
    target = cfg.target
    if cfg.budget_kind == "sublayers":
        n = int(sublayers_per_unit(spec).sum())
        target = np.floor(target * n + 1e-9) / n
    return Budget(
        kind=cfg.budget_kind,
        target=target,
        min_sparsity=cfg.min_sparsity,
        max_sparsity=cfg.max_sparsity,
        latency=latency,
    )


# --------------------------------------------------------------------------- strategies


@dataclass
class Outcome:
    """What one strategy produced (lower fitness is better)."""

    strategy: str
    choice: np.ndarray
    fitness: float | None
    evaluations: int
    tokens: int
    wall_time_s: float
    settings: dict[str, Any]
    history: tuple[HistoryEntry, ...] = ()
    info: dict[str, float] = field(default_factory=dict)
    # The supernet ``choice`` indexes when it is not the shared one (Týr's last round).
    store: SupernetStore | None = None
    # Fitness on the whole calibration set and the validation rows (with_split_fitness).
    split: SplitFitness | None = None


def allocate_baseline(
    strategy: str,
    ws: Workspace,
    store: SupernetStore,
    budget: Budget,
    *,
    seed: int,
    settings: Mapping[str, Any],
) -> np.ndarray:
    """int32[L]: a baseline allocation snapped to the store's levels within the budget
    (the registry's ``allocate`` of an ``allocator`` strategy)."""
    entry = registry.get(strategy)
    if entry.allocate is None:
        raise ValueError(f"unknown baseline {strategy!r}; valid: {list(registry.ALLOCATORS)}")
    spec = store.spec
    routers = any(u.role == "router" for u in spec.units)
    layers = model_layers(ws.model.adapter, routers=routers)
    weights = {layer.name: np.asarray(ws.model.params[layer.weight_name]) for layer in layers}

    def input_norms() -> Mapping[str, np.ndarray]:
        norms = store.input_norms()
        if not norms:
            raise ValueError(f"{store.path} has no input norms (built by an older version)")
        return norms

    inputs = registry.AllocatorInputs(
        weights, input_norms, {layer.name: layer.shape for layer in layers}
    )
    return entry.allocate(spec, budget, inputs, settings, seed)


def _validation_tokens(ws: Workspace) -> int | None:
    return None if ws.validation is None else ws.validation.n_tokens


def with_split_fitness(ws: Workspace, evaluate: Any, outcome: Outcome) -> Outcome:
    """``outcome`` with its :class:`~allocsearch.evaluate.splits.SplitFitness`: scored by
    ``evaluate`` (an evaluator or backend of the store ``outcome.choice`` indexes) on the
    whole calibration set and every validation row (these scorings are reports, not
    search: the outcome's evaluations do not count them)."""
    split = split_fitness(evaluate, outcome.choice, ws.calibration, ws.validation)
    return dataclasses.replace(outcome, split=split)


def table_settings(ws: Workspace, strategy: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` of a table strategy with its ``tokens`` defaulted: the error table is
    scored on one minibatch, the whole calibration set up to
    :data:`~allocsearch.search.registry.TABLE_TOKENS`."""
    out = dict(settings)
    if strategy in TABLE_STRATEGIES and "tokens" not in out:
        out["tokens"] = min(registry.TABLE_TOKENS, ws.calibration.n_tokens)
    if out.get("final_parents") and out.get("final_tokens") is None:
        # EvoPress's final pick: one shared minibatch, the calibration set up to 8,192
        out["final_tokens"] = min(registry.FINAL_TOKENS, ws.calibration.n_tokens)
    return out


def run_strategy(
    strategy: str,
    ws: Workspace,
    store: SupernetStore,
    budget: Budget,
    *,
    evaluate: Evaluate,
    seed: int,
    settings: Mapping[str, Any] | None = None,
    on_generation: Callable[[Any], None] | None = None,
    state: Any = None,
    work_dir: str | Path | None = None,
    progress: bool = True,
    map_layers: Callable[..., Any] | None = None,
    round_evaluate: Callable[[SupernetStore], Evaluate] | None = None,
    spec: SupernetSpec | None = None,
    seed_stage: Outcome | None = None,
) -> Outcome:
    """Run one strategy on ``store`` under ``budget``; ``evaluate`` scores candidates (the
    in-process evaluator or a Ray backend). ``state`` resumes an ask/tell search (a
    seeded one's EvoPress state: its seed stage runs again, deterministically, unless
    the caller ran it: ``seed_stage``, its outcome, with ``settings`` from
    :func:`run_seed_stage`).
    ``spec`` (ask/tell strategies only) searches another spec over the store, e.g. a
    :class:`~allocsearch.supernet.depth.TiedBlocks` spec with its ``scorer(evaluate)``;
    ``Outcome.choice`` then indexes ``spec``.

    Týr (``"tyr"``) builds a supernet per round: ``map_layers`` prunes its layers (a
    :data:`~allocsearch.supernet.build.LayerMap`; ``None``: here) and
    ``round_evaluate(round_store)`` gives the ``Evaluate`` that scores the round
    (``None``: :func:`make_evaluator` here), e.g. Ray backends (see :func:`_run_tyr`)."""
    settings = dict(settings or {})
    t0 = time.perf_counter()
    entry = registry.get(strategy)
    if spec is not None and not entry.scored:
        raise ValueError(
            f"strategy {strategy!r} allocates over the store's own units; a spec of tied "
            f"blocks is searched by {', '.join(registry.SCORED_STRATEGIES)}"
        )
    if entry.kind == "allocator":
        choice = allocate_baseline(strategy, ws, store, budget, seed=seed, settings=settings)
        return Outcome(strategy, choice, None, 0, 0, time.perf_counter() - t0, settings)
    if entry.kind == "driver":
        return _run_tyr(
            ws,
            store,
            budget,
            seed=seed,
            settings=settings,
            work_dir=work_dir,
            progress=progress,
            map_layers=map_layers,
            round_evaluate=round_evaluate,
        )
    first = seed_stage
    if first is None:
        first, settings = run_seed_stage(
            strategy, ws, store, budget, evaluate=evaluate, seed=seed, settings=settings, spec=spec
        )
    settings = table_settings(
        ws, strategy, registry.with_validation_pick(strategy, settings, _validation_tokens(ws))
    )
    searcher = registry.make_searcher(strategy, settings)
    result = run_search(
        searcher,
        evaluate,
        store.spec if spec is None else spec,
        budget,
        key=jax.random.key(seed),
        on_generation=on_generation,
        state=state,
    )
    outcome = Outcome(
        strategy,
        np.asarray(result.best_choice, np.int32),
        float(result.best_fitness),
        int(result.evaluations),
        int(result.tokens),
        time.perf_counter() - t0,
        shown_settings(settings),
        tuple(result.history),
        dict(result.info),
    )
    return outcome if first is None else seeded_outcome(outcome, first)


def shown_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as a recipe records them (JSON values; a seeded search's ``start`` is
    left out: it is the seed stage's allocation)."""
    return {
        k: (v.tolist() if isinstance(v, np.ndarray) else v)
        for k, v in settings.items()
        if k != "start"
    }


def run_seed_stage(
    strategy: str,
    ws: Workspace,
    store: SupernetStore,
    budget: Budget,
    *,
    evaluate: Evaluate,
    seed: int,
    settings: Mapping[str, Any],
    spec: SupernetSpec | None = None,
) -> tuple[Outcome | None, dict[str, Any]]:
    """``(the seed stage's outcome, the EvoPress settings started from it)`` of a seeded
    strategy (``dp+evopress``; ``evopress`` with ``seed_from``), or ``(None, settings)``.

    The seed stage (a table search) is deterministic given ``seed``, so a resumed search
    recomputes it and starts EvoPress from the same allocation."""
    name, seed_settings, rest = registry.split_seeded(strategy, settings)
    if name is None:
        return None, dict(settings)
    first = run_strategy(
        name, ws, store, budget, evaluate=evaluate, seed=seed, settings=seed_settings, spec=spec
    )
    evo = {**rest, "start": first.choice}
    # from a strong start the noisy parent can drift worse: pick among it and the start
    evo.setdefault("final_parents", registry.SEEDED_FINAL_PARENTS)
    evo = table_settings(ws, strategy, evo)  # the final pick's tokens
    if strategy == "dp+evopress":
        tokens = table_settings(ws, name, seed_settings)["tokens"]
        evo["table_tokens"] = int(tokens)
    else:
        evo["seed_from"] = name
    return first, evo


def seeded_outcome(evo: Outcome, first: Outcome) -> Outcome:
    """A seeded search's outcome: EvoPress's result, with the seed stage's evaluations,
    tokens, wall time and history counted before EvoPress's."""
    offset = first.history[-1].generation + 1 if first.history else 0
    shifted = tuple(
        h._replace(
            generation=h.generation + offset,
            evaluations=h.evaluations + first.evaluations,
            tokens=h.tokens + first.tokens,
        )
        for h in evo.history
    )
    return dataclasses.replace(
        evo,
        evaluations=evo.evaluations + first.evaluations,
        tokens=evo.tokens + first.tokens,
        wall_time_s=evo.wall_time_s + first.wall_time_s,
        history=first.history + shifted,
        info={**{f"{first.strategy}_{k}": v for k, v in first.info.items()}, **evo.info},
    )


class _TyrRounds:
    """Týr's ``rebuild(centers, step)``: each round's grid centred on the current best,
    built into its own store under ``work_dir``, and that round's evaluate (see
    :func:`_run_tyr` for the backends' lifetimes)."""

    def __init__(self, ws, store, *, input_mode, work_dir, progress, map_layers, round_evaluate):
        cfg = ws.config.supernet
        self.ws, self.units, self.input_mode = ws, store.spec.units, input_mode
        self.work_dir, self.progress, self.map_layers = work_dir, progress, map_layers
        self.make = round_evaluate or functools.partial(make_evaluator, ws)
        structured = cfg.structure == "heads_neurons"
        qh = query_heads(cfg)
        adapter = ws.model.adapter
        self.groups = (
            unit_group_counts(adapter, cfg.structure, query_heads=qh) if structured else None
        )
        # never below the pruner's smallest step (Týr: 1 kv group or query head, 32 neurons)
        self.min_items = unit_min_steps(adapter, cfg.structure, query_heads=qh) if structured else 1
        # a depth supernet's units keep their dropped level in every round (a sublayer can
        # be dropped in a later round, and one dropped in round r stays droppable)
        self.droppable = dropped_levels(store.spec).any(axis=1)
        self.counter = iter(range(1_000_000))
        self.evaluates: list[Any] = []
        self.last_store = None

    def __call__(self, centers: np.ndarray, step: float):
        cfg = self.ws.config.supernet
        if self.evaluates and hasattr(self.evaluates[-1], "close"):
            self.evaluates[-1].close()  # its actors' CPUs go to this round's build
        grid = centred_grid(
            self.units,
            centers,
            step,
            groups=self.groups,
            steps_each_side=cfg.steps_each_side,
            min_items=self.min_items,
        )
        if self.droppable.any():
            grid = with_dropped_level(grid, rows=self.droppable)
        round_store = build_supernet(
            self.ws.model,
            self.ws.calibration,
            pruner=make_pruner(cfg),
            grid=grid,
            structure=cfg.structure,
            input_mode=self.input_mode,
            out_dir=Path(self.work_dir) / f"tyr-round-{next(self.counter)}",
            batch_size=BUILD_BATCH,
            progress=self.progress,
            overwrite=True,
            map_layers=self.map_layers,
            query_heads=query_heads(cfg),
            tie_experts=cfg.tie_experts,
            expert_removal=cfg.expert_removal,
            prune_router=cfg.prune_router,
        )
        if hasattr(self.map_layers, "close"):
            self.map_layers.close()
        self.last_store = round_store
        self.evaluates.append(self.make(round_store))
        return round_store.spec, self.evaluates[-1]


def _run_tyr(
    ws,
    store,
    budget,
    *,
    seed,
    settings,
    work_dir,
    progress,
    map_layers=None,
    round_evaluate=None,
) -> Outcome:
    """Týr-the-Pruner: rounds of supernets rebuilt around the current best (expected
    inputs by default), each searched by EvoPress with same-role swaps. On a depth
    supernet every round's grid keeps the dropped level of each unit that had one, and
    EvoPress trades budget across roles (attention or MLP is what it drops).

    ``map_layers`` runs each round's layer pruning (``None``: here) and
    ``round_evaluate(round_store)`` builds the round's ``Evaluate`` (``None``: an
    :class:`Evaluator` here). Backends with a ``close`` method hold resources (Ray
    actors): the layer map is closed after each build and the previous round's evaluate
    before the next build, so the two never hold a full cluster's CPUs together; the
    last round's evaluate is left open for its caller (it scored ``outcome.store``)."""
    t0 = time.perf_counter()
    settings = dict(settings)
    # Týr's schedule by default: 4 rounds, 12.5% -> 1.5625% of a sublayer (reached in round 4)
    rounds = int(settings.pop("rounds", TYR_ROUNDS))
    initial_step = float(settings.pop("initial_step", TYR_INITIAL_STEP))
    min_step = float(settings.pop("min_step", TYR_MIN_STEP))
    input_mode = str(settings.pop("input_mode", "expected"))
    inner = make_searcher("evopress", settings or DEMO_EVOPRESS)
    if work_dir is None:
        raise ValueError("the tyr strategy needs a work directory for its per-round supernets")
    if spec_quant_levels(getattr(store.spec, "level_labels", None)) is not None:
        raise ValueError(
            "the tyr strategy rebuilds pruning grids around the current best; a quantized "
            "supernet's levels are fixed bitwidths: use dp, knapsack, evopress or dp+evopress"
        )
    if ws.config.supernet.expert_removal:
        raise ValueError(
            "the tyr strategy rebuilds each round's grid around the current best, without "
            "the removed level of supernet.expert_removal; use evopress, dp or knapsack"
        )
    rebuild = _TyrRounds(
        ws,
        store,
        input_mode=input_mode,
        work_dir=work_dir,
        progress=progress,
        map_layers=map_layers,
        round_evaluate=round_evaluate,
    )
    droppable = rebuild.droppable
    result = coarse_to_fine(
        rebuild=rebuild,
        inner=inner,
        units=store.spec.units,
        budget=budget,
        key=jax.random.key(seed),
        rounds=rounds,
        initial_step=initial_step,
        min_step=min_step,
        # Týr swaps within a role; on a depth supernet dropping an attention or an MLP
        # sublayer is a choice *between* roles (a same-role search keeps the role of
        # the round-1 start's drops)
        same_role=not droppable.any(),
    )
    return Outcome(
        "tyr",
        np.asarray(result.best_choice, np.int32),
        float(result.best_fitness),
        int(result.evaluations),
        int(result.tokens),
        time.perf_counter() - t0,
        {
            "rounds": rounds,
            "initial_step": initial_step,
            "min_step": min_step,
            "input_mode": input_mode,
        },
        store=rebuild.last_store,
    )


# --------------------------------------------------------------------------- compare


@dataclass
class Scored:
    """One outcome scored for a compare table: ``fitness`` on the common minibatch,
    ``heldout`` the :attr:`HeldoutScores.score` (perplexity, or for encoders the distance
    to the dense model; lower is better), ``nn_agreement`` (encoders; higher is better),
    the budget ``achieved`` and ``validation``, the fitness on every validation row (None
    without them)."""

    outcome: Outcome
    fitness: float
    heldout: float
    achieved: float
    nn_agreement: float | None = None
    validation: float | None = None


def score_outcomes(
    ws: Workspace,
    evaluator: Evaluator,
    outcomes: Sequence[Outcome],
    budget: Budget,
    *,
    fidelity: int | None = None,
) -> list[Scored]:
    """Score every outcome on one common minibatch (the whole calibration set by default)
    and measure its held-out perplexity (encoders: :func:`heldout_scores`), so strategies
    compare on equal terms. Outcomes on their own supernet (Týr's last round) are scored
    by an evaluator of it."""
    fidelity = fidelity or evaluator.calibration.n_tokens
    out = []
    for o in outcomes:
        ev = evaluator if o.store is None else make_evaluator(ws, o.store)
        costs = CostModel.from_spec(ev.spec, budget)
        o = with_split_fitness(ws, ev, o)
        f = o.split.calibration
        if fidelity != ws.calibration.n_tokens:
            f = ev(o.choice[None].astype(np.int32), fidelity=fidelity, batch_seed=0)[0]
        if ws.model.adapter.is_causal_lm:
            held = HeldoutScores(float(ev.perplexity(o.choice, ws.heldout)))
        else:  # encoders: held-out distance to the dense model's outputs
            held = heldout_scores(ws, evaluated_model(ws, ev, o.choice))
        achieved = float(costs.achieved(o.choice))
        validation = o.split.validation
        out.append(Scored(o, float(f), held.score, achieved, held.nn_agreement, validation))
    return out
