"""Files the CLI end-to-end tests start from: a random model directory and a word corpus."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from allocsearch.models import HFModel, adapter_for_config, load_model, save_model

TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
}
"""config.json of the 2-block Llama the CLI tests build (copy it before changing it)."""

WORDS = ["alpha", "beta", "gamma", "delta", "pruning", "sparse", "layer", "budget"]


def write_model_and_corpus(
    root: Path, hf_config: dict, *, docs: int, words_per_doc: int
) -> tuple[Path, Path]:
    """``root/model`` (random weights of ``hf_config``, seed 0) and ``root/corpus`` (``docs``
    text files of ``words_per_doc`` words drawn from :data:`WORDS`, seed 0)."""
    adapter = adapter_for_config(hf_config)
    save_model(HFModel(adapter, adapter.init_params(jax.random.key(0))), root / "model")
    return root / "model", write_corpus(root / "corpus", docs=docs, words_per_doc=words_per_doc)


def cli_config(
    model_dir: Path,
    corpus: Path,
    *,
    seq_len: int,
    calibration_seqs: int,
    heldout_seqs: int,
    **sections: dict,
) -> dict:
    """The run config the CLI tests write: ``model_dir``, ``data`` from the text ``corpus``
    (``calibration_seqs`` and ``heldout_seqs`` sequences of ``seq_len`` tokens) and the
    other ``sections`` as given (``supernet``, ``search``, ``backend``, ...)."""
    data = {
        "calibration": str(corpus),
        "seq_len": seq_len,
        "n_calibration_seqs": calibration_seqs,
        "n_heldout_seqs": heldout_seqs,
    }
    return {"model": str(model_dir), "data": data, **sections}


def write_corpus(corpus: Path, *, docs: int, words_per_doc: int) -> Path:
    """``corpus``: a new directory of ``docs`` text files of ``words_per_doc`` words drawn
    from :data:`WORDS` (seed 0)."""
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(docs):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS, words_per_doc)))
    return corpus


def scaled_random_model(hf_config: dict, path: Path) -> HFModel:
    """A random model of ``hf_config`` scaled like a trained one (norm weights near 1,
    embeddings N(0, 1), linears uniform over +-1/sqrt(fan-in); numpy seed 0), written by
    ``save_model`` to ``path`` and loaded back in float32."""
    import jax.numpy as jnp

    adapter = adapter_for_config(hf_config)
    rng = np.random.default_rng(0)
    params = {}
    for name, shape in adapter.param_shapes.items():
        if "norm" in name:
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif "embed" in name:
            w = rng.standard_normal(shape)
        else:
            w = rng.uniform(-1, 1, size=shape) / np.sqrt(shape[-1])
        params[name] = jnp.asarray(w, jnp.float32)
    return load_model(save_model(HFModel(adapter, params), path))
