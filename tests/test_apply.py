"""Applying a recipe: the pruned checkpoint loads in transformers (the trusted
implementation) with exactly the recipe's zeros and the logits allocsearch computes for the
same weights; weights come bit-exactly from the store's matching levels (the ones the
evaluator materialises) or from a re-run pruner; N:M groups; structured recipes are
physically smaller with identical outputs; errors leave nothing behind."""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
import pytest
from tiny_workspace import scaled_random_model, structured_test_recipe

from allocsearch.data.tokenset import TokenSet
from allocsearch.evaluate.evaluator import Evaluator
from allocsearch.evaluate.metrics import KLDivergence
from allocsearch.models import HFModel, load_model
from allocsearch.pruners import (
    MagnitudePruner,
    NestedVariants,
    NMMagnitudePruner,
    StructuredPruner,
    WandaPruner,
)
from allocsearch.recipe.apply import apply_recipe, choice_for_recipe, write_pruned
from allocsearch.recipe.recipe import (
    LayerEntry,
    ModelIdentity,
    RecipeError,
    StructuredUnit,
)
from allocsearch.supernet.build import build_supernet, supernet_units, unit_group_counts
from allocsearch.supernet.levels import equal_step_grid, nm_grid, structured_grid

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CFG = {
    "model_type": "llama",
    "vocab_size": 50,
    "hidden_size": 16,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
    "attention_bias": True,  # biases of q/k/v/o and gate/up/down: dead rows lose theirs
    "mlp_bias": True,
}
BATCH = 4
IDS = np.random.default_rng(7).integers(0, 50, size=(2, 10))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> HFModel:
    """A tiny random Llama written by allocsearch's save_model and loaded back."""
    return scaled_random_model(CFG, tmp_path_factory.mktemp("dense") / "m")


@pytest.fixture(scope="module")
def calib() -> TokenSet:
    tokens = np.random.default_rng(1).integers(0, 50, size=(8, 12)).astype(np.int32)
    return TokenSet(tokens=tokens, source="random ids", tokenizer_identity="test-ids", seed=1)


@pytest.fixture(scope="module")
def stores(model, calib, tmp_path_factory):
    """Cached supernet builds by kind."""
    root = tmp_path_factory.mktemp("stores")
    adapter = model.adapter

    @functools.cache
    def get(kind: str):
        if kind == "wanda":
            numel = [u.numel for u in supernet_units(adapter, "unstructured")]
            grid = equal_step_grid(numel, center=0.5, step_weights=32, steps_each_side=2)
            pruner, structure = WandaPruner(), "unstructured"
        elif kind == "nm":
            widths = [layer.in_features for layer in adapter.layers()]
            grid = nm_grid([(0, 4), (1, 4), (2, 4)], in_features=widths, center=(2, 4))
            pruner, structure = NMMagnitudePruner(m=4), "nm"
        else:
            structure = "heads_neurons"
            units = supernet_units(adapter, structure)
            steps = np.array([1 if u.role == "attn" else 16 for u in units])
            grid = structured_grid(
                unit_group_counts(adapter, structure),
                steps,
                center=0.5,
                steps_each_side=1,
            )
            pruner = StructuredPruner
        return build_supernet(
            model,
            calib,
            pruner=pruner,
            grid=grid,
            structure=structure,
            input_mode="dense",
            out_dir=root / kind,
            batch_size=BATCH,
            progress=False,
        )

    return get


# --------------------------------------------------------------------------- recipes


def make_recipe(model, calib, sparsity, *, structure="unstructured", nm=None, units=()):
    """A schema-v1 recipe over the layers named in ``sparsity`` (forward order)."""
    kind_of = {x: u.kind for u in units for x in u.layers}
    layers = []
    for info in model.adapter.layers():
        if info.name not in sparsity:
            continue
        kw = {}
        if structure == "nm":
            n, m = nm[info.name]
            kw = {"structure": "nm", "n": n, "m": m}
        elif units:
            kw = {"structure": kind_of[info.name]}
        layers.append(
            LayerEntry(info.name, info.role, info.block, info.shape, sparsity[info.name], **kw)
        )
    return structured_test_recipe(
        model, calib, tuple(layers), units, structure=structure, architecture="LlamaForCausalLM"
    )


