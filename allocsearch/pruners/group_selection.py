"""Which groups a structured level removes: the exact refit error and the searches over it.

The objective (lower is better) of removing a set ``I`` of input-column groups of a weight
``W`` float[out, in] whose input Hessian is ``H`` (damped, positive definite), when the kept
columns are refit by least squares, is the output reconstruction error

    E(I) = min_W' tr((W - W') H (W - W')^T) over W' zero on I
         = tr(W_I [H^-1]_II^-1 W_I^T)                       (the OBS group formula).

:func:`removal_errors` computes it for a batch of sets; every search here scores with it
(the greedy OBS order of :mod:`allocsearch.pruners.structured` is the same formula
accumulated one round at a time, and only seeds the local search).

A supernet's levels of one unit must be *nested* (the dead q/k/v or gate/up rows are stored
as one rank array, :func:`allocsearch.supernet.prune_unit._dead_row_variants`), so
:func:`nested_removals` chooses a chain ``I_1 ⊂ I_2 ⊂ ...`` rather than each level's best
set on its own:

* when the chain's subsets are few (``sum_k C(G, r_k) <= limit``), exactly: every subset
  of every level is scored, and a dynamic program over the subset lattice picks the chain
  minimising ``sum_k E(I_k) / E*_k`` (``E*_k`` the level's exhaustive best). With one level
  this is the exhaustive best subset;
* otherwise from the greedy order, for units of at most ``SEARCH_GROUP_LIMIT`` groups
  (attention heads and kv groups; not the neurons of an MLP) by a variable-depth swap
  local search per level (one removed group out, one kept group in; :func:`swap_search`)
  that keeps the chain nested: a level swaps only groups that no smaller level removes
  for groups that the next larger level removes, largest level first.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from allocsearch.pruners.base import HIGHEST

ENUMERATION_LIMIT = 5000
"""Subsets a chain may have (over all its levels) to be chosen exactly."""
MAX_SWAPS = 64
"""Default bound on swaps tried per level of the local search."""
SEARCH_GROUP_LIMIT = 64
"""Units with more groups (MLP neurons) keep the greedy order beyond enumeration: each
swap step inverts the removed block, and on the demo's 704-neuron MLP the search cost
about 20x the greedy order's CPU time."""
PASS_DEPTH = 8
"""Most swaps in one pass of the variable-depth search (escapes need two or three)."""
_BATCH_ELEMENTS = 1 << 24  # float32 entries per batch of gathered [H^-1]_II blocks
_PAIR_ELEMENTS = 1 << 22  # float32 entries of the [outs, ins, width, width] swap tensors


def _columns(groups: np.ndarray, width: int) -> np.ndarray:
    """int32[..., r * width]: input columns of groups int[..., r] (contiguous per group)."""
    g = np.asarray(groups, np.int64)
    cols = g[..., :, None] * width + np.arange(width)[None, :]
    return cols.reshape(*g.shape[:-1], g.shape[-1] * width).astype(np.int32)


