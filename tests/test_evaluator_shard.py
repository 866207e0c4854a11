"""Scoring a shard of a minibatch: shard means weighted by their sequence counts give the
unsharded score (the split a Ray backend uses when a query has fewer candidates than
actors), and reference reuse is kept per shard."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
import pytest

from allocsearch.data.tokenset import TokenSet
from allocsearch.evaluate import KLDivergence
from allocsearch.evaluate.evaluator import Evaluator, shard_rows
from allocsearch.models import HFModel, adapter_for_config
from allocsearch.pruners import MagnitudePruner, accumulate_stats
from allocsearch.supernet.spec import SupernetSpec, Unit

TINY = {
    "model_type": "llama",
    "vocab_size": 48,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
LEVELS = np.array([0.0, 0.25, 0.5, 0.75])
SEQ_LEN, N_SEQ = 8, 14


@dataclass(frozen=True)
class TinyEvaluatorFactory:
    """Builds the same small random-Llama evaluator in any process (picklable)."""

    seed: int = 0
    micro_batch_tokens: int = 24  # 3 sequences per compiled call
    # validation rows (random ids after the calibration rows' draw); with
    # validation_as_calibration they are the calibration set instead (a direct scorer)
    validation_seqs: int = 0
    validation_as_calibration: bool = False

    def __call__(self) -> Evaluator:
        adapter = adapter_for_config(TINY)
        params = adapter.init_params(jax.random.key(self.seed))
        rng = np.random.default_rng(self.seed)
        variants, units = {}, []
        for lay in adapter.layers():
            x = rng.normal(size=(24, lay.in_features)).astype(np.float32)
            variants[lay.weight_name] = MagnitudePruner().prune(
                params[lay.weight_name], accumulate_stats(None, x), LEVELS
            )
            units.append(Unit(lay.name, lay.role, lay.block, (lay.name,), lay.numel, lay.numel))
        n = len(units)
        spec = SupernetSpec(
            tuple(units), np.tile(LEVELS, (n, 1)), np.ones((n, len(LEVELS)), bool), np.full(n, 1)
        )
        tokens = rng.integers(0, TINY["vocab_size"], size=(N_SEQ, SEQ_LEN)).astype(np.int32)
        calibration, validation = TokenSet(tokens, "random ids", "ids", 0), None
        if self.validation_seqs:
            held = rng.integers(0, TINY["vocab_size"], size=(self.validation_seqs, SEQ_LEN))
            validation = TokenSet(held.astype(np.int32), "random validation ids", "ids", 0)
            if self.validation_as_calibration:
                calibration, validation = validation, None
        return Evaluator(
            HFModel(adapter, params),
            spec,
            variants,
            [(name,) for name in variants],
            calibration,
            metric=KLDivergence(),
            micro_batch_tokens=self.micro_batch_tokens,
            validation=validation,
        )


def offspring(spec: SupernetSpec, n: int, seed: int) -> np.ndarray:
    """int32[n, L]: a random parent and n - 1 children differing from it in one unit."""
    rng = np.random.default_rng(seed)
    parent = rng.integers(0, spec.num_levels).astype(np.int32)
    kids = [parent]
    for _ in range(n - 1):
        kid = parent.copy()
        u = int(rng.integers(spec.num_units))
        kid[u] = (kid[u] + 1) % spec.num_levels[u]
        kids.append(kid)
    return np.stack(kids)


@pytest.fixture(scope="module")
def evaluator():
    return TinyEvaluatorFactory()()


def test_shard_rows_are_near_equal_contiguous_splits():
    rows = np.array([9, 3, 7, 1, 5, 0, 2])
    got = [shard_rows(rows, i, 3).tolist() for i in range(3)]
    assert got == [[9, 3, 7], [1, 5], [0, 2]]
    assert [len(shard_rows(rows, i, 9)) for i in range(9)] == [1] * 7 + [0, 0]
    assert shard_rows(rows, 0, 1).tolist() == rows.tolist()
    with pytest.raises(ValueError, match=r"shard index must be an int in 0\.\.2, got 3"):
        shard_rows(rows, 3, 3)
    with pytest.raises(ValueError, match="shard count must be an int >= 1, got 0"):
        shard_rows(rows, 0, 0)


@pytest.mark.parametrize("count", [2, 3, 5, 11])
def test_weighted_shard_means_equal_the_unsharded_score(evaluator, count):
    choices = offspring(evaluator.spec, 3, seed=count)
    fidelity, seed = 11 * SEQ_LEN, 4  # 11 sequences: uneven splits
    whole = evaluator(choices, fidelity=fidelity, batch_seed=seed)
    rows = evaluator.minibatch_rows(fidelity, seed)
    total = np.zeros(len(choices))
    for i in range(count):
        part = evaluator.minibatch_rows(fidelity, seed, (i, count))
        np.testing.assert_array_equal(part, shard_rows(rows, i, count))
        mean = evaluator(choices, fidelity=fidelity, batch_seed=seed, shard=(i, count))
        total += len(part) * mean
    np.testing.assert_allclose(total / len(rows), whole, rtol=1e-6, atol=1e-7)
    assert np.all(whole > 0)


def test_reference_states_are_kept_per_shard(evaluator):
    choices = offspring(evaluator.spec, 6, seed=1)
    evaluator.set_reference(choices[0])
    want = [evaluator(choices, fidelity=64, batch_seed=2, shard=(i, 2)) for i in range(2)]
    assert evaluator.last_stats.reused and evaluator.last_stats.computed_reference
    # shard 1's states are not shard 0's: switching shards recomputes them
    again = evaluator(choices, fidelity=64, batch_seed=2, shard=(0, 2))
    assert evaluator.last_stats.reused and evaluator.last_stats.computed_reference
    evaluator.set_reference(None)
    np.testing.assert_allclose(again, want[0], rtol=1e-6)
    reuse_free = TinyEvaluatorFactory()()
    reuse_free.reuse = False
    for i in range(2):
        plain = reuse_free(choices, fidelity=64, batch_seed=2, shard=(i, 2))
        np.testing.assert_allclose(want[i], plain, rtol=1e-5, atol=1e-7)


def test_bad_shards_are_refused(evaluator):
    choices = offspring(evaluator.spec, 1, seed=0)
    with pytest.raises(ValueError, match=r"shard \(3, 4\) of the minibatch .* has 2 sequences"):
        evaluator(choices, fidelity=2 * SEQ_LEN, batch_seed=0, shard=(3, 4))
    with pytest.raises(ValueError, match=r"shard must be a pair \(index, count\), got 3"):
        evaluator(choices, fidelity=2 * SEQ_LEN, batch_seed=0, shard=3)
    with pytest.raises(ValueError, match=r"shard index must be an int in 0\.\.1, got 2"):
        evaluator(choices, fidelity=2 * SEQ_LEN, batch_seed=0, shard=(2, 2))
