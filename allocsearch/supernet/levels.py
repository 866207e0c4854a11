"""Level grids: which sparsities each unit of a supernet is pruned to.

Every grid function returns a :class:`LevelGrid` whose arrays are what
:class:`~allocsearch.supernet.spec.SupernetSpec` takes (``sparsity`` float64[L, K] padded
with ``nan``, ``valid`` bool[L, K] a contiguous prefix per row, ``center`` int32[L]).
Levels increase strictly in sparsity along K.

Exactness. A level is a whole number of removed items (weights, N:M zeros, groups), and its
sparsity is that count divided by the unit's total, in float64. Pruners recover the count
as ``round(s * total)``, which is exact for such values, and refuse anything else, so the
sparsity recorded in the spec is what the variant holds. Requested fractions are turned
into counts with round-half-up (``floor(x + 0.5)``) in one place, :func:`round_count`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:
    from allocsearch.supernet.spec import Unit

# Levels on each side of a unit's centre in a centred grid (Týr-the-Pruner: 4, so 9 levels).
CENTRED_STEPS_EACH_SIDE: Final[int] = 4

_EPS = 1e-9  # slack, in items, when turning min/max fractions into counts


class LevelGrid(NamedTuple):
    """Per-unit levels, padded to a rectangle.

    Attributes:
      sparsity: float64[L, K], fraction of the unit removed at each level (0 = dense),
        strictly increasing along K; ``nan`` where ``valid`` is False.
      valid: bool[L, K], True for real levels (a contiguous prefix of each row).
      center: int32[L], index of the level a uniform allocation at the target picks.
      labels: per-unit tuples of labels, one per *valid* level (e.g. ``"2:4"``,
        ``"6 heads"``), or None.
    """

    sparsity: np.ndarray
    valid: np.ndarray
    center: np.ndarray
    labels: tuple[tuple[str, ...], ...] | None = None


def round_count(fraction: ArrayLike, total: ArrayLike) -> np.ndarray:
    """int64[...]: ``fraction * total`` rounded half up to a whole number of items."""
    exact = np.asarray(fraction, np.float64) * np.asarray(total, np.int64)
    return np.floor(exact + 0.5).astype(np.int64)


def _positive_ints(values: ArrayLike, name: str) -> np.ndarray:
    a = np.asarray(values)
    if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer) or np.any(a < 1):
        raise ValueError(f"{name} must be a non-empty 1-D array of positive ints, got {values!r}")
    return a.astype(np.int64)


def _per_unit(value: float | ArrayLike, n_units: int, name: str) -> np.ndarray:
    a = np.asarray(value, np.float64)
    if a.ndim == 0:
        a = np.full(n_units, float(a))
    if a.shape != (n_units,):
        raise ValueError(f"{name} must be a float or float[L={n_units}], got shape {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a < 0) or np.any(a > 1):
        raise ValueError(f"{name} must lie in [0, 1], got {np.asarray(value).tolist()}")
    return a


def _pack(
    counts: list[np.ndarray],
    totals: np.ndarray,
    centers: list[int],
    labels: tuple[tuple[str, ...], ...] | None = None,
) -> LevelGrid:
    """Pad per-unit increasing count arrays into a LevelGrid (sparsity = count / total)."""
    k_max = max(len(c) for c in counts)
    n_units = len(counts)
    sparsity = np.full((n_units, k_max), np.nan)
    valid = np.zeros((n_units, k_max), dtype=bool)
    for i, c in enumerate(counts):
        sparsity[i, : len(c)] = c / totals[i]
        valid[i, : len(c)] = True
    return LevelGrid(sparsity, valid, np.asarray(centers, dtype=np.int32), labels)


def _stepped_counts(
    totals: np.ndarray,
    center_counts: np.ndarray,
    steps: np.ndarray,
    steps_each_side: int,
    min_sparsity: np.ndarray,
    max_sparsity: np.ndarray,
    what: str,
) -> tuple[list[np.ndarray], list[int]]:
    """Counts ``c0 + j * step`` for ``|j| <= steps_each_side`` inside each unit's bounds."""
    lo = np.ceil(min_sparsity * totals - _EPS).astype(np.int64)
    hi = np.floor(max_sparsity * totals + _EPS).astype(np.int64)
    if np.any(lo > hi):
        bad = np.flatnonzero(lo > hi).tolist()
        raise ValueError(f"min_sparsity > max_sparsity (no whole {what} between) for units {bad}")
    outside = np.flatnonzero((center_counts < lo) | (center_counts > hi))
    if outside.size:
        i = int(outside[0])
        raise ValueError(
            f"the center level ({center_counts[i]} of {totals[i]} {what}) lies outside "
            f"[min_sparsity, max_sparsity] = [{lo[i]}, {hi[i]}] {what} for units "
            f"{outside.tolist()}"
        )
    j = np.arange(-steps_each_side, steps_each_side + 1)
    counts, centers = [], []
    for i in range(len(totals)):
        c = center_counts[i] + j * steps[i]
        ok = (c >= lo[i]) & (c <= hi[i])
        counts.append(c[ok])
        centers.append(int(np.sum(ok & (j < 0))))
    return counts, centers


