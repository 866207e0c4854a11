"""The store's format: version and file constants, the manifest's JSON forms of the grid
and spec, and a parameter file's tensors <-> variants (see :mod:`allocsearch.supernet.store`
for the layout)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any, Final

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from allocsearch.pruners.base import DenseVariants, NestedVariants, Variants
from allocsearch.supernet import packed
from allocsearch.supernet.levels import LevelGrid
from allocsearch.supernet.spec import SupernetSpec, Unit

FORMAT_VERSION: Final[int] = 2
"""Version of the store layout written by this module."""
READABLE_VERSIONS: Final[tuple[int, ...]] = (1, 2)
"""Versions :meth:`SupernetStore.open` reads; others are refused."""
MANIFEST_NAME: Final[str] = "manifest.json"
INPUT_NORMS_FILE: Final[str] = "input_norms.safetensors"
STORAGE_DTYPES: Final[dict[str, np.dtype]] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
"""On-disk dtypes of dense variant weights; they are read back in the same dtype."""
STORAGE_DTYPE_CHOICES: Final[tuple[str, ...]] = ("auto", *STORAGE_DTYPES)
"""What a user may ask for: ``"auto"`` is the model's parameter dtype."""
LAYOUTS: Final[tuple[str, ...]] = ("auto", "dense", "packed")
"""Layouts of dense variant files: ``"auto"`` writes packed where it is smaller."""
VERIFY_MODES: Final[tuple[str, ...]] = ("lazy", "full", "none")
"""When :meth:`SupernetStore.open`'s store checks files' digests: at first read, at open,
never."""
_DIGEST_BYTES: Final[int] = 32
_REQUIRED_KEYS: Final[tuple[str, ...]] = (
    "model_fingerprint",
    "tokens_fingerprint",
    "pruner",
    "input_mode",
    "grid",
    "spec",
    "unit_params",
    "variants",
)
_CHUNK: Final[int] = 1 << 22


class StoreError(ValueError):
    """A supernet store cannot be used: wrong model or calibration data, unknown format
    version, or a missing, truncated or corrupt file."""


def file_digest(path: str | os.PathLike) -> str:
    """Hex blake2b (256-bit) digest of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _variant_file_name(param: str) -> str:
    """File name of a parameter's variants inside a store."""
    if not param or "/" in param or os.sep in param or param.startswith("."):
        raise ValueError(f"parameter name {param!r} cannot name a store file")
    return f"{param}.safetensors"


# --------------------------------------------------------------------------- JSON forms


def _float_list(a: np.ndarray) -> list:
    """float64 array -> nested lists with ``None`` for nan (JSON has no nan)."""
    return np.where(np.isnan(a), None, a.astype(object)).tolist()


def _float_array(rows: Sequence) -> np.ndarray:
    return np.array([[np.nan if v is None else float(v) for v in row] for row in rows], np.float64)


def grid_to_json(grid: LevelGrid) -> dict[str, Any]:
    """Plain-JSON form of a level grid (``nan`` padding becomes ``null``)."""
    return {
        "sparsity": _float_list(np.asarray(grid.sparsity, np.float64)),
        "valid": np.asarray(grid.valid, bool).tolist(),
        "center": np.asarray(grid.center, np.int64).tolist(),
        "labels": None if grid.labels is None else [list(r) for r in grid.labels],
    }


def grid_from_json(d: Mapping[str, Any]) -> LevelGrid:
    """Inverse of :func:`grid_to_json`."""
    labels = d.get("labels")
    return LevelGrid(
        sparsity=_float_array(d["sparsity"]),
        valid=np.array(d["valid"], dtype=bool),
        center=np.array(d["center"], dtype=np.int32),
        labels=None if labels is None else tuple(tuple(r) for r in labels),
    )


