"""Time building the demo model's supernet: every linear layer at 9 levels, block by block.

Defaults: SparseGPT, EvoPress's equal-weight grid (centre 50% +- 4 steps of 1024 weights,
so every layer of the demo model gets 9 levels), dense input mode, 64 calibration
sequences of 256 bytes from the demo corpus. Uses the bundled demo model
(allocsearch/assets/demo) or, when it is absent, a random model of the same config
(scripts/train_demo_lm.py CONFIG; the timing does not depend on the weights' values).

    python scripts/bench_supernet.py [--pruner sparsegpt|wanda|magnitude]
        [--input-mode dense|expected|centre] [--n-seq 64] [--seq-len 256] [--batch-size 16]
        [--storage-dtype float32|bfloat16] [--model DIR] [--blocks N] [--keep DIR]
        [--workers N] [--check-serial]

Prints seconds per block (block 0 includes the JIT compilation of the block and of every
pruner shape), the total, the store size and the process's peak resident memory; no
verdicts.

``--workers N`` prunes each block's layers on N pinned 1-CPU Ray actors
(:class:`~allocsearch.distributed.ray_backend.RayLayerMap`, on a local Ray instance
started here; its start-up is timed apart from the build); ``--check-serial`` then also
builds serially and reports whether the two stores are the same byte for byte. Serial vs
2 workers: run ``--workers 0`` and ``--workers 2`` (or ``--workers 2 --check-serial``,
which times both in one process, the serial build second).
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from allocsearch.data.demo_corpus import demo_tokensets
from allocsearch.models import HFModel, adapter_for_config, load_model
from allocsearch.models.hf import fingerprint_tensors, model_num_bytes
from allocsearch.pruners import MagnitudePruner, SparseGPTPruner, WandaPruner
from allocsearch.supernet.build import INPUT_MODES, build_supernet, supernet_units
from allocsearch.supernet.levels import equal_step_grid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo_lm import CONFIG  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "allocsearch" / "assets" / "demo"
PRUNERS = {"sparsegpt": SparseGPTPruner, "wanda": WandaPruner, "magnitude": MagnitudePruner}


def demo_model(path: Path, blocks: int | None) -> tuple[HFModel, str]:
    """The demo model, or a random model of its config when it has not been trained yet
    (or when ``blocks`` asks for another depth)."""
    if (path / "config.json").exists() and blocks is None:
        return load_model(path), f"demo model {path}"
    config = {**CONFIG, "num_hidden_layers": blocks or CONFIG["num_hidden_layers"]}
    adapter = adapter_for_config(config)
    params = adapter.init_params(jax.random.key(0))
    fp = fingerprint_tensors(config, {k: np.asarray(v) for k, v in params.items()})
    return HFModel(adapter, params, fingerprint=fp), "random model of the demo CONFIG"


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEMO)
    ap.add_argument("--pruner", choices=sorted(PRUNERS), default="sparsegpt")
    ap.add_argument("--input-mode", choices=INPUT_MODES, default="dense")
    ap.add_argument("--n-seq", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--step-weights", type=int, default=1024)
    ap.add_argument("--storage-dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument(
        "--blocks", type=int, default=None, help="random model of the demo config, N blocks"
    )
    ap.add_argument("--keep", type=Path, default=None, help="write the store here and keep it")
    ap.add_argument("--progress", action="store_true", help="show the progress bar")
    ap.add_argument(
        "--workers", type=int, default=0, help="Ray actors pruning layers (0: serial, in process)"
    )
    ap.add_argument(
        "--check-serial",
        action="store_true",
        help="with --workers: also build serially and compare the stores byte for byte",
    )
    args = ap.parse_args()

    model, what = demo_model(args.model, args.blocks)
    calibration, _ = demo_tokensets(args.seq_len, args.n_seq, seed=0, n_heldout_seqs=1)
    units = supernet_units(model.adapter, "unstructured")
    grid = equal_step_grid(
        [u.numel for u in units], center=0.5, step_weights=args.step_weights, steps_each_side=4
    )
    n_levels = grid.valid.sum(axis=1)
    print(
        f"model: {what}, {model.adapter.num_blocks} blocks, {len(units)} layers, "
        f"{sum(u.numel for u in units):,} prunable weights ({mib(model_num_bytes(model))})"
    )
    print(
        f"calibration: {calibration.n_seq} x {calibration.seq_len} = {calibration.n_tokens:,} "
        f"tokens, batch {args.batch_size}; levels per layer {n_levels.min()}..{n_levels.max()}; "
        f"pruner {args.pruner}, input mode {args.input_mode}, JAX {jax.default_backend()} "
        f"({jax.device_count()} device)"
    )

    rss_before = peak_rss()
    root = Path(tempfile.mkdtemp(prefix="bench_supernet."))
    out = args.keep or root / "store"
    with contextlib.ExitStack() as stack:
        layer_map = None
        if args.workers:
            from allocsearch.distributed.ray_backend import RayLayerMap

            t0 = time.perf_counter()
            layer_map = stack.enter_context(RayLayerMap(workers=args.workers))
            cores = [p["cpus"] for p in layer_map.placement]
            print(
                f"Ray: {args.workers} layer actors (1 CPU each, cores {cores}) started in "
                f"{time.perf_counter() - t0:.1f} s"
            )
        stack.callback(shutil.rmtree, root, ignore_errors=True)

        def build(where: Path, map_layers) -> tuple[object, float]:
            t0 = time.perf_counter()
            store = build_supernet(
                model,
                calibration,
                pruner=PRUNERS[args.pruner](),
                grid=grid,
                structure="unstructured",
                input_mode=args.input_mode,
                out_dir=where,
                batch_size=args.batch_size,
                progress=args.progress,
                overwrite=args.keep is not None,
                storage_dtype=args.storage_dtype,
                map_layers=map_layers,
            )
            return store, time.perf_counter() - t0

        store, total = build(out, layer_map)
        per_block = store.manifest["build"]["seconds_per_block"]
        how = f"{args.workers} Ray workers" if args.workers else "serial, in process"
        print(f"\n| block | seconds ({how}) |\n|---:|---:|")
        for b, s in enumerate(per_block):
            note = " (incl. compilation)" if b == 0 else ""
            print(f"| {b} | {s:.2f}{note} |")
        steady = per_block[1:] or per_block
        print(f"\ntotal {total:.1f} s; blocks after the first: mean {np.mean(steady):.2f} s")
        print(
            f"store: {mib(store.num_bytes)} in {len(store.param_names)} variant files "
            f"({args.storage_dtype} weights)"
        )
        print(
            f"peak resident memory: {mib(peak_rss())} "
            f"(before the build, with model and calibration loaded: {mib(rss_before)})"
        )
        if args.workers and args.check_serial:
            serial, serial_total = build(root / "serial", None)
            files = sorted(p.name for p in store.path.iterdir() if p.name != "manifest.json")
            same = files == sorted(
                p.name for p in serial.path.iterdir() if p.name != "manifest.json"
            ) and all(
                (store.path / f).read_bytes() == (serial.path / f).read_bytes() for f in files
            )
            print(
                f"serial build: {serial_total:.1f} s (ratio serial / {args.workers} workers: "
                f"{serial_total / total:.2f}); stores identical byte for byte: {same}"
            )


if __name__ == "__main__":
    main()
