"""Markdown tables of strategy comparisons, and the median/spread summary over seeds.

A *compare table* has one :class:`CompareRow` per allocation strategy run on the same
model, budget and data: its search fitness, held-out perplexity (encoders: held-out
distance to the dense model and nearest-neighbour agreement), cost and the budget it
achieved. :func:`markdown_table` turns the rows into aligned Markdown (what
``docs/RESULTS.md`` shows); :mod:`allocsearch.report.plots` draws the same rows. The
number formats live here once (:func:`format_value`) and both modules use them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Columns of the compare table: (CompareRow field, header, right-aligned, better) with
# better -1: lower is better, +1: higher is better, 0: neither ("achieved" should match
# the target). A table shows either held-out ppl (causal LMs) or the two encoder columns.
_COLUMNS = (
    ("strategy", "strategy", False, 0),
    ("fitness", "fitness", True, -1),
    ("validation", "validation", True, -1),
    ("heldout_ppl", "held-out ppl", True, -1),
    ("heldout_distance", "held-out distance", True, -1),
    ("nn_agreement", "NN agreement", True, 1),
    ("evaluations", "evaluations", True, -1),
    ("wall_time_s", "wall time (s)", True, -1),
    ("achieved", "achieved", True, 0),
)
_ENCODER_FIELDS = ("heldout_distance", "nn_agreement")
# The numeric fields of a CompareRow, i.e. the metrics a plot or table can show.
METRICS = (
    "fitness",
    "validation",
    "heldout_ppl",
    "heldout_distance",
    "nn_agreement",
    "evaluations",
    "wall_time_s",
    "achieved",
)
# Shown where a value is missing (not measured) or does not apply (the dense row).
MISSING = "n/a"
# Marks a strategy whose rank by calibration fitness differs from its rank by validation.
RANK_FLAG = "†"
RANK_LEGEND = (
    f"{RANK_FLAG} its rank by calibration fitness differs from its rank by validation "
    "fitness: the calibration score does not carry over to rows no search scored."
)
# Significant digits of the smallest fitness value (KL per token spans decades).
_FITNESS_DIGITS = 4
_MAX_DECIMALS = 8


@dataclass(frozen=True)
class CompareRow:
    """One strategy's result in a comparison on the same model, budget and data.

    Attributes:
      strategy: name shown in tables and plots, e.g. ``"evopress"`` or ``"owl"``;
        unique within a table.
      fitness: the search's score of its final allocation (e.g. KL(dense || pruned) per
        token on calibration data), lower is better; ``None`` if it was not scored, and
        ``inf`` if scoring diverged.
      heldout_ppl: perplexity of the pruned model on the held-out set, lower is better;
        ``None`` if not measured (always for encoders).
      evaluations: candidate scorings the search used (>= 0; 0 for closed-form
        baselines such as uniform); lower is cheaper.
      wall_time_s: search wall-clock time in seconds (>= 0); lower is cheaper.
      achieved: fraction of the budgeted cost actually removed, in [0, 1] (the recipe's
        ``budget.achieved``); it should equal the target, neither lower nor higher is
        better.
      heldout_distance: encoders: mean distance of the pruned model's held-out outputs
        to the dense model's (e.g. embedding cosine distance, >= 0, ``inf`` if diverged),
        lower is better; ``None`` for causal language models or if not measured.
      nn_agreement: encoders: fraction of held-out sequences whose nearest neighbour
        (pooled embedding cosine) is the same for the pruned and the dense model, in
        [0, 1], higher is better; ``None`` if not measured.
      validation: the same metric as ``fitness`` on the validation rows (calibration-source
        rows no search scored), lower is better; ``None`` if there are none.
    """

    strategy: str
    fitness: float | None
    heldout_ppl: float | None
    evaluations: int
    wall_time_s: float
    achieved: float
    heldout_distance: float | None = None
    nn_agreement: float | None = None
    validation: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.strategy, str) or not self.strategy:
            raise ValueError(f"strategy must be a non-empty string, got {self.strategy!r}")
        for key in ("fitness", "validation"):
            if getattr(self, key) is None:
                continue
            value = _as_number(getattr(self, key), f"{self.strategy}: {key}")
            if math.isnan(value) or value == -math.inf:
                raise ValueError(
                    f"{self.strategy}: {key} = {value!r}; valid values are finite numbers, "
                    f"+inf (diverged) or None (not scored)"
                )
            object.__setattr__(self, key, value)
        if self.heldout_ppl is not None:
            value = _as_number(self.heldout_ppl, f"{self.strategy}: heldout_ppl")
            if not value >= 1.0:  # perplexity = exp(mean NLL) >= 1; also rejects NaN
                raise ValueError(
                    f"{self.strategy}: heldout_ppl = {value!r}; a perplexity is a number >= 1 "
                    f"(+inf if diverged), or None if not measured"
                )
            object.__setattr__(self, "heldout_ppl", value)
        if self.heldout_distance is not None:
            value = _as_number(self.heldout_distance, f"{self.strategy}: heldout_distance")
            if not value >= 0.0:  # also rejects NaN
                raise ValueError(
                    f"{self.strategy}: heldout_distance = {value!r}; a distance is a number "
                    f">= 0 (+inf if diverged), or None if not measured"
                )
            object.__setattr__(self, "heldout_distance", value)
        if self.nn_agreement is not None:
            value = _as_number(self.nn_agreement, f"{self.strategy}: nn_agreement")
            if not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"{self.strategy}: nn_agreement = {value!r}; it is a fraction in [0, 1], "
                    f"or None if not measured"
                )
            object.__setattr__(self, "nn_agreement", value)
        if self.heldout_ppl is not None and (
            self.heldout_distance is not None or self.nn_agreement is not None
        ):
            raise ValueError(
                f"{self.strategy}: a row has held-out perplexity (causal language models) or "
                f"held-out distance / NN agreement (encoders), not both"
            )
        if isinstance(self.evaluations, bool) or not isinstance(self.evaluations, int | np.integer):
            raise ValueError(
                f"{self.strategy}: evaluations must be an integer >= 0, got {self.evaluations!r}"
            )
        if self.evaluations < 0:
            raise ValueError(f"{self.strategy}: evaluations = {self.evaluations} must be >= 0")
        object.__setattr__(self, "evaluations", int(self.evaluations))
        wall = _as_number(self.wall_time_s, f"{self.strategy}: wall_time_s")
        if not (math.isfinite(wall) and wall >= 0.0):
            raise ValueError(
                f"{self.strategy}: wall_time_s = {wall!r}; valid values are finite and >= 0"
            )
        object.__setattr__(self, "wall_time_s", wall)
        achieved = _as_number(self.achieved, f"{self.strategy}: achieved")
        if not 0.0 <= achieved <= 1.0:
            raise ValueError(
                f"{self.strategy}: achieved = {achieved!r}; it is a fraction removed in [0, 1]"
            )
        object.__setattr__(self, "achieved", achieved)


def _as_number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{what} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def check_rows(rows: Sequence[CompareRow]) -> tuple[CompareRow, ...]:
    """The rows as a tuple, after checking there is at least one and names are unique.

    Raises:
      ValueError: no rows, a row that is not a :class:`CompareRow`, or a strategy name
        used twice.
    """
    rows = tuple(rows)
    if not rows:
        raise ValueError("rows is empty; a compare table needs at least one CompareRow")
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if not isinstance(row, CompareRow):
            raise ValueError(f"rows[{i}] must be a CompareRow, got {type(row).__name__}")
        if row.strategy in seen:
            raise ValueError(
                f"strategy {row.strategy!r} appears twice in rows; give each row a unique name"
            )
        seen.add(row.strategy)
    return rows


def check_perplexity(value: object, what: str) -> float:
    """``value`` as a float after checking it is a finite perplexity (>= 1).

    Raises:
      ValueError: not a number, not finite, or below 1; the message names ``what``.
    """
    out = _as_number(value, what)
    if not (math.isfinite(out) and out >= 1.0):
        raise ValueError(f"{what} = {out!r}; a perplexity is a finite number >= 1")
    return out


def _fitness_decimals(values: Sequence[float]) -> int:
    """Decimals that give the smallest non-zero finite |value| _FITNESS_DIGITS digits."""
    finite = [abs(v) for v in values if math.isfinite(v) and v != 0.0]
    if not finite:
        return _FITNESS_DIGITS - 1
    exponent = math.floor(math.log10(min(finite)))
    return int(min(_MAX_DECIMALS, max(0, _FITNESS_DIGITS - 1 - exponent)))


def format_value(metric: str, value: float | None, *, decimals: int | None = None) -> str:
    """Text of one value of a compare-table column (the format tables and plots share).

    Args:
      metric: one of :data:`METRICS`.
      value: the value; ``None`` gives :data:`MISSING`.
      decimals: fitness and heldout_distance only: decimal places (``markdown_table``
        picks one per column so the smallest value keeps 4 significant digits); default
        4 significant digits.

    Returns:
      ``heldout_ppl`` with 2 decimals (``"28.76"``), ``evaluations`` with thousands
      separators (``"25,600"``), ``wall_time_s`` with 1 decimal, ``achieved`` as a
      percentage with 2 decimals (``"52.50%"``), ``nn_agreement`` as a percentage with 1
      decimal (``"75.0%"``), non-finite values as ``"inf"``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {METRICS}")
    if value is None:
        return MISSING
    if not math.isfinite(value):
        return "inf" if value > 0 else str(value)
    if metric in ("fitness", "validation", "heldout_distance"):
        if decimals is None:
            decimals = _fitness_decimals([value])
        return f"{value:.{decimals}f}"
    if metric == "heldout_ppl":
        return f"{value:.2f}"
    if metric == "evaluations":
        return f"{int(value):,}"
    if metric == "wall_time_s":
        return f"{value:.1f}"
    if metric == "nn_agreement":
        return f"{100.0 * value:.1f}%"
    return f"{100.0 * value:.2f}%"


