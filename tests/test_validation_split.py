"""The validation split (issue 24 item 3): rows of the calibration source that are neither
calibration nor held-out rows and never change the calibration rows; validation queries
that score exactly what an evaluator of those rows scores (resident and streaming); an
EvoPress final pick by validation fitness; and compare tables that flag strategies whose
calibration and validation ranks differ."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from resume_worker import BUDGET, AdditiveEvaluator, additive_table, tiny_spec
from test_streaming import LLAMA, MICRO_BATCH, SEQ_LEN, _setup, random_choices

from allocsearch.config import ConfigError, config_from_dict
from allocsearch.data import ByteTokenizer, Document, build_tokensets
from allocsearch.data.demo_corpus import demo_tokensets
from allocsearch.data.encoder_sets import encoder_tokensets
from allocsearch.data.tokenset import (
    TokenSet,
    calibration_tokenset,
    minibatch,
    validation_tokenset,
)
from allocsearch.distributed.local import run_search
from allocsearch.evaluate import Evaluator, KLDivergence, StreamingEvaluator
from allocsearch.report.tables import RANK_FLAG, RANK_LEGEND, CompareRow, markdown_table
from allocsearch.search.evolutionary import EvolutionarySearcher

# --------------------------------------------------------------------------- data


def _starts(tokens: np.ndarray) -> set[int]:
    """Positions covered by rows of an arange stream (token id = position)."""
    return {int(t) for t in tokens.ravel()}


def test_validation_windows_are_disjoint_from_calibration_and_whole():
    stream = np.arange(1000, dtype=np.int32)  # id = position: rows say where they came from
    cal = calibration_tokenset(
        stream, seq_len=10, n_seq=30, seed=3, tokenizer_identity="ids", source="s"
    )
    val = validation_tokenset(
        stream,
        seq_len=10,
        n_seq=40,
        n_calibration_seqs=30,
        seed=3,
        tokenizer_identity="ids",
        source="s",
    )
    assert val.tokens.shape == (40, 10)
    assert not _starts(cal.tokens) & _starts(val.tokens)
    # each row is a contiguous window, rows are in stream order and do not overlap
    np.testing.assert_array_equal(val.tokens - val.tokens[:, :1], np.tile(np.arange(10), (40, 1)))
    assert np.all(np.diff(val.tokens[:, 0]) >= 10)
    again = validation_tokenset(
        stream, seq_len=10, n_seq=40, n_calibration_seqs=30, seed=3,
        tokenizer_identity="ids", source="s",
    )  # fmt: skip
    np.testing.assert_array_equal(again.tokens, val.tokens)
    # 1000 tokens hold 100 windows; 30 are calibration; the gaps hold at most 70 more
    with pytest.raises(ValueError, match=r"data.n_validation_seqs = 71 needs 71 \(set it to at"):
        validation_tokenset(
            stream, seq_len=10, n_seq=71, n_calibration_seqs=30, seed=3,
            tokenizer_identity="ids", source="s",
        )  # fmt: skip


def test_demo_validation_keeps_the_calibration_rows():
    cal, held = demo_tokensets(128, 64, 0, n_heldout_seqs=64)
    cal2, held2, val = demo_tokensets(128, 64, 0, n_heldout_seqs=64, n_validation_seqs=16)
    assert cal2.fingerprint == cal.fingerprint and held2.fingerprint == held.fingerprint
    assert val.n_seq == 16 and val.seq_len == 128
    cal_rows = {r.tobytes() for r in cal.tokens}
    assert not any(r.tobytes() in cal_rows for r in val.tokens)


def test_single_stream_validation_stays_before_the_heldout_tail():
    text = " ".join(f"w{i:04d}" for i in range(3000))  # 18,000 bytes, every word unique
    docs = [Document("a", text)]
    kw = dict(seq_len=30, n_calibration_seqs=20, seed=1, n_heldout_seqs=10)
    cal, held = build_tokensets(docs, ByteTokenizer(), **kw)
    cal2, held2, val = build_tokensets(docs, ByteTokenizer(), **kw, n_validation_seqs=25)
    np.testing.assert_array_equal(cal2.tokens, cal.tokens)
    np.testing.assert_array_equal(held2.tokens, held.tokens)
    where = [text.encode().index(bytes(r.astype(np.uint8))) for r in val.tokens]
    cal_at = [text.encode().index(bytes(r.astype(np.uint8))) for r in cal.tokens]
    cut = len(text) - 10 * 30
    assert max(where) + 30 <= cut  # never in the held-out tail
    for w in where:  # never overlapping a calibration window
        assert all(w + 30 <= c or c + 30 <= w for c in cal_at)


def test_encoder_validation_rows_are_pool_rows_not_calibration_rows():
    docs = [Document(f"d{i}", ". ".join(f"Sentence {i} {j}" for j in range(40))) for i in range(6)]
    kw = dict(seq_len=16, n_calibration_seqs=10, seed=2, n_heldout_seqs=4)
    cal, held = encoder_tokensets(docs, ByteTokenizer(), **kw)
    cal2, held2, val = encoder_tokensets(docs, ByteTokenizer(), **kw, n_validation_seqs=6)
    np.testing.assert_array_equal(cal2.tokens, cal.tokens)
    np.testing.assert_array_equal(held2.tokens, held.tokens)
    taken = {r.tobytes() for r in np.concatenate([cal.tokens, held.tokens])}
    assert val.n_seq == 6 and not any(r.tobytes() in taken for r in val.tokens)


def test_config_n_validation_seqs():
    assert config_from_dict({}).data.n_validation_seqs is None  # up to 16
    assert config_from_dict({"data": {"n_validation_seqs": 0}}).data.n_validation_seqs == 0
    with pytest.raises(ConfigError, match=r"data.n_validation_seqs = -1 must be >= 0 \(0 turns"):
        config_from_dict({"data": {"n_validation_seqs": -1}})


# --------------------------------------------------------------------------- evaluators


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 3-block Llama wanda supernet (test_streaming's), its calibration set (8 rows) and
    6 validation rows."""
    root = str(tmp_path_factory.mktemp("validation"))
    eager, lazy, calib, store = _setup(tuple(sorted(LLAMA.items())), "wanda", root)
    ids = np.random.default_rng(9).integers(0, LLAMA["vocab_size"], size=(6, SEQ_LEN))
    validation = TokenSet(ids.astype(np.int32), "random validation ids", "ids", 9)
    return eager, lazy, calib, validation, store


