"""All budget arithmetic: what an allocation costs, which levels it may use, whether it fits.

A :class:`Budget` says how much of the dense model's cost must be *removed* (params,
MACs per token, measured latency, a number of dropped sublayers, bits or bytes) and which
sparsities each unit may take. Bound to a :class:`~allocsearch.supernet.spec.SupernetSpec`
it becomes a :class:`CostModel`: a kept cost table ``float64[L, K]`` (``inf`` at levels a
unit may not use) and the capacity, the largest kept cost an allocation may have. Every
searcher, solver and baseline does its budget checks through this module and nowhere else
(STYLE.md habit 2).

Conventions: ``L`` units, ``K`` levels (padded); a *choice* is a level vector ``int[L]``
(or ``int[n, L]`` for ``n`` candidates); level index increases sparsity. Costs are *kept*
costs, lower is cheaper. Fractions are of the dense cost, in ``[0, 1]``. MACs per token
are those of an average token: a mixture-of-experts expert's are weighted by its measured
routing frequency (``SupernetSpec.flops_per_token``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from allocsearch.supernet.depth import kept_sublayers, sublayers_per_unit
from allocsearch.supernet.spec import SupernetSpec

BudgetKind = Literal["params", "flops", "latency", "sublayers", "bits", "bytes"]
BUDGET_KINDS: tuple[str, ...] = ("params", "flops", "latency", "sublayers", "bits", "bytes")

FULL_BITS = 16
"""Bits per weight of the dense (16-bit) model that ``bits`` and ``bytes`` fractions refer
to: a ``bits`` budget at target ``t`` allows ``16 (1 - t)`` bits per prunable weight."""

# Relative slack allowed when comparing a kept cost with the capacity: sums of float64
# costs taken in different orders differ by a few ulps, which must not flip feasibility.
FEASIBILITY_RTOL = 1e-9
# Slack when comparing level sparsities with per-unit min/max limits.
_SPARSITY_ATOL = 1e-12


class InfeasibleBudgetError(ValueError):
    """The budget cannot be met (or cannot be reached) by any allocation of the supernet."""


@dataclass(frozen=True, eq=False)
class LatencyTable:
    """Measured latency of every unit at every level.

    Attributes:
      kept: float64[L, K], seconds per forward pass spent in the unit at each level
        (lower is cheaper); ``inf`` at invalid levels.
      dense: float64[L], seconds of the dense unit; the reference that the budget's
        fraction is taken of.
    """

    kept: np.ndarray
    dense: np.ndarray


@dataclass(frozen=True, eq=False)
class Budget:
    """A global budget on the pruned model.

    Attributes:
      kind: ``"params"`` (weights kept), ``"flops"`` (MACs per token kept),
        ``"latency"`` (seconds kept, from ``latency``), ``"sublayers"`` (attention and
        MLP sublayers kept, whatever their sizes: a depth supernet's units cost 1, or 2
        for a whole block, and 0 at their dropped level; see
        :func:`~allocsearch.supernet.depth.kept_sublayers`), ``"bits"`` (bits the prunable
        weights keep, scales and zero points counted; the dense model is 16 bits per
        weight; see :func:`kept_bits`) or ``"bytes"`` (those bits / 8: the prunable
        bytes). :meth:`from_average_bits` makes a bits budget from average bits.
      target: fraction of the dense cost to remove, in ``[0, 1]`` (0.7 = remove 70% of
        the weights for ``kind="params"``; ``k / n`` = drop at least ``k`` of ``n``
        sublayers for ``kind="sublayers"``). An allocation is feasible when its kept cost
        is at most ``(1 - target)`` times the dense cost.
      min_sparsity: lowest sparsity a unit may take: a scalar for all units or float[L].
      max_sparsity: highest sparsity a unit may take: a scalar or float[L].
      latency: the measured table, required for (and only for) ``kind="latency"``;
        see :func:`load_latency_table`.
    """

    kind: BudgetKind
    target: float
    min_sparsity: float | np.ndarray = 0.0
    max_sparsity: float | np.ndarray = 1.0
    latency: LatencyTable | None = None

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ValueError(f"budget kind {self.kind!r} is not one of {BUDGET_KINDS}")
        if not (np.isfinite(self.target) and 0.0 <= self.target <= 1.0):
            raise ValueError(f"budget target {self.target!r} must be a fraction in [0, 1]")
        lo = np.asarray(self.min_sparsity, dtype=np.float64)
        hi = np.asarray(self.max_sparsity, dtype=np.float64)
        for name, arr in (("min_sparsity", lo), ("max_sparsity", hi)):
            if arr.ndim > 1:
                raise ValueError(f"{name} must be a scalar or float[L], got shape {arr.shape}")
            if np.any(~np.isfinite(arr)) or np.any(arr < 0) or np.any(arr > 1):
                raise ValueError(f"{name} must lie in [0, 1], got {arr}")
        if lo.shape == hi.shape or lo.ndim == 0 or hi.ndim == 0:
            if np.any(lo > hi):
                raise ValueError(f"min_sparsity {lo} exceeds max_sparsity {hi} for some unit")
        else:
            raise ValueError(
                f"min_sparsity {lo.shape} and max_sparsity {hi.shape} differ in length"
            )
        if (self.kind == "latency") != (self.latency is not None):
            raise ValueError(
                f"a latency table is required for kind='latency' and only for it "
                f"(kind={self.kind!r}, latency given: {self.latency is not None})"
            )

    @classmethod
    def from_average_bits(
        cls,
        bits: float,
        *,
        min_sparsity: float | np.ndarray = 0.0,
        max_sparsity: float | np.ndarray = 1.0,
    ) -> Budget:
        """A ``bits`` budget of at most ``bits`` bits per prunable weight on average (scales
        and zero points counted): target ``1 - bits / 16``."""
        return cls(
            kind="bits",
            target=average_bits_to_target(bits),
            min_sparsity=min_sparsity,
            max_sparsity=max_sparsity,
        )

    @classmethod
    def from_count(
        cls,
        removed: float,
        *,
        spec: SupernetSpec,
        kind: Literal["params", "flops"] = "params",
        min_sparsity: float | np.ndarray = 0.0,
        max_sparsity: float | np.ndarray = 1.0,
    ) -> Budget:
        """A budget that removes an absolute amount: ``removed`` weights (or MACs per token).

        Args:
          removed: number of weights (``kind="params"``) or MACs per token
            (``kind="flops"``) to remove from the units of ``spec``.
          spec: the supernet whose dense total the count is taken from.
        """
        if kind not in ("params", "flops"):
            raise ValueError(f"from_count supports kind 'params' or 'flops', got {kind!r}")
        dense = float(spec.numel.sum() if kind == "params" else spec.flops_per_token.sum())
        if not (0.0 <= removed <= dense):
            raise ValueError(f"cannot remove {removed} {kind}: the units hold {dense:.0f} (0..)")
        return cls(
            kind=kind,
            target=removed / dense,
            min_sparsity=min_sparsity,
            max_sparsity=max_sparsity,
        )


def cost_table(spec: SupernetSpec, budget: Budget) -> np.ndarray:
    """float64[L, K]: kept cost of each unit at each level; ``inf`` where not allowed.

    Units: weights (params), MACs per token (flops), seconds (latency) or sublayers;
    lower is cheaper.
    A level is not allowed when it is invalid or outside the unit's min/max sparsity.
    """
    if budget.kind == "params":
        kept = spec.kept_params()
    elif budget.kind == "flops":
        kept = spec.kept_flops()
    elif budget.kind == "sublayers":
        kept = kept_sublayers(spec)
    elif budget.kind in ("bits", "bytes"):
        kept = kept_bits(spec) / (8.0 if budget.kind == "bytes" else 1.0)
    else:
        kept = _checked_latency(spec, budget).kept
    return np.where(allowed_levels(spec, budget), kept, np.inf)


def allowed_levels(spec: SupernetSpec, budget: Budget) -> np.ndarray:
    """bool[L, K]: valid levels whose sparsity lies within the unit's min/max limits.

    Sparsity increases with the level, so each row is one contiguous run of True.
    """
    L = spec.num_units
    lo = _per_unit(budget.min_sparsity, L, "min_sparsity")
    hi = _per_unit(budget.max_sparsity, L, "max_sparsity")
    s = np.where(spec.valid, spec.sparsity, np.nan)
    with np.errstate(invalid="ignore"):
        inside = (s >= lo[:, None] - _SPARSITY_ATOL) & (s <= hi[:, None] + _SPARSITY_ATOL)
    return spec.valid & inside


def dense_cost(spec: SupernetSpec, budget: Budget) -> float:
    """Cost of the dense units (weights, MACs per token, seconds or sublayers): what
    fractions refer to."""
    if budget.kind == "params":
        return float(spec.numel.sum())
    if budget.kind == "flops":
        return float(spec.flops_per_token.sum())
    if budget.kind == "sublayers":
        return float(sublayers_per_unit(spec).sum())
    if budget.kind in ("bits", "bytes"):
        return float(FULL_BITS * spec.numel.sum()) / (8.0 if budget.kind == "bytes" else 1.0)
    return float(_checked_latency(spec, budget).dense.sum())


def kept_bits(spec: SupernetSpec) -> np.ndarray:
    """float64[L, K]: bits each unit keeps at each level (``inf`` at invalid levels).

    ``16 x numel x (1 - fraction)``: a pruned level keeps its weights at 16 bits each (no
    mask or index overhead counted); a quantized supernet's level fraction is
    ``1 - bits_per_weight / 16`` with codes, float16 scales and zero points counted
    (:func:`~allocsearch.quantizers.costs.bits_per_weight`, set by
    :mod:`allocsearch.supernet.quantized`), so its kept bits are exactly those of
    :func:`~allocsearch.quantizers.costs.level_bits`.
    """
    return FULL_BITS * spec.kept_params()


def average_bits_to_target(bits: float) -> float:
    """The ``bits`` budget target (fraction of 16 bits removed) of an average of ``bits``
    bits per weight; a ValueError unless ``0 < bits <= 16``."""
    if isinstance(bits, bool) or not isinstance(bits, int | float | np.floating | np.integer):
        raise ValueError(f"average bits must be a number in (0, {FULL_BITS}], got {bits!r}")
    if not (np.isfinite(bits) and 0.0 < bits <= FULL_BITS):
        raise ValueError(f"average bits {bits!r} must lie in (0, {FULL_BITS}] bits per weight")
    return 1.0 - float(bits) / FULL_BITS


def target_to_average_bits(target: float) -> float:
    """Average bits per weight a ``bits``/``bytes`` target (fraction removed) allows."""
    return FULL_BITS * (1.0 - float(target))


@dataclass(frozen=True, eq=False)
class CostModel:
    """A budget bound to a supernet: the only object searchers ask about costs.

    Picklable (numpy arrays and floats), so it can live inside a searcher's state.

    Attributes:
      cost: float64[L, K], kept cost per unit and level (``inf`` where not allowed).
      allowed: bool[L, K], levels a unit may take.
      dense: cost of the dense units (same unit as ``cost``).
      capacity: largest total kept cost of a feasible allocation, ``(1 - target) * dense``.
    """

    cost: np.ndarray
    allowed: np.ndarray
    dense: float
    capacity: float

    @classmethod
    def from_spec(cls, spec: SupernetSpec, budget: Budget) -> CostModel:
        """Bind ``budget`` to ``spec``."""
        dense = dense_cost(spec, budget)
        return cls(
            cost=cost_table(spec, budget),
            allowed=allowed_levels(spec, budget),
            dense=dense,
            capacity=(1.0 - budget.target) * dense,
        )

    @property
    def num_units(self) -> int:
        return int(self.cost.shape[0])

    def total_cost(self, choices: np.ndarray) -> np.ndarray:
        """float64[...]: kept cost of level vectors ``choices`` int[..., L] (inf if not allowed)."""
        choices = self._checked(choices)
        K = self.cost.shape[1]
        inside = (choices >= 0) & (choices < K)
        rows = np.arange(self.num_units)
        c = self.cost[rows, np.clip(choices, 0, K - 1)]
        return np.where(inside, c, np.inf).sum(axis=-1)

    def is_feasible(self, choices: np.ndarray) -> np.ndarray:
        """bool[...]: every level allowed and kept cost <= capacity (relative slack 1e-9)."""
        return self.total_cost(choices) <= self.capacity * (1.0 + FEASIBILITY_RTOL)

    def achieved(self, choices: np.ndarray) -> np.ndarray:
        """float64[...]: fraction of the dense cost removed by ``choices`` (higher = smaller)."""
        return 1.0 - self.total_cost(choices) / self.dense

    def has_equal_steps(self, rtol: float) -> bool:
        """True when every allowed level step of every unit changes the cost equally.

        Steps are compared to relative tolerance ``rtol``; vacuously True when no unit has
        two adjacent allowed levels. EvoPress's equal-weight grids under a params budget
        are; structured, N:M and equal-percent grids are not.
        """
        with np.errstate(invalid="ignore"):  # inf - inf between levels that are not allowed
            step = self.cost[:, :-1] - self.cost[:, 1:]
        vals = step[self.allowed[:, :-1] & self.allowed[:, 1:]]
        if vals.size == 0:
            return True
        return bool(vals.max() - vals.min() <= rtol * np.abs(vals).max())

    def removable_range(self) -> tuple[float, float]:
        """(min, max) fraction of the dense cost that an allocation of allowed levels removes."""
        c = np.where(self.allowed, self.cost, np.nan)
        most = np.nanmax(c, axis=1).sum()
        least = np.nanmin(c, axis=1).sum()
        return float(1.0 - most / self.dense), float(1.0 - least / self.dense)

    def _checked(self, choices: np.ndarray) -> np.ndarray:
        choices = np.asarray(choices)
        if choices.shape[-1:] != (self.num_units,) or not np.issubdtype(choices.dtype, np.integer):
            raise ValueError(
                f"choices must be int[..., L={self.num_units}], got {choices.dtype} {choices.shape}"
            )
        return choices


def check_feasible_target(spec: SupernetSpec, budget: Budget) -> None:
    """Raise :class:`InfeasibleBudgetError` unless some allocation achieves the target.

    The message states the range of fractions removable under the per-unit limits.
    """
    allowed = allowed_levels(spec, budget)
    empty = np.flatnonzero(~allowed.any(axis=1))
    if empty.size:
        names = [spec.units[i].name for i in empty[:5]]
        raise InfeasibleBudgetError(
            f"{empty.size} unit(s) have no level within their min/max sparsity, e.g. {names}; "
            f"widen min_sparsity/max_sparsity or build the supernet with more levels"
        )
    lo, hi = CostModel.from_spec(spec, budget).removable_range()
    tol = 1e-9
    if budget.kind == "bits" and not (lo - tol <= budget.target <= hi + tol):
        raise InfeasibleBudgetError(
            f"average bits {target_to_average_bits(budget.target):.6g} per weight is not "
            f"achievable: this supernet's levels under the per-unit limits give between "
            f"{target_to_average_bits(hi):.6g} and {target_to_average_bits(lo):.6g} bits per "
            f"weight (scales and zero points counted)"
        )
    if not (lo - tol <= budget.target <= hi + tol):
        raise InfeasibleBudgetError(
            f"target {budget.target:.6g} ({budget.kind} removed) is not achievable: this "
            f"supernet under the per-unit sparsity limits removes between {lo:.6g} and "
            f"{hi:.6g} of the dense {budget.kind}"
        )


def snap_to_levels(spec: SupernetSpec, budget: Budget, sparsity: np.ndarray) -> np.ndarray:
    """The feasible level vector int32[L] closest to continuous target sparsities.

    The one way every baseline turns sparsities into levels. Steps:
      1. each unit takes its allowed level nearest to its target (ties: the sparser one);
      2. while over the capacity, apply the cost-lowering single-unit move that adds the
         least deviation ``|s - t|`` (ties: the move saving most, then the lowest unit);
      3. while some cost-raising move fits in the capacity, apply the one that adds the
         least deviation (ties: the move adding most cost), so the budget is used.

    Args:
      sparsity: float[L], target sparsity of each unit in [0, 1].

    Raises:
      InfeasibleBudgetError: when no allocation achieves the budget's target.
    """
    check_feasible_target(spec, budget)
    cm = CostModel.from_spec(spec, budget)
    L = spec.num_units
    t = np.asarray(sparsity, dtype=np.float64)
    if t.shape != (L,) or np.any(~np.isfinite(t)):
        raise ValueError(f"sparsity must be finite float[L={L}], got shape {t.shape}")
    s = np.where(cm.allowed, spec.sparsity, np.nan)
    dev = np.abs(s - t[:, None])  # nan where not allowed
    # Nearest level; ties go to the sparser level (argmin over reversed levels).
    masked = np.where(cm.allowed, dev, np.inf)
    K = masked.shape[1]
    choice = (K - 1 - np.argmin(masked[:, ::-1], axis=1)).astype(np.int32)
    rows = np.arange(L)
    limit = cm.capacity * (1.0 + FEASIBILITY_RTOL)

    total = float(cm.total_cost(choice))
    while total > limit:  # phase 2: restore feasibility
        cur_cost = cm.cost[rows, choice][:, None]
        change = cm.cost - cur_cost  # < 0 saves
        ok = cm.allowed & (change < 0)
        l, k = _best_move(ok, masked - masked[rows, choice][:, None], change)
        choice[l] = k
        total = float(cm.total_cost(choice))
    while True:  # phase 3: use the budget
        cur_cost = cm.cost[rows, choice][:, None]
        change = cm.cost - cur_cost
        ok = cm.allowed & (change > 0) & (total + change <= limit)
        if not ok.any():
            break
        l, k = _best_move(ok, masked - masked[rows, choice][:, None], -change)
        choice[l] = k
        total = float(cm.total_cost(choice))
    return choice


def _best_move(ok: np.ndarray, added_dev: np.ndarray, change: np.ndarray) -> tuple[int, int]:
    """(unit, level) of the allowed move with least added deviation, ties: most negative change."""
    idx = np.flatnonzero(ok)
    assert idx.size, "a move must exist (target checked feasible)"
    flat_dev = added_dev.ravel()[idx]
    flat_change = change.ravel()[idx]
    best = idx[np.lexsort((idx, flat_change, flat_dev))[0]]
    return divmod(int(best), ok.shape[1])


def uniform_choice(spec: SupernetSpec, budget: Budget) -> np.ndarray:
    """int32[L]: the feasible level vector closest to uniform sparsity.

    The spec's ``center`` when it is allowed, feasible and uses the budget (no unit can
    move to a costlier level within the capacity); otherwise :func:`snap_to_levels` of
    the uniform sparsity ``budget.target`` (exact for params and FLOPs budgets, where a
    uniform sparsity ``s`` removes the fraction ``s``; a starting guess for latency).
    """
    check_feasible_target(spec, budget)
    cm = CostModel.from_spec(spec, budget)
    center = spec.center.astype(np.int32)
    if bool(cm.is_feasible(center)):
        rows = np.arange(spec.num_units)
        total = float(cm.total_cost(center))
        extra = cm.cost - cm.cost[rows, center][:, None]
        fits = cm.allowed & (extra > 0) & (total + extra <= cm.capacity * (1 + FEASIBILITY_RTOL))
        if not fits.any():
            return center
    return snap_to_levels(spec, budget, np.full(spec.num_units, budget.target))


def load_latency_table(path: str | Path, spec: SupernetSpec) -> LatencyTable:
    """Read measured per-unit, per-level latencies from a JSON or CSV file.

    JSON: ``{"<unit name>": {"levels": [s_0, s_1, ...], "dense": s}}`` with one value in
    seconds per valid level of the unit. CSV: a header ``unit,level,seconds`` and one row
    per unit and level, ``level`` an integer or ``dense``. ``dense`` may be left out when
    the unit's level 0 has sparsity 0 (then level 0 is the dense latency).

    Every unit of ``spec`` must appear with all its valid levels; seconds are finite, >= 0.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"latency table {path} is not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected an object mapping unit names to entries")
        entries: dict[str, tuple[list[float], float | None]] = {}
        for name, entry in raw.items():
            if (
                not isinstance(entry, dict)
                or "levels" not in entry
                or not isinstance(entry["levels"], list)
            ):
                raise ValueError(f"{path}: unit {name!r} needs an object with a 'levels' list")
            values = [
                _seconds(v, f"{path}: unit {name!r} level {k}")
                for k, v in enumerate(entry["levels"])
            ]
            dense = entry.get("dense")
            entries[name] = (
                values,
                None if dense is None else _seconds(dense, f"{path}: unit {name!r} 'dense'"),
            )
    elif suffix == ".csv":
        entries = _read_latency_csv(path)
    else:
        raise ValueError(f"latency table {path}: unknown suffix {suffix!r}; use .json or .csv")
    return _latency_from_entries(entries, spec, str(path))


