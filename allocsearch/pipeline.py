"""The steps the CLI runs, as library functions: load a model and its token sets, build a
supernet, run a strategy under a budget, score it, and turn the result into a recipe.

Everything here takes typed objects (a validated :class:`~allocsearch.config.RunConfig`,
models, stores); strings are parsed only in :mod:`allocsearch.config` and the CLI.
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
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

import allocsearch
from allocsearch.assets_paths import DEMO_NAME, resolve_model_path
from allocsearch.config import (
    EXECUTIONS,
    DataConfig,
    EvaluatorConfig,
    RunConfig,
    SearchConfig,
    with_model_defaults,
)
from allocsearch.data.demo_corpus import demo_tokensets
from allocsearch.data.encoder_sets import encoder_tokensets
from allocsearch.data.sources import check_source, load_documents
from allocsearch.data.tokenizers import ByteTokenizer, load_tokenizer
from allocsearch.data.tokenset import TokenSet, build_tokensets
from allocsearch.distributed.local import run_search
from allocsearch.evaluate.evaluator import Evaluator
from allocsearch.evaluate.metrics import (
    EmbeddingCosineDistance,
    HiddenStateMSE,
    KLDivergence,
    Metric,
    NegativeLogLikelihood,
    TopKKLDivergence,
    nearest_neighbour_agreement,
)
from allocsearch.evaluate.streaming import StreamingEvaluator
from allocsearch.models.bert import mean_pool
from allocsearch.models.hf import ARCHITECTURES, HFModel, load_model
from allocsearch.models.streamed import streamed_nll_sum
from allocsearch.recipe.recipe import (
    LEVEL_KIND_KEY,
    Calibration,
    Fitness,
    LayerEntry,
    ModelIdentity,
    Provenance,
    Recipe,
    RecipeBudget,
    StructuredUnit,
)
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
from allocsearch.supernet.build import (
    build_supernet,
    routing_frequencies,
    unit_group_counts,
    unit_min_steps,
    unit_removed_groups,
)
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

# Calibration sequences per forward batch while building a supernet.
BUILD_BATCH = 16


@dataclass
class Workspace:
    """A loaded model with its calibration and held-out token sets."""

    config: RunConfig
    model: HFModel
    calibration: TokenSet
    heldout: TokenSet


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
    cfg = with_model_defaults(cfg, encoder=not model.adapter.is_causal_lm)
    calibration, heldout = load_tokensets(cfg.data, model)
    return Workspace(cfg, model, calibration, heldout)


def load_tokensets(data: DataConfig, model: HFModel) -> tuple[TokenSet, TokenSet]:
    """Calibration and held-out token sets (disjoint) for ``model``: windows of the token
    stream for a causal language model, sentence-aligned rows wrapped in the tokenizer's
    own special tokens for an encoder (:func:`~allocsearch.data.encoder_sets.encoder_tokensets`)."""
    n_cal = data.calibration_seqs(encoder=not model.adapter.is_causal_lm)
    if data.calibration == DEMO_NAME:
        return demo_tokensets(data.seq_len, n_cal, data.seed, n_heldout_seqs=data.n_heldout_seqs)
    tokenizer = _tokenizer_for(data, model)
    docs = load_documents(data.calibration, pattern=data.pattern, text_field=data.text_field)
    held = (
        load_documents(data.heldout, pattern=data.pattern, text_field=data.text_field)
        if data.heldout
        else None
    )
    # encoders read single wrapped inputs ([CLS] ... [SEP]), not windows of a stream
    make = build_tokensets if model.adapter.is_causal_lm else encoder_tokensets
    return make(
        docs,
        tokenizer,
        seq_len=data.seq_len,
        n_calibration_seqs=n_cal,
        seed=data.seed,
        heldout_documents=held,
        n_heldout_seqs=data.n_heldout_seqs,
    )


def _tokenizer_for(data: DataConfig, model: HFModel):
    if data.tokenizer:
        return load_tokenizer(data.tokenizer)
    if model.path and (Path(model.path) / "tokenizer.json").exists():
        return load_tokenizer(Path(model.path) / "tokenizer.json")
    vocab = model.adapter.hf_config.get("vocab_size")
    if vocab == 256:
        return ByteTokenizer()
    raise ValueError(
        f"no tokenizer for {model.path}: it has no tokenizer.json and a vocabulary of {vocab} "
        "(not bytes); set data.tokenizer to a tokenizer.json path"
    )


def heldout_perplexity(model: HFModel, tokenset: TokenSet, *, batch_rows: int = 16) -> float:
    """Perplexity (exp of the mean next-token NLL; lower is better) of ``model`` over
    every sequence of ``tokenset`` (causal language models), streamed block by block
    (:func:`~allocsearch.models.streamed.streamed_nll_sum`), so a lazily loaded model
    never has to fit the device."""
    if not model.adapter.is_causal_lm:
        raise ValueError(f"perplexity needs a causal language model, not {model.adapter.family}")
    total = streamed_nll_sum(model.adapter, model.params, tokenset.tokens, batch_rows=batch_rows)
    return float(np.exp(total / (tokenset.n_seq * (tokenset.seq_len - 1))))


def heldout_metric(ws: Workspace) -> Metric:
    """The encoder metric of held-out scores: the configured one when it is an encoder
    metric, else the embedding cosine distance."""
    metric = make_metric(ws.config.evaluator)
    return metric if not metric.causal_lm else EmbeddingCosineDistance()


def heldout_label(ws: Workspace) -> str:
    """What :func:`heldout_score` measures, for reports: ``"held-out perplexity"`` (causal
    language models) or ``"held-out <metric> to the dense model"`` (encoders)."""
    if ws.model.adapter.is_causal_lm:
        return "held-out perplexity"
    return f"held-out {heldout_metric(ws).name} to the dense model"


@dataclass(frozen=True)
class HeldoutScores:
    """Held-out quality of a model, as reports show it.

    Attributes:
      score: what :func:`heldout_label` names, lower is better: perplexity (causal
        language models) or the mean per-sequence :func:`heldout_metric` to the dense
        model (encoders; 0 = the dense model's outputs).
      nn_agreement: encoders only (else None, and None with fewer than 2 held-out
        sequences): :func:`~allocsearch.evaluate.metrics.nearest_neighbour_agreement` of
        the mean-pooled embeddings of the held-out sequences, in [0, 1], higher is better.
    """

    score: float
    nn_agreement: float | None = None


def heldout_scores(
    ws: Workspace, model: HFModel, *, reference: HFModel | None = None, batch_rows: int = 16
) -> HeldoutScores:
    """Held-out quality of ``model``: :func:`heldout_perplexity` for a causal language
    model; for an encoder, the mean over held-out sequences of :func:`heldout_metric`
    between ``reference`` (default: the workspace's dense model) and ``model`` (e.g.
    embedding cosine distance), and the nearest-neighbour agreement of their mean-pooled
    embeddings. Encoders have no perplexity; they are judged by how far their outputs
    move and whether their embeddings still retrieve the same neighbours."""
    if model.adapter.is_causal_lm:
        return HeldoutScores(heldout_perplexity(model, ws.heldout, batch_rows=batch_rows))
    reference = ws.model if reference is None else reference
    metric = heldout_metric(ws)
    forward = jax.jit(model.adapter.forward)
    ref_forward = (
        forward if reference.adapter is model.adapter else jax.jit(reference.adapter.forward)
    )
    tokens = ws.heldout.tokens
    # encoders are small: both models resident (lazily loaded weights read once here)
    ref_params, params = dict(reference.params), dict(model.params)
    losses, ref_pooled, pooled = [], [], []
    for i in range(0, len(tokens), batch_rows):
        ids = jnp.asarray(tokens[i : i + batch_rows])
        ref_out, out = ref_forward(ref_params, ids), forward(params, ids)
        teacher = metric.teacher_data(ref_out, ids)
        losses.append(np.asarray(metric.sequence_losses(teacher, out, ids)))
        # held-out rows have no padding: every position counts in the pooled embedding
        ref_pooled.append(np.asarray(mean_pool(ref_out.astype(jnp.float32), None)))
        pooled.append(np.asarray(mean_pool(out.astype(jnp.float32), None)))
    agreement = (
        nearest_neighbour_agreement(np.concatenate(ref_pooled), np.concatenate(pooled))
        if len(tokens) >= 2
        else None
    )
    return HeldoutScores(float(np.mean(np.concatenate(losses))), agreement)


def heldout_score(
    ws: Workspace, model: HFModel, *, reference: HFModel | None = None, batch_rows: int = 16
) -> float:
    """:attr:`HeldoutScores.score` of :func:`heldout_scores` (lower is better)."""
    return heldout_scores(ws, model, reference=reference, batch_rows=batch_rows).score


def pruned_model(ws: Workspace, store: SupernetStore, choice: ArrayLike) -> HFModel:
    """The model with every pruned parameter at ``choice``'s level of ``store`` (on the
    host; only the chosen level of each parameter is read)."""
    choice = np.asarray(choice)
    params = dict(ws.model.params)
    for u, names in enumerate(store.unit_params):
        for name in names:
            dense = np.asarray(params[name])
            level = store.read_levels(name, [int(choice[u])], dense)[0]
            params[name] = level.astype(dense.dtype)  # host: perplexity streams blocks
    return HFModel(ws.model.adapter, params)


def evaluated_model(ws: Workspace, evaluator: Any, choice: ArrayLike) -> HFModel:
    """The model an evaluator scores for ``choice``: its materialised parameters
    (resident) or the chosen levels read from its store (streaming)."""
    if hasattr(evaluator, "materialize"):
        return HFModel(ws.model.adapter, evaluator.materialize(choice))
    return pruned_model(ws, evaluator.store, choice)


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


def make_metric(cfg: EvaluatorConfig) -> Metric:
    """The metric object of ``evaluator.metric`` (KL, top-k KL and NLL for causal language
    models; embedding cosine distance and hidden-state NMSE for encoders)."""
    if cfg.metric == "topk_kl":
        return TopKKLDivergence(k=int(cfg.topk))
    if cfg.metric == "nll":
        return NegativeLogLikelihood()
    if cfg.metric == "embedding_cosine":
        return EmbeddingCosineDistance()
    if cfg.metric == "hidden_nmse":
        return HiddenStateMSE()
    return KLDivergence()


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
        return StreamingEvaluator(
            ws.model, store, ws.calibration, metric=metric, micro_batch_tokens=mb
        )
    return Evaluator(
        ws.model,
        store.spec,
        store.host_variants(),  # read once each, into the stacks: one device copy
        store.unit_params,
        ws.calibration,
        metric=metric,
        micro_batch_tokens=mb,
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
    settings = table_settings(ws, strategy, settings)
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
    if ws.config.supernet.expert_removal:
        raise ValueError(
            "the tyr strategy rebuilds each round's grid around the current best, without "
            "the removed level of supernet.expert_removal; use evopress, dp or knapsack"
        )
    cfg = ws.config.supernet
    units = store.spec.units
    structured = cfg.structure == "heads_neurons"
    qh = query_heads(cfg)
    groups = (
        unit_group_counts(ws.model.adapter, cfg.structure, query_heads=qh) if structured else None
    )
    # never below the pruner's smallest step (Týr: 1 kv group or query head, 32 neurons)
    min_items = unit_min_steps(ws.model.adapter, cfg.structure, query_heads=qh) if structured else 1
    # a depth supernet's units keep their dropped level in every round (a sublayer can
    # be dropped in a later round, and one dropped in round r stays droppable)
    droppable = dropped_levels(store.spec).any(axis=1)
    counter = iter(range(1_000_000))
    rounds_evaluate: list[Any] = []

    def rebuild(centers: np.ndarray, step: float):
        if rounds_evaluate and hasattr(rounds_evaluate[-1], "close"):
            rounds_evaluate[-1].close()  # its actors' CPUs go to this round's build
        grid = centred_grid(
            units,
            centers,
            step,
            groups=groups,
            steps_each_side=cfg.steps_each_side,
            min_items=min_items,
        )
        if droppable.any():
            grid = with_dropped_level(grid, rows=droppable)
        round_store = build_supernet(
            ws.model,
            ws.calibration,
            pruner=make_pruner(cfg),
            grid=grid,
            structure=cfg.structure,
            input_mode=input_mode,
            out_dir=Path(work_dir) / f"tyr-round-{next(counter)}",
            batch_size=BUILD_BATCH,
            progress=progress,
            overwrite=True,
            map_layers=map_layers,
            query_heads=query_heads(cfg),
            tie_experts=cfg.tie_experts,
            expert_removal=cfg.expert_removal,
            prune_router=cfg.prune_router,
        )
        if hasattr(map_layers, "close"):
            map_layers.close()
        rebuild.last_store = round_store
        make = round_evaluate or functools.partial(make_evaluator, ws)
        rounds_evaluate.append(make(round_store))
        return round_store.spec, rounds_evaluate[-1]

    result = coarse_to_fine(
        rebuild=rebuild,
        inner=inner,
        units=units,
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


# --------------------------------------------------------------------------- recipes


def recipe_from_choice(
    ws: Workspace,
    store: SupernetStore,
    budget: Budget,
    outcome: Outcome,
    *,
    partial: bool = False,
) -> Recipe:
    """A schema-v1 recipe of ``outcome.choice`` on ``store`` (exact per-layer sparsities
    of the stored variants, dead rows of structured units included)."""
    store = outcome.store or store
    spec = store.spec
    choice = np.asarray(outcome.choice)
    adapter = ws.model.adapter
    routers = any(u.role == "router" for u in spec.units)
    info = {layer.name: layer for layer in model_layers(adapter, routers=routers)}
    layer_sparsity: dict[str, float] = {}
    for u, params in enumerate(store.unit_params):
        for p in params:
            v = store.variants(p)
            layer_sparsity[p[: -len(".weight")]] = float(v.sparsity[int(choice[u])])
    structured = spec.structure in ("heads", "neurons", "heads_neurons")
    entries = []
    units = []
    member_kind: dict[str, str] = {}
    if structured:
        # group counts as the store was built (kv groups or query heads), read from its
        # keep masks: a query-head level's fraction of weights is not its fraction of heads
        layouts = store.manifest["pruner"].get("layouts") or {}
        query_heads = bool(layouts.get("attn", {}).get("query_heads", False))
        counts = unit_group_counts(adapter, spec.structure, query_heads=query_heads)
        removed_at = unit_removed_groups(store)
        for u, unit in enumerate(spec.units):
            kind = "heads" if unit.role == "attn" else "neurons"
            total = int(counts[u])
            removed = int(removed_at[u, int(choice[u])])
            units.append(StructuredUnit(unit.name, kind, unit.block, removed, total, unit.layers))
            member_kind.update(dict.fromkeys(unit.layers, kind))
    nm = spec.structure == "nm"
    unit_of_layer = {layer: u for u, unit in enumerate(spec.units) for layer in unit.layers}
    frequency = routing_frequencies(store)
    for name, layer in info.items():
        s = layer_sparsity.get(name, 0.0)
        kw: dict[str, Any] = {}
        if name in frequency:
            kw["routing_frequency"] = frequency[name]
        if structured:
            kw["structure"] = member_kind.get(name, "heads")
        elif nm:
            label = spec.level_labels[unit_of_layer[name]][int(choice[unit_of_layer[name]])]
            n, m = (int(x) for x in label.split(":"))
            kw.update(structure="nm", n=n, m=m)
        entries.append(LayerEntry(name, layer.role, layer.block, layer.shape, s, **kw))
    achieved = float(CostModel.from_spec(spec, budget).achieved(choice))
    fitness_name = ws.config.evaluator.metric
    return Recipe(
        model=ModelIdentity(
            name_or_path=ws.config.model,
            architecture=ARCHITECTURES.get(adapter.model_type, adapter.model_type),
            model_type=adapter.model_type,
            fingerprint=ws.model.fingerprint,
        ),
        layers=tuple(entries),
        budget=RecipeBudget(budget.kind, float(budget.target), achieved),
        provenance=Provenance(
            strategy=outcome.strategy,
            settings=_recipe_settings(store, outcome),
            fitness=Fitness(fitness_name, outcome.fitness),
            calibration=Calibration(
                ws.calibration.source, ws.calibration.fingerprint, int(ws.config.data.seed)
            ),
            tool_version=allocsearch.__version__,
            wall_time_s=float(outcome.wall_time_s),
            evaluations=int(outcome.evaluations),
        ),
        structure=spec.structure,
        units=tuple(units),
        partial=partial,
    )


def _recipe_settings(store: SupernetStore, outcome: Outcome) -> dict[str, Any]:
    """The outcome's settings, marked when the store's levels are bitwidths."""
    settings = dict(outcome.settings)
    if store.manifest.get("pruner", {}).get("kind") == "quantizer":
        settings[LEVEL_KIND_KEY] = "bits"
    return settings


# --------------------------------------------------------------------------- compare


@dataclass
class Scored:
    """One outcome scored for a compare table: ``fitness`` on the common minibatch,
    ``heldout`` the :attr:`HeldoutScores.score` (perplexity, or for encoders the distance
    to the dense model; lower is better), ``nn_agreement`` (encoders; higher is better)
    and the budget ``achieved``."""

    outcome: Outcome
    fitness: float
    heldout: float
    achieved: float
    nn_agreement: float | None = None


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
        f = ev(o.choice[None].astype(np.int32), fidelity=fidelity, batch_seed=0)[0]
        if ws.model.adapter.is_causal_lm:
            held = HeldoutScores(float(ev.perplexity(o.choice, ws.heldout)))
        else:  # encoders: held-out distance to the dense model's outputs
            held = heldout_scores(ws, evaluated_model(ws, ev, o.choice))
        achieved = float(costs.achieved(o.choice))
        out.append(Scored(o, float(f), held.score, achieved, held.nn_agreement))
    return out
