"""Recipe schema v1: round trips, atomic files, validation errors, model checks.

The hand-built model is two Llama blocks with hidden 8, intermediate 16, 2 heads of
size 4: q/k/v/o are 8x8 (64 weights), gate/up 16x8 and down 8x16 (128 weights); a block
holds 640 weights.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allocsearch.models.layers import LayerInfo
from allocsearch.recipe import (
    Calibration,
    Fitness,
    LayerEntry,
    ModelIdentity,
    Provenance,
    Recipe,
    RecipeBudget,
    RecipeError,
    StructuredUnit,
    check_against_model,
    fraction_removed,
)

HIDDEN, INTER = 8, 16
LAYOUT = (  # (attribute path, role, (out, in))
    ("self_attn.q_proj", "q", (HIDDEN, HIDDEN)),
    ("self_attn.k_proj", "k", (HIDDEN, HIDDEN)),
    ("self_attn.v_proj", "v", (HIDDEN, HIDDEN)),
    ("self_attn.o_proj", "o", (HIDDEN, HIDDEN)),
    ("mlp.gate_proj", "gate", (INTER, HIDDEN)),
    ("mlp.up_proj", "up", (INTER, HIDDEN)),
    ("mlp.down_proj", "down", (HIDDEN, INTER)),
)
# Block 0 removes 320/640 = 0.5, block 1 removes 352/640 = 0.55, total 672/1280 = 0.525.
UNSTRUCTURED = ((0.5, 0.25, 0.75, 0.5, 0.5, 0.625, 0.375), (0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 0.5))
UNSTRUCTURED_ACHIEVED = 0.525


def model_layers(n_blocks: int = 2) -> list[LayerInfo]:
    """The tiny model's LayerInfos in forward order."""
    out = []
    for b in range(n_blocks):
        for path, role, shape in LAYOUT:
            group = "attn_in" if role in ("q", "k", "v") else path
            group = "mlp_in" if role in ("gate", "up") else group
            out.append(
                LayerInfo(
                    name=f"model.layers.{b}.{path}",
                    role=role,
                    block=b,
                    shape=shape,
                    flops_per_token=shape[0] * shape[1],
                    input_group=f"{b}.{group}",
                )
            )
    return out


def provenance(**overrides) -> Provenance:
    kw = dict(
        strategy="evopress",
        settings={"generations": 10, "offspring": 8, "survivors": [2, 1]},
        fitness=Fitness(metric="kl", value=0.125),
        calibration=Calibration(
            description="demo calib, 16x128 tokens", fingerprint="ab12", seed=3
        ),
        tool_version="0.1.0",
        wall_time_s=12.5,
        evaluations=80,
    )
    kw.update(overrides)
    return Provenance(**kw)


def model_identity() -> ModelIdentity:
    return ModelIdentity(
        name_or_path="/models/tiny-llama",
        architecture="LlamaForCausalLM",
        model_type="llama",
        fingerprint="f00d",
    )


def unstructured_recipe(**overrides) -> Recipe:
    layers = tuple(
        LayerEntry(name=i.name, role=i.role, block=i.block, shape=i.shape, sparsity=s)
        for i, s in zip(model_layers(), [s for blk in UNSTRUCTURED for s in blk], strict=True)
    )
    kw = dict(
        model=model_identity(),
        layers=layers,
        budget=RecipeBudget(kind="params", target=0.525, achieved=UNSTRUCTURED_ACHIEVED),
        provenance=provenance(),
    )
    kw.update(overrides)
    return Recipe(**kw)


def nm_recipe(patterns=None) -> Recipe:
    """Every layer 2:4 (N = zeros) unless ``patterns`` gives (n, m) per layer."""
    infos = model_layers()
    patterns = patterns or [(2, 4)] * len(infos)
    layers = tuple(
        LayerEntry(
            name=i.name,
            role=i.role,
            block=i.block,
            shape=i.shape,
            sparsity=n / m,
            structure="nm",
            n=n,
            m=m,
        )
        for i, (n, m) in zip(infos, patterns, strict=True)
    )
    achieved = fraction_removed(layers, "params")
    return Recipe(
        model=model_identity(),
        layers=layers,
        budget=RecipeBudget(kind="params", target=0.5, achieved=achieved),
        provenance=provenance(strategy="uniform"),
        structure="nm",
    )


