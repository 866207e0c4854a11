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
  (``mutation="auto"``), DP and knapsack take the cost table as it is. A ``"sublayers"``
  budget (:func:`kept_sublayers`; ``search --budget sublayers --target k``) counts
  sublayers instead, whatever their sizes: EvoPress's "drop k of L". Týr's rebuilt grids
  keep the dropped level of every unit that had one (``with_dropped_level(rows=)``).
* Blocks: :func:`block_units` / :class:`TiedBlocks` tie a block's two sublayers into one
  unit of a ``"drop"`` supernet (``search --tie-blocks``); the result is written as the
  per-sublayer allocation (both sublayers dropped), so recipes, ``apply`` and exports
  are those of any depth search.

Modes (``supernet.depth`` / ``build --depth``):

* ``"none"``: no dropped level (the default).
* ``"sublayers"``: every unit's structured levels plus ``"dropped"``.
* ``"drop"``: two levels per unit, dense and ``"dropped"``: EvoPress's sublayer dropping;
  a block whose two sublayers are both dropped is removed whole by ``apply``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from allocsearch.supernet.levels import LevelGrid
from allocsearch.supernet.spec import SupernetSpec, Unit

__all__ = [
    "DEPTH_MODES",
    "DROPPED_LABEL",
    "TiedBlocks",
    "block_units",
    "check_depth_supported",
    "depth_grid",
    "dropped_levels",
    "kept_sublayers",
    "skippable_sublayers",
    "sublayers_per_unit",
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


def with_dropped_level(grid: LevelGrid, rows: np.ndarray | None = None) -> LevelGrid:
    """``grid`` with a last level at sparsity 1.0 (every group removed) labelled
    ``"dropped"`` in every row (or the ``rows`` given); a row whose last level already
    removes everything is only relabelled.

    Args:
      grid: a structured grid (``sparsity`` float64[L, K] as fractions of groups).
      rows: bool[L], the units that get the dropped level (None: all). Týr's rebuilt
        grids (:func:`allocsearch.pipeline.run_strategy`) keep it for the units whose
        supernet had it.

    Returns:
      LevelGrid with K or K + 1 levels; ``center`` unchanged.
    """
    s = np.asarray(grid.sparsity, np.float64)
    valid = np.asarray(grid.valid, bool)
    add = np.ones(len(s), bool) if rows is None else np.asarray(rows, bool)
    if add.shape != (len(s),):
        raise ValueError(f"rows must be bool[L={len(s)}], got shape {add.shape}")
    n_valid = valid.sum(axis=1)
    last = s[np.arange(len(s)), n_valid - 1]
    has = np.abs(last - 1.0) <= _DROP_ATOL
    k = int(max(np.max(n_valid + (add & ~has)), s.shape[1]))
    sparsity = np.full((len(s), k), np.nan)
    new_valid = np.zeros((len(s), k), bool)
    labels = []
    for i in range(len(s)):
        row = list(s[i, : n_valid[i]])
        old = list(grid.labels[i]) if grid.labels is not None else [f"{100 * x:g}%" for x in row]
        if add[i] and has[i]:
            old[-1] = DROPPED_LABEL
        elif add[i]:
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


def sublayers_per_unit(spec: SupernetSpec) -> np.ndarray:
    """int64[L]: the sublayers each unit covers: 2 for a whole-block unit of
    :func:`block_units` (role ``"block"``: attention and MLP), else 1.

    Raises:
      ValueError: the spec has no dropped level (names how to build one).
    """
    if not dropped_levels(spec).any():
        raise ValueError(
            f"this {spec.structure!r} supernet has no dropped level, so it cannot drop "
            f"sublayers; build one with `allocsearch build --structure heads_neurons --depth "
            f"{DEPTH_MODES[2]}` (or --depth {DEPTH_MODES[1]})"
        )
    return np.array([2 if u.role == "block" else 1 for u in spec.units], np.int64)


def kept_sublayers(spec: SupernetSpec) -> np.ndarray:
    """float64[L, K]: the sublayers each unit keeps at each level (its
    :func:`sublayers_per_unit` count, 0 at its dropped level, ``inf`` at invalid levels):
    the cost table of a ``"sublayers"`` budget (:mod:`allocsearch.search.budget`), whose
    target ``k / n`` (n sublayers) asks to drop ``k`` of them whatever their sizes,
    EvoPress's depth budget.

    Raises:
      ValueError: the spec has no dropped level.
    """
    count = sublayers_per_unit(spec).astype(np.float64)[:, None]
    return np.where(spec.valid, np.where(dropped_levels(spec), 0.0, count), np.inf)


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
      does; None when no unit has a dropped level or the model's sublayers cannot be
      skipped (:func:`check_depth_supported` refuses it: output biases, post-norms). An
      evaluator skips sublayer ``s`` of block ``i`` for a candidate whose level of unit
      ``u = table[i, s]`` is dropped: its output is exactly zero, so the scores are those
      of running it, without its compute.
    """
    names = tuple(getattr(adapter, "sublayer_names", ()))
    dropped = dropped_levels(spec)
    if not names or not dropped.any():
        return None
    try:  # a sublayer of zero weights adds nothing to the residual: the same check
        check_depth_supported(adapter)
    except ValueError:
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


@dataclass(frozen=True)
class TiedBlocks:
    """A search over whole blocks of a depth ``"drop"`` supernet (:func:`block_units`),
    scored and written as the per-sublayer allocation it stands for.

    Attributes:
      spec: the block spec to search (B units, levels dense and dropped).
      owner: int32[L], the block unit of each sublayer unit of the store's spec.
    """

    spec: SupernetSpec
    owner: np.ndarray

    @classmethod
    def of(cls, spec: SupernetSpec) -> TiedBlocks:
        """Tie the blocks of a store's ``spec`` (raises as :func:`block_units` does)."""
        return cls(*block_units(spec))

    def expand(self, choices: Any) -> np.ndarray:
        """int32[..., L]: the sublayer allocation of block choices int[..., B] (both
        sublayers of a block take its level)."""
        return np.asarray(choices)[..., self.owner].astype(np.int32)

    def scorer(self, evaluate: Any) -> Any:
        """An ``Evaluate`` of block choices that scores their sublayer allocations with
        ``evaluate`` (any evaluator of the store: resident, streaming or Ray)."""
        return functools.partial(_score_expanded, evaluate, self)


def _score_expanded(evaluate: Any, tied: TiedBlocks, choices: Any, **kwargs: Any) -> Any:
    return evaluate(tied.expand(choices), **kwargs)
