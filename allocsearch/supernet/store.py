"""The on-disk supernet: a directory holding every (unit, level) variant and its manifest.

Layout of a store directory (format version 2)::

    manifest.json                       format version, fingerprints, pruner, grid, spec,
                                        parameter -> file table (kind, layout, dtype,
                                        shape, size, blake2b checksum)
    <parameter name>.safetensors        one file per pruned parameter (a layer's weight)
    input_norms.safetensors             ||X_j||_2 of every layer's calibration input

A parameter file holds either

* ``kind = "nested"`` (magnitude, Wanda, their N:M variants, and the dead q/k/v or gate/up
  rows of structured units): ``rank`` int32[out, in], ``prune_counts`` int32[K] or
  int32[K, out], ``sparsity`` float64[K] -- one rank array for all K levels, not K weight
  copies (the dense weight itself comes from the model); or
* ``kind = "dense"`` (SparseGPT, structured output projections), in the store's storage
  dtype (float32 or bfloat16, by default the model's), with ``sparsity`` float64[K] and,
  for structured pruners, ``group_keep`` bool[K, G], in one of two layouts:

  - ``layout = "dense"``: ``weights`` [K, out, in];
  - ``layout = "packed"``: per level a bitmask of the non-zero entries and the kept
    values (:mod:`allocsearch.supernet.packed`), written where it is smaller than the
    dense layout (below about 97% density in float32, 94% in bfloat16).

  Either way :meth:`SupernetStore.variants` gives ``weights`` [K, out, in] and
  :meth:`SupernetStore.read_levels` chosen levels, in the storage dtype (never upcast).

``K`` is the number of *valid* levels of the parameter's unit (``spec.num_levels[u]``);
padding levels of the spec are not stored.

A store is assembled by :class:`StoreWriter` under a temporary sibling directory (a name
starting with ``.`` and ending in ``.tmp``) and renamed into place only after the manifest
is written, so an interrupted build never leaves a directory that opens as a store.
:meth:`SupernetStore.open` refuses stores built for another model or other calibration
data, unreadable format versions, and missing or truncated files; it reads only the
manifest and the files' sizes, so it takes milliseconds whatever the store's size. Each
file's blake2b digest (in the manifest) is checked the first time the file is read in the
process (``verify="lazy"``), so a corrupt file raises :class:`StoreError` before its
weights are used; ``verify="full"`` checks every file at open.

Version 1 stores (dense variants always in the dense layout, no layout or dtype in the
manifest) are read as they are.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from allocsearch.atomic import commit_directory, temporary_sibling_dir
from allocsearch.models.safetensors_io import (
    SafetensorsError,
    read_header,
    read_safetensors,
    write_safetensors,
)
from allocsearch.pruners.base import DenseVariants, NestedVariants, Variants
from allocsearch.supernet import packed
from allocsearch.supernet.levels import LevelGrid
from allocsearch.supernet.spec import SupernetSpec, Unit

__all__ = [
    "FORMAT_VERSION",
    "LAYOUTS",
    "MANIFEST_NAME",
    "READABLE_VERSIONS",
    "STORAGE_DTYPES",
    "STORAGE_DTYPE_CHOICES",
    "VERIFY_MODES",
    "StoreError",
    "StoreWriter",
    "SupernetStore",
    "file_digest",
    "grid_from_json",
    "grid_to_json",
    "make_spec",
    "resolve_storage_dtype",
    "spec_from_json",
    "spec_to_json",
    "variants_from_tensors",
    "variants_to_tensors",
]

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


# --------------------------------------------------------------------------- writer


class StoreWriter:
    """Assembles a store directory under a temporary name; :meth:`commit` renames it.

    Use as a context manager: leaving the block by an exception (or an interrupt) removes
    the temporary directory, so nothing that looks like a store is left behind.

    Args:
      path: the final store directory.
      overwrite: replace an existing ``path`` at commit time; otherwise an existing path
        is refused here, before any work.
      storage_dtype: ``"float32"`` or ``"bfloat16"`` for dense variant weights (see
        :func:`resolve_storage_dtype` for ``"auto"``, which needs the model).
      layout: dense variant files' layout: ``"auto"`` (packed where it is smaller, per
        file), ``"dense"`` or ``"packed"``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        overwrite: bool = False,
        storage_dtype: str = "float32",
        layout: str = "auto",
    ):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(
                f"{self.path} exists; pass overwrite=True to replace it with a new store"
            )
        _check_choice("storage_dtype", storage_dtype, list(STORAGE_DTYPES))
        _check_choice("layout", layout, LAYOUTS)
        self.overwrite = overwrite
        self.storage_dtype = storage_dtype
        self.layout = layout
        self._tmp: Path | None = temporary_sibling_dir(self.path)
        self._files: dict[str, dict[str, Any]] = {}
        self._norms: dict[str, Any] | None = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._tmp is not None:  # not committed: an error or an interrupt
            self.abort()

    @property
    def temporary_path(self) -> Path:
        if self._tmp is None:
            raise RuntimeError("the store writer was already committed or aborted")
        return self._tmp

    def add(self, param: str, variants: Variants) -> int:
        """Write one parameter's variants (once per parameter); returns the file's size in
        bytes."""
        if param in self._files:
            raise ValueError(f"variants of {param!r} were already written to this store")
        tensors, meta = variants_to_tensors(variants, self.storage_dtype, self.layout)
        name = _variant_file_name(param)
        target = self.temporary_path / name
        write_safetensors(target, tensors, {"param": param, **meta})
        size = target.stat().st_size
        shape = tensors["rank"].shape if meta["kind"] == "nested" else variants.weights.shape[1:]
        entry = {
            "file": name,
            "kind": meta["kind"],
            "per_row": meta.get("per_row") == "true",
            "num_levels": int(len(variants.sparsity)),
            "shape": [int(x) for x in shape],
            "bytes": int(size),
            "blake2b": file_digest(target),
        }
        if meta["kind"] == "dense":
            entry.update(layout=meta["layout"], dtype=meta["storage_dtype"])
            # per-level digests: a streaming read checks exactly the levels it reads
            written = read_safetensors(target, mmap=True)
            entry["level_blake2b"] = [
                _parts_digest(_level_parts(written, k)) for k in range(entry["num_levels"])
            ]
            entry["small_blake2b"] = _parts_digest(_small_parts(written))
            del written
        self._files[param] = entry
        return size

    def add_input_norms(self, norms: Mapping[str, np.ndarray]) -> None:
        """Write ``||X_j||_2`` of every layer's calibration input (layer name -> float32[in]),
        the statistic OWL and Wanda-style allocators need; call once, before commit."""
        if INPUT_NORMS_FILE in {e["file"] for e in self._files.values()} or self._norms:
            raise ValueError("input norms were already written to this store")
        target = self.temporary_path / INPUT_NORMS_FILE
        tensors = {name: np.asarray(v, np.float32) for name, v in norms.items()}
        write_safetensors(target, tensors, {"kind": "input_norms"})
        self._norms = {
            "file": INPUT_NORMS_FILE,
            "bytes": int(target.stat().st_size),
            "blake2b": file_digest(target),
        }

    def commit(
        self,
        *,
        spec: SupernetSpec,
        unit_params: Sequence[Sequence[str]],
        grid: LevelGrid,
        model_fingerprint: str,
        tokens_fingerprint: str,
        pruner: Mapping[str, Any],
        input_mode: str,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write ``manifest.json`` and rename the directory into place.

        Args:
          spec: the units x levels table (exact sparsities of the written variants).
          unit_params: per unit, the parameters it changes; each must have been added,
            with the unit's number of valid levels.
          grid: the requested level grid.
          model_fingerprint, tokens_fingerprint: what the store is keyed by.
          pruner: ``{"name", "nested", "params", ...}`` provenance of the pruner.
          input_mode: how the calibration inputs were advanced between blocks.
          extra: further JSON-able provenance (model, calibration, build timings).

        Returns:
          The final store path.

        Raises:
          ValueError: ``unit_params`` does not match the spec or the added files.
          FileExistsError: the target appeared meanwhile and ``overwrite`` is False.
        """
        tmp = self.temporary_path
        unit_params = [list(p) for p in unit_params]
        if len(unit_params) != spec.num_units:
            raise ValueError(f"unit_params has {len(unit_params)} units, spec has {spec.num_units}")
        named = [p for params in unit_params for p in params]
        if sorted(named) != sorted(self._files):
            raise ValueError(
                f"unit_params names {sorted(set(named) ^ set(self._files))[:4]} that were not "
                f"added, or added parameters no unit names"
            )
        for u, params in enumerate(unit_params):
            for p in params:
                if self._files[p]["num_levels"] != spec.num_levels[u]:
                    raise ValueError(
                        f"{p} has {self._files[p]['num_levels']} levels but its unit "
                        f"{spec.units[u].name} has {spec.num_levels[u]}"
                    )
        body = {
            **dict(extra or {}),
            "format_version": FORMAT_VERSION,
            "model_fingerprint": model_fingerprint,
            "tokens_fingerprint": tokens_fingerprint,
            "pruner": dict(pruner),
            "input_mode": input_mode,
            "grid": grid_to_json(grid),
            "spec": spec_to_json(spec),
            "unit_params": unit_params,
            "variants": self._files,
        }
        if self._norms is not None:
            body["input_norms"] = self._norms
        text = json.dumps(body, indent=1, sort_keys=True, allow_nan=False) + "\n"
        with open(tmp / MANIFEST_NAME, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if self.path.exists() and not self.overwrite:
            raise FileExistsError(f"{self.path} appeared during the build; not replacing it")
        commit_directory(tmp, self.path, overwrite=self.overwrite)  # mode 0777 & ~umask
        self._tmp = None
        return self.path

    def abort(self) -> None:
        """Remove the temporary directory (idempotent)."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


# --------------------------------------------------------------------------- reader


class _HostVariants(Mapping):
    """:meth:`SupernetStore.host_variants`: parameter name -> its host variants, read at
    each lookup."""

    def __init__(self, store: SupernetStore):
        self._store = store
        self._names = frozenset(store.param_names)

    def __getitem__(self, name: str) -> Variants:
        if name not in self._names:
            raise KeyError(name)
        return self._store.variants(name, host=True)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self):
        return iter(self._store.param_names)

    def __len__(self) -> int:
        return len(self._names)


