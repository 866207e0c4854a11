"""Build a supernet of quantized variants: every layer at every bitwidth, into a store.

A bridge until the spec carries level descriptions (DESIGN.md, "Levels are data"): the
store is an ordinary dense store of the *dequantized* weights (float32, or the model's
dtype), and the spec's per-level "sparsity" is the fraction of the 16-bit cost a level
removes, ``1 - bits_per_weight / 16`` (scales and zero points counted,
:func:`~allocsearch.quantizers.costs.bits_per_weight`). So the levels increase in it as
bits decrease, a ``params`` budget at target ``t`` is an average-bits budget of
``16 (1 - t)`` bits per weight, and every searcher and the evaluators run unchanged. The
manifest's ``pruner`` record says ``"kind": "quantizer"`` and lists the levels; recipes
from such a store hold these fractions, not sparsities, and must not be applied as
pruning recipes.

Inputs are captured block by block with the dense weights (``input_mode="dense"``), as
GPTQ's reference does per layer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from allocsearch.data.tokenset import TokenSet
from allocsearch.models.hf import HFModel
from allocsearch.models.moe import MoEAdapter
from allocsearch.models.streamed import block_on_device
from allocsearch.pruners.base import DenseVariants
from allocsearch.quantizers.base import LocalQuantizer, check_bits_levels
from allocsearch.quantizers.costs import bits_per_weight, level_label, level_to_json
from allocsearch.quantizers.grid import QuantLevel
from allocsearch.supernet.build import manifest_build, manifest_model
from allocsearch.supernet.capture import capture_block, embed_batches
from allocsearch.supernet.levels import LevelGrid
from allocsearch.supernet.store import (
    STORAGE_DTYPES,
    StoreWriter,
    SupernetStore,
    make_spec,
    resolve_storage_dtype,
)
from allocsearch.supernet.units import supernet_units

__all__ = ["FULL_BITS", "build_quantized_supernet", "quantized_grid"]

FULL_BITS = 16
"""Bits per weight of the reference (dense 16-bit) model the level fractions refer to."""


def quantized_grid(
    shapes: Sequence[tuple[int, int]],
    bits: Sequence[int],
    *,
    group_size: int,
    symmetric: bool,
    center_bits: int | None = None,
) -> tuple[LevelGrid, list[QuantLevel]]:
    """The level grid of a quantized supernet: per unit, levels by decreasing bits.

    Args:
      shapes: ``(out, in)`` of each unit's layer.
      bits: distinct bitwidths (any order).
      center_bits: the level a uniform allocation picks (default: the middle one).

    Returns:
      (grid with ``sparsity[u, k] = 1 - bits_per_weight / 16`` and labels like
      ``"4b g128 sym"``, the levels in grid order).
    """
    b = sorted(check_bits_levels(bits).tolist(), reverse=True)
    if len(set(b)) != len(b):
        raise ValueError(f"bits must be distinct, got {list(bits)}")
    if center_bits is None:
        center_bits = b[len(b) // 2]
    if center_bits not in b:
        raise ValueError(f"center_bits {center_bits!r} is not one of the bits {b}")
    levels = [QuantLevel(x, group_size, symmetric) for x in b]
    frac = np.array([[1.0 - bits_per_weight(lv, s) / FULL_BITS for lv in levels] for s in shapes])
    labels = tuple(tuple(level_label(lv) for lv in levels) for _ in shapes)
    center = np.full(len(shapes), b.index(center_bits), np.int32)
    return LevelGrid(frac, np.ones(frac.shape, bool), center, labels), levels


def _quantizer_record(quantizer: LocalQuantizer, levels: Sequence[QuantLevel]) -> dict:
    params = {}
    if dataclasses.is_dataclass(quantizer):
        params = {f.name: getattr(quantizer, f.name) for f in dataclasses.fields(quantizer)}
    return {
        "name": quantizer.name,
        "kind": "quantizer",
        "nested": False,
        "params": params,
        "levels": [level_to_json(lv) for lv in levels],
        "level_fraction": f"1 - bits_per_weight / {FULL_BITS}",
    }


def _layer_variants(
    quantizer: LocalQuantizer, weight: np.ndarray, stats, level_bits: list[int], fractions, dtype
) -> DenseVariants:
    """The dequantized levels of one layer, checked to be exact in the storage dtype."""
    v = quantizer.quantize(weight, stats, level_bits)
    dense = np.stack([v.weights(k) for k in range(v.num_levels)])
    if not np.array_equal(dense.astype(dtype).astype(np.float32), dense):
        raise ValueError(
            f"dequantized weights are not exact in {np.dtype(dtype).name}; store them as float32"
        )
    return DenseVariants(jnp.asarray(dense), np.asarray(fractions, np.float64))


def _quantize_blocks(model, calibration, quantizer, grid, level_bits, writer, batch_size):
    """Walk the blocks with dense weights: capture each block's input statistics, write
    every unit's variants; returns the input norms (layer name -> float32[in])."""
    adapter, params = model.adapter, model.params
    layers = {layer.name: layer for layer in adapter.layers()}
    units = supernet_units(adapter, "unstructured")
    dtype = STORAGE_DTYPES[writer.storage_dtype]
    hidden, contexts = embed_batches(adapter, params, calibration.tokens, batch_size)
    norms = {}
    for b in range(adapter.num_blocks):
        prefix = adapter.block_prefix(b)
        block_params = block_on_device(adapter, params, b)
        captured = capture_block(adapter, block_params, hidden, contexts, None, keep_output=True)
        hidden = captured.output
        for u, unit in enumerate(units):
            layer = layers[unit.name]
            if layer.block != b:
                continue
            st = captured.stats[layer.input_group[len(prefix) :]]
            norms[layer.name] = np.sqrt(np.maximum(np.diag(np.asarray(st.hessian)), 0.0))
            weight = np.asarray(params[layer.weight_name], np.float32)
            variants = _layer_variants(quantizer, weight, st, level_bits, grid.sparsity[u], dtype)
            writer.add(layer.weight_name, variants)
    return norms


