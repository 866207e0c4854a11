"""The streaming evaluators' compiled programs and host buffers (block and unit streaming)."""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import sys
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from allocsearch.evaluate.metrics import next_token_nll
from allocsearch.models.base import ModelAdapter

# ----------------------------------------------------------------------- compiled programs
# Module level so that evaluators of one model share compiled programs. ``plain`` maps
# parameter names to device arrays used as they are; ``stacks`` maps names to [P, *shape]
# device arrays of P level slots; ``slots`` int32[G, len(stacks)] picks each candidate's
# slot of each stack (columns in sorted name order).


def _pick(plain, stacks, slot: jax.Array, dtype) -> dict[str, jax.Array]:
    """One candidate's parameters: ``plain`` plus its slot of every stack, cast to the
    compute ``dtype`` (stacks stay in the store's dtype; one slot is cast at a time)."""
    params = dict(plain)
    for j, name in enumerate(sorted(stacks)):
        params[name] = stacks[name][slot[j]].astype(dtype)
    return params


def _placeholders(adapter: ModelAdapter, dtype) -> dict[str, jax.Array]:
    """Shape-only stand-ins for every block parameter (``embed``/``finish`` merge the full
    module but read none of them; XLA drops the unused broadcasts)."""
    zero = jnp.zeros((), dtype)
    out = {}
    for i in range(adapter.num_blocks):
        prefix = adapter.block_prefix(i)
        for rel in adapter.block_param_names:
            out[prefix + rel] = jnp.broadcast_to(zero, adapter.param_shapes[prefix + rel])
    return out


def _per_candidate(fn, slots: jax.Array, *args, sequential: bool = False):
    """``fn(slot, *args)`` for every candidate's slot row (args batched on axis 0);
    ``vmap``-ed, or one candidate after another with ``sequential`` (what lets a branch
    inside ``fn`` skip work)."""
    if slots.shape[0] == 1:  # no batch axis in the matmuls
        one = fn(slots[0], *(jax.tree.map(lambda x: x[0], a) for a in args))
        return jax.tree.map(lambda x: x[None], one)
    if sequential:
        return jax.lax.map(lambda a: fn(*a), (slots, *args))
    return jax.vmap(fn)(slots, *args)


@jax.jit
def _assemble_program(slabs):
    """{name: tuple of P [*shape] slabs} -> {name: [P, *shape]}, in the slabs' (storage)
    dtype: the compute-dtype copy is made per candidate, one slot at a time."""
    return {name: jnp.stack(parts) for name, parts in slabs.items()}


@partial(jax.jit, static_argnums=(0, 1))
def _ctx_program(adapter, dtype, tokens, rows):
    """The blocks' context for tokens[rows] (a function of the tokens only)."""
    full = {
        name: jnp.broadcast_to(jnp.zeros((), dtype), shape)
        for name, shape in adapter.param_shapes.items()
    }
    return adapter.embed(full, tokens[rows])[1]


@partial(jax.jit, static_argnums=(0, 1))
def _embed_program(adapter, dtype, plain, stacks, slots, tokens, rows):
    """float[G, R, T, D]: every candidate's embeddings of tokens[rows]."""
    base = {**_placeholders(adapter, dtype), **plain}
    toks = tokens[rows]

    def one(slot):
        return adapter.embed(_pick(base, stacks, slot, dtype), toks)[0]

    if not stacks:
        h = one(slots[0])
        return jnp.broadcast_to(h, (slots.shape[0], *h.shape))
    return _per_candidate(one, slots)


@partial(jax.jit, static_argnums=(0,))
def _block_program(adapter, plain, stacks, slots, h, ctx, skip=None):
    """float[G, R, T, D]: one block applied to every candidate's hidden states; ``skip``
    bool[G, S] (or None) marks each candidate's dropped sublayers
    (``adapter.sublayer_names``), which are then not computed."""
    if skip is None:

        def one(slot, x):
            return adapter.block(_pick(plain, stacks, slot, x.dtype), x, ctx)

        return _per_candidate(one, slots, h)

    def one_skipping(slot, flags, x):
        names = {name: flags[s] for s, name in enumerate(adapter.sublayer_names)}
        return adapter.block(_pick(plain, stacks, slot, x.dtype), x, ctx, skip=names)

    return _per_candidate(one_skipping, slots, skip, h, sequential=True)