def equal_step_grid(
    numel: ArrayLike,
    *,
    center: float,
    step_weights: int,
    steps_each_side: int,
    min_sparsity: float | ArrayLike = 0.0,
    max_sparsity: float | ArrayLike = 1.0,
) -> LevelGrid:
    """EvoPress levels: every step removes the same number of weights in every layer.

    Level ``j`` (``-steps_each_side <= j <= steps_each_side``) of layer ``l`` removes
    ``round_count(center, numel_l) + j * step_weights`` weights, i.e. its sparsity is about
    ``center + j * step_weights / numel_l``. Because every step of every layer is exactly
    ``step_weights`` weights, moving one layer up a level and another down a level leaves
    the total number of kept weights unchanged: searches that swap levels never leave the
    budget.

    Clipping: levels that would remove fewer than ``min_sparsity * numel_l`` (at least 0)
    or more than ``max_sparsity * numel_l`` (at most all) weights are *dropped*, not moved
    onto the bound, so the equal-step property holds between all remaining levels; the
    price is that a bound (e.g. dense) is a level only if it lies on the step lattice.
    Small layers thus get fewer, coarser levels (a layer with fewer than ``step_weights``
    weights may have only its center level).

    Args:
      numel: int[L], weights per layer.
      center: uniform target sparsity in [0, 1]; the center level of each layer removes
        ``round_count(center, numel_l)`` weights (so a uniform allocation at the center
        is within half a weight per layer of the exact target).
      step_weights: weights removed per level step (EvoPress uses 1e6 for 7-8B models).
      steps_each_side: levels on each side of the center (EvoPress: 8).
      min_sparsity, max_sparsity: float or float[L] bounds; the center must lie inside.

    Returns:
      LevelGrid with K <= 2 * steps_each_side + 1 and no labels.
    """
    totals = _positive_ints(numel, "numel")
    n_units = len(totals)
    if np.ndim(center) != 0:
        raise ValueError(f"center must be one float (the uniform target), got {center!r}")
    c = _per_unit(center, 1, "center")[0]
    if not isinstance(step_weights, int | np.integer) or step_weights < 1:
        raise ValueError(f"step_weights must be a positive int, got {step_weights!r}")
    if not isinstance(steps_each_side, int | np.integer) or steps_each_side < 0:
        raise ValueError(f"steps_each_side must be an int >= 0, got {steps_each_side!r}")
    counts, centers = _stepped_counts(
        totals,
        round_count(c, totals),
        np.full(n_units, int(step_weights), dtype=np.int64),
        int(steps_each_side),
        _per_unit(min_sparsity, n_units, "min_sparsity"),
        _per_unit(max_sparsity, n_units, "max_sparsity"),
        "weights",
    )
    return _pack(counts, totals, centers)


def explicit_grid(sparsities: ArrayLike, *, numel: ArrayLike, center: float) -> LevelGrid:
    """The same list of sparsities for every layer, snapped to whole weights.

    Args:
      sparsities: float[K], strictly increasing, in [0, 1].
      numel: int[L], weights per layer; level ``k`` of layer ``l`` removes
        ``round_count(sparsities[k], numel_l)`` weights.
      center: the target sparsity; must be one of ``sparsities``.

    Raises:
      ValueError: if two levels of some layer round to the same number of weights
        (the layer is too small for the list), naming the layer and levels.
    """
    s = np.asarray(sparsities, np.float64)
    if s.ndim != 1 or s.size == 0 or np.any(np.diff(s) <= 0):
        raise ValueError(f"sparsities must be a non-empty strictly increasing list, got {s}")
    _per_unit(s, len(s), "sparsities")
    totals = _positive_ints(numel, "numel")
    hits = np.flatnonzero(np.isclose(s, center, rtol=0, atol=1e-12))
    if hits.size != 1:
        raise ValueError(f"center {center!r} must be one of the sparsities {s.tolist()}")
    counts = []
    for i, n in enumerate(totals):
        c = round_count(s, n)
        same = np.flatnonzero(np.diff(c) == 0)
        if same.size:
            k = int(same[0])
            raise ValueError(
                f"layer {i} has only {n} weights: sparsities {float(s[k])!r} and "
                f"{float(s[k + 1])!r} both "
                f"remove {c[k]} weights; use fewer or wider-spaced levels"
            )
        counts.append(c)
    return _pack(counts, totals, [int(hits[0])] * len(totals))


