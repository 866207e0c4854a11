"""Depth pruning: a "dropped" level for attention and MLP sublayers (the residual passes).

A structured supernet (``heads_neurons``) already has one unit per attention sublayer and
one per MLP sublayer, whose levels remove whole kv groups or neurons. Removing *all* of a
sublayer's groups zeroes its output projection's columns and (as dead rows) its input
projections, so the sublayer adds exactly zero to the residual stream: for a family
without output-projection biases (the Llama family) that *is* dropping the sublayer. So
depth pruning needs no new unit kind, store format, evaluator or searcher: the dropped
level is the level at sparsity 1.0 of a structured unit, in the same spec as every other
level, and one allocation can drop some sublayers and prune others' heads / neurons.

* Costs: a dropped sublayer keeps 0 weights and 0 linear MACs, so params and FLOPs tables
  charge it 0. The FLOPs table counts the linear layers' MACs only; a dropped attention
  sublayer also saves its attention-score MACs (``2 * context * heads * head_dim`` per
  token), which no level's cost includes. Latency tables (``--latency-table``) give the
  dropped level its own measured column like any other level.
* Evaluation: both evaluators skip a candidate's dropped sublayers
  (:func:`skippable_sublayers`; a ``lax.cond`` per sublayer inside the one compiled
  program, so nothing recompiles): on a depth supernet they run candidates one after
  another (``lax.map``) instead of ``vmap``, under which a branch would become a select
  that computes both sides. Skipping gives exactly the scores of running the zero
  weights. The pruned checkpoint removes whole blocks (:mod:`allocsearch.recipe.depth`).
* Search: attention and MLP units differ in size, so dropping one and keeping another does
  not keep the cost equal; EvoPress picks its repair mutation for such tables
  (``mutation="auto"``), DP and knapsack take the cost table as it is.

Modes (``supernet.depth`` / ``build --depth``):

* ``"none"``: no dropped level (the default).
* ``"sublayers"``: every unit's structured levels plus ``"dropped"``.
* ``"drop"``: two levels per unit, dense and ``"dropped"``: EvoPress's sublayer dropping;
  a block whose two sublayers are both dropped is removed whole by ``apply``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from allocsearch.supernet.levels import LevelGrid
from allocsearch.supernet.spec import SupernetSpec, Unit

__all__ = [
    "DEPTH_MODES",
    "DROPPED_LABEL",
    "block_units",
    "check_depth_supported",
    "depth_grid",
    "dropped_levels",
    "skippable_sublayers",
    "sublayer_count_table",
    "with_dropped_level",
]

DEPTH_MODES: Final[tuple[str, ...]] = ("none", "sublayers", "drop")
"""Values of ``supernet.depth`` (see the module docstring)."""
DROPPED_LABEL: Final = "dropped"
"""Level label of a dropped sublayer."""
_DROP_ATOL: Final = 1e-12


def check_depth_supported(adapter: Any) -> None:
    """Refuse a model on which removing every group of a sublayer is not dropping it.

    Raises:
      ValueError: a family other than the Llama family (GPT-2 and BERT add output biases,
        and BERT's post-norm would still act on the residual), or a Llama-family config
        with ``o_proj`` / ``down_proj`` biases; names the family or bias.
    """
    from allocsearch.models.llama import LlamaAdapter  # the model zoo, imported late

    if not isinstance(adapter, LlamaAdapter):
        raise ValueError(
            f"depth pruning needs sublayers whose zero weights add nothing to the residual; "
            f"model family {adapter.family!r} ({adapter.model_type}) has output biases or "
            f"post-norms; valid: the Llama family (llama, mistral, qwen2/3, gemma, ...)"
        )
    cfg = adapter.cfg
    if cfg.o_bias or cfg.mlp_bias:
        which = [n for n, b in (("o_proj", cfg.o_bias), ("down_proj", cfg.mlp_bias)) if b]
        raise ValueError(
            f"depth pruning needs output projections without biases; this "
            f"{adapter.model_type} config has biases on {which} (attention_bias / mlp_bias)"
        )
    if cfg.norm_layout != "pre":
        raise ValueError(
            f"depth pruning needs pre-norm blocks (a zero sublayer leaves the residual "
            f"unchanged); this {adapter.model_type} config has norm_layout "
            f"{cfg.norm_layout!r}, whose norms after a sublayer would still act"
        )


def with_dropped_level(grid: LevelGrid) -> LevelGrid:
    """``grid`` with a last level at sparsity 1.0 (every group removed) labelled
    ``"dropped"`` in every row; a row whose last level already removes everything is
    only relabelled.

    Args:
      grid: a structured grid (``sparsity`` float64[L, K] as fractions of groups).

    Returns:
      LevelGrid with K or K + 1 levels; ``center`` unchanged.
    """
    s = np.asarray(grid.sparsity, np.float64)
    valid = np.asarray(grid.valid, bool)
    n_valid = valid.sum(axis=1)
    last = s[np.arange(len(s)), n_valid - 1]
    has = np.abs(last - 1.0) <= _DROP_ATOL
    k = int(np.max(n_valid + ~has))
    sparsity = np.full((len(s), k), np.nan)
    new_valid = np.zeros((len(s), k), bool)
    labels = []
    for i in range(len(s)):
        row = list(s[i, : n_valid[i]])
        old = list(grid.labels[i]) if grid.labels is not None else [f"{100 * x:g}%" for x in row]
        if has[i]:
            old[-1] = DROPPED_LABEL
        else:
            row.append(1.0)
            old.append(DROPPED_LABEL)
        sparsity[i, : len(row)] = row
        new_valid[i, : len(row)] = True
        labels.append(tuple(old))
    return LevelGrid(sparsity, new_valid, np.asarray(grid.center, np.int32), tuple(labels))


def depth_grid(mode: str, grid: LevelGrid | None, num_units: int) -> LevelGrid:
    """The grid of a depth ``mode`` (one of :data:`DEPTH_MODES`).

    Args:
      mode: ``"none"`` returns ``grid``; ``"sublayers"`` adds the dropped level to
        ``grid``; ``"drop"`` ignores ``grid`` and gives every unit the levels
        ``("dense", "dropped")`` (sparsity 0 and 1, centre dense).
      grid: the structured grid of the supernet (required unless ``mode="drop"``).
      num_units: L, the number of structured units.
    """
    if mode not in DEPTH_MODES:
        raise ValueError(f"depth mode {mode!r} is not one of {DEPTH_MODES}")
    if mode == "drop":
        sparsity = np.tile(np.array([[0.0, 1.0]]), (num_units, 1))
        return LevelGrid(
            sparsity,
            np.ones((num_units, 2), bool),
            np.zeros(num_units, np.int32),
            (("dense", DROPPED_LABEL),) * num_units,
        )
    if grid is None:
        raise ValueError(f"depth mode {mode!r} adds to a structured grid; pass grid=")
    return grid if mode == "none" else with_dropped_level(grid)


def dropped_levels(spec: SupernetSpec) -> np.ndarray:
    """bool[L, K]: the levels that drop their sublayer (every group removed: sparsity 1.0
    of a structured unit). All False for unstructured and N:M supernets, where a unit is
    one linear layer and sparsity 1.0 of it is not a dropped sublayer."""
    if spec.structure not in ("heads", "neurons", "heads_neurons"):
        return np.zeros(spec.valid.shape, bool)
    with np.errstate(invalid="ignore"):
        return spec.valid & (np.abs(np.where(spec.valid, spec.sparsity, 0.0) - 1.0) <= _DROP_ATOL)


def sublayer_count_table(spec: SupernetSpec) -> Any:
    """A :class:`~allocsearch.search.budget.LatencyTable` that counts kept sublayers: every
    unit costs 1 at each level but its dropped one (0), dense 1. With
    ``Budget(kind="latency", target=k / L, latency=table)`` an allocation must drop at
    least ``k`` of the ``L`` sublayers, EvoPress's depth budget (a number of sublayers,
    whatever their sizes).

    Raises:
      ValueError: the spec has no dropped level.
    """
    from allocsearch.search.budget import LatencyTable  # search imports supernet

    dropped = dropped_levels(spec)
    if not dropped.any():
        raise ValueError(
            f"this {spec.structure!r} supernet has no dropped level; build it with depth "
            f"{DEPTH_MODES[1]!r} or {DEPTH_MODES[2]!r}"
        )
    kept = np.where(spec.valid, np.where(dropped, 0.0, 1.0), np.inf)
    return LatencyTable(kept=kept, dense=np.ones(spec.num_units))


def block_units(spec: SupernetSpec) -> tuple[SupernetSpec, np.ndarray]:
    """Whole blocks as units (levels dense and dropped) over a depth ``"drop"`` supernet.

    EvoPress's block dropping searches which *blocks* to remove; its units are blocks,
    not sublayers. Tying a block's attention and MLP units into one unit gives that space
    from the same store: search the returned spec like any other, and score (or write a
    recipe of) a block choice ``c`` int[n, B] as the sublayer choice ``c[:, owner]``
    with the store's evaluator (resident or streaming).

    Args:
      spec: the store's spec; every unit has exactly the levels dense and dropped.

    Returns:
      ``(block spec, owner)``: B block units (role ``"block"``, named after the block,
      covering both sublayers' layers and weights) and owner int32[L], the block unit of
      each sublayer unit.

    Raises:
      ValueError: a unit has other levels than dense and dropped.
    """
    dropped = dropped_levels(spec)
    ok = (spec.num_levels == 2) & (np.nan_to_num(spec.sparsity[:, 0], nan=1.0) == 0.0)
    if spec.valid.shape[1] == 2:
        ok &= dropped[:, 1]
    if spec.valid.shape[1] != 2 or not np.all(ok):
        i = int(np.argmin(ok)) if not np.all(ok) else 0
        levels = spec.sparsity[i, spec.valid[i]].tolist()
        raise ValueError(
            f"block units need a depth 'drop' supernet (levels dense and dropped only); "
            f"unit {spec.units[i].name!r} has levels {levels}"
        )
    blocks = sorted({u.block for u in spec.units})
    owner = np.array([blocks.index(u.block) for u in spec.units], np.int32)
    units = []
    for j, b in enumerate(blocks):
        members = [u for i, u in enumerate(spec.units) if owner[i] == j]
        parts = [m.name.split(".") for m in members]
        common = [p[0] for p in zip(*parts, strict=False) if len(set(p)) == 1]
        units.append(
            Unit(
                name=".".join(common),
                role="block",
                block=b,
                layers=tuple(x for m in members for x in m.layers),
                numel=sum(m.numel for m in members),
                flops_per_token=sum(m.flops_per_token for m in members),
            )
        )
    n = len(units)
    block_spec = SupernetSpec(
        units=tuple(units),
        sparsity=np.tile(np.array([[0.0, 1.0]]), (n, 1)),
        valid=np.ones((n, 2), bool),
        center=np.zeros(n, np.int32),
        structure=spec.structure,
        level_labels=(("dense", DROPPED_LABEL),) * n,
    )
    return block_spec, owner


def skippable_sublayers(
    adapter: Any, spec: SupernetSpec, unit_params: Sequence[Sequence[str]]
) -> np.ndarray | None:
    """Which unit drops each sublayer an evaluator can skip.

    Args:
      adapter: the model adapter (its ``sublayer_names``: e.g. ``("self_attn", "mlp")``).
      spec: the supernet spec (its dropped levels: :func:`dropped_levels`).
      unit_params: the parameter names of each unit.

    Returns:
      int32[num_blocks, len(adapter.sublayer_names)]: the unit whose dropped level removes
      that sublayer of that block (every parameter of the unit lies in it), -1 where none
      does; None when no unit has a dropped level or the family has no skippable
      sublayers. An evaluator skips sublayer ``s`` of block ``i`` for a candidate whose
      level of unit ``u = table[i, s]`` is dropped: its output is exactly zero, so the
      scores are those of running it, without its compute.
    """
    names = tuple(getattr(adapter, "sublayer_names", ()))
    dropped = dropped_levels(spec)
    if not names or not dropped.any():
        return None
    prefixes = [adapter.block_prefix(i) for i in range(adapter.num_blocks)]
    table = np.full((len(prefixes), len(names)), -1, np.int32)
    for u, params in enumerate(unit_params):
        if not dropped[u].any():
            continue
        places = set()
        for name in params:
            block = next((i for i, pre in enumerate(prefixes) if name.startswith(pre)), None)
            sub = None if block is None else name[len(prefixes[block]) :].split(".")[0]
            places.add((block, names.index(sub) if sub in names else None))
        if len(places) == 1:
            block, s = places.pop()
            if block is not None and s is not None:
                table[block, s] = u
    return table if (table >= 0).any() else None
