"""Supernet builder: exact level sparsities, agreement with layer-by-layer pruning computed
directly from the model's pieces, the three input modes, structured units, errors."""

from __future__ import annotations

import functools
import gc
import pickle
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_workspace import TINY_LLAMA, quiet_build

from allocsearch.data.tokenset import TokenSet
from allocsearch.models import HFModel, adapter_for_config
from allocsearch.models.hf import fingerprint_tensors
from allocsearch.pruners import (
    DenseVariants,
    MagnitudePruner,
    NestedVariants,
    NMMagnitudePruner,
    SparseGPTPruner,
    StructuredPruner,
    WandaPruner,
    accumulate_stats,
)
from allocsearch.supernet.build import (
    build_supernet,
    structured_layouts,
    supernet_units,
    unit_group_counts,
)
from allocsearch.supernet.levels import equal_step_grid, nm_grid, structured_grid
from allocsearch.supernet.store import StoreError, SupernetStore

CFG = {**TINY_LLAMA, "vocab_size": 50, "hidden_size": 16}
BATCH = 3  # 6 sequences -> two batches of one shape (one compilation)


def random_params(adapter, seed: int) -> dict[str, jax.Array]:
    """A random model's parameters drawn with numpy (as ``init_params`` scales them, but
    without compiling JAX's random ops for every shape): linear weights uniform in
    +-1/sqrt(in), embeddings N(0, 1), norm scales near 1."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in adapter.param_shapes.items():
        if "norm" in name:
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif "embed" in name:
            w = rng.standard_normal(shape)
        else:
            bound = 1.0 / np.sqrt(shape[-1])
            w = rng.uniform(-bound, bound, size=shape)
        params[name] = jnp.asarray(w, jnp.float32)
    return params


@pytest.fixture(scope="module")
def model() -> HFModel:
    adapter = adapter_for_config(CFG)
    params = random_params(adapter, 0)
    fp = fingerprint_tensors(CFG, {k: np.asarray(v) for k, v in params.items()})
    return HFModel(adapter, params, fingerprint=fp)


@pytest.fixture(scope="module")
def calib() -> TokenSet:
    tokens = np.random.default_rng(1).integers(0, 50, size=(6, 12)).astype(np.int32)
    return TokenSet(tokens=tokens, source="random ids", tokenizer_identity="test-ids", seed=1)


@pytest.fixture(scope="module")
def grid(model):
    numel = [u.numel for u in supernet_units(model.adapter, "unstructured")]
    return equal_step_grid(numel, center=0.5, step_weights=32, steps_each_side=2)


@pytest.fixture(scope="module")
def build(model, calib, grid, tmp_path_factory):
    """Cached builds: build(pruner_key, input_mode) -> store (unstructured, default grid)."""
    pruners = {"wanda": WandaPruner(), "sparsegpt": SparseGPTPruner(blocksize=8)}
    root = tmp_path_factory.mktemp("stores")

    @functools.cache
    def get(pruner: str, mode: str):
        return quiet_build(
            model,
            calib,
            root / f"{pruner}-{mode}",
            pruner=pruners[pruner],
            grid=grid,
            input_mode=mode,
            batch_size=BATCH,
        )

    return get


# --------------------------------------------------------------------------- references


def direct_block_stats(model, calib, replace=None):
    """Per block, {input group (absolute): LayerStats} computed with adapter.embed and
    adapter.block run eagerly in the builder's batches; block ``b`` is advanced with its
    dense weights updated by ``replace[b]`` ({relative param name: weight})."""
    ad, params = model.adapter, model.params
    block = jax.jit(ad.block, static_argnames="capture")
    replace = replace or {}
    hs, ctxs = [], []
    for i in range(0, calib.n_seq, BATCH):
        h, ctx = ad.embed(params, jnp.asarray(calib.tokens[i : i + BATCH]))
        hs.append(h)
        ctxs.append(ctx)
    out = []
    for b in range(ad.num_blocks):
        bp = ad.block_params(params, b)
        stats = {}
        for h, ctx in zip(hs, ctxs, strict=True):
            _, taps = block(bp, h, ctx, capture=True)
            for rel, x in taps.items():
                key = ad.block_prefix(b) + rel
                stats[key] = accumulate_stats(stats.get(key), x)
        out.append(stats)
        adv = {**bp, **{k: jnp.asarray(v, jnp.float32) for k, v in replace.get(b, {}).items()}}
        hs = [block(adv, h, ctx) for h, ctx in zip(hs, ctxs, strict=True)]
    return out


def layer_infos(model, block=None):
    return [x for x in model.adapter.layers() if block is None or x.block == block]


def unit_levels(store, grid, name):
    units = [u.name for u in store.spec.units]
    u = units.index(name)
    return grid.sparsity[u, grid.valid[u]]


def masks(variants) -> np.ndarray:
    """bool[K, out, in], True where kept."""
    return np.stack([np.asarray(variants.mask(k)) for k in range(variants.num_levels)])


def assert_same_variants(a, b, *, atol=0.0):
    assert type(a) is type(b)
    np.testing.assert_array_equal(a.sparsity, b.sparsity)
    if isinstance(a, NestedVariants):
        np.testing.assert_array_equal(np.asarray(a.rank), np.asarray(b.rank))
        np.testing.assert_array_equal(a.prune_counts, b.prune_counts)
    else:
        np.testing.assert_allclose(np.asarray(a.weights), np.asarray(b.weights), atol=atol, rtol=0)
        np.testing.assert_array_equal(masks(a), masks(b))


# --------------------------------------------------------------------------- units


def test_units_of_a_llama(model):
    units = supernet_units(model.adapter, "unstructured")
    assert [u.name for u in units[:7]] == [
        f"model.layers.0.{n}"
        for n in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ]
    assert len(units) == 14 and units[1].numel == 8 * 16  # k_proj: 2 kv heads x 4 dims
    s = supernet_units(model.adapter, "heads_neurons")
    assert [(u.name, u.role, u.numel) for u in s[:2]] == [
        ("model.layers.0.self_attn", "attn", 16 * 16 + 2 * 8 * 16 + 16 * 16),
        ("model.layers.0.mlp", "mlp", 3 * 16 * 64),
    ]
    assert s[0].layers[-1] == "model.layers.0.self_attn.o_proj"
    assert [u.role for u in supernet_units(model.adapter, "neurons")] == ["mlp", "mlp"]
    np.testing.assert_array_equal(unit_group_counts(model.adapter, "heads_neurons"), [2, 64] * 2)


def test_structured_units_of_gpt2_and_bert():
    gpt2 = adapter_for_config(
        {"model_type": "gpt2", "vocab_size": 20, "n_embd": 8, "n_layer": 1, "n_head": 2}
    )
    units = supernet_units(gpt2, "heads_neurons")
    assert [u.name for u in units] == ["transformer.h.0.attn", "transformer.h.0.mlp"]
    heads, mlp = structured_layouts(gpt2)
    assert heads.fused_qkv and heads.num_groups == 2 and mlp.num_groups == 32
    bert = adapter_for_config(
        {
            "model_type": "bert",
            "vocab_size": 20,
            "hidden_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 16,
        }
    )
    names = [u.name for u in supernet_units(bert, "heads_neurons")]
    # BERT's MLP has no parent module below the block; it is named after the block.
    assert names == ["encoder.layer.0.attention", "encoder.layer.0.mlp"]


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_every_level_holds_exactly_its_sparsity(build, grid, pruner):
    store = build(pruner, "dense")
    spec = store.spec
    np.testing.assert_array_equal(spec.valid, grid.valid)
    np.testing.assert_array_equal(spec.sparsity[grid.valid], grid.sparsity[grid.valid])
    for u, params in enumerate(store.unit_params):
        (param,) = params
        v = store.variants(param)
        numel = spec.units[u].numel
        removed = (~masks(v)).reshape(v.num_levels, -1).sum(axis=1)
        np.testing.assert_array_equal(removed, np.rint(spec.sparsity[u, : v.num_levels] * numel))
        if isinstance(v, DenseVariants):
            assert np.all(np.asarray(v.weights)[~masks(v)] == 0)


def test_nm_levels_are_exact_patterns(model, calib, tmp_path):
    units = supernet_units(model.adapter, "nm")
    g = nm_grid(
        [(0, 4), (1, 4), (2, 4)],
        in_features=[64 if "down" in u.name else 16 for u in units],
        center=(2, 4),
    )
    store = quiet_build(
        model,
        calib,
        tmp_path / "nm",
        pruner=NMMagnitudePruner(m=4),
        grid=g,
        structure="nm",
        batch_size=BATCH,
    )
    assert store.spec.structure == "nm" and store.spec.level_labels[0] == ("0:4", "1:4", "2:4")
    v = store.variants("model.layers.1.mlp.down_proj.weight")
    for k, n in enumerate([0, 1, 2]):
        zeros = (~np.asarray(v.mask(k))).reshape(16, 16, 4).sum(axis=-1)
        assert np.all(zeros == n)


# --------------------------------------------------------------------------- input modes


@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_first_block_is_the_same_in_every_input_mode(build, model, pruner):
    # (SparseGPT's "expected" build is skipped to keep the suite fast: the first block's
    # code path does not depend on the pruner.)
    modes = ("dense", "expected", "centre") if pruner == "wanda" else ("dense", "centre")
    stores = [build(pruner, mode) for mode in modes]
    for layer in layer_infos(model, block=0):
        ref = stores[0].variants(layer.weight_name)
        for other in stores[1:]:
            assert_same_variants(ref, other.variants(layer.weight_name))


@pytest.mark.parametrize(
    ("pruner", "atol"), [(WandaPruner(), 0.0), (SparseGPTPruner(blocksize=8), 1e-5)]
)
def test_dense_mode_equals_pruning_from_dense_activations(build, model, calib, grid, pruner, atol):
    store = build(pruner.name, "dense")
    stats = direct_block_stats(model, calib)
    for layer in layer_infos(model):
        levels = unit_levels(store, grid, layer.name)
        ref = pruner.prune(
            model.params[layer.weight_name], stats[layer.block][layer.input_group], levels
        )
        assert_same_variants(ref, store.variants(layer.weight_name), atol=atol)


def expected_weight_numpy(variants, weight, sparsity) -> np.ndarray:
    """W_bar = sum_i (1 - s_i) W_i / sum_i (1 - s_i), in float64."""
    w = np.asarray(weight, np.float64)
    density = 1.0 - np.asarray(sparsity, np.float64)
    levels = [np.where(masks(variants)[k], w, 0.0) for k in range(variants.num_levels)]
    return sum(d * lv for d, lv in zip(density, levels, strict=True)) / density.sum()


def test_expected_mode_matches_a_hand_computation_with_w_bar(build, model, calib, grid):
    dense, expected = build("wanda", "dense"), build("wanda", "expected")
    prefix = model.adapter.block_prefix(0)
    replace = {
        0: {
            layer.weight_name[len(prefix) :]: expected_weight_numpy(
                expected.variants(layer.weight_name),
                model.params[layer.weight_name],
                unit_levels(expected, grid, layer.name),
            )
            for layer in layer_infos(model, block=0)
        }
    }
    stats = direct_block_stats(model, calib, replace)
    differs = 0
    for layer in layer_infos(model, block=1):
        ref = WandaPruner().prune(
            model.params[layer.weight_name],
            stats[1][layer.input_group],
            unit_levels(expected, grid, layer.name),
        )
        got = expected.variants(layer.weight_name)
        assert_same_variants(ref, got)
        differs += not np.array_equal(
            np.asarray(got.rank), np.asarray(dense.variants(layer.weight_name).rank)
        )
    # Every input group of block 1 sees other activations than in dense mode.
    assert differs >= 3


def test_centre_mode_advances_with_the_centre_level(build, model, calib, grid):
    store = build("sparsegpt", "centre")
    prefix = model.adapter.block_prefix(0)
    centre = {u.name: int(c) for u, c in zip(store.spec.units, store.spec.center, strict=True)}
    replace = {
        0: {
            layer.weight_name[len(prefix) :]: np.asarray(
                store.variants(layer.weight_name).weights[centre[layer.name]]
            )
            for layer in layer_infos(model, block=0)
        }
    }
    stats = direct_block_stats(model, calib, replace)
    pruner = SparseGPTPruner(blocksize=8)
    for layer in layer_infos(model, block=1):
        levels = unit_levels(store, grid, layer.name)
        ref = pruner.prune(model.params[layer.weight_name], stats[1][layer.input_group], levels)
        assert_same_variants(ref, store.variants(layer.weight_name), atol=1e-5)
    dense = build("sparsegpt", "dense")
    q = "model.layers.1.self_attn.q_proj.weight"
    assert not np.allclose(store.variants(q).weights, dense.variants(q).weights, atol=1e-4)


# --------------------------------------------------------------------------- structured


@pytest.fixture(scope="module")
def structured_store(model, calib, tmp_path_factory):
    units = supernet_units(model.adapter, "heads_neurons")
    steps = np.array([1 if u.role == "attn" else 16 for u in units])
    g = structured_grid(
        unit_group_counts(model.adapter, "heads_neurons"), steps, center=0.5, steps_each_side=2
    )
    store = quiet_build(
        model,
        calib,
        tmp_path_factory.mktemp("structured") / "s",
        pruner=functools.partial(StructuredPruner, round_size=8),
        grid=g,
        structure="heads_neurons",
        input_mode="expected",
        batch_size=BATCH,
    )
    return store, g


def test_structured_store_has_input_norms_of_every_layer(model, calib, structured_store):
    """OWL needs ||X_j|| of every layer, also of q/k/v and gate/up, whose inputs no
    structured unit prunes along; block 0 sees the dense embedding in any input mode."""
    store, _ = structured_store
    norms = store.input_norms()
    assert sorted(norms) == sorted(layer.name for layer in model.adapter.layers())
    stats = direct_block_stats(model, calib)
    for layer in model.adapter.layers():
        if layer.block == 0:
            want = np.sqrt(np.diag(np.asarray(stats[0][layer.input_group].hessian)))
            np.testing.assert_allclose(norms[layer.name], want, rtol=1e-4, atol=1e-5)


def test_structured_costs_count_dead_rows(model, structured_store):
    store, g = structured_store
    heads, neurons = structured_layouts(model.adapter)
    spec = store.spec
    np.testing.assert_array_equal(spec.sparsity[g.valid], g.sparsity[g.valid])
    for u, unit in enumerate(spec.units):
        layout = heads if unit.role == "attn" else neurons
        out_proj = store.variants(store.unit_params[u][-1])
        keep = out_proj.group_keep
        assert keep.shape == (spec.num_levels[u], layout.num_groups)
        # The spec's cost is the layout's exact parameter count, dead q/k/v (gate/up) rows
        # included (this Llama has no biases).
        np.testing.assert_array_equal(
            spec.kept_params()[u, : spec.num_levels[u]], layout.kept_params(keep)
        )
        for k in range(spec.num_levels[u]):
            cols = layout.column_keep(keep[k])
            w = np.asarray(out_proj.weights[k])
            assert np.all(w[:, ~cols] == 0) and np.all(w[:, cols] != 0)
            dead = layout.dead_rows(keep[k])
            for param, layer in zip(store.unit_params[u][:-1], unit.layers[:-1], strict=True):
                role = next(x.role for x in model.adapter.layers() if x.name == layer)
                m = np.asarray(store.variants(param).mask(k))
                np.testing.assert_array_equal(m, np.broadcast_to(~dead[role][:, None], m.shape))


def test_structured_first_block_equals_the_pruner_on_direct_statistics(
    model, calib, structured_store
):
    store, g = structured_store
    stats = direct_block_stats(model, calib)[0]
    heads, neurons = structured_layouts(model.adapter)
    for u, layout in ((0, heads), (1, neurons)):
        out_proj = model.adapter.layers()[3 if u == 0 else 6]
        ref = StructuredPruner(layout=layout, round_size=8).prune(
            model.params[out_proj.weight_name],
            stats[out_proj.input_group],
            g.sparsity[u, g.valid[u]],
        )
        got = store.variants(out_proj.weight_name)
        np.testing.assert_array_equal(ref.group_keep, got.group_keep)
        np.testing.assert_allclose(np.asarray(ref.weights), np.asarray(got.weights), atol=1e-5)
    assert store.manifest["pruner"]["params"] == {
        "round_size": 8,
        "percdamp": 0.01,
        "enumeration_limit": 5000,
        "max_swaps": 64,
    }


# --------------------------------------------------------------------------- errors


def test_bad_arguments_are_refused(model, calib, grid, tmp_path):
    kw = dict(
        pruner=MagnitudePruner(),
        grid=grid,
        structure="unstructured",
        input_mode="dense",
        out_dir=tmp_path / "x",
        batch_size=2,
        progress=False,
    )
    with pytest.raises(ValueError, match=r"input_mode 'center' is not supported; valid: \('dense'"):
        build_supernet(model, calib, **{**kw, "input_mode": "center"})
    with pytest.raises(ValueError, match=r"structure 'rows' is not supported"):
        build_supernet(model, calib, **{**kw, "structure": "rows"})
    with pytest.raises(ValueError, match=r"batch_size must be a positive int"):
        build_supernet(model, calib, **{**kw, "batch_size": 0})
    with pytest.raises(ValueError, match=r"has 4 units \(rows\)"):
        build_supernet(
            model, calib, **{**kw, "structure": "heads_neurons", "pruner": StructuredPruner}
        )
    with pytest.raises(ValueError, match=r"pass a factory called as factory\(layout=...\)"):
        build_supernet(
            model,
            calib,
            **{
                **kw,
                "structure": "neurons",
                "pruner": StructuredPruner(layout=structured_layouts(model.adapter)[1]),
            },
        )
    with pytest.raises(ValueError, match=r"pass a LocalPruner instance"):
        build_supernet(model, calib, **{**kw, "pruner": StructuredPruner})
    with pytest.raises(ValueError, match=r"model.fingerprint is empty"):
        build_supernet(HFModel(model.adapter, model.params), calib, **kw)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- memory


class WatchedWanda:
    """Wanda that records, at every call, how many of its earlier results are still alive."""

    name = "wanda"
    nested = True

    def __init__(self):
        self.results: list[weakref.ref] = []
        self.max_alive = 0

    def prune(self, weight, stats, sparsities):
        gc.collect()
        alive = sum(r() is not None for r in self.results)
        self.max_alive = max(self.max_alive, alive)
        variants = WandaPruner().prune(weight, stats, sparsities)
        self.results.append(weakref.ref(variants))
        return variants


def test_one_layer_of_variants_in_memory_at_a_time(model, calib, grid, tmp_path):
    # Memory grows with one block, not with the model: a layer's variants are written and
    # dropped before the next layer is pruned (the "expected" mode keeps only W_bar).
    pruner = WatchedWanda()
    quiet_build(
        model,
        calib,
        tmp_path / "s",
        pruner=pruner,
        grid=grid,
        input_mode="expected",
        batch_size=BATCH,
    )
    assert len(pruner.results) == 14 and pruner.max_alive == 0


def test_input_norms_are_recorded_and_checksummed(build, model, calib):
    """The build stores ||X_j||_2 of every layer's (dense) input, for OWL and Wanda-style
    allocators; the file is covered by the store's checksums like the variants."""
    store = build("wanda", "dense")
    norms = store.input_norms()
    assert sorted(norms) == sorted(layer.name for layer in model.adapter.layers())
    stats = direct_block_stats(model, calib)
    for layer in model.adapter.layers():
        want = np.sqrt(np.diag(np.asarray(stats[layer.block][layer.input_group].hessian)))
        np.testing.assert_allclose(norms[layer.name], want, rtol=1e-5, atol=1e-6)


