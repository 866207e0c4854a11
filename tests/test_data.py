"""Tests of allocsearch.data: sources, tokenizers, token sets, the demo corpus."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pickle
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from allocsearch.data import (
    DOCUMENT_SEPARATOR,
    HELDOUT_MODULES,
    TRAIN_MODULES,
    ByteTokenizer,
    Document,
    HFTokenizer,
    Tokenizer,
    TokenSet,
    build_tokensets,
    calibration_tokenset,
    demo_documents,
    demo_tokensets,
    describe_documents,
    encode_documents,
    heldout_tokenset,
    load_documents,
    load_tokenizer,
    minibatch,
    module_source_path,
    read_directory,
    read_glob,
    read_hf_dataset,
    read_jsonl,
    read_text_file,
)

DETERMINISTIC = settings(max_examples=60, derandomize=True, deadline=None)


class NumberTokenizer:
    """Test tokenizer: whitespace-separated decimal numbers are the ids.

    A document "0 1 2 ... n-1" makes a stream whose token at position p is p, so token
    values reveal stream positions. The separator (blank line) encodes to no ids.
    """

    vocab_size = 1_000_000
    identity = "numbers-test"

    def encode(self, text: str) -> np.ndarray:
        return np.asarray([int(w) for w in text.split()], dtype=np.int32)

    def decode(self, ids: np.ndarray | Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


def _positions_document(start: int, stop: int) -> Document:
    return Document(name=f"pos{start}-{stop}", text=" ".join(map(str, range(start, stop))))


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- sources


def test_read_text_file_and_missing_path(tmp_path: Path) -> None:
    f = _write(tmp_path / "a.txt", "héllo\nworld")
    assert read_text_file(f) == Document(name=str(f), text="héllo\nworld")
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_text_file(missing)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_documents(missing)
    with pytest.raises(ValueError, match="not a file"):
        read_text_file(tmp_path)


def test_non_utf8_file_is_an_error_naming_it(tmp_path: Path) -> None:
    f = tmp_path / "latin1.txt"
    f.write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match=r"latin1\.txt is not valid UTF-8.*offset 3"):
        read_text_file(f)


def test_read_directory_recursive_sorted_with_pattern(tmp_path: Path) -> None:
    _write(tmp_path / "b.py", "B")
    _write(tmp_path / "a" / "z.py", "AZ")
    _write(tmp_path / "a" / "b" / "c.py", "ABC")
    _write(tmp_path / "a" / "notes.txt", "TXT")
    docs = read_directory(tmp_path, pattern="*.py")
    assert [d.text for d in docs] == ["ABC", "AZ", "B"]  # a/b/c.py < a/z.py < b.py
    assert [d.name for d in docs] == [
        str(tmp_path / "a" / "b" / "c.py"),
        str(tmp_path / "a" / "z.py"),
        str(tmp_path / "b.py"),
    ]
    assert [d.text for d in read_directory(tmp_path)] == ["TXT"]  # default "*.txt"
    assert load_documents(tmp_path, pattern="*.py") == docs
    with pytest.raises(FileNotFoundError, match=r"'\*\.md'"):
        read_directory(tmp_path, pattern="*.md")
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        read_directory(tmp_path / "missing_dir")


def test_read_glob_sorted_and_no_match(tmp_path: Path) -> None:
    _write(tmp_path / "x2.txt", "2")
    _write(tmp_path / "x10.txt", "10")
    _write(tmp_path / "sub" / "x1.txt", "1")
    _write(tmp_path / "y.txt", "y")
    docs = read_glob(str(tmp_path / "**" / "x*.txt"))
    assert [d.text for d in docs] == ["1", "10", "2"]  # sub/x1 < x10 < x2 (string order)
    assert load_documents(str(tmp_path / "**" / "x*.txt")) == docs
    with pytest.raises(FileNotFoundError, match=r"nothing\*\.txt"):
        read_glob(str(tmp_path / "nothing*.txt"))


def test_read_jsonl_fields_order_and_blank_lines(tmp_path: Path) -> None:
    lines = [json.dumps({"text": "first", "id": 1}), "", json.dumps({"body": "x", "text": "ü"})]
    f = _write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    assert read_jsonl(f) == [Document(f"{f}:1", "first"), Document(f"{f}:3", "ü")]
    # .jsonl files found in a directory or given directly are parsed as JSON Lines
    assert load_documents(f) == read_jsonl(f)
    assert read_directory(tmp_path, pattern="*.jsonl") == read_jsonl(f)


@pytest.mark.parametrize(
    ("line2", "message"),
    [
        ('{"content": "no text here"}', r"d\.jsonl:2: missing text field 'text'.*\['content'\]"),
        ("{not json", r"d\.jsonl:2: invalid JSON"),
        ('["a", "list"]', r"d\.jsonl:2: expected a JSON object with field 'text', got list"),
        ('{"text": 5}', r"d\.jsonl:2: field 'text' must be a string, got int"),
    ],
)
def test_read_jsonl_errors_name_line_and_field(tmp_path: Path, line2: str, message: str) -> None:
    f = _write(tmp_path / "d.jsonl", '{"text": "ok"}\n' + line2 + "\n")
    with pytest.raises(ValueError, match=message):
        read_jsonl(f)


def test_read_jsonl_custom_field_missing_names_field(tmp_path: Path) -> None:
    f = _write(tmp_path / "d.jsonl", '{"body": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: missing text field 'body'"):
        read_jsonl(f, text_field="body")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets installed")
def test_hf_dataset_without_extra_says_how_to_install() -> None:
    with pytest.raises(ImportError, match=r"allocsearch\[datasets\]"):
        read_hf_dataset("wikitext", split="test")


def test_describe_documents() -> None:
    docs = [Document(f"d{i}", "t") for i in range(5)]
    assert describe_documents([]) == "0 documents"
    assert describe_documents(docs[:1]) == "1 document: d0"
    assert describe_documents(docs[:3]) == "3 documents: d0, d1, d2"
    assert describe_documents(docs) == "5 documents: d0, d1, d2, ... (2 more)"


# -------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_hand_computed() -> None:
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 256 and tok.identity == "bytes-utf8"
    ids = tok.encode("aé€😀")
    assert ids.dtype == np.int32
    expected = [0x61, 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x98, 0x80]
    assert ids.tolist() == expected
    assert tok.decode(ids) == "aé€😀"
    assert tok.encode("").shape == (0,) and tok.decode([]) == ""
    assert tok.decode([0xC3]) == "\ufffd"  # a character cut in half decodes, replaced
    with pytest.raises(ValueError, match=r"token id 256 out of range; valid ids are 0\.\.255"):
        tok.decode([65, 256])


@DETERMINISTIC
@given(st.text())
def test_byte_tokenizer_round_trip_any_text(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.min(initial=0) >= 0 and ids.max(initial=0) < 256
    assert tok.decode(ids) == text


def test_byte_tokenizer_round_trip_lone_surrogate() -> None:
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("a\ud800b")) == "a\ud800b"


def _train_bpe(path: Path, corpus: list[str], vocab_size: int) -> Path:
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(corpus, trainer=trainer)
    raw.save(str(path))
    return path


CORPUS = ["def f(x):\n    return x + 1\n", "the cat sat on the mat", "naïve café 🍵 ünïcode"]


def test_hf_tokenizer_round_trip_and_agreement(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as RawTokenizer

    path = _train_bpe(tmp_path / "tokenizer.json", CORPUS, vocab_size=300)
    tok = HFTokenizer(path)
    raw = RawTokenizer.from_file(str(path))
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == raw.get_vocab_size() > 256
    for text in [*CORPUS, "unseen wörds ∑ and\n\ttabs", ""]:
        ids = tok.encode(text)
        assert ids.dtype == np.int32
        assert ids.tolist() == raw.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    # BPE merges make frequent text shorter than its bytes
    assert len(tok.encode(CORPUS[1])) < len(CORPUS[1].encode())
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_hf_tokenizer_identity_is_content_based(tmp_path: Path) -> None:
    a = _train_bpe(tmp_path / "a.json", CORPUS, vocab_size=300)
    copy = tmp_path / "copy.json"
    copy.write_bytes(a.read_bytes())
    b = _train_bpe(tmp_path / "b.json", CORPUS, vocab_size=280)
    ident = HFTokenizer(a).identity
    assert ident.startswith("hf-tokenizer-json:") and len(ident) == len("hf-tokenizer-json:") + 16
    assert HFTokenizer(copy).identity == ident  # same content elsewhere: same identity
    assert HFTokenizer(b).identity != ident
    assert ident == "hf-tokenizer-json:" + hashlib.sha256(a.read_bytes()).hexdigest()[:16]


def test_load_tokenizer_specs(tmp_path: Path) -> None:
    path = _train_bpe(tmp_path / "tokenizer.json", CORPUS, vocab_size=300)
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
    assert load_tokenizer(path).identity == HFTokenizer(path).identity
    assert load_tokenizer(tmp_path).identity == HFTokenizer(path).identity  # model directory
    with pytest.raises(FileNotFoundError, match=r"'nope'.*'bytes'"):
        load_tokenizer("nope")
    bad = _write(tmp_path / "bad.json", "{}")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        HFTokenizer(bad)


# -------------------------------------------------------------------------- token sets


def test_encode_documents_joins_with_separator_and_skips_empty() -> None:
    assert DOCUMENT_SEPARATOR == "\n\n"
    docs = [Document("a", "ab"), Document("e", ""), Document("c", "c")]
    assert encode_documents(docs, ByteTokenizer()).tolist() == [97, 98, 10, 10, 99]
    assert encode_documents([], ByteTokenizer()).shape == (0,)


def test_encode_documents_rejects_ids_outside_vocab() -> None:
    class Bad(NumberTokenizer):
        vocab_size = 10

    with pytest.raises(ValueError, match=r"produced id 12, outside its vocabulary 0\.\.9"):
        encode_documents([Document("d", "1 12")], Bad())


def test_calibration_windows_hand_computed_and_seeded() -> None:
    stream = np.arange(100, dtype=np.int32)
    kwargs = dict(seq_len=8, n_seq=5, tokenizer_identity="numbers-test", source="s")
    a = calibration_tokenset(stream, seed=3, **kwargs)
    b = calibration_tokenset(stream, seed=3, **kwargs)
    c = calibration_tokenset(stream, seed=4, **kwargs)
    assert a.tokens.shape == (5, 8) and a.tokens.dtype == np.int32 and a.seed == 3
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    starts = a.tokens[:, 0]
    # every window is a contiguous slice of the stream, in stream order, non-overlapping
    np.testing.assert_array_equal(a.tokens, starts[:, None] + np.arange(8))
    assert np.all(np.diff(starts) >= 8)
    # exactly enough tokens: the only placement is back to back
    full = calibration_tokenset(stream[:40], seed=9, **kwargs)
    np.testing.assert_array_equal(full.tokens, np.arange(40).reshape(5, 8))


@DETERMINISTIC
@given(
    n_tokens=st.integers(1, 400),
    seq_len=st.integers(1, 40),
    n_seq=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_calibration_windows_never_overlap(n_tokens: int, seq_len: int, n_seq: int, seed: int):
    stream = np.arange(n_tokens, dtype=np.int32)
    if n_tokens < n_seq * seq_len:
        with pytest.raises(ValueError, match=f"has {n_tokens} tokens"):
            calibration_tokenset(
                stream, seq_len=seq_len, n_seq=n_seq, seed=seed, tokenizer_identity="t", source="s"
            )
        return
    ts = calibration_tokenset(
        stream, seq_len=seq_len, n_seq=n_seq, seed=seed, tokenizer_identity="t", source="s"
    )
    flat = ts.tokens.ravel()
    assert len(np.unique(flat)) == flat.size  # no stream position used twice
    np.testing.assert_array_equal(ts.tokens, ts.tokens[:, :1] + np.arange(seq_len))


def test_calibration_placements_are_uniform() -> None:
    # 5 tokens, 2 windows of 2: placements (0,2), (0,3), (1,3), each with probability 1/3.
    stream = np.arange(5, dtype=np.int32)
    counts = Counter(
        tuple(
            calibration_tokenset(
                stream, seq_len=2, n_seq=2, seed=s, tokenizer_identity="t", source="s"
            ).tokens[:, 0]
        )
        for s in range(1500)
    )
    assert set(counts) == {(0, 2), (0, 3), (1, 3)}
    for c in counts.values():  # binomial sd = sqrt(1500 * 1/3 * 2/3) ~ 18
        assert abs(c - 500) < 75


def test_heldout_consecutive_windows() -> None:
    stream = np.arange(23, dtype=np.int32)
    ts = heldout_tokenset(stream, seq_len=5, tokenizer_identity="t", source="s")
    np.testing.assert_array_equal(ts.tokens, np.arange(20).reshape(4, 5))
    assert ts.seed is None
    two = heldout_tokenset(stream, seq_len=5, n_seq=2, tokenizer_identity="t", source="s")
    np.testing.assert_array_equal(two.tokens, np.arange(10).reshape(2, 5))


def test_too_short_corpora_say_found_and_needed() -> None:
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match=r"\(0 documents\) has 0 tokens; 2 calibration sequences"):
        build_tokensets([], tok, seq_len=8, n_calibration_seqs=2, seed=0)
    empty = [Document("e", "")]
    with pytest.raises(ValueError, match=r"has 0 tokens; 2 sequences of 8 tokens need at least 16"):
        build_tokensets(empty, tok, seq_len=8, n_calibration_seqs=2, seed=0, heldout_documents=[])
    with pytest.raises(
        ValueError, match=r"has 10 tokens; 3 sequences of 4 tokens need at least 12"
    ):
        calibration_tokenset(
            np.zeros(10, np.int32), seq_len=4, n_seq=3, seed=0, tokenizer_identity="t", source="s"
        )
    with pytest.raises(ValueError, match=r"has 7 tokens; one sequence of 8 tokens need at least 8"):
        heldout_tokenset(np.zeros(7, np.int32), seq_len=8, tokenizer_identity="t", source="s")
    with pytest.raises(
        ValueError, match=r"has 20 tokens; 3 sequences of 8 tokens need at least 24"
    ):
        heldout_tokenset(
            np.zeros(20, np.int32), seq_len=8, n_seq=3, tokenizer_identity="t", source="s"
        )
    # single-source split: calibration and held-out needs are added up
    docs = [Document("d", "x" * 30)]
    with pytest.raises(
        ValueError, match=r"has 30 tokens; 3 calibration.*plus 8 held-out.*at least 32"
    ):
        build_tokensets(docs, tok, seq_len=8, n_calibration_seqs=3, seed=0)


def test_two_source_split_draws_from_disjoint_text() -> None:
    # calibration text uses letters a-m only, held-out text n-z only
    calib = [Document(f"c{i}", "abcdefghijklm"[i:] * 20) for i in range(5)]
    held = [Document(f"h{i}", "nopqrstuvwxyz"[i:] * 10) for i in range(3)]
    tok = ByteTokenizer()
    c, h = build_tokensets(
        calib, tok, seq_len=16, n_calibration_seqs=20, seed=1, heldout_documents=held
    )
    calib_ids = set(tok.encode("abcdefghijklm\n").tolist())
    held_ids = set(tok.encode("nopqrstuvwxyz\n").tolist())
    assert set(np.unique(c.tokens).tolist()) <= calib_ids
    assert set(np.unique(h.tokens).tolist()) <= held_ids
    held_stream = encode_documents(held, tok)
    n = held_stream.size // 16
    np.testing.assert_array_equal(h.tokens, held_stream[: n * 16].reshape(n, 16))
    assert c.source == "5 documents: c0, c1, c2, ... (2 more)"
    assert h.source == "3 documents: h0, h1, h2"
    with pytest.raises(ValueError, match=r"'c2' and held-out document 'dup'.*disjoint"):
        build_tokensets(
            calib,
            tok,
            seq_len=4,
            n_calibration_seqs=1,
            seed=0,
            heldout_documents=[Document("dup", calib[2].text)],
        )


def test_single_source_split_uses_disjoint_positions() -> None:
    tok = NumberTokenizer()
    docs = [_positions_document(0, 600), _positions_document(600, 1000)]  # stream = 0..999
    c, h = build_tokensets(docs, tok, seq_len=10, n_calibration_seqs=30, seed=5)
    # default: last 10% (100 tokens = 10 windows) held out, calibration from the rest
    np.testing.assert_array_equal(h.tokens, np.arange(900, 1000).reshape(10, 10))
    assert c.tokens.max() < 900
    flat = c.tokens.ravel()
    assert len(np.unique(flat)) == flat.size
    assert c.source.endswith("[tokens 0:900]") and h.source.endswith("[tokens 900:1000]")
    c2, h2 = build_tokensets(docs, tok, seq_len=10, n_calibration_seqs=30, seed=5, n_heldout_seqs=3)
    np.testing.assert_array_equal(h2.tokens, np.arange(970, 1000).reshape(3, 10))
    assert c2.tokens.max() < 970
    # a tiny fraction still holds out one whole window
    _, h3 = build_tokensets(
        docs, tok, seq_len=10, n_calibration_seqs=1, seed=0, heldout_fraction=0.001
    )
    np.testing.assert_array_equal(h3.tokens, np.arange(990, 1000)[None, :])
    with pytest.raises(ValueError, match=r"heldout_fraction must be in \(0, 1\), got 1.5"):
        build_tokensets(docs, tok, seq_len=10, n_calibration_seqs=1, seed=0, heldout_fraction=1.5)


def test_tokenset_validation_and_read_only() -> None:
    source = np.arange(6, dtype=np.int32).reshape(2, 3)
    ts = TokenSet(tokens=source, source="s", tokenizer_identity="t", seed=None)
    source[0, 0] = 99  # the token set keeps its own copy
    assert ts.tokens[0, 0] == 0
    assert (ts.n_seq, ts.seq_len, ts.n_tokens) == (2, 3, 6)
    with pytest.raises(ValueError, match="read-only"):
        ts.tokens[0, 0] = 5
    with pytest.raises(ValueError, match=r"int32\[n_seq, seq_len\].*int64\[2, 3\]"):
        TokenSet(tokens=np.zeros((2, 3), np.int64), source="s", tokenizer_identity="t", seed=0)
    with pytest.raises(ValueError, match=r"int32\[n_seq, seq_len\].*int32\[6\]"):
        TokenSet(tokens=np.zeros(6, np.int32), source="s", tokenizer_identity="t", seed=0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        TokenSet(tokens=source, source="s", tokenizer_identity="t", seed=-1)
    restored = pickle.loads(pickle.dumps(ts))
    np.testing.assert_array_equal(restored.tokens, ts.tokens)
    assert not restored.tokens.flags.writeable and restored.fingerprint == ts.fingerprint
    assert ts.provenance() == {
        "source": "s",
        "tokenizer": "t",
        "seed": None,
        "n_seq": 2,
        "seq_len": 3,
        "fingerprint": ts.fingerprint,
    }


def test_fingerprint_changes_with_tokens_tokenizer_and_shape() -> None:
    tokens = np.arange(12, dtype=np.int32).reshape(3, 4)
    base = TokenSet(tokens=tokens, source="s", tokenizer_identity="bytes-utf8", seed=0)
    # pinned recipe: sha256(tag, identity, shape, little-endian int32 bytes), 16 hex digits
    h = hashlib.sha256(b"allocsearch.tokenset.v1\nbytes-utf8\n3x4\n")
    h.update(tokens.astype("<i4").tobytes())
    assert base.fingerprint == h.hexdigest()[:16]
    # provenance fields that do not change the tokens do not change the fingerprint
    same = TokenSet(tokens=tokens.copy(), source="other", tokenizer_identity="bytes-utf8", seed=7)
    assert same.fingerprint == base.fingerprint
    changed = tokens.copy()
    changed[2, 3] += 1
    fingerprints = {
        base.fingerprint,
        TokenSet(tokens=changed, source="s", tokenizer_identity="bytes-utf8", seed=0).fingerprint,
        TokenSet(tokens=tokens, source="s", tokenizer_identity="hf-x", seed=0).fingerprint,
        TokenSet(
            tokens=tokens.reshape(4, 3), source="s", tokenizer_identity="bytes-utf8", seed=0
        ).fingerprint,
    }
    assert len(fingerprints) == 4


def test_minibatch_counts_determinism_and_errors() -> None:
    tokens = np.arange(40 * 8, dtype=np.int32).reshape(40, 8)
    ts = TokenSet(tokens=tokens, source="s", tokenizer_identity="t", seed=0)
    a = minibatch(ts, 64, 11)
    assert a.shape == (8, 8) and a.dtype == np.int32 and a.size == 64
    rows = a[:, 0] // 8
    assert np.all(np.diff(rows) > 0)  # distinct sequences, in token-set order
    np.testing.assert_array_equal(a, tokens[rows])
    np.testing.assert_array_equal(minibatch(ts, 64, 11), a)
    assert not np.array_equal(minibatch(ts, 64, 12), a)
    np.testing.assert_array_equal(minibatch(ts, 320, 3), tokens)  # all tokens: every row
    assert minibatch(ts, 8, 0).shape == (1, 8)
    for bad in (60, 0, 328, -8):
        with pytest.raises(
            ValueError, match=rf"n_tokens={bad} .*multiples of seq_len=8 from 8 to 320"
        ):
            minibatch(ts, bad, 0)
    with pytest.raises(ValueError, match="batch_seed must be a non-negative integer, got -1"):
        minibatch(ts, 64, -1)


def test_minibatch_fresh_per_seed_covers_all_sequences() -> None:
    ts = TokenSet(
        tokens=np.arange(20, dtype=np.int32).reshape(20, 1),
        source="s",
        tokenizer_identity="t",
        seed=0,
    )
    batches = {tuple(minibatch(ts, 5, s)[:, 0]) for s in range(30)}
    assert len(batches) > 25  # C(20, 5) = 15504 subsets: repeats are rare
    assert set().union(*batches) == set(range(20))


# ------------------------------------------------------------------------- demo corpus


def test_demo_module_lists_disjoint_and_sized() -> None:
    assert len(set(TRAIN_MODULES)) == len(TRAIN_MODULES) and 60 <= len(TRAIN_MODULES) <= 120
    assert len(set(HELDOUT_MODULES)) == len(HELDOUT_MODULES)
    assert not set(TRAIN_MODULES) & set(HELDOUT_MODULES)
    train_paths = {module_source_path(m) for m in TRAIN_MODULES}
    held_paths = {module_source_path(m) for m in HELDOUT_MODULES}
    assert len(train_paths) == len(TRAIN_MODULES) and not train_paths & held_paths
    train, held = demo_documents("train"), demo_documents("heldout")
    assert [d.name for d in train] == list(TRAIN_MODULES)
    train_bytes = sum(len(d.text.encode()) for d in train)
    held_bytes = sum(len(d.text.encode()) for d in held)
    assert 3_000_000 <= train_bytes <= 6_000_000
    assert 300_000 <= held_bytes <= 600_000
    assert "def " in train[TRAIN_MODULES.index("argparse")].text


def test_demo_missing_or_non_source_module_is_named() -> None:
    with pytest.raises(ValueError, match="'no_such_module_xyz' not found"):
        module_source_path("no_such_module_xyz")
    with pytest.raises(ValueError, match="'no_such_pkg.sub' not found"):
        module_source_path("no_such_pkg.sub")
    with pytest.raises(ValueError, match=r"'sys' has no \.py source file"):
        module_source_path("sys")  # built in
    with pytest.raises(ValueError, match="unknown demo split 'test'"):
        demo_documents("test")  # type: ignore[arg-type]


def test_demo_tokensets_seeded_and_disjoint() -> None:
    c, h = demo_tokensets(128, 32, 0, n_heldout_seqs=50)
    c_again, h_again = demo_tokensets(128, 32, 0, n_heldout_seqs=50)
    c_other, _ = demo_tokensets(128, 32, 1, n_heldout_seqs=50)
    assert c.tokens.shape == (32, 128) and h.tokens.shape == (50, 128)
    assert c.tokenizer_identity == h.tokenizer_identity == "bytes-utf8"
    assert c.seed == 0 and h.seed is None
    assert c.fingerprint == c_again.fingerprint and h.fingerprint == h_again.fingerprint
    assert c.fingerprint != c_other.fingerprint
    assert "demo train split (102 modules)" in c.source
    tok = ByteTokenizer()
    train_stream = encode_documents(demo_documents("train"), tok).astype(np.uint8).tobytes()
    held_stream = encode_documents(demo_documents("heldout"), tok)
    np.testing.assert_array_equal(h.tokens, held_stream[: 50 * 128].reshape(50, 128))
    for row in c.tokens:  # every calibration window is text of the train modules
        assert train_stream.find(row.astype(np.uint8).tobytes()) >= 0


def test_tokensets_with_hf_tokenizer_keep_identity_and_decode(tmp_path: Path) -> None:
    tok = HFTokenizer(_train_bpe(tmp_path / "tokenizer.json", CORPUS, vocab_size=300))
    calib = [Document(f"c{i}", CORPUS[1] + f" {i}") for i in range(30)]
    held = [Document("h", CORPUS[0] * 10)]
    c, h = build_tokensets(
        calib, tok, seq_len=4, n_calibration_seqs=6, seed=2, heldout_documents=held
    )
    assert c.tokenizer_identity == h.tokenizer_identity == tok.identity
    stream = tok.encode(held[0].text)
    assert tok.decode(h.tokens.ravel()) == tok.decode(stream[: h.n_tokens])
    c_bytes, _ = build_tokensets(
        calib, ByteTokenizer(), seq_len=4, n_calibration_seqs=6, seed=2, heldout_documents=held
    )
    assert c_bytes.fingerprint != c.fingerprint
