"""The block-streaming evaluator: scores allocations of supernets that do not fit a device.

A :class:`StreamingEvaluator` follows the same protocol as the resident
:class:`~allocsearch.evaluate.evaluator.Evaluator`
(:class:`~allocsearch.evaluate.protocol.AllocationEvaluator`) and gives the same scores
(to float rounding), but never holds more than two blocks' weights on the device and
never reads a variant that no candidate of the query uses. Per query of ``n``
candidates:

* **Block by block.** For every unit of block ``i`` the distinct levels that the query's
  (active) candidates use are read from the memory-mapped store
  (:meth:`~allocsearch.supernet.store.SupernetStore.read_levels`), with the block's
  dense weights from the (lazily loaded) model, and moved to the device in one
  ``device_put``. There they are assembled into per-parameter stacks of a fixed number
  of level slots, P = min(the unit's number of levels, the query's members; a member
  uses one level of each unit, so no query needs more; unused slots repeat a read level and
  cost no transfer), so one compiled block program serves every query and candidate:
  candidates index their slot inside ``jit`` (``vmap`` over candidates, as the
  resident ``_score_program``). Stacks stay in the store's dtype; a candidate's slot is
  cast to the compute dtype when it is used. On a CPU backend, where device memory is
  host memory, the levels are read straight into aligned [P, ...] host buffers that
  ``device_put`` aliases: one copy of a block's variants, no assembly.
* **Dropped sublayers are skipped.** On depth supernets a candidate's dropped sublayers
  are branched around (``lax.cond``, candidates ``lax.map``-ed instead of ``vmap``-ed;
  :func:`~allocsearch.supernet.depth.skippable_sublayers`).
* **All candidates advance together.** The hidden states of all ``n`` candidates stay on
  the device between blocks, in micro-batches of ``candidates_per_call`` candidates x
  ``micro_batch_tokens`` tokens (one program call each), so a block's weights are read
  and moved once per query, whatever ``n``.
* **Prefetch.** A background thread reads and moves block ``i + 1`` while block ``i``
  computes.
* **Teacher on the host.** The metric's teacher data (e.g. top-k log-probs) is computed
  once at construction by a streamed dense forward and kept in host memory; a query
  moves only its rows.
* **Reference reuse** as in the resident evaluator (same reference, same rule for when
  it pays): the reference's states at every block input for the query's minibatch are
  recorded *in the same pass* (the reference rides along as one more candidate), kept
  on the device up to ``max_device_reference_bytes`` and on the host above; later
  candidates start at their first differing block, and a block that no candidate
  needs is neither read nor run.

With ``stream_unit="unit"`` a block is computed one unit group at a time instead
(:mod:`allocsearch.evaluate.unit_streaming`), so the device holds one group's variants
(two, with prefetch); everything above holds with "unit group" for "block".

The parameters outside the blocks (embeddings, final norm, head) that no unit changes
stay on the device for the evaluator's lifetime. The blocks' context (rotary tables,
masks) is taken to depend on the tokens only, as it does for every family here.
All computation is ``jnp``; the same code runs on CPU and GPU.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike

from allocsearch.data.tokenset import TokenSet
from allocsearch.evaluate.evaluator import (
    Evaluator,
    _balanced_chunks,
    _checked_shard,
    check_evaluator_args,
)
from allocsearch.evaluate.metrics import Metric, TeacherData
from allocsearch.evaluate.splits import checked_validation, joined_tokens
from allocsearch.evaluate.stream_programs import (
    _aligned_empty,
    _assemble_program,
    _block_program,
    _ctx_program,
    _Loaded,
    _nbytes,
    _nll_finish_program,
    _Pass,
    _score_finish_program,
    _Stage,
    _teacher_finish_program,
    _unmap_large_frees,
)
from allocsearch.models.hf import HFModel, LazyParams
from allocsearch.supernet.depth import dropped_levels, skippable_sublayers
from allocsearch.supernet.spec import SupernetSpec
from allocsearch.supernet.store import SupernetStore

__all__ = ["STREAM_UNITS", "StreamStats", "StreamingEvaluator"]

STREAM_UNITS = ("block", "unit")
"""What a streaming evaluator holds on the device at a time: a block's variants, or one
unit group's (:mod:`allocsearch.evaluate.unit_streaming`)."""