def nm_grid(
    patterns: Sequence[tuple[int, int]], *, in_features: ArrayLike, center: tuple[int, int]
) -> LevelGrid:
    """N:M levels (N zeros per M consecutive inputs), the same for every layer.

    Args:
      patterns: (n, m) pairs with one common M and strictly increasing N in [0, M], e.g.
        ``[(0, 4), (1, 4), (2, 4), (3, 4)]``. Level sparsity is ``n / m`` (exact: M divides
        every layer's width). Mixing group sizes is refused because one pruner handles
        one M (and 2:4 and 4:8 have the same sparsity).
      in_features: int[L], input width of each layer; M must divide each.
      center: the pattern a uniform allocation uses; must be in ``patterns``.

    Returns:
      LevelGrid with labels ``"n:m"``.
    """
    pats = [(int(n), int(m)) for n, m in patterns]
    if not pats:
        raise ValueError("patterns must be a non-empty list of (n, m)")
    ms = sorted({m for _, m in pats})
    if len(ms) != 1 or ms[0] < 1:
        raise ValueError(f"all patterns must share one group size M >= 1, got M values {ms}")
    m = ms[0]
    ns = np.array([n for n, _ in pats], dtype=np.int64)
    if np.any(ns < 0) or np.any(ns > m) or np.any(np.diff(ns) <= 0):
        raise ValueError(f"N must increase strictly within [0, M={m}], got patterns {pats}")
    widths = _positive_ints(in_features, "in_features")
    bad = np.flatnonzero(widths % m)
    if bad.size:
        raise ValueError(
            f"M={m} must divide every layer's in_features; layers {bad.tolist()} have "
            f"in_features {widths[bad].tolist()}"
        )
    key = (int(center[0]), int(center[1]))
    if key not in pats:
        raise ValueError(f"center pattern {key} is not one of the patterns {pats}")
    labels = tuple(f"{n}:{m}" for n, _ in pats)
    n_units = len(widths)
    return _pack(
        [ns] * n_units,
        np.full(n_units, m, dtype=np.int64),
        [pats.index(key)] * n_units,
        (labels,) * n_units,
    )


def structured_grid(
    groups: ArrayLike,
    group_step: int | ArrayLike,
    *,
    center: float | ArrayLike,
    steps_each_side: int,
    min_sparsity: float | ArrayLike = 0.0,
    max_sparsity: float | ArrayLike = 1.0,
    min_step: int = 1,
    group_name: str = "groups",
) -> LevelGrid:
    """Levels in whole groups (attention kv groups / heads, MLP neurons), Týr style.

    Level ``j`` of unit ``l`` removes ``round_count(center_l, groups_l) + j * group_step_l``
    groups; its sparsity is that count over ``groups_l``, which is also the fraction of the
    unit's q/k/v/o (or gate/up/down) weights removed. Levels outside the bounds are dropped
    as in :func:`equal_step_grid`. Coarse-to-fine search re-centres each unit on its
    chosen level (``center`` per unit) and halves the step (not below ``min_step``).

    Args:
      groups: int[L], removable groups per unit.
      group_step: int or int[L], groups per level step; each must be >= ``min_step``
        (e.g. 1 head, or 32 neurons: ``pruners.structured.MIN_NEURON_STEP``).
      center: float or float[L], sparsity of the center level (fraction of groups).
      steps_each_side: levels on each side of the center (Týr: 4).
      min_sparsity, max_sparsity: float or float[L] bounds; the center must lie inside.
      min_step: smallest allowed ``group_step``.
      group_name: word used in labels, e.g. ``"heads"`` or ``"neurons"``.

    Returns:
      LevelGrid with labels ``"<kept> <group_name>"`` (e.g. ``"6 heads"``).
    """
    totals = _positive_ints(groups, "groups")
    n_units = len(totals)
    if not isinstance(min_step, int | np.integer) or min_step < 1:
        raise ValueError(f"min_step must be a positive int, got {min_step!r}")
    steps = np.broadcast_to(np.asarray(group_step), (n_units,))
    if not np.issubdtype(steps.dtype, np.integer) or np.any(steps < min_step):
        raise ValueError(
            f"group_step must be an int or int[L] >= min_step={min_step}, got {group_step!r}"
        )
    if not isinstance(steps_each_side, int | np.integer) or steps_each_side < 0:
        raise ValueError(f"steps_each_side must be an int >= 0, got {steps_each_side!r}")
    counts, centers = _stepped_counts(
        totals,
        round_count(_per_unit(center, n_units, "center"), totals),
        steps.astype(np.int64),
        int(steps_each_side),
        _per_unit(min_sparsity, n_units, "min_sparsity"),
        _per_unit(max_sparsity, n_units, "max_sparsity"),
        group_name,
    )
    labels = tuple(
        tuple(f"{int(totals[i] - r)} {group_name}" for r in c) for i, c in enumerate(counts)
    )
    return _pack(counts, totals, centers, labels)


