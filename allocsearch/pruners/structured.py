"""Structured pruning of attention heads and MLP neurons (Týr-the-Pruner / ZipLM style).

A structured unit removes whole *groups* of input columns of one "output" projection:

* attention: groups of ``o_proj`` input columns. With grouped-query attention, a group is
  one **key/value group**: the ``num_heads / num_kv_heads`` query heads that share one
  k/v head (``n_rep * head_dim`` contiguous columns, in Hugging Face's ``repeat_kv``
  order). Removal is per kv group, not per query head, because (a) the k and v rows of a
  kv head only become dead once *all* its query heads are gone, so removing single query
  heads saves almost nothing in k/v while still costing error, and (b) every layer stays
  a regular GQA layer (same number of query heads per kv head) that standard attention
  kernels and the Hugging Face layout can run. For multi-head attention
  (``num_kv_heads == num_heads``) a group is exactly one head.

  With ``HeadGroups(query_heads=True)`` a group is one **query head** instead (``head_dim``
  contiguous ``o_proj`` columns), as Týr and Torch-Pruning remove them: the k and v rows of
  a kv head stay while any of its query heads lives and die with the last one. Levels can
  then step by one query head (with Llama-3's 8 kv heads a kv group is 12.5% of the
  attention, too coarse for coarse-to-fine rounds to refine); the saliency and refit are
  the same OBS group formulas on ``head_dim``-wide groups. Such a layer can have different
  numbers of query heads per kv head; :mod:`allocsearch.recipe.apply` pads it back to a
  regular layout with zero heads when slicing.
* MLP: single input channels ("neurons") of ``down_proj`` (``fc_out``); the matching rows
  of ``gate_proj`` and ``up_proj`` (``fc_in``) become dead.

Fused input projections are one layer whose dead rows are the concatenation of the parts'
(``dead_rows`` returns one entry): GPT-2's ``c_attn`` and Phi-3's ``qkv_proj`` (rows
q | k | v, with grouped-query attention the k and v parts have ``num_kv_heads * head_dim``
rows each), and Phi-3's ``gate_up_proj`` (rows gate | up, neuron ``n`` is rows ``n`` and
``I + n``), so the groups of a fused layer keep q/k/v and gate/up consistent.

Given ``H = sum_t x_t x_t^T`` of the output projection's input and its weight ``W``, the
pruner (restating the OBS group formulation of ZipLM / Týr):

1. damps ``H`` (see :func:`~allocsearch.pruners.base.damped_hessian`) and inverts it;
2. in rounds, scores every remaining group ``S`` by the output error of removing it with
   the optimal compensation of the remaining columns,
   ``e_S = trace(W_S [H^-1]_SS^-1 W_S^T)`` (lower = removed first), removes the
   ``round_size`` lowest-scoring groups together, and applies the OBS update
   ``W -= W_S [H^-1]_SS^-1 [H^-1]_S:`` and ``H^-1 -= [H^-1]_:S [H^-1]_SS^-1 [H^-1]_S:``
   (the inverse of ``H`` restricted to the remaining columns);
3. for each level, refits the kept columns by least squares from the *dense* weights,
   ``W_K = (W H_d)_:K (H_d)_KK^-1`` with the damped ``H_d``. In exact arithmetic this
   equals the accumulated OBS updates; recomputing it avoids float32 drift over rounds.

Which groups a level removes is chosen by :func:`~allocsearch.pruners.group_selection.
nested_removals` on the exact refit error of step 3: the best nested chain of subsets when
the levels' subsets are few (``enumeration_limit``), otherwise the OBS order of step 2
improved by a swap local search (``max_swaps``; 0 keeps the greedy order as it is). The
greedy order alone is up to 2.6x the best subset's error when removing 6 of 8 query heads
(``scripts/bench_group_selection.py``). Levels are nested (the store keeps the dead
input-projection rows as one rank array). The weights of inputs that were zero on every
calibration token count as zero for the saliency (removing them costs nothing on the
calibration data); the refit leaves kept ones unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

from allocsearch.pruners.base import (
    HIGHEST,
    DenseVariants,
    LayerStats,
    check_sparsities,
    check_stats,
    check_weight,
    damped_hessian,
    dead_inputs,
    exact_counts,
)
from allocsearch.pruners.group_selection import ENUMERATION_LIMIT, MAX_SWAPS, nested_removals

MIN_HEAD_STEP = 1
"""Default smallest step of attention levels and removal rounds, in groups (kv groups or
query heads)."""
MIN_NEURON_STEP = 32
"""Default smallest step of MLP levels and removal rounds, in neurons."""


def _positive(**values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}")


def _keep_array(keep: ArrayLike, num_groups: int) -> np.ndarray:
    k = np.asarray(keep, dtype=bool)
    if k.ndim not in (1, 2) or k.shape[-1] != num_groups:
        raise ValueError(f"keep must be bool[G] or bool[K, G] with G={num_groups}, got {k.shape}")
    return k


@dataclass(frozen=True, kw_only=True)
class HeadGroups:
    """Attention geometry; groups are key/value groups (see the module docstring).

    Attributes:
      hidden_size: model width (rows of ``o_proj``, columns of q/k/v).
      num_heads: query heads.
      num_kv_heads: key/value heads; must divide ``num_heads``.
      head_dim: features per head.
      qkv_bias: whether q/k/v have biases (their rows die with the head).
      o_bias: whether ``o_proj`` has a bias (never removed).
      query_heads: groups are single query heads (True) instead of kv groups (False,
        the default); see the module docstring.
      fused_qkv: q, k and v are one fused layer (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``;
        rows q | k | v);
        ``dead_rows`` then returns one ``qkv`` entry.
      min_step: smallest level step and default removal round, in kv groups.
    """

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False
    query_heads: bool = False
    fused_qkv: bool = False
    min_step: int = MIN_HEAD_STEP

    def __post_init__(self) -> None:
        _positive(
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            min_step=self.min_step,
        )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}"
            )

    @property
    def num_groups(self) -> int:
        """G: removable groups (kv groups, or query heads with ``query_heads``)."""
        return self.num_heads if self.query_heads else self.num_kv_heads

    @property
    def heads_per_group(self) -> int:
        """Query heads per kv head (``num_heads / num_kv_heads``)."""
        return self.num_heads // self.num_kv_heads

    @property
    def group_width(self) -> int:
        """``o_proj`` input columns per group (``heads_per_group * head_dim``, or
        ``head_dim`` with ``query_heads``)."""
        return self.head_dim if self.query_heads else self.heads_per_group * self.head_dim

    def head_keep(self, keep: ArrayLike) -> np.ndarray:
        """bool[..., num_heads]: kept query heads for a group keep mask bool[..., G]."""
        k = _keep_array(keep, self.num_groups)
        return k.copy() if self.query_heads else np.repeat(k, self.heads_per_group, axis=-1)

    def kv_keep(self, keep: ArrayLike) -> np.ndarray:
        """bool[..., num_kv_heads]: kv heads alive (with at least one kept query head)."""
        heads = self.head_keep(keep)
        grouped = heads.reshape(*heads.shape[:-1], self.num_kv_heads, self.heads_per_group)
        return grouped.any(axis=-1)

    @property
    def in_features(self) -> int:
        """Input width of ``o_proj``: ``num_heads * head_dim``."""
        return self.num_heads * self.head_dim

    def column_keep(self, keep: ArrayLike) -> np.ndarray:
        """bool[..., in]: kept ``o_proj`` input columns for a group keep mask bool[..., G]."""
        return np.repeat(_keep_array(keep, self.num_groups), self.group_width, axis=-1)

    def dead_rows(self, keep: ArrayLike) -> dict[str, np.ndarray]:
        """Rows of the input projections that a group keep mask bool[G] makes dead.

        Returns:
          ``{"q": bool[num_heads*head_dim], "k": bool[num_kv_heads*head_dim], "v": ...}``
          (or ``{"qkv": ...}`` for a fused layer), True where the row (and its bias) is
          removed. Query head ``h`` belongs to kv group ``h // heads_per_group``; a kv
          head's rows die when all its query heads are removed.
        """
        keep = _keep_array(keep, self.num_groups)
        if keep.ndim != 1:
            raise ValueError(f"dead_rows takes one keep mask bool[G], got shape {keep.shape}")
        q = ~np.repeat(self.head_keep(keep), self.head_dim)
        kv = ~np.repeat(self.kv_keep(keep), self.head_dim)
        if self.fused_qkv:
            return {"qkv": np.concatenate([q, kv, kv])}
        return {"q": q, "k": kv, "v": kv.copy()}

    def kept_params(self, keep: ArrayLike) -> np.ndarray:
        """int64[...]: parameters left in q, k, v and o for keep masks bool[..., G].

        Counts the dead q/k/v rows (and their biases) as removed; the ``o_proj`` bias
        always stays. Higher = less pruned.
        """
        heads = self.head_keep(keep).sum(axis=-1).astype(np.int64)
        groups = self.kv_keep(keep).sum(axis=-1).astype(np.int64)
        row = self.hidden_size + int(self.qkv_bias)
        qkv = (heads + 2 * groups) * self.head_dim * row
        o = self.hidden_size * heads * self.head_dim + self.hidden_size * int(self.o_bias)
        return qkv + o

    @property
    def dense_params(self) -> int:
        """Parameters of the dense q, k, v and o (weights and biases)."""
        return int(self.kept_params(np.ones(self.num_groups, dtype=bool)))


@dataclass(frozen=True, kw_only=True)
class NeuronGroups:
    """MLP geometry; each neuron (input channel of ``down_proj``) is a group.

    Attributes:
      hidden_size: model width (rows of ``down_proj``).
      intermediate_size: neurons (columns of ``down_proj``).
      gated: Llama-style ``gate_proj`` and ``up_proj`` (True) or a single ``fc_in``.
      fused_gate_up: gate and up are one fused layer (Phi-3 ``gate_up_proj``, role
        ``fc_in``, rows gate | up); ``dead_rows`` then returns one ``fc_in`` entry of
        ``2 * intermediate_size`` rows. Requires ``gated``.
      in_bias: whether the input projections have biases (removed with their rows).
      out_bias: whether ``down_proj`` has a bias (never removed).
      min_step: smallest level step and default removal round, in neurons.
    """

    hidden_size: int
    intermediate_size: int
    gated: bool = True
    fused_gate_up: bool = False
    in_bias: bool = False
    out_bias: bool = False
    min_step: int = MIN_NEURON_STEP

    def __post_init__(self) -> None:
        _positive(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            min_step=self.min_step,
        )
        if self.fused_gate_up and not self.gated:
            raise ValueError("fused_gate_up=True needs gated=True (a fused gate | up layer)")

    @property
    def num_groups(self) -> int:
        """G: removable groups (neurons)."""
        return self.intermediate_size

    @property
    def group_width(self) -> int:
        return 1

    @property
    def in_features(self) -> int:
        """Input width of ``down_proj``."""
        return self.intermediate_size

    def column_keep(self, keep: ArrayLike) -> np.ndarray:
        """bool[..., in]: kept ``down_proj`` input columns (the keep mask itself)."""
        return _keep_array(keep, self.num_groups).copy()

    def dead_rows(self, keep: ArrayLike) -> dict[str, np.ndarray]:
        """``{"gate": bool[I], "up": bool[I]}``, ``{"fc_in": bool[I]}`` (ungated) or
        ``{"fc_in": bool[2I]}`` (fused gate | up): True = dead row."""
        keep = _keep_array(keep, self.num_groups)
        if keep.ndim != 1:
            raise ValueError(f"dead_rows takes one keep mask bool[G], got shape {keep.shape}")
        if self.fused_gate_up:
            return {"fc_in": np.concatenate([~keep, ~keep])}
        if self.gated:
            return {"gate": ~keep, "up": ~keep}
        return {"fc_in": ~keep}

    def kept_params(self, keep: ArrayLike) -> np.ndarray:
        """int64[...]: parameters left in the MLP for keep masks bool[..., G].

        Counts the dead input-projection rows (and biases) as removed; the output bias
        always stays. Higher = less pruned.
        """
        n = _keep_array(keep, self.num_groups).sum(axis=-1).astype(np.int64)
        n_in = 2 if self.gated else 1
        return (
            n * n_in * (self.hidden_size + int(self.in_bias))
            + n * self.hidden_size
            + self.hidden_size * int(self.out_bias)
        )

    @property
    def dense_params(self) -> int:
        """Parameters of the dense MLP (weights and biases)."""
        return int(self.kept_params(np.ones(self.num_groups, dtype=bool)))


GroupLayout = HeadGroups | NeuronGroups


@jax.jit
def _inverse(h: jax.Array) -> jax.Array:
    chol = jnp.linalg.cholesky(h)
    return jax.scipy.linalg.cho_solve((chol, True), jnp.eye(h.shape[0], dtype=h.dtype))


@partial(jax.jit, static_argnames=("size", "width"))
def _obs_round(
    w: jax.Array, hinv: jax.Array, removed: jax.Array, *, size: int, width: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One removal round: score groups, drop the ``size`` cheapest, OBS-update W and H^-1.

    Shapes: w float32[out, in], hinv float32[in, in], removed bool[G]; returns the updated
    three and the removed group indices int32[size].
    """
    n_groups = removed.shape[0]
    if width == 1:
        sal = jnp.sum(jnp.square(w), axis=0) / jnp.diagonal(hinv)
    else:
        blocks = hinv.reshape(n_groups, width, n_groups, width)
        ar = jnp.arange(n_groups)
        blocks = blocks[ar, :, ar, :]  # [G, width, width], diagonal blocks
        blocks = jnp.where(removed[:, None, None], jnp.eye(width, dtype=w.dtype), blocks)
        wg = jnp.transpose(w.reshape(w.shape[0], n_groups, width), (1, 2, 0))  # [G, width, out]
        sal = jnp.sum(wg * jnp.linalg.solve(blocks, wg), axis=(1, 2))
    sal = jnp.where(removed, jnp.inf, sal)
    picked = jnp.argsort(sal, stable=True)[:size].astype(jnp.int32)
    idx = (picked[:, None] * width + jnp.arange(width)[None, :]).reshape(-1)
    h_ss = hinv[idx][:, idx]
    x = jax.scipy.linalg.solve(h_ss, hinv[idx, :], assume_a="pos")  # [size*width, in]
    w = w - jnp.matmul(w[:, idx], x, precision=HIGHEST)
    hinv = hinv - jnp.matmul(hinv[:, idx], x, precision=HIGHEST)
    hinv = 0.5 * (hinv + hinv.T)
    w = w.at[:, idx].set(0.0)
    hinv = hinv.at[idx, :].set(0.0).at[:, idx].set(0.0)
    return w, hinv, removed.at[picked].set(True), picked


