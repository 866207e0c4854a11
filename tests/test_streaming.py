"""The block-streaming evaluator against the resident one: equal scores on every store
kind, with and without reuse and batching, equal perplexities and searches, one compiled
block program across queries, and bytes read only for the variants a query uses."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from jax import monitoring

from allocsearch.data.tokenset import TokenSet
from allocsearch.distributed.local import run_search
from allocsearch.evaluate import (
    AllocationEvaluator,
    Evaluator,
    HiddenStateMSE,
    KLDivergence,
    StreamingEvaluator,
    TopKKLDivergence,
)
from allocsearch.evaluate import streaming as streaming_mod
from allocsearch.models import HFModel, adapter_for_config, load_model, save_model
from allocsearch.models.hf import LazyParams
from allocsearch.pruners import (
    MagnitudePruner,
    NMMagnitudePruner,
    NMSparseGPTPruner,
    SparseGPTPruner,
    StructuredPruner,
    WandaPruner,
)
from allocsearch.search.budget import Budget
from allocsearch.search.coarse_to_fine import centred_grid
from allocsearch.search.evolutionary import EvolutionarySearcher
from allocsearch.supernet.build import build_supernet, supernet_units, unit_group_counts
from allocsearch.supernet.levels import equal_step_grid, nm_grid

LLAMA = {
    "model_type": "llama",
    "vocab_size": 48,
    "hidden_size": 16,
    "intermediate_size": 16,  # every linear layer 16 x 16: one shape, few compilations
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
}
GPT2 = {"model_type": "gpt2", "vocab_size": 40, "n_embd": 16, "n_layer": 2, "n_head": 2}
BERT = {
    "model_type": "bert",
    "vocab_size": 40,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 16,
}
SEQ_LEN, N_SEQ = 8, 8
MICRO_BATCH = 16  # tokens: 2 sequences per call, several chunks per minibatch


def random_params(adapter, seed: int) -> dict[str, np.ndarray]:
    """Numpy-drawn parameters (no JAX random compiles): linear weights uniform in
    +-1/sqrt(in), embeddings N(0, 1), norm scales near 1, biases small."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in adapter.param_shapes.items():
        if "norm" in name.lower() or "ln_" in name:
            w = 1.0 + 0.1 * rng.standard_normal(shape) if name.endswith("weight") else 0.0
        elif "embed" in name or "wte" in name or "wpe" in name:
            w = rng.standard_normal(shape)
        elif name.endswith("bias"):
            w = 0.05 * rng.standard_normal(shape)
        else:
            bound = 1.0 / np.sqrt(shape[-1])
            w = rng.uniform(-bound, bound, size=shape)
        params[name] = np.broadcast_to(np.asarray(w, np.float32), shape).copy()
    return params


@functools.cache
def saved_model(cfg_items: tuple, root: str) -> str:
    cfg = dict(cfg_items)
    adapter = adapter_for_config(cfg)
    path = save_model(HFModel(adapter, random_params(adapter, 0)), f"{root}/{cfg['model_type']}")
    return str(path)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("streaming"))


def calibration(vocab: int) -> TokenSet:
    tokens = np.random.default_rng(1).integers(0, vocab, size=(N_SEQ, SEQ_LEN)).astype(np.int32)
    return TokenSet(tokens=tokens, source="random ids", tokenizer_identity="ids", seed=1)


STORES = {
    "sparsegpt": ("unstructured", lambda: SparseGPTPruner(blocksize=8)),
    "wanda": ("unstructured", WandaPruner),
    "magnitude": ("unstructured", MagnitudePruner),
    "nm_magnitude": ("nm", lambda: NMMagnitudePruner(m=4)),
    "nm_sparsegpt": ("nm", lambda: NMSparseGPTPruner(m=4)),
    "structured": ("heads_neurons", lambda: StructuredPruner),
}


