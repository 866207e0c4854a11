"""Mixture-of-experts families (issue 19): parity with transformers on tiny random Mixtral,
Qwen2-MoE, Qwen3-MoE and OLMoE (batch of 2, left padding, float32), routing-aware
calibration statistics checked against transformers' router, the magnitude fallback of an
expert without calibration tokens, FLOPs budgets weighted by measured routing frequencies,
and build -> search (EvoPress, DP) -> apply -> eval through the CLI."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_parity import hf_logits, randomize, saved_random, tiny_config  # noqa: E402
from tiny_workspace import quiet_build  # noqa: E402

from allocsearch.data.tokenset import TokenSet  # noqa: E402
from allocsearch.models import HFModel, adapter_for_config, load_model, save_model  # noqa: E402
from allocsearch.models.hf import fingerprint_tensors  # noqa: E402
from allocsearch.pruners import MagnitudePruner, SparseGPTPruner, WandaPruner  # noqa: E402
from allocsearch.search.budget import Budget, CostModel  # noqa: E402
from allocsearch.supernet.build import (  # noqa: E402
    NoCalibrationTokensWarning,
    supernet_units,
)
from allocsearch.supernet.experts import member_exact_grid  # noqa: E402
from allocsearch.supernet.levels import equal_step_grid  # noqa: E402

TOL = 1e-4


def _cfg(**kw):
    return tiny_config(**{"intermediate_size": 24, "head_dim": 8, "num_experts_per_tok": 2, **kw})


CASES = {
    "mixtral": lambda t: t.MixtralForCausalLM(t.MixtralConfig(**_cfg(num_local_experts=4))),
    "qwen3_moe": lambda t: t.Qwen3MoeForCausalLM(
        t.Qwen3MoeConfig(**_cfg(num_experts=4, moe_intermediate_size=16, norm_topk_prob=True))
    ),
    "qwen2_moe": lambda t: t.Qwen2MoeForCausalLM(
        t.Qwen2MoeConfig(
            **_cfg(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=20)
        )
    ),
    "olmoe": lambda t: t.OlmoeForCausalLM(
        t.OlmoeConfig(**_cfg(num_experts=4, pad_token_id=0, eos_token_id=1, bos_token_id=2))
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    model, path = saved_random(
        lambda: CASES[request.param](transformers), tmp_path_factory.mktemp(request.param) / "hf"
    )
    return request.param, model, path, load_model(path)


def test_logits_match_transformers_and_written_model_reloads(case, tmp_path):
    name, hf_model, path, ours = case
    ids = np.random.default_rng(0).integers(0, 97, size=(2, 12))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    got = np.asarray(
        jax.jit(ours.adapter.forward)(ours.params, jnp.asarray(ids), jnp.asarray(mask))
    )
    valid = mask.astype(bool)
    np.testing.assert_allclose(
        got[valid], hf_logits(hf_model, ids, mask)[valid], atol=TOL, rtol=TOL
    )
    out = save_model(ours, tmp_path / "written")
    reloaded = type(hf_model).from_pretrained(out).eval()
    np.testing.assert_allclose(
        hf_logits(reloaded, ids), hf_logits(hf_model, ids), atol=TOL, rtol=TOL
    )


def test_layers_are_checkpoint_keys(case):
    """Every prunable layer's weight is a checkpoint tensor; the router is not a layer."""
    name, hf_model, path, ours = case
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "np") as f:
        keys = set(f.keys())
    layers = ours.adapter.layers()
    assert {lay.weight_name for lay in layers} <= keys
    experts = [lay for lay in layers if ".experts." in lay.name]
    assert len(experts) == 2 * 4 * 3
    assert not any(lay.name.endswith(".gate") for lay in layers)
    mlp = "block_sparse_moe" if name == "mixtral" else "mlp"
    proj = "w1" if name == "mixtral" else "gate_proj"
    assert f"model.layers.1.{mlp}.experts.3.{proj}" in {lay.name for lay in layers}


