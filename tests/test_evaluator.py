"""The evaluator against straightforward forwards of materialized weights, its compile
count, and the agreement of its plain, batched and reuse paths."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring

from allocsearch.data.tokenset import TokenSet, minibatch
from allocsearch.evaluate import (
    EmbeddingCosineDistance,
    Evaluator,
    HiddenStateMSE,
    KLDivergence,
    NegativeLogLikelihood,
    TopKKLDivergence,
)
from allocsearch.models import HFModel, adapter_for_config, mean_pool
from allocsearch.pruners import MagnitudePruner, SparseGPTPruner, WandaPruner, accumulate_stats
from allocsearch.supernet.spec import SupernetSpec, Unit

LLAMA = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
BERT = {
    "model_type": "bert",
    "vocab_size": 50,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 32,
    "layer_norm_eps": 1e-12,
}
LEVELS = np.array([0.0, 0.25, 0.5, 0.75])  # exact for every layer here
SEQ_LEN, N_SEQ = 16, 16
MICRO_BATCH = 64  # tokens: 4 sequences per compiled call


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def make_supernet(adapter, params, pruner_of, rng, *, extra_units=(), merged=(), skip=()):
    """Spec, variants and unit params for every prunable layer except ``skip``; layers in
    ``merged`` (pairs of weight names) share one unit. Statistics are of random inputs."""
    layers = {lay.weight_name: lay for lay in adapter.layers(include_head=True)}
    variants = {}
    for name, lay in layers.items():
        if name in skip or (lay.role == "lm_head" and lay.name not in extra_units):
            continue
        x = rng.normal(size=(48, lay.in_features)).astype(np.float32)
        stats = accumulate_stats(None, x)
        variants[name] = pruner_of(lay).prune(params[name], stats, LEVELS)
    grouped = {n for pair in merged for n in pair}
    groups = [list(pair) for pair in merged] + [[n] for n in variants if n not in grouped]
    units = []
    for names in groups:
        first = layers[names[0]]
        numel = sum(layers[n].numel for n in names)
        paths = tuple(layers[n].name for n in names)
        units.append(Unit(first.name, first.role, first.block, paths, numel, numel))
    L = len(units)
    spec = SupernetSpec(
        tuple(units), np.tile(LEVELS, (L, 1)), np.ones((L, len(LEVELS)), bool), np.full(L, 2)
    )
    return spec, variants, [tuple(names) for names in groups]


def llama_pruner(lay):
    """Exercises every storage path: per-matrix and per-row nested ranks, weight stacks,
    and a role whose blocks mix pruners (falls back to weight stacks)."""
    by_role = {
        "q": MagnitudePruner(),
        "o": MagnitudePruner(),
        "k": WandaPruner(),
        "gate": WandaPruner(),
        "v": SparseGPTPruner(),
        "down": SparseGPTPruner(),
        "lm_head": MagnitudePruner(),
    }
    if lay.role == "up":  # per-matrix and per-row ranks in one role
        return [MagnitudePruner(), WandaPruner()][lay.block % 2]
    return by_role[lay.role]


@pytest.fixture(scope="module")
def llama():
    adapter = adapter_for_config(LLAMA)
    params = adapter.init_params(jax.random.key(0))
    model = HFModel(adapter, params)
    rng = np.random.default_rng(0)
    spec, variants, unit_params = make_supernet(
        adapter,
        params,
        llama_pruner,
        rng,
        extra_units=("lm_head",),
        # One unit spanning two parameters; two layers left dense (named by no unit).
        merged=[("model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight")],
        skip=("model.layers.2.mlp.down_proj.weight", "model.layers.2.self_attn.q_proj.weight"),
    )
    tokens = rng.integers(0, LLAMA["vocab_size"], size=(N_SEQ, SEQ_LEN)).astype(np.int32)
    calibration = TokenSet(tokens, "random ids", "ids", 0)
    evaluator = Evaluator(
        model,
        spec,
        variants,
        unit_params,
        calibration,
        metric=KLDivergence(),
        micro_batch_tokens=MICRO_BATCH,
        auto_reference=False,  # plain unless a test sets a reference
    )
    return model, spec, variants, unit_params, calibration, evaluator


@pytest.fixture(scope="module")
def forward(llama):
    return jax.jit(llama[0].adapter.forward)


def random_choices(spec, n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, spec.num_levels, size=(n, spec.num_units)).astype(np.int32)


def unit_index(unit_params, name):
    return next(u for u, names in enumerate(unit_params) if name in names)


# --------------------------------------------------------------------------- correctness


def test_dense_choice_scores_zero(llama):
    spec, evaluator = llama[1], llama[5]
    dense = np.zeros((1, spec.num_units), np.int32)  # level 0 has sparsity 0 everywhere
    assert evaluator(dense, fidelity=128, batch_seed=0)[0] == pytest.approx(0.0, abs=1e-7)


def test_scores_equal_kl_of_materialized_forward(llama, forward):
    model, spec, variants, unit_params, calibration, evaluator = llama
    choices = random_choices(spec, 3, seed=1)
    for fidelity, seed in [(128, 5), (256, 0)]:  # 2 and 4 micro-batches of 4 sequences
        scores = evaluator(choices, fidelity=fidelity, batch_seed=seed)
        tokens = jnp.asarray(minibatch(calibration, fidelity, seed))
        teacher = np_log_softmax(np.asarray(forward(model.params, tokens)))
        for choice, score in zip(choices, scores, strict=True):
            student = np_log_softmax(np.asarray(forward(evaluator.materialize(choice), tokens)))
            want = (np.exp(teacher) * (teacher - student)).sum(-1).mean()
            assert score == pytest.approx(want, rel=2e-5, abs=1e-7)
    assert scores.dtype == np.float32 and scores.shape == (3,)


def test_materialize_applies_each_units_level(llama):
    model, spec, variants, unit_params, _, evaluator = llama
    choice = random_choices(spec, 1, seed=2)[0]
    params = evaluator.materialize(choice)
    for u, names in enumerate(unit_params):
        zeros = sum(int(np.sum(np.asarray(params[n]) == 0)) for n in names)
        numel = sum(params[n].size for n in names)
        assert zeros == round(LEVELS[choice[u]] * numel), spec.units[u].name
    for dense in ["model.layers.2.mlp.down_proj.weight", "model.layers.2.self_attn.q_proj.weight"]:
        np.testing.assert_array_equal(np.asarray(params[dense]), np.asarray(model.params[dense]))


def test_minibatches_are_seeded_and_fixed(llama):
    spec, calibration, evaluator = llama[1], llama[4], llama[5]
    choices = random_choices(spec, 2, seed=3)
    a = evaluator(choices, fidelity=128, batch_seed=7)
    b = evaluator(choices, fidelity=128, batch_seed=7)
    c = evaluator(choices, fidelity=128, batch_seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    rows = evaluator.minibatch_rows(128, 7)
    np.testing.assert_array_equal(calibration.tokens[rows], minibatch(calibration, 128, 7))


def test_one_compilation_for_fifty_candidates(llama):
    spec, evaluator = llama[1], llama[5]
    compiles = []

    def listener(event: str, duration: float, **_: object) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    choices = random_choices(spec, 50, seed=4)
    monitoring.register_event_duration_secs_listener(listener)
    try:
        # 96 tokens = 6 sequences = 2 micro-batches of 3; 48 tokens = 1 of 3: one shape.
        evaluator(choices[:1], fidelity=96, batch_seed=0)
        first = len(compiles)
        for i in range(1, 50):
            evaluator(choices[i : i + 1], fidelity=96 if i % 2 else 48, batch_seed=i)
    finally:
        monitoring.unregister_event_duration_listener(listener)
    # the first call compiles the scoring program (and, depending on what ran before in
    # this process, JAX's own small transfer helpers); the next 49 compile nothing
    assert first >= 1
    assert len(compiles) == first


def test_plain_batched_and_reuse_paths_agree(llama):
    model, spec, variants, unit_params, calibration, plain = llama
    parent = random_choices(spec, 1, seed=5)[0]
    kids = []
    for name in [
        "model.layers.2.self_attn.o_proj.weight",  # first differs at block 2
        "model.layers.2.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",  # a unit with two parameters
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "lm_head.weight",  # outside the blocks: starts at 0
    ]:
        kid = parent.copy()
        u = unit_index(unit_params, name)
        kid[u] = (kid[u] + 1) % len(LEVELS)
        kids.append(kid)
    kids.append(parent.copy())  # the reference itself
    kids = np.stack(kids)
    want = plain(kids, fidelity=128, batch_seed=11)

    batched = Evaluator(
        model,
        spec,
        variants,
        unit_params,
        calibration,
        metric=KLDivergence(),
        micro_batch_tokens=MICRO_BATCH,
        candidates_per_call=3,
        auto_reference=False,
    )
    np.testing.assert_allclose(batched(kids, fidelity=128, batch_seed=11), want, rtol=1e-5)

    for evaluator in (plain, batched):
        evaluator.set_reference(parent)
        np.testing.assert_array_equal(evaluator.first_differing_block(kids), [2, 2, 1, 1, 0, 0, 3])
        reused = evaluator(kids, fidelity=128, batch_seed=11)
        stats = evaluator.last_stats
        assert stats.reused and stats.computed_reference
        np.testing.assert_allclose(reused, want, rtol=1e-5, atol=1e-7)
        again = evaluator(kids[::-1], fidelity=128, batch_seed=11)  # states are cached
        assert evaluator.last_stats.reused and not evaluator.last_stats.computed_reference
        np.testing.assert_allclose(again[::-1], want, rtol=1e-5, atol=1e-7)
        evaluator.set_reference(None)
    assert plain.last_stats.blocks_run == pytest.approx((1 + 1 + 2 + 2 + 3 + 3 + 0) / 7)

    # Without set_reference, the automatic reference of offspring is their parent.
    auto = Evaluator(
        model,
        spec,
        variants,
        unit_params,
        calibration,
        metric=KLDivergence(),
        micro_batch_tokens=MICRO_BATCH,
    )
    np.testing.assert_array_equal(auto.reference_for(kids), parent)
    np.testing.assert_allclose(auto(kids, fidelity=128, batch_seed=11), want, rtol=1e-5, atol=1e-7)
    assert auto.last_stats.reused and auto.last_stats.computed_reference
    auto.reuse = False
    assert auto.reference_for(kids) is None
    np.testing.assert_array_equal(auto(kids, fidelity=128, batch_seed=11), want)


def test_reference_is_skipped_when_it_does_not_pay(llama):
    spec, unit_params, evaluator = llama[1], llama[3], llama[5]
    parent = random_choices(spec, 1, seed=6)[0]
    kid = parent.copy()
    u = unit_index(unit_params, "model.layers.0.self_attn.q_proj.weight")
    kid[u] = (kid[u] + 1) % len(LEVELS)
    evaluator.set_reference(parent)
    try:
        evaluator(kid[None], fidelity=128, batch_seed=12)  # saves nothing
        assert not evaluator.last_stats.reused
    finally:
        evaluator.set_reference(None)


def test_top_k_kl_with_whole_vocabulary_equals_kl(llama):
    model, spec, variants, unit_params, calibration, evaluator = llama
    topk = Evaluator(
        model,
        spec,
        variants,
        unit_params,
        calibration,
        metric=TopKKLDivergence(k=LLAMA["vocab_size"]),
        micro_batch_tokens=MICRO_BATCH,
    )
    assert [a.shape for a in topk.teacher] == [(N_SEQ, SEQ_LEN, LLAMA["vocab_size"])] * 2
    choices = random_choices(spec, 2, seed=7)
    np.testing.assert_allclose(
        topk(choices, fidelity=128, batch_seed=1),
        evaluator(choices, fidelity=128, batch_seed=1),
        rtol=1e-5,
    )


def test_nll_score_over_all_tokens_is_log_perplexity(llama, forward):
    model, spec, variants, unit_params, calibration, _ = llama
    nll = Evaluator(
        model,
        spec,
        variants,
        unit_params,
        calibration,
        metric=NegativeLogLikelihood(),
        micro_batch_tokens=MICRO_BATCH,
    )
    choice = random_choices(spec, 1, seed=8)
    score = nll(choice, fidelity=N_SEQ * SEQ_LEN, batch_seed=0)[0]
    assert math.log(nll.perplexity(choice[0], calibration)) == pytest.approx(score, rel=1e-5)
    # The dense model's perplexity, by hand from its logits.
    tokens = calibration.tokens
    lp = np_log_softmax(np.asarray(forward(model.params, jnp.asarray(tokens))))
    want = np.exp(-np.take_along_axis(lp[:, :-1], tokens[:, 1:, None], -1).mean())
    assert nll.perplexity(None, calibration) == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------- encoders


@pytest.fixture(scope="module")
def bert():
    adapter = adapter_for_config(BERT)
    params = adapter.init_params(jax.random.key(1))
    rng = np.random.default_rng(1)
    spec, variants, unit_params = make_supernet(adapter, params, lambda lay: MagnitudePruner(), rng)
    tokens = rng.integers(0, BERT["vocab_size"], size=(8, SEQ_LEN)).astype(np.int32)
    return HFModel(adapter, params), spec, variants, unit_params, TokenSet(tokens, "ids", "ids", 0)


@pytest.mark.parametrize("metric", [HiddenStateMSE(), EmbeddingCosineDistance()])
def test_encoder_metrics(bert, metric):
    model, spec, variants, unit_params, calibration = bert
    evaluator = Evaluator(
        model, spec, variants, unit_params, calibration, metric=metric, micro_batch_tokens=64
    )
    choices = np.concatenate([np.zeros((1, spec.num_units), np.int32), random_choices(spec, 2, 9)])
    scores = evaluator(choices, fidelity=96, batch_seed=2)
    tokens = jnp.asarray(minibatch(calibration, 96, 2))
    forward = jax.jit(model.adapter.forward)
    t = np.asarray(forward(model.params, tokens), np.float64)
    for choice, score in zip(choices, scores, strict=True):
        s = np.asarray(forward(evaluator.materialize(choice), tokens), np.float64)
        if isinstance(metric, HiddenStateMSE):
            want = (((s - t) ** 2).sum(-1) / (t**2).sum(-1)).mean()
        else:
            pt = np.asarray(mean_pool(jnp.asarray(t), None), np.float64)
            ps = np.asarray(mean_pool(jnp.asarray(s), None), np.float64)
            cos = (pt * ps).sum(-1) / np.linalg.norm(pt, axis=-1) / np.linalg.norm(ps, axis=-1)
            want = (1 - cos).mean()
        assert score == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert scores[0] == pytest.approx(0.0, abs=1e-6) and scores[1] > 0


# --------------------------------------------------------------------------- errors


def test_input_errors_name_the_problem(llama, bert):
    model, spec, variants, unit_params, calibration, evaluator = llama
    with pytest.raises(ValueError, match=r"choices\[1, 3\] = 4 is not a level of unit 3"):
        bad = np.zeros((2, spec.num_units), np.int32)
        bad[1, 3] = 4
        evaluator(bad, fidelity=128, batch_seed=0)
    with pytest.raises(ValueError, match="n_tokens=100 is not valid"):
        evaluator(np.zeros((1, spec.num_units), np.int32), fidelity=100, batch_seed=0)
    with pytest.raises(ValueError, match="is for encoders but the model is a causal"):
        Evaluator(model, spec, variants, unit_params, calibration, metric=HiddenStateMSE())
    with pytest.raises(ValueError, match="unit_params has 2 entries, the spec has"):
        Evaluator(model, spec, variants, unit_params[:2], calibration, metric=KLDivergence())
    short = SupernetSpec(
        spec.units, spec.sparsity[:, :3], spec.valid[:, :3], np.zeros(spec.num_units, int)
    )
    with pytest.raises(ValueError, match=r"have 4 levels, but unit \d+ .* has 3 in the spec"):
        Evaluator(model, short, variants, unit_params, calibration, metric=KLDivergence())
    with pytest.raises(ValueError, match=r"'kl' would keep 0.00 GiB .* max_teacher_bytes=1000"):
        Evaluator(
            model,
            spec,
            variants,
            unit_params,
            calibration,
            metric=KLDivergence(),
            max_teacher_bytes=1000,
        )
    bert_model, bert_spec, bert_variants, bert_units, bert_calibration = bert
    with pytest.raises(ValueError, match="is for causal language models but the model is an"):
        Evaluator(
            bert_model,
            bert_spec,
            bert_variants,
            bert_units,
            bert_calibration,
            metric=KLDivergence(),
        )