@partial(jax.jit, static_argnums=(0, 1, 2))
def _score_finish_program(
    adapter, metric, dtype, plain, stacks, slots, h, ctx, teacher, tokens, rows
):
    """float32[G, R]: per-sequence losses of every candidate."""
    base = {**_placeholders(adapter, dtype), **plain}
    toks = tokens[rows]

    def one(slot, x):
        out = adapter.finish(_pick(base, stacks, slot, dtype), x, ctx)
        return metric.sequence_losses(teacher, out, toks)

    return _per_candidate(one, slots, h)


@partial(jax.jit, static_argnums=(0, 1, 2))
def _teacher_finish_program(adapter, metric, dtype, plain, h, ctx, tokens, rows):
    """The metric's teacher data of the dense model's last hidden states h float[1, R, T, D]."""
    base = {**_placeholders(adapter, dtype), **plain}
    toks = tokens[rows]
    return metric.teacher_data(adapter.finish(base, h[0], ctx), toks)


@partial(jax.jit, static_argnums=(0, 1))
def _nll_finish_program(adapter, dtype, plain, stacks, slots, h, ctx, tokens, rows, weights):
    """Sum over sequences (weighted by float32[R]) of next-token NLL of one candidate."""
    base = {**_placeholders(adapter, dtype), **plain}
    toks = tokens[rows]
    out = adapter.finish(_pick(base, stacks, slots[0], dtype), h[0], ctx)
    return jnp.sum(weights[:, None] * next_token_nll(out, toks))


@jax.jit
def _take_member(h, j):
    return h[j]


@partial(jax.jit, static_argnums=(1,))
def _broadcast_state(state, g):
    return jnp.broadcast_to(state, (g, *state.shape))


# ----------------------------------------------------------------------- host-side plans


class _Stage(NamedTuple):
    """The parameters of one stage (a block, or the outside: embeddings and head).

    ``plain``: (name in the stage's params, full name) of parameters no unit changes;
    ``owned``: (name in the stage's params, full name, unit) of the others, sorted by
    the stage name (the column order of the slots).
    """

    plain: tuple[tuple[str, str], ...]
    owned: tuple[tuple[str, str, int], ...]


class _Loaded(NamedTuple):
    """A stage's weights on the device, for one query."""

    plain: dict[str, jax.Array]
    stacks: dict[str, jax.Array]
    slots: np.ndarray  # int32[members, len(owned)]: each member's slot of each stack
    store_bytes: int
    dense_bytes: int
    transfer_bytes: int
    variants_read: int


_M_MMAP_THRESHOLD: int = -3  # glibc's mallopt parameter
_MMAP_THRESHOLD_BYTES: int = 1 << 20
_large_frees_unmapped = False


