"""The on-disk supernet: a directory holding every (unit, level) variant and its manifest.

Layout of a store directory::

    manifest.json                       format version, fingerprints, pruner, grid, spec,
                                        parameter -> file table with blake2b checksums
    <parameter name>.safetensors        one file per pruned parameter (a layer's weight)

A parameter file holds either

* ``kind = "nested"`` (magnitude, Wanda, their N:M variants, and the dead q/k/v or gate/up
  rows of structured units): ``rank`` int32[out, in], ``prune_counts`` int32[K] or
  int32[K, out], ``sparsity`` float64[K] -- one rank array for all K levels, not K weight
  copies (the dense weight itself comes from the model); or
* ``kind = "dense"`` (SparseGPT, structured output projections): ``weights``
  float32[K, out, in] (or bfloat16 storage, read back as float32), ``sparsity``
  float64[K] and, for structured pruners, ``group_keep`` bool[K, G].

``K`` is the number of *valid* levels of the parameter's unit (``spec.num_levels[u]``);
padding levels of the spec are not stored.

A store is assembled by :class:`StoreWriter` under a temporary sibling directory (a name
starting with ``.`` and ending in ``.tmp``) and renamed into place only after the manifest
is written, so an interrupted build never leaves a directory that opens as a store.
:meth:`SupernetStore.open` refuses stores built for another model or other calibration
data, unknown format versions, and missing, truncated or corrupt files (every file's
blake2b digest is in the manifest).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from allocsearch.models.safetensors_io import SafetensorsError, read_safetensors, write_safetensors
from allocsearch.pruners.base import DenseVariants, NestedVariants, Variants
from allocsearch.supernet.levels import LevelGrid
from allocsearch.supernet.spec import SupernetSpec, Unit

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "STORAGE_DTYPES",
    "StoreError",
    "StoreWriter",
    "SupernetStore",
    "file_digest",
    "grid_from_json",
    "grid_to_json",
    "make_spec",
    "spec_from_json",
    "spec_to_json",
    "variants_from_tensors",
    "variants_to_tensors",
]

FORMAT_VERSION: Final[int] = 1
"""Version of the store layout written by this module; other versions are refused."""
MANIFEST_NAME: Final[str] = "manifest.json"
INPUT_NORMS_FILE: Final[str] = "input_norms.safetensors"
STORAGE_DTYPES: Final[dict[str, np.dtype]] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
"""On-disk dtypes of dense variant weights; they are always read back as float32."""
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


def variants_to_tensors(
    variants: Variants, storage_dtype: str = "float32"
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Host tensors and string metadata of one parameter's variants (see module docstring)."""
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(
            f"storage_dtype {storage_dtype!r} not supported; valid: {list(STORAGE_DTYPES)}"
        )
    sparsity = np.asarray(variants.sparsity, np.float64)
    if isinstance(variants, NestedVariants):
        tensors = {
            "rank": np.asarray(variants.rank, np.int32),
            "prune_counts": np.asarray(variants.prune_counts, np.int32),
            "sparsity": sparsity,
        }
        return tensors, {"kind": "nested", "per_row": str(bool(variants.per_row)).lower()}
    if isinstance(variants, DenseVariants):
        weights = np.asarray(variants.weights, np.float32).astype(STORAGE_DTYPES[storage_dtype])
        tensors = {"weights": weights, "sparsity": sparsity}
        if variants.group_keep is not None:
            tensors["group_keep"] = np.asarray(variants.group_keep, bool)
        return tensors, {"kind": "dense", "storage_dtype": storage_dtype}
    raise TypeError(f"variants must be NestedVariants or DenseVariants, got {type(variants)}")


