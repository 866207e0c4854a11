"""Out-of-core search: a random Llama with >= 1B prunable weights and a dense-variant store
larger than this machine's RAM, searched for a few EvoPress generations by the streaming
evaluator on a Ray actor.

    python scripts/bench_streaming.py --work /tmp/bigrun [--blocks 24] [--levels 13]
        [--generations 3] [--offspring 4] [--tokens 512] [--streaming block|unit|both]

Phase 1 (skipped when --work already holds them): writes a random bfloat16 Llama
(hidden 2048, SwiGLU 5632, 32 query / 4 kv heads, vocabulary 8192; 44.0 M prunable weights
per block, so 24 blocks = 1.057 B) and a supernet store of dense (SparseGPT-layout) bf16
variants: level k of a layer zeroes its smallest-magnitude weights at sparsity
0.2 + 0.05 k (a stand-in for SparseGPT's weights: the benchmark measures memory, bytes
and time, which do not depend on the values). 13 levels give a 27.5 GB store, more than
the 23 GiB of RAM here, so the page cache cannot hold it.

Phase 2 prints, in one run:
* peak anonymous memory (RssAnon high-water, sampled) of the driver and of the actor;
* time per candidate over a dense forward of the same model streamed the same way;
* bytes read per generation over the bytes of the distinct variants the generation used.
With ``--streaming both`` the same search runs block streamed, then unit streamed (one
unit group's variants on the device at a time), each in a fresh actor, and the run also
prints unit over block: actor peak, time per candidate, store bytes read, and each mode's
peak as the memory plan (``allocsearch.plan``, CPU device) predicts it over the measured.
Ratios and measurements only; the targets are in docs/RESULTS.md ("Scale").
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 8192
SEQ_LEN = 256


def llama_config(blocks: int, hidden: int = HIDDEN, ffn: int = FFN) -> dict:
    """config.json of the random model (bfloat16, untied head; head_dim 64)."""
    heads = hidden // 64
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": blocks,
        "num_attention_heads": heads,
        "num_key_value_heads": heads // (HEADS // KV_HEADS),
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
    }


def write_model(path: Path, blocks: int, seed: int = 0, hidden: int = HIDDEN, ffn: int = FFN):
    """A random bf16 Llama in ``path`` (config.json + model.safetensors)."""
    from allocsearch.models import adapter_for_config
    from allocsearch.models.safetensors_io import write_safetensors

    cfg = llama_config(blocks, hidden, ffn)
    adapter = adapter_for_config(cfg)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in adapter.param_shapes.items():
        if name.endswith("norm.weight"):
            tensors[name] = np.ones(shape, ml_dtypes.bfloat16)
        else:
            std = 0.02 if "embed" in name or "lm_head" in name else 1.0 / np.sqrt(shape[-1])
            x = rng.standard_normal(shape, np.float32) * np.float32(std)
            tensors[name] = x.astype(ml_dtypes.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / "model.safetensors", tensors, {"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=1))


def write_store(model_dir: Path, store_dir: Path, levels: int, calibration) -> None:
    """A dense-layout bf16 store of ``levels`` magnitude levels per layer (see module doc)."""
    from allocsearch.models import load_model
    from allocsearch.pruners import DenseVariants
    from allocsearch.supernet.build import supernet_units
    from allocsearch.supernet.levels import LevelGrid
    from allocsearch.supernet.store import StoreWriter, make_spec

    model = load_model(model_dir, dtype="bfloat16")
    units = supernet_units(model.adapter, "unstructured")
    targets = 0.2 + 0.05 * np.arange(levels)
    sparsity = np.empty((len(units), levels))
    rng = np.random.default_rng(1)
    writer_kwargs = {"storage_dtype": "bfloat16"}
    if "layout" in StoreWriter.__init__.__code__.co_varnames:
        writer_kwargs["layout"] = "dense"
    with StoreWriter(store_dir, **writer_kwargs) as writer:
        for u, unit in enumerate(units):
            name = unit.layers[0] + ".weight"
            w = np.asarray(model.params[name])
            mag = np.abs(w.astype(np.float32))
            sample = rng.choice(mag.reshape(-1), size=min(mag.size, 1 << 20), replace=False)
            stack = np.empty((levels, *w.shape), ml_dtypes.bfloat16)
            for k, s in enumerate(targets):
                keep = mag > np.quantile(sample, s)
                stack[k] = np.where(keep, w, np.zeros((), w.dtype))
                sparsity[u, k] = 1.0 - keep.mean()
            writer.add(name, DenseVariants(weights=stack, sparsity=sparsity[u].copy()))
            print(f"  store: {u + 1}/{len(units)} {name}", flush=True)
        valid = np.ones_like(sparsity, bool)
        center = np.full(len(units), levels // 2, np.int32)
        spec = make_spec(units, sparsity, valid, center, "unstructured", None)
        writer.commit(
            spec=spec,
            unit_params=[[u.layers[0] + ".weight"] for u in units],
            grid=LevelGrid(targets[None].repeat(len(units), 0), valid, center),
            model_fingerprint=model.fingerprint,
            tokens_fingerprint=calibration.fingerprint,
            pruner={"name": "magnitude-dense-standin", "nested": False, "params": {}},
            input_mode="dense",
        )


def random_calibration(n_tokens: int, seed: int = 0):
    from allocsearch.data.tokenset import TokenSet

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (n_tokens // SEQ_LEN, SEQ_LEN), dtype=np.int32)
    return TokenSet(tokens=tokens, source="random tokens", tokenizer_identity="ids", seed=seed)


class AnonPeak:
    """Samples RssAnon of a process (pid) every 50 ms; ``peak`` in bytes."""

    def __init__(self, pid: int | None = None):
        self.pid = pid or os.getpid()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.now())
            except OSError:
                return
            time.sleep(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the model and store")
    ap.add_argument("--blocks", type=int, default=24)
    ap.add_argument("--levels", type=int, default=13)
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--offspring", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512, help="calibration tokens per query")
    ap.add_argument("--dtype", default="float32", help="compute dtype of the evaluator")
    ap.add_argument("--hidden", type=int, default=HIDDEN, help="hidden size (heads of 64)")
    ap.add_argument("--ffn", type=int, default=FFN, help="MLP width")
    ap.add_argument("--target", type=float, default=0.5, help="fraction of weights removed")
    ap.add_argument(
        "--streaming",
        default="block",
        choices=("block", "unit", "both"),
        help="what the evaluator holds at a time: a block's variants, one unit group's, or "
        "both in turn (the same search; prints unit / block ratios)",
    )
    args = ap.parse_args()

    model_dir, store_dir = args.work / "model", args.work / "store"
    calibration = random_calibration(max(args.tokens, 4 * SEQ_LEN))
    if not (model_dir / "model.safetensors").exists():
        t = time.perf_counter()
        write_model(model_dir, args.blocks, hidden=args.hidden, ffn=args.ffn)
        print(f"model written in {time.perf_counter() - t:.0f} s", flush=True)
    if not (store_dir / "manifest.json").exists():
        t = time.perf_counter()
        write_store(model_dir, store_dir, args.levels, calibration)
        print(f"store written in {time.perf_counter() - t:.0f} s", flush=True)
    run(args, model_dir, store_dir, calibration)


def io_read_bytes(pid: int) -> int:
    """Bytes the process caused to be read from storage (page-cache misses included)."""
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


class StreamingActor:
    """The scoring process: a lazily loaded model and the store, streamed per query."""

    def __init__(self, model_dir: str, store_dir: str, tokens: np.ndarray, dtype: str, unit: str):
        from allocsearch.data.tokenset import TokenSet
        from allocsearch.evaluate.metrics import KLDivergence
        from allocsearch.evaluate.streaming import StreamingEvaluator
        from allocsearch.models import load_model
        from allocsearch.supernet.store import SupernetStore

        t = time.perf_counter()
        self.calibration = TokenSet(
            tokens=tokens, source="random tokens", tokenizer_identity="ids", seed=0
        )
        self.model = load_model(model_dir, dtype=dtype, lazy=True)
        self.store = SupernetStore.open(
            store_dir,
            model_fingerprint=self.model.fingerprint,
            tokens_fingerprint=self.calibration.fingerprint,
        )
        self.evaluator = StreamingEvaluator(
            self.model, self.store, self.calibration, metric=KLDivergence(), stream_unit=unit
        )
        self.setup_s = time.perf_counter() - t

    def pid(self) -> int:
        return os.getpid()

    def info(self) -> dict:
        return {"setup_s": self.setup_s, "store_bytes_on_disk": self.store.num_bytes}

    def evaluate(self, choices: np.ndarray, fidelity: int, batch_seed: int):
        t = time.perf_counter()
        scores = self.evaluator(choices, fidelity=fidelity, batch_seed=batch_seed)
        stats = self.evaluator.last_stats._asdict()
        return scores, stats, time.perf_counter() - t

    def dense_forward(self, fidelity: int, batch_seed: int) -> float:
        """Seconds of a dense forward (NLL) of the same model on the same minibatch,
        streamed block by block from the same memory-mapped weights."""
        from allocsearch.models.streamed import streamed_nll_sum

        rows = self.evaluator.minibatch_rows(fidelity, batch_seed)
        tokens = self.calibration.tokens[rows]
        t = time.perf_counter()
        streamed_nll_sum(self.model.adapter, self.model.params, tokens, batch_rows=len(rows))
        return time.perf_counter() - t


def run(args, model_dir: Path, store_dir: Path, calibration) -> None:
    import ray

    modes = ("block", "unit") if args.streaming == "both" else (args.streaming,)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    out = {}
    for mode in modes:
        print(f"--- {mode} streaming", flush=True)
        out[mode] = run_mode(args, mode, model_dir, store_dir, calibration)
    ray.shutdown()
    for mode, r in out.items():
        print(
            f"{mode}: actor peak RssAnon in the search {r['actor'] / 2**30:.2f} GiB (plan "
            f"{r['plan'] / 2**30:.2f} GiB, plan / measured {r['plan'] / r['actor']:.3f}), "
            f"time per candidate {r['per_candidate']:.3f} s, store bytes read "
            f"{r['read'] / 2**30:.3f} GiB; peak after construction {r['built'] / 2**30:.2f} GiB"
        )
    if len(out) == 2:
        u, b = out["unit"], out["block"]
        print(
            f"unit / block: actor peak {u['actor'] / b['actor']:.3f}, time per candidate "
            f"{u['per_candidate'] / b['per_candidate']:.3f}, store bytes read "
            f"{u['read'] / b['read']:.3f}, scores equal: {u['scores'] == b['scores']}"
        )


def planned_actor(args, mode: str, model_dir: Path, store_dir: Path, calibration) -> int:
    """The memory plan's bytes of the scoring actor on this CPU device (its device and
    host bytes; this run's search as a config)."""
    from allocsearch.config import config_from_dict
    from allocsearch.plan import load_hf_config, plan_memory

    cfg = config_from_dict(
        {
            "model": str(model_dir),
            "dtype": args.dtype,
            "data": {"seq_len": SEQ_LEN, "n_calibration_seqs": calibration.n_seq},
            "search": {
                "strategy": "evopress",
                "settings": {
                    "offspring": args.offspring,
                    "survivors": [1],
                    "tokens": [args.tokens],
                    "generations": args.generations,
                },
            },
            "evaluator": {"metric": "kl", "execution": "streaming", "stream_unit": mode},
            "backend": {"kind": "ray", "workers": 1},
        }
    )
    plan = plan_memory(
        load_hf_config(model_dir), cfg, store=store_dir, device_kind="cpu",
        device_memory=2**50, host_memory=2**50, execution="streaming", workers=1,
    )  # fmt: skip
    actor = plan.modes[plan.mode][-1]
    return actor.device_total + actor.host_total