def make_grid(adapter, structure):
    units = supernet_units(adapter, structure)
    if structure == "nm":
        widths = [layer.in_features for layer in adapter.layers()]
        return nm_grid([(0, 4), (1, 4), (2, 4), (3, 4)], in_features=widths, center=(2, 4))
    if structure == "heads_neurons":
        groups = unit_group_counts(adapter, structure)
        return centred_grid(units, np.full(len(units), 0.5), 0.25, groups=groups, steps_each_side=2)
    numel = [u.numel for u in units]
    return equal_step_grid(numel, center=0.5, step_weights=64, steps_each_side=2)


@functools.cache
def _models(cfg_items: tuple, root: str):
    """(eager model, lazy model, calibration set), loaded once: stores of every kind share
    the adapters, hence the compiled programs."""
    path = saved_model(cfg_items, root)
    calib = calibration(dict(cfg_items)["vocab_size"])
    return load_model(path), load_model(path, lazy=True), calib


@functools.cache
def _setup(cfg_items: tuple, kind: str, root: str):
    cfg = dict(cfg_items)
    eager, lazy, calib = _models(cfg_items, root)
    structure, pruner = STORES[kind]
    store = build_supernet(
        eager,
        calib,
        pruner=pruner(),
        grid=make_grid(eager.adapter, structure),
        structure=structure,
        input_mode="dense",
        out_dir=f"{root}/{cfg['model_type']}-{kind}",
        batch_size=4,
        progress=False,
    )
    return eager, lazy, calib, store


@pytest.fixture(scope="module")
def setup(root):
    return lambda kind, cfg=LLAMA: _setup(tuple(sorted(cfg.items())), kind, root)


def pair(setup, kind, *, cfg=LLAMA, metric=None, stream_kw=None, **kw):
    """(resident evaluator, streaming evaluator, store) with the same settings ``kw``
    (and ``stream_kw`` for the streaming one only)."""
    eager, lazy, calib, store = setup(kind, cfg)
    metric = metric or KLDivergence()
    common = dict(metric=metric, micro_batch_tokens=MICRO_BATCH, **kw)
    resident = Evaluator(
        eager, store.spec, store.all_variants(), store.unit_params, calib, **common
    )
    streamed = StreamingEvaluator(lazy, store, calib, **common, **(stream_kw or {}))
    return resident, streamed, store


def random_choices(spec, n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, spec.num_levels, size=(n, spec.num_units)).astype(np.int32)


def offspring(spec, parent, n, seed):
    """Copies of ``parent`` with one or two units moved (as EvoPress mutations)."""
    rng = np.random.default_rng(seed)
    out = np.tile(parent, (n, 1))
    for row in out:
        for u in rng.choice(spec.num_units, size=rng.integers(1, 3), replace=False):
            row[u] = rng.integers(0, spec.num_levels[u])
    return out


# --------------------------------------------------------------------------- agreement


@pytest.mark.parametrize(
    ("kind", "per_call"),
    [("sparsegpt", 1), ("wanda", 1)] + [(kind, 3) for kind in STORES],
)
def test_scores_equal_resident(setup, kind, per_call):
    resident, streamed, store = pair(setup, kind, candidates_per_call=per_call, reuse=False)
    choices = random_choices(store.spec, 5, seed=2)
    for fidelity, seed in [(32, 0), (64, 3)]:
        want = resident(choices, fidelity=fidelity, batch_seed=seed)
        got = streamed(choices, fidelity=fidelity, batch_seed=seed)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        assert got.dtype == np.float32 and got.shape == (5,)
    assert np.ptp(want) > 1e-3  # the candidates differ: the check is not vacuous


