"""One GPU check: the evaluator in bfloat16 against the device's own yardsticks.

    python scripts/gpu_check.py [--work /tmp/gpu_check] [--tiny] [--levels 3]

Meant for one H100 in under 8 minutes (a random ~1 B-weight bf16 Llama, 16 blocks of hidden
2048, written once to ``--work``, with a dense-layout bf16 store of ``--levels`` levels per
linear); ``--tiny`` runs the same steps at toy sizes on any device (CPU: seconds), so the
script is known to work where no GPU is. Prints, as ``name: value`` lines:

* ``peak_tflops``: bf16 matmul throughput of one large square matmul (the device's peak as
  this run sees it);
* ``resident_vs_dense`` / ``streaming_vs_dense``: seconds per candidate of the resident and
  the block-streaming evaluator (random candidates, no reference reuse, ``--tokens``
  tokens) over the seconds of one dense bf16 forward of the same tokens (jit, logits);
* ``resident_peak_fraction`` / ``dense_peak_fraction``: their FLOP rates (2 x block
  weights x tokens, attention and head included) over ``peak_tflops``;
* ``prefetch_speedup``: streaming seconds per query without prefetch over with it;
  ``overlap``: the share of the smaller of transfer and compute hidden by the prefetch,
  ``(t_off - t_on) / min(t_transfer, t_compute)`` with ``t_transfer`` the query's bytes
  moved at the measured host-to-device bandwidth and ``t_compute = t_off - t_transfer``;
* ``evopress_s_per_generation``: 3 EvoPress generations (streaming, reuse on) on the model.

Ratios and seconds only; the verdict is the reader's. A GPU run's numbers go to
docs/RESULTS.md with the device named.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

FULL = dict(hidden=2048, ffn=5632, blocks=16, heads=16, kv=4, vocab=32000, seq=512, n_seq=16)
TINY = dict(hidden=32, ffn=64, blocks=2, heads=2, kv=1, vocab=64, seq=16, n_seq=4)


def llama_config(s: dict) -> dict:
    return {
        "model_type": "llama",
        "vocab_size": s["vocab"],
        "hidden_size": s["hidden"],
        "intermediate_size": s["ffn"],
        "num_hidden_layers": s["blocks"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv"],
        "tie_word_embeddings": False,
    }


def write_model_and_store(work: Path, s: dict, levels: int, calibration) -> tuple[Path, Path]:
    """A random bf16 Llama and a dense-layout bf16 store of ``levels`` levels per linear
    (level k zeroes the first (k + 1) / (levels + 1) of the weights: values do not matter
    for speed), written once."""
    from allocsearch.models import HFModel, adapter_for_config, save_model
    from allocsearch.pruners import DenseVariants
    from allocsearch.supernet.build import supernet_units
    from allocsearch.supernet.levels import LevelGrid
    from allocsearch.supernet.store import StoreWriter, make_spec

    model_dir, store_dir = work / "model", work / "store"
    if (store_dir / "manifest.json").exists():
        return model_dir, store_dir
    adapter = adapter_for_config(llama_config(s))
    rng = np.random.default_rng(0)
    params = {}
    for name, shape in adapter.param_shapes.items():
        scale = 0.0 if "norm" in name else 1.0 / np.sqrt(shape[-1])
        x = rng.standard_normal(shape, np.float32) * np.float32(scale) + ("norm" in name)
        params[name] = x.astype(ml_dtypes.bfloat16)
    model = HFModel(adapter, params)
    save_model(model, model_dir, dtype="bfloat16", overwrite=True)
    units = supernet_units(adapter, "unstructured")
    fractions = (np.arange(levels) + 1) / (levels + 1)
    sparsity = np.empty((len(units), levels))
    with StoreWriter(store_dir, storage_dtype="bfloat16", layout="dense") as writer:
        for u, unit in enumerate(units):
            name = unit.layers[0] + ".weight"
            w = params[name].reshape(-1)
            stack = np.repeat(w[None], levels, axis=0)
            for k, f in enumerate(fractions):
                stack[k, : int(f * w.size)] = 0
            sparsity[u] = [int(f * w.size) / w.size for f in fractions]
            weights = stack.reshape(levels, *params[name].shape)
            writer.add(name, DenseVariants(weights=weights, sparsity=sparsity[u].copy()))
        valid = np.ones_like(sparsity, bool)
        center = np.full(len(units), levels // 2, np.int32)
        writer.commit(
            spec=make_spec(units, sparsity, valid, center, "unstructured", None),
            unit_params=[[u.layers[0] + ".weight"] for u in units],
            grid=LevelGrid(sparsity, valid, center),
            model_fingerprint=model.fingerprint,
            tokens_fingerprint=calibration.fingerprint,
            pruner={"name": "gpu-check-standin", "nested": False, "params": {}},
            input_mode="dense",
        )
    return model_dir, store_dir


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` (results blocked on) after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def matmul_peak(n: int) -> float:
    """bf16 FLOP/s of an n x n matmul (x 8 chained, so launch overhead does not count)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)

    @jax.jit
    def chain(x):
        for _ in range(8):
            x = (x @ a) * jnp.bfloat16(1.0 / np.sqrt(n))
        return x

    return 8 * 2 * n**3 / timed(lambda: chain(a), 5)


