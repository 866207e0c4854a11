"""Sizes, parsing and the errors of the memory plan: bytes, config.json, this machine's memory."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from allocsearch.config import EXECUTIONS

if TYPE_CHECKING:
    from allocsearch.plan.report import MemoryPlan

EXECUTION_MODES: Final[tuple[str, ...]] = EXECUTIONS  # one list, the config's
"""``auto`` picks resident when it fits the device with the margin, else streaming."""
DEFAULT_MARGIN: Final[float] = 0.10
"""Fraction of the device (and host) memory left free for what the plan does not count
(XLA's compiled programs and scratch, the CUDA context, fragmentation)."""
GIB: Final[int] = 2**30
# Evaluator defaults (allocsearch.evaluate.evaluator.Evaluator), used when the config has
# no such keys.
_MICRO_BATCH_TOKENS: Final[int] = 8192
_CANDIDATES_PER_CALL: Final[int] = 1
_MAX_REFERENCE_BYTES: Final[int] = 2**30
# Fidelity the table strategies (dp, knapsack) score their error table at (pipeline).
_TABLE_TOKENS: Final[int] = 4096
_BUILD_BATCH: Final[int] = 16  # pipeline.BUILD_BATCH
_ITEMSIZE: Final[dict[str, int]] = {"float32": 4, "bfloat16": 2}
_DECIMAL = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_BINARY = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class MemoryPlanError(ValueError):
    """The run does not fit: the message names the bytes needed and available (GiB) and
    the changes that would fit; ``plan`` is the :class:`MemoryPlan` that did not fit and
    ``remedies`` the :class:`Remedy` list the message names."""

    def __init__(
        self, message: str, plan: MemoryPlan | None = None, remedies: Sequence[Remedy] = ()
    ):
        super().__init__(message)
        self.plan = plan
        self.remedies = tuple(remedies)


@dataclass(frozen=True)
class Remedy:
    """One single change after which the plan fits, as a user makes it.

    Attributes:
      what: what changes, e.g. ``"fewer levels: 7"``.
      config: the config keys that make it (dotted key -> value, e.g.
        ``{"supernet.steps_each_side": 3}``).
      options: the command-line options that make it (e.g. ``("--steps-each-side", "3")``),
        the same on ``plan`` and the commands that run; empty where only the config can.
    """

    what: str
    config: Mapping[str, Any]
    options: tuple[str, ...] = ()

    def __str__(self) -> str:
        keys = " with ".join(f"{k}: {v}" for k, v in self.config.items())
        cli = f" or {' '.join(self.options)}" if self.options else ""
        return f"{self.what} ({keys}{cli})"


# --------------------------------------------------------------------------- parsing


def parse_bytes(text: str | int | float) -> int:
    """Bytes from ``"80GB"`` (10^9), ``"80GiB"`` (2^30), ``"512MB"``, ``"141e9"`` or a number.

    Raises:
      ValueError: not a positive size (the message lists the units understood).
    """
    if isinstance(text, int | float) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if m is None:
            value, unit = -1.0, ""
        else:
            value, unit = float(m.group(1)), m.group(2).lower()
    scale = _DECIMAL.get(unit, _BINARY.get(unit))
    if scale is None or not value > 0 or not math.isfinite(value):
        raise ValueError(
            f"memory size {text!r} is not valid; use a positive number of bytes with an "
            f"optional unit: B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB "
            f"(powers of 1024), e.g. '80GB', '80GiB' or '141e9'"
        )
    return int(value * scale)


def format_bytes(n: float) -> str:
    """``n`` bytes in GiB with two decimals (``"12.34 GiB"``), MiB below 1 GiB."""
    if abs(n) < GIB:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / GIB:.2f} GiB"


def load_hf_config(model: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` dict of ``model``: ``"demo"``, a model directory (weights are
    not needed: a directory holding only config.json is enough), or a config.json path.

    Raises:
      FileNotFoundError: no config.json there. ValueError: not valid JSON.
    """
    from allocsearch.assets_paths import resolve_model_path

    path = resolve_model_path(str(model))
    file = path if path.is_file() else path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json for model {str(model)!r} (looked at {file})")
    try:
        data = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: config.json must hold a JSON object")
    return data


# --------------------------------------------------------------------------- memory


def _meminfo_available() -> int | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    m = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


def _cgroup_room() -> int | None:
    """Bytes this cgroup (v2) may still allocate, or None without a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def detect_memory() -> tuple[str, int, int]:
    """``(device kind, device bytes, host bytes)`` of this machine.

    The host: ``MemAvailable`` of /proc/meminfo (bounded by a cgroup limit), else the
    physical memory. The device: JAX's first device; on CPU it is the host (kind
    ``"cpu"``, the same bytes), on a GPU its allocator's ``bytes_limit``.
    """
    host = _meminfo_available()
    if host is None:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    room = _cgroup_room()
    if room is not None:
        host = min(host, room)
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        return "cpu", int(host), int(host)
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    if not limit:
        raise ValueError(
            f"cannot read the memory of {device.device_kind} ({device.platform}); pass "
            "--device-memory"
        )
    return device.platform, int(limit), int(host)
