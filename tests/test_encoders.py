"""Encoders (BERT) in the command-line pipeline: calibration text is not cut to a
tokenizer.json's fixed padding / truncation; build -> search (EvoPress, DP) -> apply ->
eval runs on an encoder metric (embedding cosine distance to the dense model), and the
applied checkpoint loads in transformers with allocsearch's hidden states."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from allocsearch.data.tokenizers import HFTokenizer


def test_fixed_padding_and_truncation_of_a_tokenizer_json_are_not_applied(tmp_path: Path):
    """all-MiniLM-L6-v2's tokenizer.json pads and truncates to 128 tokens; a calibration
    stream must hold the text's tokens only, however long (here: pad / truncate at 4)."""
    tokenizers = pytest.importorskip("tokenizers")
    words = ["[PAD]", "[UNK]", "the", "cat", "sat", "on", "mat"]
    raw = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    )
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    raw.enable_padding(length=4, pad_id=0, pad_token="[PAD]")
    raw.enable_truncation(max_length=4)
    path = tmp_path / "tokenizer.json"
    raw.save(str(path))
    assert raw.encode("the cat").ids == [2, 3, 0, 0]  # the file really pads and truncates
    tok = HFTokenizer(path)
    assert tok.encode("the cat").tolist() == [2, 3]
    np.testing.assert_array_equal(tok.encode("the cat sat on the mat"), [2, 3, 4, 5, 2, 6])


def test_nearest_neighbour_agreement_by_hand():
    """Dense neighbours: a<->b, c<->d. Pruned: b moves to (0.5, 0.5), whose nearest is
    now d (cos 0.78 against 0.71 for a and c); a (b at 0.71 > d at 0.11), c and d keep
    theirs: 3 of 4 agree. Scaling embeddings changes no cosine: full agreement."""
    from allocsearch.evaluate.metrics import nearest_neighbour_agreement

    dense = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    pruned = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.1, 0.9]])
    assert nearest_neighbour_agreement(dense, pruned) == 0.75
    assert nearest_neighbour_agreement(dense, dense * np.array([[2.0], [3.0], [4.0], [5.0]])) == 1.0
    with pytest.raises(ValueError, match="N >= 2"):
        nearest_neighbour_agreement(dense[:1], pruned[:1])


BERT = {
    "model_type": "bert",
    "architectures": ["BertModel"],
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
}