def test_corrupt_input_norms_are_refused(model, calib, grid, tmp_path):
    store = quiet_build(
        model, calib, tmp_path / "s", pruner=WandaPruner(), grid=grid, batch_size=BATCH
    )
    f = store.path / "input_norms.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    reopened = SupernetStore.open(store.path)  # digests are checked when a file is read
    with pytest.raises(StoreError, match="checksum mismatch in 'input_norms.safetensors'"):
        reopened.input_norms()


# --------------------------------------------------------------------------- map_layers


def assert_same_store(a: SupernetStore, b: SupernetStore) -> None:
    """Bit-identical stores: every variant and norm file byte for byte, and the same
    manifest apart from the build timings."""
    names = sorted(p.name for p in a.path.iterdir())
    assert names == sorted(p.name for p in b.path.iterdir())
    for name in names:
        if name != "manifest.json":
            assert (a.path / name).read_bytes() == (b.path / name).read_bytes(), name
    ma, mb = a.manifest, b.manifest
    for m in (ma, mb):
        del m["build"]["seconds_per_block"], m["build"]["seconds_total"]
    assert ma == mb


def reversed_map(fn, tasks):
    """Runs the tasks last to first (so no task can lean on an earlier one), returns the
    results in task order."""
    tasks = list(tasks)
    return [fn(t) for t in reversed(tasks)][::-1]