def variants_from_tensors(tensors: Mapping[str, np.ndarray], kind: str, per_row: bool) -> Variants:
    """Rebuild variants from a file's tensors (device arrays; dense weights as float32)."""
    if kind == "nested":
        return NestedVariants(
            rank=jnp.asarray(tensors["rank"]),
            per_row=per_row,
            prune_counts=np.array(tensors["prune_counts"], np.int32),
            sparsity=np.array(tensors["sparsity"], np.float64),
        )
    if kind == "dense":
        keep = tensors.get("group_keep")
        return DenseVariants(
            weights=jnp.asarray(np.asarray(tensors["weights"]), dtype=jnp.float32),
            sparsity=np.array(tensors["sparsity"], np.float64),
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
      storage_dtype: ``"float32"`` or ``"bfloat16"`` for dense variant weights.
    """

    def __init__(
        self, path: str | os.PathLike, *, overwrite: bool = False, storage_dtype: str = "float32"
    ):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(
                f"{self.path} exists; pass overwrite=True to replace it with a new store"
            )
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"storage_dtype {storage_dtype!r} not supported; valid: {list(STORAGE_DTYPES)}"
            )
        self.overwrite = overwrite
        self.storage_dtype = storage_dtype
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp: Path | None = Path(
            tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        )
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
        tensors, meta = variants_to_tensors(variants, self.storage_dtype)
        name = _variant_file_name(param)
        target = self.temporary_path / name
        write_safetensors(target, tensors, {"param": param, **meta})
        size = target.stat().st_size
        self._files[param] = {
            "file": name,
            "kind": meta["kind"],
            "per_row": meta.get("per_row") == "true",
            "num_levels": int(len(variants.sparsity)),
            "bytes": int(size),
            "blake2b": file_digest(target),
        }
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
        if self.path.exists():
            if not self.overwrite:
                raise FileExistsError(f"{self.path} appeared during the build; not replacing it")
            backup = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}."))
            os.replace(self.path, backup / "old")
            try:
                os.replace(tmp, self.path)
            except BaseException:
                os.replace(backup / "old", self.path)  # a failed commit keeps the old store
                os.rmdir(backup)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, self.path)
        self._tmp = None
        return self.path

    def abort(self) -> None:
        """Remove the temporary directory (idempotent)."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


# --------------------------------------------------------------------------- reader


class SupernetStore:
    """A supernet store opened for reading (use :meth:`open`).

    Variant files are memory-mapped when read; nothing is loaded until
    :meth:`variants` or :meth:`all_variants` is called, and each call returns fresh device
    arrays (callers keep what they need).

    Attributes:
      path: the store directory.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self._manifest = manifest
        self._spec = spec_from_json(manifest["spec"])
        self._unit_params = tuple(tuple(p) for p in manifest["unit_params"])

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        model_fingerprint: str | None = None,
        tokens_fingerprint: str | None = None,
        verify: bool = True,
    ) -> SupernetStore:
        """Open a store, checking that it is complete and fits the given model and data.

        Args:
          path: the store directory.
          model_fingerprint: ``HFModel.fingerprint`` of the model it will be used with;
            None skips the check.
          tokens_fingerprint: ``TokenSet.fingerprint`` of the calibration data it must
            have been built from; None skips the check.
          verify: recompute every file's blake2b digest (reads the whole store once);
            without it only existence and sizes are checked.

        Raises:
          StoreError: no manifest (not a store, or an interrupted build), unknown format
            version, fingerprint mismatch (both fingerprints named), a missing or
            truncated file, or a checksum mismatch (the file named).
        """
        path = Path(path)
        mpath = path / MANIFEST_NAME
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
        if version != FORMAT_VERSION:
            raise StoreError(
                f"{path}: unknown store format version {version!r}; this allocsearch reads "
                f"version {FORMAT_VERSION}; rebuild the supernet"
            )
        missing = [k for k in _REQUIRED_KEYS if k not in manifest]
        if missing:
            raise StoreError(f"{mpath}: manifest lacks {missing}; the store is damaged")
        for what, given, key in (
            ("model", model_fingerprint, "model_fingerprint"),
            ("calibration token set", tokens_fingerprint, "tokens_fingerprint"),
        ):
            if given is not None and manifest[key] != given:
                raise StoreError(
                    f"{path} was built for a different {what}: the store's {key} is "
                    f"{manifest[key]!r} but the one given is {given!r}; rebuild the supernet "
                    f"for this {what}"
                )
        files = dict(manifest["variants"])
        if "input_norms" in manifest:
            files["input norms"] = manifest["input_norms"]
        for param, entry in files.items():
            fpath = path / entry["file"]
            if not fpath.is_file():
                raise StoreError(f"{path}: variant file {entry['file']!r} of {param} is missing")
            size = fpath.stat().st_size
            if size != entry["bytes"]:
                raise StoreError(
                    f"{path}: variant file {entry['file']!r} has {size} bytes, the manifest "
                    f"records {entry['bytes']} (truncated or replaced)"
                )
            if verify and file_digest(fpath) != entry["blake2b"]:
                raise StoreError(
                    f"{path}: checksum mismatch in {entry['file']!r}: the file is corrupt "
                    f"(blake2b differs from the manifest); rebuild the supernet"
                )
        return cls(path, manifest)

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

    def variants(self, param_name: str) -> Variants:
        """The variants of one parameter (e.g. ``model.layers.0.mlp.up_proj.weight``).

        Returns:
          ``NestedVariants`` (rank int32[out, in] on device) or ``DenseVariants`` (weights
          float32[K, out, in] on device) with ``K = spec.num_levels[unit]``.

        Raises:
          KeyError: unknown parameter (the message lists a few valid names).
          StoreError: the file is unreadable (truncated or corrupt since it was opened).
        """
        entries = self._manifest["variants"]
        if param_name not in entries:
            raise KeyError(
                f"no variants for {param_name!r} in {self.path}; the store has "
                f"{len(entries)} parameters, e.g. {list(entries)[:3]}"
            )
        entry = entries[param_name]
        fpath = self.path / entry["file"]
        try:
            tensors = read_safetensors(fpath, mmap=True)
        except (OSError, SafetensorsError, KeyError) as e:
            raise StoreError(f"{fpath}: cannot read variants of {param_name} ({e})") from e
        result = variants_from_tensors(tensors, entry["kind"], bool(entry["per_row"]))
        if result.num_levels != entry["num_levels"]:
            raise StoreError(
                f"{fpath}: holds {result.num_levels} levels, the manifest records "
                f"{entry['num_levels']}"
            )
        return result

    def read_levels(
        self, param_name: str, levels: Sequence[int], dense: np.ndarray | None = None
    ) -> np.ndarray:
        """Host weights of some levels of one parameter, read from the memory-mapped file.

        This is what the block-streaming evaluator reads: only the levels a query uses,
        never the whole stack, and nothing is put on a device.

        Args:
          param_name: e.g. ``model.layers.0.mlp.up_proj.weight``.
          levels: level indices (each in ``0..num_levels-1``; repeats allowed).
          dense: the dense weight [out, in] (host array); required for nested variants,
            whose kept weights are the dense ones.

        Returns:
          [len(levels), out, in]: dense variants in their storage dtype; nested variants
          in ``dense``'s dtype (pruned weights exactly zero).

        Raises:
          KeyError: unknown parameter. ValueError: a level out of range, or ``dense``
          missing for nested variants. StoreError: the file is unreadable.
        """
        entry = self._entry(param_name)
        levels = [int(k) for k in levels]
        bad = [k for k in levels if not 0 <= k < entry["num_levels"]]
        if bad:
            raise ValueError(
                f"level {bad[0]} of {param_name} is out of range; valid: "
                f"0..{entry['num_levels'] - 1}"
            )
        tensors = self._tensors(param_name, entry)
        if entry["kind"] == "dense":
            w = tensors["weights"]
            return np.stack([np.asarray(w[k]) for k in levels]) if levels else w[:0].copy()
        if dense is None:
            raise ValueError(f"{param_name} holds nested variants: pass its dense weight")
        dense = np.asarray(dense)
        rank = np.asarray(tensors["rank"])
        counts = np.asarray(tensors["prune_counts"])
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

    def _tensors(self, param_name: str, entry: Mapping[str, Any]) -> dict[str, np.ndarray]:
        fpath = self.path / entry["file"]
        try:
            return read_safetensors(fpath, mmap=True)
        except (OSError, SafetensorsError, KeyError) as e:
            raise StoreError(f"{fpath}: cannot read variants of {param_name} ({e})") from e

    def input_norms(self) -> dict[str, np.ndarray]:
        """Layer name -> float32[in], ``||X_j||_2`` of the layer's calibration input (the
        inputs the builder pruned it from); empty for stores built without them."""
        entry = self._manifest.get("input_norms")
        if entry is None:
            return {}
        fpath = self.path / entry["file"]
        try:
            return {k: np.asarray(v) for k, v in read_safetensors(fpath, mmap=True).items()}
        except (OSError, SafetensorsError) as e:
            raise StoreError(f"{fpath}: cannot read input norms ({e})") from e

    def all_variants(self) -> dict[str, Variants]:
        """Every parameter's variants, keyed by parameter name (the evaluator's input)."""
        return {p: self.variants(p) for p in self.param_names}

    def __repr__(self) -> str:
        s = self._spec
        return (
            f"SupernetStore({str(self.path)!r}, units={s.num_units}, "
            f"levels<={s.sparsity.shape[1]}, structure={s.structure!r}, "
            f"pruner={self._manifest['pruner']['name']!r}, "
            f"input_mode={self._manifest['input_mode']!r})"
        )
