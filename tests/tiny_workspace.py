"""Files the CLI end-to-end tests start from: a random model directory and a word corpus."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from allocsearch.models import HFModel, adapter_for_config, save_model

WORDS = ["alpha", "beta", "gamma", "delta", "pruning", "sparse", "layer", "budget"]


def write_model_and_corpus(
    root: Path, hf_config: dict, *, docs: int, words_per_doc: int
) -> tuple[Path, Path]:
    """``root/model`` (random weights of ``hf_config``, seed 0) and ``root/corpus`` (``docs``
    text files of ``words_per_doc`` words drawn from :data:`WORDS`, seed 0)."""
    adapter = adapter_for_config(hf_config)
    save_model(HFModel(adapter, adapter.init_params(jax.random.key(0))), root / "model")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(docs):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS, words_per_doc)))
    return root / "model", corpus