def _seconds(value: object, where: str) -> float:
    """A latency read from a table: a finite number of seconds >= 0, else a ValueError
    that names ``where`` (file, unit and level) and the value."""
    number = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not np.isfinite(number) or number < 0:
        raise ValueError(
            f"{where}: latency {value!r} is not a number of seconds; valid: a finite number >= 0"
        )
    return number


def _read_latency_csv(path: Path) -> dict[str, tuple[list[float], float | None]]:
    levels: dict[str, dict[int, float]] = {}
    dense: dict[str, float] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or set(reader.fieldnames) != {"unit", "level", "seconds"}:
            raise ValueError(f"{path}: header must be unit,level,seconds, got {reader.fieldnames}")
        for row in reader:
            line = f"{path}: line {reader.line_num}"
            if row.get(None) or any(row[c] is None for c in ("unit", "level", "seconds")):
                raise ValueError(
                    f"{line}: expected 3 fields unit,level,seconds, got "
                    f"{[v for v in row.values() if v is not None]}"
                )
            name, level = row["unit"], row["level"].strip()
            secs = _seconds(row["seconds"].strip(), f"{line}: unit {name!r} level {level}")
            if level == "dense":
                dense[name] = secs
                continue
            try:
                k = int(level)
            except ValueError:
                raise ValueError(
                    f"{line}: unit {name!r} level {level!r} is not an integer or 'dense'"
                ) from None
            if k in levels.setdefault(name, {}):
                raise ValueError(f"{path}: unit {name!r} level {k} appears twice")
            levels[name][k] = secs
    out: dict[str, tuple[list[float], float | None]] = {}
    for name, by_level in levels.items():
        if sorted(by_level) != list(range(len(by_level))):
            raise ValueError(f"{path}: unit {name!r} levels must be 0..n-1, got {sorted(by_level)}")
        out[name] = ([by_level[k] for k in range(len(by_level))], dense.get(name))
    for name in dense.keys() - levels.keys():
        raise ValueError(f"{path}: unit {name!r} has a dense latency but no levels")
    return out


