"""Parity of the Llama-architecture variants and rope types with Hugging Face transformers
(the trusted implementation) on tiny random configs: batch of 2 with left padding,
sequences longer than every sliding window and past the rope types' context limits;
written checkpoints load in transformers; layer names equal ``named_modules()``."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_parity import hf_logits, saved_random, tiny_config  # noqa: E402

from allocsearch.models import load_model, save_model  # noqa: E402

TOL = 1e-4
T = 12  # > every sliding window (4) and every original context (8) below


def _cfg(**kw):
    return tiny_config(**{"head_dim": 8, **kw})


def _gemma_extra(**kw):
    base = dict(query_pre_attn_scalar=16, sliding_window=4, tie_word_embeddings=True)
    base.update(kw)
    return base


CASES = {
    "qwen3": lambda t: t.Qwen3ForCausalLM(t.Qwen3Config(**_cfg(attention_bias=True))),
    "qwen3_sliding": lambda t: t.Qwen3ForCausalLM(
        t.Qwen3Config(**_cfg(use_sliding_window=True, sliding_window=4, max_window_layers=1))
    ),
    "qwen2_sliding": lambda t: t.Qwen2ForCausalLM(
        t.Qwen2Config(**_cfg(use_sliding_window=True, sliding_window=4, max_window_layers=1))
    ),
    "olmo2": lambda t: t.Olmo2ForCausalLM(t.Olmo2Config(**_cfg(attention_bias=True))),
    "granite": lambda t: t.GraniteForCausalLM(
        t.GraniteConfig(
            **_cfg(
                embedding_multiplier=3.0,
                residual_multiplier=0.5,
                attention_multiplier=0.2,
                logits_scaling=4.0,
                mlp_bias=True,
                attention_bias=True,
            )
        )
    ),
    "gemma": lambda t: t.GemmaForCausalLM(t.GemmaConfig(**_cfg(tie_word_embeddings=True))),
    "gemma2": lambda t: t.Gemma2ForCausalLM(
        t.Gemma2Config(
            **_cfg(**_gemma_extra(attn_logit_softcapping=5.0, final_logit_softcapping=3.0))
        )
    ),
    "gemma3_text": lambda t: t.Gemma3ForCausalLM(
        t.Gemma3TextConfig(
            **_cfg(
                **_gemma_extra(
                    layer_types=["sliding_attention", "full_attention"],
                    rope_parameters={
                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                        "full_attention": {
                            "rope_type": "linear",
                            "factor": 4.0,
                            "rope_theta": 1000000.0,
                        },
                    },
                    final_logit_softcapping=3.0,
                )
            )
        )
    ),
    "phi3_longrope_sliding": lambda t: t.Phi3ForCausalLM(
        t.Phi3Config(
            **_cfg(
                max_position_embeddings=32,
                original_max_position_embeddings=8,
                sliding_window=4,
                pad_token_id=0,
                eos_token_id=1,
                bos_token_id=2,
                rope_parameters={
                    "rope_type": "longrope",
                    "short_factor": [1.0, 1.5, 2.0, 3.0],
                    "long_factor": [2.0, 3.0, 5.0, 7.0],
                    "rope_theta": 10000.0,
                },
            )
        )
    ),
    "llama_yarn": lambda t: t.LlamaForCausalLM(
        t.LlamaConfig(
            **_cfg(
                rope_parameters={
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 8,
                    "rope_theta": 10000.0,
                }
            )
        )
    ),
    "llama_dynamic": lambda t: t.LlamaForCausalLM(
        t.LlamaConfig(
            **_cfg(
                max_position_embeddings=8,
                rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
            )
        )
    ),
    "llama_longrope": lambda t: t.LlamaForCausalLM(
        t.LlamaConfig(
            **_cfg(
                max_position_embeddings=32,
                rope_parameters={
                    "rope_type": "longrope",
                    "short_factor": [1.0, 1.5, 2.0, 3.0],
                    "long_factor": [2.0, 3.0, 5.0, 7.0],
                    "original_max_position_embeddings": 8,
                    "rope_theta": 10000.0,
                },
            )
        )
    ),
}


def _ids(vocab, b=2, t=T, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(b, t))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    model, path = saved_random(
        lambda: CASES[request.param](transformers), tmp_path_factory.mktemp(request.param) / "hf"
    )
    return request.param, model, path, load_model(path)


def test_logits_match_transformers(case):
    name, hf_model, path, ours = case
    ids = _ids(hf_model.config.vocab_size)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    ref = hf_logits(hf_model, ids, mask)
    got = np.asarray(
        jax.jit(ours.adapter.forward)(ours.params, jnp.asarray(ids), jnp.asarray(mask))
    )
    valid = mask.astype(bool)  # padded query positions are meaningless either way
    np.testing.assert_allclose(got[valid], ref[valid], atol=TOL, rtol=TOL)
    if name in ("llama_longrope", "llama_dynamic", "phi3_longrope_sliding"):
        # below the original context the other set of frequencies applies
        short = ids[:, :6]
        np.testing.assert_allclose(
            np.asarray(ours.adapter.forward(ours.params, jnp.asarray(short))),
            hf_logits(hf_model, short),
            atol=TOL,
            rtol=TOL,
        )


def test_written_model_loads_in_transformers(case, tmp_path):
    name, hf_model, path, ours = case
    out = save_model(ours, tmp_path / "written")
    reloaded = type(hf_model).from_pretrained(out).eval()
    ids = _ids(hf_model.config.vocab_size, seed=1)
    np.testing.assert_allclose(
        hf_logits(reloaded, ids), hf_logits(hf_model, ids), atol=TOL, rtol=TOL
    )
    again = load_model(out)
    assert set(again.params) == set(ours.params)
    for k, v in ours.params.items():
        np.testing.assert_array_equal(np.asarray(again.params[k]), np.asarray(v))


def test_layer_names_match_named_modules(case):
    name, hf_model, path, ours = case
    hf_names = [
        n for n, m in hf_model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
    ]
    layers = ours.adapter.layers()
    names = [layer.name for layer in layers]
    if name.startswith("phi3"):  # ours in forward order: qkv_proj before o_proj
        assert sorted(names) == sorted(hf_names)
    else:
        assert names == hf_names
    modules = dict(hf_model.named_modules())
    for layer in layers:
        assert layer.shape == tuple(modules[layer.name].weight.shape)
    # every checkpoint tensor is a parameter, and the only extra parameters are the
    # per-block constants the adapter creates
    hf_tensors = set(hf_model.state_dict())
    if hf_model.config.tie_word_embeddings:
        hf_tensors.discard("lm_head.weight")
    consts = set(ours.adapter.constant_params())
    assert set(ours.params) - consts == {
        k for k in hf_tensors if not k.endswith("inv_freq") and "embed_scale" not in k
    }


def test_per_layer_attention_types_are_data():
    """Gemma 2 alternates sliding and full attention: the blocks differ only in the
    ``layer_type_id`` constant, and one compiled block runs both kinds."""
    cfg = transformers.Gemma2Config(**_cfg(**_gemma_extra()))
    from allocsearch.models import adapter_for_config

    ad = adapter_for_config(cfg.to_dict())
    consts = ad.constant_params()
    assert {k: float(v) for k, v in consts.items()} == {
        "model.layers.0.layer_type_id": 1.0,  # sliding_attention (index 1)
        "model.layers.1.layer_type_id": 0.0,  # full_attention
    }
    assert ad.cfg.attention_types == ("full_attention", "sliding_attention")
    assert ad.cfg.windows == (None, 4)
    params = ad.init_params(jax.random.key(0))
    assert {k: float(params[k]) for k in consts} == {k: float(v) for k, v in consts.items()}
    assert ad.num_params() == sum(
        int(np.prod(v.shape)) for k, v in params.items() if k not in consts
    )
    ids = jnp.asarray(_ids(97))
    h, ctx = ad.embed(params, ids)
    block = jax.jit(ad.block)
    for i in range(ad.num_blocks):
        h = block(ad.block_params(params, i), h, ctx)
    np.testing.assert_allclose(
        np.asarray(ad.finish(params, h, ctx)), np.asarray(ad.forward(params, ids)), atol=1e-5
    )
    assert block._cache_size() == 1
    # the sliding block really differs from the full one: swapping the constant changes it
    p0 = ad.block_params(params, 0)
    h0, ctx0 = ad.embed(params, ids)
    swapped = {**p0, "layer_type_id": jnp.asarray(0.0)}
    assert not np.allclose(np.asarray(block(p0, h0, ctx0)), np.asarray(block(swapped, h0, ctx0)))


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"rope_parameters": {"rope_type": "su", "rope_theta": 1.0}}, "rope type 'su'"),
        (
            {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
            "partial_rotary_factor",
        ),
        ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "bidirectional"),
        ({"hidden_act": "relu"}, "hidden_act 'relu'"),
    ],
)
def test_unsupported_configs_are_refused(cfg, message):
    from allocsearch.models import adapter_for_config

    base = {"model_type": "llama", **_cfg(), **cfg}
    with pytest.raises(ValueError, match=message):
        adapter_for_config(base)


def test_evaluator_scores_gemma2_like_a_materialized_forward():
    """The evaluator's one compiled loop gathers each block's ``layer_type_id`` with its
    weights: its KL scores on a tiny Gemma 2 (sliding and full layers, sequences longer
    than the window) equal those of the materialized model's plain forward."""
    from allocsearch.data.tokenset import TokenSet, minibatch
    from allocsearch.evaluate import Evaluator, KLDivergence
    from allocsearch.models import HFModel, adapter_for_config
    from allocsearch.pruners import MagnitudePruner
    from allocsearch.supernet.spec import SupernetSpec, Unit

    cfg = transformers.Gemma2Config(
        **_cfg(**_gemma_extra(num_hidden_layers=3, attn_logit_softcapping=5.0))
    ).to_dict()
    adapter = adapter_for_config(cfg)
    params = adapter.init_params(jax.random.key(0))
    levels = np.array([0.0, 0.25, 0.5, 0.75])
    layers = adapter.layers()
    variants = {
        lay.weight_name: MagnitudePruner().prune(params[lay.weight_name], None, levels)
        for lay in layers
    }
    units = tuple(
        Unit(lay.name, lay.role, lay.block, (lay.name,), lay.numel, lay.numel) for lay in layers
    )
    n = len(units)
    spec = SupernetSpec(units, np.tile(levels, (n, 1)), np.ones((n, 4), bool), np.full(n, 2))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 97, size=(8, 16)).astype(np.int32)
    calibration = TokenSet(tokens, "random ids", "ids", 0)
    evaluator = Evaluator(
        HFModel(adapter, params),
        spec,
        variants,
        [(lay.weight_name,) for lay in layers],
        calibration,
        metric=KLDivergence(),
        micro_batch_tokens=64,
        auto_reference=False,
    )
    choices = rng.integers(0, 4, size=(3, n)).astype(np.int32)
    scores = evaluator(choices, fidelity=64, batch_seed=0)
    batch = jnp.asarray(minibatch(calibration, 64, 0))
    forward = jax.jit(adapter.forward)
    teacher = jax.nn.log_softmax(forward(params, batch), axis=-1)
    for choice, score in zip(choices, scores, strict=True):
        student = jax.nn.log_softmax(forward(evaluator.materialize(choice), batch), axis=-1)
        want = float((jnp.exp(teacher) * (teacher - student)).sum(-1).mean())
        assert score == pytest.approx(want, rel=2e-5, abs=1e-7)
    assert scores[0] > 0


