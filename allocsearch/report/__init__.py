"""Reports: PNG figures (matplotlib, Agg) and Markdown tables of searches and comparisons."""

from allocsearch.report.plots import (
    plot_compare,
    plot_fitness_curves,
    plot_ppl_by_strategy,
    plot_sparsity_profile,
)
from allocsearch.report.tables import CompareRow, markdown_table, median_spread

__all__ = [
    "CompareRow",
    "markdown_table",
    "median_spread",
    "plot_compare",
    "plot_fitness_curves",
    "plot_ppl_by_strategy",
    "plot_sparsity_profile",
]