def test_expert_taps_are_routed_inputs_weighted_by_transformers_router(tmp_path):
    """The capture taps of expert ``e`` are ``g_e x`` with ``g`` transformers' top-k routing
    weights (0 for tokens not routed to ``e``), and the routed tap counts them."""
    torch.manual_seed(0)
    hf = randomize(CASES["qwen3_moe"](transformers))
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    ad, params = ours.adapter, ours.params
    x = np.random.default_rng(1).normal(size=(2, 5, 32)).astype(np.float32)
    block = ad.module(params).model.layers[0].mlp
    taps: dict = {}
    out = block(jnp.asarray(x), taps)
    with torch.no_grad():
        hf_block = hf.model.layers[0].mlp
        ref = hf_block(torch.tensor(x)).numpy()
        _, scores, idx = hf_block.gate(torch.tensor(x).reshape(-1, 32))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    g = np.zeros((10, 4), np.float32)
    np.put_along_axis(g, idx.numpy(), scores.numpy(), axis=1)
    for e in range(4):
        want = x.reshape(-1, 32) * g[:, e : e + 1]
        got = np.asarray(taps[f"mlp.experts.{e}.gate_proj"]).reshape(-1, 32)
        np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(taps["mlp.routed"]).reshape(-1, 4), g > 0)


QWEN3_MOE = dict(
    model_type="qwen3_moe",
    vocab_size=61,
    hidden_size=16,
    intermediate_size=32,
    moe_intermediate_size=8,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    num_experts=4,
    num_experts_per_tok=2,
    norm_topk_prob=True,
)


def _tiny_model(cfg=QWEN3_MOE):
    ad = adapter_for_config(cfg)
    params = ad.init_params(jax.random.key(0))
    fp = fingerprint_tensors(cfg, {k: np.asarray(v) for k, v in params.items()})
    return HFModel(ad, params, fingerprint=fp)


@pytest.mark.slow
def test_expert_without_tokens_falls_back_to_magnitude(tmp_path):
    """Every calibration token is the same id, so every position has the same hidden state
    and is routed to the same 2 of 4 experts: the other two get no token. The build warns,
    records them, prunes their layers by magnitude (never a singular solve) and finishes;
    the routing frequencies are 1, 1, 0, 0 and weight the experts' FLOPs."""
    model = _tiny_model()
    ad = model.adapter
    calib = TokenSet(np.full((2, 8), 5, np.int32), "one token", "ids", 0)
    units = supernet_units(ad, "unstructured")
    grid = equal_step_grid([u.numel for u in units], center=0.5, step_weights=8, steps_each_side=1)
    with pytest.warns(NoCalibrationTokensWarning, match=r"expert\(s\) \[\d, \d\] of 4"):
        store = quiet_build(
            model, calib, tmp_path / "s", pruner=SparseGPTPruner(), grid=grid, batch_size=2
        )
    routing = store.manifest["routing"]
    counts = routing["counts"][0]
    assert sorted(counts) == [0, 0, 16, 16] and routing["n_tokens"] == 16
    empty = [e for e in range(4) if counts[e] == 0]
    assert routing["no_tokens"] == [f"model.layers.0.mlp.experts.{e}" for e in empty]
    spec = store.spec
    for u, unit in enumerate(spec.units):
        e = int(unit.name.split(".")[5]) if ".experts." in unit.name else None
        assert unit.routing_frequency == (1.0 if e is None else counts[e] / 16)
        if e in empty:  # magnitude variants of the dense weight, level by level
            w = model.params[f"{unit.name}.weight"]
            want = MagnitudePruner().prune(w, None, spec.sparsity[u][spec.valid[u]])
            got = store.variants(f"{unit.name}.weight")
            for k in range(spec.num_levels[u]):
                np.testing.assert_array_equal(
                    np.asarray(got.weights(w, k)), np.asarray(want.weights(w, k))
                )

    # hand-computed FLOPs per token: q and o (16x16), k and v (8x16), and the three
    # 8x16 layers of the two busy experts; the idle experts cost nothing on the
    # calibration distribution
    d, f = 16, 8
    dense = 2 * 16 * d + 2 * 8 * d + 2 * 3 * f * d
    assert dense == 1536
    np.testing.assert_allclose(spec.flops_per_token.sum(), dense)
    macs = {"q_proj": 16 * d, "k_proj": 8 * d, "v_proj": 8 * d, "o_proj": d * 16}
    choice = np.zeros(spec.num_units, np.int32)
    removed = 0.0
    for u, unit in enumerate(spec.units):
        if unit.name.endswith("q_proj") or ".experts." in unit.name:
            choice[u] = spec.num_levels[u] - 1
        s = spec.sparsity[u, choice[u]]
        if ".experts." in unit.name:
            removed += s * f * d * (counts[int(unit.name.split(".")[5])] > 0)
        else:
            removed += s * macs[unit.name.rsplit(".", 1)[1]]
    got = CostModel.from_spec(spec, Budget("flops", 0.5)).achieved(choice[None])[0]
    np.testing.assert_allclose(got, removed / dense, rtol=1e-12)