def build_quantized_supernet(
    model: HFModel,
    calibration: TokenSet,
    quantizer: LocalQuantizer,
    bits: Sequence[int],
    out_dir: str | Path,
    *,
    center_bits: int | None = None,
    batch_size: int = 16,
    storage_dtype: str = "float32",
    overwrite: bool = False,
) -> SupernetStore:
    """Quantize every prunable layer of ``model`` at every bitwidth and write the store.

    Args:
      model: a dense (not mixture-of-experts) model; units are its prunable layers.
      calibration: token set whose layer inputs give each layer's statistics.
      quantizer: a :class:`~allocsearch.quantizers.base.LocalQuantizer` (RTN, GPTQ).
      bits: distinct bitwidths; levels are ordered by decreasing bits.
      center_bits: see :func:`quantized_grid`.
      batch_size: calibration sequences per forward batch.
      storage_dtype: ``"float32"`` (dequantized weights are exact in it) or another
        storage dtype, refused for a layer whose dequantized weights it cannot hold.
      overwrite: replace an existing store at ``out_dir``.

    Returns:
      The opened store (see the module docstring for what its spec's levels mean).
    """
    if not isinstance(quantizer, LocalQuantizer):
        raise ValueError(f"quantizer must be a LocalQuantizer (RTN, GPTQ), got {quantizer!r}")
    adapter = model.adapter
    if isinstance(adapter, MoEAdapter):
        raise ValueError("quantized supernets of mixture-of-experts models are not supported yet")
    units = supernet_units(adapter, "unstructured")
    layers = {layer.name: layer for layer in adapter.layers()}
    grid, levels = quantized_grid(
        [layers[u.name].shape for u in units],
        bits,
        group_size=quantizer.group_size,
        symmetric=quantizer.symmetric,
        center_bits=center_bits,
    )
    storage_dtype = resolve_storage_dtype(
        storage_dtype, model.params[layers[units[0].name].weight_name].dtype
    )
    t_start = time.perf_counter()
    with StoreWriter(out_dir, overwrite=overwrite, storage_dtype=storage_dtype) as writer:
        norms = _quantize_blocks(
            model, calibration, quantizer, grid, [lv.bits for lv in levels], writer, batch_size
        )
        writer.add_input_norms(norms)
        spec = make_spec(units, grid.sparsity, grid.valid, grid.center, "unstructured", grid.labels)
        path = writer.commit(
            spec=spec,
            unit_params=[(layers[u.name].weight_name,) for u in units],
            grid=grid,
            model_fingerprint=model.fingerprint,
            tokens_fingerprint=calibration.fingerprint,
            pruner=_quantizer_record(quantizer, levels),
            input_mode="dense",
            extra={
                "model": manifest_model(model),
                "calibration": calibration.provenance(),
                "structure": "unstructured",
                "storage_dtype": storage_dtype,
                "build": manifest_build(batch_size, calibration.n_tokens, t_start),
            },
        )
    return SupernetStore.open(
        path,
        model_fingerprint=model.fingerprint,
        tokens_fingerprint=calibration.fingerprint,
        verify="none",  # just written
    )