def _resident(eager, store, calibration, validation=None):
    return Evaluator(
        eager, store.spec, store.all_variants(), store.unit_params, calibration,
        metric=KLDivergence(), micro_batch_tokens=MICRO_BATCH, validation=validation,
    )  # fmt: skip


def test_validation_scores_are_the_scores_of_the_validation_rows(small):
    eager, _, calib, validation, store = small
    resident = _resident(eager, store, calib, validation)
    direct = _resident(eager, store, validation)  # the validation rows as its calibration set
    choices = random_choices(store.spec, 4, seed=5)
    for fidelity, seed in [(6 * SEQ_LEN, 0), (3 * SEQ_LEN, 4)]:
        want = direct(choices, fidelity=fidelity, batch_seed=seed)
        got = resident(choices, fidelity=fidelity, batch_seed=seed, split="validation")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        rows = resident.minibatch_rows(fidelity, seed, split="validation")
        assert rows.min() >= calib.n_seq
        np.testing.assert_array_equal(
            np.concatenate([calib.tokens, validation.tokens])[rows],
            minibatch(validation, fidelity, seed),
        )
    assert np.ptp(want) > 1e-3
    with pytest.raises(ValueError, match="split 'test' is not one of"):
        resident(choices, fidelity=SEQ_LEN, batch_seed=0, split="test")
    short = TokenSet(validation.tokens[:, :4], "short", "ids", 9)
    with pytest.raises(ValueError, match="validation sequences have 4 tokens, calibration"):
        _resident(eager, store, calib, short)


