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
    with pytest.raises(ModelLoadError, match="not a directory"):
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
