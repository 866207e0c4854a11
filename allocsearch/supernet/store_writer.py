"""Writing a store: :class:`StoreWriter` assembles the directory under a temporary name
and renames it into place after the manifest is written."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from allocsearch.atomic import commit_directory, temporary_sibling_dir
from allocsearch.models.safetensors_io import (
    read_safetensors,
    write_safetensors,
)
from allocsearch.pruners.base import Variants
from allocsearch.supernet.levels import LevelGrid
from allocsearch.supernet.spec import SupernetSpec
from allocsearch.supernet.store_format import (
    FORMAT_VERSION,
    INPUT_NORMS_FILE,
    LAYOUTS,
    MANIFEST_NAME,
    STORAGE_DTYPES,
    _check_choice,
    _level_parts,
    _parts_digest,
    _small_parts,
    _variant_file_name,
    file_digest,
    grid_to_json,
    spec_to_json,
    variants_to_tensors,
)


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