def structured_recipe(kv_sparsity: float | None = None) -> Recipe:
    """Block 0: 1 of 2 heads, 4 of 16 neurons; block 1: 0 heads, 8 of 16 neurons.

    Achieved: (256 * 0.5 + 384 * 0.25 + 384 * 0.5) / 1280 = 416 / 1280 = 0.325. With
    ``kv_sparsity`` the k/v layers of block 0 lose less (grouped-query attention).
    """
    removed = {(0, "heads"): 1, (0, "neurons"): 4, (1, "heads"): 0, (1, "neurons"): 8}
    total = {"heads": 2, "neurons": INTER}
    layers, units = [], []
    for b in range(2):
        for kind, sub in (("heads", "self_attn"), ("neurons", "mlp")):
            members = []
            frac = removed[(b, kind)] / total[kind]
            for path, role, shape in LAYOUT:
                if not path.startswith(sub + "."):
                    continue
                s = frac
                if kv_sparsity is not None and b == 0 and role in ("k", "v"):
                    s = kv_sparsity
                name = f"model.layers.{b}.{path}"
                layers.append(
                    LayerEntry(
                        name=name, role=role, block=b, shape=shape, sparsity=s, structure=kind
                    )
                )
                members.append(name)
            units.append(
                StructuredUnit(
                    name=f"model.layers.{b}.{sub}",
                    kind=kind,
                    block=b,
                    removed=removed[(b, kind)],
                    total=total[kind],
                    layers=tuple(members),
                )
            )
    achieved = fraction_removed(layers, "params")
    return Recipe(
        model=model_identity(),
        layers=tuple(layers),
        budget=RecipeBudget(kind="params", target=0.3, achieved=achieved),
        provenance=provenance(strategy="tyr"),
        structure="heads_neurons",
        units=tuple(units),
    )


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("make", [unstructured_recipe, nm_recipe, structured_recipe])
def test_round_trip_json_and_file(make, tmp_path):
    recipe = make()
    assert Recipe.from_json(recipe.to_json()) == recipe
    path = recipe.save(tmp_path / "r.json")
    assert Recipe.load(path) == recipe
    assert os.listdir(tmp_path) == ["r.json"]  # no temp file left behind
    assert path.read_text().count('"name": "model.layers.') == len(recipe.layers) + len(
        recipe.units
    )  # one line per layer / unit entry
    assert hash(recipe) == hash(Recipe.load(path))


def test_hand_computed_budget_values():
    assert unstructured_recipe().budget.achieved == pytest.approx(0.525, abs=1e-15)
    assert structured_recipe().budget.achieved == pytest.approx(416 / 1280, abs=1e-15)
    r = structured_recipe()
    assert [u.fraction for u in r.units] == [0.5, 0.25, 0.0, 0.5]
    assert r.num_blocks == 2


def test_settings_normalised_so_round_trip_is_exact():
    p = provenance(settings={"stages": (1, 2), "lr": np.float32(0.5), "k": np.int64(3)})
    assert p.settings == {"stages": [1, 2], "lr": 0.5, "k": 3}
    r = unstructured_recipe(provenance=p, partial=True)
    back = Recipe.from_json(r.to_json())
    assert back == r and back.partial is True


def test_numpy_inputs_are_coerced():
    e = LayerEntry(
        name="a.0.q",
        role="q",
        block=np.int64(0),
        shape=np.array([4, 8]),
        sparsity=np.float32(0.25),
    )
    assert e.shape == (4, 8) and type(e.shape[0]) is int and type(e.sparsity) is float