def recipe_of_choice(model, calib, store, choice):
    """The recipe of a level vector on a store (as the pipeline writes it)."""
    spec = store.spec
    sparsity, nm, units = {}, {}, []
    for u, params in enumerate(store.unit_params):
        for p in params:
            sparsity[p.removesuffix(".weight")] = float(store.variants(p).sparsity[choice[u]])
        if spec.structure == "nm":
            n, m = (int(x) for x in spec.level_labels[u][choice[u]].split(":"))
            nm[spec.units[u].name] = (n, m)
    if spec.structure == "heads_neurons":
        groups = unit_group_counts(model.adapter, spec.structure)
        for u, unit in enumerate(spec.units):
            removed = int(round(spec.sparsity[u, choice[u]] * groups[u]))
            kind = "heads" if unit.role == "attn" else "neurons"
            units.append(
                StructuredUnit(unit.name, kind, unit.block, removed, int(groups[u]), unit.layers)
            )
    return make_recipe(model, calib, sparsity, structure=spec.structure, nm=nm, units=units)


# --------------------------------------------------------------------------- helpers


def hf_model(path):
    return transformers.LlamaForCausalLM.from_pretrained(path).eval()


def hf_logits(path) -> np.ndarray:
    with torch.no_grad():
        return hf_model(path)(torch.tensor(IDS)).logits.numpy()


def our_logits(adapter, params) -> np.ndarray:
    return np.asarray(adapter.forward(params, jnp.asarray(IDS)))


def apply_and_write(model, recipe, path, **kwargs):
    """What ``allocsearch apply`` does: apply, then write with the config updates."""
    pruned, updates, report = apply_recipe(model, recipe, **kwargs)
    return write_pruned(pruned, path, config_updates=updates), report


def assert_clean(tmp_path):
    """Nothing (no output, no temporary store) was left in ``tmp_path``."""
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- (a), (b)


@pytest.mark.slow
def test_unstructured_store_checkpoint_matches_transformers_and_evaluator(
    model, calib, stores, tmp_path
):
    store = stores("wanda")
    choice = np.arange(store.spec.num_units, dtype=np.int32) % 5  # levels 0..4 mixed
    recipe = recipe_of_choice(model, calib, store, choice)
    out, report = apply_and_write(model, recipe, tmp_path / "pruned", store=store)

    # the weights are the ones the evaluator scores for this allocation (bit-exact)
    evaluator = Evaluator(
        model, store.spec, store.all_variants(), store.unit_params, calib, metric=KLDivergence()
    )
    expected = evaluator.materialize(choice)
    written = load_model(out)
    for name, value in expected.items():
        np.testing.assert_array_equal(np.asarray(written.params[name]), np.asarray(value))
    assert written.fingerprint == apply_recipe(model, recipe, store=store)[0].fingerprint

    # transformers: exactly the recipe's zeros in every layer, and the same logits
    modules = dict(hf_model(out).named_modules())
    for entry in recipe.layers:
        zeros = int((modules[entry.name].weight == 0).sum())
        assert zeros == round(entry.sparsity * entry.numel), entry.name
        assert zeros / entry.numel == entry.sparsity
    np.testing.assert_allclose(
        hf_logits(out), our_logits(model.adapter, expected), atol=1e-4, rtol=1e-4
    )
    assert [x.level for x in report.layers] == choice.tolist()
    assert [x.sparsity_applied for x in report.layers] == [x.sparsity for x in recipe.layers]
    assert isinstance(store.variants(store.param_names[0]), NestedVariants)
    removed = sum(round(x.sparsity * x.numel) for x in recipe.layers)
    assert report.num_params == report.num_params_dense == model.adapter.num_params()
    assert report.num_params_recipe == report.num_params_dense - removed
    assert report.padding_params == removed  # zeros are stored
    assert report.config_updates == {} and not report.physical
    assert report.source == f"store:{store.path}"
    assert report.summary().splitlines()[0] == f"weights from: store:{store.path}"
    np.testing.assert_array_equal(choice_for_recipe(recipe, store), choice)
    subset = make_recipe(model, calib, {x.name: x.sparsity for x in recipe.layers[:3]})
    with pytest.raises(
        RecipeError, match=r"does not cover the store's units \['model.layers.0.self_attn.o_proj', "
    ):
        choice_for_recipe(subset, store)
    assert [x.level for x in apply_recipe(model, subset, store=store)[2].layers] == [0, 1, 2]