def removal_errors(w: jax.Array, hinv: jax.Array, removed: np.ndarray, width: int) -> np.ndarray:
    """float64[n]: refit error ``tr(W_I [H^-1]_II^-1 W_I^T)`` of removing each row's groups.

    Args:
      w: float32[out, in] weight (dead inputs' columns may be zeroed: they cost nothing).
      hinv: float32[in, in] inverse of the damped Hessian.
      removed: int[n, r] group indices removed by each candidate (r may be 0).
      width: input columns per group.
    Lower is better; 0 for ``r == 0``.
    """
    removed = np.asarray(removed, np.int64)
    n, r = removed.shape
    if r == 0 or n == 0:
        return np.zeros(n)
    cols = _columns(removed, width)
    m = cols.shape[1]
    step = max(1, _BATCH_ELEMENTS // (m * m))
    out = [np.asarray(_errors(w, hinv, jnp.asarray(cols[i : i + step]))) for i in range(0, n, step)]
    return np.concatenate(out).astype(np.float64)


@jax.jit
def _errors(w: jax.Array, hinv: jax.Array, cols: jax.Array) -> jax.Array:
    blocks = hinv[cols[:, :, None], cols[:, None, :]]  # [n, m, m]
    x = jnp.transpose(w[:, cols], (1, 2, 0))  # [n, m, out]
    chol = jnp.linalg.cholesky(blocks)
    sol = jax.vmap(lambda c, b: jax.scipy.linalg.cho_solve((c, True), b))(chol, x)
    return jnp.sum(x * sol, axis=(1, 2))


def _score_all(w: jax.Array, hinv: jax.Array, n_groups: int, count: int, width: int):
    subsets = np.array(list(itertools.combinations(range(n_groups), count)), np.int64)
    return subsets.reshape(-1, count), removal_errors(w, hinv, subsets.reshape(-1, count), width)


def _chain_dp(
    w: jax.Array, hinv: jax.Array, n_groups: int, counts: Sequence[int], width: int
) -> list[np.ndarray]:
    """Exact nested chain minimising ``sum_k E(I_k) / E*_k`` (see the module docstring)."""
    layers = []  # per level: {bitmask: (cost, parent bitmask, groups)}
    prev: dict[int, tuple[float, int, np.ndarray]] = {0: (0.0, -1, np.zeros(0, np.int64))}
    prev_count = 0
    for count in counts:
        subsets, errors = _score_all(w, hinv, n_groups, count, width)
        floor = max(float(errors.min()), 1e-6 * float(errors.max()), 1e-30)
        cur: dict[int, tuple[float, int, np.ndarray]] = {}
        for groups, err in zip(subsets, errors, strict=True):
            mask = int(np.sum(1 << groups)) if count else 0
            best, parent = math.inf, -1
            for sub in itertools.combinations(groups.tolist(), prev_count):
                key = sum(1 << g for g in sub)
                if key in prev and prev[key][0] < best:
                    best, parent = prev[key][0], key
            cur[mask] = (best + err / floor, parent, groups)
        layers.append(cur)
        prev, prev_count = cur, count
    key = min(prev, key=lambda k: prev[k][0])
    chain = []
    for level in reversed(layers):
        chain.append(level[key][2])
        key = level[key][1]
    return chain[::-1]


def _dp_fits(n_groups: int, counts: Sequence[int], limit: int) -> bool:
    subsets = sum(math.comb(n_groups, r) for r in counts)
    links = sum(
        math.comb(n_groups, r) * math.comb(r, p)
        for r, p in zip(counts, [0, *counts[:-1]], strict=True)
    )
    return subsets <= limit and links <= 20 * limit


def _einsum(spec: str, *ops: jax.Array) -> jax.Array:
    return jnp.einsum(spec, *ops, precision=HIGHEST)


@partial(jax.jit, static_argnames=("width", "pool_out", "pool_in"))
def _swap_deltas(
    w: jax.Array,
    hinv: jax.Array,
    cols_s: jax.Array,
    opos: jax.Array,
    cols_j: jax.Array,
    out_ok: jax.Array,
    in_ok: jax.Array,
    *,
    width: int,
    pool_out: int,
    pool_in: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Change of ``E`` for swapping removed group ``a`` (kept again) with kept group ``b``.

    With ``P = [H^-1]_SS^-1`` of the removed columns ``S``, ``U = W_S P``, ``a_j = P
    [H^-1]_Sj``, residual ``r_j = W_j - U [H^-1]_Sj`` and Schur complement ``s_j =
    [H^-1]_jj - [H^-1]_jS a_j``: keeping ``i`` again lowers ``E`` by ``tr(U_i P_ii^-1
    U_i^T)``; then removing ``j`` adds ``tr(r' s'^-1 r'^T)`` with ``c = P_ii^-1 (a_j)_i``,
    ``r' = r_j + U_i c`` and ``s' = s_j + (a_j)_i^T c`` (block-inverse updates of ``S \\ i``).

    Shapes: ``cols_s`` int32[m] removed columns; ``opos`` int32[a, width] positions in
    ``cols_s`` of the groups that may leave, ``cols_j`` int32[b, width] columns of the groups
    that may enter, ``out_ok``/``in_ok`` bool[a]/bool[b] (False: not this step). Only the
    ``pool_out`` x ``pool_in`` most promising (by the single-move terms) are paired. Returns
    float32[pool_out, pool_in] deltas (inf where masked) and their indices into a and b.
    """
    m_ss = hinv[cols_s][:, cols_s]
    chol = jnp.linalg.cholesky(m_ss)
    p = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(m_ss.shape[0], dtype=m_ss.dtype))
    u = jnp.matmul(w[:, cols_s], p, precision=HIGHEST)  # [out, m]
    p_ii = p[opos[:, :, None], opos[:, None, :]]  # [a, w, w]
    p_ii = 1.0 / p_ii if width == 1 else jnp.linalg.inv(p_ii)
    u_i = u[:, opos]  # [out, a, w]
    gain = _einsum("oai,aij,oaj->a", u_i, p_ii, u_i)
    m_sj = hinv[cols_s][:, cols_j.reshape(-1)]  # [m, b*w]
    a = jnp.matmul(p, m_sj, precision=HIGHEST)
    n_in = cols_j.shape[0]
    r = w[:, cols_j.reshape(-1)] - jnp.matmul(u, m_sj, precision=HIGHEST)
    r = r.reshape(-1, n_in, width)
    s = hinv[cols_j[:, :, None], cols_j[:, None, :]] - _einsum(
        "mbi,mbj->bij", m_sj.reshape(-1, n_in, width), a.reshape(-1, n_in, width)
    )
    rr = _einsum("obi,obj->bij", r, r)
    cost = _trace_solve(s, rr)
    _, ka = jax.lax.top_k(jnp.where(out_ok, gain, -jnp.inf), pool_out)
    _, kb = jax.lax.top_k(jnp.where(in_ok, -cost, -jnp.inf), pool_in)
    u_i, p_ii = u_i[:, ka], p_ii[ka]
    a_ij = a[opos[ka].reshape(-1)].reshape(pool_out, width, n_in, width)[:, :, kb]
    a_ij = jnp.transpose(a_ij, (0, 2, 1, 3))  # [a, b, w_i, w_j]
    c = _einsum("aik,abkj->abij", p_ii, a_ij)
    s2 = s[kb][None] + _einsum("abki,abkj->abij", a_ij, c)
    ur = _einsum("oai,obj->abij", u_i, r[:, kb])
    cur = _einsum("abki,abkj->abij", c, ur)
    uu = _einsum("oai,oaj->aij", u_i, u_i)
    rtr = rr[kb][None] + cur + jnp.swapaxes(cur, 2, 3) + _einsum("abki,akl,ablj->abij", c, uu, c)
    deltas = _trace_solve(s2, rtr) - gain[ka][:, None]
    ok = out_ok[ka][:, None] & in_ok[kb][None, :]
    return jnp.where(ok, deltas, jnp.inf), ka, kb


def _trace_solve(a: jax.Array, b: jax.Array) -> jax.Array:
    """float[...]: ``tr(a^-1 b)`` of batched [..., w, w] matrices (a division for w = 1)."""
    if a.shape[-1] == 1:
        return (b / a)[..., 0, 0]
    return jnp.trace(jnp.linalg.solve(a, b), axis1=-2, axis2=-1)


def _best_swap(
    w: jax.Array,
    hinv: jax.Array,
    removed: np.ndarray,
    outs: np.ndarray,
    ins: np.ndarray,
    out_ok: np.ndarray,
    in_ok: np.ndarray,
    width: int,
) -> tuple[int, int] | None:
    """(index into ``outs``, index into ``ins``) of the swap that lowers ``E`` most (or
    raises it least); None when every pair is masked. ``removed`` int[r] groups, ``outs``
    int[a] positions in it that may leave, ``ins`` int[b] groups that may enter."""
    pool = max(1, math.isqrt(_PAIR_ELEMENTS // (width * width)))
    deltas, ka, kb = _swap_deltas(
        w,
        hinv,
        jnp.asarray(_columns(removed, width)),
        jnp.asarray(_columns(outs[:, None], width)),
        jnp.asarray(_columns(ins[:, None], width)),
        jnp.asarray(out_ok),
        jnp.asarray(in_ok),
        width=width,
        pool_out=min(pool, len(outs)),
        pool_in=min(pool, len(ins)),
    )
    deltas = np.asarray(deltas)
    a, b = np.unravel_index(np.argmin(deltas), deltas.shape)
    return (int(ka[a]), int(kb[b])) if np.isfinite(deltas[a, b]) else None


def swap_search(
    w: jax.Array,
    hinv: jax.Array,
    removed: np.ndarray,
    width: int,
    *,
    fixed: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
    max_swaps: int = MAX_SWAPS,
) -> tuple[np.ndarray, float]:
    """Variable-depth swap local search (Kernighan-Lin) from ``removed`` (int[r] groups).

    A pass makes the best single swap (a removed group not in ``fixed`` kept again, a kept
    group in ``allowed``, default all, removed) even when it raises the error, then the
    best swap among the groups not yet moved in the pass, and so on; the pass's best state
    (exact :func:`removal_errors`) becomes the start of the next pass while it improves.
    This escapes local optima that need two or three swaps at once. A pass makes at most
    ``PASS_DEPTH`` swaps; ``max_swaps`` bounds the swaps tried over all passes. Returns
    the sorted removed groups and their error (lower is better); never worse than the
    start.
    """
    removed = np.asarray(removed, np.int64).copy()
    fixed = np.zeros(0, np.int64) if fixed is None else np.asarray(fixed, np.int64)
    allowed = np.arange(w.shape[1] // width) if allowed is None else np.asarray(allowed)
    outs = np.flatnonzero(~np.isin(removed, fixed))
    ins = np.setdiff1d(allowed, removed).astype(np.int64)
    err = float(removal_errors(w, hinv, removed[None], width)[0])
    budget = max_swaps
    while budget > 0 and len(outs) and len(ins) and err > 0:
        cur, cur_ins = removed.copy(), ins.copy()
        out_ok, in_ok = np.ones(len(outs), bool), np.ones(len(ins), bool)
        best = (err, removed, ins)
        for _ in range(min(len(outs), len(ins), budget, PASS_DEPTH)):
            pick = _best_swap(w, hinv, cur, outs, cur_ins, out_ok, in_ok, width)
            if pick is None:
                break
            a, b = pick
            budget -= 1
            cur[outs[a]], cur_ins[b] = cur_ins[b], cur[outs[a]]
            out_ok[a] = in_ok[b] = False
            e = float(removal_errors(w, hinv, cur[None], width)[0])
            if e < best[0] * (1 - 1e-7):
                best = (e, cur.copy(), cur_ins.copy())
        if best[0] >= err:
            break
        err, removed, ins = best
    return np.sort(removed), err


def nested_removals(
    w: jax.Array,
    hinv: jax.Array,
    counts: Sequence[int],
    width: int,
    *,
    greedy_order: Callable[[], np.ndarray],
    limit: int = ENUMERATION_LIMIT,
    max_swaps: int = MAX_SWAPS,
) -> list[np.ndarray]:
    """Nested removed sets, one per count (see the module docstring).

    Args:
      w: float32[out, in] weight; hinv: float32[in, in] inverse of the damped Hessian.
      counts: strictly increasing group counts in ``[1, G - 1]``.
      width: input columns per group.
      greedy_order: returns the greedy removal order int[>= max(counts)] (called only when
        the chain is not enumerated); it is the answer as is with ``max_swaps=0``.
      limit: most subsets (over all levels) chosen by enumeration; 0 never enumerates.
      max_swaps: swaps tried per level by the local search (none with more than
        ``SEARCH_GROUP_LIMIT`` groups).
    Returns:
      int64[r_k] sorted removed groups per count, ``I_1 ⊂ I_2 ⊂ ...``.
    """
    counts = [int(r) for r in counts]
    n_groups = w.shape[1] // width
    if any(b <= a for a, b in zip(counts, counts[1:], strict=False)) or (
        counts and not 1 <= counts[0] <= counts[-1] < n_groups
    ):
        raise ValueError(f"counts must increase within [1, {n_groups - 1}], got {counts}")
    if not counts:
        return []
    if _dp_fits(n_groups, counts, limit):
        return [np.sort(s) for s in _chain_dp(w, hinv, n_groups, counts, width)]
    order = np.asarray(greedy_order(), np.int64)
    sets = [np.sort(order[:r]) for r in counts]
    search = max_swaps > 0 and n_groups <= SEARCH_GROUP_LIMIT
    for k in reversed(range(len(counts)) if search else []):
        lower = sets[k - 1] if k else np.zeros(0, np.int64)
        upper = sets[k + 1] if k + 1 < len(counts) else np.arange(n_groups)
        sets[k], _ = swap_search(
            w,
            hinv,
            sets[k],
            width,
            fixed=lower,
            allowed=upper,
            max_swaps=max_swaps,
        )
    return sets
