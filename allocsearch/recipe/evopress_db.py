"""EvoPress database export: a supernet's variants as the files EvoPress's loader reads.

EvoPress (IST-DASLab/EvoPress, ``src/model_utils.py: load_sparse_weights``) keeps one
PyTorch file per module and level and a text file of ``module.name: level`` lines::

    <database>/
      model.layers.0.self_attn.q_proj/     one directory per pruned module, named by its
        -4.pth  ...  0.pth  ...  4.pth     Hugging Face module path; one file per level,
      ...                                  named by the level relative to the uniform one
      evopress_levels.txt                  the recipe: ``module.name: level`` per module

Each ``<level>.pth`` holds one tensor, ``torch.save``-d, with the shape of the module's
``weight`` in the Hugging Face model (``[out, in]`` for ``nn.Linear``); EvoPress assigns it
to ``module.weight.data`` cast to the model's dtype. Loading the recipe in EvoPress::

    load_sparse_weights(model, "<database>", "evopress_levels.txt")

and without the level file every module gets level 0 (the uniform allocation). The files
of one module are its supernet variants at every valid level, so EvoPress can also run its
own search on the database. :func:`write_evopress_database` assembles the directory under
a temporary name and moves it into place whole.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from allocsearch.atomic import atomic_write_text, commit_directory, temporary_sibling_dir
from allocsearch.models.hf import HFModel
from allocsearch.recipe.apply import choice_for_recipe
from allocsearch.recipe.exporters import Export, ExportError, to_evopress
from allocsearch.recipe.recipe import Recipe
from allocsearch.supernet.store import SupernetStore

EVOPRESS_LEVELS_FILE = "evopress_levels.txt"
"""Name of the level file inside the database (``sparse_config_path`` of EvoPress's loader,
which joins it to the database path)."""


@dataclass(frozen=True)
class EvoPressDatabase:
    """What :func:`write_evopress_database` wrote.

    Attributes:
      path: the database directory.
      export: the level file's text (``content``), notes and budget check, as
        :func:`~allocsearch.recipe.exporters.to_evopress` gives them.
      modules: Hugging Face module path of every directory, in the recipe's order.
      levels: per module, the relative levels written (``-center .. K - 1 - center``).
      num_bytes: bytes of all ``.pth`` files.
    """

    path: Path
    export: Export[str]
    modules: tuple[str, ...]
    levels: tuple[tuple[int, ...], ...]
    num_bytes: int


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ExportError(
            "the EvoPress database holds PyTorch .pth files, so writing it needs torch "
            "(pip install torch); --format evopress writes the level file alone"
        ) from None
    return torch


def _to_torch(torch: Any, arr: np.ndarray) -> Any:
    """A torch tensor owning a copy of ``arr`` (float32 / float16 / bfloat16 [out, in])."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype.name == "bfloat16":  # ml_dtypes: torch.from_numpy does not know it
        return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(arr.copy())


def _database_modules(store: SupernetStore, model: HFModel) -> tuple[list[str], list[str]]:
    """(Hugging Face module name, store parameter) of every unit, one weight each; refuses
    units of several parameters and names that cannot be directories."""
    spec = store.spec
    modules: list[str] = []
    params: list[str] = []
    for u, unit_params in enumerate(store.unit_params):
        if len(unit_params) != 1:
            raise ExportError(
                f"unit {spec.units[u].name!r} changes {len(unit_params)} parameters; an "
                f"EvoPress database holds one weight per module"
            )
        (param,) = unit_params
        # the adapter renames (and transposes) checkpoint tensors: a probe gives the name
        (hf_name,) = model.adapter.to_hf_tensors({param: np.zeros((0, 0), np.float32)})
        if not hf_name.endswith(".weight"):
            raise ExportError(f"parameter {param!r} is stored as {hf_name!r}, not a .weight")
        module = hf_name[: -len(".weight")]
        if not module or "/" in module or module in (".", "..") or module.startswith("."):
            raise ExportError(f"module name {module!r} cannot be a directory name")
        modules.append(module)
        params.append(param)
    return modules, params


