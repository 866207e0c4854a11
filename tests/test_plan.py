"""The memory plan: hand-counted bytes on a two-block model, the Llama-3 configs, the
refusal line, store sizes against a written store, and the `plan` command."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from allocsearch.cli import app
from allocsearch.config import config_from_dict, load_config
from allocsearch.models.safetensors_io import read_header
from allocsearch.plan import (
    MemoryPlanError,
    load_hf_config,
    parse_bytes,
    plan_memory,
)

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30

# 2 blocks, hidden 8, MLP 16, 2 query heads of 4 and 1 kv head, vocabulary 16:
#   per block q 8x8=64, k 4x8=32, v 32, o 8x8=64, gate 16x8=128, up 128, down 8x16=128
#   (576 prunable) and two norms of 8 (592 in all); outside the blocks embed 16x8=128,
#   lm_head 128, final norm 8 (264); total 264 + 2 x 592 = 1448 parameters.
TINY = {
    "model_type": "llama",
    "vocab_size": 16,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "tie_word_embeddings": False,
}
ROLES = {
    "self_attn.q_proj": (8, 8),
    "self_attn.k_proj": (4, 8),
    "self_attn.v_proj": (4, 8),
    "self_attn.o_proj": (8, 8),
    "mlp.gate_proj": (16, 8),
    "mlp.up_proj": (16, 8),
    "mlp.down_proj": (8, 16),
}
TINY_RUN = {
    "dtype": "float32",
    "data": {"seq_len": 4, "n_calibration_seqs": 2},  # 8 calibration tokens
    "search": {
        "strategy": "evopress",
        "settings": {"offspring": 4, "survivors": [2, 1], "tokens": [4, 8]},
    },
    "evaluator": {"metric": "kl"},
    "backend": {"kind": "local"},
}


def tiny_store(path: Path) -> Path:
    """A manifest (no weight files: the plan reads the manifest only) of a supernet with
    three dense float32 levels (0.25, 0.5, 0.75) of every layer, 1000 bytes per file."""
    units, unit_params, variants = [], [], {}
    for b in range(2):
        for rel, shape in ROLES.items():
            name = f"model.layers.{b}.{rel}"
            units.append({"name": name, "block": b, "layers": [name], "role": rel})
            unit_params.append([name + ".weight"])
            variants[name + ".weight"] = {
                "kind": "dense",
                "per_row": False,
                "num_levels": 3,
                "shape": list(shape),
                "dtype": "float32",
                "bytes": 1000,
            }
    manifest = {
        "spec": {
            "units": units,
            "sparsity": [[0.25, 0.5, 0.75]] * len(units),
            "valid": [[True] * 3] * len(units),
        },
        "unit_params": unit_params,
        "variants": variants,
    }
    path.mkdir()
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("141e9") == 141 * 10**9
    assert parse_bytes("1.5 MiB") == 3 * 2**19
    assert parse_bytes(4096) == 4096
    for bad in ("80 parsecs", "-3GB", "", "GB"):
        with pytest.raises(ValueError, match="not valid"):
            parse_bytes(bad)


def test_hand_counted_bytes_of_a_two_block_model(tmp_path):
    cfg = config_from_dict(TINY_RUN)
    plan = plan_memory(
        TINY,
        cfg,
        model="tiny",
        store=tiny_store(tmp_path / "store"),
        device_kind="gpu",
        device_memory=34_000,  # 30,600 usable with the 10% margin
        host_memory=10**9,
    )
    # a = s = 4 bytes; B = 2 blocks; K = 3 levels; queries (4 x 4), (3 x 8) tokens; one
    # call takes min(8192 // 4, 2) = 2 sequences of T = 4 tokens.
    # Per candidate and call: the block's 592 weights 4 x 592 = 2368; hidden carry
    # 2 x (2 x 4 tokens) x 8 x 4 = 512; block working set: attention
    # 2 x 2 heads x 4^2 x (8 + 4) = 768 + q/k/v and rotations 8 x (2 + 2) x 4 x 4 x 2 = 1024
    # (MLP 3 x 8 x 16 x 4 = 1536 is smaller), plus 8 x 8 x (4 + 4) = 512 -> 2304; logits
    # 8 x 16 x (4 + 8) = 1536 are smaller: 2368 + 512 + 2304 = 5184.
    (driver,) = plan.modes["resident"]
    assert driver.device == {
        "model": 4 * (2 * 1448 - 2 * 576),  # the model, and copies of what is not stacked
        "variants": 2 * 3 * 576 * 4,  # their stacks, the one device copy
        "teacher": 4 * 16 * 8,  # float32 log-probabilities of 8 tokens
        # construction: dense copy 4 x 1448 + teacher 512 + one call 5184 = 11488, larger
        # than scoring 5184 + teacher rows 512 + reference 768; less the reference
        "activations": 11488 - 768,
        "reference": (2 + 1) * 8 * 8 * 4,  # states at 3 block boundaries of 8 tokens
    }
    assert driver.host == {"variants": 2 * 3 * 128 * 4}  # gate_proj's stack, on the host
    assert driver.device_total == 32_800

    (driver,) = plan.modes["streaming"]
    assert driver.device == {
        "model": 4 * (264 + 2 * 16),  # outside the blocks, and two blocks' norms
        # this block's stacks (3 slots per unit), the next one's and its 3 moved levels
        "variants": 2 * (3 * 4 * 576) + 3 * 4 * 576,
        "teacher": 8 * 64,  # the rows of the 8-token query
        "activations": 3 * 8 * 8 * 4 + 5184,  # 3 candidates' states of 8 tokens, one call
        "reference": 768,
    }
    assert driver.host == {"variants": 2 * 3 * 4 * 576, "teacher": 512}
    assert driver.device_total == 29_152

    # Unit streaming: groups q (64 weights and the block's two norms, 16), k 32, v 32,
    # o 64, gate, up, down 128 each. Variants: the largest group's stacks (3 slots x 4 x
    # 128 = 1536), the next group's and its 3 moved levels (1536). Activations of the
    # 8-token query (3 candidates, 24 states): states 24 x 8 x 4 = 768, plus the larger
    # sublayer: attention keeps q, k, v (24 x (2 + 2) x 4 x 4 = 1536) and one call: the q
    # group's 80 weights (320), carry 512, attention 768 + 1024 + 512 = 2304 -> 3136;
    # the MLP keeps act(gate) (24 x 16 x 4 = 1536) and one call 512 + 512 + 1536 + 512
    # = 3072.
    (driver,) = plan.modes["streaming-unit"]
    assert driver.device == {
        "model": 4 * (264 + 2 * 16),
        "variants": 2 * (3 * 4 * 128) + 3 * 4 * 128,
        "teacher": 8 * 64,
        "activations": 768 + max(1536 + 3136, 1536 + 3072),
        "reference": 768,
    }
    assert driver.host == {"variants": 2 * 3 * 4 * 128, "teacher": 512}
    assert plan.fits == {"resident": False, "streaming": True, "streaming-unit": True}
    assert plan.mode == "streaming"  # block streaming when it fits
    block = dataclasses.replace(cfg.evaluator, stream_unit="unit")
    unit = plan_memory(TINY, dataclasses.replace(cfg, evaluator=block), model="tiny",
                       store=tmp_path / "store", device_kind="gpu", device_memory=34_000,
                       host_memory=10**9)  # fmt: skip
    assert unit.mode == "streaming-unit"
    assert unit.moved_per_generation == plan.moved_per_generation  # the same bytes
    assert plan.store_bytes == 14 * 1000
    # both queries read all 3 levels of every unit in both blocks
    assert plan.moved_per_generation == 2 * (2 * 3 * 4 * 576)
    # page cache: each query reads the parent's level of the 7 units of both blocks
    # (576 float32 weights a block) and both blocks' two norms (16 weights): 2 x (2304 +
    # 64); 4 children x 2 x 3 switches = 24 units at the mean unit level 2304 / 7 bytes,
    # at most the other 2 levels of every unit (2 x 2 x 2304 = 9216)
    assert plan.parent_disk_bytes == 2 * (4 * 576 + 4 * 16) == 4736
    assert plan.disk_per_generation == 24 * 2304 // 7 == 7899
    assert "- page cache (streaming): every query reads the parent's" in plan.table()
    # EvoPress children differ from their parent in <= 2 x 3 units: a query of n moves
    # <= 14 + 6 n variants of the mean unit, 2 x 4 x 576 / 14 bytes
    mean = 2 * 4 * 576 / 14
    assert plan.moved_estimate == int((14 + 6 * 4) * mean) + int((14 + 6 * 3) * mean)


def test_hand_counted_cpu_device_counts_construction_and_scoring(tmp_path):
    cfg = config_from_dict(TINY_RUN)
    store = tiny_store(tmp_path / "store")
    plan = plan_memory(
        TINY, cfg, store=store, device_kind="cpu", device_memory=10**9, host_memory=10**9
    )
    (driver,) = plan.modes["resident"]
    # glibc keeps the construction's freed buffers: 11488 + scoring 5184 + 512 teacher rows
    assert driver.device["activations"] == 11488 + 5696
    assert driver.host == {}
    device, host = plan.need("resident")
    assert host == device == driver.device_total  # the CPU device is the host's memory


def test_store_bytes_match_a_written_store(tmp_path):
    """The plan's store size (tensor data) against a store the writer writes with the
    grid the plan uses: dense variants (auto layout, packed where smaller) and nested."""
    from allocsearch.models.hf import HFModel, adapter_for_config
    from allocsearch.pruners.base import DenseVariants, NestedVariants
    from allocsearch.supernet import factory
    from allocsearch.supernet.store import StoreWriter

    one_block = {**TINY, "num_hidden_layers": 1}
    adapter = adapter_for_config(one_block)
    rng = np.random.default_rng(0)
    for pruner in ("sparsegpt", "magnitude"):
        cfg = config_from_dict(
            {**TINY_RUN, "supernet": {"pruner": pruner, "center": 0.5, "steps_each_side": 2}}
        )
        grid = factory.make_grid(cfg.supernet, HFModel(adapter, {}), target=0.5)
        out = tmp_path / pruner
        with StoreWriter(out, storage_dtype="float32") as writer:
            for u, layer in enumerate(adapter.layers()):
                levels = np.asarray(grid.sparsity)[u][np.asarray(grid.valid)[u]]
                counts = np.round(levels * layer.numel).astype(np.int32)
                rank = rng.permutation(layer.numel).astype(np.int32).reshape(layer.shape)
                if pruner == "magnitude":
                    variants = NestedVariants(rank, False, counts, counts / layer.numel)
                else:  # SparseGPT's layout: K dense copies with the levels' zeros
                    w = rng.uniform(0.5, 1.0, layer.shape).astype(np.float32)
                    weights = np.stack([np.where(rank >= c, w, 0) for c in counts])
                    variants = DenseVariants(weights, counts / layer.numel, None)
                writer.add(layer.weight_name, variants)
            data = sum(
                f.stat().st_size - read_header(f)[1] for f in writer.temporary_path.iterdir()
            )
        plan = plan_memory(
            one_block, cfg, device_kind="cpu", device_memory=10**9, host_memory=10**9
        )
        assert plan.store_bytes == data, pruner


def _llama3_8b_run(**supernet) -> object:
    cfg = load_config(ROOT / "configs" / "llama3-8b-evopress.yaml")
    return dataclasses.replace(
        cfg,
        supernet=dataclasses.replace(cfg.supernet, steps_each_side=4, **supernet),
        backend=dataclasses.replace(cfg.backend, kind="local"),
    )


def test_llama3_8b_sparsegpt_9_levels_fits_80gb_streaming_not_resident():
    hf = load_hf_config(ROOT / "configs" / "models" / "llama-3-8b")
    assert hf["num_hidden_layers"] == 32 and hf["vocab_size"] == 128256
    kwargs = dict(device_kind="gpu", device_memory=parse_bytes("80GB"), host_memory=256 * 10**9)
    plan = plan_memory(hf, _llama3_8b_run(), model="llama-3-8b", **kwargs)
    assert plan.mode == "streaming"
    assert plan.fits == {"resident": False, "streaming": True, "streaming-unit": True}
    resident, _ = plan.need("resident")
    streaming, _ = plan.need("streaming")
    assert streaming < 0.9 * 80e9 < resident
    # one device copy, the bf16 stacks: 9 levels x 2 bytes per prunable weight (6.98e9 of
    # them); for the small k/v layers fewer levels: between 7 and 9 levels' worth
    variants = plan.modes["resident"][0].device["variants"]
    assert 7 * 2 * 6.98e9 < variants <= 9 * 2 * 6.98e9
    # float32 storage: the store's pages are page cache, the stacks bf16 all the same (the
    # issue's 393 GB, a float32 variants dict beside the stacks, is gone)
    old = plan_memory(hf, _llama3_8b_run(), storage_dtype="float32", execution="streaming",
                      **kwargs)  # fmt: skip
    assert old.modes["resident"][0].device["variants"] == variants
    with pytest.raises(MemoryPlanError):
        plan_memory(hf, _llama3_8b_run(), execution="resident", **kwargs)


def _block_streaming(cfg):
    return dataclasses.replace(
        cfg, evaluator=dataclasses.replace(cfg.evaluator, stream_unit="block")
    )


def test_refusal_names_the_shortfall_and_what_would_fit():
    """Block streaming (``stream_unit: block``) refused: the line names unit streaming
    among what would fit; below that, the changes that fit block streaming."""
    hf = load_hf_config(ROOT / "configs" / "models" / "llama-3-8b")
    kwargs = dict(model="llama-3-8b", device_kind="gpu", host_memory=256 * 10**9)
    with pytest.raises(MemoryPlanError) as e:
        plan_memory(hf, _block_streaming(_llama3_8b_run()), device_memory=parse_bytes("28GB"),
                    **kwargs)  # fmt: skip
    msg = str(e.value)
    assert "unit streaming (evaluator.stream_unit: unit or --stream-unit unit)" in msg, msg
    assert plan_memory(hf, _llama3_8b_run(), device_memory=parse_bytes("28GB"), **kwargs).mode == (
        "streaming-unit"
    )
    assert "\n" not in msg
    head = "llama-3-8b does not fit for `search`: streaming execution needs "
    assert msg.startswith(head), msg
    assert "GiB of device memory per process, 23.47 GiB available (26.08 GiB less the 10% " in msg
    assert "would fit: fewer levels: 5 (supernet.steps_each_side: 2 or --steps-each-side 2)" in msg
    want = "smaller micro-batches: 4096 tokens (evaluator.micro_batch_tokens: 4096 or "
    assert want + "--micro-batch-tokens 4096)" in msg, msg
    with pytest.raises(MemoryPlanError, match="would fit: together, 32 actors") as e:
        plan_memory(hf, _block_streaming(_llama3_8b_run()), device_memory=parse_bytes("16GB"),
                    **kwargs)  # fmt: skip
    assert [r.config for r in e.value.remedies] == [
        {"backend.kind": "ray", "backend.workers": 32, "evaluator.micro_batch_tokens": 4096}
    ]
    with pytest.raises(MemoryPlanError, match="no single change fits"):
        plan_memory(hf, _llama3_8b_run(), device_memory=parse_bytes("2GB"), **kwargs)


def test_plan_command(tmp_path):
    runner = CliRunner()
    cfg = yaml.safe_load((ROOT / "configs" / "llama3-8b-evopress.yaml").read_text())
    cfg["supernet"]["steps_each_side"] = 4
    cfg["backend"] = {"kind": "local"}
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    only_config = tmp_path / "llama-3-8b"
    only_config.mkdir()  # a model directory holding config.json and no weights
    (only_config / "config.json").write_text(
        (ROOT / "configs" / "models" / "llama-3-8b" / "config.json").read_text()
    )
    args = ["plan", "--config", str(cfg_file), "--model", str(only_config)]
    r = runner.invoke(app, [*args, "--device-memory", "80GB", "--host-memory", "256GB"])
    assert r.exit_code == 0, r.output
    assert "| resident | driver | device |" in r.stdout and "chosen: **streaming**" in r.stdout
    r = runner.invoke(app, [*args, "--device-memory", "8GiB", "--host-memory", "256GB"])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error: MemoryPlanError: "), r.stderr
    assert "7.20 GiB available" in r.stderr.replace("\n", "")


def test_execution_for_picks_what_fits(tmp_path, monkeypatch):
    from allocsearch.plan import execution_for

    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY))
    store = tiny_store(tmp_path / "store")
    cfg = config_from_dict({**TINY_RUN, "model": str(model)})
    monkeypatch.setenv("ALLOCSEARCH_HOST_MEMORY", "1GB")
    # resident needs 32,800 bytes, streaming 29,152 (test_hand_counted_bytes...)
    for device, mode in (("1GB", "resident"), ("34000", "streaming"), ("1000", "streaming")):
        monkeypatch.setenv("ALLOCSEARCH_DEVICE_MEMORY", device)
        assert execution_for(cfg, store=store) == mode, device


# A tiny Qwen2-MoE (router, 4 experts, a shared expert and its gate): per block q 16x16,
# k and v 8x16, o 16x16 (768) and q/k/v biases (32), router 4x16 (64), 4 experts of
# 3 x 8x16 (1536), shared expert 3 x 12x16 (576) and its gate 1x16, two norms of 16 (32):
# 3024; outside the blocks embed and lm_head 61x16 and the final norm (1968):
# 1968 + 2 x 3024 = 8016 parameters.
TINY_MOE = {
    "model_type": "qwen2_moe",
    "vocab_size": 61,
    "hidden_size": 16,
    "intermediate_size": 32,
    "moe_intermediate_size": 8,
    "shared_expert_intermediate_size": 12,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "tie_word_embeddings": False,
}


@pytest.mark.slow
def test_moe_weights_and_store_match_a_real_tiny_moe(tmp_path):
    """The plan counts every expert, the router and the shared expert (the model's real
    parameter count), and its store size is within 3% of the tensor data of a SparseGPT
    store built from the model (one file per expert weight; the plan leaves out headers,
    input norms and the manifest); tied experts make fewer units. (Nested stores' sizes
    do not depend on the family: test_store_bytes_match_a_written_store.)"""
    from allocsearch.data.tokenset import TokenSet
    from allocsearch.models.hf import HFModel, adapter_for_config, fingerprint_tensors
    from allocsearch.supernet import factory
    from allocsearch.supernet.build import NoCalibrationTokensWarning, build_supernet

    adapter = adapter_for_config(TINY_MOE)
    rng = np.random.default_rng(0)
    params = {
        name: rng.normal(size=shape).astype(np.float32)
        for name, shape in adapter.param_shapes.items()
    }
    params.update(adapter.constant_params())
    assert adapter.num_params() == sum(int(np.size(v)) for v in params.values()) == 8016
    fp = fingerprint_tensors(TINY_MOE, {k: np.asarray(v) for k, v in params.items()})
    model = HFModel(adapter, params, fingerprint=fp)
    calib = TokenSet(rng.integers(0, 61, size=(4, 8)).astype(np.int32), "r", "ids", 0)
    pruner = "sparsegpt"
    for tie in (True, False):
        supernet = {"pruner": pruner, "center": 0.5, "steps_each_side": 2, "tie_experts": tie}
        cfg = config_from_dict({**TINY_RUN, "supernet": supernet})
        sc = cfg.supernet
        plan = plan_memory(
            TINY_MOE, cfg, command="apply", device_kind="cpu", device_memory=10**9,
            host_memory=10**9,
        )  # fmt: skip
        (proc,) = plan.modes["resident"]
        assert proc.device["model"] == 2 * 4 * 8016  # apply: the model and its pruned copy
        assert "4 per block, top-2, width 8, shared expert 12" in plan.settings["experts"]
        units = 2 * (4 + (3 if tie else 12) + 3)
        assert f" {units} units x " in plan.settings["supernet"]
        if tie:  # same variants per layer, fewer units (built by test_moe)
            continue
        with warnings.catch_warnings():  # an expert may get no calibration token
            warnings.simplefilter("ignore", NoCalibrationTokensWarning)
            store = build_supernet(
                model,
                calib,
                pruner=factory.make_pruner(sc),
                grid=factory.make_grid(sc, model, target=sc.center),
                structure=sc.structure,
                input_mode=sc.input_mode,
                out_dir=tmp_path / pruner,
                batch_size=2,
                progress=False,
                storage_dtype="float32",
            )
        assert len(store.spec.units) == units
        files = [
            f
            for f in (tmp_path / pruner).glob("*.safetensors")
            if f.name != "input_norms.safetensors"
        ]
        assert len(files) == 2 * (4 + 12 + 3)  # one file per prunable weight
        data = sum(f.stat().st_size - read_header(f)[1] for f in files)  # headers excluded
        assert plan.store_bytes == pytest.approx(data, rel=0.03), pruner


@pytest.mark.parametrize(
    "name, params",
    [
        # 32 x (attention 41,943,040 + router 8 x 4096 + 8 experts x 3 x 14336 x 4096
        # + norms 8192) + embed and head 2 x 32000 x 4096 + final norm 4096
        ("mixtral-8x7b", 32 * 1_451_270_144 + 262_148_096),
        # 48 x (attention 18,874,368 + q/k norms 256 + router 128 x 2048 + 128 experts
        # x 3 x 768 x 2048 + norms 4096) + embed and head 2 x 151936 x 2048 + final norm
        ("qwen3-30b-a3b", 48 * 623_120_640 + 622_331_904),
    ],
)
def test_moe_configs_plan(name, params):
    """The MoE example configs: every expert counted (46.7 B and 30.5 B parameters), the
    experts row, and a 17-level bf16 SparseGPT search streams on one 141 GB device for
    Qwen3-30B-A3B, while Mixtral-8x7B needs fewer levels or more devices."""
    hf = load_hf_config(ROOT / "configs" / "models" / name)
    cfg = load_config(ROOT / "configs" / "llama3-8b-evopress.yaml")  # 17 levels, bf16
    run = dataclasses.replace(cfg, backend=dataclasses.replace(cfg.backend, kind="local"))
    kwargs = dict(model=name, device_kind="gpu", device_memory=141 * 10**9, host_memory=10**12)
    plan = plan_memory(hf, run, command="apply", **{**kwargs, "device_memory": 10**12})
    assert plan.modes["resident"][0].device["model"] == 2 * 2 * params  # bf16, twice
    assert f"{params / 1e9:.3f} B parameters" in plan.settings["model"]
    assert "sorted dispatch" in plan.settings["experts"]
    if name == "qwen3-30b-a3b":
        assert plan_memory(hf, run, **kwargs).mode == "streaming"
    else:  # block streaming needs fewer levels or more devices; unit streaming fits
        with pytest.raises(MemoryPlanError, match="would fit: fewer levels"):
            plan_memory(hf, _block_streaming(run), **kwargs)
        assert plan_memory(hf, run, **kwargs).mode == "streaming-unit"


def test_moe_unit_options_reach_the_plan_layout():
    """expert_removal (one unit per expert, a removed level) and prune_router (the router
    a unit) are laid out as build lays them out: the units of block 0 and their levels."""
    from allocsearch.plan import _adapter, _layout

    hf = load_hf_config(ROOT / "configs" / "models" / "mixtral-8x7b")
    cfg = load_config(ROOT / "configs" / "llama3-8b-evopress.yaml")
    sc = dataclasses.replace(cfg.supernet, expert_removal=True, prune_router=True)
    one_block = _adapter(json.dumps({**hf, "num_hidden_layers": 1}))
    layout = _layout(one_block, dataclasses.replace(cfg, supernet=sc))
    names = [[layout.params[i].name for i in idx] for idx in layout.unit_params]
    experts = [n for n in names if "experts" in n[0]]
    assert len(experts) == 8 and all(len(n) == 3 for n in experts)  # w1, w2, w3 together
    assert any(n == ["block_sparse_moe.gate.weight"] for n in names)  # the router
    removed = [layout.params[idx[0]].sparsity[-1] for idx in layout.unit_params if len(idx) == 3]
    assert removed == [1.0] * 8  # every expert's last level removes it


def _apply_keys(run: dict, keys) -> dict:
    """``run`` (a parsed config) with the dotted ``keys`` of a remedy set."""
    out = json.loads(json.dumps(run))
    for dotted, value in keys.items():
        section, _, key = dotted.rpartition(".")
        (out.setdefault(section, {}) if section else out)[key] = value
    return out


@pytest.mark.parametrize(
    ("execution", "device", "kinds"),
    [
        # Llama-3-8B float32, full KL, 16k-token micro-batches, float32 storage, 9 levels
        # (block streaming: unit streaming fits it as it is)
        (
            "auto",
            "100GB",
            {"bf16", "bfloat16", "levels", "top-k", "micro-batches", "workers", "unit streaming"},
        ),  # fmt: skip
        ("resident", "400GB", {"bfloat16", "levels", "top-k", "streaming"}),
    ],
)
def test_every_printed_remedy_applied_through_config_or_cli_then_fits(
    tmp_path, execution, device, kinds
):
    """Each change the refusal's line names, made as a user makes it (the config keys it
    names, or the command-line options it names), re-plans to a fit with `plan`."""
    runner = CliRunner()
    run = yaml.safe_load((ROOT / "configs" / "llama3-8b-evopress.yaml").read_text())
    run["model"] = str(ROOT / "configs" / "models" / "llama-3-8b")
    run["dtype"] = "float32"
    run["supernet"].update(steps_each_side=4, storage_dtype="float32")
    run["evaluator"] = {"metric": "kl", "execution": execution, "micro_batch_tokens": 16384}
    if execution == "auto":
        run["evaluator"]["stream_unit"] = "block"
    memory = ["--device-memory", device, "--host-memory", "10TB"]

    def plan(config: dict, *options: str):
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(config))
        return runner.invoke(app, ["plan", "--config", str(path), *memory, *options])

    with pytest.raises(MemoryPlanError) as e:  # the same refusal, for its remedies
        plan_memory(
            load_hf_config(run["model"]),
            config_from_dict(run),
            model=run["model"],
            device_kind="gpu",
            device_memory=parse_bytes(device),
            host_memory=parse_bytes("10TB"),
            execution=execution,
        )
    remedies = e.value.remedies
    named = {k for r in remedies for k in kinds if k in r.what}
    assert named == kinds, [r.what for r in remedies]
    refused = plan(run)
    assert refused.exit_code == 2, refused.output
    line = " ".join(refused.stderr.split())
    for remedy in remedies:
        assert str(remedy) in line, (str(remedy), line)
        fixed = plan(_apply_keys(run, remedy.config))
        assert fixed.exit_code == 0, (remedy, fixed.output)
        assert "- chosen: **" in fixed.stdout and "nothing fits" not in fixed.stdout
        if remedy.options:
            fixed = plan(run, *remedy.options)
            assert fixed.exit_code == 0, (remedy, fixed.output)


def test_llama3_70b_streams_by_unit_on_80gb_and_block_refusal_remedies_apply(tmp_path):
    """Issue 26: the 70B EvoPress plan at 80 GB chooses unit streaming and fits with the
    margin; with block streaming set, its refusal names unit streaming, fewer levels and
    more actors, and each fits."""
    runner = CliRunner()
    model = str(ROOT / "configs" / "models" / "llama-3-70b")
    args = ["plan", "--model", model, "--config", str(ROOT / "configs/llama3-8b-evopress.yaml")]
    args += ["--device-memory", "80GB", "--host-memory", "512GB"]
    fits = runner.invoke(app, args)
    assert fits.exit_code == 0, fits.output
    assert "- chosen: **streaming-unit**" in fits.stdout
    assert "- streaming-unit: fits: device " in fits.stdout
    assert "- streaming: does not fit: device 110.10 GiB of 67.06 GiB" in fits.stdout
    refused = runner.invoke(app, [*args, "--stream-unit", "block"])
    assert refused.exit_code == 2
    line = " ".join(refused.stderr.split())
    assert "unit streaming (evaluator.stream_unit: unit or --stream-unit unit)" in line, line
    assert "fewer levels: 7 (supernet.steps_each_side: 3 or --steps-each-side 3)" in line, line
    assert "16 actors, one device each (backend.workers: 16 or --workers 16)" in line, line
    for extra in (["--stream-unit", "unit"], ["--steps-each-side", "3"], ["--workers", "16"]):
        extra = extra if extra[0] == "--stream-unit" else ["--stream-unit", "block", *extra]
        assert runner.invoke(app, [*args, *extra]).exit_code == 0, extra


@pytest.mark.slow
def test_llama_405b_at_80gb_gets_a_remedy_that_fits(tmp_path):
    """Llama-3.1-405B does not fit one 80 GB device even unit streamed (its attention
    scores at 4096 tokens, 128 heads, and 17 slots of its 872 M-weight MLP projections);
    the refusal names the fewest actors that fit, and that change (option, or config
    key) re-plans to a fit, unit streamed."""
    runner = CliRunner()
    config = ROOT / "configs" / "llama3-8b-evopress.yaml"
    model = str(ROOT / "configs" / "models" / "llama-3.1-405b")
    args = ["plan", "--model", model, "--config", str(config)]
    args += ["--device-memory", "80GB", "--host-memory", "2TB"]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2
    line = " ".join(refused.stderr.split())
    assert "does not fit for `search`: streaming-unit execution needs " in line, line
    want = (
        "would fit: more workers: 64 actors, one device each (backend.workers: 64 or --workers 64)"
    )
    assert want in line, line
    fixed = runner.invoke(app, [*args, "--workers", "64"])
    assert fixed.exit_code == 0 and "- chosen: **streaming-unit**" in fixed.stdout
    run = yaml.safe_load(config.read_text())
    run["backend"]["workers"] = 64
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    args[args.index("--config") + 1] = str(path)
    assert runner.invoke(app, args).exit_code == 0


def test_queries_of_dp_evopress_are_evopress_stages_and_the_table_probe() -> None:
    """dp+evopress plans EvoPress's stages (12 children on 512 tokens, 3 survivors plus
    the parent on 2,048) and DP's probe query: 1 + blocks x sum(K_u - 1) candidates on
    the table's tokens (2 blocks, units of 9 and 3 levels: 1 + 2 x 10 = 21)."""
    from allocsearch import plan
    from allocsearch.config import config_from_dict

    layout = plan._Layout(params=(), unit_params=((), ()), unit_levels=(9, 3))
    settings = {"generations": 2, "offspring": 12, "survivors": [3, 1], "tokens": [512, 2048]}
    for strategy, expected in [
        ("dp+evopress", [(12, 512), (4, 2048), (5, 8192), (21, 1024)]),
        ("evopress", [(12, 512), (4, 2048)]),
        ("dp", [(21, 4096)]),
    ]:
        s = {**settings, "table_tokens": 1024} if strategy == "dp+evopress" else settings
        cfg = config_from_dict({"model": "demo", "search": {"strategy": strategy, "settings": s}})
        if strategy == "dp":
            cfg = config_from_dict({"model": "demo", "search": {"strategy": "dp"}})
        assert plan._queries(cfg, "search", 8192, layout, 2) == expected, strategy


