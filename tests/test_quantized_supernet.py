"""Quantized supernet build: levels by decreasing bits, fractions of the 16-bit cost, and
stored variants equal to the quantizer run on directly captured layer inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from test_supernet_build import BATCH, calib, direct_block_stats, model  # noqa: F401  (fixtures)
from tiny_workspace import TINY_LLAMA, cli_config, write_model_and_corpus
from typer.testing import CliRunner

from allocsearch.cli import app
from allocsearch.models.layers import LayerInfo
from allocsearch.quantizers import GPTQQuantizer, RTNQuantizer
from allocsearch.quantizers.costs import bits_per_weight
from allocsearch.quantizers.grid import QuantLevel
from allocsearch.supernet.quantized import build_quantized_supernet, quantized_grid
from allocsearch.supernet.store import SupernetStore

BITS = [2, 8, 4]
runner = CliRunner()


def _layers(hf_model) -> list[LayerInfo]:
    return list(hf_model.adapter.layers())


def test_grid_orders_levels_by_decreasing_bits():
    grid, levels = quantized_grid([(16, 24), (8, 16)], BITS, group_size=16, symmetric=False)
    assert [lv.bits for lv in levels] == [8, 4, 2]
    # (16, 24): two groups per row of 24 (one partial): 8 + 2 * (16 + 8) / 24 bits
    np.testing.assert_allclose(
        grid.sparsity[0], [1 - (b + 2 * (16 + b) / 24) / 16 for b in (8, 4, 2)]
    )
    np.testing.assert_allclose(grid.sparsity[1], [1 - (b + (16 + b) / 16) / 16 for b in (8, 4, 2)])
    assert grid.labels[1] == ("8b g16 asym", "4b g16 asym", "2b g16 asym")
    np.testing.assert_array_equal(grid.center, [1, 1])
    with pytest.raises(ValueError, match="distinct"):
        quantized_grid([(4, 4)], [4, 4], group_size=4, symmetric=True)
    with pytest.raises(ValueError, match="center_bits"):
        quantized_grid([(4, 4)], [4, 2], group_size=4, symmetric=True, center_bits=3)


@pytest.mark.parametrize("name", ["rtn", "gptq"])
def test_store_holds_the_quantizer_on_direct_inputs(model, calib, tmp_path, name):  # noqa: F811
    q = RTNQuantizer(group_size=8) if name == "rtn" else GPTQQuantizer(group_size=8, blocksize=8)
    store = build_quantized_supernet(
        model, calib, q, BITS, tmp_path / "s", batch_size=BATCH, center_bits=4
    )
    reopened = SupernetStore.open(tmp_path / "s")
    spec = reopened.spec
    stats = direct_block_stats(model, calib)
    for u, layer in enumerate(_layers(model)):
        assert spec.units[u].name == layer.name
        want_frac = [1 - bits_per_weight(QuantLevel(b, 8), layer.shape) / 16 for b in (8, 4, 2)]
        np.testing.assert_array_equal(spec.sparsity[u], want_frac)
        assert spec.center[u] == 1
        w = np.asarray(model.params[layer.weight_name], np.float32)
        want = q.quantize(w, stats[layer.block][layer.input_group], [8, 4, 2])
        got = np.asarray(reopened.variants(layer.weight_name).weights)
        np.testing.assert_array_equal(got, want.dense())
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["pruner"]["kind"] == "quantizer"
    assert [lv["bits"] for lv in manifest["pruner"]["levels"]] == [8, 4, 2]
    assert set(reopened.input_norms()) == {layer.name for layer in _layers(model)}
    assert store.path == reopened.path


def test_bad_quantizer_is_refused(model, calib, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="LocalQuantizer"):
        build_quantized_supernet(model, calib, object(), BITS, tmp_path / "s")
    assert not (tmp_path / "s").exists()


CLI_CFG = dict(TINY_LLAMA)


@pytest.mark.slow
def test_cli_build_quantizer_then_search(tmp_path):
    _, corpus = write_model_and_corpus(tmp_path, CLI_CFG, docs=2, words_per_doc=300)
    cfg = cli_config(tmp_path / "model", corpus, seq_len=32, calibration_seqs=8, heldout_seqs=2)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    store = tmp_path / "store"
    args = ["build", "--config", str(tmp_path / "c.yaml"), "--out", str(store)]
    r = runner.invoke(app, [*args, "--quantizer", "gptq", "--bits", "2,4", "--group-size", "16"])
    assert r.exit_code == 0, r.output
    spec = SupernetStore.open(store).spec
    assert spec.level_labels[0] == ("4b g16 sym", "2b g16 sym")
    # uniform 4 bits (level 0) costs 1 - (4 + 1) / 16 of the 16-bit model: the search
    # at exactly that target must pick level 0 everywhere
    target = 1 - 5 / 16
    r = runner.invoke(
        app,
        ["search", "--config", str(tmp_path / "c.yaml"), "--supernet", str(store), "--out",
         str(tmp_path / "run"), "--strategy", "uniform", "--target", str(target),
         "--backend", "local", "--no-progress"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    recipe = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert recipe["schema_version"] == 2 and recipe["budget"]["kind"] == "bits"
    assert recipe["provenance"]["settings"]["level_kind"] == "bits"
    got = {(x["sparsity"], x["bits"], x["group_size"], x["symmetric"]) for x in recipe["layers"]}
    assert got == {(0.0, 4, 16, True)}  # quantized, not pruned
    # --budget bits --target 5: 4 bits + one 16-bit scale per 16 weights = 5 bits
    r = runner.invoke(
        app,
        ["search", "--config", str(tmp_path / "c.yaml"), "--supernet", str(store), "--out",
         str(tmp_path / "run5"), "--strategy", "uniform", "--budget", "bits", "--target", "5",
         "--backend", "local", "--no-progress"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    recipe5 = json.loads((tmp_path / "run5" / "recipe.json").read_text())
    assert recipe5["layers"] == recipe["layers"] and recipe5["budget"]["target"] == target
    _check_quant_exports_and_apply(tmp_path, store, len(recipe["layers"]))


def _check_quant_exports_and_apply(tmp_path, store, n_layers):
    """A bitwidth recipe exports to llm-compressor and EvoPress (other formats refuse it)
    and applies as dequantized weights equal to the store's, which transformers loads."""
    rec = str(tmp_path / "run" / "recipe.json")
    r = runner.invoke(app, ["export", rec, "--format", "owl", "--out", str(tmp_path / "o.json")])
    assert r.exit_code == 2 and "allocates bitwidths" in r.output, r.output
    assert not (tmp_path / "o.json").exists()
    for fmt, name in (("llm-compressor", "q.yaml"), ("evopress", "q.txt")):
        r = runner.invoke(app, ["export", rec, "--format", fmt, "--out", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
    doc = yaml.safe_load((tmp_path / "q.yaml").read_text())
    groups = doc["quant_stage"]["quant_modifiers"]["GPTQModifier"]["config_groups"]
    assert list(groups) == ["w4g16_sym"] and len(groups["w4g16_sym"]["targets"]) == n_layers
    assert groups["w4g16_sym"]["weights"] == {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 16
    }  # fmt: skip
    lines = (tmp_path / "q.txt").read_text().splitlines()
    assert len(lines) == n_layers and all(x.endswith(": 4") for x in lines)
    assert lines[0].startswith("model.layers.0.")
    r = runner.invoke(
        app,
        ["apply", rec, "--model", str(tmp_path / "model"), "--supernet", str(store), "--out",
         str(tmp_path / "q"), "--no-timing", "--no-progress"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "dequantized weights" in r.output and "5.0000 bits per weight" in r.output
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    opened = SupernetStore.open(store)
    for unit in opened.spec.units:
        name = unit.layers[0]
        want = np.asarray(opened.variants(f"{name}.weight").weights[0])
        got = hf.get_submodule(name).weight.detach().numpy()
        np.testing.assert_array_equal(got, want)
        assert len(np.unique(got[0, :16])) <= 16  # 4-bit codes: <= 16 values per group
    # without the store: round to nearest of the dense weights, and the output says so
    r = runner.invoke(
        app,
        ["apply", rec, "--model", str(tmp_path / "model"), "--out", str(tmp_path / "rtn"),
         "--no-timing", "--no-progress"],
    )  # fmt: skip
    assert r.exit_code == 0 and "weights from: rtn" in r.output, r.output
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    rtn = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "rtn")
    name = opened.spec.units[0].layers[0]
    w = dense.get_submodule(name).weight.detach().numpy()
    want = RTNQuantizer(group_size=16).quantize(w, None, [4]).weights(0)
    np.testing.assert_array_equal(rtn.get_submodule(name).weight.detach().numpy(), want)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--quantizer", "awq"], "awq"),
        (["--quantizer", "rtn", "--bits", "2,x"], "2,x"),
        (["--quantizer", "rtn", "--bits", "9"], "9"),
        (["--quantizer", "rtn", "--group-size", "0"], "group_size"),
    ],
)
def test_cli_build_quantizer_refuses_bad_options(tmp_path, extra, message):
    r = runner.invoke(app, ["build", "--out", str(tmp_path / "s"), *extra])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--quantizer", "gptq", "--target", "1.5"], "average bits per weight"),
        (["demo", "--quantizer", "gptq", "--target", "3", "--bits", "2,x"], "2,x"),
        (["demo", "--quantizer", "gptq", "--target", "3", "--strategies", "tyr"], "tyr"),
        (["sweep", "--budget", "bits", "--targets", "3,4"], "--budget bits needs --supernet"),
        (["sweep", "--budget", "bits", "--targets", "3,17", "--supernet", "s"], "17 is not in"),
    ],
)
def test_cli_bits_options_refuse_bad_values_before_work(tmp_path, args, message):
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split())
    assert not (tmp_path / "o").exists()
