"""The memory plan: what a run needs, per process, from the model's ``config.json`` alone.

:func:`plan_memory` sizes a run before anything is loaded: from a Hugging Face
``config.json`` (no weights), a :class:`~allocsearch.config.RunConfig` (grid, pruner,
storage dtype, tokens, metric, strategy settings, workers) and the memory of the device
and the host (detected, or given), it computes the bytes each process holds, broken down
into model, supernet variants, teacher data, activations (and hidden states) and reference
states, for both execution modes:

* **resident** (:class:`~allocsearch.evaluate.evaluator.Evaluator`): every variant of every
  unit lives on the device, stacked per parameter role;
* **streaming** (:class:`~allocsearch.evaluate.streaming.StreamingEvaluator`): per
  block, only the levels a query's candidates use come to the device, with the next
  block prefetched (two blocks in flight); the hidden states of all of a query's
  candidates advance together; teacher data stays on the host.

It chooses resident when that fits the device with a margin, else streaming, else it
raises :class:`MemoryPlanError` with one line naming the shortfall and the changes that
would fit. It also gives the store's size on disk and, for streaming, the bytes moved to
the device per search generation.

Notation used in the formulas below (all sizes in bytes):

* ``a``: itemsize of the run's parameter dtype (``RunConfig.dtype``: 4 float32, 2 bf16);
  ``s``: itemsize of dense variants in the store (``storage_dtype``, ``"auto"`` = the
  model's dtype); variants are never upcast on load (store format 2).
* ``N_p``: weights of parameter ``p``; ``K_u``: valid levels of unit ``u`` (from the
  grid :func:`~allocsearch.supernet.factory.make_grid` builds, so small layers may have fewer).
* ``B``: blocks (assumed identical: a one-block copy of the config is planned and
  multiplied, which keeps a 70B plan to seconds); ``D`` hidden, ``F`` MLP width,
  ``H``/``H_kv`` query/kv heads, ``V`` vocabulary, ``T`` sequence length; ``R``
  sequences per call (``micro_batch_tokens // T``, at most the calibration set).
* teacher bytes per calibration token: ``4 V`` (kl: float32 log-probabilities), ``8 k``
  (topk_kl: float32 values + int32 ids), 0 (nll).
* mixtures of experts (:mod:`allocsearch.models.moe`): every expert's weights are block
  parameters and every expert's linears are units (one per block and projection with
  ``supernet.tie_experts``), so model, variants, store and streamed bytes count all experts,
  the router and the shared expert like any other parameter; ``F`` is one expert's width,
  and a block's MLP working set is the routed experts' as
  :func:`~allocsearch.models.moe_dispatch.expert_work_bytes` gives it for the dispatch the
  block uses on a call's tokens (sorted dispatch: the stacked expert weights and padded rows;
  captures in ``build``: all experts, their input taps and Gram matrices).

Resident evaluator, per process (these follow ``evaluator.py``; the plan is checked
against measured peaks by ``scripts/bench_plan.py``):

* model: the loaded parameters ``a sum_p N_p`` (the model stays referenced) plus the
  evaluator's stacked copies of every parameter that is not a stacked dense-variant
  role (norms, embeddings, head, and the dense weights under nested masks);
* variants: their stacks, the one device copy (nested: an int32 rank, ``4 N_p``, and the
  prune counts; dense: ``a K_u N_p``): the evaluator reads the store's memory-mapped
  variants one parameter at a time into them (the store's pages are page cache);
* teacher: teacher bytes per token x calibration tokens;
* reference: ``(B + 1) x fidelity x D x a`` for the largest fidelity whose states fit
  the evaluator's ``max_reference_bytes`` (1 GiB), as the evaluator caches them;
* activations: one scoring call (``candidates_per_call`` candidates of ``R``
  sequences: per candidate the gathered weights of a block ``a sum_block N_p``, the
  hidden carry ``2 R T D a``, and the larger of attention ``R H T^2 (8 + a) +
  R T (H + 2 H_kv) head_dim 2a`` / MLP ``3 R T F a`` (plus ``R T D (4 + a)``) and
  logits ``R T V (a + 8)``; and the call's teacher rows) or the construction (the
  dense copy the teacher forward uses ``a sum_p N_p``, the teacher data, one call),
  whichever is larger; on a CPU device their sum (glibc keeps freed buffers, measured),
  and with a bfloat16 model a float32 copy of the block stacks per call (XLA's CPU
  backend computes bf16 in float32); on a GPU the largest stack is assembled on the
  host first (host memory).

Streaming evaluator (:mod:`allocsearch.evaluate.streaming`), per process:

* model: the parameters outside the blocks (embeddings, head, final norm) on the
  device for the evaluator's lifetime, and two blocks' parameters that no unit owns;
* variants: a block's stacks hold ``min(n + 1, K_u)`` level slots per unit in the
  storage dtype (nested variants: the model's; ``n`` candidates and the reference riding
  along; a candidate's slot is cast to the model's dtype when it is used, counted with
  the activations), two blocks of them (this one, and the next, prefetched); on an
  accelerator also the next block's moved levels, at most ``P_u = min(n, K_u)`` per unit
  (``n`` the most candidates one actor scores in one query; unused slots repeat a moved
  level on the device), and the same moved levels twice in host staging buffers; on a
  CPU device the levels are read straight into the stacks' aligned host buffers, which
  the device aliases, so neither (the store's memory-mapped pages live in the shared
  page cache, not in any process);
* activations / hidden states: ``n x fidelity x D x a`` (the states of all of a
  query's candidates stay on the device between blocks) plus one call's working set
  (``candidates_per_call`` candidates of one micro-batch, as resident); on a CPU device
  at least the construction's (the teacher's streamed forward, freed before any query);
* teacher: on the host (all calibration tokens); the query's rows on the device;
* reference: as resident, on the device (the streaming evaluator keeps it there up to
  1 GiB).

Bytes moved per generation (streaming): for every query of a generation, every block
moves ``sum_u P_u`` levels of each unit; EvoPress asks ``offspring`` candidates at
``tokens[0]``, then ``survivors[i-1]`` (``+ 1`` re-scored parent in the last stage) at
``tokens[i]``. This is an upper bound: a query moves only the distinct levels its
candidates use (an EvoPress child differs from its parent in a few units).

Page cache (streaming EvoPress): every query reads the parent's variants (one level of
every unit, nested units' rank files, the block weights no unit owns) through the page
cache; with them cached, a generation reads from disk at most its children's differing
units (``offspring x 2 max_switches`` units at the mean unit level, nested units nothing
new). The table states both and whether the host memory the plan leaves free holds them.

When nothing fits, the refusal names single changes that fit (:class:`Remedy`: the config
keys and command-line options that make each), found by re-planning with each.

The driver keeps the model memory-mapped on the host (``load_workspace`` loads it
lazily) and the search state while the actors score, the final held-out perplexity
included (on an actor): it needs no device memory. With ``backend.kind = "local"`` the
driver is the evaluator.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from allocsearch.config import AUTO_WORKERS, EXECUTIONS, RunConfig, with_model_defaults
from allocsearch.search import registry

__all__ = [
    "EXECUTION_MODES",
    "MemoryPlan",
    "MemoryPlanError",
    "ProcessMemory",
    "Remedy",
    "check_run",
    "detect_memory",
    "execution_for",
    "format_bytes",
    "load_hf_config",
    "parse_bytes",
    "plan_memory",
]

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


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class _Model:
    """What the formulas need of a model, from its config.json.

    Blocks are assumed identical (true of every supported family), so the adapter is
    built for one block: building it for all blocks traces every layer's initialiser and
    takes tens of seconds for a 70B config.
    """

    blocks: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    causal: bool
    outer_params: int  # weights outside the blocks (embeddings, head, final norm)
    block_params: dict[str, int]  # relative name -> weights, one block
    # mixture of experts (0: a dense MLP): routed experts, top-k, shared expert width, and
    # the adapter's dispatch setting (``ffn`` is then one expert's width)
    experts: int = 0
    top_k: int = 0
    shared_ffn: int = 0
    dispatch: str = "auto"

    @property
    def total_params(self) -> int:
        return self.outer_params + self.blocks * sum(self.block_params.values())


@dataclass(frozen=True)
class _Param:
    """One stored parameter of a block's supernet: ``kind`` ``"dense"`` (K weight copies)
    or ``"nested"`` (an int32 rank), ``sparsity`` of its K levels, ``groups``
    (structured primaries: ``group_keep`` bool[K, G]), ``per_row`` (int32[K, out] counts)."""

    name: str  # relative to the block
    shape: tuple[int, int]
    kind: str
    sparsity: tuple[float, ...]
    per_row: bool = False
    groups: int = 0

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def levels(self) -> int:
        return len(self.sparsity)


@dataclass(frozen=True)
class _Layout:
    """One block's supernet (every block has the same): its stored parameters and, per
    unit, the indices of its parameters and its number of levels."""

    params: tuple[_Param, ...]
    unit_params: tuple[tuple[int, ...], ...]
    unit_levels: tuple[int, ...]

    def unit_bytes(self, u: int, itemsize: int) -> int:
        """One level of unit ``u`` as weights of ``itemsize`` bytes."""
        return itemsize * sum(self.params[i].numel for i in self.unit_params[u])

    def moved_bytes(self, n: int, s: int, a: int) -> int:
        """The levels one block moves for ``n`` candidates, at most ``min(n, K_u)`` per
        unit: dense variants in the storage dtype (``s``), nested ones in the model's."""
        return sum(
            min(n, k)
            * sum(
                (s if self.params[i].kind == "dense" else a) * self.params[i].numel
                for i in self.unit_params[u]
            )
            for u, k in enumerate(self.unit_levels)
        )


