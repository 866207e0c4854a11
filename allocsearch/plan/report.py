"""The plan's result: bytes per process and category, the verdicts and the markdown table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from allocsearch.plan.base import format_bytes


@dataclass(frozen=True)
class ProcessMemory:
    """Bytes one process holds at its peak, by what they hold.

    Attributes:
      name: ``"driver"`` or ``"actor"``.
      device: category -> bytes on the accelerator (model, variants, teacher,
        activations, reference).
      host: category -> bytes of host memory (anonymous: the store's memory-mapped pages
        live in the shared page cache and are not counted).
      count: how many such processes run (actors: the workers).
    """

    name: str
    device: dict[str, int]
    host: dict[str, int]
    count: int = 1

    @property
    def device_total(self) -> int:
        return int(sum(self.device.values()))

    @property
    def host_total(self) -> int:
        return int(sum(self.host.values()))


CATEGORIES: Final[tuple[str, ...]] = ("model", "variants", "teacher", "activations", "reference")


@dataclass(frozen=True)
class MemoryPlan:
    """What a run needs and where it fits (see the module docstring for the formulas).

    Attributes:
      model: what was planned (the model argument).
      command: the command planned for (``search``, ``build``, ...).
      settings: the settings the numbers follow (label -> value), for the table.
      device_kind: ``"cpu"`` (the device is the host's memory), ``"gpu"``, ...
      device_memory, host_memory: bytes available (detected or given).
      workers: actors (0: everything in the driver process).
      margin: fraction of each memory kept free.
      modes: execution mode -> processes (driver and actor).
      fits: execution mode -> whether it fits (device and host, with the margin).
      mode: the chosen mode (``None``: nothing fits).
      store_bytes: the supernet store's size on disk.
      moved_per_generation: streaming: bytes brought to the device per search generation,
        all actors together, if every candidate used a different level of every unit
        (0 for strategies without generations).
      moved_estimate: the same for EvoPress's children of one parent: each differs from
        it in at most ``2 x max_switches`` units, so a query of ``n`` moves at most
        ``L + 2 max_switches n`` distinct variants (``L`` units), at the mean unit size.
      notes: lines shown under the table.
      parent_disk_bytes: streaming EvoPress: what every query reads of the parent (one
        level of every unit from the store, nested units' whole rank files, and the dense
        block weights the store does not hold): the page cache keeps it across queries
        and generations when there is room.
      disk_per_generation: streaming EvoPress, with the parent cached: the most a
        generation reads from disk, its children's differing units (``offspring x 2
        max_switches`` units at the mean unit level; nested units' levels share the
        cached rank file).
    """

    model: str
    command: str
    settings: dict[str, str]
    device_kind: str
    device_memory: int
    host_memory: int
    workers: int
    margin: float
    modes: dict[str, tuple[ProcessMemory, ...]]
    fits: dict[str, bool]
    mode: str | None
    store_bytes: int
    moved_per_generation: int
    notes: tuple[str, ...] = ()
    moved_estimate: int = 0
    parent_disk_bytes: int = 0
    disk_per_generation: int = 0

    def need(self, mode: str) -> tuple[int, int]:
        """(device bytes of the largest process, host bytes of this machine) in ``mode``.
        On a CPU device the device is the host: both count against the host."""
        return _need(self.modes[mode], self.device_kind)

    def table(self) -> str:
        """Markdown: settings, then bytes per process and category for each mode."""
        lines = [f"## Memory plan: {self.model} ({self.command})", ""]
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in self.settings.items()]
        dev = "host RAM (CPU device)" if self.device_kind == "cpu" else self.device_kind
        lines += [
            f"| device memory | {format_bytes(self.device_memory)} ({dev}) |",
            f"| host memory | {format_bytes(self.host_memory)} |",
            f"| margin kept free | {self.margin:.0%} |",
            f"| store on disk | {format_bytes(self.store_bytes)} |",
            "",
        ]
        header = "| mode | process | where | " + " | ".join(CATEGORIES) + " | total |"
        lines += [header, "|" + "---|" * (len(CATEGORIES) + 4)]
        for mode, procs in self.modes.items():
            for p in procs:
                name = p.name if p.count == 1 else f"{p.name} x{p.count}"
                for where, parts, total in (
                    ("device", p.device, p.device_total),
                    ("host", p.host, p.host_total),
                ):
                    cells = [format_bytes(parts.get(c, 0)) for c in CATEGORIES]
                    lines.append(
                        f"| {mode} | {name} | {where} | "
                        + " | ".join(cells)
                        + f" | {format_bytes(total)} |"
                    )
        lines.append("")
        usable_d = self.device_memory * (1 - self.margin)
        usable_h = self.host_memory * (1 - self.margin)
        for mode in self.modes:
            d, h = self.need(mode)
            verdict = "fits" if self.fits[mode] else "does not fit"
            lines.append(
                f"- {mode}: {verdict}: device {format_bytes(d)} of {format_bytes(usable_d)}, "
                f"host {format_bytes(h)} of {format_bytes(usable_h)}"
            )
        if self.moved_per_generation:
            lines.append(
                f"- streaming moves at most {format_bytes(self.moved_per_generation)} to the "
                "device per generation (all actors), about "
                f"{format_bytes(self.moved_estimate)} for EvoPress children of one parent"
            )
        if self.parent_disk_bytes:
            lines.append(self._page_cache_line())
        lines.append(f"- chosen: **{self.mode or 'nothing fits'}**")
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def _page_cache_line(self) -> str:
        """Disk reads per generation with the parent cached, and whether the host memory
        the plan leaves free holds it."""
        cache = self.parent_disk_bytes + self.disk_per_generation
        free = self.host_memory * (1 - self.margin) - self.need("streaming")[1]
        held = (
            f"the {format_bytes(max(free, 0))} of host memory the plan leaves free holds it"
            if free >= cache
            else f"the {format_bytes(max(free, 0))} the plan leaves free does not hold it: each "
            f"query reads the parent from disk again"
        )
        return (
            f"- page cache (streaming): every query reads the parent's "
            f"{format_bytes(self.parent_disk_bytes)} (one level of every unit); with it and "
            f"the children's differences cached ({format_bytes(cache)}), a generation reads at "
            f"most {format_bytes(self.disk_per_generation)} from disk (its children's "
            f"differing units); {held}"
        )

    def __str__(self) -> str:
        return self.table()


def _need(procs: Sequence[ProcessMemory], device_kind: str) -> tuple[int, int]:
    """(device bytes of the largest process, host bytes of all processes together); on a
    CPU device the device is the host, so device bytes count against the host too."""
    device = max(p.device_total for p in procs)
    host = sum(p.count * p.host_total for p in procs)
    if device_kind == "cpu":
        host += sum(p.count * p.device_total for p in procs)
    return device, host


UNIT_STREAMING: Final[str] = "streaming-unit"
"""The plan's mode name of unit streaming (``execution: streaming``, ``stream_unit: unit``)."""


def _allowed(modes: Sequence[str], execution: str, stream_unit: str) -> list[str]:
    """The modes ``execution`` (``auto``: all; ``streaming``: block and unit streaming)
    and ``stream_unit`` (``block``, ``unit``, ``auto``: both) accept, in order."""
    unwanted = {"block": UNIT_STREAMING, "unit": "streaming"}.get(stream_unit)
    out = [m for m in modes if execution == "auto" or m == execution or m.startswith(execution)]
    return [m for m in out if m != unwanted]
