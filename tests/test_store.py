"""Supernet store: round trips (bit-identical in every layout and storage dtype), one rank
array for nested pruners, the packed layout's size, version-1 stores, digests checked at
first read, the errors of a wrong model / calibration set or damaged files, atomic
assembly."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from tiny_workspace import quiet_build
from typer.testing import CliRunner

from allocsearch.cli import app as cli_app
from allocsearch.config import ConfigError, config_from_dict
from allocsearch.data.tokenset import TokenSet
from allocsearch.models import HFModel, adapter_for_config
from allocsearch.models.hf import fingerprint_tensors
from allocsearch.models.safetensors_io import read_header, read_safetensors
from allocsearch.pruners import (
    DenseVariants,
    HeadGroups,
    LayerStats,
    MagnitudePruner,
    NestedVariants,
    SparseGPTPruner,
    StructuredPruner,
    WandaPruner,
)
from allocsearch.supernet import store as store_module
from allocsearch.supernet.build import build_supernet, supernet_units
from allocsearch.supernet.levels import LevelGrid, equal_step_grid
from allocsearch.supernet.spec import Unit
from allocsearch.supernet.store import (
    MANIFEST_NAME,
    StoreError,
    StoreWriter,
    SupernetStore,
    make_spec,
    resolve_storage_dtype,
)

STORAGE = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

MODEL_FP = "model-fingerprint-a"
TOKENS_FP = "tokens-fingerprint-a"
LEVELS = np.array([0.0, 0.25, 0.5, 0.75])  # exact for 16 x 24 and 16 x 8 matrices


def random_stats(rng: np.random.Generator, n_in: int) -> LayerStats:
    x = rng.standard_normal((64, n_in)) * rng.uniform(0.2, 3.0, n_in)
    return LayerStats(hessian=jnp.asarray(x.T @ x, jnp.float32), n_tokens=64)


@pytest.fixture(scope="module")
def layers():
    """Three layers pruned by a per-row nested, a whole-matrix nested, a dense pruner and a
    structured pruner (with group keep masks): {param: (weight, variants)}."""
    rng = np.random.default_rng(0)
    w1, w2, w3 = (rng.standard_normal(s).astype(np.float32) for s in ((16, 24), (16, 24), (16, 8)))
    heads = HeadGroups(hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=2)
    wo = rng.standard_normal((16, 8)).astype(np.float32)
    return {
        "a.wanda.weight": (w1, WandaPruner().prune(w1, random_stats(rng, 24), LEVELS)),
        "a.magnitude.weight": (w2, MagnitudePruner().prune(w2, None, LEVELS)),
        "a.sparsegpt.weight": (
            w3,
            SparseGPTPruner(blocksize=4).prune(w3, random_stats(rng, 8), LEVELS),
        ),
        "a.o_proj.weight": (
            wo,
            StructuredPruner(layout=heads).prune(wo, random_stats(rng, 8), [0.0, 0.5]),
        ),
    }


def write_store(path, layers, *, storage_dtype="float32", **kwargs):
    """A store with one unit per parameter, written with StoreWriter directly."""
    names = list(layers)
    units = [
        Unit(n, "q", 0, (n[: -len(".weight")],), w.size, w.size) for n, (w, _) in layers.items()
    ]
    k = max(v.num_levels for _, v in layers.values())
    sparsity = np.full((len(names), k), np.nan)
    for i, (_, v) in enumerate(layers.values()):
        sparsity[i, : v.num_levels] = v.sparsity
    valid = ~np.isnan(sparsity)
    center = np.ones(len(names), np.int32)
    spec = make_spec(units, sparsity, valid, center, "unstructured", None)
    with StoreWriter(path, storage_dtype=storage_dtype, **kwargs) as writer:
        for name, (_, v) in layers.items():
            writer.add(name, v)
        writer.commit(
            spec=spec,
            unit_params=[[n] for n in names],
            grid=LevelGrid(sparsity, valid, center),
            model_fingerprint=MODEL_FP,
            tokens_fingerprint=TOKENS_FP,
            pruner={"name": "mixed", "nested": False, "params": {}},
            input_mode="dense",
        )
    return path


@pytest.fixture
def store_path(layers, tmp_path):
    return write_store(tmp_path / "store", layers)


def bits(a) -> np.ndarray:
    """The bytes of an array as unsigned integers (a bit-identical comparison)."""
    a = np.asarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def assert_same(a, b):
    assert type(a) is type(b)
    np.testing.assert_array_equal(a.sparsity, b.sparsity)
    if isinstance(a, NestedVariants):
        assert a.per_row == b.per_row
        np.testing.assert_array_equal(np.asarray(a.rank), np.asarray(b.rank))
        np.testing.assert_array_equal(a.prune_counts, b.prune_counts)
    else:
        assert a.weights.dtype == b.weights.dtype
        np.testing.assert_array_equal(bits(a.weights), bits(b.weights))
        if a.group_keep is None:
            assert b.group_keep is None
        else:
            np.testing.assert_array_equal(a.group_keep, b.group_keep)


# --------------------------------------------------------------------------- round trips


def test_reopen_gives_identical_variants(layers, store_path):
    store = SupernetStore.open(store_path, model_fingerprint=MODEL_FP, tokens_fingerprint=TOKENS_FP)
    assert store.param_names == tuple(layers)
    assert store.unit_params == tuple((n,) for n in layers)
    for name, (_, v) in layers.items():
        assert_same(v, store.variants(name))
    assert set(store.all_variants()) == set(layers)
    again = SupernetStore.open(store_path)
    for name in layers:
        assert_same(store.variants(name), again.variants(name))
    np.testing.assert_array_equal(again.spec.sparsity, store.spec.sparsity)
    assert again.spec.units == store.spec.units
    assert store.manifest["format_version"] == 2 and store.manifest["pruner"]["name"] == "mixed"


def test_nested_variants_are_one_rank_array_whose_masks_equal_the_pruners(layers, store_path):
    store = SupernetStore.open(store_path)
    for name in ("a.wanda.weight", "a.magnitude.weight"):
        weight, ref = layers[name]
        tensors = read_safetensors(store_path / f"{name}.safetensors")
        assert set(tensors) == {"rank", "prune_counts", "sparsity"}
        assert tensors["rank"].shape == weight.shape and tensors["rank"].dtype == np.int32
        got = store.variants(name)
        for k in range(len(LEVELS)):
            np.testing.assert_array_equal(np.asarray(got.mask(k)), np.asarray(ref.mask(k)))
            kept = np.asarray(got.mask(k)).sum()
            assert kept == weight.size * (1 - LEVELS[k])  # exact
    # one int32 rank array + counts, not 4 weight copies
    nested = (store_path / "a.wanda.weight.safetensors").stat().st_size
    assert nested < 16 * 24 * 4 + 1024


def test_bfloat16_storage_is_never_upcast(layers, tmp_path):
    store = SupernetStore.open(write_store(tmp_path / "bf16", layers, storage_dtype="bfloat16"))
    assert store.storage_dtype == "bfloat16"
    _, ref = layers["a.sparsegpt.weight"]
    got = store.variants("a.sparsegpt.weight")
    assert got.weights.dtype == jnp.bfloat16
    rounded = np.asarray(ref.weights).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(bits(got.weights), bits(rounded))
    levels = store.read_levels("a.sparsegpt.weight", [2, 0])
    assert levels.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(bits(levels), bits(rounded[[2, 0]]))
    assert_same(layers["a.wanda.weight"][1], store.variants("a.wanda.weight"))


# --------------------------------------------------------------------------- errors


def test_wrong_model_or_tokens_names_both_fingerprints(store_path):
    with pytest.raises(
        StoreError,
        match=r"different model \(its model_fingerprint is 'model-fingerprint-a', the one "
        r"given has 'other'\): use the model it was built from, or rebuild",
    ):
        SupernetStore.open(store_path, model_fingerprint="other")
    with pytest.raises(
        StoreError,
        match=r"different calibration token set \(its tokens_fingerprint is "
        r"'tokens-fingerprint-a', the one given has 'b'\): use the calibration token set",
    ):
        SupernetStore.open(store_path, model_fingerprint=MODEL_FP, tokens_fingerprint="b")


def flip_a_byte(f) -> None:
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0x01
    f.write_bytes(bytes(raw))


@pytest.mark.parametrize("name", ["a.magnitude.weight", "a.sparsegpt.weight"])
def test_flipped_byte_is_a_checksum_error_at_first_read_naming_the_file(store_path, name):
    flip_a_byte(store_path / f"{name}.safetensors")
    message = rf"checksum mismatch in '{name}.safetensors'"
    store = SupernetStore.open(store_path)  # lazy: opening reads manifest and sizes only
    assert store.verify == "lazy"
    store.variants("a.wanda.weight")  # other files are fine
    for read in (
        lambda: store.variants(name),
        lambda: store.read_levels(name, [0], dense=np.zeros((16, 24), np.float32)),
        store.all_variants,
    ):
        with pytest.raises(StoreError, match=message):
            read()  # every time, not only the first
    with pytest.raises(StoreError, match=message):
        SupernetStore.open(store_path, verify="full")
    with pytest.raises(StoreError, match=message):
        SupernetStore.open(store_path, verify=True)  # the old spelling of "full"
    SupernetStore.open(store_path, verify="none").variants(name)  # sizes alone do not see it
    SupernetStore.open(store_path, verify=False).variants(name)
    with pytest.raises(ValueError, match=r"verify 'eager' not supported; valid: \['lazy', "):
        SupernetStore.open(store_path, verify="eager")


def test_each_file_is_checked_once_per_process_even_from_many_threads(
    layers, store_path, monkeypatch
):
    """The streaming evaluator reads from a prefetch thread: concurrent first reads of a
    file hash it once, later reads not at all; a fresh open (another process) checks
    again."""
    hashed = []
    real = store_module.file_digest

    def counting(path):
        hashed.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(store_module, "file_digest", counting)
    store = SupernetStore.open(store_path)
    assert hashed == []  # nothing hashed at open
    w = layers["a.magnitude.weight"][0]
    errors = []

    def read():
        try:
            for _ in range(3):
                store.read_levels("a.magnitude.weight", [1], dense=w)
                store.variants("a.sparsegpt.weight")
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(hashed) == ["a.magnitude.weight.safetensors", "a.sparsegpt.weight.safetensors"]
    store.input_norms()  # this store has none: nothing to hash
    SupernetStore.open(store_path).variants("a.sparsegpt.weight")
    assert len(hashed) == 3
    hashed.clear()
    SupernetStore.open(store_path, verify="full")
    assert sorted(hashed) == sorted(f"{n}.safetensors" for n in layers)


def test_deleted_or_truncated_file(store_path):
    f = store_path / "a.sparsegpt.weight.safetensors"
    f.write_bytes(f.read_bytes()[:-4])
    with pytest.raises(StoreError, match=r"'a.sparsegpt.weight.safetensors' has \d+ bytes, the "):
        SupernetStore.open(store_path, verify=False)
    f.unlink()
    with pytest.raises(
        StoreError, match=r"variant file 'a.sparsegpt.weight.safetensors' of a.sparsegpt.weight"
    ):
        SupernetStore.open(store_path, verify=False)


def test_unknown_version_missing_or_broken_manifest(store_path, tmp_path):
    m = store_path / MANIFEST_NAME
    body = json.loads(m.read_text())
    for version in (7, 0, "2", True):
        m.write_text(json.dumps({**body, "format_version": version}))
        with pytest.raises(
            StoreError,
            match=rf"unknown store format version {version!r}; this allocsearch reads versions "
            rf"1, 2 \(and writes 2\); rebuild the supernet",
        ):
            SupernetStore.open(store_path)
    m.write_text("{not json")
    with pytest.raises(StoreError, match=r"manifest is not valid JSON"):
        SupernetStore.open(store_path)
    m.write_text(json.dumps({k: v for k, v in body.items() if k != "spec"}))
    with pytest.raises(StoreError, match=r"manifest lacks \['spec'\]"):
        SupernetStore.open(store_path)
    with pytest.raises(StoreError, match=r"is not a supernet store: manifest.json is missing"):
        SupernetStore.open(tmp_path)


def test_unknown_parameter(store_path):
    with pytest.raises(KeyError, match=r"no variants for 'model.x.weight'"):
        SupernetStore.open(store_path).variants("model.x.weight")


# --------------------------------------------------------------------------- assembly


def test_existing_store_is_refused_unless_overwrite(layers, store_path):
    with pytest.raises(FileExistsError, match=r"exists; pass overwrite=True"):
        StoreWriter(store_path)
    one = {"a.magnitude.weight": layers["a.magnitude.weight"]}
    write_store(store_path, one, overwrite=True)
    assert SupernetStore.open(store_path).param_names == ("a.magnitude.weight",)
    assert sorted(os.listdir(store_path.parent)) == ["store"]  # no leftovers


def test_interrupted_writer_leaves_nothing(layers, tmp_path):
    with pytest.raises(RuntimeError, match="boom"), StoreWriter(tmp_path / "s") as writer:
        writer.add("a.wanda.weight", layers["a.wanda.weight"][1])
        assert any(writer.temporary_path.iterdir())
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_commit_checks_units_against_files(layers, tmp_path):
    with StoreWriter(tmp_path / "s") as writer:
        writer.add("a.wanda.weight", layers["a.wanda.weight"][1])
        with pytest.raises(ValueError, match=r"already written"):
            writer.add("a.wanda.weight", layers["a.wanda.weight"][1])
        unit = Unit("a.wanda", "q", 0, ("a.wanda",), 384, 384)
        spec = make_spec(
            [unit], LEVELS[None, :3], np.ones((1, 3), bool), np.zeros(1), "unstructured", None
        )
        with pytest.raises(
            ValueError, match=r"a.wanda.weight has 4 levels but its unit a.wanda has 3"
        ):
            writer.commit(
                spec=spec,
                unit_params=[["a.wanda.weight"]],
                grid=LevelGrid(spec.sparsity, spec.valid, spec.center),
                model_fingerprint=MODEL_FP,
                tokens_fingerprint=TOKENS_FP,
                pruner={"name": "wanda"},
                input_mode="dense",
            )
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- end to end

CFG = {
    "model_type": "llama",
    "vocab_size": 40,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "tie_word_embeddings": True,
}


@pytest.fixture(scope="module")
def tiny():
    adapter = adapter_for_config(CFG)
    rng = np.random.default_rng(3)
    params = {
        k: jnp.asarray(rng.uniform(-0.5, 0.5, s) + ("norm" in k), jnp.float32)
        for k, s in adapter.param_shapes.items()
    }
    model = HFModel(adapter, params, fingerprint=fingerprint_tensors(CFG, params))
    tokens = rng.integers(0, 40, size=(4, 6)).astype(np.int32)
    calib = TokenSet(tokens=tokens, source="random", tokenizer_identity="test", seed=3)
    numel = [u.numel for u in supernet_units(adapter, "unstructured")]
    grid = equal_step_grid(numel, center=0.5, step_weights=8, steps_each_side=1)
    return model, calib, grid


def build(tiny, out_dir, pruner=None, **kw):
    model, calib, grid = tiny
    return build_supernet(
        model,
        calib,
        pruner=pruner or MagnitudePruner(),
        grid=grid,
        structure="unstructured",
        input_mode="expected",
        out_dir=out_dir,
        batch_size=3,
        progress=False,
        **kw,
    )


def test_built_store_reopens_with_its_fingerprints(tiny, tmp_path):
    model, calib, grid = tiny
    store = build(tiny, tmp_path / "s")
    m = store.manifest
    assert (m["model_fingerprint"], m["tokens_fingerprint"]) == (
        model.fingerprint,
        calib.fingerprint,
    )
    assert m["pruner"] == {"name": "magnitude", "nested": True, "params": {}}
    assert m["input_mode"] == "expected" and m["calibration"]["n_seq"] == 4
    assert len(m["build"]["seconds_per_block"]) == 2
    np.testing.assert_array_equal(store.grid.sparsity[grid.valid], grid.sparsity[grid.valid])
    again = SupernetStore.open(
        tmp_path / "s", model_fingerprint=model.fingerprint, tokens_fingerprint=calib.fingerprint
    )
    for p in store.param_names:
        assert_same(store.variants(p), again.variants(p))
    # Building again gives the same bytes (deterministic), and refuses to overwrite.
    twin = build(tiny, tmp_path / "t")
    assert {p: e["blake2b"] for p, e in twin.manifest["variants"].items()} == {
        p: e["blake2b"] for p, e in m["variants"].items()
    }
    with pytest.raises(FileExistsError):
        build(tiny, tmp_path / "s")
    build(tiny, tmp_path / "s", overwrite=True)


class FailingPruner:
    """Magnitude pruning that fails on its n-th layer (an interrupted build)."""

    name = "failing"
    nested = True

    def __init__(self, fail_at: int):
        self.calls = 0
        self.fail_at = fail_at

    def prune(self, weight, stats, sparsities):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return MagnitudePruner().prune(weight, stats, sparsities)


def test_interrupted_build_leaves_no_store(tiny, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        build(tiny, tmp_path / "s", pruner=FailingPruner(fail_at=9))  # in block 1
    assert os.listdir(tmp_path) == []
    with pytest.raises(StoreError, match="is not a supernet store"):
        SupernetStore.open(tmp_path / "s")


def test_wrong_model_for_a_built_store(tiny, tmp_path):
    build(tiny, tmp_path / "s")
    other = {k: np.asarray(v) * 2 for k, v in tiny[0].params.items()}
    with pytest.raises(StoreError, match=r"built for a different model"):
        SupernetStore.open(tmp_path / "s", model_fingerprint=fingerprint_tensors(CFG, other))


def test_read_levels_gives_host_weights_of_chosen_levels(layers, store_path):
    """read_levels (the streaming evaluator's read) equals each pruner's own level weights:
    nested ones rebuilt from the dense weight, dense ones as stored; repeats allowed."""
    store = SupernetStore.open(store_path)
    for name, (w, v) in layers.items():
        levels = [v.num_levels - 1, 0, v.num_levels - 1]
        got = store.read_levels(name, levels, dense=w)
        assert isinstance(got, np.ndarray) and got.shape == (3, *w.shape)
        for i, k in enumerate(levels):
            if isinstance(v, NestedVariants):
                want = np.where(np.asarray(v.mask(k)), w, 0.0)
            else:
                want = np.asarray(v.weights[k])
            np.testing.assert_array_equal(got[i], want)
    with pytest.raises(ValueError, match="out of range; valid: 0..3"):
        store.read_levels("a.magnitude.weight", [4], dense=layers["a.magnitude.weight"][0])
    with pytest.raises(ValueError, match="pass its dense weight"):
        store.read_levels("a.magnitude.weight", [0])


# --------------------------------------------------------------------------- compact layouts


def level_variants(rng, shape, sparsity, group_keep=None) -> DenseVariants:
    """DenseVariants [K, out, in] whose level k has exactly round(s_k * out * in) zeros at
    random places, non-zero values elsewhere (some of them -0.0, which a bit-identical
    round trip keeps)."""
    out, n_in = shape
    w = rng.uniform(0.5, 2.0, (len(sparsity), out, n_in)) * rng.choice([-1, 1], (1, out, n_in))
    w = w.astype(np.float32)
    for k, s in enumerate(sparsity):
        w[k].reshape(-1)[rng.permutation(out * n_in)[: round(s * out * n_in)]] = 0.0
    kept = np.flatnonzero(w[-1] != 0)
    w[-1].reshape(-1)[kept[:2]] = -0.0
    return DenseVariants(
        weights=jnp.asarray(w), sparsity=np.asarray(sparsity, np.float64), group_keep=group_keep
    )


@pytest.mark.parametrize("storage_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["dense", "packed", "auto"])
def test_round_trips_are_bit_identical_in_every_layout_and_dtype(
    layers, tmp_path, storage_dtype, layout
):
    """SparseGPT, structured (with group masks) and hand-made variants with -0.0 kept
    values and a width that is not a multiple of 8: variants() and read_levels() give the
    written weights bit for bit, in the storage dtype."""
    rng = np.random.default_rng(1)
    made = level_variants(rng, (5, 13), [0.0, 0.5, 0.9])
    dense_kind = {
        "a.sparsegpt.weight": layers["a.sparsegpt.weight"],
        "a.o_proj.weight": layers["a.o_proj.weight"],
        "a.made.weight": (np.zeros((5, 13), np.float32), made),
    }
    path = write_store(tmp_path / "s", dense_kind, storage_dtype=storage_dtype, layout=layout)
    store = SupernetStore.open(path)
    assert store.storage_dtype == storage_dtype
    dtype = np.dtype(ml_dtypes.bfloat16 if storage_dtype == "bfloat16" else np.float32)
    for name, (_, ref) in dense_kind.items():
        entry = store.manifest["variants"][name]
        assert entry["layout"] == ("packed" if layout == "auto" else layout)
        assert entry["dtype"] == storage_dtype and entry["shape"] == list(ref.weights.shape[1:])
        want = np.asarray(ref.weights).astype(dtype)
        got = store.variants(name)
        assert got.weights.dtype == dtype
        assert_same(dataclasses.replace(ref, weights=jnp.asarray(want)), got)
        levels = [ref.num_levels - 1, 0, ref.num_levels - 1]
        host = store.read_levels(name, levels)
        assert isinstance(host, np.ndarray) and host.dtype == dtype
        np.testing.assert_array_equal(bits(host), bits(want[levels]))
        assert store.read_levels(name, []).shape == (0, *want.shape[1:])
    assert np.signbit(np.asarray(store.variants("a.made.weight").weights, np.float32)).sum() > 0


@pytest.mark.parametrize(
    ("storage_dtype", "packed_bytes", "dense_bytes"),
    # 5 levels of a 16 x 20 weight at 50-90% sparsity keep 160 + 128 + 96 + 64 + 32 = 480
    # values. Packed: shape 3*8 + mask 5*16*ceil(20/8)=240 + values 480 * itemsize
    # + offsets 6*8 + sparsity 5*8; dense: weights 5*16*20 * itemsize + sparsity 5*8.
    [
        ("float32", 24 + 240 + 1920 + 48 + 40, 6400 + 40),
        ("bfloat16", 24 + 240 + 960 + 48 + 40, 3200 + 40),
    ],
)
def test_packed_files_are_smaller_at_50_to_90_percent_sparsity(
    tmp_path, storage_dtype, packed_bytes, dense_bytes
):
    variants = level_variants(np.random.default_rng(2), (16, 20), [0.5, 0.6, 0.7, 0.8, 0.9])
    one = {"a.x.weight": (np.zeros((16, 20), np.float32), variants)}
    sizes = {}
    for layout in ("packed", "dense", "auto"):
        path = write_store(tmp_path / layout, one, storage_dtype=storage_dtype, layout=layout)
        f = path / "a.x.weight.safetensors"
        _, data_start = read_header(f)
        sizes[layout] = f.stat().st_size - data_start  # the tensors' bytes, header excluded
        assert SupernetStore.open(path).manifest["variants"]["a.x.weight"]["bytes"] == (
            f.stat().st_size
        )
    assert sizes == {"packed": packed_bytes, "dense": dense_bytes, "auto": packed_bytes}


def test_auto_layout_keeps_dense_files_dense(tmp_path):
    """A level set with nearly no zeros is smaller in the dense layout: auto keeps it."""
    variants = level_variants(np.random.default_rng(3), (8, 16), [0.0, 0.01])
    path = write_store(tmp_path / "s", {"a.x.weight": (np.zeros((8, 16)), variants)})
    entry = SupernetStore.open(path).manifest["variants"]["a.x.weight"]
    assert entry["layout"] == "dense"
    assert set(read_safetensors(path / entry["file"])) == {"weights", "sparsity"}


def test_writer_refuses_unknown_layouts_and_dtypes(tmp_path):
    with pytest.raises(ValueError, match=r"layout 'sparse' not supported; valid: \['auto', "):
        StoreWriter(tmp_path / "s", layout="sparse")
    with pytest.raises(ValueError, match=r"storage_dtype 'auto' not supported; valid: \['float32'"):
        StoreWriter(tmp_path / "s", storage_dtype="auto")  # auto needs the model: resolve it
    assert os.listdir(tmp_path) == []


def test_resolve_storage_dtype():
    assert resolve_storage_dtype("auto", jnp.float32) == "float32"
    assert resolve_storage_dtype("auto", jnp.bfloat16) == "bfloat16"
    assert resolve_storage_dtype("bfloat16", jnp.float32) == "bfloat16"
    assert resolve_storage_dtype("float32", jnp.bfloat16) == "float32"
    with pytest.raises(ValueError, match=r"'auto' cannot store the model's float16 weights"):
        resolve_storage_dtype("auto", np.float16)
    with pytest.raises(ValueError, match=r"storage_dtype 'fp8' not supported; valid: \['auto'"):
        resolve_storage_dtype("fp8", np.float32)


V1_STORES = Path(__file__).parent / "data"


@pytest.mark.parametrize("storage_dtype", ["float32", "bfloat16"])
def test_version_1_stores_are_read_as_they_are(storage_dtype):
    """tests/data/store_v1_*: written by StoreWriter of format 1 (commit bbe14c7) with a
    nested, a dense (one -0.0 kept value) and a structured parameter and input norms.
    They open (digests checked at first read) and read back bit for bit, never upcast."""
    path = V1_STORES / f"store_v1_{storage_dtype}"
    store = SupernetStore.open(path, model_fingerprint="v1-model", tokens_fingerprint="v1-tokens")
    assert store.manifest["format_version"] == 1
    assert store.storage_dtype == storage_dtype
    np.testing.assert_array_equal(store.spec.num_levels, [3, 3, 2])
    for name in ("m.dense.weight", "m.o_proj.weight"):
        raw = read_safetensors(path / f"{name}.safetensors")
        got = store.variants(name)
        assert got.weights.dtype == raw["weights"].dtype
        np.testing.assert_array_equal(bits(got.weights), bits(raw["weights"]))
        np.testing.assert_array_equal(bits(store.read_levels(name, [1])), bits(raw["weights"][1:2]))
    zeros = (np.asarray(store.variants("m.dense.weight").weights) == 0).sum(axis=(1, 2))
    np.testing.assert_array_equal(zeros, [1, 24, 48])  # the kept -0.0 compares equal to 0
    assert np.signbit(np.asarray(store.variants("m.dense.weight").weights[0, 0, 0], np.float32))
    np.testing.assert_array_equal(
        store.variants("m.o_proj.weight").group_keep, [[True, True], [True, False]]
    )
    nested = store.variants("m.nested.weight")
    assert isinstance(nested, NestedVariants)
    assert [int(np.asarray(nested.mask(k)).sum()) for k in range(3)] == [96, 72, 48]
    np.testing.assert_array_equal(store.input_norms()["m.nested"], np.arange(12))


def test_built_store_is_stored_in_the_models_dtype(tiny, tmp_path):
    """storage_dtype="auto" (the default) stores a bfloat16 model's SparseGPT variants in
    bfloat16 (packed), a float32 model's in float32; "float32" on request."""
    model, calib, grid = tiny
    bf16 = HFModel(
        model.adapter,
        {k: v.astype(jnp.bfloat16) for k, v in model.params.items()},
        fingerprint="bf16-model",
    )
    for m, requested, want in (
        (bf16, "auto", "bfloat16"),
        (model, "auto", "float32"),
        (bf16, "float32", "float32"),
    ):
        out = tmp_path / f"{m.fingerprint[:8]}-{requested}"
        store = quiet_build(
            m, calib, out, pruner=SparseGPTPruner(blocksize=4), grid=grid, storage_dtype=requested
        )
        assert store.manifest["storage_dtype"] == want == store.storage_dtype
        p = store.param_names[0]
        assert store.variants(p).weights.dtype == STORAGE[want]
        assert {e["layout"] for e in store.manifest["variants"].values()} == {"packed"}


def test_storage_dtype_in_config_and_command_line(tmp_path):
    assert config_from_dict({}).supernet.storage_dtype == "auto"
    cfg = config_from_dict({"supernet": {"storage_dtype": "bfloat16"}})
    assert cfg.supernet.storage_dtype == "bfloat16"
    with pytest.raises(
        ConfigError,
        match=r"supernet.storage_dtype = 'fp16' is not valid; choose one of "
        r"\['auto', 'float32', 'bfloat16'\]",
    ):
        config_from_dict({"supernet": {"storage_dtype": "fp16"}})
    runner = CliRunner()
    for command in ("build", "demo"):
        args = [command, "--storage-dtype", "fp16", "--out", str(tmp_path / command)]
        r = runner.invoke(cli_app, args)
        assert r.exit_code == 2, r.output
        assert "supernet.storage_dtype = 'fp16' is not valid" in r.stderr
    assert os.listdir(tmp_path) == []


def test_store_directory_gets_the_usual_permissions(layers, tmp_path):
    """Issue 16.10: the store directory is 0777 & ~umask like every other output, not the
    0700 of its temporary name."""
    old = os.umask(0o022)
    try:
        path = write_store(tmp_path / "shared", layers)
    finally:
        os.umask(old)
    assert (os.stat(path).st_mode & 0o777) == 0o755


@pytest.mark.parametrize("layout", ["dense", "packed"])
def test_streaming_reads_check_only_the_levels_they_read(layers, tmp_path, layout):
    """Per-level digests: a read of some levels hashes those levels' bytes (and the small
    tensors), not the whole file, so the first pass of a streaming search reads the
    distinct variants it uses and no more; a corrupt level is still caught before use."""
    name = "a.sparsegpt.weight"
    path = write_store(tmp_path / "s", layers, layout=layout)
    f = path / f"{name}.safetensors"
    header, offset = read_header(f)
    tensor = "weights" if layout == "dense" else "mask"
    begin, end = header[tensor]["data_offsets"]
    per_level = (end - begin) // 4
    raw = bytearray(f.read_bytes())
    raw[offset + begin + 2 * per_level + 1] ^= 0x10  # inside level 2 only
    f.write_bytes(bytes(raw))
    store = SupernetStore.open(path)
    w = layers[name][1].weights
    got = store.read_levels(name, [0, 3, 0])  # untouched levels read and check fine
    np.testing.assert_array_equal(got, np.asarray(w)[[0, 3, 0]])
    for _ in range(2):
        with pytest.raises(
            StoreError, match=rf"checksum mismatch in '{name}.safetensors' \(level 2\)"
        ):
            store.read_levels(name, [1, 2])
    with pytest.raises(StoreError, match="checksum mismatch"):
        store.variants(name)  # the whole file: its digest covers every level