def write_evopress_database(
    recipe: Recipe,
    store: SupernetStore,
    model: HFModel,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> EvoPressDatabase:
    """Write the EvoPress database of ``store`` with ``recipe`` as its level file.

    Args:
      recipe: an unstructured or N:M recipe searched on ``store`` (EvoPress has no
        head / neuron pruning).
      store: the supernet; every valid level of every unit becomes one ``.pth`` file.
      model: the model the store was built from (its dense weights complete nested
        variants; its adapter gives each module's Hugging Face name and weight layout,
        e.g. GPT-2's transposed Conv1D weights). Lazily loaded models are read one
        tensor at a time.
      path: the database directory to create.
      overwrite: replace an existing ``path`` (only once the new database is complete).

    Returns:
      :class:`EvoPressDatabase`. Dense (SparseGPT) variants are written in the store's
      storage dtype, nested (magnitude / Wanda) ones in the model's loaded dtype; both
      are the exact values the evaluator scored.

    Raises:
      ExportError: a structured recipe, a recipe or store of another model or grid (see
        :func:`~allocsearch.recipe.exporters.to_evopress`), a module name that is not a
        valid directory name, or torch missing.
      FileExistsError: ``path`` exists and ``overwrite`` is False (checked first).
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{os.fspath(target)!r} exists; pass --overwrite to replace it")
    if store.model_fingerprint != model.fingerprint:
        raise ExportError(
            f"the supernet {store.path} was built for model fingerprint "
            f"{store.model_fingerprint!r}, but the model given has {model.fingerprint!r}; "
            f"pass the model it was built from"
        )
    choice = choice_for_recipe(recipe, store)
    export = to_evopress(recipe, store.spec, choice)  # validates the recipe against the store
    torch = _torch()
    spec = store.spec
    modules, params = _database_modules(store, model)

    rel = choice.astype(np.int64) - spec.center.astype(np.int64)
    levels_text = "".join(f"{m}: {int(r)}\n" for m, r in zip(modules, rel, strict=True))
    tmp = temporary_sibling_dir(target)
    written_levels: list[tuple[int, ...]] = []
    total = 0
    try:
        for u, (module, param) in enumerate(zip(modules, params, strict=True)):
            directory = tmp / module
            directory.mkdir()
            dense = model.params[param]
            center = int(spec.center[u])
            mine: list[int] = []
            for k in range(int(spec.num_levels[u])):
                weight = store.read_levels(param, [k], np.asarray(dense))[0]
                (hf_weight,) = model.adapter.to_hf_tensors({param: weight}).values()
                file = directory / f"{k - center}.pth"
                torch.save(_to_torch(torch, np.asarray(hf_weight)), file)
                total += file.stat().st_size
                mine.append(k - center)
            written_levels.append(tuple(mine))
        atomic_write_text(levels_text, tmp / EVOPRESS_LEVELS_FILE)
        commit_directory(tmp, target, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    notes = (
        f"wrote {sum(map(len, written_levels))} level files of {len(modules)} modules "
        f"({total / 2**20:.1f} MiB); load the recipe with EvoPress's "
        f"load_sparse_weights(model, {os.fspath(target)!r}, {EVOPRESS_LEVELS_FILE!r})",
        *(n for n in export.notes if "<database>/<module>/<level>.pth" not in n),
    )
    return EvoPressDatabase(
        path=target,
        export=Export(
            levels_text, notes, export.budget_kind, export.budget_recipe, export.budget_exported
        ),
        modules=tuple(modules),
        levels=tuple(written_levels),
        num_bytes=total,
    )


__all__ = ["EVOPRESS_LEVELS_FILE", "EvoPressDatabase", "write_evopress_database"]
