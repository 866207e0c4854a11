"""EvoPress: (1 + lambda) elitist evolutionary search with multi-stage selection.

After Sieberling et al., "EvoPress: Accurate Dynamic Model Compression via Evolutionary
Search" (ICML 2025). Each generation mutates the parent into ``offspring`` distinct
feasible children, then selects in stages:
every stage scores its candidates on a fresh random minibatch of growing size, the best
``survivors[i]`` go on, and in the last stage the parent is re-scored beside them so a
lucky early score cannot stick (elitism on fresh data). Cheap low-fidelity stages throw
away most children, so most tokens are spent on the few that matter.

Two mutations (:data:`MUTATIONS`):

- ``"swap"`` (the paper's): a few *level switches*, each one unit one level sparser and
  another one level denser at equal step cost, so the total cost never changes. Complete
  on EvoPress's equal-weight grids, where every step costs the same; where steps differ
  (structured supernets: an attention kv group and a block of MLP neurons remove very
  different numbers of weights) only equal-cost units trade, so budget can never move
  between, e.g., attention and MLP.
- ``"repair"``: a few random single-level moves, then *repair* (random units one level
  sparser until the child fits the budget) and *fill* (random units one level denser
  while it still fits). Any unit can trade budget with any other, at the price that the
  total cost is kept feasible (at most the capacity), not exact: with coarse levels the
  target generally cannot be hit exactly.

``"auto"`` picks ``"swap"`` on equal-step grids (so EvoPress runs are unchanged) and
``"repair"`` otherwise.

Guided switches (``guided > 0``, our addition; ``guided=0`` is the published loop). The
first stage scores every child on one shared minibatch, and each child differs from the
parent in a few known units: the centred score ranks times the level changes give, per
unit, a noisy estimate of whether making it sparser helped (a finite-difference
gradient, as in evolution strategies). It is kept as a decayed sum over generations (the
unit's *credit*), and half of the swap draws pick the unit to make sparser with weight
exp(-guided * credit / sd) and its partner with the opposite weight; the other half stay
uniform, so every switch remains possible. No evaluation is added: the information was
paid for and thrown away. Measured on the demo (docs/RESULTS.md, "EvoPress loop"): whole
calibration KL 0.0317 against 0.0344 for the published loop at the same 480 evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, final

import jax
import numpy as np

from allocsearch.search.base import (
    HistoryEntry,
    Query,
    Searcher,
    SearchResult,
    check_told,
    draw_batch_seed,
    numpy_rng,
)
from allocsearch.search.budget import Budget, CostModel, check_feasible_target, uniform_choice
from allocsearch.supernet.spec import SupernetSpec

# Mutation operators of :class:`EvolutionarySearcher` ("auto" resolves to one of the others).
MutationKind = Literal["auto", "swap", "repair"]
MUTATIONS: tuple[str, ...] = ("auto", "swap", "repair")
# Defaults of the EvoPress paper for unstructured sparsity on 7-8B models (GPU scale).
PAPER_GENERATIONS = 400
PAPER_OFFSPRING = 64
PAPER_SURVIVORS = (8, 2, 1)
PAPER_TOKENS = (2048, 16384, 65536)

# Two level steps "match" (swapping them keeps the total cost) when their costs agree to
# this relative tolerance; any drift left is caught by the feasibility check of each child.
STEP_RTOL = 1e-6
# Mutation attempts per requested child before a generation goes on with fewer children.
_ATTEMPTS_PER_CHILD = 50


class EvolutionState(NamedTuple):
    """State of :class:`EvolutionarySearcher` (picklable).

    Attributes:
      costs: the budget bound to the supernet.
      groups: int32[L], swap group of each unit (all 0 unless ``same_role``).
      parent: int32[L], current best allocation.
      parent_fitness: its score in the last stage of the latest generation (inf before).
      stage: selection stage the next ask belongs to (0 = new offspring).
      candidates: int32[m, L], survivors of the previous stage (empty at stage 0).
      pending: the query awaiting its tell, or None.
      step, generation, evaluations, tokens: counters.
      history: one entry per finished generation.
      mutation: the mutation in use, ``"swap"`` or ``"repair"`` (``"auto"`` resolved by
        the step costs at init; states pickled before the field existed
        resume with ``"swap"``, the only mutation there was).
      credit: float64[L], each unit's credit for guided switches (None before the first
        scored generation, or in states pickled before the field existed).
      parents: the start and, with ``final_parents``, the latest distinct parents (the
        final pick's candidates).
      validation_evaluations, validation_tokens: the share of ``evaluations`` and
        ``tokens`` a validation final pick (``final_split="validation"``) scored.
    """

    costs: CostModel
    groups: np.ndarray
    parent: np.ndarray
    parent_fitness: float
    stage: int
    candidates: np.ndarray
    pending: Query | None
    step: int
    generation: int
    evaluations: int
    tokens: int
    history: tuple[HistoryEntry, ...]
    mutation: str = "swap"
    credit: np.ndarray | None = None
    parents: tuple[np.ndarray, ...] = ()
    validation_evaluations: int = 0
    validation_tokens: int = 0


@final
@dataclass(frozen=True, kw_only=True, eq=False)
class EvolutionarySearcher(Searcher):
    """EvoPress search over level vectors (defaults scaled down for CPU runs).

    Attributes:
      generations: number of generations (paper: :data:`PAPER_GENERATIONS`).
      offspring: children per generation, lambda (paper: :data:`PAPER_OFFSPRING`).
      survivors: candidates kept after each stage; the last must be 1 (the new parent,
        chosen among the last survivors and the re-scored parent). Paper: (8, 2, 1).
      tokens: calibration tokens per stage, one per stage (paper: 2048, 16384, 65536).
      max_switches: a child gets k = min(U{1..m}, U{1..m}) level switches (swap) or
        single-level moves before repair and fill (repair). Paper: m=3.
      same_role: only trade budget between units of the same role (Týr-the-Pruner):
        swaps pair units of one role; a repair child moves, repairs and fills only the
        units of one role (that of a random movable unit), the others keep the parent's
        levels.
      start: int[L] starting allocation (e.g. from DP or knapsack); default: the
        uniform allocation of :func:`~allocsearch.search.budget.uniform_choice`.
      mutation: one of :data:`MUTATIONS`. ``"swap"``: k level switches, each pairing a
        unit's step up with another unit's step down of the same cost (to
        :data:`STEP_RTOL`), so the total cost stays exact; with EvoPress's equal-weight
        grids every step matches, with others only equal-cost steps do. ``"repair"``: k
        random single-level moves (a random movable unit one level sparser or denser,
        within its allowed levels), then repair (while over the budget's capacity, a
        random unit that can go sparser goes one level sparser) and fill (while some unit
        can go one level denser and the child still fits, a random such unit does);
        budget moves between any units, and repair keeps every child *feasible* (kept
        cost <= capacity, i.e. removes at least the target), not at an exact cost.
        ``"auto"`` (default): ``"swap"`` when every allowed level step of every unit
        costs the same to :data:`STEP_RTOL` (EvoPress grids; results identical to
        ``"swap"``), else ``"repair"``.
      final_parents: > 0: after the last generation, score the start and the last
        ``final_parents`` distinct parents once more, on one shared minibatch of
        ``final_tokens`` tokens, and keep the best (0: the last parent).
      final_split: which rows that final pick scores: ``"calibration"`` or
        ``"validation"`` (rows the generations never score, so the pick does not favour
        the parent that fits the calibration rows best by chance; ``final_tokens`` then
        counts validation tokens). Its evaluations and tokens count in the result's, and
        on their own in ``info`` (``validation_evaluations``, ``validation_tokens``).
    """

    generations: int = 100
    offspring: int = 16
    survivors: tuple[int, ...] = (4, 2, 1)
    tokens: tuple[int, ...] = (512, 2048, 8192)
    max_switches: int = 3
    same_role: bool = False
    start: np.ndarray | None = None
    mutation: MutationKind = "auto"
    guided: float = 1.0
    credit_decay: float = 0.8
    final_parents: int = 0
    final_tokens: int | None = None
    final_split: str = "calibration"

    def __post_init__(self) -> None:
        if self.mutation not in MUTATIONS:
            raise ValueError(f"mutation {self.mutation!r} is not one of {MUTATIONS}")
        if self.generations < 1 or self.offspring < 1 or self.max_switches < 1:
            raise ValueError(
                f"generations ({self.generations}), offspring ({self.offspring}) and "
                f"max_switches ({self.max_switches}) must be >= 1"
            )
        if len(self.survivors) != len(self.tokens) or not self.survivors:
            raise ValueError(
                f"survivors {self.survivors} and tokens {self.tokens} need one entry per stage"
            )
        if self.survivors[-1] != 1:
            raise ValueError(f"the last stage keeps 1 candidate, got survivors {self.survivors}")
        if any(a < b for a, b in zip(self.survivors, self.survivors[1:], strict=False)) or (
            self.survivors[0] > self.offspring
        ):
            raise ValueError(
                f"survivors {self.survivors} must be non-increasing and at most offspring "
                f"({self.offspring})"
            )
        if self.final_parents < 0 or (self.final_parents and (self.final_tokens or 0) < 1):
            raise ValueError(
                f"final_parents ({self.final_parents}) must be >= 0, and final_tokens "
                f"({self.final_tokens}) >= 1 when it is > 0"
            )
        if self.final_split not in ("calibration", "validation"):
            raise ValueError(
                f"final_split {self.final_split!r} is not one of ('calibration', 'validation')"
            )
        if self.guided < 0 or not 0 <= self.credit_decay < 1:
            raise ValueError(
                f"guided ({self.guided}) must be >= 0 and credit_decay ({self.credit_decay}) "
                "in [0, 1)"
            )
        if any(t < 1 for t in self.tokens):
            raise ValueError(f"tokens per stage must be >= 1, got {self.tokens}")

    def init(self, spec: SupernetSpec, budget: Budget, key: jax.Array) -> EvolutionState:
        check_feasible_target(spec, budget)
        costs = CostModel.from_spec(spec, budget)
        if self.start is None:
            parent = uniform_choice(spec, budget)
        else:
            parent = np.asarray(self.start)
            if parent.shape != (spec.num_units,) or not bool(costs.is_feasible(parent)):
                raise ValueError(
                    f"start must be a level vector int[L={spec.num_units}] within the allowed "
                    f"levels and the budget (removing >= {budget.target} of the dense "
                    f"{budget.kind}); got shape {parent.shape}: {parent}"
                )
        if self.same_role:
            roles = sorted({u.role for u in spec.units})
            groups = np.array([roles.index(u.role) for u in spec.units], dtype=np.int32)
        else:
            groups = np.zeros(spec.num_units, dtype=np.int32)
        return EvolutionState(
            costs=costs,
            groups=groups,
            parent=parent.astype(np.int32),
            parent_fitness=float("inf"),
            stage=0,
            candidates=np.zeros((0, spec.num_units), dtype=np.int32),
            pending=None,
            step=0,
            generation=0,
            evaluations=0,
            tokens=0,
            history=(),
            mutation=self._resolved_mutation(costs),
            parents=(parent.astype(np.int32),),
        )

    def ask(self, state: EvolutionState, key: jax.Array) -> tuple[Query, EvolutionState]:
        if state.pending is not None:
            raise ValueError("ask() called twice without tell(); tell the pending query first")
        rng = numpy_rng(key)
        if state.stage == len(self.survivors):  # the final pick
            query = Query(
                choices=np.unique(np.stack((*state.parents, state.parent)), axis=0).astype(
                    np.int32
                ),
                fidelity=int(self.final_tokens or 0),
                batch_seed=draw_batch_seed(rng),
                split=self.final_split,
            )
            return query, state._replace(pending=query)
        if state.stage == 0:
            rows = self._offspring(state, rng)
        else:
            rows = state.candidates
        if state.stage == len(self.survivors) - 1:
            # The parent is re-scored with the last survivors; first row, so ties keep it.
            rows = np.concatenate([state.parent[None, :], rows], axis=0)
        query = Query(
            choices=rows.astype(np.int32),
            fidelity=int(self.tokens[state.stage]),
            batch_seed=draw_batch_seed(rng),
        )
        return query, state._replace(pending=query)

    def tell(self, state: EvolutionState, query: Query, scores: np.ndarray) -> EvolutionState:
        scores = check_told(state.pending, query, scores)
        n = query.choices.shape[0]
        order = np.argsort(scores, kind="stable")
        evaluations = state.evaluations + n
        tokens = state.tokens + n * query.fidelity
        common = dict(pending=None, step=state.step + 1, evaluations=evaluations, tokens=tokens)
        if state.stage == len(self.survivors):
            best = int(order[0])
            if query.split == "validation":
                common.update(
                    validation_evaluations=state.validation_evaluations + n,
                    validation_tokens=state.validation_tokens + n * query.fidelity,
                )
            return state._replace(
                parent=query.choices[best].copy(), parent_fitness=float(scores[best]), stage=0,
                **common,
            )  # fmt: skip
        if state.stage == 0 and self.guided > 0:
            state = state._replace(credit=self._credit(state, query.choices, scores))
        if state.stage < len(self.survivors) - 1:
            keep = order[: self.survivors[state.stage]]
            return state._replace(stage=state.stage + 1, candidates=query.choices[keep], **common)
        best = int(order[0])
        fitness = float(scores[best])
        entry = HistoryEntry(state.generation + 1, evaluations, tokens, fitness)
        parent = query.choices[best].copy()
        last = self.final_parents > 0 and state.generation + 1 == self.generations
        return state._replace(
            parent=parent,
            parent_fitness=fitness,
            stage=len(self.survivors) if last else 0,
            candidates=np.zeros((0, state.parent.shape[0]), dtype=np.int32),
            generation=state.generation + 1,
            history=(*state.history, entry),
            parents=self._kept_parents(state.parents, parent),
            **common,
        )

    def _kept_parents(self, parents: tuple[np.ndarray, ...], parent: np.ndarray):
        """The start, then the last ``final_parents`` distinct parents (with ``parent``)."""
        if not self.final_parents or not parents:
            return parents[:1]
        recent = [p for p in parents[1:] if not np.array_equal(p, parent)]
        keep = self.final_parents - 1
        return (parents[0], *(recent[len(recent) - keep :] if keep else []), parent)

    def done(self, state: EvolutionState) -> bool:
        return state.generation >= self.generations and state.stage != len(self.survivors)

    def result(self, state: EvolutionState) -> SearchResult:
        return SearchResult(
            best_choice=state.parent.copy(),
            best_fitness=state.parent_fitness,
            evaluations=state.evaluations,
            tokens=state.tokens,
            history=state.history,
            info={
                "achieved": float(state.costs.achieved(state.parent)),
                **(
                    {
                        "validation_evaluations": float(state.validation_evaluations),
                        "validation_tokens": float(state.validation_tokens),
                    }
                    if state.validation_evaluations
                    else {}
                ),
            },
        )

    def _credit(self, state: EvolutionState, choices: np.ndarray, scores: np.ndarray):
        """float64[L]: decayed sum over generations of (centred score rank) x (level change)
        of each child against the parent: negative where going sparser scored well."""
        n = len(scores)
        ranks = np.empty(n)
        ranks[np.argsort(scores, kind="stable")] = np.arange(n)
        z = (ranks - (n - 1) / 2) / max(n - 1, 1)
        delta = choices.astype(np.float64) - state.parent[None, :]
        prev = state.credit if state.credit is not None else np.zeros(delta.shape[1])
        return self.credit_decay * prev + z @ delta

    def _bias(self, state: EvolutionState) -> np.ndarray | None:
        """float64[L]: log-weight of drawing each unit to go sparser (its negation: denser)."""
        if self.guided <= 0 or state.credit is None:
            return None
        c = state.credit
        sd = c.std()
        return None if sd == 0 else -self.guided * c / sd

    def _resolved_mutation(self, costs: CostModel) -> str:
        if self.mutation != "auto":
            return self.mutation
        return "swap" if costs.has_equal_steps(STEP_RTOL) else "repair"

    def _offspring(self, state: EvolutionState, rng: np.random.Generator) -> np.ndarray:
        """int32[n, L]: up to ``offspring`` distinct feasible children, none equal the parent."""
        seen = {state.parent.tobytes()}
        children: list[np.ndarray] = []
        for _ in range(_ATTEMPTS_PER_CHILD * self.offspring):
            if len(children) == self.offspring:
                break
            k = min(rng.integers(1, self.max_switches + 1), rng.integers(1, self.max_switches + 1))
            if state.mutation == "repair":
                child = _repaired_child(state.parent, state.costs, state.groups, int(k), rng)
                if child is None:
                    continue
            else:
                child = state.parent.copy()
                bias = self._bias(state)
                if not all(_switch(child, state.costs, state.groups, rng, bias) for _ in range(k)):
                    continue
            if child.tobytes() in seen or not bool(state.costs.is_feasible(child)):
                continue
            seen.add(child.tobytes())
            children.append(child)
        if not children and state.mutation == "repair":
            raise RuntimeError(
                "no feasible child differs from the current allocation: single-level moves, "
                "repair and fill always lead back to it"
                + (" within each role" if self.same_role else "")
                + "; give the units more allowed levels (supernet levels, min/max sparsity)"
            )
        if not children:
            raise RuntimeError(
                "no budget-preserving level switch exists from the current allocation: no "
                "unit can step up by the cost another can step down"
                + (" within its role" if self.same_role else "")
                + '; use mutation="repair" (or "auto") or a supernet with equal-cost '
                "(EvoPress-style) level steps"
            )
        return np.stack(children)


def _repaired_child(
    parent: np.ndarray,
    costs: CostModel,
    groups: np.ndarray,
    k: int,
    rng: np.random.Generator,
) -> np.ndarray | None:
    """int32[L]: ``parent`` after k random single-level moves, repair and fill.

    Only units of one swap group (that of a random movable unit) change. Repair steps
    random units of the group one level sparser while the child is over the capacity;
    fill steps random units one level denser while the child stays feasible. Returns None
    when no unit can move, or when repair runs out of sparser levels while still over the
    capacity (possible only for costs that do not fall with sparsity, e.g. measured
    latency).
    """
    K = costs.cost.shape[1]
    upper = np.where(costs.allowed, np.arange(K)[None, :], -1).max(axis=1)  # sparsest
    lower = np.argmax(costs.allowed, axis=1)  # densest allowed (contiguous run)
    movable = np.flatnonzero(upper > lower)
    if movable.size == 0:
        return None
    members = groups == groups[movable[rng.integers(movable.size)]]
    child = parent.copy()
    for _ in range(k):
        can_up = members & (child < upper)
        can_down = members & (child > lower)
        options = np.concatenate([np.flatnonzero(can_up) * 2, np.flatnonzero(can_down) * 2 + 1])
        move = int(options[rng.integers(options.size)])
        child[move // 2] += 1 if move % 2 == 0 else -1
    while not bool(costs.is_feasible(child)):  # repair: sparser until within the capacity
        sparser = np.flatnonzero(members & (child < upper))
        if sparser.size == 0:
            return None
        child[sparser[rng.integers(sparser.size)]] += 1
    while True:  # fill: denser while within the capacity
        denser = np.flatnonzero(members & (child > lower))
        if denser.size == 0:
            break
        trial = np.repeat(child[None, :], denser.size, axis=0)
        trial[np.arange(denser.size), denser] -= 1
        fits = denser[costs.is_feasible(trial)]
        if fits.size == 0:
            break
        child[fits[rng.integers(fits.size)]] -= 1
    return child


def _switch(
    choice: np.ndarray,
    costs: CostModel,
    groups: np.ndarray,
    rng: np.random.Generator,
    bias: np.ndarray | None = None,
) -> bool:
    """Move one random unit a level up and another a level down at equal step cost, in place.

    Returns False (leaving ``choice`` unchanged) when no such pair exists.
    """
    L, K = costs.cost.shape
    rows = np.arange(L)
    cur = costs.cost[rows, choice]
    up_ok = (choice + 1 < K) & costs.allowed[rows, np.minimum(choice + 1, K - 1)]
    down_ok = (choice > 0) & costs.allowed[rows, np.maximum(choice - 1, 0)]
    # Cost saved by stepping up, cost added by stepping down (nan where impossible).
    with np.errstate(invalid="ignore"):
        saved = np.where(up_ok, cur - costs.cost[rows, np.minimum(choice + 1, K - 1)], np.nan)
        added = np.where(down_ok, costs.cost[rows, np.maximum(choice - 1, 0)] - cur, np.nan)
    for a in _weighted_order(np.flatnonzero(up_ok), bias, rng):
        tol = STEP_RTOL * np.maximum(np.abs(saved[a]), np.abs(added))
        match = down_ok & (np.abs(added - saved[a]) <= tol) & (rows != a) & (groups == groups[a])
        partners = np.flatnonzero(match)
        if partners.size:
            if bias is None:
                b = partners[rng.integers(partners.size)]
            else:
                b = _weighted_order(partners, -bias, rng)[0]
            choice[a] += 1
            choice[b] -= 1
            return True
    return False


def _weighted_order(units: np.ndarray, bias: np.ndarray | None, rng) -> np.ndarray:
    """``units`` in a random order: uniform, or (with log-weights ``bias``) half the draws
    uniform and half weighted by exp(bias)."""
    if bias is None or units.size < 2 or rng.random() < 0.5:
        return rng.permutation(units)
    w = np.exp(bias[units] - bias[units].max())
    return rng.choice(units, size=units.size, replace=False, p=w / w.sum())
