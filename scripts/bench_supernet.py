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

``--sweep`` instead prints the pruner table of issue 17, in one process pinned to one
core (``--core``, default the last one this process may use) with XLA's CPU runtime on
one thread, times as CPU-seconds (``time.process_time``) and wall seconds:

* the float32 matmul peak of this core (best of square 2048 / 3072 products);
* the demo model, 9 levels, ``--n-seq`` x ``--seq-len`` calibration tokens (use 32 x 256
  = 8,192): a SparseGPT build with ``impl="recursive"`` and with ``impl="reference"``
  (the previous code path), each cold (compilation caches cleared first, as a fresh
  process would be) and warm (run again); a structured ``"neurons"`` build likewise;
* one random 4096 x 4096 layer (``--large``) at 9 levels, 8,192 tokens, warm: SparseGPT
  (and its reference with ``--large-reference``, slow) and the structured pruner
  (4096 neurons, 9 levels in steps of 128).

For each: pruner CPU and wall seconds in all and per layer-level, the flops counted
(:func:`allocsearch.pruners.sparsegpt.sparsegpt_flops`; for the structured pruner
:func:`structured_flops` here), the achieved GFLOP/s per CPU-second and its fraction of
the measured peak, and the ratios new / reference.

    python scripts/bench_supernet.py --sweep --n-seq 32 --seq-len 256
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ONE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def pin_one_thread(argv: list[str]) -> int | None:
    """With ``--sweep`` in ``argv``: pin this process to one core (``--core N``, default
    the last allowed one) and XLA to one thread; must run before jax is imported."""
    if "--sweep" not in argv:
        return None
    core = max(os.sched_getaffinity(0))
    if "--core" in argv:
        core = int(argv[argv.index("--core") + 1])
    os.sched_setaffinity(0, {core})
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {ONE_THREAD_XLA_FLAGS}".strip()
    return core


if __name__ == "__main__":
    PINNED_CORE = pin_one_thread(sys.argv)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from allocsearch.data.demo_corpus import demo_tokensets  # noqa: E402
from allocsearch.models import HFModel, adapter_for_config, load_model  # noqa: E402
from allocsearch.models.hf import fingerprint_tensors, model_num_bytes  # noqa: E402
from allocsearch.pruners import (  # noqa: E402
    MagnitudePruner,
    NeuronGroups,
    SparseGPTPruner,
    StructuredPruner,
    WandaPruner,
    accumulate_stats,
)
from allocsearch.pruners.sparsegpt import sparsegpt_flops  # noqa: E402
from allocsearch.supernet.build import (  # noqa: E402
    INPUT_MODES,
    build_supernet,
    supernet_units,
    unit_group_counts,
)
from allocsearch.supernet.levels import equal_step_grid, structured_grid  # noqa: E402

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


# --------------------------------------------------------------------------- --sweep


def structured_flops(out: int, n: int, removed: list[int], width: int, round_size: int) -> int:
    """Flops the structured pruner's algorithm needs for one ``out x n`` output projection
    (a multiply and an add count two): the inverse of ``H`` (``n^3``), every OBS round
    removing ``q = size * width`` columns (``q^3 / 3 + 2 q^2 n`` for the solve, ``2 q n
    (out + n)`` for the W and ``H^-1`` updates, ``2 out n`` for the scores) and every
    level's refit on its ``n_k`` kept columns (``2 out n n_k + n_k^3 / 3 + 2 n_k^2 out``)."""
    total = n**3
    done = 0
    for target in sorted(set(removed)):
        while done < target:
            q = min(round_size, target - done) * width
            total += q**3 // 3 + 2 * q * q * n + 2 * q * n * (out + n) + 2 * out * n
            done += q // width
    for r in removed:
        n_k = n - r * width
        if 0 < r and n_k > 0:
            total += 2 * out * n * n_k + n_k**3 // 3 + 2 * n_k * n_k * out
    return total


@dataclass
class PrunerClock:
    """CPU and wall seconds of a pruner's ``prune`` calls, and the flops they needed."""

    cpu: float = 0.0
    wall: float = 0.0
    layer_levels: int = 0
    flops: int = 0

    def time(self, call, flops_of):
        c0, w0 = time.process_time(), time.perf_counter()
        variants = call()
        jax.block_until_ready(variants.weights)
        self.cpu += time.process_time() - c0
        self.wall += time.perf_counter() - w0
        levels, flops = flops_of(variants)
        self.layer_levels += levels
        self.flops += flops
        return variants


