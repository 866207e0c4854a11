"""Exports read by the tools that consume them, each tool in its own throwaway virtual
environment (issue 16, "Exports checked by the tools that read them").

These install a tool from the package index, so they need the network and are skipped
unless ``ALLOCSEARCH_INTEGRATION=1``; CI runs them after the main suite (.ci/run)::

    ALLOCSEARCH_INTEGRATION=1 python -m pytest -q -rs -m integration tests/test_integrations.py

Each test makes a virtual environment under its tmp_path, installs the tool there with
``--no-deps`` (plus the few small packages it imports that the test environment lacks)
and lets the environment see the test environment's packages (torch, transformers, jax,
flax, allocsearch) through a ``.pth`` file, so the tool's pins cannot change the
environment the other tests run in; the tool then reads what ``allocsearch export``
wrote, in a subprocess. A test is skipped, quoting pip, only when pip cannot install the
tool (e.g. the index does not carry it); any mismatch is a failure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest
from test_recipe import nm_recipe, provenance, structured_recipe, unstructured_recipe
from typer.testing import CliRunner

from allocsearch.cli import app
from allocsearch.recipe import LayerEntry, ModelIdentity, Recipe, RecipeBudget, fraction_removed
from allocsearch.recipe.exporters import llm_compressor_modules, to_torch_pruning

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.environ.get("ALLOCSEARCH_INTEGRATION") != "1",
        reason="installs tools from the package index; set ALLOCSEARCH_INTEGRATION=1",
    ),
]

REPO = Path(__file__).resolve().parents[1]


def tool_python(root: Path, *packages: str) -> Path:
    """A virtual environment at ``root`` with ``packages`` installed (without their
    dependencies, which come from this test environment); its python. Skips the test,
    quoting pip, when they cannot be installed (e.g. the index does not carry them)."""
    venv.EnvBuilder(with_pip=True).create(root)
    python = root / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(purelib) / "_allocsearch_test_env.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )
    pip = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", *packages],
        capture_output=True,
        text=True,
    )
    if pip.returncode != 0:
        errors = [ln for ln in pip.stderr.splitlines() if ln.startswith("ERROR")]
        reason = " / ".join(errors) or (pip.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"pip cannot install {' '.join(packages)}: {reason}")
        pytest.skip(f"pip cannot install {' '.join(packages)}: {reason}")
    return python


def run_tool(
    python: Path, script: str, *args: object, cwd: Path, timeout: float | None = None
) -> dict:
    """Run ``script`` (dedented) with the tool environment's ``python``, allocsearch and
    tests/ importable, no hub access; its last stdout line, parsed as JSON (``timeout``:
    seconds, then ``subprocess.TimeoutExpired``)."""
    path = cwd / "check.py"
    path.write_text(textwrap.dedent(script))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "JAX_PLATFORMS": "cpu",
    }
    run = subprocess.run(
        [python, path, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def export(*args: object) -> None:
    """``allocsearch export ARGS`` through the command line (in process)."""
    r = CliRunner().invoke(app, ["export", *map(str, args)])
    assert r.exit_code == 0, r.output


TORCH_PRUNING_SCRIPT = """
import json, sys
from importlib.metadata import version
import torch, torch_pruning as tp
from transformers import LlamaConfig, LlamaForCausalLM

export = json.load(open(sys.argv[1]))
cfg = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=4)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg).eval()
model.config.use_cache = False
modules = dict(model.named_modules())
num_heads = {}
for name, m in modules.items():
    if name.endswith("self_attn"):
        num_heads[m.q_proj] = cfg.num_attention_heads
        num_heads[m.k_proj] = cfg.num_key_value_heads
        num_heads[m.v_proj] = cfg.num_key_value_heads