def test_streaming_validation_scores_and_unchanged_calibration_scores(small):
    eager, lazy, calib, validation, store = small
    plain = _resident(eager, store, calib)
    direct = _resident(eager, store, validation)
    streamed = StreamingEvaluator(
        lazy, store, calib, metric=KLDivergence(), micro_batch_tokens=MICRO_BATCH,
        validation=validation,
    )  # fmt: skip
    choices = random_choices(store.spec, 4, seed=5)
    got = streamed(choices, fidelity=3 * SEQ_LEN, batch_seed=4, split="validation")
    want = direct(choices, fidelity=3 * SEQ_LEN, batch_seed=4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # calibration queries are unchanged by the validation rows
    np.testing.assert_allclose(
        streamed(choices, fidelity=64, batch_seed=2),
        plain(choices, fidelity=64, batch_seed=2),
        rtol=1e-5,
        atol=1e-7,
    )
    with pytest.raises(ValueError, match="a validation query needs validation rows"):
        plain(choices, fidelity=SEQ_LEN, batch_seed=0, split="validation")


# --------------------------------------------------------------------------- EvoPress


class SplitEvaluate:
    """Calibration: the additive evaluator; validation: sum of (level - 2)^2 * weight,
    which prefers the uniform allocation; records every call."""

    def __init__(self):
        self.calibration = AdditiveEvaluator(additive_table())
        self.calls: list[tuple[np.ndarray, int, str]] = []

    def __call__(self, choices, *, fidelity, batch_seed, split="calibration"):
        choices = np.asarray(choices)
        self.calls.append((choices.copy(), int(fidelity), split))
        if split == "calibration":
            return self.calibration(choices, fidelity=fidelity, batch_seed=batch_seed)
        weights = np.arange(1, choices.shape[1] + 1)[::-1]
        return (((choices - 2.0) ** 2) * weights).sum(axis=1).astype(np.float32) + 0.01


def test_evopress_final_pick_is_by_validation_and_counted():
    settings = dict(generations=6, offspring=6, survivors=(3, 1), tokens=(64, 256))
    by_cal = EvolutionarySearcher(**settings, final_parents=3, final_tokens=128)
    by_val = EvolutionarySearcher(
        **settings, final_parents=3, final_tokens=96, final_split="validation"
    )
    ev_cal, ev_val = SplitEvaluate(), SplitEvaluate()
    key = jax.random.key(4)
    r_cal = run_search(by_cal, ev_cal, tiny_spec(), BUDGET, key=key)
    r_val = run_search(by_val, ev_val, tiny_spec(), BUDGET, key=key)
    # the generations are the same; only the last query differs
    assert [c[2] for c in ev_val.calls[:-1]] == ["calibration"] * (len(ev_val.calls) - 1)
    for a, b in zip(ev_cal.calls[:-1], ev_val.calls[:-1], strict=True):
        np.testing.assert_array_equal(a[0], b[0])
    last, fidelity, split = ev_val.calls[-1]
    assert split == "validation" and fidelity == 96
    np.testing.assert_array_equal(last, ev_cal.calls[-1][0])  # the same candidates
    assert len(last) >= 2  # the start and the last distinct parents
    scores = ev_val(last, fidelity=96, batch_seed=0, split="validation")
    np.testing.assert_array_equal(r_val.best_choice, last[np.argmin(scores)])
    assert r_val.best_fitness == pytest.approx(float(scores.min()))
    cal_scores = ev_cal.calibration(last, fidelity=128, batch_seed=0)
    assert np.argmin(scores) != np.argmin(cal_scores) or len(last) == 1
    n = len(last)
    assert r_val.evaluations == r_cal.evaluations
    assert r_val.tokens == r_cal.tokens - n * 128 + n * 96
    assert r_val.info["validation_evaluations"] == n
    assert r_val.info["validation_tokens"] == n * 96
    assert "validation_tokens" not in r_cal.info
    with pytest.raises(ValueError, match="final_split 'test' is not one of"):
        EvolutionarySearcher(final_split="test")


# --------------------------------------------------------------------------- report


def _row(name, calibration, validation):
    return CompareRow(name, calibration, 30.0, 10, 1.0, 0.7, validation=validation)


def test_compare_table_flags_rank_disagreement():
    # calibration ranks: evopress 1, dp 2, uniform 3; validation: dp 1, uniform 2, evopress 3
    rows = [_row("uniform", 0.05, 0.06), _row("evopress", 0.03, 0.07), _row("dp", 0.04, 0.05)]
    table = markdown_table(rows)
    lines = table.splitlines()
    assert lines[0].split("|")[2].strip() == "calibration"
    assert lines[0].split("|")[3].strip() == "validation"
    assert lines[2].startswith(f"| uniform {RANK_FLAG} ")
    assert lines[3].startswith(f"| evopress {RANK_FLAG} ")
    assert lines[4].startswith(f"| dp {RANK_FLAG} ")
    assert table.endswith(RANK_LEGEND + "\n")
    # uniform and dp swap places only: evopress keeps rank 1 and is not flagged
    rows = [_row("uniform", 0.05, 0.05), _row("evopress", 0.03, 0.02), _row("dp", 0.04, 0.06)]
    lines = markdown_table(rows).splitlines()
    assert f"evopress {RANK_FLAG}" not in lines[3] and f"dp {RANK_FLAG}" in lines[4]
    # same ranks: no flag, no legend; no validation: the old columns
    agree = markdown_table([_row("a", 0.01, 0.02), _row("b", 0.02, 0.03)])
    assert RANK_FLAG not in agree
    old = markdown_table([_row("a", 0.01, None)])
    assert "validation" not in old and old.splitlines()[0].split("|")[2].strip() == "fitness"


def test_an_unset_validation_count_takes_what_the_corpus_spares():
    """Unset data.n_validation_seqs: up to 16 rows, all free ones where fewer, none (no
    split) where none; a set count stays exact (the error above)."""
    from allocsearch.data.validation import AtMost, draw_validation, validation_request

    assert validation_request(None) == AtMost(16) and validation_request(5) == 5
    picked = draw_validation(5, AtMost(16), 0, "corpus")
    np.testing.assert_array_equal(picked, np.arange(5))
    assert draw_validation(0, AtMost(16), 0, "corpus").size == 0
    assert draw_validation(40, AtMost(16), 0, "corpus").size == 16
    stream = np.arange(1000) % 97
    none = validation_tokenset(
        stream, seq_len=10, n_seq=AtMost(16), n_calibration_seqs=100, seed=3,
        tokenizer_identity="ids", source="s",
    )  # fmt: skip
    assert none is None  # 100 windows, all calibration
    kw = dict(seq_len=10, n_calibration_seqs=30, seed=3, tokenizer_identity="ids", source="s")
    every = validation_tokenset(stream, n_seq=AtMost(1000), **kw)
    assert 0 < every.n_seq <= 70  # every free window, as many as an exact count can take
    exact = validation_tokenset(stream, n_seq=every.n_seq, **kw)
    np.testing.assert_array_equal(exact.tokens, every.tokens)
    with pytest.raises(ValueError, match="needs"):
        validation_tokenset(stream, n_seq=every.n_seq + 1, **kw)