def _unmap_large_frees() -> None:
    """Make glibc serve allocations of 1 MiB and more with ``mmap`` and unmap them when
    they are freed (once per process; nothing on other C libraries).

    A streaming evaluator allocates and frees a block's worth of buffers (a few MiB to
    hundreds of MiB each) per block and query, from several threads. glibc's default
    threshold rises to 32 MiB after the first large free, so everything below it is carved
    from per-thread heaps that keep freed memory: a 150 M bfloat16 model's actor held 1.0
    GiB at peak instead of 0.56 GiB (scripts/bench_plan.py). Fixing the threshold costs a
    page-zeroing fault per fresh page of a large buffer (about 1% of a block's compute).
    """
    global _large_frees_unmapped
    if _large_frees_unmapped or not sys.platform.startswith("linux"):
        return
    _large_frees_unmapped = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return
    mallopt = getattr(libc, "mallopt", None)  # glibc only (not musl)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def _aligned_empty(shape: tuple[int, ...], dtype: Any, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous host array whose data starts on an ``align``-byte
    boundary (what lets ``jax.device_put`` on CPU alias it instead of copying)."""
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    raw = np.empty(n + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset : offset + n].view(dtype).reshape(shape)


def _nbytes(a: Any) -> int:
    return int(np.dtype(a.dtype).itemsize * math.prod(a.shape))


class _Pass:
    """One streamed pass of members through the model: their groups (of
    ``candidates_per_call``, padded), the hidden states of every (group, chunk), the outer
    stage's weights, byte counts, and the reference's states recorded at block inputs."""

    def __init__(self, ev, members, starts, tokens, chunks, group_size: int, record):
        self.ev, self.members, self.chunks = ev, members, chunks
        m = 1 if members is None else len(members)
        self.m = m
        order = np.argsort(starts, kind="stable")
        groups = [order[j : j + group_size] for j in range(0, m, group_size)]
        self.groups = [np.concatenate([q, np.full(group_size - len(q), q[-1])]) for q in groups]
        self.gstart = np.array([int(starts[q].min()) for q in self.groups], np.int32)
        self.group_size = group_size
        self.tokens = tokens
        keys = ("store_bytes", "dense_bytes", "transfer_bytes", "variants_read")
        self.counts = dict.fromkeys((*keys, "blocks_streamed"), 0)
        self.ctxs = [_ctx_program(ev._adapter, ev._dtype, tokens, rows) for rows, _ in chunks]
        outer = ev._load(ev._outer, members, np.ones(m, bool), plain=False)
        self.outer = outer._replace(plain={**ev._outer_plain, **outer.plain})
        self.account(self.outer)
        self.rec: tuple[int, int] | None = None
        if record is not None:
            g_ref = next(g for g, q in enumerate(self.groups) if record in q)
            self.rec = (g_ref, int(np.flatnonzero(self.groups[g_ref] == record)[0]))
            ev._states = [[None] * len(chunks) for _ in range(ev._nb + 1)]
        # Hidden states of every (group, chunk), parked on the host between blocks when
        # all of them would exceed max_device_state_bytes.
        carried = len(self.groups) * group_size * sum(len(r) for r, _ in chunks)
        per_token = ev._state_bytes_per_token
        self.park = carried * tokens.shape[1] * per_token > ev.max_device_state_bytes
        self.h: dict[tuple[int, int], Any] = {}

    def account(self, loaded: _Loaded) -> None:
        for key in ("store_bytes", "dense_bytes", "transfer_bytes", "variants_read"):
            self.counts[key] += getattr(loaded, key)

    def active_members(self, i: int) -> np.ndarray:
        """bool[m]: the members whose group runs block ``i``."""
        act = np.zeros(self.m, bool)
        for q, s in zip(self.groups, self.gstart, strict=True):
            if s <= i:
                act[q] = True
        return act

    def running(self, i: int) -> np.ndarray:
        """The groups that run block ``i``."""
        return np.flatnonzero(self.gstart <= i)

    def device(self, x: Any) -> jax.Array:
        if isinstance(x, jax.Array):
            return x
        self.counts["transfer_bytes"] += int(x.nbytes)
        return jax.device_put(x)

    def park_all(self, states: dict | None = None) -> None:
        """Move ``states`` (default: the hidden states) to the host when parking."""
        states = self.h if states is None else states
        if self.park:
            keys = list(states)
            for key, value in zip(keys, jax.device_get([states[k] for k in keys]), strict=True):
                states[key] = value

    def activate(self, g: int, i: int) -> None:
        """Group ``g`` starts at block ``i``: from the embeddings, or the reference's
        states at block ``i``'s input."""
        ev = self.ev
        for c, (rows, _) in enumerate(self.chunks):
            if i == 0:
                self.h[g, c] = _embed_program(
                    ev._adapter,
                    ev._dtype,
                    self.outer.plain,
                    self.outer.stacks,
                    self.outer.slots[self.groups[g]],
                    self.tokens,
                    rows,
                )
            else:
                state = ev._states[i][c]
                if not isinstance(state, jax.Array):
                    self.counts["transfer_bytes"] += int(state.nbytes)
                self.h[g, c] = _broadcast_state(jnp.asarray(state), self.group_size)

    def keep(self, i: int) -> None:
        """Record the reference member's states at block ``i``'s input."""
        if self.rec is None:
            return
        ev = self.ev
        for c in range(len(self.chunks)):
            state = _take_member(self.device(self.h[self.rec[0], c]), self.rec[1])
            ev._states[i][c] = state if ev._states_on_device else np.asarray(state)

    def start_block(self, i: int) -> None:
        self.counts["blocks_streamed"] += 1
        for g in np.flatnonzero(self.gstart == i):
            self.activate(int(g), i)
        if i == 0:
            self.keep(0)

    def end_block(self, i: int) -> None:
        self.keep(i + 1)
        self.park_all()
