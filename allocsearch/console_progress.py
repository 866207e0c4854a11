"""Progress display: a rich bar on a terminal, plain timestamped lines everywhere else.

A bar redrawn in place is useless in a CI log, under ``nohup`` or in a Ray job's log, where
rich would print nothing until the end. :func:`progress_display` gives a rich ``Progress``
when the console is a terminal and a :class:`PlainProgress` otherwise, which prints one
line per step at most every ``interval_s`` seconds (and when a task finishes) with the
elapsed time and an ETA. Both offer the calls the builders and searches use: ``add_task``,
``update``, ``advance``, ``start``, ``stop`` and use as a context manager.

A stage with no steps to report (DP's error table, scoring the results, applying a recipe,
a long EvoPress generation) runs inside :func:`heartbeat`, which prints a plain line
whenever no progress line was printed for ``interval_s`` seconds, so a log never goes
silent for longer than that.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["PlainProgress", "format_seconds", "heartbeat", "progress_display"]

HEARTBEAT_S = 10.0
"""Seconds a log may go without a progress line during a long stage (when not a terminal)."""

# time.monotonic() of the last plain progress line of this process (PlainProgress or a
# heartbeat): a heartbeat stays quiet while a stage reports its own steps often enough
_last_line = [-float("inf")]


def format_seconds(seconds: float) -> str:
    """``75.2`` -> ``"1m15s"``, ``4000`` -> ``"1h06m"``, ``9.4`` -> ``"9s"``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class PlainProgress:
    """Progress as plain lines: ``<label> 3/10 <description> [fields] elapsed 1m02s ETA 2m25s``.

    Args:
      console: a ``rich.console.Console`` (lines go to it, unstyled).
      label: what the work is (``"supernet"``, ``"search"``).
      interval_s: at most one line per task this often, besides a task's last step.
      clock: time source (tests pass a fake one).
    """

    def __init__(
        self,
        *,
        console: Any,
        label: str,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = console
        self.label = label
        self.interval_s = float(interval_s)
        self._clock = clock
        self._tasks: dict[int, dict[str, Any]] = {}

    def add_task(
        self, description: str, *, total: float | None = None, completed: float = 0, **fields: Any
    ) -> int:
        task = len(self._tasks)
        now = self._clock()
        self._tasks[task] = {
            "description": description,
            "total": total,
            "completed": float(completed),
            "start_completed": float(completed),
            "started": now,
            "printed": None,
            "fields": dict(fields),
        }
        return task

    def update(
        self,
        task: int,
        *,
        description: str | None = None,
        completed: float | None = None,
        advance: float | None = None,
        **fields: Any,
    ) -> None:
        t = self._tasks[task]
        if description is not None:
            t["description"] = description
        t["fields"].update(fields)
        moved = completed is not None or advance is not None
        if completed is not None:
            t["completed"] = float(completed)
        if advance is not None:
            t["completed"] += float(advance)
        if moved:
            self._maybe_print(t)

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def _maybe_print(self, t: dict[str, Any]) -> None:
        now = self._clock()
        finished = t["total"] is not None and t["completed"] >= t["total"]
        if not finished and t["printed"] is not None and now - t["printed"] < self.interval_s:
            return
        t["printed"] = now
        elapsed = now - t["started"]
        done = t["completed"] - t["start_completed"]
        total = t["total"]
        count = f"{t['completed']:g}" + (f"/{total:g}" if total is not None else "")
        eta = ""
        if total is not None and done > 0 and not finished:
            eta = f" ETA {format_seconds(elapsed / done * (total - t['completed']))}"
        fields = "".join(f" {k} {v}" for k, v in t["fields"].items())
        _last_line[0] = time.monotonic()
        self.console.print(
            f"{self.label} {count} {t['description']}{fields} elapsed "
            f"{format_seconds(elapsed)}{eta}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )

    def start(self) -> None:
        """Nothing to start: lines are printed as work advances."""

    def stop(self) -> None:
        """Nothing to stop."""

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def progress_display(
    columns: Sequence[Any], *, console: Any, label: str, enabled: bool = True, **kwargs: Any
) -> Any:
    """A rich ``Progress(*columns, console=console, **kwargs)`` on a terminal (disabled when
    ``enabled`` is False), else a :class:`PlainProgress` labelled ``label``."""
    from rich.progress import Progress

    if not enabled or console.is_terminal:
        return Progress(*columns, console=console, disable=not enabled, **kwargs)
    return PlainProgress(console=console, label=label)


@contextlib.contextmanager
def heartbeat(
    label: str, *, console: Any = None, enabled: bool = True, interval_s: float | None = None
) -> Iterator[None]:
    """While the ``with`` block runs, print ``<label> ... elapsed 20s`` to ``console``
    (default: stderr) whenever no plain progress line was printed for ``interval_s``
    seconds (default :data:`HEARTBEAT_S`). Only when ``console`` is not a terminal (a
    terminal shows rich's bars, and an idle one is watched, not logged) and ``enabled``;
    lines come from a daemon thread that stops when the block ends."""
    interval_s = HEARTBEAT_S if interval_s is None else float(interval_s)
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    if not enabled or console.is_terminal:
        yield
        return
    stop = threading.Event()
    started = time.monotonic()
    _last_line[0] = max(_last_line[0], started)  # the first line after interval_s, not now

    def beat() -> None:
        while not stop.wait(max(_last_line[0] + interval_s - time.monotonic(), 0.0)):
            now = time.monotonic()
            if now - _last_line[0] >= interval_s:
                _last_line[0] = now
                console.print(
                    f"{label} ... elapsed {format_seconds(now - started)}",
                    markup=False,
                    highlight=False,
                    soft_wrap=True,
                )

    thread = threading.Thread(target=beat, name=f"heartbeat: {label}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