class StreamStats(NamedTuple):
    """What the last :meth:`StreamingEvaluator.__call__` did; the first four fields are
    those of :class:`~allocsearch.evaluate.evaluator.EvalStats`.

    Attributes:
      candidates: candidates scored.
      reused: whether the reference's hidden states were used.
      computed_reference: whether this call recorded the reference's states (the
        reference rode along as one more candidate).
      blocks_run: mean number of blocks run per candidate (counted from each group's
        first block, padding excluded).
      store_bytes: bytes of variant weights read from the store (each distinct (parameter,
        level) the query's active candidates use, once per block; as returned by
        ``read_levels``, i.e. unpacked, in the storage dtype).
      dense_bytes: bytes of dense weights read from the model (the blocks' parameters no
        unit changes, and the dense weights nested variants mask).
      transfer_bytes: bytes moved from the host to the device (weights, reference states
        of the host, teacher rows).
      variants_read: distinct (parameter, level) pairs read, summed over blocks.
      blocks_streamed: blocks whose weights were read (blocks no candidate needed are
        skipped).
    """

    candidates: int
    reused: bool
    computed_reference: bool
    blocks_run: float
    store_bytes: int = 0
    dense_bytes: int = 0
    transfer_bytes: int = 0
    variants_read: int = 0
    blocks_streamed: int = 0


