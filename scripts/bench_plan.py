"""The memory plan against measured peaks: building and using the resident evaluator on CPU.

    python scripts/bench_plan.py [--work /tmp/bench_plan] [--models demo,20M,60M,150M]
        [--execution resident|streaming|both]

For each model (the bundled demo model, and random Llamas of about 20M, 60M and 150M
parameters with a byte vocabulary, written to ``--work``), a supernet store of random
levels is written directly with the store writer (dense SparseGPT-layout variants or
nested magnitude-layout ranks; the values do not matter for memory). Then, in a fresh
process per model, the peak *anonymous* memory (RssAnon, sampled every millisecond; the
store's memory-mapped pages are page cache, not counted) is measured over: loading the
model and token sets, opening the store, building the evaluator (stacks, teacher data),
and scoring one EvoPress generation (8 candidates at 512 tokens, 2 + 1 at the whole
calibration set of 64 x 128 tokens (24 x 128 for the bf16 150M model), reference reuse
on). The plan's estimate of that process
(:func:`allocsearch.plan.plan_memory`, resident, local backend, CPU device: everything in
host memory) is printed next to it, with the ratio plan / measured (target: within 15%).

The baseline is the process after importing allocsearch and running one small JAX
computation (the XLA runtime's own memory is not the plan's). Ratios and measurements
only; the verdict is the reader's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

MODELS = {
    # name: (config.json overrides, dtype, store kind, levels); calibration: CALIBRATION
    "demo": (None, "float32", "dense", 9),
    "20M": (dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=7,
                 num_attention_heads=8, num_key_value_heads=2), "float32", "dense", 5),
    "60M": (dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=10,
                 num_attention_heads=12, num_key_value_heads=4), "float32", "nested", 9),
    "150M": (dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=13,
                  num_attention_heads=16, num_key_value_heads=4), "bfloat16", "dense", 3),
    # a Qwen3-MoE: 16 experts (top-4) of width 256 per block, sorted dispatch when scoring
    "moe-25M": (dict(model_type="qwen3_moe", hidden_size=512, intermediate_size=1024,
                     moe_intermediate_size=256, num_experts=16, num_experts_per_tok=4,
                     norm_topk_prob=True, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=64), "float32", "nested", 5),
}  # fmt: skip
CALIBRATION = {"150M": 24}  # sequences of 128 tokens (default 64); bf16 on CPU is slow
BASE_CONFIG = {
    "model_type": "llama",
    "vocab_size": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}


def run_config(name: str, model_dir: Path) -> dict:
    """The run: one EvoPress generation (8 candidates at 512 tokens, then 2 survivors and
    the parent on the whole calibration set), full-vocabulary KL, in process."""
    n_seqs = CALIBRATION.get(name, 64)
    settings = {"offspring": 8, "survivors": [2, 1], "tokens": [512, 128 * n_seqs]}
    return {
        "model": str(model_dir),
        "dtype": MODELS[name][1],
        "data": {"calibration": "demo", "seq_len": 128, "n_calibration_seqs": n_seqs},
        "search": {"strategy": "evopress", "settings": {"generations": 1, **settings}},
        "evaluator": {"metric": "kl"},
        "backend": {"kind": "local"},
    }


# ----------------------------------------------------------------------------- setup


def write_model(name: str, work: Path) -> Path:
    """The model directory of ``name`` (the demo's own, or a random Llama written once)."""
    from allocsearch.assets_paths import demo_model_dir

    overrides = MODELS[name][0]
    if overrides is None:
        return demo_model_dir()
    path = work / f"model-{name}"
    if (path / "config.json").exists():
        return path
    import jax

    from allocsearch.models import HFModel, adapter_for_config, save_model

    adapter = adapter_for_config({**BASE_CONFIG, **overrides})
    params = adapter.init_params(jax.random.key(0))
    save_model(HFModel(adapter, params), path, dtype=MODELS[name][1])
    return path


def write_store(name: str, work: Path, model_dir: Path) -> Path:
    """A store of random levels for the model (sparsities 0.1 .. 0.9 in ``k`` steps)."""
    path = work / f"store-{name}"
    if (path / "manifest.json").exists():
        return path
    from allocsearch import pipeline
    from allocsearch.config import config_from_dict
    from allocsearch.pruners.base import DenseVariants, NestedVariants
    from allocsearch.supernet.build import supernet_units
    from allocsearch.supernet.levels import LevelGrid
    from allocsearch.supernet.store import StoreWriter, make_spec

    _, dtype, kind, k = MODELS[name]
    ws = pipeline.load_workspace(config_from_dict(run_config(name, model_dir)))
    units = supernet_units(ws.model.adapter, "unstructured")
    sparsity = np.zeros((len(units), k))
    with StoreWriter(path, storage_dtype=dtype) as writer:
        for u, unit in enumerate(units):
            name_w = unit.layers[0] + ".weight"
            dense = np.asarray(ws.model.params[name_w])
            fractions = np.linspace(0.1, 0.9, k)
            counts = np.array([round(f * dense.size) for f in fractions])
            sparsity[u] = counts / dense.size
            if kind == "nested":
                rank = np.arange(dense.size, dtype=np.int32).reshape(dense.shape)
                v = NestedVariants(rank, False, counts.astype(np.int32), sparsity[u].copy())
            else:
                w = np.repeat(dense[None], k, axis=0).reshape(k, -1)
                for j, c in enumerate(counts):
                    w[j, :c] = 0
                v = DenseVariants(w.reshape(k, *dense.shape), sparsity[u].copy(), None)
            writer.add(name_w, v)
        valid = np.ones_like(sparsity, bool)
        center = np.full(len(units), k // 2, np.int32)
        spec = make_spec(units, sparsity, valid, center, "unstructured", None)
        writer.commit(
            spec=spec,
            unit_params=[[u.layers[0] + ".weight"] for u in units],
            grid=LevelGrid(sparsity, valid, center),
            model_fingerprint=ws.model.fingerprint,
            tokens_fingerprint=ws.calibration.fingerprint,
            pruner={"name": f"random-{kind}", "nested": kind == "nested"},
            input_mode="dense",
        )
    return path


# ----------------------------------------------------------------------------- measure


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


class PeakSampler:
    """Highest RssAnon seen by a thread sampling /proc/self/status every ``period`` s."""

    def __init__(self, period: float = 0.001):
        self.period, self.peak, self._stop = period, _status("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status("RssAnon"))
            time.sleep(self.period)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status("RssAnon"))


def measure(name: str, model_dir: Path, store: Path, execution: str = "resident") -> dict:
    """In this (fresh) process: peak RssAnon growth of the evaluator's life. Streaming
    loads the model lazily (read from the safetensors mmap on access), as it is meant to."""
    import jax
    import jax.numpy as jnp

    from allocsearch import pipeline
    from allocsearch.config import config_from_dict
    from allocsearch.plan import load_hf_config, plan_memory

    dtype = MODELS[name][1]
    cfg = config_from_dict(run_config(name, model_dir))
    jnp.ones(8).sum().block_until_ready()
    plan = plan_memory(
        load_hf_config(model_dir),
        cfg,
        model=name,
        device_kind="cpu",
        device_memory=2**40,
        host_memory=2**40,
        store=store,
    )
    baseline = _status("RssAnon")
    t0 = time.perf_counter()
    with PeakSampler() as sampler:
        if execution == "streaming":
            from allocsearch.models.hf import load_model

            model = load_model(model_dir, dtype=dtype, lazy=True)
            ws = pipeline.Workspace(cfg, model, *pipeline.load_tokensets(cfg.data, model))
        else:
            ws = pipeline.load_workspace(cfg)
        st = pipeline.open_store(ws, store)
        ev = pipeline.make_evaluator(ws, st, execution=execution)
        rng = np.random.default_rng(0)
        center = np.asarray(st.spec.center)
        levels = st.spec.num_levels
        for n, tokens in ((8, 512), (3, ws.calibration.n_tokens)):
            c = np.repeat(center[None], n, axis=0)
            for row in c[1:]:
                u = rng.integers(len(center), size=2)
                row[u] = np.minimum(row[u] + 1, levels[u] - 1)
            jax.block_until_ready(ev(c.astype(np.int32), fidelity=tokens, batch_seed=0))
    seconds = time.perf_counter() - t0
    measured = sampler.peak - baseline
    device, host = plan.modes[execution][0].device, plan.modes[execution][0].host
    planned = plan.need(execution)[1]
    return {
        "model": name,
        "execution": execution,
        "params": sum(int(np.prod(v.shape)) for v in ws.model.params.values()),
        "store_kind": MODELS[name][2],
        "levels": int(MODELS[name][3]),
        "dtype": dtype,
        "measured": measured,
        "planned": planned,
        "ratio": planned / measured,
        "breakdown": {k: device.get(k, 0) + host.get(k, 0) for k in device},
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_plan"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument(
        "--execution", default="resident", help="resident | streaming | both (evaluators)"
    )
    parser.add_argument("--child", nargs=4, metavar=("NAME", "MODEL", "STORE", "EXECUTION"))
    args = parser.parse_args()
    if args.child:
        name, model_dir, store, execution = args.child
        print(json.dumps(measure(name, Path(model_dir), Path(store), execution)))
        return
    modes = ["resident", "streaming"] if args.execution == "both" else [args.execution]
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        model_dir = write_model(name, args.work)
        store = write_store(name, args.work, model_dir)
        for execution in modes:
            out = subprocess.run(
                [sys.executable, __file__, "--child", name, str(model_dir), str(store), execution],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "JAX_PLATFORMS": "cpu"},
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    mib = 2**20
    print(
        "\n| model | params | store | evaluator | measured peak (MiB) | plan (MiB) "
        "| plan / measured |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['params'] / 1e6:.1f} M {r['dtype']} | {r['store_kind']}, "
            f"{r['levels']} levels | {r['execution']} | {r['measured'] / mib:,.0f} | "
            f"{r['planned'] / mib:,.0f} | {r['ratio']:.2f} |"
        )


if __name__ == "__main__":
    main()
