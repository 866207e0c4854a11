"""The bundled demo model: loads as a Llama, beats a bigram model, and its held-out
perplexity computed by allocsearch equals transformers' (the trusted implementation)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from allocsearch import pipeline
from allocsearch.assets_paths import demo_model_dir
from allocsearch.data.demo_corpus import demo_tokensets
from allocsearch.models import load_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def heldout():
    return demo_tokensets(256, 4, 0, n_heldout_seqs=8)[1]


def test_demo_model_is_a_small_gqa_llama():
    model = load_model(demo_model_dir())
    cfg = model.adapter.cfg
    assert model.adapter.model_type == "llama" and cfg.vocab_size == 256
    assert cfg.num_hidden_layers >= 6 and cfg.num_key_value_heads < cfg.num_attention_heads
    assert 4_000_000 <= model.adapter.num_params() <= 10_000_000
    info = json.loads((demo_model_dir() / "training.json").read_text())
    assert info["heldout_bits_per_byte"] < info["bigram_heldout_bits_per_byte"] - 1.0


def test_heldout_perplexity_matches_transformers(heldout):
    ours = pipeline.heldout_perplexity(load_model(demo_model_dir()), heldout)
    hf = transformers.LlamaForCausalLM.from_pretrained(demo_model_dir(), dtype=torch.float32)
    hf.eval()
    ids = torch.tensor(np.asarray(heldout.tokens), dtype=torch.long)
    with torch.no_grad():
        logits = hf(ids).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).mean().item()
    ref = float(np.exp(nll))
    assert ours == pytest.approx(ref, rel=1e-3)
    assert ours < 2**3.0  # clearly better than the 3.57 bits/byte bigram baseline