def centred_grid(
    units: Sequence[Unit],
    centers: ArrayLike,
    step: float,
    *,
    groups: ArrayLike | None = None,
    steps_each_side: int = CENTRED_STEPS_EACH_SIDE,
    min_items: int | ArrayLike = 1,
    min_sparsity: float | ArrayLike = 0.0,
    max_sparsity: float | ArrayLike = 1.0,
    group_name: str = "groups",
) -> LevelGrid:
    """Levels of one coarse-to-fine round: each unit centred on its own sparsity.

    Unit ``l`` counts in *items*: weights (``groups=None``, unstructured supernets) or
    removable groups (``groups[l]``, structured supernets: kv groups of an ``attn``
    unit, neurons of an ``mlp`` unit, from
    :func:`~allocsearch.supernet.build.unit_group_counts`). Its centre level removes
    ``round_count(centers[l], total_l)`` items and level ``j`` (``|j| <= steps_each_side``)
    removes ``j * step_l`` more, with ``step_l = max(min_items_l, round_count(step,
    total_l))`` items: a step is a fraction of the unit, as in Týr ("12.5% of a
    sublayer"). Units of equal size get equal steps (in a transformer stack, every unit
    of one role), so swapping levels between them keeps the total cost exactly. Levels
    outside ``[min_sparsity, max_sparsity]`` are dropped, as in
    :func:`~allocsearch.supernet.levels.structured_grid` (which this calls; with
    ``groups=None`` every weight is one group).

    Args:
      units: the supernet's units in order (``supernet_units(adapter, structure)``).
      centers: float[L], sparsity of each unit's centre level, in [0, 1] (fraction of
        items; for structured units that equals the fraction of the unit's weights).
      step: level spacing, fraction of a unit in (0, 1].
      groups: int[L] removable groups per unit for structured supernets, or None.
      steps_each_side: levels on each side of the centre (Týr: 4).
      min_items: int or int[L], the smallest step in items (e.g. 1 kv group, or
        ``pruners.structured.MIN_NEURON_STEP`` neurons for ``mlp`` units).
      min_sparsity, max_sparsity: float or float[L] bounds (e.g. the budget's); the
        centre must lie inside.
      group_name: word in the level labels of structured grids (``"6 heads"``).

    Returns:
      LevelGrid with K <= 2 * steps_each_side + 1; labels ``"<kept> <group_name>"`` for
      structured grids, None for unstructured ones.
    """
    n_units = len(units)
    if groups is None:
        totals = np.array([u.numel for u in units], dtype=np.int64)
    else:
        totals = np.asarray(groups)
        if totals.shape != (n_units,) or not np.issubdtype(totals.dtype, np.integer):
            raise ValueError(
                f"groups must be int[L={n_units}] (unit_group_counts), got {totals.dtype} "
                f"{totals.shape}"
            )
    c = np.asarray(centers, dtype=np.float64)
    if c.shape != (n_units,) or not np.all(np.isfinite(c)) or np.any((c < 0) | (c > 1)):
        raise ValueError(f"centers must be float[L={n_units}] in [0, 1], got {c.tolist()}")
    if not (np.isfinite(step) and 0.0 < step <= 1.0):
        raise ValueError(f"step must be a fraction of a unit in (0, 1], got {step!r}")
    floor = np.broadcast_to(np.asarray(min_items), (n_units,))
    if not np.issubdtype(floor.dtype, np.integer) or np.any(floor < 1):
        raise ValueError(f"min_items must be an int or int[L] >= 1, got {min_items!r}")
    step_items = np.maximum(round_count(step, totals), floor).astype(np.int64)
    grid = structured_grid(
        totals,
        step_items,
        center=c,
        steps_each_side=steps_each_side,
        min_sparsity=min_sparsity,
        max_sparsity=max_sparsity,
        group_name="weights" if groups is None else group_name,
    )
    return grid._replace(labels=None) if groups is None else grid