def test_tied_expert_grid_is_exact_on_every_expert():
    """The config's grid for tie_experts (pipeline.make_grid): every level removes a whole
    number of weights of each tied expert's layer, at the same step in weights as the
    untied units (the attention layers)."""
    from allocsearch.config import SupernetConfig
    from allocsearch.supernet.factory import make_grid

    model = _tiny_model()
    units = supernet_units(model.adapter, "unstructured", tie_experts=True)
    grid = make_grid(SupernetConfig(tie_experts=True, steps_each_side=2), model, target=0.47)
    for u, unit in enumerate(units):
        per_layer = unit.numel // len(unit.layers)
        removed = grid.sparsity[u][grid.valid[u]] * per_layer
        np.testing.assert_allclose(removed, np.round(removed), atol=1e-9)
    steps = np.diff(grid.sparsity[:, :2], axis=1)[:, 0] * [u.numel for u in units]
    np.testing.assert_allclose(steps, steps[0])  # one step trades as many weights everywhere


@pytest.mark.slow
def test_tied_experts_share_one_level_per_block_and_projection(tmp_path):
    model = _tiny_model()
    units = supernet_units(model.adapter, "unstructured", tie_experts=True)
    names = [u.name for u in units]
    assert names[4:] == [
        "model.layers.0.mlp.experts.gate_proj",
        "model.layers.0.mlp.experts.up_proj",
        "model.layers.0.mlp.experts.down_proj",
    ]
    assert units[4].layers == tuple(f"model.layers.0.mlp.experts.{e}.gate_proj" for e in range(4))
    grid = member_exact_grid(units, center=0.5, step_weights=16, steps_each_side=1)
    calib = TokenSet(
        np.random.default_rng(0).integers(0, 61, size=(2, 8)).astype(np.int32), "r", "ids", 0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoCalibrationTokensWarning)
        store = quiet_build(
            model,
            calib,
            tmp_path / "t",
            pruner=WandaPruner(),
            grid=grid,
            input_mode="expected",
            batch_size=2,
            tie_experts=True,
        )
    spec = store.spec
    assert spec.units[4].routing_frequency == pytest.approx(2 / 4)  # top-2 of 4
    # both evaluators score MoE candidates, identically
    from allocsearch.evaluate import Evaluator, KLDivergence, StreamingEvaluator

    rng = np.random.default_rng(0)
    choices = np.stack([rng.integers(0, n, size=3) for n in spec.num_levels], 1).astype(np.int32)
    resident = Evaluator(
        model, spec, store.all_variants(), store.unit_params, calib, metric=KLDivergence()
    )(choices, fidelity=16, batch_seed=0)
    streamed = StreamingEvaluator(model, store, calib, metric=KLDivergence())(
        choices, fidelity=16, batch_seed=0
    )
    np.testing.assert_allclose(resident, streamed, rtol=1e-5, atol=1e-7)
    assert np.all(resident > 0)
    for k in range(spec.num_levels[4]):  # every expert at the unit's exact sparsity
        for e in range(4):
            v = store.variants(f"model.layers.0.mlp.experts.{e}.gate_proj.weight")
            assert v.sparsity[k] == spec.sparsity[4, k]


def tiny_moe_run(tmp_path, search: dict) -> tuple:
    """(model directory, run config) of the CLI tests: a 2-block random Qwen3-MoE with a
    byte vocabulary and a text corpus written under ``tmp_path``; local backend."""
    from tiny_workspace import cli_config, write_model_and_corpus

    cfg = {**QWEN3_MOE, "vocab_size": 256, "num_hidden_layers": 2, "max_position_embeddings": 64}
    model_dir, corpus = write_model_and_corpus(tmp_path, cfg, docs=2, words_per_doc=300)
    config = cli_config(
        model_dir,
        corpus,
        seq_len=16,
        calibration_seqs=4,
        heldout_seqs=2,
        supernet={"pruner": "wanda", "center": 0.5, "steps_each_side": 1, "step_fraction": 0.1},
        search=search,
        backend={"kind": "local"},
    )
    return model_dir, config


