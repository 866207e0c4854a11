"""Evaluation throughput of the Ray backend (1 and 2 workers) and the in-process backend.

    python scripts/bench_ray.py                      # real Evaluator if it works
    python scripts/bench_ray.py --workload matmul    # synthetic jitted matmul rows

Every evaluator is limited to one core (the thread settings of
:func:`allocsearch.distributed.ray_backend.worker_env` and CPU pinning,
:func:`~allocsearch.distributed.ray_backend.pin_to_cpus`); the in-process backend runs in
a child process with the same settings, so "Ray overhead" compares equal compute. Each
backend is warmed up (compilation) before timing, and the backends are measured in
interleaved rounds so that changes in the machine's load hit them alike. Prints, per
backend, candidates per second (best and median query), CPU seconds per candidate of
the evaluating processes and of the Ray driver, the ratios (targets: 2 workers >= 1.7x
one worker; Ray dispatch overhead <= 10% vs in-process), and the dispatch round trip of a
no-op evaluator (the overhead alone, which other jobs on the machine barely change). The
load average is printed before and after: other work on the same cores distorts every
wall-clock number.

Workloads: ``evaluator`` scores random allocations with
:class:`allocsearch.evaluate.evaluator.Evaluator` (KL to the dense model) on the demo
model at ``allocsearch/assets/demo`` if it is there, else on a randomly initialised model
of the demo architecture (``CONFIG`` of ``scripts/train_demo_lm.py``), with magnitude
variants at 4 levels of every decoder linear layer; ``matmul`` is a jitted
float32[512, 512] product chain per candidate. With ``--workload auto`` (default) the
evaluator is tried first, and the matmul workload is used (and said so) if it fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEVELS = (0.0, 0.25, 0.5, 0.75)


@dataclass(frozen=True)
class EvaluatorWorkload:
    """Factory of a real Evaluator on the demo model (or a random one of its architecture)."""

    seq_len: int = 128
    n_seq: int = 64
    seed: int = 0

    def __call__(self):
        import jax
        import numpy as np

        from allocsearch.data.tokenset import TokenSet
        from allocsearch.evaluate import Evaluator, KLDivergence
        from allocsearch.models import HFModel, adapter_for_config, load_model
        from allocsearch.pruners import MagnitudePruner, accumulate_stats
        from allocsearch.supernet.spec import SupernetSpec, Unit

        demo = ROOT / "allocsearch" / "assets" / "demo"
        if (demo / "config.json").exists():
            model = load_model(demo)
        else:
            adapter = adapter_for_config(_demo_config())
            model = HFModel(adapter, adapter.init_params(jax.random.key(self.seed)))
        adapter, params = model.adapter, model.params
        rng = np.random.default_rng(self.seed)
        variants, units = {}, []
        levels = np.array(LEVELS)
        for lay in adapter.layers(include_head=False):
            x = rng.normal(size=(64, lay.in_features)).astype(np.float32)
            weight = params[lay.weight_name]
            variants[lay.weight_name] = MagnitudePruner().prune(
                weight, accumulate_stats(None, x), levels
            )
            numel = int(np.prod(weight.shape))
            units.append(Unit(lay.name, lay.role, lay.block, (lay.name,), numel, numel))
        L = len(units)
        spec = SupernetSpec(
            tuple(units),
            np.tile(levels, (L, 1)),
            np.ones((L, len(levels)), bool),
            np.full(L, 2, np.int32),
        )
        vocab = int(params["model.embed_tokens.weight"].shape[0])  # a Llama model
        tokens = rng.integers(0, vocab, size=(self.n_seq, self.seq_len)).astype(np.int32)
        calibration = TokenSet(tokens, "random ids", "ids", self.seed)
        return Evaluator(
            model,
            spec,
            variants,
            [(lay,) for lay in variants],
            calibration,
            metric=KLDivergence(),
            reuse=False,
        )


@dataclass(frozen=True)
class MatmulWorkload:
    """Factory of a synthetic evaluator: a jitted float32[512, 512] matmul chain per row."""

    size: int = 512
    depth: int = 8

    def __call__(self):
        import jax
        import jax.numpy as jnp
        import numpy as np

        w = jax.random.normal(jax.random.key(0), (self.depth, self.size, self.size)) / 23.0

        @jax.jit
        def score(choice, seed):
            x = jnp.ones((self.size, self.size)) * (1.0 + choice.sum() + seed % 7)

            def body(i, h):
                return jnp.tanh(h @ w[i])

            return jax.lax.fori_loop(0, self.depth, body, x).mean()

        def evaluate(choices, *, fidelity, batch_seed):
            # ``fidelity`` scales the work: one matmul chain per 512 tokens.
            reps = max(1, fidelity // 512)
            out = [
                sum(float(score(jnp.asarray(c), batch_seed + r)) for r in range(reps))
                for c in np.asarray(choices)
            ]
            return np.asarray(out, np.float32)

        evaluate.num_units = 28
        return evaluate


@dataclass(frozen=True)
class NullWorkload:
    """Factory of an evaluator that does no work (zeros): isolates the dispatch cost."""

    def __call__(self):
        import numpy as np

        def evaluate(choices, *, fidelity, batch_seed):
            return np.zeros(len(choices), np.float32)

        return evaluate


def _round_trip_ms(evaluate, rows: int, num_units: int, calls: int = 50) -> float:
    """Median milliseconds per call of ``evaluate`` on ``rows`` candidates."""
    import numpy as np

    choices = np.zeros((rows, num_units), np.int32)
    evaluate(choices, fidelity=1, batch_seed=0)
    times = []
    for i in range(calls):
        start = time.perf_counter()
        evaluate(choices, fidelity=1, batch_seed=i)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def _demo_config() -> dict:
    spec = importlib.util.spec_from_file_location(
        "train_demo_lm", ROOT / "scripts/train_demo_lm.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.CONFIG)


def _workload(name: str):
    return EvaluatorWorkload() if name == "evaluator" else MatmulWorkload()


def _num_units(evaluate) -> int:
    spec = getattr(evaluate, "spec", None)
    return spec.num_units if spec is not None else evaluate.num_units


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by processes ``pids`` (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def _measure(evaluate, num_units: int, args, pids: list[int], driver: int | None) -> dict:
    """Per-query candidates/s and CPU seconds per candidate (after a warm-up query).

    ``pids`` are the evaluating processes; ``driver`` is this process when it only
    dispatches (Ray), or None. Wall-clock rates suffer from other jobs on the machine;
    CPU seconds per candidate much less, so they are the fairer measure of overhead on a
    loaded machine.
    """
    import numpy as np

    rng = np.random.default_rng(1)
    queries = [
        rng.integers(0, len(LEVELS), size=(args.rows, num_units)).astype(np.int32)
        for _ in range(args.repeats + 1)
    ]
    evaluate(queries[0], fidelity=args.fidelity, batch_seed=0)  # compile
    rates = []
    drivers = [driver] if driver is not None else []
    cpu0, drv0 = _cpu_seconds(pids), _cpu_seconds(drivers)
    for i, q in enumerate(queries[1:], start=1):
        start = time.perf_counter()
        evaluate(q, fidelity=args.fidelity, batch_seed=i)
        rates.append(args.rows / (time.perf_counter() - start))
    n = args.rows * args.repeats
    return {
        "rates": rates,
        "cpu_per_candidate": (_cpu_seconds(pids) - cpu0) / n,
        "driver_cpu_per_candidate": (_cpu_seconds(drivers) - drv0) / n,
    }


def _child(args) -> dict:
    """In the child process: pick the workload, time the in-process backend on it."""
    from allocsearch.distributed.ray_backend import InProcessEvaluate, pin_to_cpus

    pin_to_cpus(0, 1)  # one core, as each Ray actor pins itself (before JAX starts)

    workload, note = args.workload, ""
    if workload == "auto":
        try:
            with InProcessEvaluate(EvaluatorWorkload()) as evaluate:
                units = _num_units(evaluate._evaluate)
                out = _measure(evaluate, units, args, [os.getpid()], None)
            return {"workload": "evaluator", "units": units, **out}
        except Exception as err:  # noqa: BLE001 (any failure means: fall back, and say why)
            workload, note = "matmul", f"the Evaluator failed ({type(err).__name__}: {err})"
    with InProcessEvaluate(_workload(workload)) as evaluate:
        units = _num_units(evaluate._evaluate)
        out = _measure(evaluate, units, args, [os.getpid()], None)
    return {"workload": workload, "units": units, "note": note, **out}


def _in_process(args) -> dict:
    """Run :func:`_child` in a child process limited like one Ray worker (1 thread).

    The child also picks the workload, so this process imports no JAX before forking.
    """
    from allocsearch.distributed.ray_backend import worker_env

    env = dict(os.environ, **worker_env(1, 0))
    cmd = [sys.executable, __file__, "--child", "--workload", args.workload]
    cmd += ["--rows", str(args.rows), "--fidelity", str(args.fidelity)]
    cmd += ["--repeats", str(args.repeats)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("auto", "evaluator", "matmul"), default="auto")
    parser.add_argument("--rows", type=int, default=16, help="candidates per query")
    parser.add_argument("--fidelity", type=int, default=1024, help="tokens per candidate")
    parser.add_argument("--repeats", type=int, default=3, help="timed queries per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the backends")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(_child(args)))
        return

    import ray

    from allocsearch.distributed.ray_backend import RayEvaluate

    print(f"load average before: {os.getloadavg()}  (cores: {os.cpu_count()})")
    local = _in_process(args)
    if local.get("note"):
        print(f"{local['note']}; using the matmul workload")
    args.workload = local["workload"]
    factory = _workload(args.workload)
    print(
        f"workload: {args.workload}, {local['units']} units, {args.rows} candidates x "
        f"{args.fidelity} tokens per query; {args.rounds} rounds of {args.repeats} timed "
        "queries per backend, backends interleaved"
    )
    names = ("in-process, 1 core", "ray, 1 worker(s)", "ray, 2 worker(s)")
    rounds: dict[str, list[dict]] = {name: [] for name in names}
    # 3 logical CPUs: the 1-worker and the 2-worker backends stay up together (one of
    # them idle at a time), so rounds can alternate without restarting actors.
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        with (
            RayEvaluate(factory, workers=1) as ray1,
            RayEvaluate(factory, workers=2) as ray2,
        ):
            for name, evaluate in ((names[1], ray1), (names[2], ray2)):
                print(f"{name}: pinned to cores {[p['cpus'] for p in evaluate.placement]}")
            for r in range(args.rounds):
                if r:
                    local = _in_process(args)
                rounds[names[0]].append(local)
                for name, evaluate in ((names[1], ray1), (names[2], ray2)):
                    pids = [p["pid"] for p in evaluate.placement]
                    m = _measure(evaluate, local["units"], args, pids, os.getpid())
                    rounds[name].append(m)
        # Dispatch cost alone: an evaluator that does nothing, same query shape.
        round_trip = {}
        for workers in (1, 2):
            with RayEvaluate(NullWorkload(), workers=workers) as evaluate:
                round_trip[workers] = _round_trip_ms(evaluate, args.rows, local["units"])
    finally:
        ray.shutdown()
    results = {
        name: {
            "rates": [x for m in ms for x in m["rates"]],
            "cpu_per_candidate": statistics.mean(m["cpu_per_candidate"] for m in ms),
            "driver_cpu_per_candidate": statistics.mean(m["driver_cpu_per_candidate"] for m in ms),
        }
        for name, ms in rounds.items()
    }
    best = {name: max(r["rates"]) for name, r in results.items()}
    median = {name: statistics.median(r["rates"]) for name, r in results.items()}
    cpu = {name: r["cpu_per_candidate"] for name, r in results.items()}
    drv = {name: r["driver_cpu_per_candidate"] for name, r in results.items()}
    print(f"{'backend':20s} {'best/s':>8s} {'median/s':>8s} {'CPU s/cand':>10s} {'driver':>8s}")
    for name in results:
        print(
            f"{name:20s} {best[name]:8.3f} {median[name]:8.3f} {cpu[name]:10.4f} {drv[name]:8.4f}"
        )
    one, two, inproc = "ray, 1 worker(s)", "ray, 2 worker(s)", "in-process, 1 core"
    for label, v in (("best", best), ("median", median)):
        print(
            f"{label}: 2 workers / 1 worker = {v[two] / v[one]:.2f}x (target >= 1.7x); "
            f"Ray 1 worker is {100 * (1 - v[one] / v[inproc]):+.1f}% slower than in-process "
            "(target <= 10%)"
        )
    print(
        f"evaluator CPU per candidate: Ray 1 worker {cpu[one] / cpu[inproc]:.3f}x, 2 workers "
        f"{cpu[two] / cpu[inproc]:.3f}x in-process; Ray driver CPU adds "
        f"{100 * drv[one] / cpu[inproc]:.1f}% / {100 * drv[two] / cpu[inproc]:.1f}%"
    )
    per_query_s = args.rows / median[inproc]
    for workers, ms in round_trip.items():
        print(
            f"Ray dispatch round trip, {workers} worker(s), no-op evaluator: {ms:.2f} ms per "
            f"query = {100 * ms / 1e3 / per_query_s:.2f}% of one in-process query "
            f"({per_query_s:.2f} s)"
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