def _word_tokenizer(path: Path, words: list[str]) -> int:
    """A WordLevel tokenizer.json over ``words`` that pads and truncates to 128 (as
    all-MiniLM-L6-v2's does); returns its vocabulary size."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    raw.post_processor = tokenizers.processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    raw.enable_padding(length=128, pad_id=0, pad_token="[PAD]")
    raw.enable_truncation(max_length=128)
    raw.save(str(path))
    return len(vocab)


def test_encoder_rows_are_wrapped_in_the_tokenizers_own_cls_and_sep(tmp_path: Path):
    """Rows of an encoder's token sets: [CLS] + a body from a sentence start + [SEP],
    with the ids the tokenizer.json's post-processor adds (here [CLS] = 2, [SEP] = 3)."""
    from allocsearch.data.encoder_sets import document_rows, encoder_tokensets, split_sentences
    from allocsearch.data.sources import Document

    path = tmp_path / "tokenizer.json"
    _word_tokenizer(path, ["the", "cat", "sat", "on", "mat", "."])  # ids 4..9
    tok = HFTokenizer(path)
    prefix, suffix = tok.special_wrapping()
    assert prefix.tolist() == [2] and suffix.tolist() == [3]

    assert split_sentences("The cat sat. On the mat!\n\nThe end") == [
        "The cat sat.", "On the mat!", "The end",
    ]  # fmt: skip
    # stream 1..9, sentences start at 0, 3, 5; body 4: [1 2 3 4], then the next sentence
    # start at or after 4 is 5: [6 7 8 9]; then the document is done.
    rows = document_rows([np.array([1, 2, 3]), np.array([4, 5]), np.array([6, 7, 8, 9])], 4)
    assert [r.tolist() for r in rows] == [[1, 2, 3, 4], [6, 7, 8, 9]]
    # one long sentence continues from row to row; the short tail is dropped
    rows = document_rows([np.arange(1, 11)], 4)
    assert [r.tolist() for r in rows] == [[1, 2, 3, 4], [5, 6, 7, 8]]

    # the: 4, cat: 5, sat: 6, on: 7, mat: 8, ".": 9; seq_len 5 = [CLS] + 3 + [SEP]
    docs = [
        Document("a", "the cat sat. the mat. on the cat sat on the mat."),
        Document("b", "cat cat cat cat. mat mat mat mat mat mat mat."),
    ]
    cal, held = encoder_tokensets(docs, tok, seq_len=5, n_calibration_seqs=3, seed=0,
                                  n_heldout_seqs=2)  # fmt: skip
    # doc a: sentences [4 5 6 9] [4 8 9] [7 4 5 6 7 4 8 9] start at 0, 4, 7. Rows:
    # [4 5 6] (end 3; next start 4), [4 8 9] (end 7; start 7), [7 4 5], [6 7 4], and the
    # tail [8 9] is dropped. doc b: [5 5 5 5 9] [8 8 8 8 8 8 8 9] start at 0, 5: [5 5 5]
    # (end 3; next start 5), [8 8 8], [8 8 8], tail [8 9] dropped.
    a_rows = [[4, 5, 6], [4, 8, 9], [7, 4, 5], [6, 7, 4]]
    b_rows = [[5, 5, 5], [8, 8, 8], [8, 8, 8]]
    all_rows = [[2, *r, 3] for r in a_rows + b_rows]
    assert held.tokens.tolist() == all_rows[-2:]  # the last rows of the one corpus
    chosen = np.sort(np.random.default_rng(0).choice(5, size=3, replace=False))
    assert cal.tokens.tolist() == [all_rows[i] for i in chosen]
    assert "rows [2] + 3 tokens from a sentence start + [3]" in cal.source

    # issue 28.9: a held-out corpus (data.heldout) leaves the calibration rows as they
    # were (the last rows of the calibration corpus stay out of them), so a supernet built
    # without one stays usable with one. doc c's rows: [4 5 6], [4 5 6], [7 4 8]
    other = [Document("c", "the cat sat on the mat. the cat sat on the mat.")]
    cal2, held2 = encoder_tokensets(docs, tok, seq_len=5, n_calibration_seqs=3, seed=0,
                                    heldout_documents=other, n_heldout_seqs=2)  # fmt: skip
    assert cal2.tokens.tolist() == cal.tokens.tolist() and cal2.fingerprint == cal.fingerprint
    assert held2.tokens.tolist() == [[2, 4, 5, 6, 3], [2, 4, 5, 6, 3]]


def test_an_encoder_workspace_uses_wrapped_rows(tmp_path: Path):
    """load_workspace of a BERT model gives [CLS] ... [SEP] rows, not stream windows."""
    from tiny_workspace import WORDS, write_model_and_corpus

    from allocsearch.config import config_from_dict
    from allocsearch.pipeline import load_workspace

    tok = tmp_path / "tokenizer.json"
    cfg = {**BERT, "vocab_size": _word_tokenizer(tok, WORDS)}
    model_dir, corpus = write_model_and_corpus(tmp_path, cfg, docs=2, words_per_doc=40)
    (model_dir / "tokenizer.json").write_bytes(tok.read_bytes())
    ws = load_workspace(
        config_from_dict(
            {
                "model": str(model_dir),
                "data": {"calibration": str(corpus), "seq_len": 8, "n_calibration_seqs": 4,
                         "n_heldout_seqs": 2},
                "evaluator": {"metric": "embedding_cosine"},
            }
        )
    )  # fmt: skip
    for tokens in (ws.calibration.tokens, ws.heldout.tokens):
        assert (tokens[:, 0] == 2).all() and (tokens[:, -1] == 3).all()
        assert not np.isin(tokens[:, 1:-1], [0, 1, 2, 3]).any()  # text only inside