pruner = tp.pruner.MetaPruner(
    model,
    example_inputs=torch.randint(0, 32, (1, 8)),
    importance=tp.importance.GroupMagnitudeImportance(p=2),
    pruning_ratio=0.0,
    pruning_ratio_dict={modules[k]: v for k, v in export["pruning_ratio_dict"].items()},
    head_pruning_ratio_dict={
        modules[k]: v for k, v in export["head_pruning_ratio_dict"].items()
    },
    ignored_layers=[model.lm_head],
    num_heads=num_heads,
    prune_num_heads=True,
    prune_head_dims=False,
    output_transform=lambda out: out.logits,
)
pruner.step()
kept = {}
for b, layer in enumerate(model.model.layers):
    kept[f"model.layers.{b}.self_attn"] = layer.self_attn.q_proj.out_features // cfg.head_dim
    kept[f"model.layers.{b}.mlp"] = layer.mlp.down_proj.in_features
kept["hidden"] = model.model.norm.weight.shape[0]
kept["version"] = version("torch-pruning")
print(json.dumps(kept))
"""


def test_torch_pruning_removes_the_recipes_heads_and_neurons(tmp_path):
    """Torch-Pruning's MetaPruner, given the exported ``pruning_ratio_dict`` and
    ``head_pruning_ratio_dict`` on a tiny Llama (2 heads, 16 neurons per block), removes
    exactly the recipe's heads and neurons of every block and nothing else.
    (Measured with torch-pruning 1.6.x, torch 2.13, transformers 5.24.)"""
    python = tool_python(tmp_path / "venv", "torch-pruning")
    recipe = structured_recipe()
    (tmp_path / "tp.json").write_text(json.dumps(to_torch_pruning(recipe).content))
    (tmp_path / "check.py").write_text(textwrap.dedent(TORCH_PRUNING_SCRIPT))
    run = subprocess.run(
        [python, tmp_path / "check.py", tmp_path / "tp.json"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    kept = json.loads(run.stdout.strip().splitlines()[-1])
    print("Torch-Pruning integration: torch-pruning", kept.pop("version"))
    assert kept.pop("hidden") == 8
    assert kept == {u.name: u.total - u.removed for u in recipe.units}
    heads = {u.name: u.total - u.removed for u in recipe.units if u.kind == "heads"}
    neurons = {u.name: u.total - u.removed for u in recipe.units if u.kind == "neurons"}
    assert heads == {"model.layers.0.self_attn": 1, "model.layers.1.self_attn": 2}
    assert neurons == {"model.layers.0.mlp": 12, "model.layers.1.mlp": 8}


def docs_torch_pruning_driver() -> str:
    """The python block of docs/recipe.md after its ``<!-- torch-pruning driver -->``."""
    text = (REPO / "docs" / "recipe.md").read_text()
    block = text.split("<!-- torch-pruning driver -->", 1)[1]
    return block.split("```python\n", 1)[1].split("```", 1)[0]


def test_docs_torch_pruning_driver_prunes_the_demo_model_within_a_minute(tmp_path):
    """Issue 28.11: the driver of docs/recipe.md on the full demo model (6 blocks, 8 query
    heads over 2 kv heads, 704 neurons) builds the pruner and steps within a minute (with
    transformers' default KV cache traced, building it never ended) and removes the
    exported heads and neurons: half the query heads (2 of 4 per kv group), a quarter of
    the neurons, k/v and the hidden size untouched."""
    import time

    from allocsearch.assets_paths import demo_model_dir

    python = tool_python(tmp_path / "venv", "torch-pruning")
    blocks = range(6)
    export = {
        "pruning_ratio_dict": {
            **{f"model.layers.{b}.self_attn.q_proj": 0.5 for b in blocks},
            **{f"model.layers.{b}.mlp.gate_proj": 0.25 for b in blocks},
        },
        "head_pruning_ratio_dict": {f"model.layers.{b}.self_attn": 0.5 for b in blocks},
    }
    (tmp_path / "tp.json").write_text(json.dumps(export))
    report = """
    kept = [[layer.self_attn.q_proj.out_features, layer.self_attn.k_proj.out_features,
             layer.mlp.down_proj.in_features] for layer in model.model.layers]
    print(json.dumps({"kept": kept, "hidden": model.model.norm.weight.shape[0]}))
    """
    script = docs_torch_pruning_driver() + textwrap.dedent(report)
    t0 = time.monotonic()
    got = run_tool(
        python, script, demo_model_dir(), tmp_path / "tp.json", cwd=tmp_path, timeout=120
    )
    wall = time.monotonic() - t0
    print(f"docs driver on the demo model: {wall:.1f} s")
    assert wall < 60
    head_dim = 256 // 8
    assert got == {"kept": [[4 * head_dim, 2 * head_dim, 528]] * 6, "hidden": 256}


# ----------------------------------------------------------------------------- llm-compressor

# The release measured; compressed-tensors is its exact pin. Its other pins (transformers
# <= 5.17, datasets, auto-round, ...) are not installed: the test environment's torch and
# transformers 5.x serve (see the test's docstring), plus the small packages it imports.
LLM_COMPRESSOR_PACKAGES = (
    "llmcompressor==0.14.0.1",
    "compressed-tensors==0.19.0",
    "loguru",
    "accelerate",
    "datasets",
    "pyarrow",
    "pandas",
    "dill",
    "multiprocess",
    "xxhash",
)

LLM_COMPRESSOR_SCRIPT = """
import json, sys
from importlib.metadata import version

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llmcompressor import oneshot
from llmcompressor.recipe import Recipe

# A tiny random Llama written locally (oneshot reads the model and its tokenizer from a
# directory); q/k/v/o 128x128, gate/up 256x128, down 128x256 as in the recipe.
cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                  tie_word_embeddings=False)
torch.manual_seed(0)
LlamaForCausalLM(cfg).save_pretrained("tiny-llama")
vocab = {f"t{i}": i for i in range(cfg.vocab_size)}
PreTrainedTokenizerFast(
    tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
    unk_token="t0", pad_token="t0",
).save_pretrained("tiny-llama")
ids = torch.randint(0, cfg.vocab_size, (16, 32), generator=torch.Generator().manual_seed(1))
calibration = Dataset.from_dict(
    {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
)

out = {"versions": {p: version(p) for p in ("llmcompressor", "compressed-tensors",
                                            "transformers", "torch")}}
for path in sys.argv[1:]:
    parsed = [
        {"type": type(m).__name__, "sparsity": m.sparsity, "targets": list(m.targets),
         "mask_structure": m.mask_structure, "ignore": list(m.ignore)}
        for m in Recipe.create_instance(path).modifiers
    ]
    model = oneshot(model="tiny-llama", dataset=calibration, recipe=path,
                    num_calibration_samples=16, max_seq_length=32)
    zeros, two_of_four = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight.detach()
            zeros[name] = (w == 0).double().mean().item()
            groups = (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)  # along the input axis
            two_of_four[name] = bool((groups == 2).all())
    out[path] = {"parsed": parsed, "zeros": zeros, "two_of_four": two_of_four}
print(json.dumps(out))
"""


def scaled(recipe, factor: int):
    """``recipe`` with every layer ``factor`` times taller and wider: the same sparsities
    and budget on a model big enough for llm-compressor's SparseGPT (see below)."""
    layers = tuple(
        dataclasses.replace(x, shape=(x.shape[0] * factor, x.shape[1] * factor))
        for x in recipe.layers
    )
    return dataclasses.replace(recipe, layers=layers)


def test_llm_compressor_parses_and_applies_the_exported_recipes(tmp_path):
    """llm-compressor's own ``Recipe`` parser reads what ``allocsearch export --format
    llm-compressor`` writes (per layer with SparseGPT or Wanda, per block, and 2:4), and
    ``oneshot`` with it on a tiny random Llama (hidden 128, intermediate 256, 2 blocks,
    written locally; 16 random sequences of 32 tokens; CPU, offline) gives every layer
    the recipe's sparsity to 1e-4 (per block: the block's weight-weighted mean; 2:4:
    exactly 2 zeros in every 4 consecutive inputs) and leaves lm_head dense.

    Why 1e-4 and not exact: llm-compressor's SparseGPT zeroes the weights whose score is
    ``<=`` the k-th smallest of each 128-column block (``sgpt_sparsify.py``), one weight
    more than the fraction asks; hence layers of >= 128 x 128 here, where that is below
    1e-4 (on the 8 x 8 layers of the unit-test recipe it would be 1/64). Wanda is exact.

    Measured with llmcompressor 0.14.0.1 (compressed-tensors 0.19.0), torch 2.13 and
    transformers 5.24, although llmcompressor 0.14.0.1 pins transformers <= 5.17: the
    pin is not installed (``--no-deps``) and this path works with 5.24; a newer
    llm-compressor that needs its pinned transformers would fail here, not silently."""
    python = tool_python(tmp_path / "venv", *LLM_COMPRESSOR_PACKAGES)
    recipe, nm = scaled(unstructured_recipe(), 16), scaled(nm_recipe(), 16)
    recipe.save(tmp_path / "recipe.json")
    nm.save(tmp_path / "nm.json")
    exports = {
        "sparsegpt.yaml": ("recipe.json", ()),
        "wanda.yaml": ("recipe.json", ("--modifier", "WandaPruningModifier")),
        "block.yaml": ("recipe.json", ("--granularity", "block")),
        "nm.yaml": ("nm.json", ()),
    }
    for name, (source, args) in exports.items():
        export(tmp_path / source, "--format", "llm-compressor", "--out", tmp_path / name, *args)
    got = run_tool(python, LLM_COMPRESSOR_SCRIPT, *exports, cwd=tmp_path)
    print("llm-compressor integration:", got.pop("versions"))

    names, order = llm_compressor_modules(recipe)
    per_layer = [recipe.layers[i].sparsity for i in order]
    block_mean = {0: 0.5, 1: 0.55}  # test_recipe: 320/640 and 352/640 of the weights
    want = {
        "sparsegpt.yaml": ("SparseGPTModifier", per_layer, "0:0"),
        "wanda.yaml": ("WandaPruningModifier", per_layer, "0:0"),
        "block.yaml": ("SparseGPTModifier", [0.5, 0.55], "0:0"),
        "nm.yaml": ("SparseGPTModifier", [0.5] * len(nm.layers), "2:4"),
    }
    for name, (modifier, sparsity, mask) in want.items():
        (parsed,) = got[name]["parsed"]
        assert parsed["type"] == modifier, name
        assert parsed["sparsity"] == pytest.approx(sparsity, abs=1e-12), name
        assert parsed["mask_structure"] == mask and parsed["ignore"] == ["re:.*lm_head"], name
        zeros = got[name]["zeros"]
        assert zeros.pop("lm_head") == 0.0, name
        assert set(zeros) == set(names), name
        for x in recipe.layers:
            expected = {"block.yaml": block_mean[x.block], "nm.yaml": 0.5}.get(name, x.sparsity)
            assert abs(zeros[x.name] - expected) <= 1e-4, (name, x.name, zeros[x.name], expected)
    targets = [f"re:{re.escape(n)}$" for n in names]
    assert got["sparsegpt.yaml"]["parsed"][0]["targets"] == targets
    assert got["block.yaml"]["parsed"][0]["targets"] == [r"re:model.layers.\d+$"]  # as documented
    assert all(got["nm.yaml"]["two_of_four"][x.name] for x in nm.layers)


LLM_COMPRESSOR_QUANT_SCRIPT = (
    LLM_COMPRESSOR_SCRIPT.split("out = {", 1)[0]
    + """
out = {"versions": {p: version(p) for p in ("llmcompressor", "compressed-tensors")}}
path = sys.argv[1]
(modifier,) = Recipe.create_instance(path).modifiers
parsed = {
    "type": type(modifier).__name__,
    "ignore": list(modifier.ignore),
    "groups": {name: {"targets": list(g.targets), "num_bits": g.weights.num_bits,
                      "group_size": g.weights.group_size, "symmetric": g.weights.symmetric}
               for name, g in modifier.config_groups.items()},
}
model = oneshot(model="tiny-llama", dataset=calibration, recipe=path,
                num_calibration_samples=16, max_seq_length=32)
layers = {}
for name, module in model.named_modules():
    if isinstance(module, torch.nn.Linear):
        w = module.weight.detach().float()
        groups = w.reshape(w.shape[0], -1, 128)  # the recipe's group size
        distinct = [len(torch.unique(g)) for g in groups.reshape(-1, 128)]
        scheme = getattr(module, "quantization_scheme", None)
        layers[name] = {
            "max_distinct": max(distinct),
            "num_bits": None if scheme is None else scheme.weights.num_bits,
        }
out["parsed"] = parsed
out["layers"] = layers
print(json.dumps(out))
"""
)


def bits_recipe_128() -> Recipe:
    """The unit-test model's layers 16x taller and wider (hidden 128, intermediate 256, as
    LLM_COMPRESSOR_SCRIPT's tiny Llama), each at a bitwidth of {2, 3, 4, 8}, groups of 128."""
    base = scaled(unstructured_recipe(), 16)
    bits = [2, 3, 4, 8, 2, 3, 4, 4, 8, 3, 2, 4, 2, 3]
    layers = tuple(
        dataclasses.replace(x, sparsity=0.0, bits=b, group_size=128, symmetric=True)
        for x, b in zip(base.layers, bits, strict=True)
    )
    achieved = fraction_removed(layers, "bits")
    return dataclasses.replace(
        base,
        layers=layers,
        budget=RecipeBudget("bits", achieved, achieved),
        provenance=provenance(settings={"level_kind": "bits"}),
    )


def test_llm_compressor_quantizes_each_layer_to_the_recipes_bitwidth(tmp_path):
    """llm-compressor parses what ``allocsearch export --format llm-compressor`` writes for
    a bitwidth recipe (one GPTQModifier config group per bitwidth, layers by module name),
    and ``oneshot`` with it on a tiny random Llama gives every layer its recipe bitwidth:
    its quantization scheme says so, and no group of 128 weights holds more than 2^bits
    distinct values (while every layer holds more than 2^(bits-1), at 8 bits more than 64,
    in some group, so it is not a lower bitwidth); lm_head stays unquantized."""
    python = tool_python(tmp_path / "venv", *LLM_COMPRESSOR_PACKAGES)
    recipe = bits_recipe_128()
    recipe.save(tmp_path / "bits.json")
    export(tmp_path / "bits.json", "--format", "llm-compressor", "--out", tmp_path / "q.yaml")
    got = run_tool(python, LLM_COMPRESSOR_QUANT_SCRIPT, "q.yaml", cwd=tmp_path)
    print("llm-compressor quantization integration:", got.pop("versions"))
    parsed = got["parsed"]
    assert parsed["type"] == "GPTQModifier" and parsed["ignore"] == ["re:.*lm_head"]
    want_groups = {}
    for x in recipe.layers:
        want_groups.setdefault(f"w{x.bits}g128_sym", []).append(f"re:{re.escape(x.name)}$")
    assert {k: g["targets"] for k, g in parsed["groups"].items()} == want_groups
    for name, g in parsed["groups"].items():
        assert (g["num_bits"], g["group_size"], g["symmetric"]) == (int(name[1]), 128, True)
    layers = got["layers"]
    assert layers.pop("lm_head")["num_bits"] is None
    assert set(layers) == {x.name for x in recipe.layers}
    for x in recipe.layers:
        seen = layers[x.name]
        assert seen["num_bits"] == x.bits, x.name
        assert seen["max_distinct"] <= 2**x.bits, (x.name, seen)
        # not a lower bitwidth (a group holds only 128 values: at 8 bits, more than 64)
        assert seen["max_distinct"] > min(2 ** (x.bits - 1), 64), (x.name, seen)


# ----------------------------------------------------------------------------- jaxpruner

# jaxpruner's own imports that the test environment lacks (it brings jax, flax, optax).
JAXPRUNER_PACKAGES = ("jaxpruner", "chex", "toolz", "ml_collections")

JAXPRUNER_SCRIPT = """
import functools, json, sys
from importlib.metadata import version

import jax
import numpy as np

if not hasattr(jax, "tree_map"):  # jaxpruner calls jax.tree_map, an alias JAX 0.6 removed
    jax.tree_map = jax.tree_util.tree_map

import jaxpruner
from flax import nnx, traverse_util
from jaxpruner import sparsity_distributions

from allocsearch.models import load_model

model_dir, map_path = sys.argv[1:]
with open(map_path) as f:  # the loader of docs/recipe.md
    custom_sparsity_map = {
        tuple(e["path"]): e["sparsity"] for e in json.load(f)["custom_sparsity_map"]
    }
model = load_model(model_dir)
params = nnx.state(model.adapter.module(model.params)).to_pure_dict()
updater = jaxpruner.MagnitudePruning(
    sparsity_distribution_fn=functools.partial(
        sparsity_distributions.uniform, sparsity=0.0, custom_sparsity_map=custom_sparsity_map
    )
)
pruned, _ = updater.instant_sparsify(params)
flat = traverse_util.flatten_dict(params)
zeros = {
    json.dumps(list(k)): float(np.mean(np.asarray(v) == 0))
    for k, v in traverse_util.flatten_dict(pruned).items()
    if np.ndim(v) == 2
}
unmatched = [list(k) for k in custom_sparsity_map if k not in flat]
print(json.dumps({"version": version("jaxpruner"), "unmatched": unmatched, "zeros": zeros}))
"""

JAXPRUNER_MODEL = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
}