@pytest.mark.slow
def test_cli_build_search_apply_eval(tmp_path):
    """build -> search (EvoPress on params, DP on routing-weighted FLOPs) -> apply -> eval
    on a tiny random Qwen3-MoE: budgets recompute exactly from the recipe, per-expert zero
    fractions equal the recipe, transformers loads the pruned checkpoint and agrees with
    the pruned model, and the llm-compressor export targets per-expert modules."""
    import yaml
    from tiny_workspace import run_cli

    from allocsearch.recipe.recipe import Recipe, fraction_removed

    search = {
        "target": 0.5,
        "strategy": "evopress",
        "settings": {"generations": 1, "offspring": 4, "survivors": [2, 1], "tokens": [32, 64]},
    }
    model_dir, config = tiny_moe_run(tmp_path, search)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    run = run_cli

    store = tmp_path / "store"
    run("build", "--config", config_path, "--out", store, "--no-progress")
    run("search", "--config", config_path, "--supernet", store, "--out", tmp_path / "evo",
        "--no-progress")  # fmt: skip
    config["search"] = {"target": 0.45, "strategy": "dp", "budget_kind": "flops"}
    config_path.write_text(yaml.safe_dump(config))
    run("search", "--config", config_path, "--supernet", store, "--out", tmp_path / "dp",
        "--no-progress")  # fmt: skip
    for out, kind, target in [("evo", "params", 0.5), ("dp", "flops", 0.45)]:
        recipe = Recipe.load(tmp_path / out / "recipe.json")
        assert recipe.budget.kind == kind
        assert fraction_removed(recipe.layers, kind) == pytest.approx(
            recipe.budget.achieved, rel=1e-12
        )
        # EvoPress's equal-step swaps keep the uniform cost; DP may overshoot on coarse levels
        assert target - 0.01 < recipe.budget.achieved < target + (0.01 if out == "evo" else 0.05)
        assert recipe.budget.achieved >= target - 0.01
        experts = [x for x in recipe.layers if ".experts." in x.name]
        assert len(experts) == 2 * 4 * 3
        freq = {x.name: x.routing_frequency for x in experts}
        for b in range(2):  # top-2 routing: the frequencies of a block sum to 2
            got = sum(v for k, v in freq.items() if k.startswith(f"model.layers.{b}.mlp.experts"))
            assert got == pytest.approx(2 * 3)  # three layers per expert
    recipe = Recipe.load(tmp_path / "dp" / "recipe.json")
    pruned = tmp_path / "pruned"
    run("apply", tmp_path / "dp" / "recipe.json", "--config", config_path, "--model", model_dir,
        "--supernet", store, "--out", pruned)  # fmt: skip
    ours = load_model(pruned)
    for entry in recipe.layers:
        w = np.asarray(ours.params[f"{entry.name}.weight"])
        assert np.mean(w == 0) == pytest.approx(entry.sparsity, abs=1e-9)
    hf = transformers.Qwen3MoeForCausalLM.from_pretrained(pruned).eval()
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 8))
    np.testing.assert_allclose(
        np.asarray(ours.adapter.forward(ours.params, jnp.asarray(ids))),
        hf_logits(hf, ids),
        atol=TOL,
        rtol=TOL,
    )
    r = run("eval", "--config", config_path, "--model", pruned)
    assert "perplexity" in r.output
    run("export", tmp_path / "dp" / "recipe.json", "--format", "llm-compressor", "--out",
        tmp_path / "lc.yaml")  # fmt: skip
    lc = yaml.safe_load((tmp_path / "lc.yaml").read_text())
    mods = lc["sparsity_stage"]["sparsity_modifiers"]
    targets = next(iter(mods.values()))["targets"]
    expert0 = [t for t in targets if "layers\\.0\\.mlp\\.experts\\.0\\." in t]
    assert [t.rsplit(".", 1)[-1] for t in expert0] == [
        p for p in ("up_proj$", "gate_proj$", "down_proj$") if any(t.endswith(p) for t in expert0)
    ]