def format_column(metric: str, values: Sequence[float | None]) -> list[str]:
    """Texts of one compare-table column, as :func:`markdown_table` prints them.

    Like :func:`format_value`, except that fitness (and heldout_distance) values share one
    number of decimals: enough for the smallest non-zero finite |value| to keep 4
    significant digits.
    """
    decimals = None
    if metric in ("fitness", "validation", "heldout_distance"):
        decimals = _fitness_decimals([v for v in values if v is not None])
    return [format_value(metric, v, decimals=decimals) for v in values]


def markdown_table(rows: Sequence[CompareRow], *, dense_ppl: float | None = None) -> str:
    """A Markdown table of a strategy comparison, columns aligned in plain text.

    Columns: strategy, fitness (titled calibration beside a validation column),
    validation (when any row has one), held-out ppl,
    evaluations, wall time (s), achieved. A strategy whose rank by fitness differs from
    its rank by validation (:func:`rank_disagreements`) is marked :data:`RANK_FLAG`, and
    :data:`RANK_LEGEND` follows the table after a blank line. When
    any row is an encoder's (has ``heldout_distance`` or ``nn_agreement``), the held-out
    ppl column is replaced by held-out distance (to the dense model) and NN agreement:
    an encoder has no perplexity. In every column where lower is better (higher for NN
    agreement; neither for strategy and achieved), the best value is in bold, ties
    included (compared as displayed, so values that print the same tie); a column with
    fewer than two values has no bold. Missing values show as ``n/a``.

    Args:
      rows: one row per strategy, in the order to show them (unique names).
      dense_ppl: held-out perplexity of the unpruned model (>= 1, lower is better); when
        given, a first ``dense`` row shows it as the reference. It takes no part in
        choosing the bold values.

    Returns:
      The table as text: header, alignment line and one line per row, each ending in a
      newline. Numbers are right-aligned; see :func:`format_value` for their formats.

    Raises:
      ValueError: no rows, duplicate strategies, ``dense_ppl`` that is not >= 1, or
        rows that mix perplexities (causal LMs) and encoder values.
    """
    rows = check_rows(rows)
    encoder = any(getattr(r, f) is not None for r in rows for f in _ENCODER_FIELDS)
    if encoder and (dense_ppl is not None or any(r.heldout_ppl is not None for r in rows)):
        raise ValueError(
            "rows mix held-out perplexity (causal language models; or dense_ppl given) "
            "with held-out distance / NN agreement (encoders); one table holds one kind"
        )
    if dense_ppl is not None:
        dense_ppl = check_perplexity(dense_ppl, "dense_ppl")
    dropped = ("heldout_ppl",) if encoder else _ENCODER_FIELDS
    if all(r.validation is None for r in rows):
        dropped = (*dropped, "validation")
    shown = [c for c in _COLUMNS if c[0] not in dropped]
    flagged = rank_disagreements(rows)
    columns = [
        [
            row.strategy.replace("|", "\\|") + (f" {RANK_FLAG}" if row.strategy in flagged else "")
            for row in rows
        ]
    ]
    for field, _, _, better in shown[1:]:
        values = [getattr(row, field) for row in rows]
        texts = format_column(field, values)
        finite = [i for i, v in enumerate(values) if v is not None and math.isfinite(v)]
        if better and finite and sum(v is not None for v in values) >= 2:
            best = texts[min(finite, key=lambda i: -better * values[i])]
            texts = [f"**{t}**" if t == best else t for t in texts]
        columns.append(texts)
    body = [list(line) for line in zip(*columns, strict=True)]
    if dense_ppl is not None:
        ppl = format_value("heldout_ppl", dense_ppl)
        fits = [MISSING] * (len(shown) - 5)  # fitness (and validation)
        body.insert(0, ["dense", *fits, ppl, MISSING, MISSING, format_value("achieved", 0.0)])
    # beside a validation column, the fitness column says which rows it scored
    split = "validation" not in dropped
    header = ["calibration" if split and f == "fitness" else t for f, t, _, _ in shown]
    widths = [max(len(line[c]) for line in [header, *body]) for c in range(len(shown))]
    # A Markdown alignment cell needs at least 3 characters (":--" / "--:").
    widths = [max(w, 3) for w in widths]

    def render(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(w) if right else cell.ljust(w)
            for cell, w, (_, _, right, _) in zip(cells, widths, shown, strict=True)
        ]
        return "| " + " | ".join(padded) + " |\n"

    rule = [
        "-" * (w - 1) + ":" if right else ":" + "-" * (w - 1)
        for w, (_, _, right, _) in zip(widths, shown, strict=True)
    ]
    legend = f"\n{RANK_LEGEND}\n" if flagged else ""
    return render(header) + render(rule) + "".join(render(line) for line in body) + legend