def _latency_from_entries(
    entries: dict[str, tuple[list[float], float | None]], spec: SupernetSpec, where: str
) -> LatencyTable:
    names = [u.name for u in spec.units]
    missing = [n for n in names if n not in entries]
    extra = sorted(set(entries) - set(names))
    if missing or extra:
        raise ValueError(
            f"{where}: latency units do not match the supernet: missing {missing[:5]} "
            f"({len(missing)}), unknown {extra[:5]} ({len(extra)})"
        )
    L, K = spec.sparsity.shape
    kept = np.full((L, K), np.inf)
    dense = np.empty(L)
    for l, name in enumerate(names):
        values, d = entries[name]
        n = int(spec.num_levels[l])
        if len(values) != n:
            raise ValueError(f"{where}: unit {name!r} has {len(values)} levels, supernet has {n}")
        kept[l, :n] = values
        if d is None:
            if spec.sparsity[l, 0] != 0.0:
                raise ValueError(
                    f"{where}: unit {name!r} needs a 'dense' latency: its level 0 has "
                    f"sparsity {spec.sparsity[l, 0]:.4g}, not 0"
                )
            d = values[0]
        dense[l] = d
    table = LatencyTable(kept=kept, dense=dense)
    _check_latency_shape(table, spec)
    return table


def _checked_latency(spec: SupernetSpec, budget: Budget) -> LatencyTable:
    assert budget.latency is not None  # Budget.__post_init__ guarantees it for "latency"
    _check_latency_shape(budget.latency, spec)
    return budget.latency


def _check_latency_shape(table: LatencyTable, spec: SupernetSpec) -> None:
    if table.kept.shape != spec.sparsity.shape or table.dense.shape != (spec.num_units,):
        raise ValueError(
            f"latency table shapes kept {table.kept.shape} / dense {table.dense.shape} do not "
            f"match the supernet's [L, K] = {spec.sparsity.shape}"
        )
    v = table.kept[spec.valid]
    if np.any(~np.isfinite(v)) or np.any(v < 0):
        raise ValueError("latency table: seconds at valid levels must be finite and >= 0")
    if np.any(~np.isfinite(table.dense)) or np.any(table.dense <= 0):
        raise ValueError(f"latency table: dense seconds must be finite and > 0, got {table.dense}")


def _per_unit(value: float | np.ndarray, L: int, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        return np.full(L, float(arr))
    if arr.shape != (L,):
        raise ValueError(f"{name} must be a scalar or float[L={L}], got shape {arr.shape}")
    return arr