def test_jaxpruner_prunes_allocsearchs_own_flax_tree_as_exported(tmp_path):
    """jaxpruner's ``MagnitudePruning`` with the ``custom_sparsity_map`` that ``allocsearch
    export --format jaxpruner --jaxpruner-paths nnx`` wrote (loaded with docs/recipe.md's
    three lines), applied by ``instant_sparsify`` to allocsearch's own Flax parameter tree
    (``nnx.state(...).to_pure_dict()`` of a tiny random Llama with grouped-query
    attention), matches every exported path and gives every layer exactly the recipe's
    sparsity; the embeddings and the LM head, outside the map, get jaxpruner's global
    sparsity (0 here). jaxpruner is installed from the package index when the index has
    it, else the test is skipped with pip's reason. jaxpruner calls ``jax.tree_map``,
    which JAX 0.6 removed; the script restores that alias (jax.tree_util.tree_map) first."""
    import jax

    from allocsearch.models import HFModel, adapter_for_config, load_model, save_model

    python = tool_python(tmp_path / "venv", *JAXPRUNER_PACKAGES)
    adapter = adapter_for_config(JAXPRUNER_MODEL)
    save_model(HFModel(adapter, adapter.init_params(jax.random.key(0))), tmp_path / "model")
    model = load_model(tmp_path / "model")
    # eighths: every layer's weight count (>= 512) times its sparsity is an integer
    layers = tuple(
        LayerEntry(name=i.name, role=i.role, block=i.block, shape=i.shape, sparsity=s)
        for k, i in enumerate(model.adapter.layers())
        for s in [((3 * k) % 7 + 1) / 8]
    )
    achieved = fraction_removed(layers, "params")
    recipe = Recipe(
        model=ModelIdentity(
            name_or_path=str(tmp_path / "model"),
            architecture="LlamaForCausalLM",
            model_type="llama",
            fingerprint=model.fingerprint,
        ),
        layers=layers,
        budget=RecipeBudget(kind="params", target=achieved, achieved=achieved),
        provenance=provenance(),
    )
    recipe.save(tmp_path / "recipe.json")
    export(
        tmp_path / "recipe.json", "--format", "jaxpruner", "--jaxpruner-paths", "nnx",
        "--model", tmp_path / "model", "--out", tmp_path / "map.json",
    )  # fmt: skip
    got = run_tool(
        python, JAXPRUNER_SCRIPT, tmp_path / "model", tmp_path / "map.json", cwd=tmp_path
    )
    print("jaxpruner integration: jaxpruner", got["version"])
    assert got["unmatched"] == []
    zeros = {tuple(json.loads(k)): v for k, v in got["zeros"].items()}
    for x in recipe.layers:
        key = (*(int(p) if p.isdigit() else p for p in x.name.split(".")), "weight")
        assert zeros.pop(key) == x.sparsity, x.name
    assert zeros == {("model", "embed_tokens", "weight"): 0.0, ("lm_head", "weight"): 0.0}
