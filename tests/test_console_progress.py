"""Plain progress lines where no terminal is attached (CI logs, nohup, Ray job logs)."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from allocsearch.console_progress import PlainProgress, format_seconds, progress_display


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 9.4, 59.6, 75.2, 3599, 4000)] == [
        "0s", "9s", "1m00s", "1m15s", "59m59s", "1h06m",
    ]  # fmt: skip


def test_plain_lines_with_eta_at_most_every_interval_and_at_the_end():
    out = io.StringIO()
    clock = Clock()
    p = PlainProgress(console=Console(file=out, width=200), label="search", clock=clock)
    task = p.add_task("generations", total=10, completed=2, best="-")
    clock.t += 30  # 1 generation in 30 s: 7 left -> ETA 3m30s
    p.update(task, completed=3, best="0.5")
    clock.t += 5  # within 10 s of the last line: silent
    p.advance(task)
    clock.t += 25  # 3 done (2 -> 5) in 60 s, 5 left: ETA 5 * 20 s = 1m40s
    p.advance(task)
    clock.t += 1  # the last step always prints, without an ETA
    p.update(task, completed=10, best="0.25")
    assert out.getvalue().splitlines() == [
        "search 3/10 generations best 0.5 elapsed 30s ETA 3m30s",
        "search 5/10 generations best 0.5 elapsed 1m00s ETA 1m40s",
        "search 10/10 generations best 0.25 elapsed 1m01s",
    ]


def test_terminal_gets_rich_bar_pipe_gets_lines():
    pipe = Console(file=io.StringIO())
    assert isinstance(progress_display((), console=pipe, label="x"), PlainProgress)
    tty = Console(file=io.StringIO(), force_terminal=True)
    assert isinstance(progress_display((), console=tty, label="x"), Progress)
    off = progress_display((), console=pipe, label="x", enabled=False)
    assert isinstance(off, Progress) and off.disable


def test_heartbeat_fills_silences_of_a_long_stage_only():
    """Issue 28.6: a stage with no steps of its own (DP's table, scoring) printed nothing
    for minutes in a log. ``heartbeat`` prints ``<label> ... elapsed`` whenever no plain
    progress line came for ``interval_s``; a stage reporting its own steps more often is
    left alone, and a terminal (rich's bars) or ``enabled=False`` gets nothing."""
    import threading
    import time

    from allocsearch.console_progress import heartbeat

    out = io.StringIO()
    console = Console(file=out, width=200)
    with heartbeat("dp: searching", console=console, interval_s=0.1):
        time.sleep(0.55)  # lines at about 0.1, 0.2, ..., 0.5 s
    lines = out.getvalue().splitlines()
    assert 3 <= len(lines) <= 6, lines
    assert all(line in ("dp: searching ... elapsed 0s", "dp: searching ... elapsed 1s")
               for line in lines), lines  # fmt: skip
    assert not any(t.name.startswith("heartbeat") for t in threading.enumerate())

    out.truncate(0), out.seek(0)
    p = PlainProgress(console=console, label="search", interval_s=0.0)
    task = p.add_task("generations", total=100)
    with heartbeat("evopress: searching", console=console, interval_s=0.3):
        for _ in range(10):  # its own lines every 0.05 s: the heartbeat stays quiet
            time.sleep(0.05)
            p.advance(task)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and all(line.startswith("search ") for line in lines), lines

    for where, enabled in ((Console(file=out, force_terminal=True), True), (console, False)):
        out.truncate(0), out.seek(0)
        with heartbeat("quiet", console=where, enabled=enabled, interval_s=0.05):
            time.sleep(0.2)
        assert out.getvalue() == ""
