"""The search space: level grids, the supernet builder and its on-disk store."""

from allocsearch.supernet.build import build_supernet, supernet_units, unit_group_counts
from allocsearch.supernet.levels import (
    LevelGrid,
    equal_step_grid,
    explicit_grid,
    nm_grid,
    structured_grid,
)
from allocsearch.supernet.spec import SupernetSpec, Unit
from allocsearch.supernet.store import StoreError, SupernetStore

__all__ = [
    "LevelGrid",
    "StoreError",
    "SupernetSpec",
    "SupernetStore",
    "Unit",
    "build_supernet",
    "equal_step_grid",
    "explicit_grid",
    "nm_grid",
    "structured_grid",
    "supernet_units",
    "unit_group_counts",
]
