"""Search-state checkpoints (orbax) every generation, and resuming from the latest one.

A checkpoint of generation ``g`` is an orbax step ``g`` with two items:

* ``state``: a PyTree of numpy arrays: ``state_pickle`` uint8[bytes] (the searcher's
  state, a picklable NamedTuple, pickled: robust to any field types the state has),
  ``key_data`` uint32[...] (the search key's raw data) and ``best_choice`` int32[L];
* ``summary``: JSON for people and tools: the fingerprint, generation, step,
  evaluations, tokens, best fitness and allocation, history and wall time.

Orbax writes a step into a temporary directory (``<g>.orbax-checkpoint-tmp-*``) and
renames it when complete, and marks every finished item and step with
``commit_success.txt``. A step counts as complete only when orbax lists it as a
finalised step *and* its commit marker exists, so a save interrupted by a crash or
``kill -9`` is never taken for a checkpoint (verified with orbax-checkpoint 0.12.8).

A resume must continue the same search: every checkpoint stores a
:class:`SearchFingerprint` of the supernet spec, the budget, the searcher's settings, the
key and any extra settings (e.g. evaluator options), and loading with a different one
raises :class:`CheckpointMismatchError` naming the parts that differ.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import pickle
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from allocsearch.closing import Closing
from allocsearch.search.base import Searcher, SearchResult
from allocsearch.search.budget import Budget
from allocsearch.supernet.spec import SupernetSpec

FORMAT_VERSION = 1
# Orbax writes this file into every finished step directory (and every item).
_COMMIT_MARKER = "commit_success.txt"
_ITEMS = ("state", "summary")


class CheckpointMismatchError(ValueError):
    """A checkpoint directory belongs to a different search than the one being run."""


class SearchFingerprint(NamedTuple):
    """What identifies a search, for refusing to resume a different one.

    Attributes:
      parts: component name (``spec``, ``budget``, ``searcher``, ``key``, ``extra``) ->
        SHA-256 hex digest of its canonical JSON description.
      key_data: uint32[...], raw data of the search key (stored with every checkpoint).
    """

    parts: Mapping[str, str]
    key_data: np.ndarray


class SavedSearch(NamedTuple):
    """One complete checkpoint, as loaded.

    Attributes:
      state: the searcher state after ``generation`` generations (resume from it).
      generation: completed generations (the orbax step number).
      key_data: uint32[...], raw data of the search key.
      summary: the JSON summary (fingerprint, counters, best fitness and allocation,
        history, wall time).
    """

    state: Any
    generation: int
    key_data: np.ndarray
    summary: Mapping[str, Any]


def search_fingerprint(
    *,
    searcher: Searcher,
    spec: SupernetSpec,
    budget: Budget,
    key: jax.Array,
    extra: Mapping[str, Any] | None = None,
) -> SearchFingerprint:
    """The fingerprint of a search: digests of spec, budget, searcher settings and key.

    ``extra`` adds settings outside those objects that change scores (e.g. the model
    path, metric and calibration set of the evaluator). Values may be numbers, strings,
    arrays, tuples, mappings, dataclasses, NamedTuples and named functions.
    """
    key_data = _key_data(key)
    described = {
        "spec": spec,
        "budget": budget,
        "searcher": searcher,
        "key": key_data,
        "extra": dict(extra or {}),
    }
    parts = {name: _digest(_canonical(value, name)) for name, value in described.items()}
    return SearchFingerprint(parts=parts, key_data=key_data)


class SearchCheckpointer(Closing):
    """Saves the search state every generation into ``directory`` (orbax, synchronous).

    Args:
      directory: checkpoint directory (created if missing). It may hold checkpoints of
        the same search (a resume); those of another search are refused.
      fingerprint: of the search being run (:func:`search_fingerprint`).
      max_to_keep: number of most recent checkpoints kept; older ones are deleted.

    Raises:
      CheckpointMismatchError: ``directory`` holds checkpoints of a different search.

    Opening removes leftovers of interrupted saves newer than the last complete checkpoint
    (orbax temporary directories, step directories without the commit marker), so those
    generations can be written again.
    """

    def __init__(
        self, directory: str | Path, *, fingerprint: SearchFingerprint, max_to_keep: int = 3
    ) -> None:
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).absolute()
        self.fingerprint = fingerprint
        latest = latest_checkpoint(self.directory, fingerprint=fingerprint)
        self._last_generation = latest.generation if latest is not None else 0
        self.directory.mkdir(parents=True, exist_ok=True)
        for generation in _incomplete_steps(self.directory):
            if generation > self._last_generation:  # a save the resume will redo
                shutil.rmtree(self.directory / str(generation))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                cleanup_tmp_directories=True,
                enable_async_checkpointing=False,
            ),
            item_names=_ITEMS,
        )

    @property
    def last_generation(self) -> int:
        """Generation of the newest complete checkpoint in the directory (0 if none)."""
        return self._last_generation

    def save(self, state: Any, result: SearchResult, *, wall_s: float = math.nan) -> None:
        """Checkpoint ``state`` (after ``state.generation`` generations) and its result.

        Args:
          state: the searcher state; must pickle, and have int fields ``generation`` and
            ``step``. Its generation must exceed that of the last checkpoint.
          result: ``searcher.result(state)`` (best allocation, fitness, history).
          wall_s: seconds the search has run so far, for the summary (nan if unknown).
        """
        generation = int(state.generation)
        if generation <= self._last_generation:
            raise ValueError(
                f"generation {generation} is not after the last checkpoint in "
                f"{self.directory} (generation {self._last_generation}); resume from that "
                "checkpoint or use an empty directory"
            )
        blob = np.frombuffer(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
        best_choice = np.asarray(result.best_choice, dtype=np.int32)
        tree = {
            "state_pickle": blob,
            "key_data": self.fingerprint.key_data,
            "best_choice": best_choice,
        }
        summary = {
            "format": FORMAT_VERSION,
            "fingerprint": dict(self.fingerprint.parts),
            "state_type": f"{type(state).__module__}.{type(state).__qualname__}",
            "generation": generation,
            "step": int(state.step),
            "evaluations": int(result.evaluations),
            "tokens": int(result.tokens),
            "best_fitness": json_float(result.best_fitness),
            "best_choice": best_choice.tolist(),
            "history": [
                [int(h.generation), int(h.evaluations), int(h.tokens), json_float(h.best_fitness)]
                for h in result.history
            ],
            "wall_s": json_float(wall_s),
            "saved_at_unix_s": time.time(),
        }
        ocp = self._ocp
        try:
            self._manager.save(
                generation,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(tree), summary=ocp.args.JsonSave(summary)
                ),
            )
            self._manager.wait_until_finished()
        except Exception:
            # A failed save (disk full, permissions) leaves orbax's temporary step directory;
            # remove it now rather than at the next open.
            for leftover in self.directory.glob(f"{generation}.orbax-checkpoint-tmp*"):
                shutil.rmtree(leftover, ignore_errors=True)
            raise
        if not (self.directory / str(generation) / _COMMIT_MARKER).exists():
            raise RuntimeError(
                f"orbax-checkpoint {ocp.__version__} wrote {self.directory / str(generation)} "
                f"without {_COMMIT_MARKER}, so it could not be told from an interrupted save; "
                "allocsearch needs an orbax-checkpoint that writes it (0.12.8 does)"
            )
        self._last_generation = generation

    def close(self) -> None:
        """Finish pending writes and release the orbax manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def complete_generations(directory: str | Path) -> list[int]:
    """Generations with a complete checkpoint in ``directory``, ascending ([] if none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        g for g in _orbax_steps(directory) if (directory / str(g) / _COMMIT_MARKER).exists()
    )


def latest_checkpoint(
    directory: str | Path, *, fingerprint: SearchFingerprint | None
) -> SavedSearch | None:
    """The newest complete checkpoint in ``directory``, or None if there is none.

    Args:
      fingerprint: the search being resumed; None skips the check (inspection only).

    Raises:
      CheckpointMismatchError: the checkpoint belongs to a search with another
        fingerprint (the message names the differing parts: spec, budget, searcher, key,
        extra).
    """
    directory = Path(directory).absolute()
    generations = complete_generations(directory)
    if not generations:
        return None
    generation = generations[-1]
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False),
        item_names=_ITEMS,
    )
    try:
        restored = manager.restore(
            generation,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(), summary=ocp.args.JsonRestore()
            ),
        )
    finally:
        manager.close()
    summary = dict(restored.summary)
    if summary.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {directory / str(generation)} has format {summary.get('format')!r}; "
            f"this version of allocsearch reads format {FORMAT_VERSION}"
        )
    if fingerprint is not None:
        _check_fingerprint(directory, summary["fingerprint"], fingerprint)
    tree = restored.state
    state = pickle.loads(np.asarray(tree["state_pickle"], dtype=np.uint8).tobytes())
    if int(state.generation) != generation:
        raise ValueError(
            f"checkpoint {directory / str(generation)} holds a state of generation "
            f"{state.generation}; the checkpoint directory is corrupt"
        )
    return SavedSearch(
        state=state,
        generation=generation,
        key_data=np.asarray(tree["key_data"], dtype=np.uint32),
        summary=summary,
    )


def latest_state(directory: str | Path, *, fingerprint: SearchFingerprint) -> Any | None:
    """The searcher state to resume from (newest complete checkpoint), or None.

    Pass it as ``state=`` to :func:`~allocsearch.distributed.local.run_search` with the
    same key. Raises :class:`CheckpointMismatchError` if the directory belongs to a
    different search.
    """
    saved = latest_checkpoint(directory, fingerprint=fingerprint)
    return None if saved is None else saved.state


def _check_fingerprint(
    directory: Path, stored: Mapping[str, str], fingerprint: SearchFingerprint
) -> None:
    names = sorted(set(stored) | set(fingerprint.parts))
    differ = [n for n in names if stored.get(n) != fingerprint.parts.get(n)]
    if differ:
        detail = ", ".join(
            f"{n} (checkpoint {str(stored.get(n))[:12]}, this run "
            f"{str(fingerprint.parts.get(n))[:12]})"
            for n in differ
        )
        raise CheckpointMismatchError(
            f"the checkpoints in {directory} belong to a different search: {detail} "
            "differ. Resume with the original spec, budget, searcher settings and seed, or "
            "use another checkpoint directory."
        )


def _orbax_steps(directory: Path) -> list[int]:
    """Step numbers orbax sees as finalised (temporary directories excluded)."""
    import orbax.checkpoint as ocp

    return [int(s) for s in ocp.step.checkpoint_steps(directory)]


def _incomplete_steps(directory: Path) -> list[int]:
    """Step directories orbax lists that lack the commit marker (a non-atomic crash)."""
    return [
        g for g in _orbax_steps(directory) if not (directory / str(g) / _COMMIT_MARKER).exists()
    ]


def _key_data(key: jax.Array) -> np.ndarray:
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key, dtype=np.uint32)


def json_float(x: float) -> float | None:
    """JSON-safe float: None for nan and +-inf (JSON has no such numbers)."""
    x = float(x)
    return x if math.isfinite(x) else None


def _digest(description: Any) -> str:
    text = json.dumps(description, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _canonical(value: Any, where: str) -> Any:
    """A JSON-able description of ``value`` that is equal exactly for equal settings."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return {"float": float(value).hex()}
    if isinstance(value, np.ndarray | jax.Array):
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            value = jax.random.key_data(value)
        arr = np.ascontiguousarray(np.asarray(value))
        return {
            "array": str(arr.dtype),
            "shape": list(arr.shape),
            "sha256": hashlib.sha256(arr.tobytes()).hexdigest(),
        }
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            "type": _qualified(type(value)),
            "fields": {
                f.name: _canonical(getattr(value, f.name), f"{where}.{f.name}")
                for f in dataclasses.fields(value)
            },
        }
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return {
            "type": _qualified(type(value)),
            "fields": {n: _canonical(getattr(value, n), f"{where}.{n}") for n in value._fields},
        }
    if isinstance(value, tuple | list):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): _canonical(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, functools.partial):
        return {
            "partial": _canonical(value.func, f"{where}.func"),
            "args": _canonical(value.args, f"{where}.args"),
            "keywords": _canonical(value.keywords, f"{where}.keywords"),
        }
    if callable(value) and hasattr(value, "__qualname__") and hasattr(value, "__module__"):
        return {"callable": _qualified(value)}
    raise TypeError(
        f"cannot fingerprint {where} of type {type(value).__name__}: use numbers, strings, "
        "arrays, tuples, mappings, dataclasses, NamedTuples or named functions"
    )


def _qualified(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"
