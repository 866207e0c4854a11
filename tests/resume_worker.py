"""A search driver for the kill -9 / resume tests, and the tiny synthetic search they share.

Run as a script it runs an :class:`EvolutionarySearcher` on :func:`tiny_spec` with the
additive evaluator, checkpointing every generation and resuming from the newest complete
checkpoint of ``--checkpoint-dir`` if there is one; it writes the result as JSON to
``--out``. ``--kill-at-call N`` makes the evaluator SIGKILL its own process on its N-th
call (counted in this process), which is a ``kill -9`` of the driver mid-generation.

Imported (tests put this directory on ``sys.path``) it provides the shared pieces:
:func:`tiny_spec`, :data:`BUDGET`, :func:`evo_searcher`, :class:`AdditiveEvaluator` and
its picklable :class:`AdditiveFactory` (also used by the Ray tests), :func:`result_json`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from allocsearch.distributed.checkpoint import (
    SearchCheckpointer,
    latest_state,
    search_fingerprint,
)
from allocsearch.distributed.local import run_search
from allocsearch.distributed.progress import make_callbacks
from allocsearch.search.base import SearchResult
from allocsearch.search.budget import Budget
from allocsearch.search.evolutionary import EvolutionarySearcher
from allocsearch.supernet.spec import SupernetSpec, Unit

NUM_UNITS = 6
LEVEL_SPARSITY = (0.3, 0.4, 0.5, 0.6, 0.7)
BUDGET = Budget(kind="params", target=0.5)
SEED = 7


def tiny_spec(num_units: int = NUM_UNITS) -> SupernetSpec:
    """``num_units`` equal units (1000 weights) with levels at 30..70% sparsity, centre 50%.

    Equal units make every level step cost the same, so EvoPress swaps keep the budget.
    """
    units = tuple(
        Unit(
            name=f"model.layers.{i}.mlp.down_proj",
            role="down",
            block=i,
            layers=(f"model.layers.{i}.mlp.down_proj",),
            numel=1000,
            flops_per_token=1000,
        )
        for i in range(num_units)
    )
    K = len(LEVEL_SPARSITY)
    return SupernetSpec(
        units=units,
        sparsity=np.tile(np.array(LEVEL_SPARSITY), (num_units, 1)),
        valid=np.ones((num_units, K), dtype=bool),
        center=np.full(num_units, 2, dtype=np.int32),
    )


def evo_searcher(generations: int = 8) -> EvolutionarySearcher:
    """A small EvoPress configuration: 6 offspring, survivors 3 -> 1 on 64 / 256 tokens."""
    return EvolutionarySearcher(
        generations=generations, offspring=6, survivors=(3, 1), tokens=(64, 256)
    )


def additive_table(num_units: int = NUM_UNITS) -> np.ndarray:
    """float64[L, K]: error of unit l at level k; convex in k, unit weights 1..L."""
    k = np.arange(len(LEVEL_SPARSITY), dtype=np.float64)
    return np.arange(1, num_units + 1, dtype=np.float64)[:, None] * (0.1 * k + 0.05 * k**2)


class AdditiveEvaluator:
    """Score = sum over units of table[l, c_l] * (1 + 0.2 * eps_l) (lower is better).

    ``eps`` float64[L] is drawn from a Generator seeded with (batch_seed, fidelity), so a
    row's score depends only on the row, the fidelity and the minibatch, never on which
    other rows share the call: the ``Evaluate`` contract that makes chunked (Ray) and
    in-process scoring agree exactly.

    Attributes:
      sleep_s: seconds slept per call (stands in for real work).
      die_on_call: if set, the process exits abruptly (``os._exit``) on that call number
        (1-based, counted per evaluator) unless ``marker`` exists; the file is created
        first, so across all processes the death happens once.
      kill_on_call: if set, the process SIGKILLs itself on that call number.
    """

    def __init__(
        self,
        table: np.ndarray,
        *,
        sleep_s: float = 0.0,
        die_on_call: int | None = None,
        marker: str | None = None,
        kill_on_call: int | None = None,
    ) -> None:
        self.table = table
        self.sleep_s = sleep_s
        self.die_on_call = die_on_call
        self.marker = marker
        self.kill_on_call = kill_on_call
        self.calls = 0

    def __call__(self, choices: np.ndarray, *, fidelity: int, batch_seed: int) -> np.ndarray:
        self.calls += 1
        if self.kill_on_call == self.calls:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.die_on_call == self.calls and self.marker is not None:
            if not os.path.exists(self.marker):
                Path(self.marker).write_text(str(os.getpid()))
                os._exit(3)
        if self.sleep_s:
            time.sleep(self.sleep_s)
        choices = np.asarray(choices)
        eps = np.random.default_rng([batch_seed, fidelity]).standard_normal(self.table.shape[0])
        per_unit = self.table[np.arange(self.table.shape[0]), choices] * (1.0 + 0.2 * eps)
        return per_unit.sum(axis=1).astype(np.float32)


@dataclass(frozen=True)
class AdditiveFactory:
    """Picklable factory of :class:`AdditiveEvaluator` (what each Ray actor calls once)."""

    num_units: int = NUM_UNITS
    sleep_s: float = 0.0
    die_on_call: int | None = None
    marker: str | None = None
    kill_on_call: int | None = None

    def __call__(self) -> AdditiveEvaluator:
        return AdditiveEvaluator(
            additive_table(self.num_units),
            sleep_s=self.sleep_s,
            die_on_call=self.die_on_call,
            marker=self.marker,
            kill_on_call=self.kill_on_call,
        )


@dataclass(frozen=True)
class FailingFactory:
    """A factory that cannot build its evaluator (e.g. a missing model directory)."""

    path: str

    def __call__(self) -> AdditiveEvaluator:
        raise FileNotFoundError(f"no model directory at {self.path}")


def result_json(result: SearchResult) -> dict:
    """A SearchResult as exact JSON (floats as hex strings, so equality is bitwise)."""
    return {
        "best_choice": [int(c) for c in result.best_choice],
        "best_fitness": float(result.best_fitness).hex(),
        "evaluations": int(result.evaluations),
        "tokens": int(result.tokens),
        "history": [
            [h.generation, h.evaluations, h.tokens, float(h.best_fitness).hex()]
            for h in result.history
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint-dir", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--kill-at-call", type=int, default=None)
    args = parser.parse_args()

    spec, searcher, key = tiny_spec(), evo_searcher(args.generations), jax.random.key(SEED)
    fingerprint = search_fingerprint(searcher=searcher, spec=spec, budget=BUDGET, key=key)
    start = latest_state(args.checkpoint_dir, fingerprint=fingerprint)
    evaluate = AdditiveFactory(sleep_s=args.sleep, kill_on_call=args.kill_at_call)()
    with (
        SearchCheckpointer(args.checkpoint_dir, fingerprint=fingerprint, max_to_keep=2) as ckpt,
        make_callbacks(
            searcher,
            log_path=args.log,
            checkpointer=ckpt,
            progress=False,
            total_generations=args.generations,
            start_state=start,
        ) as on_generation,
    ):
        result = run_search(
            searcher, evaluate, spec, BUDGET, key=key, on_generation=on_generation, state=start
        )
    out = result_json(result)
    out["resumed_from"] = 0 if start is None else int(start.generation)
    args.out.write_text(json.dumps(out))


if __name__ == "__main__":
    main()