def test_weight_updating_variants_are_taken_bit_exact(model, calib, stores):
    """Structured output projections are weight-updating (dense) variants: taken as
    stored; dead rows of the input projections are zero, and so are their biases."""
    store = stores("structured")
    choice = np.array([2, 1, 0, 2], np.int32)  # attn 0: all, mlp 0: 32, attn 1: none, mlp 1: 48
    recipe = recipe_of_choice(model, calib, store, choice)
    pruned, updates, report = apply_recipe(model, recipe, store=store, physical=False)
    assert updates == {}
    for u, params in enumerate(store.unit_params):
        for p in params:
            v = store.variants(p)
            want = (
                v.weights(model.params[p], choice[u])
                if isinstance(v, NestedVariants)
                else (v.weights[choice[u]])
            )
            np.testing.assert_array_equal(np.asarray(pruned.params[p]), np.asarray(want))
    for name in set(model.params) - set(store.param_names):
        if not name.endswith("_proj.bias"):
            np.testing.assert_array_equal(np.asarray(pruned.params[name]), model.params[name])
    bias = {n: np.asarray(pruned.params[n]) for n in pruned.params if n.endswith("_proj.bias")}
    for b, neurons in ((0, 32), (1, 48)):
        for p in ("gate", "up"):
            zero = bias[f"model.layers.{b}.mlp.{p}_proj.bias"] == 0
            assert zero.sum() == neurons
            weight = np.asarray(pruned.params[f"model.layers.{b}.mlp.{p}_proj.weight"])
            np.testing.assert_array_equal(zero, (weight == 0).all(axis=1))
    for p in "qkv":
        assert (bias[f"model.layers.0.self_attn.{p}_proj.bias"] == 0).all()
        np.testing.assert_array_equal(
            bias[f"model.layers.1.self_attn.{p}_proj.bias"],
            model.params[f"model.layers.1.self_attn.{p}_proj.bias"],
        )
    for p in ("self_attn.o_proj", "mlp.down_proj"):  # output biases always stay
        for b in range(2):
            name = f"model.layers.{b}.{p}.bias"
            np.testing.assert_array_equal(bias[name], model.params[name])
    assert report.padding_params == report.num_params - report.num_params_recipe > 0


def test_rerun_pruner_reproduces_store_variants(model, calib, stores):
    """Without a store, Wanda at the recipe's exact sparsities (dense inputs, same
    calibration and batches) gives bit-exactly the store's weights."""
    store = stores("wanda")
    choice = (np.arange(store.spec.num_units, dtype=np.int32) * 2) % 5
    recipe = recipe_of_choice(model, calib, store, choice)
    from_store = apply_recipe(model, recipe, store=store)[0]
    rerun, _, report = apply_recipe(
        model, recipe, calibration=calib, pruner=WandaPruner(), batch_size=BATCH
    )
    for name in model.params:
        np.testing.assert_array_equal(
            np.asarray(rerun.params[name]), np.asarray(from_store.params[name])
        )
    assert report.source == "pruner:wanda"
    assert [x.level for x in report.layers] == [0] * len(recipe.layers)


def test_magnitude_without_calibration_on_a_subset(model, calib, tmp_path):
    """Magnitude needs no data; layers the recipe does not list stay dense; the kept
    weights are the largest |w| of each listed layer."""
    layers = model.adapter.layers()
    chosen = {layers[0].name: 0.25, layers[6].name: 0.75, layers[9].name: 0.5}
    recipe = make_recipe(model, calib, chosen)
    pruned, _, report = apply_recipe(model, recipe, pruner=MagnitudePruner())
    for layer in layers:
        w = np.asarray(model.params[layer.weight_name])
        got = np.asarray(pruned.params[layer.weight_name])
        if layer.name not in chosen:
            np.testing.assert_array_equal(got, w)
            continue
        count = round(chosen[layer.name] * layer.numel)
        pruned_mask = got == 0
        assert pruned_mask.sum() == count
        np.testing.assert_array_equal(got[~pruned_mask], w[~pruned_mask])
        assert np.abs(w[pruned_mask]).max() <= np.abs(w[~pruned_mask]).min()
    assert [x.name for x in report.layers] == list(chosen)
    assert report.source == "pruner:magnitude"


# --------------------------------------------------------------------------- (c) N:M


def test_nm_recipe_every_group_has_exactly_n_zeros(model, calib, tmp_path):
    layers = model.adapter.layers()
    patterns = {x.name: ((1, 4), (2, 4), (3, 4))[i % 3] for i, x in enumerate(layers)}
    recipe = make_recipe(
        model,
        calib,
        {name: n / m for name, (n, m) in patterns.items()},
        structure="nm",
        nm=patterns,
    )
    out, report = apply_and_write(
        model, recipe, tmp_path / "nm", pruner=NMMagnitudePruner(m=4), work_dir=tmp_path
    )
    modules = dict(hf_model(out).named_modules())
    for name, (n, m) in patterns.items():
        w = modules[name].weight.detach().numpy()
        zeros_per_group = (w.reshape(w.shape[0], -1, m) == 0).sum(axis=-1)
        assert (zeros_per_group == n).all(), name
    assert [x.sparsity_applied for x in report.layers] == [x.sparsity for x in recipe.layers]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nm"]  # temporary store removed


