"""Týr-the-Pruner's coarse-to-fine prune-and-search: rebuild the supernet around the best.

After "Týr-the-Pruner" (NeurIPS 2025). A fixed supernet can only offer a few levels per
unit, so a fine allocation needs either a huge supernet or several passes. Týr makes
several passes: round 1 builds a supernet of 9 levels per unit (centre +- 4 steps)
around the uniform target with a step of 12.5% of a unit, an EvoPress-style search
finds the best allocation on it, then every unit is *re-centred* on the sparsity of its
best level, the step is halved (12.5 -> 6.25 -> 3.125 -> 1.5625%) and a new supernet is
built from the dense model; 4 rounds. Each round searches a window around the previous
best at twice the resolution, so the allocation converges on a point between levels
that no single supernet of that size could express.

:func:`coarse_to_fine` is pure orchestration: building a supernet and scoring
candidates are done by a ``rebuild`` callable the caller supplies (e.g. one that calls
:func:`~allocsearch.supernet.build.build_supernet` with a grid from :func:`centred_grid`
and returns the store's spec and an :class:`~allocsearch.evaluate.Evaluator`), and each
round's search is the one ask/tell loop,
:func:`~allocsearch.distributed.local.run_search`. This module does no I/O.

**Feasible starts.** Round ``r + 1`` starts from the re-centred allocation: every unit at
its centre level, which removes ``round_count(c_l, total_l)`` items (weights or groups)
where ``c_l`` is the *exact* sparsity of the unit's round-``r`` best level as recorded in
the round-``r`` spec, i.e. a whole number of items divided by the total. Rounding such a
value back to items is exact, so the centre level removes the same items, costs the same,
and the centre vector costs exactly what the round-``r`` best cost, which met the
budget. The driver does not rely on that argument: it checks the centre vector with
:class:`~allocsearch.search.budget.CostModel` and, if it is not feasible (a rebuild that
rounds differently, a pruner that removes other counts, min/max sparsity limits that
exclude a centre, a re-measured latency table), starts instead from
:func:`~allocsearch.search.budget.snap_to_levels` of the centres (the feasible level vector
nearest to them), verifies that, and records ``start_snapped=True`` in the round's record.
Round 1 starts from :func:`~allocsearch.search.budget.uniform_choice`.

**Checkpoints.** Between rounds the driver's whole state is a :class:`CoarseToFineState`
(a NamedTuple of numpy arrays, floats, ints and tuples: picklable). ``on_round`` receives
it after every round; to resume, call :func:`coarse_to_fine` again with the same
``rebuild``, ``inner``, ``budget``, ``key``, ``rounds`` and steps and ``state=`` the saved
value: it continues with the next round (rebuilding that round's supernet from the saved
centres) and draws the same keys as an uninterrupted run, so the result is the same.
A round interrupted midway is run again from its start.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Final, NamedTuple

import jax
import numpy as np

from allocsearch.distributed.local import run_search
from allocsearch.search.base import Evaluate, HistoryEntry, Searcher
from allocsearch.search.budget import Budget, CostModel, snap_to_levels, uniform_choice
from allocsearch.supernet.levels import CENTRED_STEPS_EACH_SIDE, centred_grid
from allocsearch.supernet.spec import SupernetSpec, Unit

__all__ = [
    "TYR_INITIAL_STEP",
    "TYR_MIN_STEP",
    "TYR_ROUNDS",
    "TYR_STEPS_EACH_SIDE",
    "CoarseToFineResult",
    "CoarseToFineState",
    "Rebuild",
    "RoundRecord",
    "centred_grid",
    "coarse_to_fine",
    "step_schedule",
]

# Týr-the-Pruner's schedule: 4 rounds, steps 12.5 -> 6.25 -> 3.125 -> 1.5625% of a unit,
# 9 levels per unit (centre +- 4 steps).
TYR_ROUNDS: Final[int] = 4
TYR_INITIAL_STEP: Final[float] = 0.125
TYR_MIN_STEP: Final[float] = 0.015625
TYR_STEPS_EACH_SIDE: Final[int] = CENTRED_STEPS_EACH_SIDE

Rebuild = Callable[[np.ndarray, float], tuple[SupernetSpec, Evaluate]]
"""``rebuild(centers, step) -> (spec, evaluate)``: build a supernet whose unit ``l`` is
centred on sparsity ``centers[l]`` (float64[L], fractions of the unit removed) with level
spacing ``step`` (fraction of a unit; e.g. via :func:`centred_grid`), and return its
:class:`~allocsearch.supernet.spec.SupernetSpec` (the units of the driver's ``units``, in
order, with ``center`` the level nearest ``centers``) and an
:class:`~allocsearch.search.base.Evaluate` that scores its level vectors (lower is
better). Called once per round; it may do I/O (it is the caller's code)."""


class RoundRecord(NamedTuple):
    """What one round did (lower fitness is better).

    Attributes:
      round: 1-based round number.
      step: level spacing of the round's supernet, fraction of a unit.
      centers: float64[L], sparsity of every unit's centre level in the round's spec.
      start: int32[L], the allocation the inner search started from (feasible).
      start_snapped: True when ``start`` is not the spec's centre vector: in round 1
        when :func:`~allocsearch.search.budget.uniform_choice` had to snap (the centres
        rounded past the budget or left part of it unused), in later rounds when the
        centre vector was not feasible and ``start`` is
        :func:`~allocsearch.search.budget.snap_to_levels` of the centres.
      best_choice: int32[L], the round's best allocation, levels of the round's spec.
      best_sparsity: float64[L], its per-unit sparsities (the next round's centres).
      best_fitness: its score as the inner search last measured it.
      achieved: fraction of the dense budget cost that ``best_choice`` removes.
      evaluations: candidate scorings of the round.
      tokens: calibration tokens of the round (sum of rows x fidelity).
      search_history: the inner search's per-generation history.
    """

    round: int
    step: float
    centers: np.ndarray
    start: np.ndarray
    start_snapped: bool
    best_choice: np.ndarray
    best_sparsity: np.ndarray
    best_fitness: float
    achieved: float
    evaluations: int
    tokens: int
    search_history: tuple[HistoryEntry, ...]


class CoarseToFineState(NamedTuple):
    """The driver's state between rounds (picklable; see the module docstring on resume).

    Attributes:
      rounds_done: completed rounds.
      centers: float64[L], centres of the next round's supernet (the uniform target
        before round 1, then the last round's best sparsities).
      records: one :class:`RoundRecord` per completed round.
    """

    rounds_done: int
    centers: np.ndarray
    records: tuple[RoundRecord, ...]


class CoarseToFineResult(NamedTuple):
    """What the coarse-to-fine search found.

    Attributes:
      best_choice: int32[L], the last round's best allocation, levels of the last
        round's spec (feasible).
      best_sparsity: float64[L], its per-unit sparsities (fractions removed).
      best_fitness: its score, lower is better.
      achieved: fraction of the dense budget cost it removes.
      evaluations: candidate scorings, summed over rounds.
      tokens: calibration tokens, summed over rounds.
      rounds: one :class:`RoundRecord` per round (steps, centres, starts, best fitness,
        evaluations).
    """

    best_choice: np.ndarray
    best_sparsity: np.ndarray
    best_fitness: float
    achieved: float
    evaluations: int
    tokens: int
    rounds: tuple[RoundRecord, ...]


def step_schedule(*, initial_step: float, min_step: float, rounds: int) -> tuple[float, ...]:
    """Level spacing of every round: ``max(initial_step / 2**(r - 1), min_step)``.

    Args:
      initial_step: round 1's spacing, fraction of a unit in (0, 1] (Týr: 0.125).
      min_step: the smallest spacing, in (0, initial_step] (Týr: 0.015625).
      rounds: number of rounds, >= 1 (Týr: 4).

    Returns:
      ``rounds`` floats, halving each round and never below ``min_step``.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int | np.integer) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    if not (np.isfinite(initial_step) and 0.0 < initial_step <= 1.0):
        raise ValueError(f"initial_step must be a fraction of a unit in (0, 1], got {initial_step}")
    if not (np.isfinite(min_step) and 0.0 < min_step <= initial_step):
        raise ValueError(f"min_step must lie in (0, initial_step={initial_step}], got {min_step!r}")
    return tuple(max(initial_step / 2.0**r, min_step) for r in range(int(rounds)))


def coarse_to_fine(
    *,
    rebuild: Rebuild,
    inner: Searcher,
    units: Sequence[Unit],
    budget: Budget,
    key: jax.Array,
    rounds: int = TYR_ROUNDS,
    initial_step: float = TYR_INITIAL_STEP,
    min_step: float = TYR_MIN_STEP,
    same_role: bool = True,
    on_round: Callable[[CoarseToFineState], None] | None = None,
    state: CoarseToFineState | None = None,
) -> CoarseToFineResult:
    """Týr-style iterative prune-and-search, coarse to fine (see the module docstring).

    Round ``r`` (1-based) calls ``rebuild(centers, step_r)`` with ``step_r`` from
    :func:`step_schedule` (halving, never below ``min_step``) and centres the uniform
    target ``budget.target`` in round 1, then the previous round's best sparsities; runs
    ``inner`` on the returned spec with :func:`~allocsearch.distributed.local.run_search`
    and key ``jax.random.fold_in(key, r)``, starting from the round's start allocation
    (feasible, see the module docstring); and re-centres on the best it found.

    Args:
      rebuild: builds each round's supernet and its evaluator (see :data:`Rebuild`).
      inner: the per-round search, e.g. :class:`~allocsearch.search.evolutionary.
        EvolutionarySearcher`. A searcher with a ``start`` field gets the round's start
        allocation (its own ``start`` is replaced: it could not refer to a spec built
        here); one with a ``same_role`` field gets ``same_role``. Others run as given.
      units: the supernet's units in order; every rebuilt spec must have exactly these.
      budget: the global budget; every round's best meets it.
      key: JAX key; the whole run is a function of it (and of ``rebuild``).
      rounds: number of rounds (Týr: 4).
      initial_step: round 1's level spacing, fraction of a unit (Týr: 0.125).
      min_step: the smallest spacing (Týr: 0.015625, reached in round 4).
      same_role: swap levels only between units of the same role (Týr: True).
      on_round: called with the state after every round (checkpoint it to resume).
      state: a state saved by ``on_round`` to resume from, with otherwise equal arguments.

    Returns:
      The last round's best allocation with counters summed over rounds; fitness is
      lower-is-better.

    Raises:
      ValueError: bad arguments, a rebuilt spec whose units differ from ``units``, a
        resumed state that does not fit, or an inner search that returned an
        allocation outside the budget.
      InfeasibleBudgetError: a rebuilt supernet cannot meet the budget at all.
    """
    if not callable(rebuild):
        raise ValueError(
            f"rebuild must be a callable (centers, step) -> (spec, evaluate), got {rebuild!r}"
        )
    if not isinstance(inner, Searcher):
        raise ValueError(f"inner must be a Searcher (e.g. EvolutionarySearcher), got {inner!r}")
    steps = step_schedule(initial_step=initial_step, min_step=min_step, rounds=rounds)
    units = tuple(units)
    if not units:
        raise ValueError("units must list the supernet's units (supernet_units(...)), got none")
    if state is None:
        state = CoarseToFineState(
            rounds_done=0, centers=np.full(len(units), float(budget.target)), records=()
        )
    _check_state(state, len(units), rounds)

    while state.rounds_done < rounds:
        r = state.rounds_done + 1
        record = _round(
            r, steps[r - 1], state.centers, rebuild, inner, units, budget, key, same_role
        )
        state = CoarseToFineState(
            rounds_done=r, centers=record.best_sparsity.copy(), records=(*state.records, record)
        )
        if on_round is not None:
            on_round(state)

    last = state.records[-1]
    return CoarseToFineResult(
        best_choice=last.best_choice.copy(),
        best_sparsity=last.best_sparsity.copy(),
        best_fitness=last.best_fitness,
        achieved=last.achieved,
        evaluations=sum(rec.evaluations for rec in state.records),
        tokens=sum(rec.tokens for rec in state.records),
        rounds=state.records,
    )


def _round(
    r: int,
    step: float,
    centers: np.ndarray,
    rebuild: Rebuild,
    inner: Searcher,
    units: tuple[Unit, ...],
    budget: Budget,
    key: jax.Array,
    same_role: bool,
) -> RoundRecord:
    """Round ``r``: rebuild around ``centers`` at ``step``, search from the round's start,
    check the best. The round's supernet and evaluator (device memory) go when it returns."""
    spec, evaluate = rebuild(centers.copy(), step)
    _check_spec(spec, units, r)
    costs = CostModel.from_spec(spec, budget)
    if r == 1:
        start = uniform_choice(spec, budget)
    else:
        start = _recentred_start(spec, budget, costs, centers)
    snapped = not np.array_equal(start, spec.center)
    searcher = _for_round(inner, start, same_role)
    found = run_search(searcher, evaluate, spec, budget, key=jax.random.fold_in(key, r))
    best = np.asarray(found.best_choice, dtype=np.int32)
    if best.shape != (spec.num_units,) or not bool(costs.is_feasible(best)):
        raise ValueError(
            f"round {r}: the inner search {type(inner).__name__} returned {best}, which "
            f"is not a level vector int[L={spec.num_units}] within the budget"
        )
    return RoundRecord(
        round=r,
        step=step,
        centers=spec.sparsities_of(spec.center),
        start=start,
        start_snapped=snapped,
        best_choice=best,
        best_sparsity=spec.sparsities_of(best),
        best_fitness=float(found.best_fitness),
        achieved=float(costs.achieved(best)),
        evaluations=int(found.evaluations),
        tokens=int(found.tokens),
        search_history=tuple(found.history),
    )


def _recentred_start(
    spec: SupernetSpec, budget: Budget, costs: CostModel, centers: np.ndarray
) -> np.ndarray:
    """int32[L]: the centre vector if it is feasible, else the snapped centres."""
    start = spec.center.astype(np.int32)
    if bool(costs.is_feasible(start)):
        return start
    start = snap_to_levels(spec, budget, centers)
    if not bool(costs.is_feasible(start)):  # snap_to_levels promises this; checked anyway
        raise ValueError(
            f"no feasible start near the centres {centers.tolist()}: snap_to_levels gave "
            f"{start.tolist()}, which costs {float(costs.total_cost(start))} > capacity "
            f"{costs.capacity}"
        )
    return start


def _for_round(inner: Searcher, start: np.ndarray, same_role: bool) -> Searcher:
    """``inner`` with the round's start and ``same_role`` where it has such fields."""
    if not dataclasses.is_dataclass(inner):
        return inner
    fields = {f.name for f in dataclasses.fields(inner)}
    changes: dict[str, object] = {}
    if "start" in fields:
        changes["start"] = start.copy()
    if "same_role" in fields:
        changes["same_role"] = bool(same_role)
    return dataclasses.replace(inner, **changes) if changes else inner


def _check_spec(spec: SupernetSpec, units: tuple[Unit, ...], r: int) -> None:
    if not isinstance(spec, SupernetSpec):
        raise ValueError(f"round {r}: rebuild must return (SupernetSpec, evaluate), got {spec!r}")
    got = [(u.name, u.role) for u in spec.units]
    want = [(u.name, u.role) for u in units]
    if got != want:
        diff = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
        raise ValueError(
            f"round {r}: the rebuilt spec has {len(got)} units, expected the {len(want)} units "
            f"given as `units`, in order"
            + (f"; unit {diff} is {got[diff]}, expected {want[diff]}" if diff is not None else "")
        )


def _check_state(state: CoarseToFineState, n_units: int, rounds: int) -> None:
    if not isinstance(state, CoarseToFineState):
        raise ValueError(f"state must be a CoarseToFineState saved by on_round, got {state!r}")
    centers = np.asarray(state.centers)
    if centers.shape != (n_units,) or not np.all((centers >= 0) & (centers <= 1)):
        raise ValueError(
            f"state.centers must be float[L={n_units}] in [0, 1], got shape {centers.shape}"
        )
    if not (0 <= state.rounds_done <= rounds) or len(state.records) != state.rounds_done:
        raise ValueError(
            f"state has {state.rounds_done} rounds done and {len(state.records)} records; "
            f"a state for a run of {rounds} rounds has 0..{rounds} of each, equal"
        )
