"""Time the block-streaming evaluator against the resident one on a random Llama.

    python scripts/bench_stream_vs_resident.py [--work /tmp/bench_svr] [--blocks 8]
        [--hidden 512] [--pruner sparsegpt] [--queries 4]

Builds (once, cached in ``--work``) a random Llama and a supernet of all its linear layers
(9 levels around 50%), loads the model lazily for the streaming evaluator, and scores
EvoPress-like queries (12 offspring of a parent, 1-3 units moved, a fresh minibatch of
``--fidelity`` tokens each) and random queries (no reuse) with both evaluators, after one warm-up
query each. Prints seconds per candidate, their ratio, compilations after the warm-up,
and the streaming evaluator's bytes read from the store per query over the bytes of the
distinct variants the query's candidates use. Ratios only, no verdicts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from jax import monitoring

from allocsearch.data.tokenset import TokenSet
from allocsearch.evaluate import Evaluator, KLDivergence, StreamingEvaluator
from allocsearch.models import HFModel, adapter_for_config, load_model, save_model
from allocsearch.pruners import MagnitudePruner, SparseGPTPruner
from allocsearch.supernet.build import build_supernet, supernet_units
from allocsearch.supernet.levels import equal_step_grid
from allocsearch.supernet.store import SupernetStore

SEQ_LEN, N_SEQ, FIDELITY, OFFSPRING = 128, 32, 2048, 12


def random_params(adapter, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in adapter.param_shapes.items():
        if "norm" in name:
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif "embed" in name:
            w = rng.standard_normal(shape)
        else:
            w = rng.uniform(-1.0, 1.0, size=shape) / np.sqrt(shape[-1])
        out[name] = w.astype(np.float32)
    return out


def prepare(work: Path, blocks: int, hidden: int, pruner: str):
    cfg = {
        "model_type": "llama",
        "vocab_size": 2048,
        "hidden_size": hidden,
        "intermediate_size": int(hidden * 2.75),
        "num_hidden_layers": blocks,
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64,
        "tie_word_embeddings": False,
    }
    model_dir, store_dir = work / "model", work / f"store-{pruner}"
    if not (model_dir / "config.json").exists():
        adapter = adapter_for_config(cfg)
        save_model(HFModel(adapter, random_params(adapter, 0)), model_dir, overwrite=True)
    tokens = np.random.default_rng(1).integers(0, 2048, (N_SEQ, SEQ_LEN)).astype(np.int32)
    calib = TokenSet(tokens, "random ids", "ids", 1)
    eager = load_model(model_dir)
    if not (store_dir / "manifest.json").exists():
        numel = [u.numel for u in supernet_units(eager.adapter, "unstructured")]
        grid = equal_step_grid(
            numel,
            center=0.5,
            step_weights=int(0.05 * np.mean(numel)),
            steps_each_side=4,
        )
        t = time.perf_counter()
        build_supernet(
            eager,
            calib,
            pruner=SparseGPTPruner() if pruner == "sparsegpt" else MagnitudePruner(),
            grid=grid,
            structure="unstructured",
            input_mode="dense",
            out_dir=store_dir,
            batch_size=8,
            progress=False,
            overwrite=True,
        )
        print(f"built {store_dir} in {time.perf_counter() - t:.1f} s")
    store = SupernetStore.open(store_dir)
    return eager, load_model(model_dir, lazy=True), calib, store


def offspring(spec, parent, rng) -> np.ndarray:
    out = np.tile(parent, (OFFSPRING, 1))
    for row in out:
        for u in rng.choice(spec.num_units, size=rng.integers(1, 4), replace=False):
            row[u] = rng.integers(0, spec.num_levels[u])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_svr"))
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--pruner", choices=["sparsegpt", "magnitude"], default="sparsegpt")
    ap.add_argument("--queries", type=int, default=4)
    ap.add_argument("--per-call", type=int, default=4)
    ap.add_argument("--fidelity", type=int, default=FIDELITY, help="tokens per query")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    eager, lazy, calib, store = prepare(args.work, args.blocks, args.hidden, args.pruner)
    spec = store.spec
    parent = spec.center.astype(np.int32)
    compiles: list[str] = []
    monitoring.register_event_duration_secs_listener(
        lambda e, d, **_: (
            compiles.append(e) if e == "/jax/core/compile/backend_compile_duration" else None
        )
    )
    common = dict(metric=KLDivergence(), candidates_per_call=args.per_call)
    before = len(compiles)
    t = time.perf_counter()
    resident = Evaluator(eager, spec, store.all_variants(), store.unit_params, calib, **common)
    t_res, c_res = time.perf_counter() - t, len(compiles) - before
    before = len(compiles)
    t = time.perf_counter()
    streamed = StreamingEvaluator(lazy, store, calib, **common)
    t_str, c_str = time.perf_counter() - t, len(compiles) - before
    results = {
        "construct_s": {"resident": t_res, "streaming": t_str},
        "construct_compiles": {"resident": c_res, "streaming": c_str},
    }
    shapes = lazy.adapter.param_shapes
    for kind in ("offspring", "random"):
        for name, ev in (("resident", resident), ("streaming", streamed)):
            rng = np.random.default_rng(0)
            ev.set_reference(parent if kind == "offspring" else None)
            ev.reuse = kind == "offspring"

            def query(seed, rng=rng, kind=kind):
                if kind == "offspring":
                    return offspring(spec, parent, rng)
                return rng.integers(0, spec.num_levels, (OFFSPRING, spec.num_units)).astype(
                    np.int32
                )

            before = len(compiles)
            ev(query(0), fidelity=args.fidelity, batch_seed=100)  # warm-up (compiles)
            warmup = len(compiles) - before
            before = len(compiles)
            t = time.perf_counter()
            ratios = []
            for q in range(args.queries):
                choices = query(q)
                ev(choices, fidelity=args.fidelity, batch_seed=q)
                if name == "streaming":
                    # bytes of the distinct (unit, level) variants the candidates use
                    used = sum(
                        len(np.unique(choices[:, u]))
                        * sum(int(np.prod(shapes[p])) for p in store.unit_params[u])
                        * 4
                        for u in range(spec.num_units)
                    )
                    ratios.append(ev.last_stats.store_bytes / used)
            dt = (time.perf_counter() - t) / (args.queries * OFFSPRING)
            results[f"{kind}/{name}"] = {
                "s_per_candidate": dt,
                "compiles_warmup": warmup,
                "compiles_after_warmup": len(compiles) - before,
            }
            if name == "streaming":
                results[f"{kind}/{name}"]["store_bytes_over_used"] = float(np.mean(ratios))
                results[f"{kind}/{name}"]["last_stats"] = ev.last_stats._asdict()
        res, st = results[f"{kind}/resident"], results[f"{kind}/streaming"]
        results[f"{kind}/ratio"] = st["s_per_candidate"] / res["s_per_candidate"]
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
