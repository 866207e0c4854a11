"""A loaded model with its calibration, held-out and validation token sets (the
:class:`Workspace` every command's steps take), and how those token sets are read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from allocsearch.assets_paths import DEMO_NAME
from allocsearch.config import DataConfig, RunConfig
from allocsearch.data.demo_corpus import demo_tokensets
from allocsearch.data.encoder_sets import encoder_tokensets
from allocsearch.data.sources import load_documents
from allocsearch.data.tokenizers import ByteTokenizer, load_tokenizer
from allocsearch.data.tokenset import TokenSet, build_tokensets
from allocsearch.data.validation import AtMost, validation_request
from allocsearch.models.hf import HFModel


@dataclass
class Workspace:
    """A loaded model with its calibration and held-out token sets, and the validation
    rows (``data.n_validation_seqs``; None when 0)."""

    config: RunConfig
    model: HFModel
    calibration: TokenSet
    heldout: TokenSet
    validation: TokenSet | None = None


def load_tokensets(data: DataConfig, model: HFModel) -> tuple[TokenSet, TokenSet, TokenSet | None]:
    """Calibration, held-out and validation token sets (disjoint) for ``model``: windows of
    the token stream for a causal language model, sentence-aligned rows wrapped in the
    tokenizer's own special tokens for an encoder
    (:func:`~allocsearch.data.encoder_sets.encoder_tokensets`). The validation set
    (``data.n_validation_seqs`` rows of the calibration source, None when 0) never
    changes the calibration rows (:mod:`allocsearch.data.validation`)."""
    sets = _load_tokensets(data, model)
    return sets[0], sets[1], (sets[2] if len(sets) > 2 else None)


def _load_tokensets(data: DataConfig, model: HFModel) -> tuple[TokenSet, ...]:
    n_cal: int | AtMost = data.calibration_seqs(encoder=not model.adapter.is_causal_lm)
    if data.n_calibration_seqs is None and not model.adapter.is_causal_lm:
        n_cal = AtMost(n_cal)  # unset: up to the encoder default, fewer on a small corpus
    if data.calibration == DEMO_NAME:
        return demo_tokensets(
            data.seq_len,
            n_cal,
            data.seed,
            n_heldout_seqs=data.n_heldout_seqs,
            n_validation_seqs=validation_request(data.n_validation_seqs),
        )
    tokenizer = _tokenizer_for(data, model)
    docs = load_documents(data.calibration, pattern=data.pattern, text_field=data.text_field)
    held = (
        load_documents(data.heldout, pattern=data.pattern, text_field=data.text_field)
        if data.heldout
        else None
    )
    # encoders read single wrapped inputs ([CLS] ... [SEP]), not windows of a stream
    make = build_tokensets if model.adapter.is_causal_lm else encoder_tokensets
    return make(
        docs,
        tokenizer,
        seq_len=data.seq_len,
        n_calibration_seqs=n_cal,
        seed=data.seed,
        heldout_documents=held,
        n_heldout_seqs=data.n_heldout_seqs,
        n_validation_seqs=validation_request(data.n_validation_seqs),
    )


def _tokenizer_for(data: DataConfig, model: HFModel):
    if data.tokenizer:
        return load_tokenizer(data.tokenizer)
    if model.path and (Path(model.path) / "tokenizer.json").exists():
        return load_tokenizer(Path(model.path) / "tokenizer.json")
    vocab = model.adapter.hf_config.get("vocab_size")
    if vocab == 256:
        return ByteTokenizer()
    raise ValueError(
        f"no tokenizer for {model.path}: it has no tokenizer.json and a vocabulary of {vocab} "
        "(not bytes); set data.tokenizer to a tokenizer.json path"
    )
