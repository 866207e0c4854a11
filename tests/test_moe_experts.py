"""Whole-expert removal and router units of mixture-of-experts models (issue 19): the masked
router equals transformers on the physically removed checkpoint (tiny random Mixtral and
Qwen3-MoE, float32, batch of 2 with padding), uneven removal is refused, searches (DP,
EvoPress) with the removed level never keep fewer than top_k experts in a block and meet
the params budget, and the router becomes a unit on request."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_parity import hf_logits, randomize  # noqa: E402
from test_moe import (  # noqa: E402
    CASES,
    QWEN3_MOE,
    TOL,
    _tiny_model,
    tiny_moe_run,
)
from tiny_workspace import quiet_build  # noqa: E402

from allocsearch.distributed.local import run_search  # noqa: E402
from allocsearch.models import HFModel, load_model, save_model  # noqa: E402
from allocsearch.pruners import MagnitudePruner  # noqa: E402
from allocsearch.recipe.apply import ApplyReport, write_pruned  # noqa: E402
from allocsearch.recipe.experts import apply_experts, remove_experts, removed_experts  # noqa: E402
from allocsearch.recipe.exporters import ExportError, to_llm_compressor  # noqa: E402
from allocsearch.recipe.recipe import (  # noqa: E402
    Calibration,
    Fitness,
    LayerEntry,
    ModelIdentity,
    Provenance,
    Recipe,
    RecipeBudget,
    RecipeError,
    fraction_removed,
)
from allocsearch.search import Budget, CostModel, EvolutionarySearcher, TableSearcher  # noqa: E402
from allocsearch.supernet.build import (  # noqa: E402
    supernet_units,
)
from allocsearch.supernet.experts import (  # noqa: E402
    protected_experts,
    removal_grid,
    removed_levels,
)


def _recipe(model, sparsity: dict[str, float]) -> Recipe:
    """A recipe of ``model`` listing every layer (routers too when ``sparsity`` names
    one), at the given sparsities (0 elsewhere)."""
    routers = any(name.endswith(".gate") for name in sparsity)
    layers = tuple(
        LayerEntry(x.name, x.role, x.block, x.shape, sparsity.get(x.name, 0.0))
        for x in model.adapter.layers(include_router=routers)
    )
    achieved = fraction_removed(layers, "params")
    return Recipe(
        model=ModelIdentity("tiny", "X", model.adapter.model_type, model.fingerprint),
        layers=layers,
        budget=RecipeBudget("params", achieved, achieved),
        provenance=Provenance(
            strategy="hand",
            settings={},
            fitness=Fitness("kl", None),
            calibration=Calibration("", "none", 0),
            tool_version="test",
            wall_time_s=0.0,
            evaluations=0,
        ),
    )


def _report(model) -> ApplyReport:
    n = model.adapter.num_params()
    return ApplyReport("test", "unstructured", False, (), n, n, n, {})


def _remove(model, experts: dict[int, list[int]], extra=None) -> dict[str, float]:
    gate, up, down = model.adapter.moe.proj_names
    out = dict(extra or {})
    for b, es in experts.items():
        for e in es:
            for p in (gate, up, down):
                out[f"{model.adapter.expert_prefix(b, e)}{p}"] = 1.0
    return out


@pytest.mark.parametrize("family", [pytest.param("mixtral", marks=pytest.mark.slow), "qwen3_moe"])
def test_masked_router_equals_transformers_on_removed_checkpoint(family, tmp_path):
    """Experts 1 (block 0) and 3 (block 1) removed: our model with their weights zeroed
    (router logits masked) equals transformers on the checkpoint apply writes without
    them (3 experts, router rows gone), while transformers on the zero-expert checkpoint
    (still routing to them) differs."""
    torch.manual_seed(0)
    hf = randomize(CASES[family](transformers))
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    recipe = _recipe(ours, _remove(ours, {0: [1], 1: [3]}))
    assert list(removed_experts(recipe)) == [0, 1]
    ids = np.random.default_rng(0).integers(0, 97, size=(2, 12))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    valid = mask.astype(bool)

    zeros = dict(ours.params)
    for es in removed_experts(recipe).values():
        for e in es:
            for name in [n for n in zeros if n.startswith(e + ".")]:
                zeros[name] = jnp.zeros_like(zeros[name])
    masked = np.asarray(ours.adapter.forward(zeros, jnp.asarray(ids), jnp.asarray(mask)))
    pruned, updates, report = remove_experts(
        HFModel(ours.adapter, zeros, fingerprint="z"), {}, _report(ours), recipe
    )
    assert updates == {"num_local_experts": 3}  # both families write this key
    assert any("experts removed" in n for n in report.notes)
    f = ours.adapter.moe.expert_size  # two experts (one per block) and their router rows go
    assert report.num_params == ours.adapter.num_params() - 2 * (3 * f * 32 + 32)
    out = write_pruned(pruned, tmp_path / "removed", config_updates=updates)
    hf_removed = type(hf).from_pretrained(out).eval()
    ref = hf_logits(hf_removed, ids, mask)
    np.testing.assert_allclose(masked[valid], ref[valid], atol=TOL, rtol=TOL)
    got = np.asarray(pruned.adapter.forward(pruned.params, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(got[valid], masked[valid], atol=1e-5, rtol=1e-5)
    # without the mask, transformers routes tokens to the zero experts: other outputs
    kept_zero = save_model(HFModel(ours.adapter, zeros, fingerprint="z"), tmp_path / "zeros")
    unmasked = hf_logits(type(hf).from_pretrained(kept_zero).eval(), ids, mask)
    assert np.max(np.abs(unmasked[valid] - ref[valid])) > 1e-3


def test_uneven_removal_is_refused_or_kept_as_zeros():
    model = _tiny_model({**QWEN3_MOE, "num_hidden_layers": 2})
    recipe = _recipe(model, _remove(model, {0: [2]}))
    assert removed_experts(recipe) == {0: ("model.layers.0.mlp.experts.2",)}
    with pytest.raises(RecipeError, match=r"block 0: 1, block 1: 0.*--no-physical"):
        apply_experts(model, {}, _report(model), recipe, physical=True)
    same, updates, report = apply_experts(model, {}, _report(model), recipe, physical=False)
    assert same is model and updates == {} and "transformers still routes" in report.notes[-1]
    with pytest.raises(ExportError, match=r"removes 'model.layers.0.mlp.experts.2'"):
        to_llm_compressor(recipe)
    too_many = _recipe(model, _remove(model, {1: [0, 1, 3]}))
    with pytest.raises(RecipeError, match=r"block 1 with 1 of 4 experts, fewer than top_k=2"):
        apply_experts(model, {}, _report(model), too_many, physical=False)


def test_protected_experts_are_the_most_routed():
    np.testing.assert_array_equal(protected_experts(np.array([5, 9, 0, 9]), 2), [1, 3])
    np.testing.assert_array_equal(protected_experts(np.array([3, 3, 3, 1]), 2), [0, 1])
    with pytest.raises(ValueError, match="top_k=5"):
        protected_experts(np.zeros(4), 5)


def _removal_store(tmp_path, cfg, *, prune_router=False):
    from allocsearch.data.tokenset import TokenSet

    model = _tiny_model(cfg)
    units = supernet_units(
        model.adapter, "unstructured", expert_removal=True, prune_router=prune_router
    )
    grid = removal_grid(units, center=0.5, step_weights=48, steps_each_side=2)
    calib = TokenSet(
        np.random.default_rng(0).integers(0, cfg["vocab_size"], size=(4, 8)).astype(np.int32),
        "r",
        "ids",
        0,
    )
    store = quiet_build(
        model,
        calib,
        tmp_path / "s",
        pruner=MagnitudePruner(),
        grid=grid,
        expert_removal=True,
        prune_router=prune_router,
    )
    return model, store, calib


def test_searches_keep_top_k_experts_and_meet_the_budget(tmp_path):
    """A fitness that rewards every removed expert (0 error at the removed level): DP and
    EvoPress remove all they may, which is every expert but the top_k most routed of each
    block; the achieved params budget recomputes exactly from the spec and is met."""
    cfg = {**QWEN3_MOE, "num_hidden_layers": 2, "num_experts": 6, "num_experts_per_tok": 2}
    model, store, _ = _removal_store(tmp_path, cfg)
    spec = store.spec
    counts = store.manifest["routing"]["counts"]
    protected = store.manifest["routing"]["protected"]
    experts = [u for u, unit in enumerate(spec.units) if unit.role == "expert"]
    assert len(experts) == 2 * 6 and len(spec.units) == 2 * 4 + 2 * 6
    removed = removed_levels(spec)
    for u in experts:
        b, e = spec.units[u].block, int(spec.units[u].name.rsplit(".", 1)[1])
        assert spec.units[u].layers == tuple(
            f"model.layers.{b}.mlp.experts.{e}.{p}" for p in ("gate_proj", "up_proj", "down_proj")
        )
        assert removed[u].any() == (e not in protected[b])
        if removed[u].any():
            k = int(spec.num_levels[u]) - 1
            assert removed[u, k] and spec.sparsity[u, k] == 1.0
            assert spec.kept_params()[u, k] == 0 and spec.kept_flops()[u, k] == 0
    for b in range(2):  # the protected experts are the top-2 by calibration tokens
        top = sorted(range(6), key=lambda e: (-counts[b][e], e))[:2]
        assert sorted(top) == protected[b]

    err = np.where(spec.valid, np.nan_to_num(spec.sparsity) + 0.1, 0.0)
    err[removed] = -1.0  # removing is always best

    def evaluate(choices, *, fidelity, batch_seed):
        choices = np.asarray(choices)
        return err[np.arange(spec.num_units), choices].sum(axis=1)

    budget = Budget("params", 0.5)
    removed_count = {}
    for name, searcher in (
        ("dp", TableSearcher(tokens=8)),
        ("evopress", EvolutionarySearcher(generations=20, offspring=8, survivors=[2, 1],
                                          tokens=[8, 8])),
    ):  # fmt: skip
        result = run_search(searcher, evaluate, spec, budget, key=jax.random.key(0))
        choice = np.asarray(result.best_choice)
        gone = removed[np.arange(spec.num_units), choice]
        for b in range(2):
            kept = [u for u in experts if spec.units[u].block == b and not gone[u]]
            assert len(kept) >= 2
        achieved = CostModel.from_spec(spec, budget).achieved(choice[None])[0]
        kept = spec.kept_params()[np.arange(spec.num_units), choice].sum()
        assert achieved == pytest.approx(1 - kept / spec.numel.sum(), rel=1e-12)
        # met: the smallest levels of the attention units remove 1/8 to 1/4 of them, so
        # DP (which removes every removable expert, 1/2 of the weights) overshoots
        assert 0.5 - 1e-12 <= achieved <= 0.6
        removed_count[name] = int(gone.sum())
    assert removed_count["dp"] == 2 * 4  # DP's optimum: every removable expert


@pytest.mark.slow
def test_cli_build_search_apply_with_removal_and_router_units(tmp_path):
    """build --expert-removal --prune-router -> search (DP) -> apply -> reload on a tiny
    random Qwen3-MoE: the router is a unit and a recipe layer, the resident and streaming
    evaluators agree on a candidate that removes experts, the budget recomputes exactly
    from the recipe, every block keeps >= top_k experts, and the applied checkpoint has the
    recipe's zeros (or, when every block removes as many experts, fewer experts) and
    matches transformers."""
    import yaml
    from tiny_workspace import run_cli

    from allocsearch.config import config_from_dict
    from allocsearch.evaluate import Evaluator, KLDivergence, StreamingEvaluator
    from allocsearch.pipeline import load_workspace, open_store

    model_dir, config = tiny_moe_run(tmp_path, {"target": 0.55, "strategy": "dp"})
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    run = run_cli

    store_dir = tmp_path / "store"
    run("build", "--config", config_path, "--out", store_dir, "--no-progress",
        "--expert-removal", "--prune-router")  # fmt: skip
    run("search", "--config", config_path, "--supernet", store_dir, "--out", tmp_path / "dp",
        "--no-progress")  # fmt: skip
    recipe = Recipe.load(tmp_path / "dp" / "recipe.json")
    assert "model.layers.1.mlp.gate" in {x.name for x in recipe.layers}
    assert fraction_removed(recipe.layers, "params") == pytest.approx(
        recipe.budget.achieved, rel=1e-12
    )
    assert recipe.budget.achieved >= 0.55 - 1e-9
    removed = removed_experts(recipe)
    assert all(len(v) <= 4 - 2 for v in removed.values())

    sn = {**config["supernet"], "expert_removal": True, "prune_router": True}
    ws = load_workspace(config_from_dict({**config, "supernet": sn}))
    store = open_store(ws, store_dir)
    spec = store.spec
    assert [u.role for u in spec.units].count("router") == 2
    assert store.manifest["routing"]["expert_removal"] is True
    # the recipe's choice scored by both evaluators, with and without its removed experts
    from allocsearch.recipe.apply import choice_for_recipe

    choice = choice_for_recipe(recipe, store)
    removable = removed_levels(spec)
    kept = choice.copy()
    for u in np.flatnonzero(removable[np.arange(spec.num_units), choice]):
        kept[u] -= 1  # the expert at its sparsest pruned level instead
    choices = np.stack([choice, kept])
    resident = Evaluator(
        ws.model, spec, store.all_variants(), store.unit_params, ws.calibration,
        metric=KLDivergence(),
    )  # fmt: skip
    got = resident(choices, fidelity=32, batch_seed=0)
    streamed = StreamingEvaluator(ws.model, store, ws.calibration, metric=KLDivergence())
    np.testing.assert_allclose(got, streamed(choices, fidelity=32, batch_seed=0), rtol=1e-5)
    assert (got[0] != got[1]) == bool(removed)

    pruned = tmp_path / "pruned"
    even = len({len(removed.get(b, ())) for b in range(2)}) == 1
    run("apply", tmp_path / "dp" / "recipe.json", "--config", config_path, "--model", model_dir,
        "--supernet", store_dir, "--out", pruned, "--no-timing",
        *(() if even else ("--no-physical",)))  # fmt: skip
    ours = load_model(pruned)
    if not even or not removed:
        for entry in recipe.layers:
            w = np.asarray(ours.params[f"{entry.name}.weight"])
            assert np.mean(w == 0) == pytest.approx(entry.sparsity, abs=1e-9)
    if even:  # transformers computes what allocsearch does
        hf = transformers.Qwen3MoeForCausalLM.from_pretrained(pruned).eval()
        assert hf.config.num_local_experts == 4 - len(removed.get(0, ()))
        ids = np.random.default_rng(0).integers(0, 256, size=(2, 8))
        np.testing.assert_allclose(
            np.asarray(ours.adapter.forward(ours.params, jnp.asarray(ids))),
            hf_logits(hf, ids),
            atol=TOL,
            rtol=TOL,
        )
    if removed:
        run("export", tmp_path / "dp" / "recipe.json", "--format", "llm-compressor", "--out",
            tmp_path / "lc.yaml", code=2)  # fmt: skip


def test_router_unit_only_when_enabled_and_option_checks():
    from allocsearch.config import ConfigError, config_from_dict

    model = _tiny_model()
    plain = supernet_units(model.adapter, "unstructured")
    units = supernet_units(model.adapter, "unstructured", prune_router=True)
    assert [u.name for u in units if u.role == "router"] == ["model.layers.0.mlp.gate"]
    assert not any(u.role == "router" for u in plain) and len(units) == len(plain) + 1
    router = units[[u.name for u in units].index("model.layers.0.mlp.gate")]
    assert router.layers == ("model.layers.0.mlp.gate",) and router.numel == 4 * 16
    # the router comes before the block's experts, in forward order
    assert [u.name for u in units][4:6] == [
        "model.layers.0.mlp.gate",
        "model.layers.0.mlp.experts.0.gate_proj",
    ]
    with pytest.raises(ValueError, match="exclude each other"):
        supernet_units(model.adapter, "unstructured", expert_removal=True, tie_experts=True)
    with pytest.raises(ConfigError, match="supernet.expert_removal needs supernet.structure"):
        config_from_dict({"supernet": {"expert_removal": True, "structure": "nm"}})
    dense = _tiny_model({**QWEN3_MOE, "model_type": "qwen3"})
    with pytest.raises(ValueError, match="prune_router needs a mixture-of-experts model"):
        supernet_units(dense.adapter, "unstructured", prune_router=True)