def test_save_refuses_overwrite_and_is_atomic(tmp_path):
    r = unstructured_recipe()
    path = tmp_path / "r.json"
    r.save(path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        r.save(path)
    r2 = unstructured_recipe(partial=True)
    r2.save(path, overwrite=True)
    assert Recipe.load(path) == r2
    assert sorted(os.listdir(tmp_path)) == ["r.json"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        r.save(tmp_path / "missing" / "r.json")


def test_load_error_names_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(RecipeError, match="bad.json: recipe is not valid JSON"):
        Recipe.load(path)


# ----------------------------------------------------------------------------- validation


def _mutated(mutate) -> str:
    d = unstructured_recipe().to_dict()
    mutate(d)
    return json.dumps(d)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda d: d.update(schema_version=3),
            "schema_version 3 is not supported.*reads schema_version 1, 2",
        ),
        (lambda d: d.update(extra=1), r"recipe: unknown field\(s\) \['extra'\]"),
        (lambda d: d["model"].update(revision="x"), r"model: unknown field\(s\) \['revision'\]"),
        (lambda d: d["layers"][0].update(bias=True), r"layers\[0\]: unknown field\(s\) \['bias'\]"),
        (lambda d: d["model"].pop("fingerprint"), r"model: missing field\(s\) \['fingerprint'\]"),
        (
            lambda d: d["layers"][2].update(sparsity=1.5),
            r"model.layers.0.self_attn.v_proj'?: sparsity = 1.5 is outside \[0, 1\]",
        ),
        (lambda d: d["layers"][2].update(sparsity=-0.1), r"sparsity = -0.1 is outside \[0, 1\]"),
        (
            lambda d: d["layers"][1].update(name=d["layers"][0]["name"]),
            r"duplicate layer name 'model.layers.0.self_attn.q_proj' at layers\[0\] and "
            r"layers\[1\]",
        ),
        (
            lambda d: d["budget"].update(achieved=0.5),
            r"budget.achieved = 0.5 does not match the layer sparsities: they remove 0.525",
        ),
        (lambda d: d["budget"].update(kind="energy"), r"budget.kind 'energy' is not one of"),
        (lambda d: d["layers"][0].update(role="query"), r"role 'query' is not one of"),
        (
            lambda d: d["layers"][0].update(shape=[8]),
            r"shape must be \[out_features, in_features\]",
        ),
        (lambda d: d["layers"][0].update(block=True), r"block must be an integer, got bool"),
        (
            lambda d: d["layers"][0].update(block=1),
            r"in block 0 after a layer of block 1; layers must be in forward order",
        ),
        (lambda d: d.update(partial="no"), r"partial must be true or false"),
        (lambda d: d.update(naming="flax-path"), r"naming 'flax-path' is not supported"),
        (lambda d: d.update(structure="blocks"), r"structure 'blocks' is not one of"),
        (lambda d: d.update(layers=[]), r"layers is empty"),
        (lambda d: d["provenance"]["calibration"].update(seed=-1), r"seed = -1 is outside"),
        (lambda d: d["provenance"].update(wall_time_s="fast"), r"wall_time_s must be a number"),
        (lambda d: d["provenance"].update(settings=[1]), r"settings must be a JSON object"),
        (lambda d: d["layers"][0].update(n=2, m=4), r"n/m are only valid with structure 'nm'"),
        (
            lambda d: d.update(units=[{"name": "x"}]),
            r"units are only valid in structured recipes|units\[0\]: missing",
        ),
    ],
)
def test_validation_errors(mutate, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_json(_mutated(mutate))


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"a": NaN}', "non-finite number NaN"),
        ('{"a": -Infinity}', "non-finite number -Infinity"),
        ("[1, 2]", "recipe must be a JSON object, got list"),
        ('{"a": 1, "a": 2}', "duplicate JSON key 'a'"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_bad_json_text(text, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_json(text)


def test_non_finite_values_are_rejected():
    text = _mutated(lambda d: d["layers"][0].update(sparsity="X")).replace('"X"', "1e999")
    with pytest.raises(RecipeError, match=r"sparsity = inf is not finite"):
        Recipe.from_json(text)
    text = _mutated(lambda d: d["provenance"]["fitness"].update(value="X")).replace('"X"', "NaN")
    with pytest.raises(RecipeError, match="non-finite number NaN"):
        Recipe.from_json(text)
    with pytest.raises(RecipeError, match="fitness.value = nan is not finite"):
        Fitness(metric="kl", value=float("nan"))
    with pytest.raises(RecipeError, match="settings must hold only JSON values"):
        provenance(settings={"x": float("inf")})


def test_budget_tolerance_is_1e6_relative():
    d = unstructured_recipe().to_dict()
    d["budget"]["achieved"] = 0.525 * (1 + 5e-7)
    assert Recipe.from_dict(copy.deepcopy(d)).budget.achieved == 0.525 * (1 + 5e-7)
    d["budget"]["achieved"] = 0.525 * (1 + 2e-6)
    with pytest.raises(RecipeError, match="does not match the layer sparsities"):
        Recipe.from_dict(d)


def test_flops_budget_recomputed_and_latency_trusted():
    r = unstructured_recipe(budget=RecipeBudget(kind="flops", target=0.5, achieved=0.525))
    assert r.budget.kind == "flops"
    with pytest.raises(RecipeError, match="remove 0.525 of the flops"):
        unstructured_recipe(budget=RecipeBudget(kind="flops", target=0.5, achieved=0.4))
    # A latency budget needs the measured table: the stated value is kept as is.
    r = unstructured_recipe(budget=RecipeBudget(kind="latency", target=0.3, achieved=0.31))
    assert Recipe.from_json(r.to_json()) == r


def test_nm_validation():
    base = dict(name="m.0.q", role="q", block=0, shape=(8, 8), structure="nm")
    assert LayerEntry(**base, sparsity=0.5, n=2, m=4).n == 2
    assert LayerEntry(**base, sparsity=0.0, n=0, m=4).sparsity == 0.0  # dense 0:4 level
    with pytest.raises(
        RecipeError, match=r"N:M 4:4 has n >= m; n counts the ZEROS.*valid n are 0..3"
    ):
        LayerEntry(**base, sparsity=1.0, n=4, m=4)
    with pytest.raises(RecipeError, match=r"N:M 5:4 has n >= m"):
        LayerEntry(**base, sparsity=1.0, n=5, m=4)
    with pytest.raises(RecipeError, match=r"m=3 does not divide in_features=8"):
        LayerEntry(**base, sparsity=1 / 3, n=1, m=3)
    with pytest.raises(RecipeError, match=r"N:M 2:4 means sparsity 0.5, but sparsity is 0.25"):
        LayerEntry(**base, sparsity=0.25, n=2, m=4)
    with pytest.raises(RecipeError, match="needs both n"):
        LayerEntry(**base, sparsity=0.5, n=2)


def test_nm_json_errors():
    d = nm_recipe().to_dict()
    d["layers"][6]["m"] = 32  # down_proj has 16 inputs
    with pytest.raises(RecipeError, match="m=32 does not divide in_features=16"):
        Recipe.from_dict(d)
    d = nm_recipe().to_dict()
    d["layers"][0]["structure"] = "unstructured"
    with pytest.raises(RecipeError, match=r"n/m are only valid with structure 'nm'"):
        Recipe.from_dict(d)


def test_structured_validation():
    d = structured_recipe().to_dict()
    d["units"][0]["fraction"] = 0.4
    with pytest.raises(RecipeError, match=r"fraction = 0.4 but removed/total = 1/2 = 0.5"):
        Recipe.from_dict(d)
    d = structured_recipe().to_dict()
    d["units"][1]["removed"] = 17
    with pytest.raises(RecipeError, match=r"removed = 17 is outside the valid range \[0, 16\]"):
        Recipe.from_dict(d)
    d = structured_recipe().to_dict()
    d["units"][0]["layers"].append("model.layers.0.mlp.up_proj")
    with pytest.raises(RecipeError, match="not inside the sublayer"):
        Recipe.from_dict(d)
    d = structured_recipe().to_dict()
    d["units"][0]["layers"].pop()  # o_proj now belongs to no unit
    with pytest.raises(RecipeError, match=r"belong to no unit"):
        Recipe.from_dict(d)
    d = structured_recipe().to_dict()
    d["layers"][4]["sparsity"] = 0.5  # gate loses more rows than 4/16 neurons allow
    d["budget"]["achieved"] = (416 + 128 * 0.25) / 1280
    with pytest.raises(RecipeError, match=r"more than its unit 'model.layers.0.mlp' removes"):
        Recipe.from_dict(d)
    d = structured_recipe().to_dict()
    d["structure"] = "heads"
    with pytest.raises(RecipeError, match=r"kind 'neurons'; a 'heads' recipe allows"):
        Recipe.from_dict(d)
    d = structured_recipe().to_dict()
    d["units"] = []
    with pytest.raises(RecipeError, match="needs its structured units"):
        Recipe.from_dict(d)


# ----------------------------------------------------------------------------- model check


def test_check_against_model():
    r = unstructured_recipe()
    check_against_model(r, model_layers(), "f00d")
    check_against_model(r, model_layers(n_blocks=3), "f00d")  # recipe may cover a subset
    with pytest.raises(RecipeError, match="fingerprint 'beef' does not match the recipe's 'f00d'"):
        check_against_model(r, model_layers(), "beef")
    with pytest.raises(
        RecipeError,
        match=r"'model.layers.1.self_attn.q_proj' is not a layer of the model; model layers with "
        r"the same leaf name: \['model.layers.0.self_attn.q_proj'\]",
    ):
        check_against_model(r, model_layers(n_blocks=1), "f00d")
    bad = [
        LayerInfo(
            x.name, x.role, x.block, (x.shape[1], x.shape[0]), x.flops_per_token, x.input_group
        )
        if x.role == "down"
        else x
        for x in model_layers()
    ]
    with pytest.raises(
        RecipeError, match=r"down_proj': recipe shape \[8, 16\] != model shape \[16, 8\]"
    ):
        check_against_model(r, bad, "f00d")
    with pytest.raises(RecipeError, match="must follow the model's forward order"):
        check_against_model(r, list(reversed(model_layers())), "f00d")


# ----------------------------------------------------------------------------- properties

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)


def _paths(obj, prefix=()):
    """Every (container path, key) inside a JSON value."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix, k
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield prefix, i
            yield from _paths(v, (*prefix, i))


def _load_or_error(text) -> None:
    try:
        Recipe.from_json(text)
    except RecipeError:
        pass  # the only acceptable failure


_BASES = {
    "unstructured": unstructured_recipe().to_dict(),
    "nm": nm_recipe().to_dict(),
    "structured": structured_recipe().to_dict(),
}


@settings(
    max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    base=st.sampled_from(sorted(_BASES)),
    ops=st.lists(
        st.tuples(
            st.integers(min_value=0), st.sampled_from(["set", "delete", "add"]), _json_values
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_corrupted_structure_raises_only_recipe_error(base, ops):
    d = copy.deepcopy(_BASES[base])
    for pick, op, value in ops:
        paths = list(_paths(d))
        if not paths:
            break
        parent_path, key = paths[pick % len(paths)]
        parent = d
        for k in parent_path:
            parent = parent[k]
        if op == "set":
            parent[key] = value
        elif op == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[f"extra_{pick % 7}"] = value
        else:
            parent.append(value)
    _load_or_error(json.dumps(d))  # allow_nan=True: NaN / Infinity literals reach the parser


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    base=st.sampled_from(sorted(_BASES)),
    edits=st.lists(
        st.tuples(
            st.integers(min_value=0), st.integers(min_value=0, max_value=4), st.text(max_size=3)
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_corrupted_text_raises_only_recipe_error(base, edits):
    text = json.dumps(_BASES[base])
    for pos, cut, insert in edits:
        pos %= len(text) + 1
        text = text[:pos] + insert + text[pos + cut :]
    _load_or_error(text)
    _load_or_error(text.encode("utf-8", errors="surrogatepass"))
