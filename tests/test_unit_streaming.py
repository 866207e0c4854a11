"""Unit streaming (one unit group's variants on the device at a time) against block
streaming and the resident evaluator: equal scores on dense-layout, packed and nested
stores, on mixtures of experts (shared expert, tied experts, removed experts), with reuse
and parked states; equal bytes read; clear refusals where a block cannot be split."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import pytest
from tiny_workspace import scaled_random_model

from allocsearch.data.tokenset import TokenSet
from allocsearch.evaluate import Evaluator, KLDivergence, StreamingEvaluator
from allocsearch.models import adapter_for_config, load_model
from allocsearch.pruners import MagnitudePruner, SparseGPTPruner, WandaPruner
from allocsearch.supernet import store_writer as store_mod  # where the writer looks it up
from allocsearch.supernet.build import NoCalibrationTokensWarning, build_supernet, supernet_units
from allocsearch.supernet.experts import removal_grid, removed_levels
from allocsearch.supernet.levels import equal_step_grid

LLAMA = {
    "model_type": "llama",
    "vocab_size": 48,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
}
QWEN2_MOE = {  # a shared expert and its gate: router, 4 expert groups, shared
    "model_type": "qwen2_moe",
    "vocab_size": 48,
    "hidden_size": 16,
    "intermediate_size": 32,
    "moe_intermediate_size": 8,
    "shared_expert_intermediate_size": 12,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "tie_word_embeddings": False,
}
QWEN3_MOE = {  # no shared expert: the last expert closes the block
    **{k: v for k, v in QWEN2_MOE.items() if k != "shared_expert_intermediate_size"},
    "model_type": "qwen3_moe",
    "norm_topk_prob": True,
}
SEQ_LEN, N_SEQ, MICRO_BATCH = 8, 6, 16


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("unit_streaming"))


@functools.cache
def _store(cfg_items: tuple, kind: str, root: str):
    """(eager model, lazy model, calibration, store) of one model and store kind."""
    cfg = dict(cfg_items)
    adapter = adapter_for_config(cfg)
    path = f"{root}/{cfg['model_type']}-{kind}"
    eager = scaled_random_model(cfg, Path(path + "-model"))
    tokens = np.random.default_rng(1).integers(0, cfg["vocab_size"], size=(N_SEQ, SEQ_LEN))
    calib = TokenSet(tokens.astype(np.int32), "random ids", "ids", 1)
    tie = kind == "tied"
    removal = kind == "removal"
    units = supernet_units(adapter, "unstructured", tie_experts=tie, expert_removal=removal)
    if removal:
        grid = removal_grid(units, center=0.5, step_weights=16, steps_each_side=1)
    else:
        numel = [u.numel for u in units]
        grid = equal_step_grid(numel, center=0.5, step_weights=32, steps_each_side=2)
    pruner = {"magnitude": MagnitudePruner, "wanda": WandaPruner}.get(kind, SparseGPTPruner)
    pruner = pruner(blocksize=8) if pruner is SparseGPTPruner else pruner()
    layout = "dense" if kind == "dense_layout" else "auto"
    original = store_mod.variants_to_tensors
    store_mod.variants_to_tensors = lambda v, dtype, _layout: original(v, dtype, layout)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoCalibrationTokensWarning)
            store = build_supernet(
                eager,
                calib,
                pruner=pruner,
                grid=grid,
                structure="unstructured",
                input_mode="dense",
                out_dir=path,
                batch_size=3,
                progress=False,
                tie_experts=tie,
                expert_removal=removal,
            )
    finally:
        store_mod.variants_to_tensors = original
    return eager, load_model(path + "-model", lazy=True), calib, store


def evaluators(root, cfg, kind, **kw):
    """(resident, block-streaming, unit-streaming evaluators, store), same settings."""
    eager, lazy, calib, store = _store(tuple(sorted(cfg.items())), kind, root)
    common = dict(metric=KLDivergence(), micro_batch_tokens=MICRO_BATCH, **kw)
    resident = Evaluator(
        eager, store.spec, store.all_variants(), store.unit_params, calib, **common
    )
    block = StreamingEvaluator(lazy, store, calib, **common)
    unit = StreamingEvaluator(lazy, store, calib, stream_unit="unit", **common)
    return resident, block, unit, store


def random_choices(spec, n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, spec.num_levels, size=(n, spec.num_units)).astype(np.int32)


def assert_all_equal(resident, block, unit, choices, fidelity=24, seed=0):
    want = resident(choices, fidelity=fidelity, batch_seed=seed)
    got_block = block(choices, fidelity=fidelity, batch_seed=seed)
    got_unit = unit(choices, fidelity=fidelity, batch_seed=seed)
    np.testing.assert_allclose(got_unit, got_block, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got_unit, want, rtol=1e-5, atol=1e-7)
    assert np.ptp(want) > 1e-4  # the candidates differ: the check is not vacuous
    return got_unit


@pytest.mark.parametrize(
    ("kind", "per_call"), [("dense_layout", 1), ("sparsegpt", 3), ("magnitude", 2), ("wanda", 1)]
)
def test_dense_llama_scores_equal_block_streaming_and_resident(root, kind, per_call):
    """sparsegpt: dense variants in the packed layout ("auto" packs them here);
    dense_layout: the same forced into the dense layout; magnitude, wanda: nested."""
    resident, block, unit, store = evaluators(
        root, LLAMA, kind, candidates_per_call=per_call, reuse=False
    )
    kinds = {e.get("layout", e["kind"]) for e in store.manifest["variants"].values()}
    expected = {"dense_layout": {"dense"}, "sparsegpt": {"packed"}}.get(kind, {"nested"})
    assert kinds == expected
    assert_all_equal(resident, block, unit, random_choices(store.spec, 5, seed=2))
    # same variants read, same bytes: the groups partition each block's parameters
    assert unit.last_stats.store_bytes == block.last_stats.store_bytes > 0
    assert unit.last_stats.variants_read == block.last_stats.variants_read
    assert unit.last_stats.blocks_streamed == block.last_stats.blocks_streamed == 2
    np.testing.assert_allclose(unit.teacher[0], block.teacher[0], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("cfg", "kind"),
    [(QWEN2_MOE, "sparsegpt"), (QWEN3_MOE, "tied"), (QWEN3_MOE, "removal")],
    ids=["shared-expert", "tied-experts", "removed-experts"],
)
def test_moe_scores_equal_block_streaming_and_resident(root, cfg, kind):
    resident, block, unit, store = evaluators(root, cfg, kind, reuse=False)
    spec = store.spec
    choices = random_choices(spec, 4, seed=3)
    if kind == "removal":  # remove every removable expert of candidate 0, none of 1
        removable = removed_levels(spec)
        last = spec.num_levels - 1
        can = removable[np.arange(spec.num_units), last]
        choices[0, can] = last[can]
        choices[1, can] = 0
        assert can.sum() >= 2
    scores = assert_all_equal(resident, block, unit, choices)
    assert np.all(scores > 0)
    assert unit.last_stats.store_bytes == block.last_stats.store_bytes


def test_reuse_and_parked_states_give_the_same_scores(root):
    """Children of a parent differing from block 1 on: the reference rides along, its
    states are recorded and reused; with every state parked on the host as well."""
    eager, lazy, calib, store = _store(tuple(sorted(LLAMA.items())), "sparsegpt", root)
    spec = store.spec
    parent = spec.center.astype(np.int32)
    late = [u for u in range(spec.num_units) if spec.units[u].block >= 1]
    choices = np.tile(parent, (4, 1))
    for j, row in enumerate(choices):
        row[late[j]] = (row[late[j]] + 1) % spec.num_levels[late[j]]
    common = dict(metric=KLDivergence(), micro_batch_tokens=MICRO_BATCH, candidates_per_call=2)
    resident = Evaluator(eager, spec, store.all_variants(), store.unit_params, calib, **common)
    resident.set_reference(parent)
    want = resident(choices, fidelity=24, batch_seed=0)
    for kw in ({}, {"max_device_state_bytes": 1, "max_device_reference_bytes": 1}):
        unit = StreamingEvaluator(lazy, store, calib, stream_unit="unit", **common, **kw)
        unit.set_reference(parent)
        for _ in range(2):
            got = unit(choices, fidelity=24, batch_seed=0)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        assert unit.last_stats.reused and unit.last_stats.blocks_run == 1.0


def test_perplexity_equals_block_streaming(root):
    _, block, unit, store = evaluators(root, LLAMA, "wanda")
    _, _, calib, _ = _store(tuple(sorted(LLAMA.items())), "wanda", root)
    choice = store.spec.center
    assert unit.perplexity(choice, calib) == pytest.approx(
        block.perplexity(choice, calib), rel=1e-6
    )
    assert unit.perplexity(None, calib) == pytest.approx(block.perplexity(None, calib), rel=1e-6)


def test_refusals_name_the_setting(root):
    eager, lazy, calib, store = _store(tuple(sorted(LLAMA.items())), "sparsegpt", root)
    with pytest.raises(ValueError, match=r"stream_unit 'layer' is not valid; choose one of"):
        StreamingEvaluator(lazy, store, calib, metric=KLDivergence(), stream_unit="layer")


def test_config_stream_unit_reaches_the_evaluator(root, monkeypatch):
    """``evaluator.stream_unit`` picks what a streaming evaluator holds; ``auto`` follows
    the memory plan's choice on this machine (block streaming when it fits, else unit)."""
    import types

    from allocsearch import pipeline
    from allocsearch.config import EvaluatorConfig, RunConfig
    from allocsearch.plan import core

    _, lazy, calib, store = _store(tuple(sorted(LLAMA.items())), "sparsegpt", root)
    for unit in ("block", "unit"):
        cfg = RunConfig(evaluator=EvaluatorConfig(execution="streaming", stream_unit=unit))
        ws = pipeline.Workspace(cfg, lazy, calib, calib)
        assert pipeline.make_evaluator(ws, store).stream_unit == unit
    cfg = RunConfig(evaluator=EvaluatorConfig(execution="streaming"))  # stream_unit: auto
    ws = pipeline.Workspace(cfg, lazy, calib, calib)
    asked = []
    for mode, want in (("streaming", "block"), ("streaming-unit", "unit")):

        def check_run(probe, command, mode=mode, **kw):
            asked.append((probe.evaluator.execution, probe.evaluator.stream_unit, command))
            return types.SimpleNamespace(mode=mode)

        monkeypatch.setattr(core, "check_run", check_run)
        assert pipeline.make_evaluator(ws, store).stream_unit == want
    assert asked == [("streaming", "auto", "search")] * 2
