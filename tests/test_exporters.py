"""Exporters on small hand-built recipes (the tiny two-block Llama of test_recipe.py).

Unstructured recipe, weights per layer: q/k/v/o 64, gate/up/down 128.
  block 0: 0.5 0.25 0.75 0.5 | 0.5 0.625 0.375 -> 320/640 = 0.5
  block 1: 0.25 0.25 0.5 0.5 | 0.75 0.75 0.5  -> 352/640 = 0.55
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml
from test_recipe import (
    UNSTRUCTURED,
    model_layers,
    nm_recipe,
    structured_recipe,
    unstructured_recipe,
)

from allocsearch.recipe import (
    ExportError,
    LayerEntry,
    Recipe,
    RecipeBudget,
    block_sparsities,
    fraction_removed,
    jaxpruner_key,
    to_evopress,
    to_jaxpruner,
    to_llm_compressor,
    to_owl,
    to_torch_pruning,
    write_export,
)
from allocsearch.supernet.spec import SupernetSpec, Unit


def _llmc_matches(target: str, names: list[str]) -> list[str]:
    """Module names a llm-compressor target selects (``re:`` targets use re.match)."""
    assert target.startswith("re:")
    return [n for n in names if re.match(target[3:], n)]


def _all_module_names(recipe: Recipe) -> list[str]:
    """Linear layers plus their parent modules (what named_modules() would also yield)."""
    names = {"model", "model.layers", "lm_head", "model.norm", "model.embed_tokens"}
    for x in recipe.layers:
        parts = x.name.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(names)


# ----------------------------------------------------------------------------- llm-compressor


@pytest.mark.parametrize("modifier", ["SparseGPTModifier", "WandaPruningModifier"])
def test_llmc_per_layer(modifier):
    r = unstructured_recipe()
    out = to_llm_compressor(r, modifier=modifier, granularity="layer")
    doc = yaml.safe_load(out.content)
    assert list(doc) == ["sparsity_stage"]
    assert list(doc["sparsity_stage"]) == ["run_type", "sparsity_modifiers"]
    mods = doc["sparsity_stage"]["sparsity_modifiers"]
    assert list(mods) == [modifier]
    args = mods[modifier]
    assert args["mask_structure"] == "0:0"
    assert args["ignore"] == ["re:.*lm_head"]
    assert args["sparsity"] == [s for blk in UNSTRUCTURED for s in blk]
    names = _all_module_names(r)
    matched = [_llmc_matches(t, names) for t in args["targets"]]
    # exactly one module per target, in recipe order: one sparsity per matched module
    assert matched == [[x.name] for x in r.layers]
    assert sum(len(m) for m in matched) == len(args["sparsity"]) == 14
    assert not _llmc_matches(args["ignore"][0], [x.name for x in r.layers])
    assert _llmc_matches(args["ignore"][0], ["lm_head"]) == ["lm_head"]
    assert out.budget_kind == "params"
    assert out.budget_exported == pytest.approx(0.525, abs=1e-15)
    assert out.budget_error == pytest.approx(0.0, abs=1e-15)


def test_llmc_per_layer_leaves_dense_layers_out():
    s = [s for blk in UNSTRUCTURED for s in blk]
    s[1] = 0.0  # block 0 k_proj dense: 0.525 - 64 * 0.25 / 1280
    layers = tuple(
        LayerEntry(name=i.name, role=i.role, block=i.block, shape=i.shape, sparsity=v)
        for i, v in zip(model_layers(), s, strict=True)
    )
    r = unstructured_recipe(
        layers=layers, budget=RecipeBudget(kind="params", target=0.5, achieved=0.5125)
    )
    out = to_llm_compressor(r)
    args = yaml.safe_load(out.content)["sparsity_stage"]["sparsity_modifiers"]["SparseGPTModifier"]
    assert len(args["targets"]) == len(args["sparsity"]) == 13
    assert "model.layers.0.self_attn.k_proj" not in "".join(args["targets"]).replace("\\", "")
    assert any("1 dense layer(s)" in n for n in out.notes)
    assert out.budget_exported == pytest.approx(0.5125, abs=1e-15)


def test_llmc_per_block():
    r = unstructured_recipe()
    out = to_llm_compressor(r, granularity="block")
    args = yaml.safe_load(out.content)["sparsity_stage"]["sparsity_modifiers"]["SparseGPTModifier"]
    assert args["targets"] == [r"re:model.layers.\d+$"]
    assert args["sparsity"] == pytest.approx([0.5, 0.55], abs=1e-15)
    names = _all_module_names(r)
    assert _llmc_matches(args["targets"][0], names) == ["model.layers.0", "model.layers.1"]
    assert len(args["sparsity"]) == 2
    # weight-weighted means keep the number of removed weights: budget unchanged
    assert out.budget_exported == pytest.approx(0.525, abs=1e-15)
    spread = [n for n in out.notes if n.startswith("averaged 14 per-layer")]
    # largest change: block 1 q_proj 0.25 -> 0.55 (k_proj ties; the first is named)
    assert spread and "0.3000 (model.layers.1.self_attn.q_proj)" in spread[0]


def test_block_means_weighted_not_plain():
    r = unstructured_recipe()
    got = block_sparsities(r)
    plain = [np.mean(UNSTRUCTURED[0]), np.mean(UNSTRUCTURED[1])]  # 0.5 and 0.5
    assert got == pytest.approx([320 / 640, 352 / 640], abs=1e-15)
    assert plain[1] != pytest.approx(got[1])


def test_llmc_nm():
    out = to_llm_compressor(nm_recipe(), modifier="WandaPruningModifier")
    args = yaml.safe_load(out.content)["sparsity_stage"]["sparsity_modifiers"][
        "WandaPruningModifier"
    ]
    assert args["mask_structure"] == "2:4"
    assert args["sparsity"] == [0.5] * 14
    blk = to_llm_compressor(nm_recipe(), granularity="block")
    args = yaml.safe_load(blk.content)["sparsity_stage"]["sparsity_modifiers"]["SparseGPTModifier"]
    assert args["mask_structure"] == "2:4" and args["sparsity"] == [0.5, 0.5]
    assert blk.budget_exported == pytest.approx(0.5)


def test_llmc_mixed_nm_patterns_one_group_per_pattern():
    pats = [(2, 4), (4, 8), (0, 4), (2, 4), (2, 4), (4, 8), (2, 4)] * 2
    r = nm_recipe(pats)
    out = to_llm_compressor(r)
    stage = yaml.safe_load(out.content)["sparsity_stage"]
    assert sorted(k for k in stage if k.endswith("_modifiers")) == [
        "sparsity_2of4_modifiers",
        "sparsity_4of8_modifiers",
    ]
    g24 = stage["sparsity_2of4_modifiers"]["SparseGPTModifier"]
    g48 = stage["sparsity_4of8_modifiers"]["SparseGPTModifier"]
    assert g24["mask_structure"] == "2:4" and g48["mask_structure"] == "4:8"
    assert len(g24["targets"]) == len(g24["sparsity"]) == 8
    assert len(g48["targets"]) == len(g48["sparsity"]) == 4
    assert any("one modifier group per pattern" in n for n in out.notes)
    with pytest.raises(ExportError, match="needs one pattern"):
        to_llm_compressor(r, granularity="block")


def test_llmc_refusals():
    with pytest.raises(ExportError, match="use --format torch-pruning"):
        to_llm_compressor(structured_recipe())
    with pytest.raises(ExportError, match="modifier 'OBCModifier' is not one of"):
        to_llm_compressor(unstructured_recipe(), modifier="OBCModifier")
    with pytest.raises(ExportError, match="granularity 'row'"):
        to_llm_compressor(unstructured_recipe(), granularity="row")
    with pytest.raises(ExportError, match=r"may not set \['targets'\]"):
        to_llm_compressor(unstructured_recipe(), modifier_args={"targets": ["Linear"]})
    extra = to_llm_compressor(unstructured_recipe(), modifier_args={"dampening_frac": 0.01})
    args = yaml.safe_load(extra.content)["sparsity_stage"]["sparsity_modifiers"]
    assert args["SparseGPTModifier"]["dampening_frac"] == 0.01


def test_per_block_needs_contiguous_blocks():
    r = unstructured_recipe()
    only_block_1 = tuple(x for x in r.layers if x.block == 1)
    r1 = unstructured_recipe(
        layers=only_block_1,
        budget=RecipeBudget("params", 0.5, fraction_removed(only_block_1, "params")),
    )
    with pytest.raises(ExportError, match=r"no layers in blocks \[0\]"):
        to_owl(r1)


# ----------------------------------------------------------------------------- EvoPress

GRID = (0.25, 0.375, 0.5, 0.625, 0.75)


def _unit_spec(recipe: Recipe, grid=GRID, center=2) -> SupernetSpec:
    units = tuple(
        Unit(x.name, x.role, x.block, (x.name,), x.numel, x.flops_per_token) for x in recipe.layers
    )
    n = len(units)
    return SupernetSpec(
        units=units,
        sparsity=np.tile(np.array(grid, dtype=np.float64), (n, 1)),
        valid=np.ones((n, len(grid)), dtype=bool),
        center=np.full(n, center, dtype=np.int32),
    )


def test_evopress_lines():
    r = unstructured_recipe()
    spec = _unit_spec(r)
    choice = np.array([GRID.index(x.sparsity) for x in r.layers], dtype=np.int32)
    out = to_evopress(r, spec, choice)
    expected_levels = [0, -2, 2, 0, 0, 1, -1, -2, -2, 0, 0, 2, 2, 0]
    assert out.content == "".join(
        f"{x.name}: {lv}\n" for x, lv in zip(r.layers, expected_levels, strict=True)
    )
    assert out.content.splitlines()[2] == "model.layers.0.self_attn.v_proj: 2"
    # EvoPress's reader: layer_name, level = line.split(":"); int(level)
    parsed = {k.strip(): int(v) for k, v in (ln.split(":") for ln in out.content.splitlines())}
    assert list(parsed.values()) == expected_levels
    assert out.budget_exported == pytest.approx(0.525, abs=1e-15)
    assert any("from -2 to 2" in n for n in out.notes)


def test_evopress_refuses_structured_recipes():
    """Issue 16.5: EvoPress has no head/neuron pruning, so lines such as
    ``model.layers.0.self_attn: -1`` would be unloadable there: refused, naming the format
    that can carry the recipe."""
    r = structured_recipe()
    units = [
        Unit(u.name, "attn" if u.kind == "heads" else "mlp", u.block, u.layers, 1, 1)
        for u in r.units
    ]
    spec = SupernetSpec(
        tuple(units),
        np.tile([0.0, 0.5], (len(units), 1)),
        np.ones((len(units), 2), bool),
        np.zeros(len(units), np.int32),
        structure="heads_neurons",
    )
    with pytest.raises(ExportError, match="EvoPress has no head/neuron pruning.*torch-pruning"):
        to_evopress(r, spec, np.zeros(len(units), np.int32))


def test_evopress_rejects_inconsistent_inputs():
    r = unstructured_recipe()
    spec = _unit_spec(r)
    good = np.array([GRID.index(x.sparsity) for x in r.layers])
    wrong = good.copy()
    wrong[3] += 1
    with pytest.raises(
        ExportError, match=r"o_proj': level 3 of the supernet has sparsity 0.625 but"
    ):
        to_evopress(r, spec, wrong)
    out_of_range = good.copy()
    out_of_range[0] = 5
    with pytest.raises(ExportError, match=r"choice\[0\] = 5 .* valid levels are 0..4"):
        to_evopress(r, spec, out_of_range)
    with pytest.raises(ExportError, match=r"choice must be int\[14\]"):
        to_evopress(r, spec, good.astype(float))
    with pytest.raises(ExportError, match="supernet structure 'unstructured' != recipe structure"):
        to_evopress(nm_recipe(), spec, good)


# ----------------------------------------------------------------------------- OWL


def test_owl_list():
    out = to_owl(unstructured_recipe())
    assert out.content == pytest.approx([0.5, 0.55], abs=1e-15)
    assert isinstance(out.content, list) and all(type(v) is float for v in out.content)
    assert out.budget_exported == pytest.approx(0.525, abs=1e-15)
    with pytest.raises(ExportError, match="OWL-style per-block list holds unstructured"):
        to_owl(nm_recipe())


def test_latency_recipe_is_checked_on_params():
    r = unstructured_recipe(budget=RecipeBudget(kind="latency", target=0.4, achieved=0.42))
    out = to_owl(r)
    assert out.budget_kind == "params"
    assert out.budget_recipe == pytest.approx(0.525, abs=1e-15)
    assert any("latency, which cannot be recomputed" in n for n in out.notes)


# ----------------------------------------------------------------------------- Torch-Pruning


def test_torch_pruning_ratios():
    out = to_torch_pruning(structured_recipe())
    assert out.content == {
        "pruning_ratio_dict": {  # the input projections: the hidden size stays
            "model.layers.0.self_attn.q_proj": 0.5,
            "model.layers.0.mlp.gate_proj": 0.25,
            "model.layers.1.self_attn.q_proj": 0.0,
            "model.layers.1.mlp.gate_proj": 0.5,
        },
        "head_pruning_ratio_dict": {
            "model.layers.0.self_attn": 0.5,
            "model.layers.1.self_attn": 0.0,
        },
    }
    assert out.budget_exported == pytest.approx(416 / 1280, abs=1e-15)
    assert out.budget_error == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ExportError, match="only a structured .* recipe has"):
        to_torch_pruning(unstructured_recipe())


def test_torch_pruning_reports_budget_change_under_gqa():
    # k/v of block 0 keep all rows (their kv head serves a kept query head): the recipe
    # removes 416 - 2 * 64 * 0.5 = 352 weights, the channel ratio would remove 416.
    r = structured_recipe(kv_sparsity=0.0)
    assert r.budget.achieved == pytest.approx(352 / 1280, abs=1e-15)
    out = to_torch_pruning(r)
    assert out.budget_exported == pytest.approx(416 / 1280, abs=1e-15)
    assert out.budget_error == pytest.approx(64 / 1280, abs=1e-15)
    note = [n for n in out.notes if n.startswith("budget check")][0]
    assert "0.325000 of the params instead of the recipe's 0.275000 (difference +0.050000" in note
    assert any("2 member layer(s) lose fewer weights" in n for n in out.notes)


# ----------------------------------------------------------------------------- jaxpruner


def test_jaxpruner_keys():
    r = unstructured_recipe()
    out = to_jaxpruner(r)
    assert len(out.content) == 14
    assert out.content[("model", "layers", "0", "self_attn", "v_proj", "kernel")] == 0.75
    assert out.content[("model", "layers", "1", "mlp", "down_proj", "kernel")] == 0.5
    assert list(out.content.values()) == [s for blk in UNSTRUCTURED for s in blk]
    assert out.budget_error == 0.0
    nnx = to_jaxpruner(r, kernel_leaf="w", int_indices=True)
    assert ("model", "layers", 1, "mlp", "up_proj", "w") in nnx.content
    assert jaxpruner_key("transformer.h.11.attn.c_attn") == (
        "transformer",
        "h",
        "11",
        "attn",
        "c_attn",
        "kernel",
    )


def test_jaxpruner_keys_match_flax_flatten_dict():
    from flax import traverse_util

    r = unstructured_recipe()
    tree: dict = {}
    for x in r.layers:  # Flax kernels are (in, out)
        node = tree
        for p in x.name.split("."):
            node = node.setdefault(p, {})
        node["kernel"] = np.zeros(x.shape[::-1], dtype=np.float32)
        node["bias"] = np.zeros(x.shape[0], dtype=np.float32)
    kernels = {k for k in traverse_util.flatten_dict(tree) if k[-1] == "kernel"}
    assert set(to_jaxpruner(r).content) == kernels


def test_jaxpruner_nm_conversion_notes():
    out = to_jaxpruner(nm_recipe())
    assert set(out.content.values()) == {0.5}
    text = " ".join(out.notes)
    assert "cannot be expressed exactly" in text
    assert "NByM(n=2, m=4)" in text and "axis=0" in text
    out = to_jaxpruner(nm_recipe([(1, 4)] * 14))
    assert "NByM(n=3, m=4)" in " ".join(out.notes)  # 1 zero of 4 = 3 kept of 4
    out = to_jaxpruner(structured_recipe())
    assert any("row / column structure of the recipe is lost" in n for n in out.notes)


# ----------------------------------------------------------------------------- files


def test_write_export(tmp_path):
    text = to_llm_compressor(unstructured_recipe()).content
    path = write_export(text, tmp_path / "recipe.yaml")
    assert path.read_text() == text
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_export("x", path)
    write_export("x\n", path, overwrite=True)
    assert path.read_text() == "x\n"
    with pytest.raises(ExportError, match="serialise dict content"):
        write_export(to_torch_pruning(structured_recipe()).content, tmp_path / "tp.json")
    blob = json.dumps(to_torch_pruning(structured_recipe()).content)
    write_export(blob, tmp_path / "tp.json")
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["recipe.yaml", "tp.json"]


def _attention_recipe(
    names: dict[str, tuple[str, tuple[int, int]]],
    unit: str,
    removed: int,
    total: int,
    sparsity: dict[str, float],
    kind: str = "heads",
) -> Recipe:
    """One structured unit ``unit`` whose member layers are ``names`` (name -> (role,
    shape)), each removing ``sparsity[role]`` of its weights."""
    from test_recipe import model_identity, provenance

    from allocsearch.recipe import StructuredUnit

    layers = tuple(
        LayerEntry(name=n, role=r, block=0, shape=s, sparsity=sparsity[r], structure=kind)
        for n, (r, s) in names.items()
    )
    achieved = fraction_removed(layers, "params")
    return Recipe(
        model=model_identity(),
        layers=layers,
        budget=RecipeBudget(kind="params", target=achieved, achieved=achieved),
        provenance=provenance(strategy="dp"),
        structure=kind,
        units=(StructuredUnit(unit, kind, 0, removed, total, tuple(names)),),
    )


# 4 query heads, 2 k/v heads, head_dim 2, hidden 8: q/o 64 weights, k/v 32; 192 in all.
GQA = {
    "model.layers.0.self_attn.q_proj": ("q", (8, 8)),
    "model.layers.0.self_attn.k_proj": ("k", (4, 8)),
    "model.layers.0.self_attn.v_proj": ("v", (4, 8)),
    "model.layers.0.self_attn.o_proj": ("o", (8, 8)),
}


@pytest.mark.parametrize(
    "removed, total, q, kv, tp_fraction, reproduced",
    [
        # query heads, one of each group's two: Torch-Pruning removes exactly that
        (2, 4, 0.5, 0.0, 64 / 192, True),
        # one query head: Torch-Pruning removes ceil(0.25 * 2) = 1 from EACH group
        (1, 4, 0.25, 0.0, 64 / 192, False),
        # a whole kv group (kv-group granularity): Torch-Pruning keeps its k/v rows
        (1, 2, 0.5, 0.5, 64 / 192, False),
    ],
)
def test_torch_pruning_under_gqa_keeps_kv_and_removes_evenly(
    removed, total, q, kv, tp_fraction, reproduced
):
    r = _attention_recipe(
        GQA, "model.layers.0.self_attn", removed, total, {"q": q, "o": q, "k": kv, "v": kv}
    )
    out = to_torch_pruning(r)
    assert out.content == {
        "pruning_ratio_dict": {"model.layers.0.self_attn.q_proj": removed / total},
        "head_pruning_ratio_dict": {"model.layers.0.self_attn": removed / total},
    }
    assert out.budget_exported == pytest.approx(tp_fraction, abs=1e-15)  # q, o: 32 each
    assert r.budget.achieved == pytest.approx((64 * 2 * q + 32 * 2 * kv) / 192, abs=1e-15)
    [note] = [n for n in out.notes if n.startswith("grouped-query attention")]
    assert "keeps every k/v head" in note
    if reproduced:
        assert "the counts match" in note and out.budget_error == pytest.approx(0, abs=1e-15)
    else:
        assert "cannot reproduce 1 attention unit(s): model.layers.0.self_attn" in note
        assert "Torch-Pruning: 1 of 2 per kv group = 0.5, k/v 0" in note


def test_torch_pruning_keys_of_a_bert_recipe_are_bert_modules():
    """BERT's MLP unit is named <block>.mlp, which is no module; Torch-Pruning's keys
    must be modules of transformers' BertModel (intermediate.dense, attention)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=8,
    )  # fmt: skip
    modules = dict(transformers.BertModel(config).named_modules())
    p = "encoder.layer.0."
    mlp = {p + "intermediate.dense": ("fc_in", (16, 8)), p + "output.dense": ("fc_out", (8, 16))}
    sparsity = {"fc_in": 0.25, "fc_out": 0.25}
    out = to_torch_pruning(_attention_recipe(mlp, p + "mlp", 4, 16, sparsity, "neurons"))
    assert out.content["pruning_ratio_dict"] == {p + "intermediate.dense": 0.25}
    attn = {
        p + "attention.self." + n: (r, (8, 8))
        for n, r in (("query", "q"), ("key", "k"), ("value", "v"))
    } | {p + "attention.output.dense": ("o", (8, 8))}
    out = to_torch_pruning(
        _attention_recipe(attn, p + "attention", 1, 2, dict.fromkeys("qkvo", 0.5))
    )
    keys = [*out.content["pruning_ratio_dict"], *out.content["head_pruning_ratio_dict"]]
    assert keys == [p + "attention.self.query", p + "attention"]
    assert not any(n.startswith("grouped-query") for n in out.notes)  # MHA: heads with k/v
    for key in keys:
        assert key in modules, key
