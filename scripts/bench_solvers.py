"""Time the table solvers on a 7B-sized problem: 224 units x 17 levels.

Units are the 7 linear layers of 32 Llama-2-7B blocks; levels follow EvoPress's
equal-weight grid (centre +- 8 steps of 1e6 weights, clipped to [0, 1]) or, with
``--grid percent``, equal-percentage steps (no common cost lattice). Error tables are
random convex-ish curves ``a * (exp(b * s) - 1)`` with 1% multiplicative noise. Prints
wall and CPU time of each solver, its objective minus the best proven lower bound (0 =
proven optimal), its own certified gap where it has one, and the fraction of the
capacity used; no verdicts. HiGHS may print debug lines while it runs.

    python scripts/bench_solvers.py [--targets 0.5 0.7] [--grids weights percent]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from allocsearch.search.dp import DEFAULT_BINS, dp_solve
from allocsearch.search.knapsack import mckp_lagrangian, mckp_milp

HIDDEN, INTERMEDIATE, BLOCKS = 4096, 11008, 32
STEP_WEIGHTS = 1_000_000
SIDE_LEVELS = 8


def make_problem(
    rng: np.random.Generator, target: float, grid: str
) -> tuple[np.ndarray, np.ndarray, float]:
    """(error float[224, 17], kept cost float[224, 17] with inf padding, capacity)."""
    sizes = [HIDDEN * HIDDEN] * 4 + [HIDDEN * INTERMEDIATE] * 3
    numel = np.array(sizes * BLOCKS, dtype=np.float64)
    L, K = numel.size, 2 * SIDE_LEVELS + 1
    j = np.arange(-SIDE_LEVELS, SIDE_LEVELS + 1)
    if grid == "weights":
        s = target + j[None, :] * STEP_WEIGHTS / numel[:, None]
    else:
        s = target + j[None, :] * 0.05 * np.ones((L, 1))
    error = np.full((L, K), np.inf)
    cost = np.full((L, K), np.inf)
    a = rng.lognormal(0.0, 1.0, size=L)
    b = rng.uniform(3.0, 8.0, size=L)
    for l in range(L):
        row = np.unique(np.clip(s[l], 0.0, 1.0))  # clipping merges levels at 0 / 1
        n = row.size
        cost[l, :n] = numel[l] * (1.0 - row)
        error[l, :n] = a[l] * np.expm1(b[l] * row) * rng.lognormal(0.0, 0.01, size=n)
    return error, cost, (1.0 - target) * numel.sum()


def timed(fn, *args, repeat: int = 3, **kwargs):  # noqa: ANN001, ANN202
    """(result, best wall seconds, best CPU seconds) over ``repeat`` runs (one if slow)."""
    wall, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        wall = min(wall, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
        if wall > 2.0:
            break
    return out, wall, cpu


def bench(target: float, grid: str, seed: int, bins: int, time_limit: float) -> None:
    error, cost, capacity = make_problem(np.random.default_rng(seed), target, grid)
    L, K = error.shape
    rows = np.arange(L)
    dp, dp_wall, dp_cpu = timed(dp_solve, error, cost, capacity, bins=bins)
    milp, milp_wall, milp_cpu = timed(mckp_milp, error, cost, capacity, time_limit=time_limit)
    lag, lag_wall, lag_cpu = timed(mckp_lagrangian, error, cost, capacity)
    bound = max(milp.lower_bound, lag.lower_bound)
    print(f"\n{L} units x {K} levels, grid={grid}, target={target}, seed={seed}")
    print(
        f"{'solver':<12}{'wall s':>9}{'cpu s':>9}{'objective':>14}{'- best bound':>14}"
        f"{'own gap':>10}{'capacity used':>15}"
    )
    results = (
        ("dp", dp, None, dp_wall, dp_cpu),
        ("milp", milp.choice, milp.gap, milp_wall, milp_cpu),
        ("lagrangian", lag.choice, lag.gap, lag_wall, lag_cpu),
    )
    for name, choice, gap, wall, cpu in results:
        obj = float(error[rows, choice].sum())
        used = float(cost[rows, choice].sum() / capacity)
        own = "-" if gap is None else f"{gap:.3g}"
        print(
            f"{name:<12}{wall:>9.3f}{cpu:>9.3f}{obj:>14.6f}{obj - bound:>14.4g}{own:>10}"
            f"{used:>15.9f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument(
        "--grids", nargs="+", choices=("weights", "percent"), default=["weights", "percent"]
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bins", type=int, default=DEFAULT_BINS)
    parser.add_argument("--milp-time-limit", type=float, default=10.0)
    args = parser.parse_args()
    print(f"dp bins={args.bins}, milp time limit={args.milp_time_limit} s; times: best of 3")
    for grid in args.grids:
        for target in args.targets:
            bench(target, grid, args.seed, args.bins, args.milp_time_limit)


if __name__ == "__main__":
    main()