def _ranks(values: Sequence[float]) -> list[int]:
    """Competition ranks (1 = lowest; equal values share the lower rank)."""
    return [sum(w < v for w in values) + 1 for v in values]


def rank_disagreements(rows: Sequence[CompareRow]) -> set[str]:
    """Strategies whose rank by calibration fitness differs from their rank by validation
    fitness, among the rows that have both (lower is better; ties share a rank; fewer
    than two such rows: none)."""
    both = [r for r in rows if r.fitness is not None and r.validation is not None]
    if len(both) < 2:
        return set()
    by_calibration = _ranks([float(r.fitness) for r in both])  # type: ignore[arg-type]
    by_validation = _ranks([float(r.validation) for r in both])  # type: ignore[arg-type]
    return {
        r.strategy for r, a, b in zip(both, by_calibration, by_validation, strict=True) if a != b
    }


def median_spread(values: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """Median and range of repeated measurements, e.g. held-out perplexity over seeds.

    Args:
      values: float[n], n >= 1 (``inf`` allowed for a diverged run; NaN is not).

    Returns:
      ``(median, min, max)`` as floats; for even n the median is the mean of the two
      middle values.

    Raises:
      ValueError: empty or not one-dimensional input, or a NaN.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(f"values contain NaN at positions {np.flatnonzero(np.isnan(arr))[:10]}")
    return float(np.median(arr)), float(arr.min()), float(arr.max())


__all__ = [
    "METRICS",
    "MISSING",
    "CompareRow",
    "check_perplexity",
    "check_rows",
    "format_column",
    "format_value",
    "markdown_table",
    "median_spread",
    "rank_disagreements",
]