_LAYER_KEYS: Final[tuple[str, ...]] = ("num_hidden_layers", "n_layer")


def _one_block(hf_config: Mapping[str, Any]) -> tuple[Any, int]:
    """(the family adapter of a one-block copy of the config, the real block count)."""
    key = next((k for k in _LAYER_KEYS if k in hf_config), None)
    if key is None:
        adapter = _adapter(json.dumps(dict(hf_config), sort_keys=True))
        return adapter, adapter.num_blocks
    blocks = int(hf_config[key])
    if blocks < 1:
        raise ValueError(f"config.json has {key} = {blocks}; a model needs >= 1 block")
    return _adapter(json.dumps({**hf_config, key: 1}, sort_keys=True)), blocks


@functools.lru_cache(maxsize=8)
def _adapter(config_json: str) -> Any:
    """Adapters by config (building one traces its initialisers: the plan's slowest step,
    and a refusal re-plans several times)."""
    from allocsearch.models.hf import adapter_for_config

    return adapter_for_config(json.loads(config_json))


def _model(adapter: Any, blocks: int) -> _Model:
    from allocsearch.supernet.build import structured_layouts

    try:
        heads, mlp = structured_layouts(adapter)
        dims = (heads.hidden_size, mlp.intermediate_size, heads.num_heads)
        dims += (heads.num_kv_heads, heads.head_dim)
    except ValueError:  # a family without a structured layout: its config.json's names
        c = adapter.hf_config
        hidden, n_heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        dims = (hidden, int(c["intermediate_size"]), n_heads)
        dims += (int(c.get("num_key_value_heads") or n_heads),)
        dims += (int(c.get("head_dim") or hidden // n_heads),)
    moe = getattr(adapter, "moe", None)  # MoEAdapter: experts, router, shared expert
    if moe is not None:
        dims = (dims[0], moe.expert_size, *dims[2:])
    prefix = adapter.block_prefix(0)
    shapes = adapter.param_shapes
    block = {n[len(prefix) :]: math.prod(s) for n, s in shapes.items() if n.startswith(prefix)}
    outer = sum(math.prod(s) for n, s in shapes.items() if not n.startswith(prefix))
    return _Model(
        experts=moe.num_experts if moe else 0,
        top_k=moe.top_k if moe else 0,
        shared_ffn=moe.shared_expert_size if moe else 0,
        dispatch=getattr(adapter, "dispatch", "auto"),
        blocks=blocks,
        hidden=dims[0],
        ffn=dims[1],
        heads=dims[2],
        kv_heads=dims[3],
        head_dim=dims[4],
        vocab=int(adapter.hf_config.get("vocab_size") or 0),
        causal=bool(adapter.is_causal_lm),
        outer_params=outer,
        block_params=block,
    )


def _layout(adapter: Any, cfg: RunConfig) -> _Layout:
    """The units, levels and stored parameters of one block of the supernet
    ``cfg.supernet`` describes (the grid ``factory.make_grid`` builds, on the one-block
    adapter: every grid kind gives a unit levels from its own size and the mean unit
    size, which repeating identical blocks does not change)."""
    from allocsearch.models.hf import HFModel
    from allocsearch.pruners import WandaPruner
    from allocsearch.supernet import factory
    from allocsearch.supernet.build import _plans

    sc = cfg.supernet
    grid = factory.make_grid(sc, HFModel(adapter, {}), target=sc.center)
    plans = _plans(
        adapter,
        sc.structure,
        query_heads=factory.query_heads(sc),
        tie_experts=sc.tie_experts,
        expert_removal=sc.expert_removal,
        prune_router=sc.prune_router,
    )
    pruner = factory.make_pruner(sc)
    structured = sc.structure == "heads_neurons"
    nested = False if structured else bool(pruner.nested)
    per_row = nested and (isinstance(pruner, WandaPruner) or "Wanda" in type(pruner).__name__)
    prefix = adapter.block_prefix(0)
    params: list[_Param] = []
    unit_params, unit_levels = [], []
    sparsity, valid = np.asarray(grid.sparsity), np.asarray(grid.valid)
    for u, plan in enumerate(plans):
        levels = tuple(float(x) for x in sparsity[u][valid[u]])
        idx = []
        for layer in plan.layers:
            primary = layer is plan.primary
            if structured:
                kind, groups, row = (
                    ("dense", plan.layout.num_groups, False)
                    if primary
                    else (
                        "nested",
                        0,
                        False,
                    )
                )
            else:
                kind, groups, row = ("nested" if nested else "dense"), 0, per_row
            idx.append(len(params))
            rel = layer.weight_name[len(prefix) :]
            params.append(_Param(rel, tuple(layer.shape), kind, levels, row, groups))
        unit_params.append(tuple(idx))
        unit_levels.append(len(levels))
    return _Layout(tuple(params), tuple(unit_params), tuple(unit_levels))


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
        procs = self.modes[mode]
        device = max(p.device_total for p in procs)
        host = sum(p.count * p.host_total for p in procs)
        if self.device_kind == "cpu":
            host += sum(p.count * p.device_total for p in procs)
        return device, host

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


def _layout_from_store(path: str | os.PathLike, adapter: Any) -> tuple[_Layout, str, int]:
    """(one block's layout, the dense variants' storage dtype, the variant files' bytes) of
    an existing store, from its ``manifest.json`` alone (block 0's units stand for every
    block's)."""
    from allocsearch.supernet.store import MANIFEST_NAME, StoreError

    file = Path(path) / MANIFEST_NAME
    try:
        manifest = json.loads(file.read_text())
        spec, variants = manifest["spec"], manifest["variants"]
        unit_params = manifest["unit_params"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise StoreError(f"{path}: no readable supernet manifest ({e})") from None
    prefix = adapter.block_prefix(0)
    shapes = adapter.param_shapes
    params: list[_Param] = []
    units, levels = [], []
    dtype = str(manifest.get("storage_dtype") or "float32")
    for u, unit in enumerate(spec["units"]):
        if int(unit["block"]) != 0:
            continue
        row = zip(spec["sparsity"][u], spec["valid"][u], strict=True)
        sparsity = tuple(float(x) for x, ok in row if ok)
        idx = []
        for name in unit_params[u]:
            entry = variants[name]
            shape = tuple(entry.get("shape") or shapes[name])
            if entry["kind"] == "dense":
                dtype = str(entry.get("dtype") or dtype)
            idx.append(len(params))
            per_row = bool(entry.get("per_row", False))
            params.append(_Param(name[len(prefix) :], shape, entry["kind"], sparsity, per_row))
        units.append(tuple(idx))
        levels.append(len(sparsity))
    if not units:
        raise StoreError(f"{path}: the manifest has no units in block 0 of this model")
    total = sum(int(e["bytes"]) for e in variants.values())
    return _Layout(tuple(params), tuple(units), tuple(levels)), dtype, total


def refuse_foreign_store(
    path: str | os.PathLike, model: str | os.PathLike, hf_config: Mapping[str, Any]
) -> None:
    """Raise :class:`~allocsearch.supernet.store.StoreError` when the store at ``path`` was
    built from another model than ``model`` (a directory, ``"demo"``, or a config.json
    path; ``hf_config`` its config), naming both: other weights (fingerprints differ) when
    the directory holds weights, else (config.json alone) another model type, block count
    or block 0 parameter shape than the store's manifest records."""
    from allocsearch.assets_paths import resolve_model_path
    from allocsearch.models.hf import directory_fingerprint
    from allocsearch.supernet.store import MANIFEST_NAME, StoreError

    try:
        manifest = json.loads((Path(path) / MANIFEST_NAME).read_text())
        built, source = manifest["model_fingerprint"], manifest["model"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise StoreError(f"{path}: no readable supernet manifest ({e})") from None
    origin = f"the model {source.get('path')!r}" if source.get("path") else "another model"
    head = f"the supernet {str(path)!r} was built from {origin} (fingerprint {built!r})"
    where = resolve_model_path(str(model))
    fingerprint = None if where.is_file() else directory_fingerprint(where, hf_config)
    if fingerprint is not None:
        if fingerprint != built:
            raise StoreError(
                f"{head}, not from the model {str(model)!r} (fingerprint {fingerprint!r}: "
                f"other weights); plan with --model {source.get('path')} or the store built "
                f"for this model"
            )
        return
    adapter, blocks = _one_block(hf_config)
    ours = (hf_config.get("model_type"), blocks)
    theirs = (source.get("model_type"), source.get("num_blocks"))
    shapes = adapter.param_shapes
    odd = [
        name
        for name, entry in manifest.get("variants", {}).items()
        if name.startswith(adapter.block_prefix(0))
        and ("shape" in entry and tuple(shapes.get(name, ())) != tuple(entry["shape"]))
    ]
    if ours != theirs or odd:
        what = f"parameter {odd[0]!r} has another shape" if odd else "another architecture"
        raise StoreError(
            f"{head}, not from the model {str(model)!r} ({ours[0]}, {ours[1]} blocks; "
            f"config.json alone, no weights to fingerprint; the store's model: {theirs[0]}, "
            f"{theirs[1]} blocks; {what}); plan with --model {source.get('path')} or the "
            f"store built for this model"
        )


# --------------------------------------------------------------------------- settings


def _evaluator_setting(cfg: RunConfig, key: str, default: int) -> int:
    value = getattr(cfg.evaluator, key, None)
    return int(value) if value is not None else default


def _teacher_per_token(cfg: RunConfig, m: _Model) -> int:
    metric = cfg.evaluator.metric
    if metric == "kl":
        return 4 * m.vocab
    if metric == "topk_kl":
        return 8 * int(cfg.evaluator.topk or 0)
    return 0


def _queries(
    cfg: RunConfig, command: str, n_cal_tokens: int, layout: _Layout, blocks: int
) -> list[tuple[int, int]]:
    """(candidates, tokens) of every query of one generation (EvoPress), or of the table
    strategies' probe query (the all-lowest allocation and one candidate per other level
    of each unit); ``compare`` adds its one-candidate scoring on the whole calibration
    set."""
    from allocsearch.search.evolutionary import EvolutionarySearcher

    strategy = cfg.search.strategy
    entry = registry.get(strategy)
    settings = dict(cfg.search.settings or {})
    out: list[tuple[int, int]] = []
    if entry.kind in ("evolutionary", "driver"):
        s = settings or dict(registry.DEMO_EVOPRESS)  # search_run._default_settings
        offspring = int(s.get("offspring", EvolutionarySearcher.offspring))
        survivors = [int(x) for x in s.get("survivors", EvolutionarySearcher.survivors)]
        tokens = [int(x) for x in s.get("tokens", EvolutionarySearcher.tokens)]
        for i, t in enumerate(tokens):
            if i == 0:
                n = offspring
            else:
                n = survivors[i - 1] + (1 if i == len(tokens) - 1 else 0)
            out.append((n, min(t, n_cal_tokens)))
        final = int(s.get("final_parents", registry.SEEDED_FINAL_PARENTS if entry.seeded_by else 0))
        if final:  # the final pick: the start and the last parents
            t = int(s.get("final_tokens") or registry.FINAL_TOKENS)
            out.append((final + 1, min(t, n_cal_tokens)))
    if entry.kind == "table" or entry.seeded_by is not None:  # dp+evopress: its table too
        key = "tokens" if entry.kind == "table" else "table_tokens"
        tokens = int(settings.get(key, min(_TABLE_TOKENS, n_cal_tokens)))
        out.append((1 + blocks * sum(k - 1 for k in layout.unit_levels), tokens))
    if command == "compare" or not out:
        out.append((1, n_cal_tokens))
    return out


def _block_activation(m: _Model, rows: int, seq: int, a: int, *, capture: bool = False) -> int:
    """Working set of one block's forward on ``rows`` sequences of ``seq`` tokens: the
    larger of attention (float32 scores and softmax, probabilities in ``a``, q/k/v and
    their rotations) and the MLP (gate, up, product), plus the normalised input (float32)
    and the residual. A MoE block's MLP: the routed experts' working set as
    :func:`~allocsearch.models.moe_dispatch.expert_work_bytes` gives it for the method the
    block uses on these tokens, plus the shared expert's ``3 N F_s``; with ``capture``
    (build) the all-experts path and every expert's input taps, ``N (E (D + F) + D + F_s)``."""
    tokens = rows * seq
    attn = rows * m.heads * seq * seq * (8 + a)
    attn += tokens * (m.heads + 2 * m.kv_heads) * m.head_dim * a * 2
    mlp = 3 * tokens * m.ffn * a
    if m.experts:
        from allocsearch.models.moe_dispatch import expert_work_bytes

        mlp = expert_work_bytes(
            num_tokens=tokens,
            top_k=m.top_k,
            num_experts=m.experts,
            hidden=m.hidden,
            ffn=m.ffn,
            itemsize=a,
            method="dense" if capture else m.dispatch,
        )
        mlp += 3 * tokens * m.shared_ffn * a
        if capture:
            shared_taps = m.hidden + m.shared_ffn if m.shared_ffn else 0
            mlp += a * tokens * (m.experts * (m.hidden + m.ffn) + shared_taps)
    return max(attn, mlp) + tokens * m.hidden * (4 + a)


def _moe_setting(m: _Model, tokens: int) -> dict[str, str]:
    """The table's row for a mixture of experts (none for a dense MLP): experts, their
    share of the parameters, and how a scoring call of ``tokens`` tokens computes them."""
    if not m.experts:
        return {}
    from allocsearch.models.moe_dispatch import dispatch_method, dispatch_rows, dispatch_tile

    experts = sum(n for name, n in m.block_params.items() if ".experts." in name)
    method = dispatch_method(m.dispatch, num_tokens=tokens, top_k=m.top_k, num_experts=m.experts)
    how = "all experts on every token"
    if method == "sorted":
        rows = dispatch_rows(tokens, m.top_k, m.experts, dispatch_tile(tokens, m.top_k, m.experts))
        how = f"sorted dispatch, {rows / tokens:.2f} expert rows per token"
    shared = f", shared expert {m.shared_ffn}" if m.shared_ffn else ""
    return {
        "experts": f"{m.experts} per block, top-{m.top_k}, width {m.ffn}{shared}; "
        f"{m.blocks * experts / m.total_params:.0%} of the parameters; scoring: {how}"
    }


def _finish_activation(m: _Model, rows: int, seq: int, a: int) -> int:
    """Logits (``a``), their float32 log-softmax and one float32 temporary."""
    width = m.vocab if m.causal else m.hidden
    return rows * seq * width * (a + 8)


def _reference(m: _Model, a: int, queries: Sequence[tuple[int, int]]) -> int:
    """The evaluator's cached reference states, ``(B + 1) x tokens x D x a``, for the
    largest query whose states stay within ``max_reference_bytes`` (larger ones skip
    reuse)."""
    sizes = [(m.blocks + 1) * t * m.hidden * a for _, t in queries]
    return max([x for x in sizes if x <= _MAX_REFERENCE_BYTES], default=0)


def _resident(
    m: _Model,
    layout: _Layout,
    *,
    a: int,
    s: int,
    cfg: RunConfig,
    queries: Sequence[tuple[int, int]],
    mb: int,
    g: int,
    device_is_host: bool,
) -> tuple[dict[str, int], dict[str, int]]:
    """(device, host) bytes of one resident evaluator (see the module docstring)."""
    seq = cfg.data.seq_len
    n_cal = cfg.data.n_calibration_seqs * seq
    B = m.blocks
    stacked = B * sum(p.numel for p in layout.params if p.kind == "dense")
    variants = 0
    largest_stack = 0  # one parameter role's stack, assembled on the host
    for p in layout.params:
        if p.kind == "dense":
            variants += B * p.levels * p.numel * a  # the stacks only (one device copy)
            stack = B * p.levels * p.numel * a
        else:
            counts = 4 * p.levels * (p.shape[0] if p.per_row else 1)
            variants += B * (4 * p.numel + counts)
            stack = B * (4 + a) * p.numel
        largest_stack = max(largest_stack, stack)
    teacher = _teacher_per_token(cfg, m) * n_cal
    rows = max(1, min(mb // seq, cfg.data.n_calibration_seqs))  # sequences per call
    per_candidate = (
        a * sum(m.block_params.values())  # the block's weights gathered for the candidate
        + 2 * rows * seq * m.hidden * a  # hidden carry in and out
        + max(_block_activation(m, rows, seq, a), _finish_activation(m, rows, seq, a))
    )
    scoring = g * per_candidate + _teacher_per_token(cfg, m) * rows * seq
    if device_is_host and a == 2:
        # XLA's CPU backend computes bfloat16 in float32 and hoists the conversion of the
        # loop-invariant stacks out of the block loop: a float32 copy of every block
        # stack per call (measured on the 150M bf16 model of scripts/bench_plan.py)
        dense_levels = sum(p.levels * p.numel for p in layout.params if p.kind == "dense")
        stacked_elems = B * (dense_levels + sum(m.block_params.values())) - stacked
        scoring += 4 * stacked_elems
    reference = _reference(m, a, queries)
    # construction: the dense copy for the teacher forward, the teacher data, one
    # micro-batch's forward (a second copy of the teacher data while its chunks are
    # concatenated is within this).
    construction = a * m.total_params + teacher + per_candidate
    if device_is_host:
        # On a CPU device, buffers are malloc'ed; glibc keeps freed buffers below its mmap
        # threshold (at most 32 MiB) in the heap, so the construction's temporaries stay in
        # the process's resident memory beside the scoring's (measured by
        # scripts/bench_plan.py: taking the larger of the two instead underestimates the
        # peak by about 20%).
        activations = construction + scoring
    else:
        activations = max(scoring + reference, construction) - reference
    device = {
        "model": a * (2 * m.total_params - stacked),
        "variants": variants,
        "teacher": teacher,
        "activations": activations,
        "reference": reference,
    }
    # stacks are assembled on the host, one parameter role at a time
    host = {} if device_is_host else {"variants": largest_stack}
    return device, host


def _streaming(
    m: _Model,
    layout: _Layout,
    *,
    a: int,
    s: int,
    cfg: RunConfig,
    queries: Sequence[tuple[int, int]],
    mb: int,
    g: int,
    workers: int,
    generations: bool,
    device_is_host: bool,
) -> tuple[dict[str, int], dict[str, int], int]:
    """(device, host, bytes moved per generation over all actors) of one streaming
    evaluator (:mod:`allocsearch.evaluate.streaming`; see the module docstring)."""
    seq = cfg.data.seq_len
    n_cal = cfg.data.n_calibration_seqs * seq
    owned = {p.name for p in layout.params}
    unowned = sum(n for name, n in m.block_params.items() if name not in owned)
    per_token = _teacher_per_token(cfg, m)
    rows = max(1, min(mb // seq, cfg.data.n_calibration_seqs))  # sequences per call
    # one call: g candidates of one micro-batch through a block (or the head), each with
    # its slot of every stack gathered; XLA's CPU backend computes bfloat16 in float32:
    # a float32 copy of the gathered weights too, and float32 working sets
    w = 4 if device_is_host and a == 2 else a
    call = g * (
        (a + (w if w != a else 0)) * sum(m.block_params.values())
        + 2 * rows * seq * m.hidden * a
        + max(_block_activation(m, rows, seq, w), _finish_activation(m, rows, seq, w))
    )
    variants = hidden = teacher_rows = moved = host_slabs = 0
    for n, tokens in queries:
        per_actor = -(-n // workers)
        # the distinct levels read and moved for a block (at most min(n, K_u) per unit),
        # in the storage dtype for dense variants, the model's for nested ones
        slabs = layout.moved_bytes(per_actor, s, a)
        # a block's stacks hold P_u = min(members, K_u) level slots per unit in the same
        # dtypes (members: the query's candidates and the reference riding along)
        stacks = layout.moved_bytes(per_actor + 1, s, a)
        if device_is_host:
            # levels read straight into aligned host buffers that device_put aliases:
            # this block's and the next one's (prefetch); unused slots are never touched
            variants = max(variants, 2 * stacks)
        else:
            # this block's stacks in use, the next block's stacks and its moved slabs
            # (unused slots repeat a moved level on the device), staged twice on the host
            variants = max(variants, 2 * stacks + slabs)
            host_slabs = max(host_slabs, 2 * slabs)
        hidden = max(hidden, per_actor * tokens * m.hidden * a)
        teacher_rows = max(teacher_rows, tokens // max(workers, 1) * per_token)
        if generations and not (n == 1 and tokens == n_cal and len(queries) > 1):
            moved += min(n, workers) * m.blocks * slabs
    activations = hidden + call
    if device_is_host:
        # on a CPU device the construction's temporaries (the teacher's streamed dense
        # forward: all calibration states, one call, the teacher before it moves to the
        # host) are process memory too; they are freed before any query (a streaming
        # evaluator keeps no stacks from its construction), so the larger of the two
        # (and the dense weights of two blocks, this one and the prefetched next one)
        construction = n_cal * m.hidden * a + call + per_token * n_cal
        construction += 2 * a * sum(m.block_params.values())
        activations = max(activations, construction)
    device = {
        "model": a * (m.outer_params + 2 * unowned),
        "variants": variants,
        "teacher": teacher_rows,
        "activations": activations,
        "reference": _reference(m, a, queries),
    }
    host = {"variants": host_slabs, "teacher": per_token * n_cal}
    return device, host, moved


def _page_cache(
    m: _Model, layout: _Layout, *, s: int, a: int, children: int, switches: int
) -> tuple[int, int]:
    """(bytes every streaming query reads for the parent, bytes a generation's
    ``children`` read beyond them), from disk through the page cache.

    Parent: per block, one level of every dense unit (``s N_p``), every nested unit's
    rank file (``4 N_p`` + counts) and dense weight (``a N_p``, from the model), and the
    block weights no unit owns (``a``). Children: each differs from the parent in at most
    ``2 x switches`` units; a new level of a dense unit is ``s N_p`` more, of a nested
    unit nothing (the cached rank serves every level): ``children x 2 switches`` units
    at the mean over units, at most the dense units' other levels."""
    owned = {p.name for p in layout.params}
    unowned = sum(n for name, n in m.block_params.items() if name not in owned)
    parent, level_bytes, other_levels = a * unowned, [], 0
    for u, idx in enumerate(layout.unit_params):
        new = 0
        for i in idx:
            p = layout.params[i]
            if p.kind == "dense":
                parent += s * p.numel
                new += s * p.numel
            else:
                counts = 4 * p.levels * (p.shape[0] if p.per_row else 1)
                parent += (4 + a) * p.numel + counts
        level_bytes.append(new)
        other_levels += (layout.unit_levels[u] - 1) * new
    units = max(len(level_bytes), 1)  # a block's; the mean unit is every block's
    child = min(children * 2 * switches * sum(level_bytes) // units, m.blocks * other_levels)
    return m.blocks * parent, child


def _store_bytes(m: _Model, layout: _Layout, s: int, store_layout: str) -> int:
    """Bytes of the variant files' tensors (headers, input norms and manifest excluded),
    with the packed layout's sizes from :mod:`allocsearch.supernet.packed`."""
    from allocsearch.supernet import packed

    total = 0
    for p in layout.params:
        k = p.levels
        total += 8 * k  # sparsity float64[K]
        if p.kind == "nested":
            total += 4 * p.numel + 4 * k * (p.shape[0] if p.per_row else 1)
            continue
        shape = (k, *p.shape)
        dense = packed.dense_nbytes(shape, s)
        nnz = sum(round((1.0 - x) * p.numel) for x in p.sparsity)
        pk = packed.packed_nbytes(shape, nnz, s)
        if store_layout == "packed" or (store_layout == "auto" and pk < dense):
            total += pk
        else:
            total += dense
        total += k * p.groups
    return m.blocks * total


# --------------------------------------------------------------------------- entry point


def _resolve_workers(cfg: RunConfig, workers: int | None, device_kind: str) -> int:
    """Actors that score (0 with the local backend: the driver scores)."""
    if workers is not None:
        return int(workers)
    if cfg.backend.kind == "local":
        return 0
    if cfg.backend.workers != AUTO_WORKERS:
        return int(cfg.backend.workers)
    if device_kind != "cpu":
        import jax

        return max(1, len(jax.devices()))
    if hasattr(os, "sched_getaffinity"):  # ray_backend.local_cpu_count, without Ray
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _need(procs: Sequence[ProcessMemory], device_kind: str) -> tuple[int, int]:
    """(device bytes of the largest process, host bytes of all processes together); on a
    CPU device the device is the host, so device bytes count against the host too."""
    device = max(p.device_total for p in procs)
    host = sum(p.count * p.host_total for p in procs)
    if device_kind == "cpu":
        host += sum(p.count * p.device_total for p in procs)
    return device, host


def plan_memory(
    hf_config: Mapping[str, Any],
    cfg: RunConfig,
    *,
    model: str = "",
    command: str = "search",
    device_memory: int | None = None,
    host_memory: int | None = None,
    device_kind: str | None = None,
    workers: int | None = None,
    execution: str = "auto",
    storage_dtype: str | None = None,
    micro_batch_tokens: int | None = None,
    store: str | os.PathLike | None = None,
    margin: float = DEFAULT_MARGIN,
    suggest: bool = True,
) -> MemoryPlan:
    """Plan a run's memory from ``config.json`` and the run config; choose the mode.

    Args:
      hf_config: the model's config.json dict (no weights are read).
      cfg: the run config (supernet, data, search settings, metric, backend).
      model: a label for the table (the model argument).
      command: ``search`` or ``compare`` (a driver and scoring actors), ``build``,
        ``apply`` or ``eval`` (one process that loads the model; no evaluator).
      device_memory, host_memory: bytes available; None: detected (:func:`detect_memory`).
      device_kind: ``"cpu"`` (the device is host memory) or ``"gpu"``; None: detected
        when ``device_memory`` is, else ``"gpu"``.
      workers: scoring actors, each on its own device; None: from ``cfg.backend``
        (``local``: none, the driver scores; ``auto``: one per GPU, or one per CPU core
        on a CPU device).
      execution: ``auto``, ``resident`` or ``streaming``: the mode(s) to accept.
      storage_dtype: ``"float32"``, ``"bfloat16"`` or ``"auto"`` (the model's dtype) for
        dense variants; None: ``cfg.supernet.storage_dtype`` if the config has it, else
        ``"auto"``.
      micro_batch_tokens: None: ``cfg.evaluator.micro_batch_tokens`` if the config has
        it, else the evaluator's default (8192).
      store: an existing supernet store: its manifest gives the levels, variant kinds,
        storage dtype and size on disk instead of ``cfg.supernet`` (nothing else is read).
      margin: fraction of each memory kept free.
      suggest: on failure, re-plan with single changes to name what would fit.

    Returns:
      The plan; ``plan.mode`` is the chosen mode.

    Raises:
      MemoryPlanError: nothing fits (one line: the shortfall, what would fit).
      ValueError: an unknown execution mode or command, a model family without a plan.
    """
    from allocsearch.supernet.store import resolve_storage_dtype

    if execution not in EXECUTION_MODES:
        raise ValueError(f"execution {execution!r} is not valid; choose one of {EXECUTION_MODES}")
    commands = ("search", "compare", "build", "apply", "eval")
    if command not in commands:
        raise ValueError(f"command {command!r} has no plan; valid: {commands}")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin {margin!r} must be in [0, 1)")
    if device_memory is None or host_memory is None:
        kind, dev, host = detect_memory()
        device_kind = device_kind or (kind if device_memory is None else "gpu")
        host_memory = host if host_memory is None else host_memory
        if device_memory is None:  # a CPU device is the host's memory
            device_memory = host_memory if device_kind == "cpu" else dev
    device_kind = device_kind or "gpu"
    adapter, blocks = _one_block(hf_config)
    m = _model(adapter, blocks)
    cfg = with_model_defaults(cfg, encoder=not m.causal)  # data.n_calibration_seqs
    a = _ITEMSIZE[cfg.dtype]
    store_layout = getattr(cfg.supernet, "layout", None) or "auto"
    if store is None:
        layout = _layout(adapter, cfg)
        request = storage_dtype or getattr(cfg.supernet, "storage_dtype", None) or "auto"
        storage = resolve_storage_dtype(request, np.float32 if a == 4 else _bf16())
        store_bytes = None
    else:
        layout, storage, store_bytes = _layout_from_store(store, adapter)
        store_layout = f"as stored in {store}"
    s = _ITEMSIZE[storage]
    seq = cfg.data.seq_len
    n_cal = cfg.data.n_calibration_seqs * seq
    mb = micro_batch_tokens or _evaluator_setting(cfg, "micro_batch_tokens", _MICRO_BATCH_TOKENS)
    g = _evaluator_setting(cfg, "candidates_per_call", _CANDIDATES_PER_CALL)
    nworkers = _resolve_workers(cfg, workers, device_kind)
    queries = _queries(cfg, command, n_cal, layout, blocks)
    generations = registry.get(cfg.search.strategy).kind in ("evolutionary", "driver")
    device_is_host = device_kind == "cpu"

    modes: dict[str, tuple[ProcessMemory, ...]] = {}
    moved = 0
    notes: list[str] = []
    if command in ("search", "compare"):

        def evaluator(mode: str, qs, n_workers: int):
            if mode == "resident":
                dev, host = _resident(
                    m,
                    layout,
                    a=a,
                    s=s,
                    cfg=cfg,
                    queries=qs,
                    mb=mb,
                    g=g,
                    device_is_host=device_is_host,
                )
                return dev, host, 0
            return _streaming(
                m,
                layout,
                a=a,
                s=s,
                cfg=cfg,
                queries=qs,
                mb=mb,
                g=g,
                workers=n_workers,
                generations=generations,
                device_is_host=device_is_host,
            )

        for mode in ("resident", "streaming"):
            dev, host, mv = evaluator(mode, queries, max(nworkers, 1))
            if mode == "streaming":
                moved = mv
            if nworkers == 0:
                modes[mode] = (ProcessMemory("driver", dev, host),)
                continue
            # The driver keeps the model memory-mapped on the host (page cache, shared,
            # not counted) and the search state; the actors score, the final held-out
            # perplexity included, so it needs no device memory of its own.
            fdev = dict.fromkeys(dev, 0)
            fhost = dict.fromkeys(host, 0)
            modes[mode] = (
                ProcessMemory("driver", fdev, fhost),
                ProcessMemory("actor", dev, host, count=nworkers),
            )
        if nworkers == 0:
            notes.append("backend local: the driver process scores (no actors)")
        elif device_kind != "cpu":
            notes.append(
                "each process on its own device; a driver sharing a GPU with an actor "
                "needs the sum of both"
            )
    else:
        modes["resident"] = (_single_process(command, m, layout, a=a, cfg=cfg),)

    def moved_query(n: int) -> int:
        """Bytes one query of ``n`` candidates moves over all actors (every level used)."""
        workers_ = max(nworkers, 1)
        per_actor = -(-n // workers_)
        return min(n, workers_) * blocks * layout.moved_bytes(per_actor, s, a)

    fits = {}
    for mode, procs in modes.items():
        d, h = _need(procs, device_kind)
        fits[mode] = d <= device_memory * (1 - margin) and h <= host_memory * (1 - margin)
    if command not in ("search", "compare"):
        chosen = "resident" if fits["resident"] else None
    elif execution == "auto":
        chosen = next((mode for mode in ("resident", "streaming") if fits[mode]), None)
    else:
        chosen = execution if fits[execution] else None
    levels = sorted(set(layout.unit_levels))
    kinds = sorted({p.kind for p in layout.params})
    topk = f" (k={cfg.evaluator.topk})" if cfg.evaluator.metric == "topk_kl" else ""
    vocab = f" (V={m.vocab})" if cfg.evaluator.metric == "kl" else ""
    settings = {
        "model": f"{m.blocks} blocks, hidden {m.hidden}, MLP {m.ffn}, heads "
        f"{m.heads}/{m.kv_heads}, vocab {m.vocab}, "
        f"{m.total_params / 1e9:.3f} B parameters ({cfg.dtype})",
        **_moe_setting(m, min(mb // seq, cfg.data.n_calibration_seqs) * seq),
        "supernet": (
            "the store's"
            if store is not None
            else f"{cfg.supernet.pruner} {cfg.supernet.structure},"
        )
        + f" {blocks * len(layout.unit_levels)} units x {levels[0]}..{levels[-1]} levels, "
        f"{'/'.join(kinds)} variants, storage {storage}, {store_layout} layout",
        "tokens": f"calibration {n_cal:,} ({cfg.data.n_calibration_seqs} x {seq}), "
        f"micro-batch {mb:,}",
        "queries (candidates x tokens)": ", ".join(f"{n} x {t:,}" for n, t in queries),
        "metric": cfg.evaluator.metric + topk + vocab,
        "candidates per call (resident)": str(g),
        "workers": f"{nworkers} actor(s)" if nworkers else "none (the driver scores)",
    }
    moved_estimate = parent_disk = child_disk = 0
    if generations and moved:
        from allocsearch.search.evolutionary import EvolutionarySearcher

        switches = int(
            dict(cfg.search.settings or {}).get("max_switches", EvolutionarySearcher.max_switches)
        )
        units = blocks * len(layout.unit_levels)
        mean_unit = blocks * layout.moved_bytes(1, s, a) / max(units, 1)
        for n, tokens in queries:
            if n == 1 and tokens == n_cal and len(queries) > 1:
                continue
            per_query = moved_query(n)
            moved_estimate += min(per_query, int((units + 2 * switches * n) * mean_unit))
        parent_disk, child_disk = _page_cache(m, layout, s=s, a=a, children=queries[0][0],
                                              switches=switches)  # fmt: skip
    result = MemoryPlan(
        model=model or str(hf_config.get("model_type")),
        command=command,
        settings=settings,
        device_kind=device_kind,
        device_memory=int(device_memory),
        host_memory=int(host_memory),
        workers=nworkers,
        margin=margin,
        modes=modes,
        fits=fits,
        mode=chosen,
        store_bytes=store_bytes if store is not None else _store_bytes(m, layout, s, store_layout),
        moved_per_generation=moved,
        notes=tuple(notes),
        moved_estimate=moved_estimate,
        parent_disk_bytes=parent_disk,
        disk_per_generation=child_disk,
    )
    if chosen is None:
        overrides = {"storage_dtype": storage, "micro_batch_tokens": mb, "store": store}
        remedies = _what_fits(result, hf_config, cfg, execution, overrides) if suggest else []
        message = _shortfall(result, execution, suggest, remedies)
        raise MemoryPlanError(message, result, remedies)
    return result


def _bf16() -> Any:
    import ml_dtypes

    return ml_dtypes.bfloat16


def _single_process(
    command: str,
    m: _Model,
    layout: _Layout,
    *,
    a: int,
    cfg: RunConfig,
) -> ProcessMemory:
    """The one process of ``build``, ``apply`` or ``eval`` (they load the whole model).

    build: the model, the calibration hidden states at a block boundary (twice: this
    block's and the next's), the float32 Gram matrices of one block's inputs, one unit's
    variants in float32 (twice, as the writer casts them) and a build batch's working
    set. apply: the model twice (the pruned copy) and one unit's variants. eval: the
    model and a batch of 16 held-out sequences' working set.
    """
    seq = cfg.data.seq_len
    model = a * m.total_params
    unit_bytes = 0
    for idx in layout.unit_params:
        unit_bytes = max(
            unit_bytes,
            sum(4 * layout.params[i].levels * layout.params[i].numel for i in idx),
        )
    if command == "build":
        n_cal = cfg.data.n_calibration_seqs * seq
        hidden = 2 * n_cal * m.hidden * a
        gram = 4 * (m.hidden**2 + (m.heads * m.head_dim) ** 2 + m.ffn**2)
        if m.experts:  # each expert's gate and down inputs (and the shared expert's)
            gram += 4 * (m.experts - 1) * (m.hidden**2 + m.ffn**2)
            gram += 4 * (m.hidden**2 + m.shared_ffn**2) if m.shared_ffn else 0
        work = _block_activation(m, _BUILD_BATCH, seq, a, capture=True)
        device = {
            "model": model,
            "variants": 2 * unit_bytes,
            "activations": hidden + gram + work,
        }
    elif command == "apply":
        device = {"model": 2 * model, "variants": unit_bytes}
    else:
        work = _finish_activation(m, 16, seq, a) + _block_activation(m, 16, seq, a)
        device = {"model": model, "activations": work}
    return ProcessMemory(command, device, {})


def _shortfall(plan: MemoryPlan, execution: str, suggest: bool, remedies: Sequence[Remedy]) -> str:
    """One line: what is needed against what is available, and what would fit."""
    tried = [m for m in plan.modes if execution in ("auto", m)] or list(plan.modes)
    best = min(tried, key=lambda m: plan.need(m)[0])
    d, h = plan.need(best)
    usable_d = plan.device_memory * (1 - plan.margin)
    usable_h = plan.host_memory * (1 - plan.margin)
    parts = []
    if plan.device_kind != "cpu" and d > usable_d:
        parts.append(
            f"{format_bytes(d)} of device memory per process, {format_bytes(usable_d)} "
            f"available ({format_bytes(plan.device_memory)} less the {plan.margin:.0%} margin)"
        )
    if h > usable_h:
        where = " (the CPU device included)" if plan.device_kind == "cpu" else ""
        parts.append(
            f"{format_bytes(h)} of host memory{where}, {format_bytes(usable_h)} available "
            f"({format_bytes(plan.host_memory)} less the {plan.margin:.0%} margin)"
        )
    others = [m for m in plan.modes if m != best]
    other = ", ".join(f"{m}: {format_bytes(plan.need(m)[0])} per process" for m in others)
    mode = f"{best} execution" if plan.command in ("search", "compare") else "it"
    head = (
        f"{plan.model} does not fit for `{plan.command}`: {mode} needs "
        + "; ".join(parts or ["more memory than is available"])
        + (f" ({other})" if other else "")
    )
    if not suggest:
        return head
    if not remedies:
        return head + "; no single change fits"
    return head + "; would fit: " + ", ".join(str(r) for r in remedies)


def _what_fits(
    plan: MemoryPlan,
    hf_config: Mapping[str, Any],
    cfg: RunConfig,
    execution: str,
    overrides: Mapping[str, Any],
) -> list[str]:
    """Single changes to the run after which :func:`plan_memory` finds a mode."""
    base: dict[str, Any] = {
        "model": plan.model,
        "command": plan.command,
        "device_memory": plan.device_memory,
        "host_memory": plan.host_memory,
        "device_kind": plan.device_kind,
        "workers": plan.workers,
        "margin": plan.margin,
        "execution": execution,
        "suggest": False,
        **overrides,
    }

    def fits(c: RunConfig, **over: Any) -> bool:
        try:
            plan_memory(hf_config, c, **{**base, **over})
        except MemoryPlanError:
            return False
        return True

    def with_(section: str, **changes: Any) -> RunConfig:
        sub = getattr(cfg, section)
        return dataclasses.replace(cfg, **{section: dataclasses.replace(sub, **changes)})

    out: list[Remedy] = []
    if overrides.get("storage_dtype") == "float32":
        if fits(with_("supernet", storage_dtype="bfloat16"), storage_dtype="bfloat16"):
            key = {"supernet.storage_dtype": "bfloat16"}
            out.append(Remedy("bf16 storage, at build", key, ("--storage-dtype", "bfloat16")))
    if cfg.dtype == "float32" and fits(dataclasses.replace(cfg, dtype="bfloat16")):
        out.append(Remedy("a bfloat16 model", {"dtype": "bfloat16"}))
    if plan.command in ("search", "compare", "build"):
        for steps in range(cfg.supernet.steps_each_side - 1, 0, -1):
            if fits(with_("supernet", steps_each_side=steps)):
                key = {"supernet.steps_each_side": steps}
                what = f"fewer levels: {2 * steps + 1}"
                out.append(Remedy(what, key, ("--steps-each-side", str(steps))))
                break
    if plan.command in ("search", "compare") and cfg.evaluator.metric == "kl":
        if fits(with_("evaluator", metric="topk_kl", topk=1024)):
            keys = {"evaluator.metric": "topk_kl", "evaluator.topk": 1024}
            out.append(Remedy("top-k KL", keys))
    if plan.command in ("search", "compare"):
        out += _runtime_remedies(plan, cfg, execution, overrides, fits, with_)
        if not out and plan.device_kind != "cpu":
            out += _scale_out_remedy(plan, cfg, overrides, fits, with_)
    return out


def _scale_out_remedy(plan, cfg, overrides, fits, with_) -> list[Remedy]:
    """When no single change fits: the fewest workers that fit together with smaller
    micro-batches (more actors split a query's candidates, smaller calls shrink the
    working set); at most one remedy, tried only on a refusal."""
    start = int(overrides.get("micro_batch_tokens") or _MICRO_BATCH_TOKENS)
    for w in (8, 16, 32, 64):
        if w <= max(plan.workers, 1):
            continue
        mb = start
        while mb > cfg.data.seq_len:
            mb = max(mb // 2, cfg.data.seq_len)
            both = with_("backend", kind="ray", workers=w)
            both = dataclasses.replace(
                both, evaluator=dataclasses.replace(both.evaluator, micro_batch_tokens=mb)
            )
            if fits(both, workers=w, micro_batch_tokens=mb):
                keys = {"backend.workers": w, "evaluator.micro_batch_tokens": mb}
                if cfg.backend.kind != "ray":
                    keys = {"backend.kind": "ray", **keys}
                what = f"together, {w} actors (one device each) and {mb}-token micro-batches"
                options = ("--workers", str(w), "--micro-batch-tokens", str(mb))
                return [Remedy(what, keys, options)]
    return []


def _runtime_remedies(plan, cfg, execution, overrides, fits, with_) -> list[Remedy]:
    """The remedies of the scoring run itself: micro-batches, streaming, more workers
    (each re-planned through the config key a user sets, and the argument that
    overrides it)."""
    out = []
    mb = int(overrides.get("micro_batch_tokens") or _MICRO_BATCH_TOKENS)
    while mb > cfg.data.seq_len:
        mb = max(mb // 2, cfg.data.seq_len)
        if fits(with_("evaluator", micro_batch_tokens=mb), micro_batch_tokens=mb):
            key = {"evaluator.micro_batch_tokens": mb}
            what = f"smaller micro-batches: {mb} tokens"
            out.append(Remedy(what, key, ("--micro-batch-tokens", str(mb))))
            break
    streaming = with_("evaluator", execution="streaming")
    if execution == "resident" and fits(streaming, execution="streaming"):
        key = {"evaluator.execution": "streaming"}
        out.append(Remedy("streaming execution", key, ("--execution", "streaming")))
    if plan.device_kind != "cpu":
        for w in (2, 4, 8, 16, 32, 64):
            more = with_("backend", kind="ray", workers=w)
            if w > max(plan.workers, 1) and fits(more, workers=w):
                keys = {"backend.workers": w}
                if cfg.backend.kind != "ray":
                    keys = {"backend.kind": "ray", **keys}
                what = f"more workers: {w} actors, one device each"
                out.append(Remedy(what, keys, ("--workers", str(w))))
                break
    return out


# --------------------------------------------------------------------------- CLI check


def check_run(
    cfg: RunConfig,
    command: str,
    *,
    model: str | None = None,
    store: str | os.PathLike | None = None,
    suggest: bool = True,
) -> MemoryPlan | None:
    """The check the CLI runs before loading anything: plan ``command`` for ``cfg`` (in
    ``cfg.evaluator.execution``) on this machine's detected memory and raise
    :class:`MemoryPlanError` when nothing fits. ``ALLOCSEARCH_DEVICE_MEMORY`` and
    ``ALLOCSEARCH_HOST_MEMORY`` (e.g. ``80GB``) override the detected sizes.

    Returns None without checking when the model's config.json cannot be read or the
    model has no plan (the command then reports its own, more precise error), and for
    ``search``/``compare`` on a Ray cluster (``backend.address``/``RAY_ADDRESS``) unless
    ``ALLOCSEARCH_DEVICE_MEMORY`` says what the actors' devices hold: they are not this
    machine's. ``store``: an existing supernet (its manifest gives the levels), else the
    config's grid. ``suggest``: name what would fit in the refusal (re-plans; False when
    only the verdict matters).
    """
    from allocsearch.models.hf import ModelLoadError

    try:
        hf_config = load_hf_config(model or cfg.model)
    except (OSError, ValueError):
        return None
    env_dev = os.environ.get("ALLOCSEARCH_DEVICE_MEMORY")
    env_host = os.environ.get("ALLOCSEARCH_HOST_MEMORY")
    device = parse_bytes(env_dev) if env_dev else None
    host = parse_bytes(env_host) if env_host else None
    on_cluster = bool(cfg.backend.address or os.environ.get("RAY_ADDRESS"))
    if on_cluster and device is None and command in ("search", "compare"):
        return None
    if store is not None and not (Path(store) / "manifest.json").is_file():
        store = None
    try:
        return plan_memory(
            hf_config,
            cfg,
            model=str(model or cfg.model),
            command=command,
            device_memory=device,
            host_memory=host,
            execution=getattr(cfg.evaluator, "execution", "auto"),
            store=store,
            suggest=suggest,
        )
    except MemoryPlanError:
        raise
    except (ModelLoadError, KeyError, TypeError, ValueError):
        return None


def execution_for(
    cfg: RunConfig, *, store: str | os.PathLike | None = None, model: str | None = None
) -> str:
    """``"resident"`` or ``"streaming"``: what ``evaluator.execution = "auto"`` should run
    on this machine (:func:`check_run`'s plan; the detected memory, or the
    ``ALLOCSEARCH_*_MEMORY`` overrides). Resident when the plan cannot be made (a model
    without a config.json here); streaming when nothing fits (the smaller of the two).
    """
    probe = dataclasses.replace(cfg, evaluator=dataclasses.replace(cfg.evaluator, execution="auto"))
    try:
        plan = check_run(probe, "search", model=model, store=store, suggest=False)
    except MemoryPlanError:
        return "streaming"
    return "resident" if plan is None or plan.mode is None else plan.mode
