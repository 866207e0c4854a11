"""Parity of the JAX model families with Hugging Face transformers (the trusted
implementation) on tiny random configs: load what transformers saved, compare outputs,
write it back and load it in transformers again."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_parity import randomize, saved_random, tiny_config  # noqa: E402

from allocsearch.models import load_model, mean_pool, save_model  # noqa: E402

TOL = 1e-4


def _llama_cfg(**kw):
    return tiny_config(**kw)


CAUSAL_CASES = {
    "llama_gqa_rope3": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            **_llama_cfg(
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                },
                rope_theta=500000.0,
            )
        )
    ),
    "llama_tied_linear_rope": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            **_llama_cfg(
                tie_word_embeddings=True,
                num_key_value_heads=4,
                rope_scaling={"rope_type": "linear", "factor": 2.0},
            )
        )
    ),
    "qwen2_bias": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(**_llama_cfg(tie_word_embeddings=True))
    ),
    "mistral": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(**_llama_cfg(sliding_window=8, head_dim=16))
    ),
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    ),
    # an untied head must be loaded and written back, not replaced by wte
    "gpt2_untied_head": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=False
        )
    ),
    "gpt2_unscaled_attn": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4, scale_attn_weights=False
        )
    ),
}


def _saved(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module", params=sorted(CAUSAL_CASES))
def causal_case(request, tmp_path_factory):
    model, path = saved_random(
        CAUSAL_CASES[request.param], tmp_path_factory.mktemp(request.param) / "hf"
    )
    return request.param, model, path


def _ids(vocab, b=2, t=12, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(b, t))


def test_causal_logits_match_transformers(causal_case):
    name, hf_model, path = causal_case
    ours = load_model(path)
    ids = _ids(hf_model.config.vocab_size, t=12)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(
        jax.jit(ours.adapter.forward)(ours.params, jnp.asarray(ids), jnp.asarray(mask))
    )
    # Padded query positions are meaningless in either implementation.
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], ref[valid], atol=TOL, rtol=TOL)


def test_causal_written_model_loads_in_transformers(causal_case, tmp_path):
    name, hf_model, path = causal_case
    ours = load_model(path)
    out = save_model(ours, tmp_path / "written")
    reloaded = type(hf_model).from_pretrained(out).eval()
    ids = torch.tensor(_ids(hf_model.config.vocab_size, seed=1))
    with torch.no_grad():
        np.testing.assert_allclose(
            reloaded(ids).logits.numpy(), hf_model(ids).logits.numpy(), atol=TOL, rtol=TOL
        )
    again = load_model(out)
    for k, v in ours.params.items():
        np.testing.assert_array_equal(np.asarray(again.params[k]), np.asarray(v))


def test_layer_names_match_named_modules(causal_case):
    name, hf_model, path = causal_case
    ours = load_model(path)
    linear_types = (torch.nn.Linear, transformers.pytorch_utils.Conv1D)
    hf_names = [
        n for n, m in hf_model.named_modules() if isinstance(m, linear_types) and n != "lm_head"
    ]
    layers = ours.adapter.layers()
    assert [layer.name for layer in layers] == hf_names
    modules = dict(hf_model.named_modules())
    for layer in layers:
        w = modules[layer.name].weight
        shape = (
            tuple(w.shape)
            if isinstance(modules[layer.name], torch.nn.Linear)
            else tuple(w.shape[::-1])
        )
        assert layer.shape == shape
        assert layer.flops_per_token == layer.numel


BERT = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def bert_case(tmp_path_factory):
    cfg = transformers.BertConfig(**BERT)
    model = randomize(transformers.BertModel(cfg))
    path = _saved(model, tmp_path_factory.mktemp("bert") / "hf")
    return model, path


def test_bert_hidden_and_pooled_match(bert_case):
    hf_model, path = bert_case
    ours = load_model(path)
    ids = _ids(97, t=10)
    mask = np.ones_like(ids)
    mask[0, 7:] = 0
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    ref = ref.numpy()
    got = np.asarray(ours.adapter.forward(ours.params, jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], ref[valid], atol=TOL, rtol=TOL)
    # sentence-transformers mean pooling, computed by hand from the reference states
    m = mask[..., None].astype(np.float32)
    ref_pooled = (ref * m).sum(1) / m.sum(1)
    np.testing.assert_allclose(
        np.asarray(mean_pool(jnp.asarray(got), jnp.asarray(mask))), ref_pooled, atol=TOL
    )


def test_bert_names_and_roundtrip(bert_case, tmp_path):
    hf_model, path = bert_case
    ours = load_model(path)
    hf_names = [
        n
        for n, m in hf_model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.startswith("pooler")
    ]
    assert [layer.name for layer in ours.adapter.layers()] == hf_names
    out = save_model(ours, tmp_path / "written")
    reloaded = transformers.BertModel.from_pretrained(out).eval()
    ids = torch.tensor(_ids(97, seed=2))
    with torch.no_grad():
        a = reloaded(ids)
        b = hf_model(ids)
    np.testing.assert_allclose(a.last_hidden_state.numpy(), b.last_hidden_state.numpy(), atol=TOL)
    # the pooler is not used by the forward but survives the round trip
    np.testing.assert_allclose(a.pooler_output.numpy(), b.pooler_output.numpy(), atol=TOL)


def test_block_wise_forward_equals_full_forward(causal_case):
    name, hf_model, path = causal_case
    ours = load_model(path)
    ad = ours.adapter
    ids = jnp.asarray(_ids(hf_model.config.vocab_size))
    h, ctx = ad.embed(ours.params, ids)
    block = jax.jit(ad.block)
    for i in range(ad.num_blocks):
        h = block(ad.block_params(ours.params, i), h, ctx)
    np.testing.assert_allclose(
        np.asarray(ad.finish(ours.params, h, ctx)),
        np.asarray(ad.forward(ours.params, ids)),
        atol=1e-5,
    )
    assert block._cache_size() == 1  # one compiled block serves every block


def test_bert_token_type_ids_match(bert_case):
    hf_model, path = bert_case
    ours = load_model(path)
    ids = _ids(97, t=10, seed=3)
    types = np.zeros_like(ids)
    types[:, 4:] = 1  # sentence pairs: the second segment from position 4
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        ref = hf_model(
            torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types)
        ).last_hidden_state.numpy()
    got = np.asarray(
        jax.jit(ours.adapter.forward)(
            ours.params, jnp.asarray(ids), jnp.asarray(mask), token_type_ids=jnp.asarray(types)
        )
    )
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], ref[valid], atol=TOL, rtol=TOL)
    plain = np.asarray(ours.adapter.forward(ours.params, jnp.asarray(ids), jnp.asarray(mask)))
    assert not np.allclose(plain[valid], ref[valid], atol=1e-3)  # the types do matter


def _task_models():
    bert = transformers.BertConfig(**BERT, num_labels=2)
    gpt2 = transformers.GPT2Config(
        vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4, num_labels=2
    )
    return {
        "bert_seq_cls": lambda: transformers.BertForSequenceClassification(bert),
        "bert_qa": lambda: transformers.BertForQuestionAnswering(bert),
        "gpt2_seq_cls": lambda: transformers.GPT2ForSequenceClassification(gpt2),
    }


@pytest.mark.parametrize("name", ["bert_seq_cls", "bert_qa", "gpt2_seq_cls"])
def test_task_model_keeps_its_head(name, tmp_path):
    """A checkpoint that is not the bare model loads with its head as a non-prunable
    extra; the body agrees with transformers and the written copy is the same task model."""
    hf_model = randomize(_task_models()[name]())
    path = _saved(hf_model, tmp_path / "hf")
    ours = load_model(path)
    assert ours.extras, "the head must be kept"
    assert all(not k.startswith(("bert.", "classifier", "score", "qa_")) for k in ours.params)
    prunable = {layer.weight_name for layer in ours.adapter.layers(include_head=True)}
    assert not prunable & set(ours.extras)
    ids = _ids(97, b=1, t=8, seed=4)
    body = hf_model.bert if name.startswith("bert") else hf_model.transformer
    with torch.no_grad():
        ref_hidden = body(torch.tensor(ids)).last_hidden_state.numpy()
        ref_out = hf_model(torch.tensor(ids))
    if name.startswith("bert"):
        got = np.asarray(ours.adapter.forward(ours.params, jnp.asarray(ids)))
        np.testing.assert_allclose(got, ref_hidden, atol=TOL, rtol=TOL)
    out = save_model(ours, tmp_path / "written")
    reloaded = type(hf_model).from_pretrained(out).eval()
    with torch.no_grad():
        again = reloaded(torch.tensor(ids))
    for key in ("logits", "start_logits", "end_logits"):
        if key in ref_out:
            np.testing.assert_allclose(again[key].numpy(), ref_out[key].numpy(), atol=TOL, rtol=TOL)


def test_unknown_task_architecture_is_refused():
    from allocsearch.models import adapter_for_config

    cfg = {"model_type": "bert", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1}
    cfg.update(num_attention_heads=2, intermediate_size=8, architectures=["BertForFoo"])
    with pytest.raises(ValueError, match="BERT architecture 'BertForFoo' is not supported"):
        adapter_for_config(cfg)
