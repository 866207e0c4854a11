"""Local layer-wise pruners: one layer, all sparsity levels at once, from its statistics.

See :mod:`allocsearch.pruners.base` for the protocol and result types.
"""

from allocsearch.pruners.base import (
    DenseVariants,
    LayerStats,
    LocalPruner,
    NestedVariants,
    Variants,
    accumulate_stats,
    mask_from_rank,
)
from allocsearch.pruners.magnitude import MagnitudePruner
from allocsearch.pruners.nm import NMMagnitudePruner, NMSparseGPTPruner, NMWandaPruner
from allocsearch.pruners.sparsegpt import SparseGPTPruner
from allocsearch.pruners.structured import (
    MIN_HEAD_STEP,
    MIN_NEURON_STEP,
    HeadGroups,
    NeuronGroups,
    StructuredPruner,
)
from allocsearch.pruners.wanda import WandaPruner

__all__ = [
    "MIN_HEAD_STEP",
    "MIN_NEURON_STEP",
    "DenseVariants",
    "HeadGroups",
    "LayerStats",
    "LocalPruner",
    "MagnitudePruner",
    "NMMagnitudePruner",
    "NMSparseGPTPruner",
    "NMWandaPruner",
    "NestedVariants",
    "NeuronGroups",
    "SparseGPTPruner",
    "StructuredPruner",
    "Variants",
    "WandaPruner",
    "accumulate_stats",
    "mask_from_rank",
]
