"""The strategy registry: every strategy's name, kind, settings and factory, read by
every command."""

from __future__ import annotations

# CPU-scaled EvoPress defaults for the demo model (paper: 400 generations, 64 offspring,
# survivors 8 -> 2 -> 1, 2048 -> 16384 -> 65536 tokens; see search/evolutionary.py).
DEMO_EVOPRESS = {
    "generations": 30,
    "offspring": 12,
    "survivors": [3, 1],
    "tokens": [512, 2048],
}

TABLE_STRATEGIES = ("dp", "knapsack", "knapsack_lagrange")
