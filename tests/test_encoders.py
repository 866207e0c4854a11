"""Encoders (BERT) in the command-line pipeline: calibration text is not cut to a
tokenizer.json's fixed padding / truncation."""

from __future__ import annotations

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