def _sparsegpt_cost(weight_shape: tuple[int, int], sparsities, blocksize: int):
    """(levels, flops) of one SparseGPT call: levels pruning nothing or everything are not
    swept."""
    out, n = weight_shape
    counts = np.rint(np.asarray(sparsities, np.float64) * out * n)
    swept = int(np.sum((counts > 0) & (counts < out * n)))
    return lambda variants: (
        variants.num_levels,
        sparsegpt_flops(out, n, swept, blocksize).total,
    )


class TimedSparseGPT:
    """A :class:`SparseGPTPruner` whose ``prune`` calls are timed into ``clock``."""

    name = SparseGPTPruner.name
    nested = SparseGPTPruner.nested

    def __init__(self, inner: SparseGPTPruner, clock: PrunerClock) -> None:
        self.inner, self.clock = inner, clock

    def prune(self, weight, stats, sparsities):
        cost = _sparsegpt_cost(np.shape(weight), sparsities, self.inner.blocksize)
        return self.clock.time(lambda: self.inner.prune(weight, stats, sparsities), cost)


STRUCTURED_CLOCK = PrunerClock()


@dataclass(frozen=True, kw_only=True)
class TimedStructuredPruner(StructuredPruner):
    """:class:`StructuredPruner` whose ``prune`` calls are timed into ``STRUCTURED_CLOCK``."""

    def prune(self, weight, stats, sparsities):
        lay = self.layout
        removed = [int(r) for r in self.removal_counts(sparsities)]
        step = lay.min_step if self.round_size is None else self.round_size
        flops = structured_flops(lay.hidden_size, lay.in_features, removed, lay.group_width, step)
        return STRUCTURED_CLOCK.time(
            lambda: super(TimedStructuredPruner, self).prune(weight, stats, sparsities),
            lambda v: (v.num_levels, flops),
        )


def matmul_peak() -> float:
    """Float32 matmul FLOP/s per CPU-second of this process (best of square 2048 and 3072
    products, 3 runs each)."""
    best = 0.0
    for n in (2048, 3072):
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        f = jax.jit(lambda a: jnp.matmul(a, a, precision=jax.lax.Precision.HIGHEST))
        jax.block_until_ready(f(a))
        for _ in range(3):
            c0 = time.process_time()
            jax.block_until_ready(f(a))
            best = max(best, 2 * n**3 / (time.process_time() - c0))
    return best


def _row(case: str, clock: PrunerClock, peak: float, build: tuple[float, float] | None) -> str:
    per = max(clock.layer_levels, 1)
    rate = clock.flops / clock.cpu if clock.cpu else float("nan")
    b = f"{build[0]:.1f} / {build[1]:.1f}" if build else "-"
    return (
        f"| {case} | {b} | {clock.cpu:.2f} / {clock.wall:.2f} | {clock.layer_levels} | "
        f"{1e3 * clock.cpu / per:.1f} / {1e3 * clock.wall / per:.1f} | "
        f"{clock.flops / 1e9:.2f} | {rate / 1e9:.1f} | {rate / peak:.0%} |"
    )