def test_an_encoder_workspace_defaults_to_the_encoder_calibration_rows(tmp_path, monkeypatch):
    """Without data.n_calibration_seqs an encoder's workspace takes
    config.ENCODER_CALIBRATION_SEQS rows (here patched to 5: the tiny corpus is short) and
    records the resolved number in ws.config."""
    from tiny_workspace import WORDS, write_model_and_corpus

    from allocsearch import config
    from allocsearch.pipeline import load_workspace

    monkeypatch.setattr(config, "ENCODER_CALIBRATION_SEQS", 5)
    tok = tmp_path / "tokenizer.json"
    cfg = {**BERT, "vocab_size": _word_tokenizer(tok, WORDS)}
    model_dir, corpus = write_model_and_corpus(tmp_path, cfg, docs=2, words_per_doc=40)
    (model_dir / "tokenizer.json").write_bytes(tok.read_bytes())
    run = config.config_from_dict(
        {"model": str(model_dir), "data": {"calibration": str(corpus), "seq_len": 8,
                                           "n_heldout_seqs": 2}}
    )  # fmt: skip
    assert run.data.n_calibration_seqs is None
    ws = load_workspace(run)
    assert ws.calibration.n_seq == 5 and ws.config.data.n_calibration_seqs == 5


@pytest.mark.slow
@pytest.mark.parametrize(
    "structure",
    [
        "heads_neurons",
        # about as long as the structured case; CI runs one (ALLOCSEARCH_ALL_FAMILIES_E2E=1
        # runs both; both passed when they were added)
        pytest.param(
            "unstructured",
            marks=pytest.mark.skipif(
                os.environ.get("ALLOCSEARCH_ALL_FAMILIES_E2E") != "1",
                reason="set ALLOCSEARCH_ALL_FAMILIES_E2E=1 to run every encoder end to end",
            ),
        ),
    ],
)
def test_cli_bert_build_search_apply_eval(structure, tmp_path):
    """A tiny random BERT whose tokenizer.json pads to 128 runs build -> search (EvoPress
    and DP, on the embedding cosine distance) -> apply -> eval through the CLI; the
    recipe records the metric used; the applied checkpoint loads in transformers with the
    same hidden states as allocsearch's."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import yaml
    from tiny_workspace import WORDS, write_model_and_corpus
    from typer.testing import CliRunner

    from allocsearch.cli import app
    from allocsearch.models import load_model
    from allocsearch.recipe.recipe import Recipe

    tok = tmp_path / "tokenizer.json"
    cfg = {**BERT, "vocab_size": _word_tokenizer(tok, WORDS)}
    model_dir, corpus = write_model_and_corpus(tmp_path, cfg, docs=2, words_per_doc=300)
    (model_dir / "tokenizer.json").write_bytes(tok.read_bytes())
    unstructured = structure == "unstructured"
    config = {
        "model": str(model_dir),
        "data": {
            "calibration": str(corpus),
            "seq_len": 16,
            "n_calibration_seqs": 8,
            "n_heldout_seqs": 4,
        },
        "supernet": {
            "pruner": "magnitude" if unstructured else "sparsegpt",
            "structure": structure,
            "center": 0.5 if unstructured else 0.25,
            "steps_each_side": 1,
            "step_fraction": 0.1 if unstructured else 0.25,
        },
        "search": {
            "target": 0.5 if unstructured else 0.25,
            "strategy": "evopress",
            "settings": {"generations": 2, "offspring": 4, "survivors": [2, 1], "tokens": [32, 64]},
        },
        "evaluator": {"metric": "embedding_cosine"},
        "backend": {"kind": "local"},
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    runner = CliRunner()

    def run(*args):
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        return r

    store = tmp_path / "store"
    run("build", "--config", config_path, "--out", store, "--no-progress")
    r = runner.invoke(app, ["sweep", "--config", str(config_path), "--supernet", str(store),
                            "--targets", "0.2,0.3", "--out", str(tmp_path / "sweep")])  # fmt: skip
    assert r.exit_code == 2 and "sweep reports held-out perplexity" in r.output, r.output
    assert not (tmp_path / "sweep").exists()
    dp_config = tmp_path / "dp.yaml"
    config["search"] |= {"strategy": "dp", "settings": {}}
    dp_config.write_text(yaml.safe_dump(config))
    for strategy, path in (("evopress", config_path), ("dp", dp_config)):
        out = tmp_path / strategy
        r = run(
            "search", "--config", path, "--supernet", store, "--out", out, "--no-progress"
        )  # fmt: skip
        assert "held-out embedding_cosine to the dense model" in " ".join(r.output.split())
        recipe = Recipe.load(out / "recipe.json")
        assert recipe.provenance.fitness.metric == "embedding_cosine"
    pruned = tmp_path / "pruned"
    run(
        "apply", out / "recipe.json", "--config", config_path, "--model", model_dir,
        "--supernet", store, "--out", pruned,
    )  # fmt: skip
    # the pruned directory keeps the tokenizer, so eval reads it as it read the dense one
    assert (pruned / "tokenizer.json").read_bytes() == tok.read_bytes()
    r = run("eval", "--config", config_path, "--model", pruned)
    assert f"held-out embedding_cosine to {model_dir}" in " ".join(r.output.split())
    assert "nearest-neighbour agreement" in " ".join(r.output.split())
    # compare: the table reports distance and NN agreement, never a perplexity
    run(
        "compare", "--config", config_path, "--supernet", store, "--out", tmp_path / "cmp",
        "--strategies", "uniform,owl", "--no-progress",
    )  # fmt: skip
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "held-out distance" in table and "NN agreement" in table
    assert "ppl" not in table and "perplexity" not in table
    assert (tmp_path / "cmp" / "compare.png").exists()

    ours = load_model(pruned)
    if unstructured:
        for entry in recipe.layers:
            w = np.asarray(ours.params[f"{entry.name}.weight"])
            assert np.mean(w == 0) == pytest.approx(entry.sparsity, abs=1e-9)
    theirs = transformers.BertModel.from_pretrained(pruned).eval()
    ids = np.random.default_rng(0).integers(4, cfg["vocab_size"], size=(2, 12))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        ref = theirs(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    got = np.asarray(ours.adapter.forward(ours.params, ids, mask))
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], ref.numpy()[valid], atol=1e-4, rtol=1e-4)


def test_encoder_options_on_the_command_line(tmp_path: Path):
    """Issue 28.9: an encoder's metric and held-out set needed a YAML file; eval (like
    build, search and compare) takes --metric, --heldout and --heldout-seqs."""
    from tiny_workspace import WORDS, write_corpus, write_model_and_corpus
    from typer.testing import CliRunner

    from allocsearch.cli import app

    tok = tmp_path / "tokenizer.json"
    cfg = {**BERT, "vocab_size": _word_tokenizer(tok, WORDS)}
    model_dir, corpus = write_model_and_corpus(tmp_path, cfg, docs=2, words_per_doc=400)
    (model_dir / "tokenizer.json").write_bytes(tok.read_bytes())
    held = write_corpus(tmp_path / "held", docs=1, words_per_doc=40)
    # 132 rows of 8 tokens: fewer than the unset encoder default of 256 calibration rows
    args = ["eval", "--model", str(model_dir), "--calibration", str(corpus), "--seq-len", "8",
            "--no-progress"]  # fmt: skip
    r = CliRunner().invoke(app, [*args, "--heldout-seqs", "3"])
    assert r.exit_code == 2 and "pass --reference" in r.output, r.output  # not the demo LM
    args += ["--reference", str(model_dir)]
    r = CliRunner().invoke(app, [*args, "--metric", "hidden_nmse", "--heldout", str(held),
                                 "--heldout-seqs", "3"])  # fmt: skip
    assert r.exit_code == 0, r.output
    line = " ".join(r.output.split())
    assert "hidden_nmse" in line and "on 3 sequences" in line and str(held) in line, line
    r = CliRunner().invoke(app, [*args, "--heldout-seqs", "0"])
    assert r.exit_code == 2 and "--heldout-seqs: data.n_heldout_seqs = 0" in r.output, r.output
