"""Block-streamed forwards of host-resident (lazily loaded) models: the same numbers as the
whole-model forward, and a supernet built from a lazy model equals one built from a model
on the device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allocsearch.data.tokenset import TokenSet
from allocsearch.evaluate.metrics import next_token_nll
from allocsearch.models import HFModel, adapter_for_config, load_model, save_model
from allocsearch.models.hf import LazyParams
from allocsearch.models.streamed import streamed_nll_sum
from allocsearch.pipeline import heldout_perplexity
from allocsearch.pruners import SparseGPTPruner
from allocsearch.supernet.build import build_supernet, supernet_units
from allocsearch.supernet.levels import equal_step_grid

CFG = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    adapter = adapter_for_config(CFG)
    path = tmp_path_factory.mktemp("lazy") / "model"
    save_model(HFModel(adapter, adapter.init_params(jax.random.key(3))), path)
    return path


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 64, size=(7, 10)).astype(np.int32)


def test_streamed_nll_equals_the_whole_model_forward(saved, tokens):
    """7 sequences in batches of 3 (the last padded with weight 0): the NLL sum equals
    the one-program forward's to float rounding, from eager and from lazy parameters."""
    eager = load_model(saved)
    lazy = load_model(saved, lazy=True)
    assert isinstance(lazy.params, LazyParams)
    logits = eager.adapter.forward(eager.params, jnp.asarray(tokens))
    want = float(jnp.sum(next_token_nll(logits, jnp.asarray(tokens))))
    for model in (eager, lazy):
        got = streamed_nll_sum(model.adapter, model.params, tokens, batch_rows=3)
        assert got == pytest.approx(want, rel=1e-6)
    heldout = TokenSet(tokens=tokens, source="ids", tokenizer_identity="ids", seed=None)
    ppl = heldout_perplexity(lazy, heldout, batch_rows=4)
    assert ppl == pytest.approx(np.exp(want / (7 * 9)), rel=1e-6)


def test_supernet_built_from_a_lazy_model_equals_the_eager_build(saved, tmp_path):
    eager = load_model(saved)
    lazy = load_model(saved, lazy=True)
    assert lazy.fingerprint == eager.fingerprint
    calib = TokenSet(
        tokens=np.random.default_rng(1).integers(0, 64, size=(6, 12)).astype(np.int32),
        source="ids",
        tokenizer_identity="ids",
        seed=1,
    )
    numel = [u.numel for u in supernet_units(eager.adapter, "unstructured")]
    grid = equal_step_grid(numel, center=0.5, step_weights=32, steps_each_side=2)
    stores = [
        build_supernet(
            m,
            calib,
            pruner=SparseGPTPruner(blocksize=8),
            grid=grid,
            structure="unstructured",
            input_mode="expected",
            out_dir=tmp_path / name,
            batch_size=4,
            progress=False,
        )
        for name, m in (("eager", eager), ("lazy", lazy))
    ]
    a, b = stores
    np.testing.assert_array_equal(a.spec.sparsity, b.spec.sparsity)
    for name in a.param_names:
        np.testing.assert_array_equal(
            np.asarray(a.variants(name).weights), np.asarray(b.variants(name).weights)
        )