def test_nm_store_levels_match_by_pattern(model, calib, stores):
    store = stores("nm")
    choice = np.arange(store.spec.num_units, dtype=np.int32) % 3
    recipe = recipe_of_choice(model, calib, store, choice)
    pruned, _, report = apply_recipe(model, recipe, store=store)
    assert [x.level for x in report.layers] == choice.tolist()
    np.testing.assert_array_equal(choice_for_recipe(recipe, store), choice)
    for entry in recipe.layers:
        w = np.asarray(pruned.params[entry.name + ".weight"])
        assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) == entry.n).all()
    # 4:8 removes as many weights as 2:4 but is not a level of this store
    first = recipe.layers[0]
    patterns = {x.name: (x.n, x.m) for x in recipe.layers} | {first.name: (4, 8)}
    sparsity = {x.name: x.sparsity for x in recipe.layers} | {first.name: 0.5}
    other = make_recipe(model, calib, sparsity, structure="nm", nm=patterns)
    with pytest.raises(RecipeError, match=r"\(4:8\) in the recipe, which is not a level.*2:4"):
        apply_recipe(model, other, store=store)


# --------------------------------------------------------------------------- (d) structured


@pytest.mark.slow
def test_structured_recipe_is_physically_smaller_with_the_same_logits(
    model, calib, stores, tmp_path
):
    store = stores("structured")
    spec = store.spec
    # block 0: 1 of 2 kv groups, 16 of 64 neurons removed; block 1: both kv groups,
    # 48 neurons removed -> widths 1 kv group and 48 neurons, block 1 padded.
    levels = {"model.layers.0.self_attn": 1, "model.layers.0.mlp": 0}
    levels |= {"model.layers.1.self_attn": 2, "model.layers.1.mlp": 2}
    choice = np.array([levels[u.name] for u in spec.units], np.int32)
    removed = [
        int(round(spec.sparsity[u, k] * g))
        for u, (k, g) in enumerate(
            zip(choice, unit_group_counts(model.adapter, spec.structure), strict=True)
        )
    ]
    assert removed == [1, 16, 2, 48]
    recipe = recipe_of_choice(model, calib, store, choice)

    masked, masked_updates, masked_report = apply_recipe(model, recipe, store=store, physical=False)
    assert masked_updates == {} and masked.adapter is model.adapter
    out, report = apply_and_write(model, recipe, tmp_path / "small", store=store)

    assert report.config_updates == {
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 4,
        "intermediate_size": 48,
    }
    reloaded = hf_model(out)
    shapes = {n: tuple(p.shape) for n, p in reloaded.named_parameters()}
    for b in range(2):
        p = f"model.layers.{b}."
        assert shapes[p + "self_attn.q_proj.weight"] == (8, 16)
        assert shapes[p + "self_attn.k_proj.weight"] == (4, 16)
        assert shapes[p + "self_attn.v_proj.weight"] == (4, 16)
        assert shapes[p + "self_attn.o_proj.weight"] == (16, 8)
        assert shapes[p + "mlp.gate_proj.weight"] == (48, 16)
        assert shapes[p + "mlp.up_proj.weight"] == (48, 16)
        assert shapes[p + "mlp.down_proj.weight"] == (16, 48)
    np.testing.assert_allclose(
        hf_logits(out), our_logits(model.adapter, masked.params), atol=1e-4, rtol=1e-4
    )
    # the masked model's weights are the ones the evaluator scores (apply also zeroes the
    # biases of dead rows, which the evaluator leaves: they meet zero columns)
    evaluator = Evaluator(
        model, spec, store.all_variants(), store.unit_params, calib, metric=KLDivergence()
    )
    for name, value in evaluator.materialize(choice).items():
        if not name.endswith("_proj.bias"):
            np.testing.assert_array_equal(np.asarray(masked.params[name]), np.asarray(value))
    np.testing.assert_allclose(
        our_logits(model.adapter, evaluator.materialize(choice)),
        our_logits(model.adapter, masked.params),
        atol=1e-5,
    )

    # parameter counts, by hand: block 1 keeps one zero kv group (q 8x16, k 4x16, v 4x16,
    # o 16x8 = 384 weights, 8 + 4 + 4 biases) and 32 zero neurons (gate, up 32x16,
    # down 16x32 = 1536 weights, 2 x 32 biases)
    assert report.padding_params == 384 + 16 + 1536 + 64
    assert report.num_params == sum(p.numel() for p in reloaded.parameters())
    dense = model.adapter.num_params()
    attn_group, neuron = (8 + 4 + 4) * 16 + 16 * 8 + 16, 3 * 16 + 2
    assert report.num_params_recipe == dense - 3 * attn_group - 64 * neuron
    assert report.num_params_dense == masked_report.num_params == dense
    assert masked_report.num_params_recipe == report.num_params_recipe
    assert [x.sparsity_applied for x in report.layers] == [x.sparsity for x in recipe.layers]
    assert report.physical and not masked_report.physical
    np.testing.assert_array_equal(choice_for_recipe(recipe, store), choice)
    assert "physically smaller: num_attention_heads=2, " in report.summary()
    assert any("48 of 64 neurons" in note for note in report.notes)


