"""The JAX evaluator: scores sparsity allocations against the dense model.

An :class:`Evaluator` is the :class:`~allocsearch.search.base.Evaluate` callable of a
search: ``evaluator(choices int32[n, L], fidelity=..., batch_seed=...) -> float32[n]``
(lower is better). How it stays fast:

* **Variants live on the device as stacks.** For every parameter role of a block (the
  name relative to the block, e.g. ``self_attn.q_proj.weight``) the evaluator stacks the
  blocks: nested pruners (magnitude, Wanda) keep the dense weight, one int32 rank array
  and a prune-count table per block; pruners that update weights (SparseGPT,
  structured) keep float[num_blocks, K, out, in]. Roles whose blocks mix the two, or
  mix per-row and per-matrix ranks, fall back to the weight stack.
* **One compiled program for every candidate.** Blocks run in a ``fori_loop`` whose body
  gathers block ``i``'s weights of the candidate's levels (or rebuilds its masks from
  rank and counts) *inside* ``jit``; level vectors are ordinary inputs, so nothing
  recompiles between candidates. Programs are compiled once per (candidates per call,
  sequences per micro-batch) shape, and the micro-batch shape depends on the fidelity only.
* **Teacher computed once.** The dense model's outputs on the whole calibration set are
  computed at construction and reduced to what the metric needs
  (:meth:`~allocsearch.evaluate.metrics.Metric.teacher_data`, e.g. top-k log-probs); a
  minibatch takes its sequences' rows.
* **Multi-fidelity.** ``fidelity`` tokens are the minibatch
  :func:`~allocsearch.data.tokenset.minibatch` draws with ``batch_seed``: the same
  (fidelity, batch_seed) is the same fixed set of sequences, in every process.
* **Batching.** ``candidates_per_call`` candidates are ``vmap``-ed through one call
  (``lax.map``-ed on depth supernets, so that each candidate's dropped sublayers are
  skipped: :func:`~allocsearch.supernet.depth.skippable_sublayers`).
* **Reference reuse.** The reference's hidden state at the input of every block is cached
  per minibatch, and a candidate starts at the first block where its levels differ from
  the reference's. The reference is the allocation given to
  :meth:`Evaluator.set_reference` (e.g. EvoPress's parent) or, by default, the per-unit
  most common level of each call's candidates: for a population of offspring of one
  parent that *is* the parent, so reuse works through the plain ``Evaluate`` protocol
  without the searcher knowing. Reuse is used only when the candidates' skipped blocks
  outnumber the reference's own forward. Candidates are sorted by their first differing
  block and grouped, so a group starts at its smallest.

Scores of the plain, batched and reuse paths agree to float rounding (tests check 1e-5).
All computation is ``jnp``; the same code runs on CPU and GPU.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

from allocsearch.data.tokenset import TokenSet
from allocsearch.evaluate.metrics import Metric, TeacherData
from allocsearch.evaluate.resident_programs import (
    _build_source,
    _full_params,
    _nll_program,
    _score_program,
    _Source,
    _states_program,
    _teacher_program,
)
from allocsearch.evaluate.splits import checked_validation, joined_tokens, split_rows
from allocsearch.models.base import ModelAdapter
from allocsearch.models.hf import HFModel
from allocsearch.pruners.base import NestedVariants, Variants
from allocsearch.supernet.depth import dropped_levels, skippable_sublayers
from allocsearch.supernet.spec import SupernetSpec

# How many (fidelity, batch_seed) minibatch index sets to remember.
_MINIBATCH_CACHE_SIZE = 64


def shard_rows(rows: np.ndarray, index: int, count: int) -> np.ndarray:
    """The ``index``-th of ``count`` near-equal contiguous splits of ``rows`` (a minibatch's
    sequence indices, in minibatch order): split ``j`` holds ``len(rows) // count`` rows,
    one more for ``j < len(rows) % count`` (``numpy.array_split``). The splits of
    ``index = 0 .. count - 1`` concatenate to ``rows``; some are empty when ``count`` >
    ``len(rows)``. Evaluators score a ``shard=(index, count)`` of a minibatch on these
    rows, so a mean over a query's tokens can be split over processes and recombined
    weighted by each split's length.
    """
    if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 1:
        raise ValueError(f"shard count must be an int >= 1, got {count!r}")
    bad_type = isinstance(index, bool) or not isinstance(index, int | np.integer)
    if bad_type or not 0 <= index < count:
        raise ValueError(f"shard index must be an int in 0..{count - 1}, got {index!r}")
    n = len(rows)
    size, extra = divmod(n, int(count))
    start = int(index) * size + min(int(index), extra)
    return rows[start : start + size + (1 if index < extra else 0)]


def _balanced_chunks(rows: np.ndarray, max_rows: int) -> list[tuple[jax.Array, np.ndarray]]:
    """Split row indices into equal chunks of at most ``max_rows`` (the last padded by
    repeating its last row, with weight 0): [(int32[R] device rows, float64[R] weights)]."""
    n = len(rows)
    n_chunks = -(-n // max_rows)
    size = -(-n // n_chunks)
    padded = np.concatenate([rows, np.full(n_chunks * size - n, rows[-1], rows.dtype)])
    weights = (np.arange(n_chunks * size) < n).astype(np.float64)
    cut = [slice(j * size, (j + 1) * size) for j in range(n_chunks)]
    return [(jnp.asarray(padded[s], jnp.int32), weights[s]) for s in cut]


def _checked_shard(shard: tuple[int, int]) -> tuple[int, int]:
    try:
        index, count = shard
    except (TypeError, ValueError):
        raise ValueError(f"shard must be a pair (index, count), got {shard!r}") from None
    shard_rows(np.zeros(0), index, count)  # validates both
    return int(index), int(count)


def check_evaluator_args(adapter: ModelAdapter, metric: Metric, **positive: int) -> None:
    """The checks every evaluator makes of its arguments: ``metric`` is a
    :class:`~allocsearch.evaluate.metrics.Metric` for this kind of model (causal LM or
    encoder), and each of ``positive`` (name -> value) is a positive int.

    Raises:
      TypeError: ``metric`` is not a Metric. ValueError: naming the bad value."""
    if not isinstance(metric, Metric):
        raise TypeError(f"metric must be a Metric instance, got {type(metric).__name__}")
    if metric.causal_lm != adapter.is_causal_lm:
        wanted = "causal language models" if metric.causal_lm else "encoders"
        kind = "a causal language model" if adapter.is_causal_lm else "an encoder"
        fits = "kl, topk_kl, nll" if adapter.is_causal_lm else "embedding_cosine, hidden_nmse"
        raise ValueError(
            f"metric {metric.name!r} is for {wanted} but the model is {kind} "
            f"({adapter.model_type}); metrics for it (evaluator.metric): {fits}"
        )
    for what, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{what} must be a positive int, got {value!r}")


class EvalStats(NamedTuple):
    """What the last :meth:`Evaluator.__call__` did (for benchmarks and tests).

    Attributes:
      candidates: candidates scored.
      reused: whether a reference's cached hidden states were used.
      computed_reference: whether the reference's hidden states were computed by this call
        (one extra forward of the reference over the minibatch).
      blocks_run: mean number of blocks run per candidate (``num_blocks`` without reuse;
        with reuse, counted from each group's first block, padding excluded).
    """

    candidates: int
    reused: bool
    computed_reference: bool
    blocks_run: float


class Evaluator:
    """Scores level vectors of a supernet: ``choices`` int32[n, L] -> float32[n].

    Args:
      model: the dense model (its parameters are the teacher and the weights of every
        parameter that no unit changes).
      spec: the search space; unit ``u`` has ``spec.num_levels[u]`` levels.
      variants: parameter name (e.g. ``"model.layers.0.self_attn.q_proj.weight"``) ->
        its variants, one per level of the unit that names it.
      unit_params: ``unit_params[u]`` lists the parameter names unit ``u`` changes; level
        ``k`` of the unit selects level ``k`` of each. A parameter belongs to at most
        one unit; every key of ``variants`` belongs to one.
      calibration: the calibration token set minibatches are drawn from.
      metric: the fitness (lower is better); see :mod:`allocsearch.evaluate.metrics`.
      candidates_per_call: candidates evaluated together by one compiled call (vmap);
        larger uses more memory (the candidates' weights and activations at once).
      micro_batch_tokens: at most this many tokens (whole sequences, at least one) go
        through the model at once; bounds activation and logit memory.
      reuse: allow reference reuse (see the module docstring).
      auto_reference: without :meth:`set_reference`, use each call's per-unit most common
        level as the reference.
      max_reference_bytes: reuse is skipped at fidelities whose cached reference states
        (``(num_blocks + 1) * fidelity * hidden * itemsize`` bytes) would exceed this.
      max_teacher_bytes: refuse (before computing anything) a metric whose teacher data
        for the whole calibration set would exceed this, e.g. full-vocabulary KL of a
        large vocabulary (use :class:`~allocsearch.evaluate.metrics.TopKKLDivergence`).
      skip_dropped: on depth supernets, branch around each candidate's dropped sublayers
        (candidates run one after another); False runs their zero weights (``vmap``),
        for comparison: the scores are the same.
      validation: rows a query with ``split="validation"`` scores
        (:mod:`~allocsearch.evaluate.splits`); None: calibration queries only.

    Raises:
      ValueError: mismatched inputs (the message names the unit or parameter, what it
        has and what was expected).

    Memory: the evaluator holds a stacked copy of the dense weights, one int32 rank per
    weight of nested variants, K copies of weight-updating variants, the teacher data
    (see the metric) and, with reuse, the reference's states of one minibatch. It keeps
    ``variants`` as given (for :meth:`materialize`) and reads each parameter's once, to
    stack it: with :meth:`~allocsearch.supernet.store.SupernetStore.host_variants` (what
    ``pipeline.make_evaluator`` passes) the stacks are the only device copy.
    """

    def __init__(
        self,
        model: HFModel,
        spec: SupernetSpec,
        variants: Mapping[str, Variants],
        unit_params: Sequence[Sequence[str]],
        calibration: TokenSet,
        *,
        metric: Metric,
        candidates_per_call: int = 1,
        micro_batch_tokens: int = 8192,
        reuse: bool = True,
        auto_reference: bool = True,
        max_reference_bytes: int = 2**30,
        max_teacher_bytes: int = 2**33,
        skip_dropped: bool = True,
        validation: TokenSet | None = None,
    ):
        adapter = model.adapter
        check_evaluator_args(
            adapter,
            metric,
            candidates_per_call=candidates_per_call,
            micro_batch_tokens=micro_batch_tokens,
            max_reference_bytes=max_reference_bytes,
            max_teacher_bytes=max_teacher_bytes,
        )
        self.model = model
        self.spec = spec
        self.metric = metric
        self.calibration = calibration
        self.validation = checked_validation(calibration, validation)
        self.candidates_per_call = int(candidates_per_call)
        self.reuse = bool(reuse)
        self.auto_reference = bool(auto_reference)
        self.max_reference_bytes = int(max_reference_bytes)
        self.last_stats: EvalStats | None = None
        self._adapter = adapter
        self._nb = adapter.num_blocks
        self._max_rows = max(1, int(micro_batch_tokens) // calibration.seq_len)
        # kept as given: a store's host_variants() reads one parameter per lookup, so the
        # stacks built below are the only device copy of the variants
        self._variants = variants
        self._unit_params = tuple(tuple(names) for names in unit_params)
        self._num_levels = spec.num_levels
        self._check_tokens(calibration)
        if validation is not None:
            self._check_tokens(validation)
        owner = self._check_units()

        # Stage of each unit: the block where its parameters enter the forward; those
        # outside the blocks (embeddings, head) count as entering at the start.
        block_of = {
            adapter.block_prefix(i) + rel: i
            for i in range(self._nb)
            for rel in adapter.block_param_names
        }
        self._outer_names = [n for n in adapter.param_names if n not in block_of]
        self._unit_stage = np.full(spec.num_units, self._nb, np.int32)
        for name, u in owner.items():
            self._unit_stage[u] = min(self._unit_stage[u], block_of.get(name, 0))

        host = {name: np.asarray(value) for name, value in model.params.items()}
        self._arrays = self._build_arrays(host, owner)
        skippable = skippable_sublayers(adapter, spec, self._unit_params)
        if skippable is not None and skip_dropped:  # depth supernet: skip dropped sublayers
            self._arrays["depth"] = (
                jnp.asarray(skippable),
                jnp.asarray(dropped_levels(spec)),
            )
        self._tokens = jnp.asarray(joined_tokens(calibration, self.validation))
        self._teacher = self._compute_teacher(self._build_arrays(host, {}), max_teacher_bytes)
        del host
        hidden = jax.eval_shape(
            lambda a, t, c: adapter.embed(_full_params(adapter, a, c), t)[0],
            self._arrays,
            jax.ShapeDtypeStruct((1, calibration.seq_len), jnp.int32),
            jax.ShapeDtypeStruct((spec.num_units,), jnp.int32),
        )
        self._state_bytes_per_token = int(hidden.shape[-1]) * hidden.dtype.itemsize

        # Token set of calibration *positions*: minibatch() of it draws the same rows as
        # minibatch() of the calibration set, and position // seq_len is the row index.
        n_seq, seq_len = calibration.n_seq, calibration.seq_len
        self._positions = TokenSet(
            tokens=np.arange(n_seq * seq_len, dtype=np.int32).reshape(n_seq, seq_len),
            source="calibration positions",
            tokenizer_identity="positions",
            seed=None,
        )
        # keyed by (fidelity, batch_seed, shard index, shard count, split)
        self._row_cache: OrderedDict[
            tuple[int, int, int, int, str], list[tuple[jax.Array, np.ndarray]]
        ] = OrderedDict()
        self._reference: np.ndarray | None = None
        self._states_key: tuple[int, int, int, int, str, bytes] | None = None
        self._states: list[jax.Array] = []

    # ----------------------------------------------------------------- validation
    def _check_tokens(self, tokenset: TokenSet) -> None:
        vocab = self._adapter.hf_config.get("vocab_size")
        if vocab is not None and int(tokenset.tokens.max()) >= int(vocab):
            raise ValueError(
                f"token set holds id {int(tokenset.tokens.max())}, outside the model's "
                f"vocabulary 0..{int(vocab) - 1}"
            )

    def _check_units(self) -> dict[str, int]:
        """Validate unit_params against the spec, the model and the variants; returns the
        owning unit of every changed parameter."""
        spec, params = self.spec, self.model.params
        if len(self._unit_params) != spec.num_units:
            raise ValueError(
                f"unit_params has {len(self._unit_params)} entries, the spec has "
                f"{spec.num_units} units"
            )
        owner: dict[str, int] = {}
        for u, names in enumerate(self._unit_params):
            if not names:
                raise ValueError(f"unit {u} ({spec.units[u].name}) names no parameters")
            for name in names:
                if name in owner:
                    raise ValueError(
                        f"parameter {name!r} belongs to units {owner[name]} and {u}; "
                        "each parameter may belong to one unit"
                    )
                if name not in params:
                    raise ValueError(f"unit {u} names parameter {name!r}, not in the model")
                if name not in self._variants:
                    raise ValueError(f"unit {u} names parameter {name!r}, which has no variants")
                owner[name] = u
        stray = sorted(set(self._variants) - set(owner))
        if stray:
            raise ValueError(f"variants given for parameters no unit names: {stray[:5]}")
        return owner

    def _checked_variants(self, name: str, u: int) -> Variants:
        """The variants of ``name`` (owned by unit ``u``), read once, checked against the
        parameter's shape and the unit's levels."""
        v, shape = self._variants[name], tuple(self.model.params[name].shape)
        got = tuple(v.rank.shape if isinstance(v, NestedVariants) else v.weights.shape[1:])
        if got != shape:
            raise ValueError(f"variants of {name!r} have shape {got}, the parameter has {shape}")
        if v.num_levels != self._num_levels[u]:
            raise ValueError(
                f"variants of {name!r} have {v.num_levels} levels, but unit {u} "
                f"({self.spec.units[u].name}) has {self._num_levels[u]} in the spec"
            )
        return v

    def _check_choices(self, choices: ArrayLike) -> np.ndarray:
        c = np.asarray(choices)
        L = self.spec.num_units
        if c.ndim != 2 or c.shape[1] != L or not np.issubdtype(c.dtype, np.integer):
            raise ValueError(f"choices must be int[n, L={L}], got {c.dtype}{list(c.shape)}")
        bad = np.argwhere((c < 0) | (c >= self._num_levels[None, :]))
        if bad.size:
            r, u = (int(x) for x in bad[0])
            raise ValueError(
                f"choices[{r}, {u}] = {int(c[r, u])} is not a level of unit {u} "
                f"({self.spec.units[u].name}); valid levels are 0..{self._num_levels[u] - 1}"
            )
        return c.astype(np.int32)

    def _build_arrays(self, host: Mapping[str, np.ndarray], owner: Mapping[str, int]):
        """Device stacks of every parameter role: {"blocks": {rel: _Source}, "outer":
        {name: _Source}}; parameters not in ``owner`` are plain."""

        def source(names: Sequence[str]) -> _Source:
            return _build_source(
                [host[n] for n in names],
                [self._checked_variants(n, owner[n]) if n in owner else None for n in names],
                [owner.get(n, -1) for n in names],
            )

        adapter = self._adapter
        blocks = {
            rel: source([adapter.block_prefix(i) + rel for i in range(self._nb)])
            for rel in adapter.block_param_names
        }
        outer = {name: source([name]) for name in self._outer_names}
        return {"blocks": blocks, "outer": outer}

    def _compute_teacher(self, dense_arrays, max_bytes: int) -> TeacherData:
        n_seq = int(self._tokens.shape[0])  # calibration and validation rows
        chunks = _balanced_chunks(np.arange(n_seq, dtype=np.int32), self._max_rows)
        shapes = jax.eval_shape(
            partial(_teacher_program, self._adapter, self.metric),
            dense_arrays,
            self._tokens,
            chunks[0][0],
        )
        rows = len(chunks[0][0])
        nbytes = sum(a.size * a.dtype.itemsize for a in shapes) * n_seq // rows
        if nbytes > max_bytes:
            raise ValueError(
                f"metric {self.metric.name!r} would keep {nbytes / 2**30:.2f} GiB of teacher "
                f"data for {self.calibration.n_tokens} calibration tokens, above "
                f"max_teacher_bytes={max_bytes}; use TopKKLDivergence, fewer tokens, or "
                "raise the limit"
            )
        parts = [
            _teacher_program(self._adapter, self.metric, dense_arrays, self._tokens, rows)
            for rows, _ in chunks
        ]
        return tuple(jnp.concatenate(p, axis=0)[:n_seq] for p in zip(*parts, strict=True))

    # ----------------------------------------------------------------- minibatches
    def _chunks(
        self, fidelity: int, batch_seed: int, shard: tuple[int, int] = (0, 1), split="calibration"
    ) -> list[tuple[jax.Array, np.ndarray]]:
        key = (int(fidelity), int(batch_seed), *shard, split)
        if key in self._row_cache:
            self._row_cache.move_to_end(key)
            return self._row_cache[key]
        validation = getattr(self, "validation", None)
        rows = split_rows(
            split, fidelity, batch_seed, positions=self._positions, validation=validation
        )
        part = shard_rows(rows, *shard)
        if len(part) == 0:
            raise ValueError(
                f"shard {tuple(shard)} of the minibatch (fidelity={fidelity}, "
                f"batch_seed={batch_seed}) is empty: it has {len(rows)} sequences; use at "
                f"most {len(rows)} shards"
            )
        chunks = _balanced_chunks(part.astype(np.int32), self._max_rows)
        self._row_cache[key] = chunks
        if len(self._row_cache) > _MINIBATCH_CACHE_SIZE:
            self._row_cache.popitem(last=False)
        return chunks

    def minibatch_rows(
        self, fidelity: int, batch_seed: int, shard: tuple[int, int] = (0, 1), split="calibration"
    ) -> np.ndarray:
        """int64[fidelity // seq_len]: the calibration sequences (row indices) a query with
        this fidelity and batch seed is scored on, those
        :func:`~allocsearch.data.tokenset.minibatch` draws, in minibatch order; with
        ``shard``, only that shard's (:func:`shard_rows`); validation rows (``split``)
        count from ``calibration.n_seq``."""
        chunks = self._chunks(fidelity, batch_seed, _checked_shard(shard), split)
        return np.concatenate([np.asarray(r)[w > 0] for r, w in chunks]).astype(np.int64)

    # ----------------------------------------------------------------- reference reuse
    def set_reference(self, choice: ArrayLike | None) -> None:
        """Reuse this allocation's hidden states (int[L]) in later calls, or go back to the
        automatic reference (None).

        Later calls start each candidate at the first block where its levels differ from
        ``choice``. The reference's states are computed once per (fidelity, batch_seed),
        by a call whose candidates save more block evaluations than that forward costs.
        """
        if choice is None:
            self._reference = None
        else:
            self._reference = self._check_choices(np.asarray(choice)[None])[0]
        self._states_key, self._states = None, []

    def reference_for(self, choices: ArrayLike) -> np.ndarray | None:
        """int32[L]: the reference a call with ``choices`` (int[n, L]) would use: the one
        set by :meth:`set_reference`, else (with ``auto_reference`` and n >= 2) the
        most common level of each unit (ties: the lower level); None without reuse."""
        c = self._check_choices(choices)
        if not self.reuse:
            return None
        if self._reference is not None:
            return self._reference
        if not self.auto_reference or len(c) < 2:
            return None
        k = int(self._num_levels.max())
        counts = (c[:, :, None] == np.arange(k)[None, None, :]).sum(axis=0)  # [L, K]
        return counts.argmax(axis=1).astype(np.int32)

    def first_differing_block(self, choices: ArrayLike) -> np.ndarray:
        """int32[n]: for each candidate, the first block whose levels differ from the
        reference's (:meth:`reference_for`): ``num_blocks`` for the reference itself, 0
        for a unit outside the blocks, all 0 without a reference."""
        c = self._check_choices(choices)
        return self._first_blocks(c, self.reference_for(c))

    def _first_blocks(self, c: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
        if reference is None:
            return np.zeros(len(c), np.int32)
        diff = c != reference[None, :]
        return np.where(diff, self._unit_stage[None, :], self._nb).min(axis=1).astype(np.int32)

    def _reference_states(self, key, chunks, starts, reference) -> tuple[bool, bool]:
        """Cache the reference's states for minibatch ``key`` when reuse pays.

        Returns:
          (whether to reuse, whether the states were computed now).
        """
        if reference is None or not np.any(starts > 0):
            return False, False
        full_key = (*key, reference.tobytes())
        if self._states_key == full_key:
            return True, False
        rows = sum(len(r) for r, _ in chunks)
        nbytes = (self._nb + 1) * rows * self.calibration.seq_len * self._state_bytes_per_token
        # The reference forward costs num_blocks blocks; reuse must save more than that.
        if nbytes > self.max_reference_bytes or starts.sum() <= self._nb:
            return False, False
        ref = jnp.asarray(reference)
        self._states = [
            _states_program(self._adapter, self._arrays, self._tokens, ref, rows)
            for rows, _ in chunks
        ]
        self._states_key = full_key
        return True, True

    # ----------------------------------------------------------------- scoring
    def __call__(
        self,
        choices: ArrayLike,
        *,
        fidelity: int,
        batch_seed: int,
        shard: tuple[int, int] = (0, 1),
        split: str = "calibration",
    ) -> np.ndarray:
        """Scores of candidates on the minibatch ``(fidelity, batch_seed)``.

        Args:
          choices: int[n, L], one level per unit per candidate.
          fidelity: number of calibration tokens (a multiple of the sequence length, at
            most the calibration set's size).
          batch_seed: which minibatch (non-negative); equal arguments give equal scores.
          shard: ``(index, count)``: score only the ``index``-th of ``count`` near-equal
            splits of the minibatch's sequences (:func:`shard_rows`; must not be empty).
            The mean over all shards weighted by their sequence counts is the unsharded
            score (to float rounding): processes can split one query by tokens.
          split: ``"validation"``: the minibatch of the validation rows (fidelity up to
            their size) instead of the calibration rows (:mod:`~allocsearch.evaluate.splits`).

        Returns:
          float32[n], the metric's mean over the (shard of the) minibatch's sequences
          (= over its tokens for per-token metrics); lower is better.
        """
        c = self._check_choices(choices)
        n = len(c)
        shard = _checked_shard(shard)
        key = (int(fidelity), int(batch_seed), *shard, split)
        chunks = self._chunks(int(fidelity), int(batch_seed), shard, split)
        if n == 0:
            return np.zeros((0,), np.float32)
        reference = self.reference_for(c)
        starts = self._first_blocks(c, reference)
        reused, computed = self._reference_states(key, chunks, starts, reference)
        if not reused:
            starts = np.zeros(n, np.int32)
        # Sorted by first differing block, a group starts near all of its members' starts.
        order = np.argsort(starts, kind="stable")
        g = self.candidates_per_call
        sizes = [min(g, n - j) for j in range(0, n, g)]  # real candidates per group
        groups = [order[j : j + g] for j in range(0, n, g)]
        groups = [np.concatenate([q, np.full(g - len(q), q[-1])]) for q in groups]
        outputs = []
        for ci, (rows, _) in enumerate(chunks):
            for q in groups:
                outputs.append(
                    _score_program(
                        self._adapter,
                        self.metric,
                        self._arrays,
                        self._teacher,
                        self._tokens,
                        jnp.asarray(c[q]),
                        jnp.asarray(starts[q]),
                        jnp.asarray(starts[q].min(), jnp.int32),
                        rows,
                        self._states[ci] if reused else None,
                    )
                )
        losses = np.asarray(jax.device_get(outputs), np.float64)  # [chunks * groups, g, R]
        losses = losses.reshape(len(chunks), len(groups), g, -1)
        weights = np.stack([w for _, w in chunks])  # [chunks, R]
        per_slot = np.einsum("cqgr,cr->qg", losses, weights) / weights.sum()
        scores = np.empty(n, np.float64)
        for qi, q in enumerate(groups):
            scores[q[: sizes[qi]]] = per_slot[qi][: sizes[qi]]
        blocks = [self._nb - int(starts[q].min()) for q in groups]
        self.last_stats = EvalStats(
            candidates=n,
            reused=reused,
            computed_reference=computed,
            blocks_run=float(np.dot(blocks, sizes) / n),
        )
        return scores.astype(np.float32)

    # ----------------------------------------------------------------- final checks
    def materialize(self, choice: ArrayLike) -> dict[str, jax.Array]:
        """The full parameter dict of allocation ``choice`` (int[L]): every parameter a
        unit names replaced by its variant at the unit's level (the pruner's own
        ``mask``/``weights``, not the evaluator's stacks), the rest dense."""
        c = self._check_choices(np.asarray(choice)[None])[0]
        params = dict(self.model.params)
        for u, names in enumerate(self._unit_params):
            for name in names:
                v, k, dense = self._variants[name], int(c[u]), params[name]
                if isinstance(v, NestedVariants):
                    params[name] = jnp.where(v.mask(k), dense, jnp.zeros((), dense.dtype))
                else:
                    params[name] = jnp.asarray(v.weights[k], dense.dtype)
        return params

    def perplexity(self, choice: ArrayLike | None, tokenset: TokenSet) -> float:
        """Perplexity (``exp`` of the mean next-token NLL; lower is better) of allocation
        ``choice`` (int[L]; None = the dense model) over every sequence of ``tokenset``,
        e.g. the held-out set. Causal language models only."""
        if not self._adapter.is_causal_lm:
            raise ValueError(
                f"perplexity needs a causal language model, not a {self._adapter.family} encoder"
            )
        self._check_tokens(tokenset)
        if tokenset.seq_len < 2:
            raise ValueError(f"perplexity needs sequences of >= 2 tokens, got {tokenset.seq_len}")
        params = self.model.params if choice is None else self.materialize(choice)
        tokens = jnp.asarray(tokenset.tokens)
        max_rows = max(1, self._max_rows * self.calibration.seq_len // tokenset.seq_len)
        total = 0.0
        for rows, w in _balanced_chunks(np.arange(tokenset.n_seq, dtype=np.int32), max_rows):
            nll = _nll_program(self._adapter, params, tokens[rows], jnp.asarray(w, jnp.float32))
            total += float(nll)
        return float(math.exp(total / (tokenset.n_seq * (tokenset.seq_len - 1))))

    @property
    def teacher(self) -> TeacherData:
        """The metric's teacher data for every calibration sequence (leading axis n_seq)."""
        return self._teacher


__all__ = ["EvalStats", "Evaluator", "shard_rows"]