class SupernetStore:
    """A supernet store opened for reading (use :meth:`open`).

    Variant files are memory-mapped when read; nothing is loaded until
    :meth:`variants`, :meth:`read_levels` or :meth:`all_variants` is called. Reads may come
    from several threads (the first read of a file checks its digest once, under a lock).

    Attributes:
      path: the store directory.
      verify: ``"lazy"``, ``"full"`` or ``"none"`` (see :meth:`open`).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], verify: str = "lazy"):
        self.path = path
        self.verify = verify
        self._manifest = manifest
        self._spec = spec_from_json(manifest["spec"])
        self._unit_params = tuple(tuple(p) for p in manifest["unit_params"])
        self._init_checks()

    def _init_checks(self) -> None:
        """Per-process record of the files whose digest was checked, and their locks."""
        self._verified: set[str] = set()
        self._verified_levels: set[tuple[str, int]] = set()
        self._locks = {e["file"]: threading.Lock() for e in self._files().values()}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_verified"], state["_verified_levels"], state["_locks"]  # per process
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_checks()

    def _files(self) -> dict[str, dict[str, Any]]:
        """What the manifest lists: parameter (or ``"input norms"``) -> file entry."""
        files = dict(self._manifest["variants"])
        if "input_norms" in self._manifest:
            files["input norms"] = self._manifest["input_norms"]
        return files

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        model_fingerprint: str | None = None,
        tokens_fingerprint: str | None = None,
        verify: str | bool = "lazy",
    ) -> SupernetStore:
        """Open a store, checking that it is complete and fits the given model and data.

        Opening reads the manifest and the files' sizes only (milliseconds, whatever the
        store's size); the digests are checked as ``verify`` says.

        Args:
          path: the store directory.
          model_fingerprint: ``HFModel.fingerprint`` of the model it will be used with;
            None skips the check.
          tokens_fingerprint: ``TokenSet.fingerprint`` of the calibration data it must
            have been built from; None skips the check.
          verify: ``"lazy"`` (default): each file's blake2b digest is checked the first
            time this process reads the file (once, remembered), before its weights are
            returned; ``"full"``: every file's digest now (reads the whole store);
            ``"none"``: never (only existence and sizes). ``True`` / ``False`` mean
            ``"full"`` / ``"none"``.

        Raises:
          StoreError: no manifest (not a store, or an interrupted build), a format version
            this allocsearch does not read, fingerprint mismatch (both fingerprints named),
            a missing or truncated file, or (``"full"``) a checksum mismatch (the file
            named). With ``"lazy"`` a checksum mismatch is raised by the first read of
            the file.
          ValueError: an unknown ``verify``.
        """
        if isinstance(verify, bool):
            verify = "full" if verify else "none"
        _check_choice("verify", verify, VERIFY_MODES)
        path = Path(path)
        mpath = path / MANIFEST_NAME
        if not path.exists():
            raise StoreError(
                f"{path} is not a supernet store: it does not exist (a build that was "
                f"interrupted leaves no store; build it with `allocsearch build`)"
            )
        if not path.is_dir():
            raise StoreError(
                f"{os.fspath(path)!r} is a file, expected a supernet store directory (from "
                f"`allocsearch build`)"
            )
        if not mpath.is_file():
            raise StoreError(
                f"{path} is not a supernet store: {MANIFEST_NAME} is missing (a build that "
                f"was interrupted leaves no store; rebuild it)"
            )
        try:
            manifest = json.loads(mpath.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreError(f"{mpath}: manifest is not valid JSON ({e})") from None
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise StoreError(
                f"{path}: unknown store format version {version!r}; this allocsearch reads "
                f"versions {', '.join(map(str, READABLE_VERSIONS))} (and writes "
                f"{FORMAT_VERSION}); rebuild the supernet"
            )
        missing = [k for k in _REQUIRED_KEYS if k not in manifest]
        if missing:
            raise StoreError(f"{mpath}: manifest lacks {missing}; the store is damaged")
        for what, given, key in (
            ("model", model_fingerprint, "model_fingerprint"),
            ("calibration token set", tokens_fingerprint, "tokens_fingerprint"),
        ):
            if given is not None and manifest[key] != given:
                built_from = manifest.get("model", {}).get("path") if what == "model" else None
                hint = (
                    f"pass the model it was built from ({built_from}) or rebuild the "
                    f"supernet for this model"
                    if built_from
                    else f"use the {what} it was built from, or rebuild the supernet for this "
                    f"{what}"
                )
                raise StoreError(
                    f"{path} was built for a different {what} (its {key} is "
                    f"{manifest[key]!r}, the one given has {given!r}): {hint}"
                )
        store = cls(path, manifest, verify)
        for param, entry in store._files().items():
            fpath = path / entry["file"]
            if not fpath.is_file():
                raise StoreError(f"{path}: variant file {entry['file']!r} of {param} is missing")
            size = fpath.stat().st_size
            if size != entry["bytes"]:
                raise StoreError(
                    f"{path}: variant file {entry['file']!r} has {size} bytes, the manifest "
                    f"records {entry['bytes']} (truncated or replaced)"
                )
        if verify == "full":
            for entry in store._files().values():
                store._check_digest(entry)
        return store

    def _check_digest(self, entry: Mapping[str, Any]) -> None:
        """Check a file's blake2b digest against the manifest, once per process."""
        name = entry["file"]
        if self.verify == "none" or name in self._verified:
            return
        with self._locks[name]:
            if name in self._verified:  # another thread checked it meanwhile
                return
            fpath = self.path / name
            try:
                digest = file_digest(fpath)
            except OSError as e:
                raise StoreError(f"{self.path}: cannot read {name!r} ({e})") from e
            if digest != entry["blake2b"]:
                raise StoreError(
                    f"{self.path}: checksum mismatch in {name!r}: the file is corrupt "
                    f"(blake2b differs from the manifest); rebuild the supernet"
                )
            self._verified.add(name)

    def _check_levels(
        self, entry: Mapping[str, Any], tensors: Mapping[str, np.ndarray], levels: Sequence[int]
    ) -> None:
        """Check the digests of some levels of a dense-kind file (and of its small tensors)
        against the manifest, once per (file, level) and process: a streaming read hashes
        only the bytes it reads. Files without level digests (format 1) are checked whole."""
        name = entry["file"]
        if self.verify == "none" or name in self._verified:
            return
        if "level_blake2b" not in entry:
            self._check_digest(entry)
            return
        todo = [k for k in dict.fromkeys(levels) if (name, k) not in self._verified_levels]
        if not todo:
            return
        with self._locks[name]:
            checks = (
                [(-1, entry["small_blake2b"], _small_parts(tensors))]
                if (
                    name,
                    -1,
                )
                not in self._verified_levels
                else []
            )
            checks += [
                (k, entry["level_blake2b"][k], _level_parts(tensors, k))
                for k in todo
                if (name, k) not in self._verified_levels
            ]
            for k, want, parts in checks:
                try:
                    got = _parts_digest(parts)
                except (OSError, KeyError, ValueError) as e:
                    raise StoreError(f"{self.path}: cannot read {name!r} ({e})") from e
                if got != want:
                    what = "its small tensors" if k < 0 else f"level {k}"
                    raise StoreError(
                        f"{self.path}: checksum mismatch in {name!r} ({what}): the file is "
                        f"corrupt (blake2b differs from the manifest); rebuild the supernet"
                    )
                self._verified_levels.add((name, k))

    # ----- what the evaluator and searchers read -------------------------------------
    @property
    def spec(self) -> SupernetSpec:
        """Units x levels with the exact sparsities the stored variants hold."""
        return self._spec

    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the parsed ``manifest.json``."""
        return copy.deepcopy(self._manifest)

    @property
    def unit_params(self) -> tuple[tuple[str, ...], ...]:
        """Per unit (spec order), the parameter names whose variants the unit's level
        selects: level ``k`` of unit ``u`` is level ``k`` of each of these parameters."""
        return self._unit_params

    @property
    def param_names(self) -> tuple[str, ...]:
        """Every parameter with stored variants, in unit order."""
        return tuple(p for params in self._unit_params for p in params)

    @property
    def grid(self) -> LevelGrid:
        """The level grid the supernet was asked to build (requested sparsities)."""
        return grid_from_json(self._manifest["grid"])

    @property
    def model_fingerprint(self) -> str:
        return str(self._manifest["model_fingerprint"])

    @property
    def tokens_fingerprint(self) -> str:
        return str(self._manifest["tokens_fingerprint"])

    @property
    def num_bytes(self) -> int:
        """Bytes of all variant files plus the manifest."""
        files = sum(int(e["bytes"]) for e in self._manifest["variants"].values())
        return files + (self.path / MANIFEST_NAME).stat().st_size

    @property
    def storage_dtype(self) -> str | None:
        """``"float32"`` or ``"bfloat16"``: the dtype of the dense variants' weights (what
        :meth:`variants` and :meth:`read_levels` return); None without dense variants."""
        for entry in self._manifest["variants"].values():
            if entry["kind"] != "dense":
                continue
            if "dtype" in entry:
                return str(entry["dtype"])
            # version 1: the dtype is only in the file's header
            try:
                header, _ = read_header(self.path / entry["file"])
                dtype = header["weights"]["dtype"]
            except (OSError, SafetensorsError, KeyError) as e:
                raise StoreError(f"{self.path}: cannot read {entry['file']!r} ({e})") from e
            names = {"F32": "float32", "BF16": "bfloat16"}
            if dtype not in names:
                raise StoreError(f"{self.path}: {entry['file']!r} holds {dtype} weights")
            return names[dtype]
        return None

    def variants(self, param_name: str, *, host: bool = False) -> Variants:
        """The variants of one parameter (e.g. ``model.layers.0.mlp.up_proj.weight``).

        Returns:
          ``NestedVariants`` (rank int32[out, in] on device) or ``DenseVariants`` (weights
          [K, out, in] on device, in the storage dtype: float32 or bfloat16, never
          upcast) with ``K = spec.num_levels[unit]``. ``host``: host arrays instead, the
          memory-mapped file's (packed files: unpacked into a new host array); nothing is
          put on a device.

        Raises:
          KeyError: unknown parameter (the message lists a few valid names).
          StoreError: the file is corrupt (first read, ``verify="lazy"``), truncated or
            unreadable.
        """
        entry = self._entry(param_name)
        fpath = self.path / entry["file"]
        tensors = self._tensors(param_name, entry)
        try:
            result = variants_from_tensors(
                tensors, entry["kind"], bool(entry["per_row"]), host=host
            )
        except (KeyError, ValueError) as e:
            raise StoreError(f"{fpath}: cannot read variants of {param_name} ({e})") from e
        if result.num_levels != entry["num_levels"]:
            raise StoreError(
                f"{fpath}: holds {result.num_levels} levels, the manifest records "
                f"{entry['num_levels']}"
            )
        return result

    def read_levels(
        self,
        param_name: str,
        levels: Sequence[int],
        dense: np.ndarray | None = None,
        *,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Host weights of some levels of one parameter, read from the memory-mapped file.

        This is what the block-streaming evaluator reads: only the levels a query uses,
        never the whole stack (in the packed layout, only those levels' bytes), and
        nothing is put on a device. Safe to call from several threads.

        Args:
          param_name: e.g. ``model.layers.0.mlp.up_proj.weight``.
          levels: level indices (each in ``0..num_levels-1``; repeats allowed).
          dense: the dense weight [out, in] (host array); required for nested variants,
            whose kept weights are the dense ones.
          out: write the result into this C-contiguous host array of the result's shape
            and dtype instead of a new one (e.g. the first slots of a padded stack).

        Returns:
          [len(levels), out, in]: dense variants in their storage dtype; nested variants
          in ``dense``'s dtype (pruned weights exactly zero).

        Raises:
          KeyError: unknown parameter. ValueError: a level out of range, or ``dense``
          missing for nested variants. StoreError: the file is corrupt (first read,
          ``verify="lazy"``) or unreadable.
        """
        entry = self._entry(param_name)
        levels = [int(k) for k in levels]
        bad = [k for k in levels if not 0 <= k < entry["num_levels"]]
        if bad:
            raise ValueError(
                f"level {bad[0]} of {param_name} is out of range; valid: "
                f"0..{entry['num_levels'] - 1}"
            )
        if entry["kind"] != "dense" and dense is None:
            raise ValueError(f"{param_name} holds nested variants: pass its dense weight")
        if entry["kind"] == "dense":
            tensors = self._mapped(param_name, entry)
            try:
                self._check_levels(entry, tensors, levels)
                return _dense_levels(tensors, levels, out)
            except (KeyError, ValueError) as e:
                raise StoreError(
                    f"{self.path / entry['file']}: cannot read variants of {param_name} ({e})"
                ) from e
        tensors = self._tensors(param_name, entry)
        dense = np.asarray(dense)
        rank = np.asarray(tensors["rank"])
        counts = np.asarray(tensors["prune_counts"])
        if out is None:
            out = np.empty((len(levels), *rank.shape), dense.dtype)
        for i, k in enumerate(levels):
            c = counts[k]
            keep = rank >= (c[:, None] if c.ndim == 1 else c)
            np.copyto(out[i], np.where(keep, dense, np.zeros((), dense.dtype)))
        return out

    def _entry(self, param_name: str) -> dict[str, Any]:
        entries = self._manifest["variants"]
        if param_name not in entries:
            raise KeyError(
                f"no variants for {param_name!r} in {self.path}; the store has "
                f"{len(entries)} parameters, e.g. {list(entries)[:3]}"
            )
        return entries[param_name]

    def _tensors(self, what: str, entry: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Memory-mapped tensors of a file, its digest checked first (once)."""
        self._check_digest(entry)
        return self._mapped(what, entry)

    def _mapped(self, what: str, entry: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Memory-mapped tensors of a file (no digest check)."""
        fpath = self.path / entry["file"]
        try:
            return read_safetensors(fpath, mmap=True)
        except (OSError, SafetensorsError, KeyError) as e:
            raise StoreError(f"{fpath}: cannot read variants of {what} ({e})") from e

    def input_norms(self) -> dict[str, np.ndarray]:
        """Layer name -> float32[in], ``||X_j||_2`` of the layer's calibration input (the
        inputs the builder pruned it from); empty for stores built without them."""
        entry = self._manifest.get("input_norms")
        if entry is None:
            return {}
        self._check_digest(entry)
        fpath = self.path / entry["file"]
        try:
            return {k: np.asarray(v) for k, v in read_safetensors(fpath, mmap=True).items()}
        except (OSError, SafetensorsError) as e:
            raise StoreError(f"{fpath}: cannot read input norms ({e})") from e

    def all_variants(self) -> dict[str, Variants]:
        """Every parameter's variants, keyed by parameter name, on the device."""
        return {p: self.variants(p) for p in self.param_names}

    def host_variants(self) -> Mapping[str, Variants]:
        """Every parameter's variants as a read-only mapping that reads one parameter's
        host (memory-mapped) variants per lookup and keeps nothing: the resident
        evaluator's input, which stacks each parameter role on the device and holds no
        other copy of the variants."""
        return _HostVariants(self)

    def __repr__(self) -> str:
        s = self._spec
        return (
            f"SupernetStore({str(self.path)!r}, units={s.num_units}, "
            f"levels<={s.sparsity.shape[1]}, structure={s.structure!r}, "
            f"pruner={self._manifest['pruner']['name']!r}, "
            f"input_mode={self._manifest['input_mode']!r})"
        )