def test_structured_without_store_counts_query_heads(model, calib, tmp_path):
    """A hand-written recipe may count query heads (4 of them, 2 per kv group); removing 2
    is one kv group. Re-run with the structured pruner; physical and masked agree."""
    layers = {x.name: x for x in model.adapter.layers()}
    attn = [f"model.layers.{b}.self_attn.{p}_proj" for b in range(2) for p in "qkvo"]
    units = [
        StructuredUnit(
            f"model.layers.{b}.self_attn",
            "heads",
            b,
            2 * b + 2 - 2,
            4,
            tuple(f"model.layers.{b}.self_attn.{p}_proj" for p in "qkvo"),
        )
        for b in range(2)
    ]  # block 0 removes 0 heads, block 1 removes 2 heads (one kv group)
    sparsity = {name: 0.5 * layers[name].block for name in attn}
    recipe = make_recipe(model, calib, sparsity, structure="heads", units=units)
    kwargs = {"calibration": calib, "pruner": StructuredPruner, "batch_size": BATCH}
    small, updates, report = apply_recipe(model, recipe, **kwargs)
    masked, _, _ = apply_recipe(model, recipe, physical=False, **kwargs)
    # block 0 keeps every head, so nothing is sliced: block 1's removed kv group (q 8x16,
    # k 4x16, v 4x16, o 16x8 and 16 q/k/v biases) stays as zeros
    assert updates == {} and not report.physical
    assert report.padding_params == 384 + 16
    q1 = np.asarray(masked.params["model.layers.1.self_attn.q_proj.weight"]).reshape(2, 8, 16)
    assert [bool((q1[g] == 0).all()) for g in range(2)].count(True) == 1
    np.testing.assert_array_equal(
        our_logits(small.adapter, small.params), our_logits(model.adapter, masked.params)
    )

    odd = dataclasses.replace(units[1], removed=1)
    one_head = make_recipe(
        model,
        calib,
        {**sparsity, **{n: 0.25 for n in attn if ".1." in n}},
        structure="heads",
        units=[units[0], odd],
    )
    with pytest.raises(RecipeError, match="whole kv groups of 2, so valid counts are multiples"):
        apply_recipe(model, one_head, **kwargs)


# --------------------------------------------------------------------------- (e) errors


