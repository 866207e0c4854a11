"""Depth pruning: dropped sublayers as levels, searched, applied and exported."""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from tiny_workspace import quiet_build, scaled_random_model, structured_test_recipe, write_corpus
from typer.testing import CliRunner

from allocsearch import pipeline
from allocsearch.cli import app
from allocsearch.config import config_from_dict
from allocsearch.data.tokenset import TokenSet
from allocsearch.distributed.local import run_search
from allocsearch.evaluate import streaming as streaming_mod
from allocsearch.evaluate.evaluator import Evaluator
from allocsearch.evaluate.metrics import KLDivergence
from allocsearch.evaluate.streaming import StreamingEvaluator
from allocsearch.models import HFModel, adapter_for_config, load_model
from allocsearch.pruners import StructuredPruner
from allocsearch.recipe import exporters
from allocsearch.recipe.apply import apply_recipe, write_pruned
from allocsearch.recipe.depth import dropped_blocks, dropped_units
from allocsearch.recipe.recipe import (
    LayerEntry,
    Recipe,
    RecipeBudget,
    RecipeError,
    StructuredUnit,
)
from allocsearch.search.budget import Budget, CostModel
from allocsearch.search.dp import TableSearcher
from allocsearch.search.evolutionary import EvolutionarySearcher
from allocsearch.search.knapsack import mckp_milp
from allocsearch.supernet.build import supernet_units, unit_group_counts
from allocsearch.supernet.depth import (
    TiedBlocks,
    block_units,
    check_depth_supported,
    depth_grid,
    dropped_levels,
    skippable_sublayers,
    with_dropped_level,
)
from allocsearch.supernet.levels import structured_grid
from allocsearch.supernet.store import SupernetStore

CFG = {
    "model_type": "llama",
    "vocab_size": 256,  # the byte tokenizer's, for the CLI tests' text corpus
    "hidden_size": 16,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
}
IDS = np.random.default_rng(7).integers(0, 50, size=(2, 10))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> HFModel:
    """A tiny random Llama (3 blocks = 6 sublayers), written and loaded back."""
    return scaled_random_model(CFG, tmp_path_factory.mktemp("dense") / "m")


@pytest.fixture(scope="module")
def calib() -> TokenSet:
    tokens = np.random.default_rng(1).integers(0, 50, size=(8, 12)).astype(np.int32)
    return TokenSet(tokens=tokens, source="random ids", tokenizer_identity="test-ids", seed=1)