def spec_to_json(spec: SupernetSpec) -> dict[str, Any]:
    """Plain-JSON form of a spec, with its cost tables (kept weights and kept MACs per
    token of every valid level; ``null`` at padding) for readers that do not load it."""
    kept_params = np.where(spec.valid, spec.kept_params(), np.nan)
    kept_flops = np.where(spec.valid, spec.kept_flops(), np.nan)
    return {
        "structure": spec.structure,
        "units": [
            {
                "name": u.name,
                "role": u.role,
                "block": u.block,
                "layers": list(u.layers),
                "numel": u.numel,
                "flops_per_token": u.flops_per_token,
                **(
                    {} if u.routing_frequency == 1.0 else {"routing_frequency": u.routing_frequency}
                ),
            }
            for u in spec.units
        ],
        "sparsity": _float_list(spec.sparsity),
        "valid": spec.valid.tolist(),
        "center": spec.center.astype(np.int64).tolist(),
        "level_labels": None if spec.level_labels is None else [list(r) for r in spec.level_labels],
        "kept_params": _float_list(kept_params),
        "kept_flops": _float_list(kept_flops),
    }


def make_spec(
    units: Sequence[Unit],
    sparsity: np.ndarray,
    valid: np.ndarray,
    center: np.ndarray,
    structure: str,
    level_labels: tuple[tuple[str, ...], ...] | None,
) -> SupernetSpec:
    """``SupernetSpec(...)`` from array-likes (as read from a manifest)."""
    return SupernetSpec(
        units=tuple(units),
        sparsity=np.asarray(sparsity, np.float64),
        valid=np.asarray(valid, bool),
        center=np.asarray(center, np.int32),
        structure=structure,
        level_labels=level_labels,
    )


def spec_from_json(d: Mapping[str, Any]) -> SupernetSpec:
    """Inverse of :func:`spec_to_json` (the cost tables are recomputed by the spec)."""
    labels = d.get("level_labels")
    units = tuple(
        Unit(
            name=u["name"],
            role=u["role"],
            block=int(u["block"]),
            layers=tuple(u["layers"]),
            numel=int(u["numel"]),
            flops_per_token=int(u["flops_per_token"]),
            routing_frequency=float(u.get("routing_frequency", 1.0)),
        )
        for u in d["units"]
    )
    return make_spec(
        units,
        _float_array(d["sparsity"]),
        np.array(d["valid"], dtype=bool),
        np.array(d["center"], dtype=np.int32),
        d["structure"],
        None if labels is None else tuple(tuple(r) for r in labels),
    )


# --------------------------------------------------------------------------- variant files


def resolve_storage_dtype(storage_dtype: str, param_dtype: Any) -> str:
    """The storage dtype a request means: ``"auto"`` -> the model's parameter dtype
    (``param_dtype``, e.g. ``jnp.bfloat16``), else the request itself.

    Raises:
      ValueError: a request not in :data:`STORAGE_DTYPE_CHOICES`, or ``"auto"`` for a
        model whose dtype has no storage form.
    """
    if storage_dtype not in STORAGE_DTYPE_CHOICES:
        raise ValueError(
            f"storage_dtype {storage_dtype!r} not supported; valid: {list(STORAGE_DTYPE_CHOICES)}"
        )
    if storage_dtype != "auto":
        return storage_dtype
    dtype = np.dtype(param_dtype)
    for name, stored in STORAGE_DTYPES.items():
        if dtype == stored:
            return name
    raise ValueError(
        f"storage_dtype 'auto' cannot store the model's {dtype} weights; ask for one of "
        f"{list(STORAGE_DTYPES)}"
    )


def _check_choice(what: str, value: Any, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"{what} {value!r} not supported; valid: {list(valid)}")