def pickled_map(fn, tasks):
    """What a process pool does to the tasks: fn and every task pickled, the results too."""
    for task in tasks:
        yield pickle.loads(
            pickle.dumps(pickle.loads(pickle.dumps(fn))(pickle.loads(pickle.dumps(task))))
        )


@pytest.mark.parametrize(
    "pruner, mode",
    [("sparsegpt", "dense"), ("wanda", "expected"), ("sparsegpt", "centre")],
)
@pytest.mark.parametrize("layer_map", [reversed_map, pickled_map])
def test_any_layer_map_builds_the_serial_store(
    build, model, calib, grid, tmp_path, pruner, mode, layer_map
):
    pruners = {"wanda": WandaPruner(), "sparsegpt": SparseGPTPruner(blocksize=8)}
    store = quiet_build(
        model,
        calib,
        tmp_path / "s",
        pruner=pruners[pruner],
        grid=grid,
        input_mode=mode,
        batch_size=BATCH,
        map_layers=layer_map,
    )
    assert_same_store(store, build(pruner, mode))


def test_structured_units_pickle_for_a_layer_map(model, calib, structured_store, tmp_path):
    serial, g = structured_store
    store = quiet_build(
        model,
        calib,
        tmp_path / "s",
        pruner=functools.partial(StructuredPruner, round_size=8),
        grid=g,
        structure="heads_neurons",
        input_mode="expected",
        batch_size=BATCH,
        map_layers=pickled_map,
    )
    assert_same_store(store, serial)


