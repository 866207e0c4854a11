"""RTN vs GPTQ on the bundled demo model's real layer inputs: error and time per layer.

Captures every layer's input Gram matrix ``H`` block by block (dense weights, demo
calibration set), quantizes each layer at every bitwidth with RTN and GPTQ, and prints
per bitwidth the layer-input reconstruction error ``sqrt(tr(D H D^T) / tr(W H W^T))``
(``D = W - Q``; lower is better) as the median and worst over layers, the ratio GPTQ/RTN,
and the seconds each quantizer spent (the first GPTQ call per shape includes compiling).
Prints numbers, no verdicts.

    python scripts/bench_quantizers.py [--bits 2 3 4 8] [--group-size 128] [--asym]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import allocsearch.supernet  # noqa: F401  (first: models.streamed alone is a circular import)
from allocsearch.assets_paths import demo_model_dir
from allocsearch.data import demo_tokensets
from allocsearch.models.hf import load_model
from allocsearch.models.streamed import block_on_device, embed_program, outer_on_device
from allocsearch.pruners.base import accumulate_stats
from allocsearch.quantizers import GPTQQuantizer, RTNQuantizer


def layer_stats(n_seqs: int, seq_len: int) -> list[tuple[str, np.ndarray, object]]:
    """(layer name, weight float32[out, in], LayerStats) of every layer of the demo model."""
    model = load_model(demo_model_dir())
    adapter, params = model.adapter, model.params
    calibration, _ = demo_tokensets(seq_len, n_seqs, 0)
    ids = jnp.asarray(calibration.tokens)
    h, ctx = embed_program(adapter, outer_on_device(adapter, params), ids)
    capture = jax.jit(lambda p, h, c: adapter.block(p, h, c, capture=True))
    out = []
    layers = list(adapter.layers())
    for b in range(adapter.num_blocks):
        block_params = block_on_device(adapter, params, b)
        h_next, taps = capture(block_params, h, ctx)
        prefix = adapter.block_prefix(b)
        for layer in (x for x in layers if x.block == b):
            stats = accumulate_stats(None, taps[layer.input_group[len(prefix) :]])
            out.append((layer.name, np.asarray(params[layer.weight_name], np.float32), stats))
        h = h_next
    return out


def rel_error(w: np.ndarray, q: np.ndarray, hessian: np.ndarray) -> float:
    d = (w - q).astype(np.float64)
    h = np.asarray(hessian, np.float64)
    return float(np.sqrt(np.einsum("ij,jk,ik->", d, h, d) / np.einsum("ij,jk,ik->", w, h, w)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--n-seqs", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    sym = not args.asym
    quantizers = {
        "rtn": RTNQuantizer(group_size=args.group_size, symmetric=sym),
        "gptq": GPTQQuantizer(group_size=args.group_size, symmetric=sym),
    }
    layers = layer_stats(args.n_seqs, args.seq_len)
    errors = {name: np.zeros((len(layers), len(args.bits))) for name in quantizers}
    seconds = dict.fromkeys(quantizers, 0.0)
    for i, (_, w, stats) in enumerate(layers):
        for name, q in quantizers.items():
            t = time.perf_counter()
            v = q.quantize(w, stats, args.bits)
            seconds[name] += time.perf_counter() - t
            for k in range(len(args.bits)):
                errors[name][i, k] = rel_error(w, v.weights(k), stats.hessian)
    shapes = sorted({w.shape for _, w, _ in layers})
    print(
        f"demo model: {len(layers)} layers, shapes {shapes}, group {args.group_size}, "
        f"{'symmetric' if sym else 'asymmetric'}, {args.n_seqs}x{args.seq_len} tokens"
    )
    print("bits | rtn median (worst) | gptq median (worst) | gptq/rtn median (worst layer)")
    for k, b in enumerate(args.bits):
        r, g = errors["rtn"][:, k], errors["gptq"][:, k]
        ratio = g / r
        print(
            f"{b:4d} | {np.median(r):.4f} ({r.max():.4f}) | {np.median(g):.4f} "
            f"({g.max():.4f}) | {np.median(ratio):.3f} ({ratio.max():.3f})"
        )
    print(
        "seconds, all layers and bitwidths: "
        + ", ".join(f"{n} {s:.2f}" for n, s in seconds.items())
    )


if __name__ == "__main__":
    main()