def test_errors_leave_no_output(model, calib, stores, tmp_path):
    store = stores("wanda")
    choice = np.full(store.spec.num_units, 2, np.int32)
    recipe = recipe_of_choice(model, calib, store, choice)
    out = tmp_path / "out"

    other_model = dataclasses.replace(
        recipe, model=dataclasses.replace(recipe.model, fingerprint="0" * 24)
    )
    with pytest.raises(RecipeError, match="does not match the recipe's '000000000000"):
        apply_and_write(model, other_model, out, store=store)
    assert_clean(tmp_path)

    first = recipe.layers[0]
    renamed = dataclasses.replace(
        recipe,
        layers=(dataclasses.replace(first, name="model.layers.0.attn.q_proj"),) + recipe.layers[1:],
    )
    with pytest.raises(RecipeError, match="'model.layers.0.attn.q_proj' is not a layer of"):
        apply_and_write(model, renamed, out, store=store)
    assert_clean(tmp_path)

    sparsity = {x.name: x.sparsity for x in recipe.layers}
    sparsity[first.name] = 3 / first.numel  # a whole count, but not a level of the store
    off_grid = make_recipe(model, calib, sparsity)
    levels = ", ".join(repr(float(s)) for s in store.spec.sparsity[0])
    with pytest.raises(
        RecipeError,
        match=rf"layer '{first.name}' has sparsity {3 / first.numel!r} in the recipe, which is "
        rf"not a level of the store .*its levels there are sparsities \[{levels}\]",
    ):
        apply_and_write(model, off_grid, out, store=store)
    assert_clean(tmp_path)

    with pytest.raises(RecipeError, match="structure is 'unstructured' but the store"):
        apply_and_write(model, recipe, out, store=stores("nm"))
    with pytest.raises(ValueError, match="pass store=<the supernet"):
        apply_and_write(model, recipe, out)
    with pytest.raises(ValueError, match="the wanda pruner needs calibration data"):
        apply_and_write(model, recipe, out, pruner=WandaPruner())
    with pytest.raises(ValueError, match="is an N:M pruner"):
        apply_and_write(model, recipe, out, pruner=NMMagnitudePruner(m=4))
    assert_clean(tmp_path)

    pruned, updates, _ = apply_recipe(model, recipe, store=store)
    with pytest.raises(ValueError, match="do not describe the model: model.layers.0.mlp.down_pr"):
        write_pruned(pruned, out, config_updates={"intermediate_size": 48})
    assert_clean(tmp_path)
    out.mkdir()
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        write_pruned(pruned, out, config_updates=updates)
    assert list(out.iterdir()) == []


def test_store_of_another_model_is_refused(model, calib, stores):
    store = stores("wanda")
    recipe = recipe_of_choice(model, calib, store, np.zeros(store.spec.num_units, np.int32))
    other = dataclasses.replace(model, fingerprint="f" * 24)
    recipe = dataclasses.replace(
        recipe, model=dataclasses.replace(recipe.model, fingerprint="f" * 24)
    )
    with pytest.raises(ValueError, match=r"built for model fingerprint .* not this model's 'fff"):
        apply_recipe(other, recipe, store=store)


@pytest.mark.slow
def test_gpt2_neurons_are_sliced_heads_stay_zero(calib, tmp_path):
    """GPT-2 configs can express a narrower MLP (n_inner) but not fewer heads of the same
    width: neurons are sliced, heads stay as zeros, transformers gives the same logits."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=4)
    reference = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
    reference.save_pretrained(tmp_path / "gpt2")
    model = load_model(tmp_path / "gpt2")
    removed = {"attn": (1, 2), "mlp": (16, 40)}  # per block
    units, sparsity = [], {}
    for unit in supernet_units(model.adapter, "heads_neurons"):
        total = 4 if unit.role == "attn" else 64
        r = removed[unit.role][unit.block]
        kind = "heads" if unit.role == "attn" else "neurons"
        units.append(StructuredUnit(unit.name, kind, unit.block, r, total, unit.layers))
        sparsity |= dict.fromkeys(unit.layers, r / total)
    recipe = dataclasses.replace(
        make_recipe(model, calib, sparsity, structure="heads_neurons", units=units),
        model=ModelIdentity("gpt2", "GPT2LMHeadModel", "gpt2", model.fingerprint),
    )
    kwargs = {"calibration": calib, "pruner": StructuredPruner, "batch_size": BATCH}
    masked, _, _ = apply_recipe(model, recipe, physical=False, **kwargs)
    out, report = apply_and_write(model, recipe, tmp_path / "out", **kwargs)
    assert report.config_updates == {"n_inner": 48}
    assert any("gpt2 configs derive the head width" in note for note in report.notes)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    shapes = {n: tuple(p.shape) for n, p in reloaded.named_parameters()}
    assert shapes["transformer.h.0.mlp.c_fc.weight"] == (16, 48)  # Conv1D: (in, out)
    assert shapes["transformer.h.1.mlp.c_proj.weight"] == (48, 16)
    assert shapes["transformer.h.1.attn.c_attn.weight"] == (16, 48)
    with torch.no_grad():
        got = reloaded(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(got, our_logits(model.adapter, masked.params), atol=1e-4)
    # 24 zero neurons (c_fc row and bias, c_proj column) pad block 1's MLP to 48, and
    # the removed heads (c_attn q/k/v rows and biases, c_proj columns) stay as zeros
    heads = 1 + 2
    assert report.padding_params == 24 * (16 + 1 + 16) + heads * 4 * (3 * (16 + 1) + 16)