@pytest.mark.parametrize("kind", ["sparsegpt", "magnitude"])  # dense and nested
def test_accelerator_stack_assembly_equals_the_cpu_aliased_stacks(setup, kind):
    """On CPU the stacks are read into aligned host buffers that device_put aliases; on an
    accelerator only the read levels move and are stacked on the device. Both paths give
    the resident scores (the accelerator one is forced here: CI has no GPU)."""
    resident, streamed, store = pair(setup, kind, candidates_per_call=2, reuse=False)
    assert streamed._host_is_device  # CPU backend
    _, assembled, _ = pair(setup, kind, candidates_per_call=2, reuse=False)
    assembled._host_is_device = False
    choices = random_choices(store.spec, 3, seed=4)
    want = resident(choices, fidelity=32, batch_seed=1)
    np.testing.assert_allclose(streamed(choices, fidelity=32, batch_seed=1), want, rtol=1e-5)
    np.testing.assert_allclose(assembled(choices, fidelity=32, batch_seed=1), want, rtol=1e-5)
    assert streamed.last_stats.store_bytes == assembled.last_stats.store_bytes > 0


@pytest.mark.parametrize("kind", ["sparsegpt", "wanda", "structured"])
@pytest.mark.parametrize("per_call", [1, 4])
def test_reuse_scores_equal_resident(setup, kind, per_call):
    resident, streamed, store = pair(setup, kind, candidates_per_call=per_call, reuse=True)
    spec = store.spec
    parent = spec.center.astype(np.int32)
    resident.set_reference(parent)
    streamed.set_reference(parent)
    for seed, batch_seed in enumerate([0, 1, 1]):
        choices = offspring(spec, parent, 6, seed)
        want = resident(choices, fidelity=48, batch_seed=batch_seed)
        got = streamed(choices, fidelity=48, batch_seed=batch_seed)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        stats = streamed.last_stats
        assert stats.reused == resident.last_stats.reused
        assert stats.computed_reference == resident.last_stats.computed_reference
        if per_call == 1:  # larger groups differ: the reference rides in one of them
            assert stats.blocks_run == pytest.approx(resident.last_stats.blocks_run)
    # Second call on a minibatch: the recorded states are reused, not recomputed.
    assert stats.reused and not stats.computed_reference
    assert stats.blocks_run < streamed._nb


def test_auto_reference_and_topk_metric(setup):
    resident, streamed, store = pair(
        setup, "wanda", metric=TopKKLDivergence(k=5), candidates_per_call=2
    )
    parent = store.spec.center.astype(np.int32)
    choices = offspring(store.spec, parent, 7, seed=9)
    for seed in (0, 0, 1):
        want = resident(choices, fidelity=64, batch_seed=seed)
        got = streamed(choices, fidelity=64, batch_seed=seed)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        assert streamed.last_stats.reused == resident.last_stats.reused


@pytest.mark.parametrize("kind", ["sparsegpt", "wanda"])
def test_perplexity_equals_resident(setup, kind):
    resident, streamed, store = pair(setup, kind)
    heldout = TokenSet(
        np.random.default_rng(5).integers(0, LLAMA["vocab_size"], (5, 8)).astype(np.int32),
        "held-out ids",
        "ids",
        None,
    )
    choice = random_choices(store.spec, 1, seed=4)[0]
    for c in (None, choice):
        assert streamed.perplexity(c, heldout) == pytest.approx(
            resident.perplexity(c, heldout), rel=1e-6
        )


def test_teacher_is_on_the_host_and_equal(setup):
    resident, streamed, _ = pair(setup, "wanda")
    for got, want in zip(streamed.teacher, resident.teacher, strict=True):
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-6)


def test_evopress_search_is_identical(setup):
    resident, streamed, store = pair(setup, "sparsegpt", candidates_per_call=3)
    spec = store.spec
    searcher = EvolutionarySearcher(generations=4, offspring=6, survivors=(2, 1), tokens=(32, 64))
    budget = Budget(kind="params", target=0.5)
    results = [
        run_search(searcher, ev, spec, budget, key=jax.random.key(3)) for ev in (resident, streamed)
    ]
    np.testing.assert_array_equal(results[0].best_choice, results[1].best_choice)
    assert results[1].best_fitness == pytest.approx(results[0].best_fitness, rel=1e-5)
    assert results[0].evaluations == results[1].evaluations


