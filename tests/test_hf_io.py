"""Reading and writing Hugging Face directories: errors, dtypes, shards, safetensors format."""

from __future__ import annotations

import json

import jax
import ml_dtypes
import numpy as np
import pytest

from allocsearch.models import HFModel, ModelLoadError, adapter_for_config, load_model, save_model
from allocsearch.models.safetensors_io import (
    SafetensorsError,
    read_safetensors,
    write_safetensors,
)

CFG = {
    "model_type": "llama",
    "vocab_size": 50,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
}


@pytest.fixture
def tiny(tmp_path):
    adapter = adapter_for_config(CFG)
    params = adapter.init_params(jax.random.key(0))
    path = save_model(HFModel(adapter, params), tmp_path / "m")
    return path, params


def _rewrite(path, fn):
    tensors = {k: np.array(v) for k, v in read_safetensors(path / "model.safetensors").items()}
    fn(tensors)
    write_safetensors(path / "model.safetensors", tensors)


def test_unknown_model_type(tmp_path, tiny):
    path, _ = tiny
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "falcon"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"unknown model_type 'falcon'; supported: \['bert'"):
        load_model(path)


def test_missing_tensor_names_it_and_its_shape(tiny):
    path, _ = tiny
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        ModelLoadError,
        match=r"'model.layers.1.mlp.up_proj.weight' is missing "
        r"\(expected shape \(24, 16\)\)",
    ):
        load_model(path)


def test_shape_mismatch(tiny):
    path, _ = tiny
    _rewrite(path, lambda t: t.update({"model.norm.weight": np.ones(17, np.float32)}))
    with pytest.raises(
        ModelLoadError, match=r"'model.norm.weight' has shape \(17,\), expected \(16,\)"
    ):
        load_model(path)


def test_unexpected_tensor(tiny):
    path, _ = tiny
    _rewrite(path, lambda t: t.update({"model.extra.weight": np.ones(3, np.float32)}))
    with pytest.raises(ModelLoadError, match="model.extra.weight"):
        load_model(path)


def test_nan_weights_refused(tiny):
    path, _ = tiny

    def poison(t):
        t["model.layers.0.self_attn.k_proj.weight"][0, 0] = np.nan

    _rewrite(path, poison)
    with pytest.raises(ModelLoadError, match=r"k_proj.weight' contains NaN"):
        load_model(path)