def run_mode(args, mode: str, model_dir: Path, store_dir: Path, calibration) -> dict:
    import jax
    import ray

    from allocsearch.distributed.local import run_search
    from allocsearch.search.budget import Budget
    from allocsearch.search.evolutionary import EvolutionarySearcher
    from allocsearch.supernet.store import SupernetStore

    driver_peak = AnonPeak()
    spec = SupernetStore.open(store_dir, verify="none").spec
    actor = (
        ray.remote(StreamingActor)
        .options(num_cpus=os.cpu_count())
        .remote(str(model_dir), str(store_dir), calibration.tokens, args.dtype, mode)
    )
    pid = ray.get(actor.pid.remote())
    actor_peak = AnonPeak(pid)
    info = ray.get(actor.info.remote())
    time.sleep(0.2)
    built = actor_peak.peak
    print(
        f"actor ready in {info['setup_s']:.1f} s (teacher computed, streamed); RssAnon peak "
        f"so far {built / 2**30:.2f} GiB",
        flush=True,
    )

    unit_bytes = np.array([u.numel for u in spec.units], np.float64) * 2  # bf16 variants
    calls: list[dict] = []

    def evaluate(choices, *, fidelity, batch_seed):
        before = io_read_bytes(pid)
        scores, stats, wall = ray.get(
            actor.evaluate.remote(np.asarray(choices), fidelity, batch_seed)
        )
        calls.append(
            {
                "choices": np.asarray(choices),
                "stats": stats,
                "wall": wall,
                "disk": io_read_bytes(pid) - before,
                "fidelity": fidelity,
                "batch_seed": batch_seed,
            }
        )
        return scores

    generation_rows = []

    def on_generation(state) -> None:
        done = sum(len(r["calls"]) for r in generation_rows)
        gen = calls[done:]
        chosen = np.concatenate([c["choices"] for c in gen])
        distinct = sum(len(np.unique(chosen[:, u])) * unit_bytes[u] for u in range(spec.num_units))
        read = sum(c["stats"]["store_bytes"] for c in gen)
        generation_rows.append(
            {
                "calls": gen,
                "candidates": len(chosen),
                "read": read,
                "disk": sum(c["disk"] for c in gen),
                "distinct": distinct,
                "wall": sum(c["wall"] for c in gen),
            }
        )
        print(
            f"generation {len(generation_rows)}: {len(chosen)} candidates, "
            f"{generation_rows[-1]['wall']:.1f} s, store bytes read {read / 2**30:.2f} GiB over "
            f"distinct variants used {distinct / 2**30:.2f} GiB = {read / distinct:.3f}",
            flush=True,
        )

    searcher = EvolutionarySearcher(
        generations=args.generations,
        offspring=args.offspring,
        survivors=(1,),
        tokens=(args.tokens,),
    )
    budget = Budget(kind="params", target=args.target)
    t = time.perf_counter()
    result = run_search(
        searcher, evaluate, spec, budget, key=jax.random.key(0), on_generation=on_generation
    )
    search_s = time.perf_counter() - t
    time.sleep(0.2)
    searched = actor_peak.peak  # the search's peak, before the dense forwards below
    per_candidate = [c["wall"] / len(c["choices"]) for c in calls]
    dense = [ray.get(actor.dense_forward.remote(args.tokens, c["batch_seed"])) for c in calls[:3]]
    actor_anon, driver_anon = actor_peak.stop(), driver_peak.stop()
    reads = [r["read"] / r["distinct"] for r in generation_rows]
    print()
    print(
        f"model: {spec.num_units} units, {int(sum(u.numel for u in spec.units)):,} prunable "
        f"weights; store {info['store_bytes_on_disk'] / 2**30:.1f} GiB on disk; "
        f"RAM {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"
    )
    print(
        f"search: {args.generations} generations x {args.offspring} offspring on "
        f"{args.tokens} tokens, {result.evaluations} evaluations, {search_s:.0f} s"
    )
    print(
        f"peak RssAnon: driver {driver_anon / 2**30:.2f} GiB, actor {actor_anon / 2**30:.2f} GiB "
        f"(until the search ended: {searched / 2**30:.2f} GiB; the dense forwards after it "
        "load whole blocks)"
    )
    print(
        f"time per candidate {np.median(per_candidate):.2f} s (median of {len(calls)} calls); "
        f"dense streamed forward {np.median(dense):.2f} s; ratio "
        f"{np.median(per_candidate) / np.median(dense):.3f}"
    )
    print(
        "store bytes read / distinct variant bytes per generation: "
        + ", ".join(f"{x:.3f}" for x in reads)
        + "; disk read_bytes per generation (GiB): "
        + ", ".join(f"{r['disk'] / 2**30:.2f}" for r in generation_rows)
    )
    ray.kill(actor)
    return {
        "actor": searched,
        "built": built,
        "plan": planned_actor(args, mode, model_dir, store_dir, calibration),
        "per_candidate": float(np.median(per_candidate)),
        "read": sum(r["read"] for r in generation_rows),
        "scores": (result.best_choice.tolist(), float(result.best_fitness)),
    }


if __name__ == "__main__":
    main()
