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
import json
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from allocsearch.models.safetensors_io import (
    SafetensorsError,
    read_header,
    read_safetensors,
)
from allocsearch.pruners.base import Variants
from allocsearch.supernet.levels import LevelGrid
from allocsearch.supernet.spec import SupernetSpec
from allocsearch.supernet.store_format import (
    _REQUIRED_KEYS,
    FORMAT_VERSION,
    LAYOUTS,
    MANIFEST_NAME,
    READABLE_VERSIONS,
    STORAGE_DTYPE_CHOICES,
    STORAGE_DTYPES,
    VERIFY_MODES,
    StoreError,
    _check_choice,
    _dense_levels,
    _level_parts,
    _parts_digest,
    _small_parts,
    file_digest,
    grid_from_json,
    grid_to_json,
    make_spec,
    resolve_storage_dtype,
    spec_from_json,
    spec_to_json,
    variants_from_tensors,
    variants_to_tensors,
)
from allocsearch.supernet.store_writer import StoreWriter

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
