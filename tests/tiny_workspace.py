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


def workspace_config(
    root: Path,
    hf_config: dict,
    *,
    docs: int = 4,
    words_per_doc: int = 400,
    calibration_seqs: int = 8,
    heldout_seqs: int = 2,
    seq_len: int = 32,
    **sections: dict,
) -> dict:
    """:func:`write_model_and_corpus` under ``root``, and the :func:`cli_config` of them
    (by default 4 documents of 400 words; 8 calibration and 2 held-out sequences of 32
    tokens)."""
    model_dir, corpus = write_model_and_corpus(
        root, hf_config, docs=docs, words_per_doc=words_per_doc
    )
    return cli_config(
        model_dir,
        corpus,
        seq_len=seq_len,
        calibration_seqs=calibration_seqs,
        heldout_seqs=heldout_seqs,
        **sections,
    )


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


def quiet_build(
    model: HFModel,
    calib,
    out_dir: Path,
    *,
    pruner,
    grid,
    structure: str = "unstructured",
    input_mode: str = "dense",
    batch_size: int = 4,
    **options,
):
    """``build_supernet`` as the tests call it: without a progress bar, unstructured and
    dense inputs unless said (``options``: ``map_layers``, ``tie_experts``, ...)."""
    from allocsearch.supernet.build import build_supernet

    return build_supernet(
        model,
        calib,
        pruner=pruner,
        grid=grid,
        structure=structure,
        input_mode=input_mode,
        out_dir=out_dir,
        batch_size=batch_size,
        progress=False,
        **options,
    )


def structured_test_recipe(model: HFModel, calib, layers, units, *, structure: str, architecture):
    """A structured recipe of hand-picked ``layers`` and ``units`` (strategy "test", random
    calibration ids, the params budget its layers achieve) for ``model``, whose identity
    names ``architecture``."""
    from allocsearch.recipe import (
        Calibration,
        Fitness,
        ModelIdentity,
        Provenance,
        Recipe,
        RecipeBudget,
        fraction_removed,
    )

    achieved = fraction_removed(layers, "params")
    return Recipe(
        model=ModelIdentity("tiny", architecture, model.adapter.model_type, model.fingerprint),
        layers=layers,
        budget=RecipeBudget("params", achieved, achieved),
        provenance=Provenance(
            strategy="test",
            settings={},
            fitness=Fitness("kl", None),
            calibration=Calibration("random ids", calib.fingerprint, 1),
            tool_version="test",
            wall_time_s=0.0,
            evaluations=0,
        ),
        structure=structure,
        units=tuple(units),
    )


def run_cli(*args, code: int | None = 0):
    """``allocsearch *args`` in this process (typer's CliRunner; arguments as strings);
    asserts the exit status is ``code`` unless it is None."""
    from typer.testing import CliRunner

    from allocsearch.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    if code is not None:
        assert r.exit_code == code, r.output
    return r