@jax.jit
def _refit(w: jax.Array, h_damped: jax.Array, kept: jax.Array) -> jax.Array:
    """float32[out, in]: least-squares refit ``W_K = (W H)_:K H_KK^-1``, zeros elsewhere.

    ``kept`` int32[n_kept] lists the kept columns; the system is solved at its physical
    size (one compiled program per kept width).
    """
    g = jnp.matmul(w, h_damped[:, kept], precision=HIGHEST)  # [out, n_kept]
    chol = jnp.linalg.cholesky(h_damped[kept][:, kept])
    sol = jax.scipy.linalg.cho_solve((chol, True), g.T).T
    return jnp.zeros_like(w).at[:, kept].set(sol)


@dataclass(frozen=True, kw_only=True)
class StructuredPruner:
    """Removes whole heads (kv groups or query heads) or neurons from ``o_proj`` /
    ``down_proj``.

    ``prune(weight, stats, sparsities)`` takes the output projection's weight
    float[hidden, layout.in_features], the statistics of its input, and sparsities that
    are fractions of groups removed (``r / G``; the same fraction of the unit's q/k/v/o or
    gate/up/down weights). It returns :class:`DenseVariants` whose ``group_keep`` is
    bool[K, G] and whose weights are the compensated projection in full size with the
    removed columns exactly zero. Use ``layout.dead_rows`` and ``layout.kept_params`` for
    the matching input-projection rows and exact parameter counts.

    Attributes:
      layout: :class:`HeadGroups` or :class:`NeuronGroups`.
      round_size: groups removed per OBS round (None: ``layout.min_step``); smaller is
        more accurate and slower.
      percdamp: diagonal damping as a fraction of the Hessian's mean diagonal.
      enumeration_limit: a unit's levels are chosen exactly (all subsets of every level
        scored) when they have at most this many subsets in all; 0 never enumerates.
      max_swaps: accepted swaps per level of the local search from the greedy order
        (beyond ``enumeration_limit``); 0 with ``enumeration_limit=0`` is the plain greedy
        OBS order.
    """

    layout: GroupLayout
    round_size: int | None = None
    percdamp: float = 0.01
    enumeration_limit: int = ENUMERATION_LIMIT
    max_swaps: int = MAX_SWAPS
    name: ClassVar[str] = "structured"
    nested: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.layout, HeadGroups | NeuronGroups):
            raise ValueError(f"layout must be HeadGroups or NeuronGroups, got {self.layout!r}")
        if self.round_size is not None:
            _positive(round_size=self.round_size)
        for key in ("enumeration_limit", "max_swaps"):
            value = getattr(self, key)
            if not isinstance(value, int | np.integer) or value < 0:
                raise ValueError(f"{key} must be an int >= 0, got {value!r}")
        if not self.percdamp >= 0:
            raise ValueError(f"percdamp must be >= 0, got {self.percdamp!r}")

    def removal_counts(self, sparsities: ArrayLike) -> np.ndarray:
        """int64[K]: groups removed at each level; refuses fractions that are not ``r / G``."""
        return exact_counts(check_sparsities(sparsities), self.layout.num_groups, what="groups")

    def prune(
        self, weight: ArrayLike, stats: LayerStats | None, sparsities: ArrayLike
    ) -> DenseVariants:
        """All levels; see the class docstring."""
        lay = self.layout
        w = check_weight(weight)
        if w.shape != (lay.hidden_size, lay.in_features):
            raise ValueError(
                f"weight has shape {w.shape}; this layout's output projection is "
                f"({lay.hidden_size}, {lay.in_features})"
            )
        h = check_stats(stats, w.shape[1], self.name)
        s = check_sparsities(sparsities)
        removed_counts = self.removal_counts(s)
        h_damped = damped_hessian(h, self.percdamp)
        hinv = _inverse(h_damped)
        if not bool(jnp.all(jnp.isfinite(hinv))):
            raise ValueError(
                f"the damped Hessian is not positive definite (percdamp={self.percdamp}); "
                f"use a larger percdamp or more calibration tokens"
            )
        # Removing none or every group needs no choice (the dense or a dropped sublayer).
        partial_counts = sorted({int(r) for r in removed_counts if 0 < r < lay.num_groups})
        w_obs = jnp.where(dead_inputs(h)[None, :], 0.0, w)  # dead inputs cost nothing
        chosen = nested_removals(
            w_obs,
            hinv,
            partial_counts,
            lay.group_width,
            greedy_order=lambda: self._removal_order(w_obs, hinv, np.asarray(partial_counts)),
            limit=self.enumeration_limit,
            max_swaps=self.max_swaps,
        )
        removed_sets = dict(zip(partial_counts, chosen, strict=True))
        keep = np.ones((len(s), lay.num_groups), dtype=bool)
        variants = []
        for k, r in enumerate(removed_counts):
            if r == lay.num_groups:
                keep[k] = False
            elif r > 0:
                keep[k, removed_sets[int(r)]] = False
            if r == 0:
                variants.append(w)
            elif r == lay.num_groups:
                variants.append(jnp.zeros_like(w))
            else:
                kept = np.flatnonzero(lay.column_keep(keep[k])).astype(np.int32)
                variants.append(_refit(w, h_damped, jnp.asarray(kept)))
        weights = jnp.stack(variants)
        if not bool(jnp.all(jnp.isfinite(weights))):
            raise ValueError(f"least-squares refit failed (percdamp={self.percdamp})")
        return DenseVariants(weights=weights, sparsity=s, group_keep=keep)

    def _removal_order(
        self, w_obs: jax.Array, hinv: jax.Array, removed_counts: np.ndarray
    ) -> np.ndarray:
        """int64[max count]: groups in the order the greedy OBS rounds remove them.

        ``w_obs`` is the weight with dead inputs' columns zeroed (they cost nothing).

        Rounds hold at most ``round_size`` groups and never cross a level's count, so every
        level's removed set is the union of whole rounds.
        """
        lay = self.layout
        round_size = lay.min_step if self.round_size is None else self.round_size
        removed = jnp.zeros(lay.num_groups, dtype=bool)
        order: list[int] = []
        for target in sorted({int(r) for r in removed_counts}):
            while len(order) < target:
                size = min(round_size, target - len(order))
                w_obs, hinv, removed, picked = _obs_round(
                    w_obs, hinv, removed, size=size, width=lay.group_width
                )
                order.extend(np.asarray(picked).tolist())
        return np.asarray(order, dtype=np.int64)