class StreamingEvaluator:
    """Scores level vectors of a supernet store block by block: ``choices`` int32[n, L]
    -> float32[n] (lower is better), the scores of the resident
    :class:`~allocsearch.evaluate.evaluator.Evaluator` to float rounding.

    Args:
      model: the dense model, best loaded with ``load_model(..., lazy=True)`` so that its
        weights stay memory-mapped on the host (a model of device arrays works too).
      store: the supernet store; only the variants a query uses are read from it.
      calibration: the calibration token set minibatches are drawn from.
      metric: the fitness (lower is better); see :mod:`allocsearch.evaluate.metrics`.
      candidates_per_call: candidates ``vmap``-ed through one program call.
      micro_batch_tokens: at most this many tokens (whole sequences, at least one) per
        candidate per call; bounds activation and logit memory.
      reuse: allow reference reuse (see the module docstring).
      auto_reference: without :meth:`set_reference`, use each call's per-unit most common
        level as the reference (as the resident evaluator).
      prefetch: read and move block ``i + 1`` on a background thread while block ``i``
        computes.
      max_reference_bytes: reuse is skipped at fidelities whose reference states
        (``(num_blocks + 1) * fidelity * hidden * itemsize`` bytes) would exceed this
        (the resident evaluator's rule, so both reuse in the same calls).
      max_device_reference_bytes: reference states above this are kept on the host and
        moved per block when a candidate group starts there.
      max_device_state_bytes: when the hidden states of all of a query's candidates on its
        minibatch (``n * fidelity * hidden * itemsize`` bytes) exceed this, they are
        parked in host memory between blocks (each micro-batch moved in and out).
      max_teacher_bytes: refuse a metric whose teacher data for the whole calibration set
        would exceed this (host memory).
      skip_dropped: on depth supernets, branch around each candidate's dropped sublayers
        (candidates run one after another); False runs their zero weights (``vmap``),
        for comparison: the scores are the same.
      stream_unit: ``"block"`` (a block's variants on the device at a time) or ``"unit"``
        (one unit group's: :mod:`allocsearch.evaluate.unit_streaming`; same scores).
      validation: rows a ``split="validation"`` query scores (as the resident evaluator).

    Raises:
      ValueError: mismatched inputs (the message names the unit or parameter).

    Device memory: the parameters outside the blocks, two blocks' weights (their
    parameters no unit changes, and a stack of min(levels, query members) slots for each
    parameter a unit changes), the hidden states of all candidates of a query on its
    minibatch (up to ``max_device_state_bytes``; then one micro-batch's), one
    micro-batch's activations and, with reuse, the reference's states (up to
    ``max_device_reference_bytes``).
    """

    def __init__(
        self,
        model: HFModel,
        store: SupernetStore,
        calibration: TokenSet,
        *,
        metric: Metric,
        candidates_per_call: int = 1,
        micro_batch_tokens: int = 8192,
        reuse: bool = True,
        auto_reference: bool = True,
        prefetch: bool = True,
        max_reference_bytes: int = 2**30,
        max_device_reference_bytes: int = 2**30,
        max_device_state_bytes: int = 2**32,
        max_teacher_bytes: int = 2**33,
        skip_dropped: bool = True,
        stream_unit: str = "block",
        validation: TokenSet | None = None,
    ):
        adapter = model.adapter
        _unmap_large_frees()
        check_evaluator_args(
            adapter,
            metric,
            candidates_per_call=candidates_per_call,
            micro_batch_tokens=micro_batch_tokens,
            max_reference_bytes=max_reference_bytes,
            max_device_reference_bytes=max_device_reference_bytes,
            max_device_state_bytes=max_device_state_bytes,
            max_teacher_bytes=max_teacher_bytes,
        )
        self.model = model
        self.store = store
        self.spec: SupernetSpec = store.spec
        self.metric = metric
        self.calibration = calibration
        self.validation = checked_validation(calibration, validation)  # evaluate/splits.py
        self.candidates_per_call = int(candidates_per_call)
        self.reuse = bool(reuse)
        self.auto_reference = bool(auto_reference)
        self.prefetch = bool(prefetch)
        self.max_reference_bytes = int(max_reference_bytes)
        self.max_device_reference_bytes = int(max_device_reference_bytes)
        self.max_device_state_bytes = int(max_device_state_bytes)
        if stream_unit not in STREAM_UNITS:
            raise ValueError(
                f"stream_unit {stream_unit!r} is not valid; choose one of {STREAM_UNITS}"
            )
        self.stream_unit = stream_unit
        self.last_stats: StreamStats | None = None
        self._adapter = adapter
        self._nb = adapter.num_blocks
        self._max_rows = max(1, int(micro_batch_tokens) // calibration.seq_len)
        self._num_levels = self.spec.num_levels
        self._check_tokens(calibration)
        if validation is not None:
            self._check_tokens(validation)
        params = model.params
        self._dtype = np.dtype(
            params.dtype if isinstance(params, LazyParams) else next(iter(params.values())).dtype
        )
        owner = self._check_units()
        manifest_variants = store.manifest["variants"]
        self._nested = {p for p in owner if manifest_variants[p].get("kind") != "dense"}

        block_of = {
            adapter.block_prefix(i) + rel: i
            for i in range(self._nb)
            for rel in adapter.block_param_names
        }
        self._unit_stage = np.full(self.spec.num_units, self._nb, np.int32)
        for name, u in owner.items():
            self._unit_stage[u] = min(self._unit_stage[u], block_of.get(name, 0))
        self._blocks = [
            self._stage(
                [(rel, adapter.block_prefix(i) + rel) for rel in adapter.block_param_names],
                owner,
            )
            for i in range(self._nb)
        ]
        outer = [(n, n) for n in adapter.param_names if n not in block_of]
        self._outer = self._stage(outer, owner)
        # Parameters outside the blocks that no unit changes stay on the device.
        self._outer_plain = jax.device_put({k: params[n] for k, n in self._outer.plain})

        self._tokens = jnp.asarray(joined_tokens(calibration, self.validation))
        probe = jax.eval_shape(
            lambda p, t: adapter.embed(p, t)[0],
            {n: jax.ShapeDtypeStruct(s, self._dtype) for n, s in adapter.param_shapes.items()},
            jax.ShapeDtypeStruct((1, calibration.seq_len), jnp.int32),
        )
        self._state_bytes_per_token = int(probe.shape[-1]) * probe.dtype.itemsize
        self._executor: ThreadPoolExecutor | None = None
        # On a CPU backend the "device" is host memory: stacks are read into aligned host
        # buffers that device_put aliases (no second copy, no assembly program).
        self._host_is_device = jax.default_backend() == "cpu"
        self._layouts: dict[str, tuple[tuple[int, ...], Any]] = {}
        # Depth supernets: each block's dropped sublayers are skipped per candidate.
        self._skippable = (
            skippable_sublayers(adapter, self.spec, store.unit_params) if skip_dropped else None
        )
        self._dropped = dropped_levels(self.spec)
        if stream_unit == "unit":
            from allocsearch.evaluate.unit_streaming import unit_stages

            self._unit_stages = unit_stages(self, owner)
        self._teacher = self._compute_teacher(int(max_teacher_bytes))

        n_seq, seq_len = calibration.n_seq, calibration.seq_len
        self._positions = TokenSet(
            tokens=np.arange(n_seq * seq_len, dtype=np.int32).reshape(n_seq, seq_len),
            source="calibration positions",
            tokenizer_identity="positions",
            seed=None,
        )
        self._row_cache: OrderedDict[tuple[int, ...], list[tuple[jax.Array, np.ndarray]]] = (
            OrderedDict()
        )
        self._reference: np.ndarray | None = None
        self._states_key: tuple | None = None
        self._states: list[list[Any]] = []  # [block input 0..nb][chunk] -> [R, T, D]

    # ----------------------------------------------------------------- shared with Evaluator
    # One implementation of choice checks, minibatch rows and the reference rule: the
    # resident evaluator's, over the same attributes.
    _check_tokens = Evaluator._check_tokens
    _check_choices = Evaluator._check_choices
    _chunks = Evaluator._chunks
    minibatch_rows = Evaluator.minibatch_rows
    set_reference = Evaluator.set_reference
    reference_for = Evaluator.reference_for
    first_differing_block = Evaluator.first_differing_block
    _first_blocks = Evaluator._first_blocks

    # ----------------------------------------------------------------- validation
    def _check_units(self) -> dict[str, int]:
        """Owning unit of every parameter the store changes, checked against the model."""
        spec, store = self.spec, self.store
        unit_params = store.unit_params
        if len(unit_params) != spec.num_units:
            raise ValueError(
                f"the store names parameters of {len(unit_params)} units, its spec has "
                f"{spec.num_units}"
            )
        shapes = self._adapter.param_shapes
        owner: dict[str, int] = {}
        for u, names in enumerate(unit_params):
            for name in names:
                if name not in shapes:
                    raise ValueError(
                        f"unit {u} ({spec.units[u].name}) of {store.path} names parameter "
                        f"{name!r}, not in the {self._adapter.model_type} model"
                    )
                if name in owner:
                    raise ValueError(
                        f"parameter {name!r} belongs to units {owner[name]} and {u}; "
                        "each parameter may belong to one unit"
                    )
                owner[name] = u
        return owner

    @staticmethod
    def _stage(names: Sequence[tuple[str, str]], owner: Mapping[str, int]) -> _Stage:
        plain = tuple((k, n) for k, n in names if n not in owner)
        owned = tuple(sorted((k, n, owner[n]) for k, n in names if n in owner))
        return _Stage(plain, owned)

    # ----------------------------------------------------------------- loading weights
    def _load(
        self, stage: _Stage, members: np.ndarray | None, active: np.ndarray, *, plain: bool = True
    ) -> _Loaded:
        """Read one stage's weights for ``members`` (int32[m, L]; None: the dense model),
        the levels of the ``active`` members (bool[m]) only, and move them to the device
        in one ``device_put``; then assemble the stacks there. Without ``plain`` the
        parameters no unit changes are left out (the caller has them)."""
        params = self.model.params
        host_plain = {k: params[n] for k, n in stage.plain} if plain else {}
        if members is None:
            host_plain.update({k: params[n] for k, n, _ in stage.owned})
        dense_bytes = sum(_nbytes(v) for v in host_plain.values())
        slots = np.zeros((1 if members is None else len(members), 0), np.int32)
        slabs: dict[str, list[np.ndarray]] = {}
        host_stacks: dict[str, np.ndarray] = {}
        n_slots: dict[str, int] = {}
        store_bytes = variants = 0
        if members is not None:
            slots = np.zeros((len(members), len(stage.owned)), np.int32)
            for j, (k, n, u) in enumerate(stage.owned):
                levels = np.unique(members[active, u])
                slots[:, j] = np.minimum(np.searchsorted(levels, members[:, u]), len(levels) - 1)
                dense = None
                if n in self._nested:
                    dense = np.asarray(params[n])
                    dense_bytes += int(dense.nbytes)
                # P = min(levels, members) slots: a member uses one level, so a query
                # never needs more; fixed per query size, so one program per shape
                n_slots[k] = min(int(self._num_levels[u]), len(members))
                if self._host_is_device:
                    # Read straight into the first slots of an aligned [P, ...] buffer
                    # that device_put aliases: one copy of the block, no assembly.
                    shape, dtype = self._slot_layout(n, dense)
                    host_stacks[k] = _aligned_empty((n_slots[k], *shape), dtype)
                    got = self.store.read_levels(
                        n, levels.tolist(), dense, out=host_stacks[k][: len(levels)]
                    )
                else:
                    got = self.store.read_levels(n, levels.tolist(), dense)
                    slabs[k] = list(got)  # views: fixed-shape slabs whatever the count
                store_bytes += int(got.nbytes)
                variants += len(levels)
        transfer = sum(_nbytes(v) for v in host_plain.values() if not isinstance(v, jax.Array))
        transfer += store_bytes
        dev_plain, dev_slabs, stacks = jax.device_put((host_plain, slabs, host_stacks))
        if dev_slabs:
            padded = {}
            for k, parts in dev_slabs.items():
                # Unused slots repeat a moved slab (never selected; no transfer).
                padded[k] = tuple(parts) + (parts[0],) * (n_slots[k] - len(parts))
            stacks = _assemble_program(padded)
        return _Loaded(dev_plain, stacks, slots, store_bytes, dense_bytes, transfer, variants)

    def _slot_layout(self, name: str, dense: np.ndarray | None) -> tuple[tuple[int, ...], Any]:
        """(shape, dtype) of one level of parameter ``name`` as ``read_levels`` returns it."""
        if name not in self._layouts:
            if dense is not None:  # nested: the dense weight's shape and dtype
                self._layouts[name] = (tuple(dense.shape), dense.dtype)
            else:
                empty = self.store.read_levels(name, [])
                self._layouts[name] = (tuple(empty.shape[1:]), empty.dtype)
        return self._layouts[name]

    def _loader(self, stages: Sequence[int], load: Callable[[int], _Loaded]):
        """Yield ``load(i)`` for each block ``i`` of ``stages``, the next one prefetched."""
        if not self.prefetch:
            for i in stages:
                yield load(i)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="allocsearch-prefetch")
        pending: Future | None = None
        for j, i in enumerate(stages):
            current = pending.result() if pending is not None else load(i)
            pending = self._executor.submit(load, stages[j + 1]) if j + 1 < len(stages) else None
            yield current

    # ----------------------------------------------------------------- the streamed pass
    def _forward(
        self,
        members: np.ndarray | None,
        starts: np.ndarray,
        tokens: jax.Array,
        chunks: Sequence[tuple[jax.Array, np.ndarray]],
        finish: Callable[[_Loaded, np.ndarray, jax.Array, Any, int], Any],
        *,
        group_size: int,
        record: int | None = None,
    ) -> tuple[list[list[Any]], dict[str, int], list[np.ndarray]]:
        """Run ``members`` (int32[m, L]; None: the dense model) through the model on the
        rows of ``chunks``: member ``j`` starts at block ``starts[j]`` from the reference's
        states there (``self._states``), or from the embeddings at 0; block by block, or
        unit group by unit group (``stream_unit="unit"``).

        Returns:
          (``finish(outer, slots, h, ctx, chunk)`` for [group][chunk], byte and block
          counts, the member indices of each group (padded)). With ``record`` (a member
          index), that member's states at every block input are stored in
          ``self._states``.
        """
        p = _Pass(self, members, starts, tokens, chunks, group_size, record)
        blocks = list(range(int(p.gstart.min()), self._nb))
        if self.stream_unit == "unit":
            from allocsearch.evaluate.unit_streaming import stream_units

            stream_units(self, p, blocks)
        else:
            self._stream_blocks(p, blocks)
        for g in np.flatnonzero(p.gstart == self._nb):
            p.activate(int(g), self._nb)
        outputs = [
            [
                finish(p.outer, p.outer.slots[q], p.device(p.h[g, c]), p.ctxs[c], c)
                for c in range(len(chunks))
            ]
            for g, q in enumerate(p.groups)
        ]
        return outputs, p.counts, p.groups

    def _stream_blocks(self, p: _Pass, blocks: Sequence[int]) -> None:
        """Every block of ``blocks`` in turn, its weights read whole (the next prefetched)."""
        loads = self._loader(
            blocks, lambda i: self._load(self._blocks[i], p.members, p.active_members(i))
        )
        for i, loaded in zip(blocks, loads, strict=True):
            p.account(loaded)
            p.start_block(i)
            skip = self._skip_flags(i, p.members)
            for g in p.running(i):
                slots = loaded.slots[p.groups[g]]
                flags = None if skip is None else skip[p.groups[g]]
                for c in range(len(p.chunks)):
                    p.h[g, c] = _block_program(
                        self._adapter,
                        loaded.plain,
                        loaded.stacks,
                        slots,
                        p.device(p.h[g, c]),
                        p.ctxs[c],
                        flags,
                    )
            p.end_block(i)

    def _skip_flags(self, i: int, members: np.ndarray | None) -> np.ndarray | None:
        """bool[m, S]: the sublayers of block ``i`` each member drops (None: nothing to
        skip in this block, or the dense model)."""
        if members is None or self._skippable is None or (self._skippable[i] < 0).all():
            return None
        units = self._skippable[i]
        safe = np.maximum(units, 0)
        return (units >= 0) & self._dropped[safe, members[:, safe]]

    @property
    def _states_on_device(self) -> bool:
        return self._reference_bytes_now <= self.max_device_reference_bytes

    # ----------------------------------------------------------------- teacher
    def _compute_teacher(self, max_bytes: int) -> TeacherData:
        n_seq = int(self._tokens.shape[0])  # calibration and validation rows
        chunks = _balanced_chunks(np.arange(n_seq, dtype=np.int32), self._max_rows)
        outer_dense = {k: self.model.params[n] for k, n, _ in self._outer.owned}
        shapes = jax.eval_shape(
            partial(_teacher_finish_program, self._adapter, self.metric, self._dtype),
            {**self._outer_plain, **outer_dense},
            jax.ShapeDtypeStruct(
                (1, len(chunks[0][0]), self.calibration.seq_len, self._hidden_size()),
                self._dtype,
            ),
            jax.eval_shape(
                partial(_ctx_program, self._adapter, self._dtype), self._tokens, chunks[0][0]
            ),
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

        def finish(outer, slots, h, ctx, c):
            return _teacher_finish_program(
                self._adapter,
                self.metric,
                self._dtype,
                outer.plain,
                h,
                ctx,
                self._tokens,
                chunks[c][0],
            )

        self._reference_bytes_now = 0
        outputs, _, _ = self._forward(
            None, np.zeros(1, np.int32), self._tokens, chunks, finish, group_size=1
        )
        parts = [jax.device_get(p) for p in outputs[0]]
        return tuple(
            np.concatenate([np.asarray(p[k]) for p in parts], axis=0)[:n_seq]
            for k in range(len(parts[0]))
        )

    def _hidden_size(self) -> int:
        return self._state_bytes_per_token // self._dtype.itemsize

    @property
    def teacher(self) -> TeacherData:
        """The metric's teacher data for every calibration sequence (host arrays, leading
        axis n_seq)."""
        return self._teacher

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
        """Scores of candidates on the minibatch ``(fidelity, batch_seed)``; the arguments
        and result are those of :meth:`Evaluator.__call__
        <allocsearch.evaluate.evaluator.Evaluator.__call__>` (``shard``, ``split`` included)."""
        c = self._check_choices(choices)
        n = len(c)
        shard = _checked_shard(shard)
        key = (int(fidelity), int(batch_seed), *shard, split)
        chunks = self._chunks(int(fidelity), int(batch_seed), shard, split)
        if n == 0:
            return np.zeros((0,), np.float32)
        reference = self.reference_for(c)
        starts = self._first_blocks(c, reference)
        n_rows = sum(len(r) for r, _ in chunks)
        self._reference_bytes_now = (
            (self._nb + 1) * n_rows * self.calibration.seq_len * self._state_bytes_per_token
        )
        reused, computed = False, False
        members, member_starts, record = c, starts, None
        if reference is not None and np.any(starts > 0):
            full_key = (*key, reference.tobytes())
            if self._states_key == full_key:
                reused = True
            elif self._reference_bytes_now <= self.max_reference_bytes and starts.sum() > self._nb:
                reused = computed = True
                # The reference rides along as member n, from block 0.
                members = np.concatenate([c, reference[None]])
                member_starts = np.concatenate([starts, np.zeros(1, np.int32)])
                record = n
                self._states_key = None
        if not reused:
            member_starts = np.zeros(n, np.int32)
        host_rows = [np.asarray(rows) for rows, _ in chunks]
        teacher_dev = [jax.device_put(tuple(t[r] for t in self._teacher)) for r in host_rows]
        teacher_bytes = sum(sum(t[r].nbytes for t in self._teacher) for r in host_rows)

        def finish(outer, slots, h, ctx, ci):
            return _score_finish_program(
                self._adapter,
                self.metric,
                self._dtype,
                outer.plain,
                outer.stacks,
                slots,
                h,
                ctx,
                teacher_dev[ci],
                self._tokens,
                chunks[ci][0],
            )

        outputs, counts, groups = self._forward(
            members,
            member_starts,
            self._tokens,
            chunks,
            finish,
            group_size=self.candidates_per_call,
            record=record,
        )
        if computed:
            self._states_key = (*key, reference.tobytes())
        losses = np.asarray(jax.device_get(outputs), np.float64)  # [groups, chunks, G, R]
        weights = np.stack([w for _, w in chunks])  # [chunks, R]
        per_slot = np.einsum("qcgr,cr->qg", losses, weights) / weights.sum()
        scores = np.full(len(members), np.nan)
        for qi, q in enumerate(groups):
            scores[q] = per_slot[qi]
        self.last_stats = StreamStats(
            candidates=n,
            reused=reused,
            computed_reference=computed,
            blocks_run=float(np.mean(self._group_blocks(groups, member_starts, n))),
            store_bytes=counts["store_bytes"],
            dense_bytes=counts["dense_bytes"],
            transfer_bytes=counts["transfer_bytes"] + teacher_bytes,
            variants_read=counts["variants_read"],
            blocks_streamed=counts["blocks_streamed"],
        )
        return scores[:n].astype(np.float32)

    def _group_blocks(self, groups, starts, n) -> np.ndarray:
        """Blocks run for each real candidate (from its group's first block)."""
        out = np.zeros(n)
        for q in groups:
            first = int(starts[q].min())
            for j in q:
                if j < n:
                    out[j] = self._nb - first
        return out

    # ----------------------------------------------------------------- final checks
    def perplexity(self, choice: ArrayLike | None, tokenset: TokenSet) -> float:
        """Perplexity (``exp`` of the mean next-token NLL; lower is better) of allocation
        ``choice`` (int[L]; None = the dense model) over every sequence of ``tokenset``,
        streamed block by block. Causal language models only."""
        if not self._adapter.is_causal_lm:
            raise ValueError(
                f"perplexity needs a causal language model, not a {self._adapter.family} encoder"
            )
        self._check_tokens(tokenset)
        if tokenset.seq_len < 2:
            raise ValueError(f"perplexity needs sequences of >= 2 tokens, got {tokenset.seq_len}")
        members = None if choice is None else self._check_choices(np.asarray(choice)[None])
        tokens = jnp.asarray(tokenset.tokens)
        max_rows = max(1, self._max_rows * self.calibration.seq_len // tokenset.seq_len)
        chunks = _balanced_chunks(np.arange(tokenset.n_seq, dtype=np.int32), max_rows)

        def finish(outer, slots, h, ctx, c):
            rows, w = chunks[c]
            return _nll_finish_program(
                self._adapter,
                self._dtype,
                outer.plain,
                outer.stacks,
                slots,
                h,
                ctx,
                tokens,
                rows,
                jnp.asarray(w, jnp.float32),
            )

        outputs, _, _ = self._forward(
            members, np.zeros(1, np.int32), tokens, chunks, finish, group_size=1
        )
        total = float(sum(float(x) for x in outputs[0]))
        return float(math.exp(total / (tokenset.n_seq * (tokenset.seq_len - 1))))

    def close(self) -> None:
        """Stop the prefetch thread (idempotent; the evaluator stays usable)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __del__(self) -> None:
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False)
