"""Applying a bitwidth recipe: every quantized layer's dequantized weights in a dense checkpoint.

The written checkpoint is an ordinary Hugging Face directory that transformers loads as
is: each quantized layer holds its *dequantized* weights (integer codes times float16
scales, minus zero points), which are exact in float32, so the model computes what the
quantized model computes; it is not stored compactly (compressed-tensors packing is left
to llm-compressor, see ``allocsearch export --format llm-compressor``). The weights come
from the supernet the recipe was searched on (its GPTQ or RTN variants, bit for bit), or,
without a store, from round-to-nearest quantization of the dense weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from allocsearch.models.hf import HFModel, fingerprint_tensors
from allocsearch.quantizers.costs import level_label
from allocsearch.quantizers.grid import QuantLevel
from allocsearch.quantizers.rtn import RTNQuantizer
from allocsearch.recipe.recipe import Recipe, RecipeError, check_against_model, fraction_removed
from allocsearch.supernet.store import SupernetStore

DEQUANTIZED = "dequantized"
"""What :func:`apply_quant_recipe` writes: dense float weights, not packed integers."""


@dataclass(frozen=True)
class QuantApplyReport:
    """Summary of an applied bitwidth recipe.

    Attributes:
      source: ``"store:<path>"`` (the supernet's variants) or ``"rtn"`` (round to nearest).
      format: always :data:`DEQUANTIZED`.
      bits: layer name -> bits of every quantized layer.
      average_bits: bits per prunable weight, scales and zero points counted.
      notes: what deserves attention.
    """

    source: str
    format: str
    bits: dict[str, int]
    average_bits: float
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        """A few human-readable lines (for the CLI)."""
        counts: dict[int, int] = {}
        for b in self.bits.values():
            counts[b] = counts.get(b, 0) + 1
        mix = ", ".join(f"{n} at {b} bits" for b, n in sorted(counts.items()))
        lines = [
            f"weights from: {self.source}",
            f"checkpoint: {self.format} weights (float; transformers loads it as is, not "
            f"compressed-tensors)",
            f"layers: {mix}; {self.average_bits:.4f} bits per weight on average",
        ]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def quant_choice_for_recipe(recipe: Recipe, store: SupernetStore) -> np.ndarray:
    """int32[L]: per store unit, the level whose quantization (bits, group size, symmetry)
    is the recipe layer's; a RecipeError names a layer the store lacks or cannot match."""
    if store.model_fingerprint != recipe.model.fingerprint:
        raise RecipeError(
            f"the store {store.path} was built for model fingerprint "
            f"{store.model_fingerprint!r}, the recipe is for {recipe.model.fingerprint!r}"
        )
    spec = store.spec
    entry = {x.name: x for x in recipe.layers}
    choice = np.zeros(spec.num_units, np.int32)
    for u, unit in enumerate(spec.units):
        (name,) = unit.layers
        x = entry.get(name)
        if x is None or not x.quantized:
            raise RecipeError(f"the store's layer {name!r} has no bits in the recipe")
        labels = list(spec.level_labels[u]) if spec.level_labels else []
        want = level_label(QuantLevel(x.bits, x.group_size, x.symmetric))
        if want not in labels:
            raise RecipeError(
                f"layer {name!r} is {want} in the recipe, not a level of the store "
                f"{store.path} (its levels: {labels}); use the store the recipe was searched on"
            )
        choice[u] = labels.index(want)
    return choice


def apply_quant_recipe(
    model: HFModel, recipe: Recipe, *, store: SupernetStore | None = None
) -> tuple[HFModel, QuantApplyReport]:
    """The model with every quantized recipe layer's weights dequantized in place.

    Args:
      model: the dense model the recipe was made for (checked by fingerprint).
      recipe: a bitwidth recipe (layers with ``bits``).
      store: the quantized supernet the recipe was searched on (its variants are used),
        or None to quantize by round to nearest.

    Returns:
      (the model with dequantized weights, its report).
    """
    if not recipe.quantized:
        raise RecipeError("apply_quant_recipe: the recipe has no per-layer bits")
    if any(x.sparsity > 0 for x in recipe.layers if x.quantized):
        raise RecipeError("apply: joint sparsity + bits recipes are not applied yet")
    adapter = model.adapter
    check_against_model(recipe, list(adapter.layers()), model.fingerprint)
    info = {layer.name: layer for layer in adapter.layers()}
    params = dict(model.params)
    notes: list[str] = []
    if store is not None:
        choice = quant_choice_for_recipe(recipe, store)
        for u, unit in enumerate(store.spec.units):
            weight_name = info[unit.layers[0]].weight_name
            w = store.variants(weight_name).weights[int(choice[u])]
            params[weight_name] = jnp.asarray(w, jnp.float32).astype(params[weight_name].dtype)
        source = f"store:{store.path}"
    else:
        for x in recipe.layers:
            if not x.quantized:
                continue
            weight_name = info[x.name].weight_name
            w = np.asarray(params[weight_name], np.float32)
            q = RTNQuantizer(group_size=x.group_size, symmetric=x.symmetric)
            deq = q.quantize(w, None, [x.bits]).weights(0)
            params[weight_name] = jnp.asarray(deq).astype(params[weight_name].dtype)
        source = "rtn"
        notes.append("no --supernet: round-to-nearest weights; pass the store for its GPTQ ones")
    if any(params[info[x.name].weight_name].dtype != jnp.float32 for x in recipe.layers):
        notes.append("the model's dtype is not float32: dequantized weights were rounded to it")
    host = {k: np.asarray(v) for k, v in params.items()}
    raw = adapter.to_hf_tensors(host)
    raw.update(model.extras)
    fingerprint = fingerprint_tensors(adapter.hf_config, raw)
    quantized = HFModel(adapter, params, dict(model.extras), fingerprint, None)
    report = QuantApplyReport(
        source=source,
        format=DEQUANTIZED,
        bits={x.name: int(x.bits) for x in recipe.layers if x.quantized},
        average_bits=16.0 * (1.0 - fraction_removed(recipe.layers, "bits")),
        notes=tuple(notes),
    )
    return quantized, report