def test_llama3_70b_unit_streaming_by_hand():
    """The 70B EvoPress plan at 80 GB, unit streamed, against hand formulas (bf16, 17
    levels, one actor; queries 64 x 2,048, 8 x 16,384 and 2 + 1 x 65,536 tokens; two
    4,096-token sequences per call)."""
    hf = load_hf_config(ROOT / "configs" / "models" / "llama-3-70b")
    cfg = load_config(ROOT / "configs" / "llama3-8b-evopress.yaml")
    kwargs = dict(device_kind="gpu", device_memory=parse_bytes("80GB"), host_memory=512 * 10**9)
    plan = plan_memory(hf, cfg, workers=1, **kwargs)
    assert plan.mode == "streaming-unit"
    actor = plan.modes["streaming-unit"][1]
    D, F, V, H, KV, HD = 8192, 28672, 128256, 64, 8, 128
    gate = F * D  # the largest unit group: one MLP projection, 17 level slots of bf16
    assert actor.device["variants"] == 3 * 17 * 2 * gate  # in use, next, next's slabs
    assert actor.host["variants"] == 2 * 17 * 2 * gate
    # embeddings, head and final norm; the q group's two norms, twice
    assert actor.device["model"] == 2 * (2 * V * D + D + 2 * 2 * D)
    states = 3 * 65536  # the last stage: 2 survivors and the parent on 65,536 tokens
    rows, T = 2, 4096
    carry = 2 * rows * T * D * 2
    norm_in = rows * T * D * (4 + 2)
    attn = rows * H * T * T * (8 + 2) + rows * T * (H + 2 * KV) * HD * 2 * 2 + norm_in
    logits = rows * T * V * (2 + 8)
    q_group = (D * D + 2 * D) * 2
    attention = states * (H + 2 * KV) * HD * 2 + q_group + carry + max(attn, logits)
    mlp = states * F * 2 + gate * 2 + carry + max(3 * rows * T * F * 2 + norm_in, logits)
    assert actor.device["activations"] == states * D * 2 + max(attention, mlp)
    assert actor.device["teacher"] == 8 * 1024 * 65536  # top-k KL rows of the last query
    device, _ = plan.need("streaming-unit")
    assert device == sum(actor.device.values()) < 0.9 * 80e9
