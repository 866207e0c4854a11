"""Exports read by the tools that consume them, each tool in its own throwaway virtual
environment (issue 16, "Exports checked by the tools that read them").

These install a tool from the package index, so they need the network and are skipped
unless ``ALLOCSEARCH_INTEGRATION=1``::

    ALLOCSEARCH_INTEGRATION=1 python -m pytest -q -m integration tests/test_integrations.py

Each test makes a virtual environment under its tmp_path, installs the tool there with
``--no-deps`` and lets the environment see the test environment's packages (torch,
transformers) through a ``.pth`` file, so the tool's pins cannot change the environment
the other tests run in; the tool then reads what allocsearch exported, in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest
from test_recipe import structured_recipe

from allocsearch.recipe.exporters import to_torch_pruning

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.environ.get("ALLOCSEARCH_INTEGRATION") != "1",
        reason="installs tools from the package index; set ALLOCSEARCH_INTEGRATION=1",
    ),
]


def tool_python(root: Path, package: str) -> Path:
    """A virtual environment at ``root`` with ``package`` installed (without its
    dependencies, which come from this test environment); its python. Skips the test,
    quoting pip, when the package cannot be installed (e.g. not on the index)."""
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
        [python, "-m", "pip", "install", "--quiet", "--no-deps", package],
        capture_output=True,
        text=True,
    )
    if pip.returncode != 0:
        last = (pip.stderr.strip().splitlines() or ["(no output)"])[-1]
        pytest.skip(f"pip cannot install {package}: {last}")
    return python


TORCH_PRUNING_SCRIPT = """
import json, sys
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
    assert kept.pop("hidden") == 8
    assert kept == {u.name: u.total - u.removed for u in recipe.units}
    heads = {u.name: u.total - u.removed for u in recipe.units if u.kind == "heads"}
    neurons = {u.name: u.total - u.removed for u in recipe.units if u.kind == "neurons"}
    assert heads == {"model.layers.0.self_attn": 1, "model.layers.1.self_attn": 2}
    assert neurons == {"model.layers.0.mlp": 12, "model.layers.1.mlp": 8}
