"""The strategy registry: every strategy's name, kind, settings and factory, read by
every command.

A strategy is one of four kinds:

- ``allocator``: a closed-form allocation from the weights (uniform, OWL, LAMP, ...);
  scores nothing.
- ``table``: an ask/tell :class:`~allocsearch.search.dp.TableSearcher` that measures the
  per-unit error table and solves it (DP, knapsack).
- ``evolutionary``: an ask/tell :class:`~allocsearch.search.evolutionary.EvolutionarySearcher`
  (EvoPress), optionally started from another strategy's allocation (``seeded_by``:
  ``dp+evopress`` is EvoPress started from DP's).
- ``driver``: rebuilds supernets between rounds and runs an inner search (Týr).

Settings. Each key a strategy takes has a *meaning*: the strategy family that defines it
(EvoPress's ``tokens`` is a list of per-stage tokens, a table's ``tokens`` one number).
A config's ``search.settings`` belong to its ``search.strategy``; running another strategy
with the same config (``--strategy``, ``compare``) keeps a key only where it means the
same there, and drops the rest (:func:`resolve_settings`). Per-strategy sub-maps
(``settings: {evopress: {...}, dp: {...}}``) apply to their strategy only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import jax
import numpy as np

from allocsearch.quantizers.costs import spec_quant_levels
from allocsearch.search import baselines
from allocsearch.search.base import Searcher
from allocsearch.search.bits_baselines import owl_bits_choice
from allocsearch.search.budget import Budget
from allocsearch.search.coarse_to_fine import TYR_INITIAL_STEP, TYR_MIN_STEP, TYR_ROUNDS
from allocsearch.search.dp import TableSearcher, dp_solve
from allocsearch.search.evolutionary import EvolutionarySearcher
from allocsearch.search.knapsack import mckp_lagrangian, mckp_milp
from allocsearch.supernet.spec import SupernetSpec

KINDS: Final = ("allocator", "table", "evolutionary", "driver")

# CPU-scaled EvoPress defaults for the demo model (paper: 400 generations, 64 offspring,
# survivors 8 -> 2 -> 1, 2048 -> 16384 -> 65536 tokens; see search/evolutionary.py).
DEMO_EVOPRESS = {
    "generations": 30,
    "offspring": 12,
    "survivors": [3, 1],
    "tokens": [512, 2048],
}

# Týr's own settings (the rest of its settings configure its inner EvoPress search).
TYR_DEFAULTS: Final = {
    "rounds": TYR_ROUNDS,
    "initial_step": TYR_INITIAL_STEP,
    "min_step": TYR_MIN_STEP,
    "input_mode": "expected",
}
TYR_SETTINGS = tuple(TYR_DEFAULTS)

# The table strategies score their error table on the whole calibration set, up to this
# many tokens, unless ``tokens`` is set.
TABLE_TOKENS: Final = 4096
# A seeded EvoPress (dp+evopress) ends with a final pick among its start and its last
# parents (EvolutionarySearcher.final_parents) on the calibration set up to FINAL_TOKENS.
SEEDED_FINAL_PARENTS: Final = 4
FINAL_TOKENS: Final = 8192


@dataclass(frozen=True)
class AllocatorInputs:
    """What allocators read besides the spec and the budget (the pipeline fills it in).

    Attributes:
      weights: layer name -> dense weight (out, in).
      input_norms: returns layer name -> float[in], the calibration inputs' column norms
        (read from the store only by the strategies that need them).
      shapes: layer name -> weight shape.
    """

    weights: Mapping[str, np.ndarray]
    input_norms: Callable[[], Mapping[str, np.ndarray]]
    shapes: Mapping[str, tuple[int, ...]]


Allocate = Callable[[SupernetSpec, Budget, AllocatorInputs, Mapping[str, Any], int], np.ndarray]
"""``allocate(spec, budget, inputs, settings, seed) -> int32[L]`` levels within budget."""


@dataclass(frozen=True)
class Strategy:
    """One registered strategy.

    Attributes:
      name: what commands and configs call it.
      kind: one of :data:`KINDS`.
      summary: one line for help texts.
      settings: key -> meaning (the family that defines it) of every ``search.settings``
        key it takes.
      defaults: the settings it runs with when a config gives none for it.
      allocate: the allocation of an ``allocator`` (None for other kinds).
      seeded_by: an ``evolutionary`` strategy started from this strategy's allocation.
    """

    name: str
    kind: str
    summary: str
    settings: Mapping[str, str] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    allocate: Allocate | None = None
    seeded_by: str | None = None

    @property
    def scored(self) -> bool:
        """Whether it is an ask/tell search that scores candidates (checkpointed)."""
        return self.kind in ("table", "evolutionary")

    @property
    def runs_evopress(self) -> bool:
        """Whether EvoPress runs in it (``--generations`` applies)."""
        return self.kind in ("evolutionary", "driver")


def _keywords(fn: Callable[..., Any], *fixed: str) -> list[str]:
    """Keyword parameters of ``fn`` that settings may set (``fixed`` ones are the caller's)."""
    return [
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and name not in fixed
    ]


def _meaning(keys: list[str], family: str) -> dict[str, str]:
    return dict.fromkeys(keys, family)


_EVO = _meaning(_keywords(EvolutionarySearcher), "evopress")
_TABLE = _meaning(_keywords(TableSearcher, "solver"), "table")


def _owl(spec, budget, inputs: AllocatorInputs, settings, seed) -> np.ndarray:
    norms = inputs.input_norms()
    if spec_quant_levels(spec.level_labels) is not None:  # bitwidth levels: per-layer bits
        return owl_bits_choice(spec, budget, weights=inputs.weights, input_norms=norms, **settings)
    return baselines.owl(spec, budget, weights=inputs.weights, input_norms=norms, **settings)


def _random(spec, budget, inputs: AllocatorInputs, settings, seed) -> np.ndarray:
    return baselines.random_feasible(spec, budget, key=jax.random.key(seed), **settings)


_ALLOCATORS: tuple[Strategy, ...] = (
    Strategy(
        "uniform",
        "allocator",
        "every unit at the target (snapped to its levels)",
        allocate=lambda spec, budget, inputs, settings, seed: baselines.uniform(spec, budget),
    ),
    Strategy(
        "owl",
        "allocator",
        "Outlier Weighed Layerwise sparsity (Yin et al. 2024); on bitwidth levels, more "
        "bits for layers with more outliers",
        _meaning(_keywords(baselines.owl, "spec", "budget", "weights", "input_norms"), "owl"),
        allocate=_owl,
    ),
    Strategy(
        "lamp",
        "allocator",
        "layer-adaptive magnitude pruning scores (Lee et al. 2021)",
        allocate=lambda spec, budget, inputs, settings, seed: baselines.lamp(
            spec, budget, weights=inputs.weights
        ),
    ),
    Strategy(
        "erk",
        "allocator",
        "Erdős-Rényi-Kernel densities from the layer shapes",
        allocate=lambda spec, budget, inputs, settings, seed: baselines.erk(
            spec, budget, shapes=inputs.shapes
        ),
    ),
    Strategy(
        "global_magnitude",
        "allocator",
        "one magnitude threshold over all layers",
        _meaning(
            _keywords(baselines.global_magnitude, "spec", "budget", "weights"), "global_magnitude"
        ),
        allocate=lambda spec, budget, inputs, settings, seed: baselines.global_magnitude(
            spec, budget, weights=inputs.weights, **settings
        ),
    ),
    Strategy(
        "random",
        "allocator",
        "a random feasible allocation (seeded)",
        _meaning(_keywords(baselines.random_feasible, "spec", "budget", "key"), "random"),
        allocate=_random,
    ),
)

_SEARCHES: tuple[Strategy, ...] = (
    Strategy(
        "evopress",
        "evolutionary",
        "EvoPress: level-switch mutations, multi-stage selection (Sieberling et al. 2024)",
        {**_EVO, "seed_from": "evopress"},
        DEMO_EVOPRESS,
    ),
    Strategy(
        "tyr",
        "driver",
        "Týr-the-Pruner: supernets rebuilt around the best, EvoPress inside",
        {**_EVO, **_meaning(list(TYR_SETTINGS), "tyr")},
        DEMO_EVOPRESS,
    ),
    Strategy(
        "dp",
        "table",
        "per-unit error table solved by dynamic programming",
        _TABLE,
    ),
    Strategy(
        "knapsack",
        "table",
        "per-unit error table solved as a multiple-choice knapsack (MILP)",
        _TABLE,
    ),
    Strategy(
        "knapsack_lagrange",
        "table",
        "per-unit error table solved by Lagrangian relaxation",
        _TABLE,
    ),
    Strategy(
        "dp+evopress",
        "evolutionary",
        "DP's error table, then EvoPress started from DP's allocation",
        {**{k: v for k, v in _EVO.items() if k != "start"}, "table_tokens": "dp+evopress"},
        DEMO_EVOPRESS,
        seeded_by="dp",
    ),
)

STRATEGIES: Final[dict[str, Strategy]] = {s.name: s for s in (*_SEARCHES, *_ALLOCATORS)}
"""Every strategy by name, in the order help texts list them."""

STRATEGY_NAMES: Final = tuple(STRATEGIES)
TABLE_STRATEGIES: Final = tuple(s.name for s in _SEARCHES if s.kind == "table")
ALLOCATORS: Final = tuple(s.name for s in _ALLOCATORS)
SCORED_STRATEGIES: Final = tuple(s.name for s in _SEARCHES if s.scored)
"""Ask/tell strategies that score candidates with the evaluator (checkpointed)."""
SOLVERS: Final = {"dp": dp_solve, "knapsack": mckp_milp, "knapsack_lagrange": mckp_lagrangian}


def get(name: str) -> Strategy:
    """The registered strategy ``name``.

    Raises:
      ValueError: naming ``name`` and the valid names."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; valid: {list(STRATEGY_NAMES)}") from None


def help_names(sep: str = " | ") -> str:
    """The strategy names joined for a help text."""
    return sep.join(STRATEGY_NAMES)


def strategy_settings(strategy: str) -> set[str]:
    """The settings keys ``strategy`` accepts (``search.settings`` in a config)."""
    return set(get(strategy).settings)


def check_settings(strategy: str, settings: Mapping[str, Any]) -> None:
    """Refuse settings ``strategy`` does not take, before anything is loaded or run.

    Raises:
      ValueError: naming the strategy, the unknown keys and the valid ones.
    """
    valid = strategy_settings(strategy)
    unknown = sorted(set(settings) - valid)
    if unknown:
        raise ValueError(
            f"bad settings for strategy {strategy!r}: it does not take {unknown}; valid "
            f"settings: {sorted(valid) or 'none'}"
        )
    seed = settings.get("seed_from")
    if seed is not None and seed not in TABLE_STRATEGIES:
        raise ValueError(
            f"settings.seed_from {seed!r} is not valid; choose one of {list(TABLE_STRATEGIES)}"
        )


@dataclass(frozen=True)
class ResolvedSettings:
    """The settings one strategy runs with, and the config keys it left out.

    Attributes:
      settings: what the strategy runs with (its defaults when the config gives none).
      dropped: config keys that belong to another strategy (not used, not recorded).
    """

    settings: dict[str, Any]
    dropped: tuple[str, ...] = ()

    def note(self, strategy: str, owner: str) -> str | None:
        """One line saying which keys were left out and whose they are, or None."""
        if not self.dropped:
            return None
        whose = sorted(
            {owner}
            if set(self.dropped) <= set(get(owner).settings)
            else {s.name for s in STRATEGIES.values() if set(s.settings) & set(self.dropped)}
        )
        return (
            f"note: search.settings {list(self.dropped)} are settings of "
            f"{', '.join(whose)}, not of {strategy}; {strategy} runs without them"
        )


def resolve_settings(
    strategy: str, settings: Mapping[str, Any] | None, *, owner: str
) -> ResolvedSettings:
    """The settings ``strategy`` runs with from a config's ``search.settings``, which
    belong to the config's strategy ``owner``.

    A key is kept when ``strategy`` takes it with the meaning ``owner`` gives it (or
    ``owner`` does not take it at all); a key ``owner`` or another strategy takes, and
    ``strategy`` does not take in that meaning, is dropped. A sub-map named after a
    strategy (``{dp: {tokens: 512}}``) applies to that strategy only, over the rest.
    Keys no strategy takes are kept, so that :func:`check_settings` refuses them. With
    nothing left, the strategy's :attr:`Strategy.defaults`.

    Raises:
      ValueError: an unknown ``strategy`` or ``owner``.
    """
    own, their = get(strategy).settings, get(owner).settings
    every = {k for s in STRATEGIES.values() for k in s.settings}
    flat = {k: v for k, v in (settings or {}).items() if k not in STRATEGIES}
    kept, dropped = {}, []
    for key, value in flat.items():
        meaning = their.get(key, own.get(key))
        if key not in every or (key in own and own[key] == meaning):
            kept[key] = value
        else:
            dropped.append(key)
    sub = (settings or {}).get(strategy)
    if sub is not None:
        if not isinstance(sub, Mapping):
            raise ValueError(
                f"search.settings.{strategy} = {sub!r} must be a mapping of {strategy}'s "
                f"settings (valid: {sorted(own) or 'none'})"
            )
        kept.update(sub)
    return ResolvedSettings(kept or dict(get(strategy).defaults), tuple(dropped))


def _searcher_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(settings)
    for key in ("survivors", "tokens"):
        if isinstance(out.get(key), list | tuple):
            out[key] = tuple(int(v) for v in out[key])
    return out


def make_searcher(strategy: str, settings: Mapping[str, Any]) -> Searcher:
    """The searcher of an ask/tell strategy, with its settings (keyword arguments): for a
    seeded one (``dp+evopress``, or ``evopress`` with ``seed_from``), its EvoPress
    search, whose ``start`` the caller sets (:func:`split_seeded`)."""
    entry = get(strategy)
    s = _searcher_settings(settings)
    try:
        if entry.kind == "evolutionary":
            s.pop("seed_from", None)
            s.pop("table_tokens", None)
            return EvolutionarySearcher(**s)
        if entry.kind == "table":
            return TableSearcher(solver=SOLVERS[strategy], **s)
    except TypeError as e:
        raise ValueError(f"bad settings for strategy {strategy!r}: {e}") from None
    raise ValueError(f"strategy {strategy!r} is not an ask/tell search")


def split_seeded(
    strategy: str, settings: Mapping[str, Any]
) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """``(seed strategy or None, its settings, the EvoPress settings)`` of an
    evolutionary strategy started from another's allocation: ``dp+evopress`` (the table's
    tokens from ``table_tokens``) or ``evopress`` with ``seed_from``; ``(None, {},
    settings)`` for any other."""
    rest = dict(settings)
    entry = get(strategy)
    seed = rest.pop("seed_from", None) if entry.kind == "evolutionary" else None
    seed = entry.seeded_by or seed
    if seed is None:
        return None, {}, rest
    table_tokens = rest.pop("table_tokens", None)
    return seed, ({} if table_tokens is None else {"tokens": int(table_tokens)}), rest


def with_validation_pick(
    strategy: str, settings: Mapping[str, Any], validation_tokens: int | None
) -> dict[str, Any]:
    """EvoPress's ``settings`` (``evopress``, ``dp+evopress``) with its final pick on the
    validation rows when there are any (``validation_tokens``, None: none): the start
    and the last ``final_parents`` (default :data:`SEEDED_FINAL_PARENTS`) distinct
    parents scored on every validation token (``final_tokens`` caps it), the best kept.
    Settings that name ``final_split`` or set ``final_parents: 0`` are kept as given;
    other strategies' settings are returned unchanged."""
    out = dict(settings)
    if not validation_tokens or get(strategy).kind != "evolutionary" or "final_split" in out:
        return out
    out.setdefault("final_parents", SEEDED_FINAL_PARENTS)
    if out["final_parents"]:
        out["final_split"] = "validation"
        tokens = int(out.get("final_tokens") or validation_tokens)
        out["final_tokens"] = min(tokens, int(validation_tokens))
    return out


def fitness_tokens(strategy: str, settings: Mapping[str, Any]) -> int | None:
    """Calibration tokens the best fitness a ``strategy`` search reports is measured on:
    EvoPress's last stage (the parent is re-scored there on a fresh minibatch every
    generation; Týr's inner search and a seeded EvoPress likewise) or a table search's
    per-candidate tokens; None for allocators, which score nothing."""
    entry = get(strategy)
    if entry.kind == "allocator":
        return None
    if entry.kind == "driver":
        inner = {k: v for k, v in settings.items() if k not in TYR_SETTINGS}
        searcher: Any = EvolutionarySearcher(**_searcher_settings(inner or DEMO_EVOPRESS))
    else:
        seed, _, rest = split_seeded(strategy, settings)
        if seed is not None:
            rest.setdefault("final_parents", SEEDED_FINAL_PARENTS)
        if rest.get("final_parents"):  # the final pick's tokens (capped by the pipeline)
            return int(rest.get("final_tokens") or FINAL_TOKENS)
        searcher = make_searcher(strategy, rest)
    tokens = searcher.tokens
    return int(tokens[-1] if isinstance(tokens, tuple | list) else tokens)
