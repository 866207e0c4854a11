"""PNG figures of recipes, search progress and strategy comparisons (matplotlib, Agg).

Every function validates its input, refuses to overwrite an existing file unless
``overwrite=True`` (checked before drawing), renders the figure in memory and writes
the PNG atomically: readers see no file or the whole file, and an error leaves
nothing behind. Output is deterministic: a fixed figure size and dpi, Matplotlib's
default style whatever the user's ``matplotlibrc`` says, and no metadata text (no
software version, no timestamp), so identical inputs give identical bytes with the
same Matplotlib and FreeType.

Figures are drawn on the Agg canvas directly (``matplotlib.figure.Figure``), never
through ``pyplot``: no display is needed and no global figure registry is touched.
The style is reset with ``matplotlib.rc_context`` while a figure is drawn, so drawing
from two threads at once is not supported.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, PercentFormatter

from allocsearch.atomic import atomic_write_bytes, require_parent_directory
from allocsearch.models.layers import ROLES
from allocsearch.recipe.recipe import Recipe
from allocsearch.report.tables import (
    METRICS,
    CompareRow,
    check_perplexity,
    check_rows,
    format_column,
    format_value,
    median_spread,
)

if TYPE_CHECKING:  # search.base imports jax; only the field names are needed here
    from allocsearch.search.base import HistoryEntry

DPI = 100
# Figure sizes in inches; the PNG is (width * DPI) x (height * DPI) pixels.
PROFILE_SIZE_IN = (10.0, 7.0)
FITNESS_SIZE_IN = (8.0, 5.0)
COMPARE_SIZE_IN = (12.0, 7.0)
# plot_ppl_by_strategy stacks one panel per sparsity: width x (height per panel * n).
PPL_PANEL_SIZE_IN = (8.0, 3.5)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# One colour and marker per role, the same in every figure (tab10 cycles after 10).
_ROLE_STYLE = {role: (f"C{i % 10}", "osD^v<>ps*hXP"[i]) for i, role in enumerate(ROLES)}
_UNIT_SERIES = {"heads": ("attn (heads)", "C0", "o"), "neurons": ("mlp (neurons)", "C5", "s")}
_PPL_LABEL = "held-out perplexity (lower is better)"


# ----------------------------------------------------------------------------- writing


def _check_target(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """The output path, checked before any drawing: ``.png``, directory present, free."""
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ValueError(f"{os.fspath(target)!r}: figures are written as PNG; use a .png path")
    require_parent_directory(target)
    if not overwrite and target.exists():
        raise FileExistsError(f"{os.fspath(target)!r} exists; pass overwrite=True to replace it")
    return target


@contextlib.contextmanager
def _figure(size_in: tuple[float, float]) -> Iterator[Figure]:
    """A figure on the Agg canvas, drawn under Matplotlib's default style."""
    with matplotlib.rc_context():
        matplotlib.rcdefaults()  # ignore the user's matplotlibrc: same input, same bytes
        fig = Figure(figsize=size_in, dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        yield fig


def _png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes without metadata text (no Software / time chunk)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _save(fig: Figure, target: Path, overwrite: bool) -> Path:
    return atomic_write_bytes(_png_bytes(fig), target, overwrite=overwrite)


# ----------------------------------------------------------------------------- recipes


def _profile_series(recipe: Recipe) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-series block indices and sparsities for the top panel of the profile.

    Unstructured / N:M recipes: one series per layer role, in :data:`ROLES` order, each
    ``(int64[n] block index, float64[n] sparsity)`` in forward order. Layers outside the
    blocks (embedding, head) have block -1. Structured recipes: one series per unit kind
    (``"heads"``, ``"neurons"``) whose value is the unit's weight sparsity: the
    weight-count-weighted mean of its member layers' sparsities, comparable with a
    params budget (it is below the fraction of heads removed when k/v lose less).
    """
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if recipe.units:
        by_name = {x.name: x for x in recipe.layers}
        for kind in _UNIT_SERIES:
            units = [u for u in recipe.units if u.kind == kind]
            if not units:
                continue
            blocks = np.array([u.block for u in units], dtype=np.int64)
            values = np.empty(len(units), dtype=np.float64)
            for i, unit in enumerate(units):
                members = [by_name[m] for m in unit.layers]
                numel = np.array([x.numel for x in members], dtype=np.float64)
                sparsity = np.array([x.sparsity for x in members], dtype=np.float64)
                values[i] = np.dot(numel, sparsity) / numel.sum()
            out[kind] = (blocks, values)
        return out
    for role in ROLES:
        entries = [x for x in recipe.layers if x.role == role]
        if entries:
            out[role] = (
                np.array([x.block for x in entries], dtype=np.int64),
                np.array([x.sparsity for x in entries], dtype=np.float64),
            )
    return out


def _block_sparsity(recipe: Recipe) -> tuple[np.ndarray, np.ndarray]:
    """Blocks that hold layers and their weight-weighted sparsity.

    Returns:
      ``(int64[B'] block index, float64[B'] sparsity)`` over the blocks >= 0 that hold
      at least one layer: sum_l s_l * numel_l / sum_l numel_l over the block's layers,
      the value ``recipe.exporters.block_sparsities`` gives for a gap-free recipe. Unlike
      that exporter, gaps and layers outside the blocks (block -1, left out) are allowed.
    """
    blocks = np.array([x.block for x in recipe.layers], dtype=np.int64)
    numel = np.array([x.numel for x in recipe.layers], dtype=np.float64)
    removed = recipe.sparsities() * numel
    inside = blocks >= 0
    present = np.unique(blocks[inside])
    if present.size == 0:
        return present, np.zeros(0, dtype=np.float64)
    length = int(present[-1]) + 1
    total = np.bincount(blocks[inside], weights=numel[inside], minlength=length)
    gone = np.bincount(blocks[inside], weights=removed[inside], minlength=length)
    return present, gone[present] / total[present]


def plot_sparsity_profile(
    recipe: Recipe,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Draw a recipe's sparsity along depth.

    Top panel: one line-and-marker series per layer role (q, k, v, o, gate, up, down;
    qkv, fc_in, fc_out; ...) with x = block index and y = sparsity (fraction of the
    layer's weights that are zero, 0-100%); for structured recipes one series per
    sublayer kind (attn heads, mlp neurons) with the unit's weight sparsity. Layers
    outside the blocks (embedding, head) sit at block -1. Bottom panel: bars of the
    weight-count-weighted sparsity of each block. Both panels show the budget target
    (``recipe.budget.target``, the fraction of the budgeted cost to remove) as a
    dashed horizontal line; for a flops or latency budget it is a reference only.

    Args:
      recipe: the allocation to draw.
      path: output ``.png`` path; its directory must exist.
      title: figure title; default names the strategy, model, structure and budget.
      overwrite: replace an existing file instead of raising ``FileExistsError``.

    Returns:
      The path written; the image is ``PROFILE_SIZE_IN * DPI`` pixels (1000 x 700).

    Raises:
      ValueError: a path that does not end in ``.png``, or a title that is not a string.
      FileNotFoundError: the directory does not exist.
      FileExistsError: the file exists and ``overwrite`` is False.
    """
    if not isinstance(recipe, Recipe):
        raise ValueError(f"recipe must be a Recipe, got {type(recipe).__name__}")
    if title is not None and not isinstance(title, str):
        raise ValueError(f"title must be a string or None, got {type(title).__name__}")
    target = _check_target(path, overwrite)
    budget = recipe.budget
    if title is None:
        title = (
            f"{recipe.provenance.strategy} on {recipe.model.name_or_path} ({recipe.structure}): "
            f"{budget.kind} target {budget.target:.1%}, achieved {budget.achieved:.1%}"
        )
    series = _profile_series(recipe)
    blocks, block_values = _block_sparsity(recipe)
    target_label = f"target {budget.target:.1%} of {budget.kind}"
    with _figure(PROFILE_SIZE_IN) as fig:
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
        for key, (x, y) in series.items():
            if recipe.units:
                label, color, marker = _UNIT_SERIES[key]
            else:
                (color, marker), label = _ROLE_STYLE[key], key
            top.plot(x, y, color=color, marker=marker, markersize=5, linewidth=1.2, label=label)
        bottom.bar(blocks, block_values, width=0.7, color="0.6", label="block (weight-weighted)")
        for ax in (top, bottom):
            ax.axhline(budget.target, color="k", linestyle="--", linewidth=1, label=target_label)
            ax.set_ylim(0.0, 1.0)
            ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
            ax.grid(True, axis="y", alpha=0.3)
        top.set_ylabel("layer sparsity" if not recipe.units else "sublayer sparsity")
        bottom.set_ylabel("block sparsity")
        outside = any(x.block < 0 for x in recipe.layers)
        bottom.set_xlabel("block index" + (" (-1: outside the blocks)" if outside else ""))
        top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
        bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
        bottom.xaxis.get_major_locator().set_params(integer=True)
        fig.suptitle(title, fontsize="medium")
        return _save(fig, target, overwrite)


# ----------------------------------------------------------------------------- search


def plot_fitness_curves(
    histories: Mapping[str, Sequence[HistoryEntry]],
    path: str | os.PathLike[str],
    *,
    metric_name: str,
    tokens: Mapping[str, int] | None = None,
    overwrite: bool = False,
) -> Path:
    """Draw the parent's fitness against evaluations used, one line per strategy.

    Each point is the search's current best (EvoPress's parent) as its search measured it
    in that generation: EvoPress re-scores its parent on a fresh minibatch every
    generation, so the curve may rise as well as fall, and the title says so. ``tokens``
    (strategy -> calibration tokens per score, see
    :func:`~allocsearch.search.registry.fitness_tokens`) puts the token counts in the axis label
    (one count) or the legend (several).

    Args:
      histories: strategy name -> its ``SearchResult.history`` (entries with
        ``evaluations``, the cumulative candidate scorings, non-decreasing, and
        ``best_fitness``, lower is better). Entries with a non-finite fitness (not yet
        scored) are left out; every strategy needs at least one finite entry.
      path: output ``.png`` path; its directory must exist.
      metric_name: name of the fitness metric for the y label, e.g. ``"KL per token"``.
      tokens: calibration tokens each strategy's scores are measured on; None: unlabelled.
      overwrite: replace an existing file instead of raising ``FileExistsError``.

    Returns:
      The path written (``FITNESS_SIZE_IN * DPI`` pixels, 800 x 500). The y axis is
      logarithmic when every plotted fitness is > 0, linear otherwise.

    Raises:
      ValueError: no strategies, a history with no finite fitness, decreasing
        evaluations, an empty metric name or a path not ending in ``.png``.
      FileNotFoundError, FileExistsError: as for :func:`plot_sparsity_profile`.
    """
    if not isinstance(metric_name, str) or not metric_name:
        raise ValueError(f"metric_name must be a non-empty string, got {metric_name!r}")
    if not histories:
        raise ValueError("histories is empty; give at least one strategy's history")
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, history in histories.items():
        evals = np.array([e.evaluations for e in history], dtype=np.float64)
        fitness = np.array([e.best_fitness for e in history], dtype=np.float64)
        if evals.size and np.any(np.diff(evals) < 0):
            i = int(np.flatnonzero(np.diff(evals) < 0)[0])
            raise ValueError(
                f"{name}: evaluations must be cumulative (non-decreasing), but entry {i + 1} "
                f"has {evals[i + 1]:g} after {evals[i]:g}"
            )
        keep = np.isfinite(fitness)
        if not keep.any():
            raise ValueError(
                f"{name}: its history has no entry with a finite best_fitness "
                f"({len(fitness)} entries); leave strategies without a score out"
            )
        curves[str(name)] = (evals[keep], fitness[keep])
    tokens = dict(tokens or {})
    bad = {k: v for k, v in tokens.items() if k not in curves or int(v) < 1}
    if bad:
        raise ValueError(f"tokens must map plotted strategies to counts >= 1, got {bad}")
    target = _check_target(path, overwrite)
    log_y = all(np.all(y > 0) for _, y in curves.values())
    counts = set(tokens.values())
    one_count = len(counts) == 1 and len(tokens) == len(curves)
    with _figure(FITNESS_SIZE_IN) as fig:
        ax = fig.subplots()
        for i, (name, (x, y)) in enumerate(curves.items()):
            marker = "o" if len(x) <= 50 else None
            label = name if one_count or name not in tokens else f"{name} ({tokens[name]:,} tokens)"
            ax.plot(x, y, color=f"C{i % 10}", marker=marker, markersize=3, label=label)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("evaluations (candidate scorings)")
        on = f" on {next(iter(counts)):,} tokens" if one_count else ""
        ax.set_ylabel(f"parent's {metric_name}{on} (lower is better)")
        # not a best-so-far curve: each point is the parent (the search's current best)
        # scored on that generation's own minibatch, so it can rise between generations
        ax.set_title(
            "the parent's fitness on each generation's minibatch (a fresh minibatch each "
            "generation: the curve can rise)",
            fontsize="small",
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        return _save(fig, target, overwrite)


# ----------------------------------------------------------------------------- compare


_METRIC_LABEL = {
    "fitness": "fitness (lower is better)",
    "heldout_ppl": _PPL_LABEL,
    "heldout_distance": "held-out distance to the dense model (lower is better)",
    "nn_agreement": "nearest-neighbour agreement with the dense model (%, higher is better)",
    "evaluations": "evaluations (candidate scorings)",
    "wall_time_s": "search wall time (s)",
    "achieved": "budget achieved (% removed)",
}


def plot_compare(
    rows: Sequence[CompareRow],
    path: str | os.PathLike[str],
    *,
    metric: str | None = None,
    dense_ppl: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Draw a compare table: one panel per column, one labelled point per strategy.

    Each panel's axis spans its own values (with the dense reference, if drawn), not
    0..max: strategies 5.75 and 5.81 apart on an axis from 0 would look alike.

    Args:
      rows: the compare table (unique strategies), drawn in the given order.
      path: output ``.png`` path; its directory must exist.
      metric: the one :class:`CompareRow` field to draw, one of :data:`METRICS`; None
        (default): the columns of :func:`~allocsearch.report.tables.markdown_table`
        (fitness, held-out perplexity, or held-out distance and NN agreement for
        encoders, evaluations, wall time, achieved) that have a value. Rows without a
        (finite) value get no point and an ``n/a`` / ``inf`` label.
      dense_ppl: held-out perplexity of the unpruned model (finite, >= 1); drawn as a
        dashed reference line on the held-out perplexity panel.
      overwrite: replace an existing file instead of raising ``FileExistsError``.

    Returns:
      The path written (``COMPARE_SIZE_IN * DPI`` pixels, 1200 x 700).

    Raises:
      ValueError: an unknown metric, ``dense_ppl`` without a held-out perplexity panel
        or below 1, no row with a finite held-out score (or ``metric``), or the errors
        of ``check_rows``.
      FileNotFoundError, FileExistsError: as for :func:`plot_sparsity_profile`.
    """
    rows = check_rows(rows)
    if metric is not None and metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {METRICS}")
    encoder = any(r.heldout_distance is not None or r.nn_agreement is not None for r in rows)
    main = metric or ("heldout_distance" if encoder else "heldout_ppl")
    if dense_ppl is not None:
        if main != "heldout_ppl":
            raise ValueError(
                f"dense_ppl is a reference for metric 'heldout_ppl' only, not {main!r}"
            )
        check_perplexity(dense_ppl, "dense_ppl")
    if not any(_finite(getattr(r, main)) for r in rows):
        raise ValueError(f"no row has a finite {main!r}; there is nothing to draw")
    if metric is None:
        held = ("heldout_distance", "nn_agreement") if encoder else ("heldout_ppl",)
        fields = ("fitness", *held, "evaluations", "wall_time_s", "achieved")
        shown = [f for f in fields if any(_finite(getattr(r, f)) for r in rows)]
    else:
        shown = [metric]
    target = _check_target(path, overwrite)
    with _figure(COMPARE_SIZE_IN) as fig:
        ncols = min(len(shown), 3)
        axes = np.atleast_1d(fig.subplots(-(-len(shown) // ncols), ncols)).ravel()
        for ax, field in zip(axes, shown, strict=False):
            ref = dense_ppl if field == "heldout_ppl" else None
            _draw_compare_panel(ax, rows, field, ref)
        for ax in axes[len(shown) :]:
            ax.set_visible(False)
        return _save(fig, target, overwrite)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _draw_compare_panel(
    ax: Axes, rows: Sequence[CompareRow], field: str, dense_ppl: float | None
) -> None:
    """One column of a compare table on ``ax``: a labelled point per strategy, the axis
    spanning the values (and ``dense_ppl``, dashed) with room for the labels."""
    raw = [getattr(r, field) for r in rows]
    scale = 100.0 if field in ("achieved", "nn_agreement") else 1.0  # fractions in percent
    values = np.array([v * scale if _finite(v) else np.nan for v in raw], dtype=np.float64)
    drawn = np.isfinite(values)
    x = np.arange(len(rows))
    span = values[drawn]
    lo, hi = (float(span.min()), float(span.max())) if span.size else (0.0, 1.0)
    pad = (hi - lo) * 0.25 or max(abs(hi) * 0.05, 1e-9)
    ax.set_ylim(max(lo - pad, 0.0) if lo >= 0 else lo - pad, hi + pad)
    ax.ticklabel_format(axis="y", useOffset=False)
    if dense_ppl is not None:  # named, drawn only if near: the strategies' spread decides
        label = f"dense {format_value('heldout_ppl', dense_ppl)}"
        ax.axhline(dense_ppl, color="k", linestyle="--", linewidth=1, label=label)
        ax.legend(fontsize="x-small")
    colors = [f"C{i % 10}" for i in np.flatnonzero(drawn)]
    ax.scatter(x[drawn], values[drawn], color=colors, zorder=3, clip_on=False)
    for i, text in enumerate(format_column(field, raw)):
        y = values[i] if drawn[i] else lo - pad * 0.5  # a missing value: its label at the foot
        ax.annotate(text, (x[i], y), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize="x-small")  # fmt: skip
    ax.set_xticks(x, [r.strategy for r in rows], rotation=30, ha="right", fontsize="small")
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_title(_METRIC_LABEL[field], fontsize="small")
    ax.grid(True, axis="y", alpha=0.3)


def plot_ppl_by_strategy(
    table: Mapping[float, Mapping[str, Sequence[float]]],
    path: str | os.PathLike[str],
    *,
    dense_ppl: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Draw held-out perplexity by strategy over seeds, one panel per sparsity.

    Each panel (one per sparsity, increasing top to bottom, each with its own y range
    since perplexity grows steeply with sparsity) shows, per strategy, the median over
    seeds as a marker labelled with its value and the min-max range as a whisker
    (see :func:`~allocsearch.report.tables.median_spread`).

    Args:
      table: sparsity (fraction removed, in [0, 1]) -> strategy -> held-out perplexity
        of each seed (>= 1, lower is better; ``inf`` for a diverged run is shown at the
        top of the panel and labelled ``inf``). Strategies are placed in order of first
        appearance, at the same x position in every panel.
      path: output ``.png`` path; its directory must exist.
      dense_ppl: held-out perplexity of the unpruned model, a dashed line in each panel.
      overwrite: replace an existing file instead of raising ``FileExistsError``.

    Returns:
      The path written: ``PPL_PANEL_SIZE_IN[0] * DPI`` wide and
      ``PPL_PANEL_SIZE_IN[1] * DPI`` high per panel (800 x 350 n).

    Raises:
      ValueError: an empty table or panel, a sparsity outside [0, 1], a strategy with no
        values, a perplexity below 1 or NaN.
      FileNotFoundError, FileExistsError: as for :func:`plot_sparsity_profile`.
    """
    if not table:
        raise ValueError("table is empty; give at least one sparsity")
    if dense_ppl is not None:
        dense_ppl = check_perplexity(dense_ppl, "dense_ppl")
    panels: list[tuple[float, dict[str, tuple[float, float, float]]]] = []
    strategies: list[str] = []
    for sparsity, by_strategy in table.items():
        s = float(sparsity)
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"sparsity {sparsity!r} is outside [0, 1]; give fractions removed")
        if not by_strategy:
            raise ValueError(f"sparsity {s:g}: no strategies")
        stats = {}
        for name, values in by_strategy.items():
            arr = np.asarray(values, dtype=np.float64)
            if arr.ndim != 1 or arr.size == 0:
                raise ValueError(f"sparsity {s:g}, {name}: needs a non-empty list of values")
            if np.any(~(arr >= 1.0)):
                raise ValueError(
                    f"sparsity {s:g}, {name}: perplexities {arr.tolist()} include values "
                    f"below 1 or NaN; a perplexity is >= 1 (inf if diverged)"
                )
            stats[str(name)] = median_spread(arr)
            if str(name) not in strategies:
                strategies.append(str(name))
        panels.append((s, stats))
    panels.sort(key=lambda item: item[0])
    target = _check_target(path, overwrite)
    width, height = PPL_PANEL_SIZE_IN
    with _figure((width, height * len(panels))) as fig:
        axes = np.atleast_1d(fig.subplots(len(panels), 1, squeeze=False)[:, 0])
        for ax, (sparsity, stats) in zip(axes, panels, strict=True):
            _draw_ppl_panel(ax, sparsity, stats, strategies, dense_ppl)
        return _save(fig, target, overwrite)


def _draw_ppl_panel(
    ax: Axes,
    sparsity: float,
    stats: Mapping[str, tuple[float, float, float]],
    strategies: Sequence[str],
    dense_ppl: float | None,
) -> None:
    """Median markers with min-max whiskers for the strategies of one sparsity."""
    finite = [v for m in stats.values() for v in m if math.isfinite(v)]
    if dense_ppl is not None:
        finite.append(dense_ppl)
    # Diverged runs (inf) are pinned just above the largest finite value.
    ceiling = 1.1 * max(finite) if finite else 2.0
    for i, name in enumerate(strategies):
        if name not in stats:
            continue
        med, lo, hi = stats[name]
        shown = [min(v, ceiling) for v in (med, lo, hi)]
        ax.errorbar(
            [i],
            [shown[0]],
            yerr=[[shown[0] - shown[1]], [shown[2] - shown[0]]],
            color=f"C{i % 10}",
            marker="o",
            capsize=4,
            linewidth=1.5,
        )
        if math.isinf(hi):  # the whisker's top is pinned at the ceiling: say so
            ax.annotate(
                "max inf",
                (i, shown[2]),
                xytext=(0, 4),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize="small",
            )
        ax.annotate(
            format_value("heldout_ppl", med),
            (i, shown[0]),
            xytext=(8, 0),
            textcoords="offset points",
            va="center",
            fontsize="small",
        )
    if dense_ppl is not None:
        ax.axhline(dense_ppl, color="k", linestyle="--", linewidth=1, label="dense")
        ax.legend(loc="best", fontsize="small")
    ax.set_xticks(np.arange(len(strategies)), strategies)
    ax.set_xlim(-0.5, len(strategies) - 0.5)
    ax.set_title(f"sparsity {100 * sparsity:g}%: median and min-max over seeds", fontsize="medium")
    ax.set_ylabel(_PPL_LABEL, fontsize="small")
    ax.margins(y=0.15)
    ax.grid(True, axis="y", alpha=0.3)


# ----------------------------------------------------------------------------- sweeps


def plot_quality_vs_sparsity(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike[str],
    *,
    dense_ppl: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Draw held-out perplexity against sparsity, one line per strategy (a sweep).

    Args:
      series: strategy -> points (sparsity achieved as a fraction removed in [0, 1],
        held-out perplexity >= 1, lower is better; ``inf`` for a diverged allocation is
        pinned above the largest finite value); points are drawn in order of sparsity.
        Strategies keep their order of appearance and one colour each.
      path: output ``.png`` path; its directory must exist.
      dense_ppl: held-out perplexity of the unpruned model, drawn as a dashed line.
      overwrite: replace an existing file instead of raising ``FileExistsError``.

    Returns:
      The path written (``COMPARE_SIZE_IN * DPI`` pixels, 800 x 500). The y axis is
      logarithmic: perplexity grows about exponentially with sparsity.

    Raises:
      ValueError: no series, an empty series, a sparsity outside [0, 1] or a perplexity
        below 1 or NaN.
      FileNotFoundError, FileExistsError: as for :func:`plot_sparsity_profile`.
    """
    if not series:
        raise ValueError("series is empty; give at least one strategy")
    if dense_ppl is not None:
        dense_ppl = check_perplexity(dense_ppl, "dense_ppl")
    lines: list[tuple[str, np.ndarray, np.ndarray]] = []
    for name, points in series.items():
        arr = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if arr.size == 0:
            raise ValueError(f"strategy {name!r}: no points")
        x, y = arr[:, 0], arr[:, 1]
        if np.any(~((x >= 0.0) & (x <= 1.0))):
            raise ValueError(f"strategy {name!r}: sparsities {x.tolist()} must lie in [0, 1]")
        if np.any(~(y >= 1.0)):
            raise ValueError(
                f"strategy {name!r}: perplexities {y.tolist()} include values below 1 or NaN"
            )
        order = np.argsort(x, kind="stable")
        lines.append((str(name), x[order], y[order]))
    finite = [v for _, _, y in lines for v in y if math.isfinite(v)]
    if dense_ppl is not None:
        finite.append(dense_ppl)
    ceiling = 1.1 * max(finite) if finite else 2.0
    target = _check_target(path, overwrite)
    with _figure(COMPARE_SIZE_IN) as fig:
        ax = fig.subplots()
        for i, (name, x, y) in enumerate(lines):
            ax.plot(
                100.0 * x,
                np.minimum(y, ceiling),
                color=f"C{i % 10}",
                marker="osD^v<>ps*hX"[i % 12],
                linewidth=1.5,
                label=name,
            )
        if dense_ppl is not None:
            ax.axhline(dense_ppl, color="k", linestyle="--", linewidth=1, label="dense")
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 6, 7, 10, 20 rather than 6 x 10^0
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel("sparsity achieved (% removed)")
        ax.set_ylabel(_PPL_LABEL)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        return _save(fig, target, overwrite)


__all__ = [
    "COMPARE_SIZE_IN",
    "DPI",
    "FITNESS_SIZE_IN",
    "PNG_SIGNATURE",
    "PPL_PANEL_SIZE_IN",
    "PROFILE_SIZE_IN",
    "plot_compare",
    "plot_fitness_curves",
    "plot_ppl_by_strategy",
    "plot_quality_vs_sparsity",
    "plot_sparsity_profile",
]