# ------------------------------------------------------------------ CLI end to end

E2E_BASE = {
    "vocab_size": 256,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
E2E_CASES = {
    "qwen3": {"model_type": "qwen3"},
    "olmo2": {"model_type": "olmo2"},
    "granite": {"model_type": "granite", "embedding_multiplier": 2.0, "logits_scaling": 2.0},
    "gemma2": {
        "model_type": "gemma2",
        "sliding_window": 8,
        "query_pre_attn_scalar": 8,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "gemma3_text": {
        "model_type": "gemma3_text",
        "sliding_window": 8,
        "query_pre_attn_scalar": 8,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "phi3": {"model_type": "phi3", "sliding_window": 8, "head_dim": None},
}


# CI runs three of these (about a minute each on 2 cores); ALLOCSEARCH_ALL_FAMILIES_E2E=1
# runs every family and structure (all passed when they were added).
_E2E_IN_CI = {("qwen3", "unstructured"), ("gemma2", "heads_neurons"), ("granite", "unstructured")}
_E2E_ALL = os.environ.get("ALLOCSEARCH_ALL_FAMILIES_E2E") == "1"


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, structure",
    [
        pytest.param(
            f,
            s,
            marks=pytest.mark.skipif(
                not _E2E_ALL and (f, s) not in _E2E_IN_CI,
                reason="set ALLOCSEARCH_ALL_FAMILIES_E2E=1 to run every family end to end",
            ),
        )
        for f, s in [(f, "unstructured") for f in sorted(E2E_CASES)]
        + [("qwen3", "heads_neurons"), ("gemma2", "heads_neurons"), ("olmo2", "heads_neurons")]
        + [("phi3", "heads_neurons"), ("qwen3", "heads_neurons:query_head")]
    ],
)
def test_cli_build_search_apply_eval(family, structure, tmp_path):
    """build -> search -> apply -> eval through the CLI on a tiny random model of each
    family; the applied model's per-layer zero fraction equals the recipe."""
    import yaml
    from tiny_workspace import run_cli, write_model_and_corpus

    from allocsearch.recipe.recipe import Recipe

    structure, _, granularity = structure.partition(":")
    cfg = {k: v for k, v in {**E2E_BASE, **E2E_CASES[family]}.items() if v is not None}
    _, corpus = write_model_and_corpus(tmp_path, cfg, docs=2, words_per_doc=400)
    config = {
        "model": str(tmp_path / "model"),
        "data": {
            "calibration": str(corpus),
            "seq_len": 16,
            "n_calibration_seqs": 8,
            "n_heldout_seqs": 2,
        },
        "supernet": {
            "pruner": "magnitude" if structure == "unstructured" else "sparsegpt",
            "structure": structure,
            "center": 0.5 if structure == "unstructured" else 0.25,
            "steps_each_side": 1,
            "step_fraction": 0.1 if structure == "unstructured" else 0.25,
            **({"head_granularity": granularity} if granularity else {}),
        },
        "search": {
            "target": 0.5 if structure == "unstructured" else 0.25,
            "strategy": "evopress",
            "settings": {"generations": 2, "offspring": 4, "survivors": [2, 1], "tokens": [32, 64]},
        },
        "backend": {"kind": "local"},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = run_cli

    config_path = tmp_path / "config.yaml"
    store, out = tmp_path / "store", tmp_path / "run"
    run("build", "--config", config_path, "--out", store, "--no-progress")
    run("search", "--config", config_path, "--supernet", store, "--out", out, "--no-progress")
    recipe = Recipe.load(out / "recipe.json")
    pruned = tmp_path / "pruned"
    run(
        "apply", out / "recipe.json", "--config", config_path, "--model", tmp_path / "model",
        "--supernet", store, "--out", pruned,
    )  # fmt: skip
    model = load_model(pruned)
    if structure == "unstructured":
        for entry in recipe.layers:
            w = np.asarray(model.params[f"{entry.name}.weight"])
            assert np.mean(w == 0) == pytest.approx(entry.sparsity, abs=1e-9)
    elif granularity == "query_head":  # units count query heads, levels one head apart
        heads = [u for u in recipe.units if u.kind == "heads"]
        assert {u.total for u in heads} == {cfg["num_attention_heads"]}
    r = run("eval", "--config", config_path, "--model", pruned)
    assert "perplexity" in r.output


@pytest.mark.parametrize(
    "model_type, legacy",
    [
        (
            "gemma3_text",
            dict(
                rope_theta=1_000_000.0,
                rope_local_base_freq=10_000.0,
                rope_scaling={"rope_type": "linear", "factor": 8.0},
                sliding_window=4,
                sliding_window_pattern=3,
                num_hidden_layers=6,
            ),
        ),
        (
            "qwen2",
            dict(use_sliding_window=True, sliding_window=4, max_window_layers=1, rope_theta=5e5),
        ),
        (
            "phi3",
            dict(
                rope_scaling={
                    "type": "su",
                    "short_factor": [1.0] * 4,
                    "long_factor": [2.0] * 4,
                    "original_max_position_embeddings": 8,
                },
                original_max_position_embeddings=8,
                max_position_embeddings=32,
            ),
        ),
    ],
)
def test_legacy_configs_read_as_transformers_reads_them(model_type, legacy):
    """Configs written by older transformers (no ``layer_types``, ``rope_scaling``,
    ``rope_local_base_freq``, ``sliding_window_pattern``) give the attention types and
    ropes transformers 5 derives from them."""
    from allocsearch.models import adapter_for_config

    raw = {"model_type": model_type, **_cfg(), **legacy}
    cls = transformers.AutoConfig.for_model(model_type).__class__
    normalized = cls(**{k: v for k, v in raw.items() if k != "model_type"}).to_dict()
    ours, theirs = adapter_for_config(raw).cfg, adapter_for_config(normalized).cfg
    assert ours.layer_type_ids == theirs.layer_type_ids
    assert ours.windows == theirs.windows
    assert [(r.rope_type, r.theta) for r in ours.ropes] == [
        (r.rope_type, r.theta) for r in theirs.ropes
    ]
    for a, b in zip(ours.ropes, theirs.ropes, strict=True):
        np.testing.assert_allclose(a.inv_freq(T)[0], b.inv_freq(T)[0], rtol=1e-6)