def forward_flops(s: dict, tokens: int) -> float:
    """FLOPs of one forward of ``tokens`` tokens: the linears, attention scores and
    values (2 T^2 d per head pair of matmuls, causal counted in full) and the head."""
    d, f, hd = s["hidden"], s["ffn"], s["hidden"] // s["heads"]
    linear = d * d * 2 + 2 * d * s["kv"] * hd + 3 * d * f
    attn = 2 * 2 * s["seq"] * s["hidden"]  # per token: scores and values
    return 2.0 * tokens * (s["blocks"] * linear + s["vocab"] * d) + s["blocks"] * tokens * attn


def dense_forward_seconds(model, calibration, tokens: int) -> float:
    adapter, params = model.adapter, model.params
    ids = jnp.asarray(calibration.tokens[: tokens // calibration.seq_len])
    forward = jax.jit(adapter.forward)
    return timed(lambda: forward(params, ids), 3)


def h2d_bandwidth(nbytes: int) -> float:
    host = np.ones(nbytes // 2, ml_dtypes.bfloat16)
    return nbytes / timed(lambda: jax.device_put(host), 3)


def per_candidate(ev, spec, tokens: int, n: int = 4) -> tuple[float, object]:
    """Median seconds per candidate of ``n`` random candidates on ``tokens`` tokens, and
    the evaluator's stats of the last call."""
    rng = np.random.default_rng(0)
    c = rng.integers(0, spec.num_levels, size=(n, spec.num_units)).astype(np.int32)
    seconds = timed(lambda: ev(c, fidelity=tokens, batch_seed=0), 2)
    return seconds / n, ev.last_stats


def evopress_seconds(ev, spec, tokens: int) -> float:
    """Seconds per generation of 3 EvoPress generations (8 children, 2 then 1 survivors)."""
    from allocsearch.distributed.local import run_search
    from allocsearch.search.budget import Budget
    from allocsearch.search.evolutionary import EvolutionarySearcher

    searcher = EvolutionarySearcher(
        generations=3, offspring=8, survivors=(2, 1), tokens=(tokens // 4, tokens)
    )
    budget = Budget(kind="params", target=0.5)
    t0 = time.perf_counter()
    run_search(searcher, ev, spec, budget, key=jax.random.key(0))
    return (time.perf_counter() - t0) / 3


def main() -> None:
    from allocsearch.data.tokenset import TokenSet
    from allocsearch.evaluate import Evaluator, KLDivergence, StreamingEvaluator
    from allocsearch.models import load_model
    from allocsearch.supernet.store import SupernetStore

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu_check"))
    parser.add_argument("--tiny", action="store_true", help="toy sizes (CPU, seconds)")
    parser.add_argument("--levels", type=int, default=3)
    args = parser.parse_args()
    s = TINY if args.tiny else FULL
    work = args.work / ("tiny" if args.tiny else "full")
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, s["vocab"], (s["n_seq"], s["seq"]), dtype=np.int32)
    calib = TokenSet(tokens=ids, source="random ids", tokenizer_identity="ids", seed=0)
    tokens = calib.n_tokens // 2
    out: dict[str, float | str] = {"device": jax.devices()[0].device_kind}
    t0 = time.perf_counter()
    peak = matmul_peak(256 if args.tiny else 8192)
    out["peak_tflops"] = peak / 1e12
    model_dir, store_dir = write_model_and_store(work, s, args.levels, calib)
    out["setup_s"] = time.perf_counter() - t0
    eager = load_model(model_dir, dtype="bfloat16")
    out["weights_b"] = sum(int(np.prod(v.shape)) for v in eager.params.values()) / 1e9
    store = SupernetStore.open(store_dir)
    spec = store.spec
    dense_s = dense_forward_seconds(eager, calib, tokens)
    flops = forward_flops(s, tokens)
    out["dense_peak_fraction"] = flops / dense_s / peak
    common = dict(metric=KLDivergence(), micro_batch_tokens=tokens, reuse=False)
    resident = Evaluator(eager, spec, store.host_variants(), store.unit_params, calib, **common)
    res_s, _ = per_candidate(resident, spec, tokens)
    out["resident_vs_dense"] = res_s / dense_s
    out["resident_peak_fraction"] = flops / res_s / peak
    del resident
    lazy = load_model(model_dir, dtype="bfloat16", lazy=True)
    times, moved = {}, 0
    for prefetch in (True, False):
        ev = StreamingEvaluator(lazy, store, calib, prefetch=prefetch, **common)
        times[prefetch], stats = per_candidate(ev, spec, tokens)
        moved = stats.transfer_bytes
        ev.close()
    out["streaming_vs_dense"] = times[True] / dense_s
    out["prefetch_speedup"] = times[False] / times[True]
    n = 4  # candidates per query in per_candidate
    t_on, t_off = n * times[True], n * times[False]
    t_transfer = moved / h2d_bandwidth(min(max(moved, 2**20), 2**29))
    t_compute = max(t_off - t_transfer, 1e-9)
    out["h2d_gb_per_s"] = moved / max(t_transfer, 1e-12) / 1e9
    out["overlap"] = (t_off - t_on) / max(min(t_transfer, t_compute), 1e-12)
    stream = StreamingEvaluator(
        lazy, store, calib, metric=KLDivergence(), micro_batch_tokens=tokens
    )
    out["evopress_s_per_generation"] = evopress_seconds(stream, spec, calib.n_tokens)
    stream.close()
    out["total_s"] = time.perf_counter() - t0
    for key, value in out.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    (work / "gpu_check.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
