"""Benchmark the supernet store: open time, first read (digest included) and bytes on disk
per layout and storage dtype, on a synthetic store of random SparseGPT-like variants.

Every parameter is a [K, out, in] stack of random float32 weights with level k's entries
zeroed at random (unstructured, not nested, like SparseGPT's) at the grid's sparsities.
The same variants are written to three stores (in a temporary directory, deleted at the
end): dense float32 (about ``--gb`` GB: the store the timings are taken on), dense
bfloat16 and packed bfloat16. Timings are on a warm page cache (the files were just
written); a cold cache adds the disk's read time to first reads, not to opening.

Usage::

    python scripts/bench_store.py              # about 2 GB, 9 levels at 0.4 .. 0.8
    python scripts/bench_store.py --gb 0.2     # a quick run

Prints ratios and seconds, not verdicts (the issue's target: open under 0.5 s).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from allocsearch.pruners import DenseVariants
from allocsearch.supernet.levels import LevelGrid
from allocsearch.supernet.packed import dense_nbytes, packed_nbytes
from allocsearch.supernet.spec import Unit
from allocsearch.supernet.store import StoreWriter, SupernetStore, make_spec

STORES = (("dense", "float32"), ("dense", "bfloat16"), ("packed", "bfloat16"))


def synthetic_variants(rng: np.random.Generator, shape, sparsity) -> DenseVariants:
    """[K, out, in] float32 weights, level k with a random fraction sparsity[k] zeroed."""
    k = len(sparsity)
    w = rng.standard_normal((k, *shape), dtype=np.float32)
    for i, s in enumerate(sparsity):
        w[i][rng.random(shape, dtype=np.float32) < s] = 0.0
    # host arrays: the writer takes them as they are (no device round trip)
    return DenseVariants(weights=w, sparsity=(w == 0).mean(axis=(1, 2)).astype(np.float64))


def write_stores(root: Path, n_params: int, shape, sparsity, seed: int) -> dict:
    """The three stores of STORES with the same variants; -> {(layout, dtype): path}."""
    rng = np.random.default_rng(seed)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(n_params)]
    writers = {
        key: StoreWriter(root / f"{key[0]}-{key[1]}", layout=key[0], storage_dtype=key[1])
        for key in STORES
    }
    achieved = np.zeros((n_params, len(sparsity)))
    for i, name in enumerate(names):
        v = synthetic_variants(rng, shape, sparsity)
        achieved[i] = v.sparsity
        for w in writers.values():
            w.add(name, v)
    numel = shape[0] * shape[1]
    units = [
        Unit(n[: -len(".weight")], "mlp_up", i, (n[: -len(".weight")],), numel, numel)
        for i, n in enumerate(names)
    ]
    valid = np.ones(achieved.shape, bool)
    center = np.full(n_params, len(sparsity) // 2, np.int32)
    spec = make_spec(units, achieved, valid, center, "unstructured", None)
    grid = LevelGrid(np.tile(np.asarray(sparsity, np.float64), (n_params, 1)), valid, center)
    paths = {}
    for key, w in writers.items():
        paths[key] = w.commit(
            spec=spec,
            unit_params=[[n] for n in names],
            grid=grid,
            model_fingerprint="synthetic",
            tokens_fingerprint="synthetic",
            pruner={"name": "synthetic-sparsegpt", "nested": False, "params": {}},
            input_mode="dense",
        )
    return paths


def timed(fn, repeat: int = 1) -> float:
    """Median seconds of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=2.0, help="size of the dense float32 store")
    ap.add_argument("--out", type=int, default=1024, help="rows of each weight")
    ap.add_argument("--in", dest="n_in", type=int, default=1024, help="columns of each weight")
    ap.add_argument(
        "--sparsity",
        type=float,
        nargs="+",
        default=[0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8],
        help="the grid's levels (EvoPress-like: equal steps around 0.6)",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    shape = (args.out, args.n_in)
    k = len(args.sparsity)
    per_param = dense_nbytes((k, *shape), 4)
    n_params = max(1, round(args.gb * 1e9 / per_param))
    print(
        f"synthetic store: {n_params} parameters of [{k}, {shape[0]}, {shape[1]}] "
        f"(levels {args.sparsity[0]:g} .. {args.sparsity[-1]:g}), "
        f"{n_params * k * shape[0] * shape[1] / 1e9:.2f} G weights"
    )
    with tempfile.TemporaryDirectory(prefix="bench_store.") as tmp:
        t0 = time.perf_counter()
        paths = write_stores(Path(tmp), n_params, shape, args.sparsity, args.seed)
        print(f"written in {time.perf_counter() - t0:.1f} s (3 stores, digests included)")
        print()
        print(f"{'store':<18}{'bytes':>15}{'GB':>8}{'vs dense fp32':>15}")
        sizes = {}
        for key, path in paths.items():
            sizes[key] = sum(f.stat().st_size for f in path.iterdir())
        base = sizes[("dense", "float32")]
        for (layout, dtype), size in sizes.items():
            label = f"{layout} {dtype}"
            print(f"{label:<18}{size:>15,d}{size / 1e9:>8.3f}{size / base:>15.3f}")
        print()
        print("bytes per weight by level (formula of supernet/packed.py, headers excluded):")
        print(
            f"{'sparsity':>9}{'dense fp32':>12}{'dense bf16':>12}{'packed fp32':>13}"
            f"{'packed bf16':>13}"
        )
        numel = shape[0] * shape[1]
        for s in args.sparsity:
            nnz = round((1 - s) * numel)
            row = [packed_nbytes((1, *shape), nnz, size) / numel for size in (4, 2)]
            print(f"{s:>9.2f}{4.0:>12.3f}{2.0:>12.3f}{row[0]:>13.3f}{row[1]:>13.3f}")
        print()
        param = "model.layers.0.mlp.up_proj.weight"
        print(f"timings (warm page cache; one parameter = {per_param / 1e6:.1f} MB dense fp32):")
        for key, path in paths.items():
            label = f"{key[0]} {key[1]}"
            t_open = timed(lambda p=path: SupernetStore.open(p), repeat=5)
            store = SupernetStore.open(path)
            t_first = timed(lambda s=store: s.read_levels(param, [k // 2]))
            t_again = timed(lambda s=store: s.read_levels(param, [k // 2]), repeat=5)
            t_all = timed(lambda s=store: s.variants(param), repeat=3)
            print(
                f"  {label:<15} open {t_open * 1e3:7.1f} ms | first read of one level "
                f"(digest incl.) {t_first * 1e3:7.1f} ms | later reads {t_again * 1e3:6.1f} ms "
                f"| all {k} levels to device {t_all * 1e3:7.1f} ms"
            )
        t_full = timed(lambda: SupernetStore.open(paths[("dense", "float32")], verify="full"))
        print(
            f"  dense float32 open with verify='full' (every digest; format 1's open): "
            f"{t_full:.2f} s for {sizes[('dense', 'float32')] / 1e9:.2f} GB"
        )


if __name__ == "__main__":
    main()