@pytest.mark.parametrize(
    ("map_layers", "message"),
    [
        (lambda fn, tasks: map(fn, list(tasks)[:-1]), "returned fewer results than the 7 units"),
        (4, "map_layers must be a callable like map"),
    ],
    ids=["drops-a-result", "not-callable"],
)
def test_a_bad_layer_map_is_an_error(model, calib, grid, tmp_path, map_layers, message):
    with pytest.raises(ValueError, match=message):
        quiet_build(
            model,
            calib,
            tmp_path / "s",
            pruner=MagnitudePruner(),
            grid=grid,
            batch_size=BATCH,
            map_layers=map_layers,
        )
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_ray_layer_map_builds_the_serial_store_bit_for_bit(build, model, calib, grid, tmp_path):
    """Two pinned 1-CPU Ray actors prune the layers of each block (SparseGPT: Cholesky
    factorisations and weight updates in other processes); the store is the one the serial
    build writes (a local Ray instance started and stopped here). Also one layer of the
    demo model's widths (256 x 704), where XLA's and OpenBLAS's thread pools matter: the
    actors start them with this process's sizes (``like_driver``), so the variants agree
    bit for bit there too."""
    from allocsearch.distributed.ray_backend import RayLayerMap
    from allocsearch.supernet.build import _plans, _prune_task, _UnitTask

    demo_widths = adapter_for_config({**CFG, "hidden_size": 256, "intermediate_size": 704})
    down = next(p for p in _plans(demo_widths, "unstructured") if p.unit.role == "down")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 64, 704)).astype(np.float32)
    task = _UnitTask(
        plan=down,
        weight=jnp.asarray(rng.uniform(-0.04, 0.04, size=(256, 704)), jnp.float32),
        stats=accumulate_stats(None, x),
        levels=np.array([0.25, 0.375, 0.5, 0.625, 0.75]),
    )
    prune = functools.partial(_prune_task, SparseGPTPruner())
    with RayLayerMap(workers=2) as layer_map:
        store = quiet_build(
            model,
            calib,
            tmp_path / "s",
            pruner=SparseGPTPruner(blocksize=8),
            grid=grid,
            batch_size=BATCH,
            map_layers=layer_map,
        )
        [remote] = layer_map(prune, [task])
    assert_same_store(store, build("sparsegpt", "dense"))
    local = prune(task)
    assert list(remote) == list(local) == [down.primary.weight_name]
    assert_same_variants(remote[down.primary.weight_name], local[down.primary.weight_name])