def test_missing_files(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        load_model(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text(json.dumps(CFG))
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load_model(tmp_path / "d")


def test_bfloat16_save_and_load(tiny, tmp_path):
    path, params = tiny
    m = load_model(path, dtype="bfloat16")
    assert all(v.dtype == jax.numpy.bfloat16 for v in m.params.values())
    out = save_model(m, tmp_path / "bf16", dtype="bfloat16")
    raw = read_safetensors(out / "model.safetensors")
    assert raw["model.norm.weight"].dtype == np.dtype(ml_dtypes.bfloat16)
    back = load_model(out)
    want = np.asarray(params["model.layers.0.mlp.down_proj.weight"]).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(back.params["model.layers.0.mlp.down_proj.weight"]), want.astype(np.float32)
    )


def test_sharded_roundtrip_and_overwrite(tiny, tmp_path):
    path, params = tiny
    m = load_model(path)
    out = save_model(m, tmp_path / "sharded", max_shard_bytes=4000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = load_model(out)
    assert again.fingerprint == m.fingerprint  # sharding changes no tensor
    for k in params:
        np.testing.assert_array_equal(np.asarray(again.params[k]), np.asarray(params[k]))
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_model(m, out)
    save_model(m, out, overwrite=True)
    assert not (out / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob(".*tmp"))  # no temporary leftovers


def test_fingerprint_changes_with_weights(tiny):
    path, _ = tiny
    before = load_model(path).fingerprint

    def bump(t):
        t["model.layers.0.mlp.up_proj.weight"][0, 0] += 1.0

    _rewrite(path, bump)
    assert load_model(path).fingerprint != before


def test_truncated_safetensors(tmp_path):
    f = tmp_path / "x.safetensors"
    write_safetensors(f, {"a": np.arange(100, dtype=np.float32)})
    data = f.read_bytes()
    f.write_bytes(data[:-10])
    with pytest.raises(SafetensorsError, match="truncated"):
        read_safetensors(f)


def test_layer_info_llama():
    ad = adapter_for_config(CFG)
    layers = ad.layers()
    assert len(layers) == 14
    q, k, v, o, gate, up, down = layers[:7]
    assert (q.shape, k.shape, o.shape, down.shape) == ((16, 16), (8, 16), (16, 16), (16, 24))
    assert q.input_group == k.input_group == v.input_group == "model.layers.0.self_attn.q_proj"
    assert gate.input_group == up.input_group
    assert down.flops_per_token == 16 * 24 and down.numel == 384
    assert [x.role for x in layers[:7]] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert ad.layers(include_head=True)[-1].name == "lm_head"
    assert ad.layers(include_embeddings=True)[0].role == "embed"


# --------------------------------------------------------------------------- lazy loading


def _mmap_backed(arr: np.ndarray) -> bool:
    """True when ``arr`` is a view whose base chain ends in a memory map."""
    import mmap

    while arr is not None:
        if isinstance(arr, mmap.mmap):
            return True
        arr = getattr(arr, "base", None)
    return False


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lazy_and_eager_loads_are_identical(tiny, dtype):
    path, _ = tiny
    eager, lazy = load_model(path, dtype=dtype), load_model(path, dtype=dtype, lazy=True)
    assert lazy.fingerprint == eager.fingerprint
    assert sorted(lazy.params) == sorted(eager.params)
    for name, value in eager.params.items():
        got = lazy.params[name]
        assert isinstance(got, np.ndarray) and got.dtype == value.dtype, name
        np.testing.assert_array_equal(np.asarray(jax.numpy.asarray(got)), np.asarray(value))
        # Stored float32: float32 parameters are views of the file; bfloat16 ones are copies.
        assert _mmap_backed(got) == (dtype == "float32"), name
    from allocsearch.models.hf import model_num_bytes

    assert model_num_bytes(lazy) == model_num_bytes(eager)


def test_lazy_gpt2_transposes_are_views(tmp_path):
    cfg = {"model_type": "gpt2", "vocab_size": 20, "n_embd": 8, "n_layer": 1, "n_head": 2}
    adapter = adapter_for_config(cfg)
    path = save_model(HFModel(adapter, adapter.init_params(jax.random.key(1))), tmp_path / "g")
    eager, lazy = load_model(path), load_model(path, lazy=True)
    name = "transformer.h.0.attn.c_attn.weight"  # a Conv1D weight, stored (in, out)
    view = lazy.params[name]
    assert view.shape == (24, 8) and not view.flags.c_contiguous and _mmap_backed(view)
    for k, v in eager.params.items():
        np.testing.assert_array_equal(np.asarray(lazy.params[k]), np.asarray(v))


def test_lazy_nan_check_runs_at_first_access(tiny):
    path, _ = tiny

    def poison(t):
        t["model.layers.0.self_attn.k_proj.weight"][0, 0] = np.inf

    _rewrite(path, poison)
    model = load_model(path, lazy=True)  # headers only: the bad tensor is not read yet
    np.testing.assert_array_equal(model.params["model.norm.weight"], np.ones(16, np.float32))
    with pytest.raises(ModelLoadError, match=r"k_proj.weight' contains NaN or Inf"):
        model.params["model.layers.0.self_attn.k_proj.weight"]
    unchecked = load_model(path, lazy=True, check_finite=False)
    assert np.isinf(unchecked.params["model.layers.0.self_attn.k_proj.weight"][0, 0])


def test_lazy_params_pickle_reopens_the_files(tiny):
    import pickle

    path, params = tiny
    lazy = load_model(path, lazy=True).params
    blob = pickle.dumps(lazy)
    assert len(blob) < 2000  # the path, not the weights
    back = pickle.loads(blob)
    for k in params:
        np.testing.assert_array_equal(back[k], np.asarray(params[k]))


def _rss_anon() -> int:
    """Anonymous resident memory of this process in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    pytest.skip("no RssAnon in /proc/self/status")


def test_lazy_load_holds_no_copy_of_the_model(tmp_path):
    """A 120 MiB model: an eager load grows anonymous memory by about its size, a lazy
    load (reading every tensor through the mapping) by far less."""
    cfg = dict(CFG, hidden_size=1024, intermediate_size=4096, vocab_size=64)
    adapter = adapter_for_config(cfg)
    path = tmp_path / "big"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    shapes = adapter.param_shapes
    write_safetensors(
        path / "model.safetensors",
        {k: np.full(s, 0.01, np.float32) for k, s in shapes.items()},
    )
    size = sum(int(np.prod(s)) * 4 for s in shapes.values())
    assert size > 100 * 2**20
    before = _rss_anon()
    lazy = load_model(path, lazy=True)
    total = sum(float(v[0].sum()) for v in lazy.params.values())  # touches every tensor
    assert total > 0
    grown_lazy = _rss_anon() - before
    del lazy
    before = _rss_anon()
    eager = load_model(path)
    grown_eager = _rss_anon() - before
    assert grown_eager > 0.8 * size, (grown_eager, size)
    # (the fingerprint's sampled bytes and allocator slack, not the weights)
    assert grown_lazy < 0.3 * size, (grown_lazy, size)
    del eager