def variants_to_tensors(
    variants: Variants, storage_dtype: str = "float32", layout: str = "dense"
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Host tensors and string metadata of one parameter's variants (see module docstring).

    Args:
      variants: one parameter's variants.
      storage_dtype: ``"float32"`` or ``"bfloat16"``: dtype of dense variant weights.
      layout: ``"dense"``, ``"packed"``, or ``"auto"`` (packed where it takes fewer bytes
        than dense) for dense variants; nested variants have one layout.
    """
    _check_choice("storage_dtype", storage_dtype, list(STORAGE_DTYPES))
    _check_choice("layout", layout, LAYOUTS)
    sparsity = np.asarray(variants.sparsity, np.float64)
    if isinstance(variants, NestedVariants):
        tensors = {
            "rank": np.asarray(variants.rank, np.int32),
            "prune_counts": np.asarray(variants.prune_counts, np.int32),
            "sparsity": sparsity,
        }
        return tensors, {"kind": "nested", "per_row": str(bool(variants.per_row)).lower()}
    if isinstance(variants, DenseVariants):
        dtype = STORAGE_DTYPES[storage_dtype]
        weights = np.asarray(variants.weights).astype(dtype, copy=False)
        if layout == "auto":
            nnz = int(packed.kept_counts(weights).sum())
            smaller = packed.packed_nbytes(weights.shape, nnz, dtype.itemsize) < (
                packed.dense_nbytes(weights.shape, dtype.itemsize)
            )
            layout = "packed" if smaller else "dense"
        if layout == "packed":
            tensors = {**packed.pack(weights), "sparsity": sparsity}
        else:
            tensors = {"weights": weights, "sparsity": sparsity}
        if variants.group_keep is not None:
            tensors["group_keep"] = np.asarray(variants.group_keep, bool)
        return tensors, {"kind": "dense", "layout": layout, "storage_dtype": storage_dtype}
    raise TypeError(f"variants must be NestedVariants or DenseVariants, got {type(variants)}")


def _level_parts(tensors: Mapping[str, np.ndarray], k: int) -> list[np.ndarray]:
    """The arrays holding level ``k`` of a dense-kind file, in either layout (views of the
    memory map when ``tensors`` are): ``weights[k]``, or ``mask[k]`` and level ``k``'s
    slice of ``values``."""
    if "weights" in tensors:
        return [tensors["weights"][k]]
    offsets = np.asarray(tensors["offsets"])
    return [tensors["mask"][k], tensors["values"][int(offsets[k]) : int(offsets[k + 1])]]


def _parts_digest(parts: Sequence[np.ndarray]) -> str:
    """Hex blake2b of the bytes of ``parts`` in order (read in place, no copy)."""
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    for a in parts:
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def _small_parts(tensors: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The tensors of a dense-kind file that are not per-level weights (sparsity, group
    masks, the packed shape and offsets), in name order."""
    big = {"weights", "mask", "values"}
    return [tensors[n] for n in sorted(tensors) if n not in big]


def _dense_levels(
    tensors: Mapping[str, np.ndarray], levels: Sequence[int], out: np.ndarray | None = None
) -> np.ndarray:
    """[len(levels), out, in] host weights of some levels of a dense-kind file's tensors,
    in either layout, in the storage dtype; reads only those levels' bytes (into ``out``
    when given)."""
    if "weights" not in tensors:
        return packed.unpack_levels(tensors, levels, out)
    w = tensors["weights"]
    if out is None:
        return np.stack([np.asarray(w[k]) for k in levels]) if len(levels) else w[:0].copy()
    for i, k in enumerate(levels):
        out[i] = w[k]
    return out


def variants_from_tensors(
    tensors: Mapping[str, np.ndarray], kind: str, per_row: bool, *, host: bool = False
) -> Variants:
    """Rebuild variants from a file's tensors (device arrays; dense weights in the
    storage dtype, unpacked from the packed layout when the file is packed). ``host``:
    keep the host arrays instead (the memory-mapped file's, or the unpacked copy)."""
    put = np.asarray if host else jnp.asarray
    if kind == "nested":
        return NestedVariants(
            rank=put(tensors["rank"]),
            per_row=per_row,
            prune_counts=np.array(tensors["prune_counts"], np.int32),
            sparsity=np.array(tensors["sparsity"], np.float64),
        )
    if kind == "dense":
        keep = tensors.get("group_keep")
        sparsity = np.array(tensors["sparsity"], np.float64)
        if "weights" in tensors:
            weights = np.asarray(tensors["weights"])
        else:
            weights = packed.unpack_levels(tensors, range(len(sparsity)))
        return DenseVariants(
            weights=put(weights),
            sparsity=sparsity,
            group_keep=None if keep is None else np.array(keep, bool),
        )
    raise ValueError(f"unknown variant kind {kind!r}; valid: 'nested', 'dense'")
