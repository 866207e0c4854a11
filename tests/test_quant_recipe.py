"""Bitwidth recipes (schema v2): per-layer bits, budgets by hand, v1 files still read, and
the llm-compressor / EvoPress quantization exports."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from test_recipe import model_identity, model_layers, provenance, unstructured_recipe

from allocsearch.recipe.export_quant import to_evopress_quant, to_llm_compressor_quant
from allocsearch.recipe.exporters import ExportError
from allocsearch.recipe.recipe import (
    SCHEMA_VERSION,
    LayerEntry,
    Recipe,
    RecipeBudget,
    RecipeError,
    fraction_removed,
    refuse_bit_recipe,
)

BITS = ((2, 3, 4, 8, 2, 3, 4), (4, 4, 3, 3, 2, 2, 8))
# group 8, symmetric: an (8, 8) layer keeps 64 b + 16 x 8 scale bits, (16, 8) and (8, 16)
# keep 128 b + 256: block 0 = 256 + 320 + 384 + 640 + 512 + 640 + 768 = 3520, block 1 =
# 384 + 384 + 320 + 320 + 512 + 512 + 1280 = 3712; 7232 of the 16 x 1280 = 20480 bits.
KEPT_BITS = 7232
ACHIEVED = 1 - KEPT_BITS / 20480
V1_FILE = Path(__file__).parent / "data" / "recipe_v1.json"


def bits_recipe(bits=BITS, group_size=8, symmetric=True) -> Recipe:
    flat = [b for blk in bits for b in blk]
    layers = tuple(
        LayerEntry(i.name, i.role, i.block, i.shape, 0.0, bits=b, group_size=group_size,
                   symmetric=symmetric)
        for i, b in zip(model_layers(), flat, strict=True)
    )  # fmt: skip
    achieved = fraction_removed(layers, "bits")
    return Recipe(
        model=model_identity(),
        layers=layers,
        budget=RecipeBudget(kind="bits", target=achieved, achieved=achieved),
        provenance=provenance(settings={"level_kind": "bits"}),
    )


def test_bits_budget_by_hand_and_round_trip(tmp_path):
    r = bits_recipe()
    assert r.budget.achieved == pytest.approx(ACHIEVED, abs=1e-15)
    assert sum(x.kept_bits() for x in r.layers) == KEPT_BITS
    assert 16 * (1 - fraction_removed(r.layers, "bytes")) == pytest.approx(KEPT_BITS / 1280)
    assert r.schema_version == SCHEMA_VERSION == 2 and r.quantized
    d = json.loads(r.to_json())
    assert d["layers"][0] == {
        "name": "model.layers.0.self_attn.q_proj", "role": "q", "block": 0, "shape": [8, 8],
        "sparsity": 0.0, "structure": "unstructured", "bits": 2, "group_size": 8,
        "symmetric": True,
    }  # fmt: skip
    r.save(tmp_path / "r.json")
    assert Recipe.load(tmp_path / "r.json") == r
    refuse_bit_recipe(r, "export")  # a v2 recipe with bits is not the old stand-in
    # a wrong achieved budget is caught from the bits
    bad = dict(d, budget=dict(d["budget"], achieved=0.5))
    with pytest.raises(RecipeError, match="budget.achieved = 0.5 does not match"):
        Recipe.from_dict(bad)


def test_a_schema_v1_file_still_reads_and_round_trips():
    text = V1_FILE.read_text()
    r = Recipe.load(V1_FILE)
    assert r.schema_version == 1 and not r.quantized
    assert r == unstructured_recipe(schema_version=1)
    assert r.to_json() == text
    # v1 cannot carry bits
    d = json.loads(text)
    d["layers"][0].update(bits=4, group_size=8, symmetric=True)
    with pytest.raises(RecipeError, match="need schema_version 2, this recipe says 1"):
        Recipe.from_dict(d)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"bits": 4}, "bits, group_size and symmetric go together"),
        ({"bits": 9, "group_size": 8, "symmetric": True}, r"bits = 9 is outside the valid"),
        ({"bits": 4, "group_size": 0, "symmetric": True}, r"group_size = 0 is outside"),
        ({"bits": 4, "group_size": 8, "symmetric": "yes"}, "symmetric must be true or false"),
    ],
)
def test_bad_quantization_fields_are_named(kw, message):
    with pytest.raises(RecipeError, match=message):
        LayerEntry("model.layers.0.mlp.up_proj", "up", 0, (16, 8), 0.0, **kw)


def test_the_old_stand_in_recipe_is_still_refused():
    r = unstructured_recipe(provenance=provenance(settings={"level_kind": "bits"}))
    with pytest.raises(RecipeError, match="no per-layer bits"):
        refuse_bit_recipe(r, "apply")


def test_llm_compressor_export_groups_layers_by_bitwidth():
    exp = to_llm_compressor_quant(bits_recipe(), modifier_args={"dampening_frac": 0.01})
    doc = yaml.safe_load(exp.content)
    gptq = doc["quant_stage"]["quant_modifiers"]["GPTQModifier"]
    assert gptq["dampening_frac"] == 0.01 and gptq["ignore"] == ["re:.*lm_head"]
    groups = gptq["config_groups"]
    assert list(groups) == ["w2g8_sym", "w3g8_sym", "w4g8_sym", "w8g8_sym"]
    names = {k: [t.removeprefix("re:").replace("\\", "") for t in g["targets"]]
             for k, g in groups.items()}  # fmt: skip
    assert names["w2g8_sym"] == [
        "model.layers.0.self_attn.q_proj$", "model.layers.0.mlp.gate_proj$",
        "model.layers.1.mlp.gate_proj$", "model.layers.1.mlp.up_proj$",
    ]  # fmt: skip
    assert names["w8g8_sym"] == [
        "model.layers.0.self_attn.o_proj$",
        "model.layers.1.mlp.down_proj$",
    ]
    assert groups["w3g8_sym"]["weights"] == {
        "num_bits": 3, "type": "int", "symmetric": True, "strategy": "group", "group_size": 8
    }  # fmt: skip
    assert sum(len(g["targets"]) for g in groups.values()) == 14
    assert exp.budget_kind == "bits" and exp.budget_exported == pytest.approx(ACHIEVED)
    assert "5.6500 bits per weight" in exp.content  # 7232 / 1280
    with pytest.raises(ExportError, match="may not set"):
        to_llm_compressor_quant(bits_recipe(), modifier_args={"config_groups": {}})
    with pytest.raises(ExportError, match="no per-layer bits"):
        to_llm_compressor_quant(unstructured_recipe())


def test_llm_compressor_export_leaves_16_bit_layers_out_and_splits_asymmetric():
    r = bits_recipe(symmetric=False)
    layers = list(r.layers)
    layers[3] = dataclasses.replace(layers[3], bits=None, group_size=None, symmetric=None)
    achieved = fraction_removed(layers, "bits")
    r = dataclasses.replace(
        r, layers=tuple(layers), budget=RecipeBudget("bits", achieved, achieved)
    )
    exp = to_llm_compressor_quant(r)
    groups = yaml.safe_load(exp.content)["quant_stage"]["quant_modifiers"]["GPTQModifier"][
        "config_groups"
    ]
    assert "w8g8_asym" in groups and len(groups["w8g8_asym"]["targets"]) == 1
    assert groups["w8g8_asym"]["weights"]["symmetric"] is False
    assert any("1 layer(s) stay 16-bit" in n for n in exp.notes)
    with pytest.raises(ExportError, match="1 layer\\(s\\) are 16-bit"):
        to_evopress_quant(r)


def test_evopress_configuration_text():
    exp = to_evopress_quant(bits_recipe())
    lines = exp.content.splitlines()
    assert lines[:3] == [
        "model.layers.0.self_attn.q_proj: 2",
        "model.layers.0.self_attn.k_proj: 3",
        "model.layers.0.self_attn.v_proj: 4",
    ]
    assert lines[-1] == "model.layers.1.mlp.down_proj: 8" and len(lines) == 14
    mixed = bits_recipe()
    layers = list(mixed.layers)
    layers[0] = dataclasses.replace(layers[0], group_size=4)
    achieved = fraction_removed(layers, "bits")
    mixed = dataclasses.replace(
        mixed, layers=tuple(layers), budget=RecipeBudget("bits", achieved, achieved)
    )
    with pytest.raises(ExportError, match="2 group sizes"):
        to_evopress_quant(mixed)
