"""Per-generation progress of a search: a JSONL log, a progress bar, and checkpoints.

:func:`make_callbacks` composes them into the one ``on_generation`` callback that
:func:`~allocsearch.distributed.local.run_search` calls with the state after every
generation. Per generation, in this order:

1. one JSON line is appended to the log and flushed: ``generation``, ``step``,
   ``evaluations``, ``tokens``, ``best_fitness`` (lower is better; null if not scored
   yet), ``wall_s`` (seconds since the search first started, resumes included) and
   ``generation_s`` (seconds this generation took);
2. the state is checkpointed (:class:`~allocsearch.distributed.checkpoint.SearchCheckpointer`);
3. the progress bar (rich, on the driver's stderr, with ETA) advances.

Logging before checkpointing means a crash between the two leaves a log line for a
generation that the resume will redo; on resume the log is cut back to the resumed
generation, so it ends up with exactly one line per generation.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import IO, Any

from allocsearch.atomic import atomic_write_text
from allocsearch.closing import Closing
from allocsearch.console_progress import progress_display
from allocsearch.distributed.checkpoint import SearchCheckpointer, json_float
from allocsearch.search.base import Searcher


class SearchCallbacks(Closing):
    """The ``on_generation`` callback of a search: log line, checkpoint, progress bar.

    Build with :func:`make_callbacks`; use as a context manager (or call :meth:`close`)
    so the bar stops and the log closes. Calling it with a state records one generation.
    """

    def __init__(
        self,
        searcher: Searcher,
        *,
        log_path: str | Path | None,
        checkpointer: SearchCheckpointer | None,
        progress: bool,
        total_generations: int | None,
        start_state: Any,
        console: Any,
        fitness_label: str | None = None,
    ) -> None:
        self._searcher = searcher
        self._fitness_label = fitness_label
        self._checkpointer = checkpointer
        start_generation = 0 if start_state is None else int(start_state.generation)
        if checkpointer is not None and checkpointer.last_generation != start_generation:
            raise ValueError(
                f"{checkpointer.directory} holds a checkpoint of generation "
                f"{checkpointer.last_generation} but the search starts at generation "
                f"{start_generation}; resume with start_state=latest_state(...) (and the "
                "same state= for run_search), or use an empty checkpoint directory"
            )
        self._log: IO[str] | None = None
        wall_offset = 0.0
        if log_path is not None:
            wall_offset = _cut_log(Path(log_path), start_generation)
            self._log = open(log_path, "a", encoding="utf-8")  # closed in close()
        self._wall_offset = wall_offset
        self._started = time.perf_counter()
        self._last = self._started
        self._progress = None
        if progress:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = progress_display(
                (
                    TextColumn("search"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("generations  best {task.fields[best]}"),
                    TimeElapsedColumn(),
                    TextColumn("ETA"),
                    TimeRemainingColumn(),
                ),
                console=console if console is not None else Console(stderr=True),
                label="search",
                transient=False,
            )
            self._task = self._progress.add_task(
                "generations", total=total_generations, completed=start_generation, best="-"
            )
            self._progress.start()

    def __call__(self, state: Any) -> None:
        now = time.perf_counter()
        result = self._searcher.result(state)
        wall_s = self._wall_offset + (now - self._started)
        if self._log is not None:
            line = {
                "generation": int(state.generation),
                "step": int(state.step),
                "evaluations": int(result.evaluations),
                "tokens": int(result.tokens),
                "best_fitness": json_float(result.best_fitness),
                "wall_s": round(wall_s, 6),
                "generation_s": round(now - self._last, 6),
            }
            self._log.write(json.dumps(line) + "\n")
            self._log.flush()
        if self._checkpointer is not None:
            self._checkpointer.save(state, result, wall_s=wall_s)
        if self._progress is not None:
            best = result.best_fitness
            self._progress.update(
                self._task,
                completed=int(state.generation),
                best=(f"{best:.6g}" if math.isfinite(best) else "-")
                + (f" ({self._fitness_label})" if self._fitness_label else ""),
            )
        self._last = time.perf_counter()

    def close(self) -> None:
        """Stop the progress bar and close the log (the checkpointer is the caller's)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._log is not None:
            self._log.close()
            self._log = None


def make_callbacks(
    searcher: Searcher,
    *,
    log_path: str | Path | None = None,
    checkpointer: SearchCheckpointer | None = None,
    progress: bool = True,
    total_generations: int | None = None,
    start_state: Any = None,
    console: Any = None,
    fitness_label: str | None = None,
) -> SearchCallbacks:
    """The ``on_generation`` callback of ``run_search``: JSONL log, checkpoint, progress bar.

    Args:
      searcher: the searcher being run (its ``result(state)`` gives best fitness and
        counters).
      log_path: JSONL progress log; None for no log. Lines after ``start_state``'s
        generation (left by an interrupted run) are removed first; a fresh search
        (``start_state`` None) starts the file anew.
      checkpointer: saves the state every generation; None for no checkpoints.
      progress: show a rich progress bar with ETA on the driver.
      total_generations: generations the search will run (the bar's total, for the ETA);
        None if unknown.
      start_state: the state the search resumes from (None for a fresh search).
      console: a ``rich.console.Console`` for the bar (default: stderr).
      fitness_label: what the best fitness is, shown after it (e.g. ``"kl on 2,048
        tokens"``: a score on a minibatch, not comparable with one on the whole set).
    """
    if total_generations is not None and total_generations < 1:
        raise ValueError(f"total_generations must be >= 1 or None, got {total_generations}")
    return SearchCallbacks(
        searcher,
        log_path=log_path,
        checkpointer=checkpointer,
        progress=progress,
        total_generations=total_generations,
        start_state=start_state,
        console=console,
        fitness_label=fitness_label,
    )


def read_log(log_path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL progress log, in order (an unfinished last line is dropped)."""
    records = []
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # cut off by a crash mid-write
            records.append(json.loads(line))
    return records


def _cut_log(log_path: Path, keep_through: int) -> float:
    """Keep the log's lines of generations <= ``keep_through``; their last ``wall_s``.

    The file is rewritten atomically (:func:`~allocsearch.atomic.atomic_write_text`).
    """
    if not log_path.exists():
        return 0.0
    kept = [r for r in read_log(log_path) if r["generation"] <= keep_through]
    atomic_write_text("".join(json.dumps(r) + "\n" for r in kept), log_path, overwrite=True)
    return float(kept[-1]["wall_s"]) if kept else 0.0