def sweep_benchmark(args: argparse.Namespace) -> None:
    """The issue-17 table (see the module docstring)."""
    peak = matmul_peak()
    model, what = demo_model(args.model, args.blocks)
    calibration, _ = demo_tokensets(args.seq_len, args.n_seq, seed=0, n_heldout_seqs=1)
    print(
        f"one thread: core {PINNED_CORE} of {os.cpu_count()}, XLA_FLAGS "
        f"{os.environ.get('XLA_FLAGS')!r}; JAX {jax.__version__} {jax.default_backend()}; "
        f"float32 matmul peak {peak / 1e9:.1f} GFLOP/s per CPU-second"
    )
    print(
        f"demo: {what}; calibration {calibration.n_seq} x {calibration.seq_len} = "
        f"{calibration.n_tokens:,} tokens, batch {args.batch_size}"
    )
    units = supernet_units(model.adapter, "unstructured")
    grid = equal_step_grid(
        [u.numel for u in units], center=0.5, step_weights=args.step_weights, steps_each_side=4
    )
    groups = unit_group_counts(model.adapter, "neurons")
    neuron_grid = structured_grid(groups, 32, center=0.5, steps_each_side=4, group_name="neurons")
    header = (
        "| case | build CPU / wall s | pruner CPU / wall s | layer-levels | "
        "ms per layer-level CPU / wall | GFLOP counted | GFLOP/s (CPU) | of peak |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows: list[str] = []
    results: dict[str, PrunerClock] = {}
    builds: dict[str, float] = {}
    root = Path(tempfile.mkdtemp(prefix="bench_sweep."))
    try:
        runs = [
            ("SparseGPT recursive", "unstructured", "recursive"),
            ("SparseGPT reference", "unstructured", "reference"),
            ("structured neurons", "neurons", None),
        ]
        for label, structure, impl in runs:
            for phase in ("cold", "warm"):
                if phase == "cold":
                    jax.clear_caches()
                if impl is None:
                    clock = STRUCTURED_CLOCK
                    clock.__init__()
                    pruner = TimedStructuredPruner
                    level_grid = neuron_grid
                else:
                    clock = PrunerClock()
                    pruner = TimedSparseGPT(SparseGPTPruner(impl=impl), clock)
                    level_grid = grid
                c0, w0 = time.process_time(), time.perf_counter()
                build_supernet(
                    model,
                    calibration,
                    pruner=pruner,
                    grid=level_grid,
                    structure=structure,
                    input_mode="dense",
                    out_dir=root / f"{label}-{phase}".replace(" ", "-"),
                    batch_size=args.batch_size,
                    progress=False,
                    storage_dtype="float32",
                )
                build = (time.process_time() - c0, time.perf_counter() - w0)
                key = f"demo {label}, {phase}"
                results[key], builds[key] = dataclass_copy(clock), build[0]
                rows.append(_row(key, clock, peak, build))
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    if args.large:
        n = args.large
        rng = np.random.default_rng(0)
        x = rng.normal(size=(8192, n)).astype(np.float32)
        x += rng.normal(size=(8192, 16)).astype(np.float32) @ rng.normal(size=(16, n)).astype(
            np.float32
        )
        stats = accumulate_stats(None, x)
        del x
        weight = jnp.asarray(rng.normal(size=(n, n)).astype(np.float32))
        numel = n * n
        levels = (numel // 2 + np.arange(-4, 5) * (numel // 64)) / numel
        large = [("SparseGPT recursive", "recursive")]
        if args.large_reference:
            large.append(("SparseGPT reference", "reference"))
        for label, impl in large:
            clock = PrunerClock()
            timed = TimedSparseGPT(SparseGPTPruner(impl=impl), clock)
            timed.prune(weight, stats, levels)  # compile
            clock.__init__()
            timed.prune(weight, stats, levels)
            key = f"{n} x {n} {label}, warm"
            results[key] = dataclass_copy(clock)
            rows.append(_row(key, clock, peak, None))
            print(rows[-1], flush=True)
        layout = NeuronGroups(hidden_size=n, intermediate_size=n)
        neuron_levels = (n // 2 + np.arange(-4, 5) * (n // 32)) / n
        timed = TimedStructuredPruner(layout=layout)
        timed.prune(weight, stats, neuron_levels)  # compile
        STRUCTURED_CLOCK.__init__()
        timed.prune(weight, stats, neuron_levels)
        key = f"{n} x {n} structured neurons, warm"
        results[key] = dataclass_copy(STRUCTURED_CLOCK)
        rows.append(_row(key, STRUCTURED_CLOCK, peak, None))
        print(rows[-1], flush=True)

    print(f"\n{header}")
    print("\n".join(rows))
    print("\nratios recursive / reference (CPU-seconds):")
    for phase in ("cold", "warm"):
        new, old = f"demo SparseGPT recursive, {phase}", f"demo SparseGPT reference, {phase}"
        print(
            f"- demo {phase}: build {builds[new] / builds[old]:.2f}, "
            f"pruner {results[new].cpu / results[old].cpu:.2f}"
        )
    if args.large and args.large_reference:
        new, old = (f"{args.large} x {args.large} SparseGPT {i}, warm" for i in IMPL_NAMES)
        print(
            f"- {args.large} x {args.large} warm: pruner {results[new].cpu / results[old].cpu:.2f}"
        )


IMPL_NAMES = ("recursive", "reference")


def dataclass_copy(clock: PrunerClock) -> PrunerClock:
    return PrunerClock(clock.cpu, clock.wall, clock.layer_levels, clock.flops)


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
    ap.add_argument(
        "--sweep", action="store_true", help="the one-thread pruner table (issue 17) instead"
    )
    ap.add_argument("--core", type=int, default=None, help="with --sweep: the core to pin to")
    ap.add_argument(
        "--large", type=int, default=4096, help="with --sweep: random N x N layer (0: none)"
    )
    ap.add_argument(
        "--large-reference",
        action="store_true",
        help="with --sweep: also time the reference SparseGPT on the large layer (slow)",
    )
    args = ap.parse_args()
    if args.sweep:
        sweep_benchmark(args)
        return

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