@pytest.fixture(scope="module")
def stores(model, calib, tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    units = supernet_units(model.adapter, "heads_neurons")

    @functools.cache
    def get(mode: str):
        grid = None
        if mode == "sublayers":
            # attention: 0, 1, 2 (all: dropped) of 2 kv groups; MLP: 0, 32, 64 (all) neurons
            steps = np.array([1 if u.role == "attn" else 32 for u in units])
            groups = unit_group_counts(model.adapter, "heads_neurons")
            grid = structured_grid(groups, steps, center=0.5, steps_each_side=1)
        return quiet_build(
            model,
            calib,
            root / mode,
            pruner=StructuredPruner,
            grid=depth_grid(mode, grid, len(units)),
            structure="heads_neurons",
        )

    return get


_EVALUATORS: dict[str, Evaluator] = {}


def evaluator(model, calib, store) -> Evaluator:
    """The resident evaluator of a store (one per store: compiled once per module)."""
    key = str(store.path)
    if key not in _EVALUATORS:
        _EVALUATORS[key] = Evaluator(
            model, store.spec, store.all_variants(), store.unit_params, calib, metric=KLDivergence()
        )
    return _EVALUATORS[key]


def all_subsets(n: int) -> np.ndarray:
    return np.array(list(itertools.product([0, 1], repeat=n)), np.int32)


# --------------------------------------------------------------------------- levels


def test_grid_gets_a_dropped_level():
    grid = structured_grid([2, 64], [1, 16], center=0.5, steps_each_side=1)
    out = with_dropped_level(grid)
    # kv groups: 0, 1, 2 removed (2 = all: relabelled); neurons: 16, 32, 48 + dropped
    np.testing.assert_array_equal(out.sparsity[0, :3], [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(out.sparsity[1], [0.25, 0.5, 0.75, 1.0])
    assert out.labels[0] == ("2 groups", "1 groups", "dropped")
    assert out.labels[1][-1] == "dropped" and out.valid.sum() == 3 + 4
    # Týr's rebuilt grids: only the rows given (their units had a dropped level)
    some = with_dropped_level(grid, rows=np.array([False, True]))
    assert some.labels[0] == grid.labels[0] and some.labels[1][-1] == "dropped"
    np.testing.assert_array_equal(some.valid.sum(axis=1), [3, 4])
    drop = depth_grid("drop", None, 3)
    np.testing.assert_array_equal(drop.sparsity, [[0.0, 1.0]] * 3)
    with pytest.raises(ValueError, match="not one of"):
        depth_grid("blocks?", None, 3)


def test_depth_refuses_families_where_zero_is_not_a_skip():
    gpt2 = adapter_for_config(
        {"model_type": "gpt2", "vocab_size": 50, "n_embd": 16, "n_layer": 1, "n_head": 2}
    )
    with pytest.raises(ValueError, match="model family 'gpt2'"):
        check_depth_supported(gpt2)
    biased = adapter_for_config({**CFG, "mlp_bias": True})
    with pytest.raises(ValueError, match="down_proj"):
        check_depth_supported(biased)
    check_depth_supported(adapter_for_config(CFG))


def test_dropped_levels_cost_nothing(model, stores):
    spec = stores("drop").spec
    dropped = dropped_levels(spec)
    np.testing.assert_array_equal(dropped, [[False, True]] * spec.num_units)
    for kind in ("params", "flops"):
        cost = CostModel.from_spec(spec, Budget(kind=kind, target=0.1)).cost
        np.testing.assert_array_equal(cost[:, 1], 0.0)
        np.testing.assert_array_equal(
            cost[:, 0], spec.numel if kind == "params" else spec.flops_per_token
        )
    # attention 4 x 16 x 16 (q, o) + 2 x 8 x 16 (k, v); MLP 3 x 16 x 64
    np.testing.assert_array_equal(spec.numel[:2], [2 * 256 + 2 * 128, 3 * 1024])
    count = CostModel.from_spec(spec, Budget(kind="sublayers", target=0.5))
    np.testing.assert_array_equal(count.cost, [[1.0, 0.0]] * spec.num_units)
    assert count.dense == 6 and count.capacity == 3
    # a block unit counts its 2 sublayers
    bcount = CostModel.from_spec(block_units(spec)[0], Budget(kind="sublayers", target=0.5))
    np.testing.assert_array_equal(bcount.cost, [[2.0, 0.0]] * 3)
    assert bcount.dense == 6


@pytest.mark.slow
def test_dropped_sublayer_is_a_skipped_sublayer(model, calib, stores):
    """Scoring a dropped MLP equals running the model with that MLP's output zeroed by
    hand (down_proj = 0), on both evaluators; the dropped level holds all-zero weights."""
    store = stores("drop")
    spec = store.spec
    resident = evaluator(model, calib, store)
    lazy = load_model(model.path, lazy=True)
    streamed = StreamingEvaluator(lazy, store, calib, metric=KLDivergence())
    choices = all_subsets(spec.num_units)[[21, 63]]
    fid = calib.n_tokens
    np.testing.assert_allclose(
        streamed(choices, fidelity=fid, batch_seed=0),
        resident(choices, fidelity=fid, batch_seed=0),
        rtol=1e-5,
        atol=1e-7,
    )
    mlp1 = [u.name for u in spec.units].index("model.layers.1.mlp")
    choice = np.zeros(spec.num_units, np.int32)
    choice[mlp1] = 1
    params = resident.materialize(choice)
    for layer in spec.units[mlp1].layers:
        assert not np.any(np.asarray(params[f"{layer}.weight"]))
    by_hand = dict(model.params)
    by_hand["model.layers.1.mlp.down_proj.weight"] = jnp.zeros((16, 64))
    np.testing.assert_allclose(
        np.asarray(model.adapter.forward(params, jnp.asarray(IDS))),
        np.asarray(model.adapter.forward(by_hand, jnp.asarray(IDS))),
        atol=1e-6,
    )


def test_dropped_sublayers_are_skipped_not_computed(model, calib, stores):
    """Both evaluators branch around each sublayer a candidate drops (lax.cond, candidates
    one after another), which gives the scores of running its zero weights."""
    store = stores("drop")
    spec = store.spec
    names = [u.name for u in spec.units]
    table = skippable_sublayers(model.adapter, spec, store.unit_params)
    assert table.tolist() == [
        [names.index(f"model.layers.{i}.self_attn"), names.index(f"model.layers.{i}.mlp")]
        for i in range(3)
    ]
    mixed = stores("sublayers")  # structured levels and dropped: the same table
    assert (
        skippable_sublayers(model.adapter, mixed.spec, mixed.unit_params).tolist() == table.tolist()
    )
    choices = all_subsets(spec.num_units)[[0, 21, 42, 63, 5]]
    fid = calib.n_tokens
    kw = dict(metric=KLDivergence(), candidates_per_call=3)
    skipping = Evaluator(model, spec, store.all_variants(), store.unit_params, calib, **kw)
    computing = Evaluator(
        model, spec, store.all_variants(), store.unit_params, calib, skip_dropped=False, **kw
    )  # the zero weights run through vmap
    want = computing(choices, fidelity=fid, batch_seed=0)
    np.testing.assert_allclose(
        skipping(choices, fidelity=fid, batch_seed=0), want, rtol=1e-6, atol=1e-7
    )
    lazy = load_model(model.path, lazy=True)
    streamed = StreamingEvaluator(lazy, store, calib, **kw)
    np.testing.assert_allclose(
        streamed(choices, fidelity=fid, batch_seed=0), want, rtol=1e-5, atol=1e-7
    )
    assert np.ptp(want) > 1e-3

    # The streamed block program holds one real branch per sublayer, not a select.
    loaded = streamed._load(streamed._blocks[1], choices[:3], np.ones(3, bool))
    rows = jnp.arange(2, dtype=jnp.int32)
    ctx = streaming_mod._ctx_program(model.adapter, streamed._dtype, streamed._tokens, rows)
    h = jnp.zeros((3, 2, calib.seq_len, CFG["hidden_size"]), streamed._dtype)
    skip = streamed._skip_flags(1, choices[:3])
    assert skip.tolist() == [[False, False], [False, True], [True, False]]  # none, MLP, attention
    program = str(
        jax.make_jaxpr(streaming_mod._block_program, static_argnums=(0,))(
            model.adapter, loaded.plain, loaded.stacks, loaded.slots, h, ctx, skip
        )
    )
    assert program.count(" cond[") == 2 and " scan[" in program  # lax.map: a scan


# --------------------------------------------------------------------------- search


@pytest.mark.parametrize(
    "budget_of",
    [
        pytest.param(lambda spec: Budget(kind="params", target=0.05), id="params-5%"),
        pytest.param(lambda spec: Budget(kind="params", target=0.3), id="params-30%"),
        pytest.param(
            lambda spec: Budget(kind="sublayers", target=2 / 6),
            id="drop-2-of-6",
        ),
    ],
)
def test_evopress_finds_the_brute_force_best_drop_set(model, calib, stores, budget_of):
    store = stores("drop")
    spec = store.spec
    ev = evaluator(model, calib, store)
    budget = budget_of(spec)
    fid = calib.n_tokens
    subsets = all_subsets(spec.num_units)
    feasible = subsets[CostModel.from_spec(spec, budget).is_feasible(subsets)]
    scores = ev(feasible, fidelity=fid, batch_seed=0)
    best = feasible[int(np.argmin(scores))]

    searcher = EvolutionarySearcher(
        generations=12, offspring=8, survivors=(2, 1), tokens=(fid, fid), max_switches=2
    )
    result = run_search(searcher, ev, spec, budget, key=jax.random.key(0))
    assert result.info["achieved"] >= budget.target - 1e-9
    np.testing.assert_array_equal(result.best_choice, best)
    assert result.best_fitness == pytest.approx(float(scores.min()), rel=1e-5)

    # DP and knapsack solve the same units' error table (feasible, not necessarily best:
    # the table assumes additive errors)
    for solver in (None, mckp_milp):
        table = (
            TableSearcher(tokens=fid)
            if solver is None
            else TableSearcher(solver=solver, tokens=fid)
        )
        res = run_search(table, ev, spec, budget, key=jax.random.key(0))
        assert bool(CostModel.from_spec(spec, budget).is_feasible(res.best_choice))
        assert res.best_fitness >= float(scores.min()) - 1e-6


def test_block_units_tie_both_sublayers(model, calib, stores):
    store = stores("drop")
    bspec, owner = block_units(store.spec)
    assert [u.name for u in bspec.units] == [f"model.layers.{b}" for b in range(3)]
    np.testing.assert_array_equal(owner, [0, 0, 1, 1, 2, 2])
    assert bspec.numel.sum() == store.spec.numel.sum()
    ev = evaluator(model, calib, store)
    fid = calib.n_tokens

    def score_blocks(choices, **kw):
        return ev(np.asarray(choices)[:, owner], **kw)

    blocks = all_subsets(3)
    scores = score_blocks(blocks, fidelity=fid, batch_seed=0)
    budget = Budget(kind="sublayers", target=1 / 3)  # 2 of 6 sublayers: one block
    feasible = CostModel.from_spec(bspec, budget).is_feasible(blocks)
    best = blocks[feasible][int(np.argmin(scores[feasible]))]
    searcher = EvolutionarySearcher(
        generations=4, offspring=4, survivors=(2, 1), tokens=(fid, fid), max_switches=1
    )
    result = run_search(searcher, score_blocks, bspec, budget, key=jax.random.key(0))
    np.testing.assert_array_equal(result.best_choice, best)


@pytest.mark.slow
def test_mixed_allocation_drops_some_and_prunes_others(model, calib, stores):
    store = stores("sublayers")
    spec = store.spec
    budget = Budget(kind="params", target=0.4)
    searcher = EvolutionarySearcher(generations=6, offspring=6, survivors=(2, 1), tokens=(96, 96))
    result = run_search(
        searcher, evaluator(model, calib, store), spec, budget, key=jax.random.key(1)
    )
    assert result.info["achieved"] >= 0.4 - 1e-9
    assert CostModel.from_spec(spec, budget).is_feasible(result.best_choice)
    dropped = dropped_levels(spec)
    last = spec.num_levels - 1
    assert dropped.sum() == spec.num_units and dropped[np.arange(spec.num_units), last].all()
    cost = CostModel.from_spec(spec, Budget(kind="flops", target=0.1)).cost
    np.testing.assert_array_equal(cost[dropped], 0.0)
    assert np.all(cost[spec.valid & ~dropped] > 0)
    with pytest.raises(ValueError, match="depth 'drop' supernet"):
        block_units(spec)


# --------------------------------------------------------------------------- apply, export


def depth_recipe(model, calib, dropped: set[str]) -> Recipe:
    """A heads_neurons recipe dropping the named sublayers, leaving the rest dense."""
    adapter = model.adapter
    units = supernet_units(adapter, "heads_neurons")
    groups = unit_group_counts(adapter, "heads_neurons")
    su = tuple(
        StructuredUnit(
            u.name,
            "heads" if u.role == "attn" else "neurons",
            u.block,
            int(g) if u.name in dropped else 0,
            int(g),
            u.layers,
        )
        for u, g in zip(units, groups, strict=True)
    )
    kind = {x: s.kind for s in su for x in s.layers}
    gone = {x for s in su if s.removed == s.total for x in s.layers}
    layers = tuple(
        LayerEntry(x.name, x.role, x.block, x.shape, 1.0 if x.name in gone else 0.0, kind[x.name])
        for x in adapter.layers()
    )
    return structured_test_recipe(
        model, calib, layers, su, structure="heads_neurons", architecture="LlamaForCausalLM"
    )


@pytest.mark.slow
def test_apply_removes_a_dropped_block(model, calib, stores, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    store = stores("drop")
    recipe = depth_recipe(
        model, calib, {"model.layers.1.self_attn", "model.layers.1.mlp", "model.layers.2.mlp"}
    )
    assert dropped_blocks(recipe) == (1,) and len(dropped_units(recipe)) == 3
    pruned, updates, report = apply_recipe(model, recipe, store=store)
    out = write_pruned(pruned, tmp_path / "pruned", config_updates=updates)

    assert updates["num_hidden_layers"] == 2
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert hf.config.num_hidden_layers == 2
    names = {n for n, _ in hf.named_parameters()}
    assert not any(n.startswith("model.layers.2.") for n in names)
    # block 2 of the dense model is block 1 now, its MLP zeroed (not removable alone)
    np.testing.assert_array_equal(
        hf.model.layers[1].self_attn.q_proj.weight.detach().numpy(),
        np.asarray(model.params["model.layers.2.self_attn.q_proj.weight"]),
    )
    assert not hf.model.layers[1].mlp.down_proj.weight.detach().numpy().any()
    with torch.no_grad():
        got = hf(torch.tensor(IDS)).logits.numpy()
    ev = evaluator(model, calib, store)
    choice = np.array(
        [
            1
            if u.name in {"model.layers.1.self_attn", "model.layers.1.mlp", "model.layers.2.mlp"}
            else 0
            for u in store.spec.units
        ]
    )
    skipped = np.asarray(model.adapter.forward(ev.materialize(choice), jnp.asarray(IDS)))
    np.testing.assert_allclose(got, skipped, atol=1e-4, rtol=1e-4)

    # parameters by hand: a block of the tiny Llama holds 5 * 16 * 16 / 2 ... counted here
    block = sum(
        int(np.prod(v.shape)) for n, v in model.params.items() if n.startswith("model.layers.1.")
    )
    assert report.num_params == model.adapter.num_params() - block
    assert report.num_params == sum(p.numel() for p in hf.parameters())
    mlp = 3 * 16 * 64
    assert report.num_params_recipe == report.num_params - mlp  # the zeroed MLP is padding
    assert any("blocks [1] dropped" in note for note in report.notes)
    assert any("['model.layers.2.mlp'] stay as zero weights" in note for note in report.notes)


def test_sublayers_budget_is_recomputed_from_the_units(model, calib):
    recipe = depth_recipe(model, calib, {"model.layers.0.mlp", "model.layers.2.self_attn"})
    counted = dataclasses.replace(recipe, budget=RecipeBudget("sublayers", 2 / 6, 2 / 6))
    assert Recipe.from_dict(counted.to_dict()).budget.achieved == pytest.approx(2 / 6)
    with pytest.raises(RecipeError, match="does not match"):
        dataclasses.replace(recipe, budget=RecipeBudget("sublayers", 2 / 6, 3 / 6))


def test_exports_of_depth_recipes(model, calib, stores):
    store = stores("drop")
    recipe = depth_recipe(model, calib, {"model.layers.0.mlp", "model.layers.2.self_attn"})
    choice = np.array(
        [
            1 if u.name in {"model.layers.0.mlp", "model.layers.2.self_attn"} else 0
            for u in store.spec.units
        ],
        np.int32,
    )
    exp = exporters.to_evopress(recipe, store.spec, choice)
    assert exp.content == "mlp\nnone\nattn\n"
    for fn in (
        exporters.to_llm_compressor,
        exporters.to_owl,
        exporters.to_torch_pruning,
        lambda r: exporters.to_jaxpruner(r),
    ):
        with pytest.raises(exporters.ExportError, match="model.layers.0.mlp"):
            fn(recipe)
    # a recipe that also removes some heads has no EvoPress depth form
    mixed = depth_recipe(model, calib, {"model.layers.0.mlp"})
    attn0 = dataclasses.replace(mixed.units[0], removed=1)
    mixed = dataclasses.replace(mixed, units=(attn0, *mixed.units[1:]))
    with pytest.raises(exporters.ExportError, match="removes 1 of 2 heads"):
        exporters.to_evopress(mixed, store.spec, choice)


# --------------------------------------------------------------------------- Týr


@pytest.mark.slow
def test_tyr_keeps_the_dropped_level_and_drops_the_brute_force_best(model, calib, stores, tmp_path):
    """Týr (2 rounds, 3 levels per unit around the centre) on a depth supernet: every
    round's rebuilt grid has a dropped level for every unit (MLP units' centred levels
    stop at 43 of 64 neurons, so it is added, not reached), and under "drop at least 1 of
    6 sublayers" the final recipe drops the sublayer that the brute-force best allocation
    of the last round's grid drops."""
    cfg = config_from_dict(
        {
            "supernet": {"structure": "heads_neurons", "depth": "sublayers", "steps_each_side": 1},
            "backend": {"kind": "local"},
        }
    )
    ws = pipeline.Workspace(cfg, model, calib, calib)
    store = stores("sublayers")
    budget = Budget(kind="sublayers", target=1 / 6)
    fid = calib.n_tokens
    settings = {
        "rounds": 2,
        "input_mode": "dense",
        "generations": 5,
        "offspring": 6,
        "survivors": [2, 1],
        "tokens": [fid, fid],
    }
    out = pipeline.run_strategy(
        "tyr", ws, store, budget, evaluate=None, seed=0, settings=settings,
        work_dir=tmp_path, progress=False,
    )  # fmt: skip
    mlp = np.array([u.role == "mlp" for u in store.spec.units])
    for r in range(2):
        spec = SupernetStore.open(tmp_path / f"tyr-round-{r}").spec
        last = spec.num_levels - 1
        assert dropped_levels(spec)[np.arange(spec.num_units), last].all(), f"round {r + 1}"
        assert all(labels[-1] == "dropped" for labels in spec.level_labels)
        below = spec.sparsity[np.arange(spec.num_units), last - 1]
        assert np.all(below[mlp] <= 43 / 64 + 1e-12)

    final = out.store.spec
    grid = np.array(list(itertools.product(*(range(k) for k in final.num_levels))), np.int32)
    grid = grid[CostModel.from_spec(final, budget).is_feasible(grid)]
    scores = evaluator(model, calib, out.store)(grid, fidelity=fid, batch_seed=0)
    best = grid[int(np.argmin(scores))]
    rows = np.arange(final.num_units)
    names = np.array([u.name for u in final.units])
    want = set(names[dropped_levels(final)[rows, best]])
    assert len(want) == 1  # the budget's one sublayer; nothing else is worth dropping
    recipe = pipeline.recipe_from_choice(ws, store, budget, out)
    assert {u.name for u in dropped_units(recipe)} == want
    assert recipe.budget.kind == "sublayers" and recipe.budget.achieved == pytest.approx(1 / 6)
    assert out.fitness == pytest.approx(float(scores.min()), rel=1e-5)


# --------------------------------------------------------------------------- CLI

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *parts: str) -> None:
    """Exit status 2 and a single line naming ``parts``."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for part in parts:
        assert part in lines[0], lines[0]


@pytest.fixture(scope="module")
def cli_stores(model, tmp_path_factory):
    """The model fixture's directory, a word corpus, a config (the byte tokenizer; EvoPress
    scoring every candidate on all 96 calibration tokens) and two stores built by the
    CLI: depth "drop" and an unstructured one (no dropped level). Returns (root, config
    path). Every command of the module scores with one evaluator per store (compiled
    once)."""
    mp = pytest.MonkeyPatch()
    made: dict[str, Evaluator] = {}
    make = pipeline.make_evaluator

    def shared(ws, store, *args):
        return made.setdefault(str(store.path), make(ws, store, *args))

    mp.setattr(pipeline, "make_evaluator", shared)
    root = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(root / "corpus", docs=3, words_per_doc=200)
    config = {
        "model": str(model.path),
        "data": {"calibration": str(corpus), "seq_len": 16, "n_calibration_seqs": 6,
                 "n_heldout_seqs": 2},
        "supernet": {"structure": "heads_neurons", "steps_each_side": 1},
        "search": {"settings": {"generations": 8, "offspring": 6, "survivors": [1],
                                "tokens": [96]}},
        "backend": {"kind": "local"},
    }  # fmt: skip
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    builds = {"drop": ["--depth", "drop"], "plain": ["--structure", "unstructured"]}
    for name, options in builds.items():
        r = cli("build", "-c", root / "config.yaml", *options, "--out", root / name,
                "--no-progress")  # fmt: skip
        assert r.exit_code == 0, r.output
    yield root, root / "config.yaml"
    mp.undo()


def brute_force(config, store_path, choices: np.ndarray) -> np.ndarray:
    """The best of sublayer allocations ``choices`` int[n, 6] on all calibration tokens."""
    ws = pipeline.load_workspace(config)
    store = pipeline.open_store(ws, store_path)
    ev = pipeline.make_evaluator(ws, store)
    scores = ev(choices, fidelity=ws.calibration.n_tokens, batch_seed=0)
    return choices[int(np.argmin(scores))]


@pytest.mark.slow
def test_cli_drops_the_brute_force_best_sublayers_and_block(cli_stores):
    root, config = cli_stores
    cfg = config_from_dict(yaml.safe_load(config.read_text()))
    names = [u.name for u in SupernetStore.open(root / "drop", verify="none").spec.units]
    pairs = all_subsets(6)[all_subsets(6).sum(axis=1) == 2]
    blocks = TiedBlocks.of(SupernetStore.open(root / "drop", verify="none").spec)

    r = cli("search", "--supernet", root / "drop", "-o", root / "two", "-c", config,
            "--budget", "sublayers", "--target", 2, "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "target: drop 2 of 6 sublayers" in r.output and "drops 2 of 6 sublayers" in r.output
    recipe = Recipe.load(root / "two" / "recipe.json")
    best = brute_force(cfg, root / "drop", pairs)
    assert {u.name for u in dropped_units(recipe)} == set(np.array(names)[best == 1])
    assert (recipe.budget.kind, recipe.budget.target) == ("sublayers", pytest.approx(2 / 6))
    assert recipe.budget.achieved == pytest.approx(2 / 6)

    r = cli("search", "--supernet", root / "drop", "-o", root / "block", "-c", config,
            "--tie-blocks", "--budget", "sublayers", "--target", 2, "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output
    recipe = Recipe.load(root / "block" / "recipe.json")
    best = brute_force(cfg, root / "drop", blocks.expand(np.eye(3, dtype=np.int32)))
    assert {u.name for u in dropped_units(recipe)} == set(np.array(names)[best == 1])
    assert len(dropped_blocks(recipe)) == 1 and recipe.provenance.settings["tie_blocks"]
    # the per-sublayer recipe exports as any depth recipe: the dropped block is attn+mlp
    r = cli("export", root / "block" / "recipe.json", "-f", "evopress", "--supernet",
            root / "drop", "-o", root / "block.txt")  # fmt: skip
    assert r.exit_code == 0, r.output
    lines = (root / "block.txt").read_text().splitlines()
    assert lines[dropped_blocks(recipe)[0]] == "attn+mlp" and lines.count("none") == 2


@pytest.mark.slow  # the stores' builds
@pytest.mark.parametrize(
    "store, args, parts",
    [
        pytest.param("plain", ["--budget", "sublayers", "--target", 2],
                     ["has no dropped level", "--depth drop"], id="sublayers-no-drop-level"),
        pytest.param("plain", ["--tie-blocks", "--target", 0.3],
                     ["--tie-blocks", "depth 'drop' supernet", "--depth drop"],
                     id="blocks-not-drop"),
        pytest.param("drop", ["--budget", "sublayers", "--target", 2.5],
                     ["--target 2.5", "whole number from 1 to 5"], id="fractional-count"),
        pytest.param("drop", ["--budget", "sublayers", "--target", 7],
                     ["--target 7", "whole number from 1 to 5"], id="too-many"),
        pytest.param("drop", ["--budget", "sublayers"], ["needs --target"], id="no-target"),
        pytest.param("drop", ["--tie-blocks", "--budget", "sublayers", "--target", 3],
                     ["--tie-blocks", "even --target"], id="odd-count-of-blocks"),
        pytest.param("drop", ["--tie-blocks", "--strategy", "owl", "--target", 0.3],
                     ["--tie-blocks", "'owl'"], id="blocks-with-an-allocator"),
        pytest.param("drop", ["--budget", "size", "--target", 0.3],
                     ["--budget", "'size' is not valid"], id="unknown-budget"),
    ],
)  # fmt: skip
def test_cli_refuses_bad_depth_combinations(cli_stores, store, args, parts):
    root, config = cli_stores
    r = cli("search", "--supernet", root / store, "-o", root / "bad", "-c", config, *args)
    one_line_error(r, *parts)
    assert not (root / "bad").exists()
