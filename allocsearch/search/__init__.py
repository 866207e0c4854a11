"""Search strategies and budget arithmetic over a supernet's units x levels.

Search code sees only :class:`~allocsearch.supernet.spec.SupernetSpec` and level
indices; weights are reached through the store and scores through an evaluator.
"""

from allocsearch.search.base import (
    Evaluate,
    HistoryEntry,
    Query,
    Searcher,
    SearchResult,
    numpy_rng,
)
from allocsearch.search.budget import (
    BUDGET_KINDS,
    Budget,
    CostModel,
    InfeasibleBudgetError,
    LatencyTable,
    allowed_levels,
    check_feasible_target,
    cost_table,
    load_latency_table,
    snap_to_levels,
    uniform_choice,
)
from allocsearch.search.dp import TableSearcher, dp_solve
from allocsearch.search.evolutionary import EvolutionarySearcher
from allocsearch.search.knapsack import (
    MckpSolution,
    knapsack_01,
    knapsack_greedy,
    mckp_lagrangian,
    mckp_milp,
)

__all__ = [
    "BUDGET_KINDS",
    "Budget",
    "CostModel",
    "Evaluate",
    "EvolutionarySearcher",
    "HistoryEntry",
    "InfeasibleBudgetError",
    "MckpSolution",
    "LatencyTable",
    "Query",
    "SearchResult",
    "Searcher",
    "TableSearcher",
    "allowed_levels",
    "check_feasible_target",
    "cost_table",
    "dp_solve",
    "knapsack_01",
    "knapsack_greedy",
    "load_latency_table",
    "mckp_lagrangian",
    "mckp_milp",
    "numpy_rng",
    "snap_to_levels",
    "uniform_choice",
]