FAMILIES = [(GPT2, KLDivergence()), (BERT, HiddenStateMSE())]


@pytest.mark.parametrize(("cfg", "metric"), FAMILIES, ids=["gpt2", "bert"])
def test_other_families(setup, cfg, metric):
    for kind in ("wanda",):
        resident, streamed, store = pair(setup, kind, cfg=cfg, metric=metric, candidates_per_call=2)
        choices = random_choices(store.spec, 3, seed=6)
        want = resident(choices, fidelity=32, batch_seed=1)
        np.testing.assert_allclose(
            streamed(choices, fidelity=32, batch_seed=1), want, rtol=1e-5, atol=1e-7
        )


def test_shard_scores_recombine(setup):
    resident, streamed, store = pair(setup, "wanda", candidates_per_call=2)
    choices = random_choices(store.spec, 3, seed=8)
    whole = streamed(choices, fidelity=48, batch_seed=2)
    parts = []
    for index in range(3):
        got = streamed(choices, fidelity=48, batch_seed=2, shard=(index, 3))
        want = resident(choices, fidelity=48, batch_seed=2, shard=(index, 3))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        parts.append(got * len(streamed.minibatch_rows(48, 2, (index, 3))))
    np.testing.assert_allclose(np.sum(parts, axis=0) / (48 // SEQ_LEN), whole, rtol=1e-5)


# --------------------------------------------------------------------------- cost


def test_one_compilation_per_block_shape_across_queries(setup):
    _, streamed, store = pair(setup, "sparsegpt", candidates_per_call=2, reuse=True)
    spec = store.spec
    compiles = []

    def listener(event: str, duration: float, **_: object) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    monitoring.register_event_duration_secs_listener(listener)
    try:
        parent = spec.center.astype(np.int32)
        streamed.set_reference(parent)
        streamed(offspring(spec, parent, 5, 0), fidelity=32, batch_seed=0)  # warm-up
        streamed(offspring(spec, parent, 5, 1), fidelity=32, batch_seed=0)
        blocks_before = streaming_mod._block_program._cache_size()
        first = len(compiles)
        for seed in range(2, 8):  # other candidates, levels, minibatches, reuse or not
            streamed(offspring(spec, parent, 5, seed), fidelity=32, batch_seed=seed)
            streamed(random_choices(spec, 5, seed), fidelity=32, batch_seed=seed)
    finally:
        monitoring.clear_event_listeners()
    assert len(compiles) == first
    assert streaming_mod._block_program._cache_size() == blocks_before


def test_reads_only_the_variants_used(setup):
    _, streamed, store = pair(setup, "sparsegpt", reuse=False)
    spec = store.spec
    choices = np.zeros((4, spec.num_units), np.int32)
    choices[1:, 0] = [1, 2, 2]  # unit 0 at three levels, every other unit at level 0
    streamed(choices, fidelity=32, batch_seed=0)
    stats = streamed.last_stats
    per_unit = [1] * spec.num_units
    per_unit[0] = 3
    assert stats.variants_read == sum(
        k * len(names) for k, names in zip(per_unit, store.unit_params, strict=True)
    )
    shapes = streamed.model.adapter.param_shapes
    want = sum(
        k * len(names) * int(np.prod(shapes[names[0]]))
        for k, names in zip(per_unit, store.unit_params, strict=True)
    )
    assert stats.store_bytes == want * 4  # float32 storage
    assert stats.blocks_streamed == streamed._nb and stats.candidates == 4
    assert isinstance(streamed.model.params, LazyParams)


def test_reused_calls_skip_blocks_nobody_needs(setup):
    _, streamed, store = pair(setup, "sparsegpt", reuse=True)
    spec = store.spec
    parent = spec.center.astype(np.int32)
    last = [u for u in range(spec.num_units) if spec.units[u].block == streamed._nb - 1][0]
    streamed.set_reference(parent)
    k = int(spec.num_levels[last])
    children = np.tile(parent, (k - 1, 1))  # every other level of one unit of the last block
    children[:, last] = (parent[last] + np.arange(1, k)) % k
    streamed(children, fidelity=32, batch_seed=0)  # records the parent's states
    assert streamed.last_stats.computed_reference
    streamed(children, fidelity=32, batch_seed=0)
    stats = streamed.last_stats
    assert stats.reused and stats.blocks_streamed == 1 and stats.blocks_run == 1.0


def test_errors_name_the_problem(setup):
    _, streamed, store = pair(setup, "wanda")
    with pytest.raises(ValueError, match=r"choices\[0, 1\] = 99 is not a level of unit 1"):
        bad = np.zeros((1, store.spec.num_units), np.int32)
        bad[0, 1] = 99
        streamed(bad, fidelity=32, batch_seed=0)
    eager, _, calib, _ = setup("wanda")
    with pytest.raises(ValueError, match="metric 'hidden_nmse' is for encoders"):
        StreamingEvaluator(eager, store, calib, metric=HiddenStateMSE())
    with pytest.raises(ValueError, match="candidates_per_call must be a positive int"):
        StreamingEvaluator(eager, store, calib, metric=KLDivergence(), candidates_per_call=0)


@pytest.mark.slow
@pytest.mark.parametrize(("cfg", "metric"), FAMILIES, ids=["gpt2", "bert"])
def test_other_families_structured(setup, cfg, metric):
    resident, streamed, store = pair(setup, "structured", cfg=cfg, metric=metric)
    choices = random_choices(store.spec, 3, seed=6)
    want = resident(choices, fidelity=32, batch_seed=1)
    np.testing.assert_allclose(
        streamed(choices, fidelity=32, batch_seed=1), want, rtol=1e-5, atol=1e-7
    )


def test_both_evaluators_follow_the_protocol(setup):
    resident, streamed, _ = pair(setup, "wanda")
    assert isinstance(resident, AllocationEvaluator)
    assert isinstance(streamed, AllocationEvaluator)


def test_pipeline_makes_either_evaluator(setup):
    from allocsearch import pipeline
    from allocsearch.config import EvaluatorConfig, RunConfig

    eager, lazy, calib, store = setup("wanda")
    cfg = RunConfig(evaluator=EvaluatorConfig(execution="streaming"))
    ws = pipeline.Workspace(cfg, lazy, calib, calib)
    assert isinstance(pipeline.make_evaluator(ws, store), StreamingEvaluator)
    auto = {"resident": Evaluator, "streaming": StreamingEvaluator}[
        pipeline.choose_execution(ws, store)
    ]
    assert type(pipeline.make_evaluator(ws, store, "auto")) is auto
    assert type(pipeline.make_evaluator(ws, store, "resident")) is Evaluator
    with pytest.raises(ValueError, match=r"execution 'gpu' is not valid; choose one of \['auto'"):
        pipeline.make_evaluator(ws, store, "gpu")


def test_states_parked_on_the_host_give_the_same_scores(setup):
    resident, streamed, store = pair(
        setup,
        "sparsegpt",
        candidates_per_call=2,
        # every hidden state and reference state on the host
        stream_kw=dict(max_device_state_bytes=1, max_device_reference_bytes=1),
    )
    spec = store.spec
    parent = spec.center.astype(np.int32)
    resident.set_reference(parent)
    streamed.set_reference(parent)
    late = [u for u in range(spec.num_units) if spec.units[u].block >= 1]
    choices = np.tile(parent, (5, 1))
    for j, row in enumerate(choices):  # children differing from block 1 on: reuse pays
        row[late[j]] = (row[late[j]] + 1) % spec.num_levels[late[j]]
    for _ in range(2):
        np.testing.assert_allclose(
            streamed(choices, fidelity=48, batch_seed=0),
            resident(choices, fidelity=48, batch_seed=0),
            rtol=1e-5,
            atol=1e-7,
        )
    assert streamed.last_stats.reused
    assert isinstance(streamed._states[1][0], np.ndarray)


@pytest.mark.parametrize("kind", ["sparsegpt", "wanda"])
def test_config_micro_batch_tokens_reaches_both_evaluators_and_keeps_scores(setup, kind):
    """``evaluator.micro_batch_tokens`` (the config key the plan's remedy names) sets the
    sequences per call of the evaluator ``pipeline.make_evaluator`` builds, resident and
    streaming; the scores do not depend on it (1e-5)."""
    import dataclasses
    from types import SimpleNamespace

    from allocsearch import pipeline
    from allocsearch.config import config_from_dict

    eager, lazy, calib, store = setup(kind)
    choices = random_choices(store.spec, 4, seed=5)
    scores = {}
    for mb in (1, SEQ_LEN, 3 * SEQ_LEN, 8192):
        cfg = config_from_dict({"evaluator": {"micro_batch_tokens": mb}})
        for execution, model in (("resident", eager), ("streaming", lazy)):
            run = dataclasses.replace(
                cfg, evaluator=dataclasses.replace(cfg.evaluator, execution=execution)
            )
            ws = SimpleNamespace(config=run, model=model, calibration=calib, validation=None)
            ev = pipeline.make_evaluator(ws, store)
            assert ev._max_rows == max(1, mb // SEQ_LEN)  # whole sequences, at least one
            scores[mb, execution] = ev(choices, fidelity=N_SEQ * SEQ_LEN, batch_seed=0)
    want = scores[8192, "resident"]
    assert np.all(want > 0)
    for key, got in scores.items():
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=str(key))


@pytest.mark.parametrize("kind", ["sparsegpt", "wanda"])
def test_resident_evaluator_keeps_one_device_copy_of_the_variants(setup, kind):
    """The resident evaluator ``pipeline.make_evaluator`` builds reads the store's host
    (memory-mapped) variants: every device array it leaves alive is one of its stacks,
    its teacher data or its tokens (no second copy of any variant), and its scores and
    materialized weights equal those of an evaluator given the device variants."""
    import gc
    from types import SimpleNamespace

    from allocsearch import pipeline
    from allocsearch.config import config_from_dict

    eager, _, calib, store = setup(kind)
    cfg = config_from_dict({"evaluator": {"execution": "resident", "micro_batch_tokens": 16}})
    ws = SimpleNamespace(config=cfg, model=eager, calibration=calib, validation=None)
    gc.collect()
    before = {id(a) for a in jax.live_arrays()}
    ev = pipeline.make_evaluator(ws, store)
    gc.collect()
    new = [a for a in jax.live_arrays() if id(a) not in before]
    held = {id(x) for x in jax.tree.leaves((ev._arrays, ev._teacher, ev._tokens))}
    stray = [(a.shape, a.dtype) for a in new if id(a) not in held]
    assert not stray, stray
    stacked = sum(x.nbytes for x in jax.tree.leaves(ev._arrays["blocks"]))
    assert sum(a.nbytes for a in new if id(a) in held) >= stacked > 0
    choices = random_choices(store.spec, 3, seed=2)
    old, _, _ = pair(setup, kind)
    np.testing.assert_allclose(
        ev(choices, fidelity=N_SEQ * SEQ_LEN, batch_seed=0),
        old(choices, fidelity=N_SEQ * SEQ_LEN, batch_seed=0),
        rtol=1e-6,
    )
    got, want = ev.materialize(choices[0]), old.materialize(choices[0])
    for name in store.param_names:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]))
