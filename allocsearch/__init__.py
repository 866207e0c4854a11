"""allocsearch: search per-layer sparsity allocations for pruning under a global budget."""

__version__ = "0.1.0"
