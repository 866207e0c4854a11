"""Execution backends: in process and on Ray, for scoring candidates and building supernets.

Scoring: both backends of an :class:`~allocsearch.search.base.Evaluate` take an *evaluator
factory*: a small picklable zero-argument callable (paths and settings, or object-store
references) that builds the evaluator, i.e. loads the model, token sets and supernet.
:class:`InProcessEvaluate` calls it once in this process; :class:`RayEvaluate` calls it
once in each of ``workers`` Ray actors and splits every query's rows over them, or, for
a query with fewer rows than actors, its minibatch's sequences (shards whose means are
recombined). Both are ``Evaluate`` callables, so
:func:`~allocsearch.distributed.local.run_search` runs unchanged on either, and for an
evaluator whose score of a row depends only on that row, ``fidelity`` and ``batch_seed``
(the ``Evaluate`` contract), both return identical scores (token shards: equal to float
rounding).

Building: :class:`RayLayerMap` is a ``map(fn, items)`` over Ray actors, the ``map_layers``
of :func:`~allocsearch.supernet.build.build_supernet` (the serial default is ``map``).

Both run on one actor-pool implementation (:class:`_ActorPool`): actors pinned apart,
a dead actor replaced in its slot, and one whose replacement cannot be placed and
started within ``replace_timeout_s`` (a lost node on a full cluster) given up with a
:class:`WorkerLostWarning`, its work going to the others; every wait has a deadline.

Workers: an integer, or ``"auto"``: one actor per CPU core this process may use on a new
local Ray instance; on an existing cluster one per CPU, or one per GPU when the cluster
has GPUs (:func:`auto_worker_plan`).

This is the only module that imports ``ray``, and only inside functions, so
``import allocsearch`` never needs it (STYLE.md habit 8).

Threads: each CPU actor runs its own JAX runtime. Environment variables in the actor's
``runtime_env`` size its OpenMP, MKL and OpenBLAS pools, but XLA's CPU runtime sizes its
thread pool from the CPUs the process may run on, not from any variable, so a CPU actor
also pins itself (Linux CPU affinity) to its own ``floor(cpus_per_worker)`` cores of its
machine before it builds its evaluator: actors on one machine get disjoint cores while
there are enough. Slots are counted per machine (:func:`host_key`), not per Ray node:
several raylets on one host share its cores. Measured on a 2-core machine: without
pinning one "1-CPU" actor used 1.8 cores and two actors ran only 1.2x one
(scripts/bench_ray.py). A GPU actor gets
``gpus_per_worker`` GPUs from Ray (Ray sets ``CUDA_VISIBLE_DEVICES``, JAX uses them) and
is not pinned.

Numerics: XLA's and OpenBLAS's blocking depends on the size of their thread pools, so a
1-thread actor can compute a result that differs from the driver's in the last bits. The
evaluator's scores do not (measured on the demo supernet: identical), but SparseGPT's
pruned weights do, and a few masks with them. :class:`RayLayerMap` therefore starts its
actors' pools with the driver's sizes before pinning them (``like_driver``), which makes
a Ray-built supernet the serial build's byte for byte (measured on the demo model and
tested on one layer of its widths).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np

from allocsearch.closing import Closing
from allocsearch.config import AUTO_WORKERS as AUTO
from allocsearch.distributed.ray_connect import (
    _RAY_AUTH_LOGGER,  # noqa: F401  (tests reach it through this module)
    CONNECT_TIMEOUT_ENV,
    _ray_starts_processes,  # noqa: F401
    check_reachable,
    ray_session,
)
from allocsearch.distributed.ray_errors import (
    HeadNodeLostError,
    WorkerFailedError,
    WorkerLostWarning,
    WorkerStartError,
)
from allocsearch.distributed.ray_pool import _ActorPool, supports_shards
from allocsearch.distributed.ray_workers import (
    WorkerPlan,
    auto_worker_plan,
    driver_like_env,
    host_key,
    local_cpu_count,
    pin_to_cpus,
    start_runtimes_on,
    worker_env,
)
from allocsearch.search.base import Evaluate, split_kwargs

__all__ = [
    "CONNECT_TIMEOUT_ENV",
    "EvaluatorFactory",
    "HeadNodeLostError",
    "InProcessEvaluate",
    "RayEvaluate",
    "RayLayerMap",
    "WorkerFailedError",
    "WorkerLostWarning",
    "WorkerPlan",
    "WorkerStartError",
    "auto_worker_plan",
    "check_reachable",
    "driver_like_env",
    "host_key",
    "local_cpu_count",
    "pin_to_cpus",
    "ray_session",
    "start_runtimes_on",
    "supports_shards",
    "worker_env",
]

EvaluatorFactory = Callable[[], Evaluate]
"""A picklable zero-argument callable that builds an evaluator (run once per process)."""


T = TypeVar("T")
R = TypeVar("R")


class InProcessEvaluate(Closing):
    """The in-process backend: ``factory()`` built once here, called directly.

    Same constructor argument and context-manager interface as :class:`RayEvaluate`, so
    a driver can switch backends with one argument. ``__call__`` has the ``Evaluate``
    signature: ``choices`` int32[n, L] -> float[n] (the evaluator's scores, lower is better).
    """

    def __init__(self, factory: EvaluatorFactory) -> None:
        self._evaluate = factory()

    def __call__(
        self, choices: np.ndarray, *, fidelity: int, batch_seed: int, split: str = "calibration"
    ) -> np.ndarray:
        choices = _checked_choices(choices)
        return _checked_scores(
            self._evaluate(
                choices, fidelity=fidelity, batch_seed=batch_seed, **split_kwargs(split)
            ),
            choices.shape[0],
            "the in-process evaluator",
        )

    def close(self) -> None:
        """Nothing to release; present for symmetry with :class:`RayEvaluate`."""


_POOL_SETTINGS = (
    "workers",
    "address",
    "cpus_per_worker",
    "gpus_per_worker",
    "pin_cpus",
    "start_timeout_s",
    "replace_timeout_s",
    "call_timeout_s",
    "like_driver",
)


def _pool_settings(args: dict[str, Any]) -> dict[str, Any]:
    """The actor pool's settings among a constructor's arguments (its ``locals()``)."""
    return {k: args[k] for k in _POOL_SETTINGS if k in args}


class _OnActors(Closing):
    """What :class:`RayEvaluate` and :class:`RayLayerMap` share: the actor pool they run
    on (its resolved plan, placement and events), ``live_workers``, and closing."""

    def __init__(self, factory: Callable[[], Any] | None, *, max_retries: int, **pool: Any) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.max_retries = max_retries
        self._pool = _ActorPool(factory, **pool)
        self.workers = self._pool.plan.workers
        self.cpus_per_worker = self._pool.plan.cpus_per_worker
        self.gpus_per_worker = self._pool.plan.gpus_per_worker
        self.placement = self._pool.placement
        self.events = self._pool.events

    @property
    def live_workers(self) -> int:
        """Actors left (running, or being replaced): ``workers`` less the lost ones."""
        return len(self._pool.live)

    def _check_open(self) -> None:
        if self._pool._closed:
            raise RuntimeError(f"this {type(self).__name__} was closed; create a new one")

    def close(self) -> None:
        """Kill the actors; shut Ray down if this object started or joined it."""
        self._pool.close()


class RayEvaluate(_OnActors):
    """Scores queries on ``workers`` Ray actors, each holding one evaluator.

    Args:
      factory: builds the evaluator; called once in every actor (and again in an actor
        that replaces a dead one). It is put in the object store once and shipped to the
        actors; keep it small (paths and settings) or hold ``ray.put`` references to big
        objects and ``ray.get`` them inside the factory.
      workers: number of actors, an integer >= 1, or ``"auto"``: one actor per CPU core
        this process may use on a new local Ray instance (:func:`local_cpu_count`), or on
        an existing cluster one per CPU, or one per GPU when it has GPUs
        (:func:`auto_worker_plan` of ``ray.cluster_resources()``).
      address: Ray cluster to join (``"host:port"`` or ``"ray://host:port"``). Default:
        the ``RAY_ADDRESS`` environment variable, else a new local Ray instance with
        ``ceil(workers * cpus_per_worker)`` CPUs. If this process is already connected to
        Ray (``ray.init`` was called), that connection is used and left open.
      cpus_per_worker: CPUs reserved per actor; its thread pools are limited to this many.
      pin_cpus: pin each CPU actor to ``floor(cpus_per_worker)`` cores of its machine,
        disjoint from the other actors of this object on that machine, counted per
        machine (:func:`host_key`), not per raylet (see the module docstring). Turn off
        when other jobs pin their processes on the same nodes.
      gpus_per_worker: GPUs per actor (0 for CPU actors; 0.5 lets two actors share one).
        ``None`` (default): 0, except that ``workers="auto"`` on a cluster with GPUs gives
        each actor one GPU.
      max_retries: how many times one chunk may be re-dispatched after the actor scoring
        it died, per call, before :class:`WorkerFailedError` is raised.
      start_timeout_s: seconds to wait for all actors to be placed and to build their
        evaluators (model loading included) before :class:`WorkerStartError`.
      replace_timeout_s: seconds a dead actor's replacement may take to be placed and to
        build its evaluator. Past it (a lost node on a full cluster: nowhere to place
        the replacement) the actor is *lost*: a :class:`WorkerLostWarning` and a log line
        name it and its node, its work goes to the other actors, and the object goes on
        with fewer (:attr:`live_workers`); :class:`WorkerFailedError` only when none is
        left. Give it at least the time an evaluator takes to load.
      call_timeout_s: a call running longer than this counts as its actor's death (a
        hung actor); ``None``: no limit (Ray reports dead actors and lost nodes itself,
        within seconds).

    Calling it with ``choices`` int32[n, L] returns the scores float[n] in row order
    (lower is better). With at least as many rows as ``workers`` the rows are split into
    ``workers`` contiguous chunks; with fewer (e.g. EvoPress's last selection stage: 2-3
    candidates on many tokens) and an evaluator that scores shards of a minibatch
    (:func:`supports_shards`, e.g. :class:`~allocsearch.evaluate.evaluator.Evaluator`),
    every actor scores all rows on its ``1/workers`` of the minibatch's sequences
    (``shard=(k, workers)``) and the shard means are combined weighted by their sequence
    counts, which equals the unsharded score to float rounding (1e-6). Both splits
    depend on ``workers``, never on how many actors are alive, so a call returns what a
    fault-free call would, bit for bit: a chunk whose actor dies is given to an idle
    actor, or to a fresh actor started in the dead one's place. :meth:`close` (or leaving
    the ``with`` block) kills the actors and shuts down the Ray instance if this object
    started it, never an external cluster.

    Attributes:
      workers, cpus_per_worker, gpus_per_worker: the resolved :class:`WorkerPlan`.
      placement: per actor, its ``pid``, ``node``, ``ip``, ``host``, CPU ``slot`` and
        pinned ``cpus`` (or ``None``); a replacement's entry replaces the dead actor's,
        and a lost actor's has ``lost`` True.
      events: the fault events so far (actor died, replaced, lost), one line each.

    Raises:
      WorkerStartError: no actor could be started: the factory raised (its error is in
        the message), or the cluster lacks the CPUs/GPUs asked for.
    """

    def __init__(
        self,
        factory: EvaluatorFactory,
        *,
        workers: int | str,
        address: str | None = None,
        cpus_per_worker: float = 1.0,
        gpus_per_worker: float | None = None,
        pin_cpus: bool = True,
        max_retries: int = 3,
        start_timeout_s: float = 600.0,
        replace_timeout_s: float = 60.0,
        call_timeout_s: float | None = None,
    ) -> None:
        settings = _pool_settings(locals())
        super().__init__(factory, max_retries=max_retries, what="evaluator actor", **settings)

    def __call__(
        self, choices: np.ndarray, *, fidelity: int, batch_seed: int, split: str = "calibration"
    ) -> np.ndarray:
        choices = _checked_choices(choices)
        n = choices.shape[0]
        self._check_open()
        if n == 0:
            return np.zeros((0,), dtype=np.float32)
        if n < self.workers and self._pool.shards:
            return self._sharded(choices, fidelity, batch_seed, split)
        chunks = np.array_split(np.arange(n), min(n, self.workers))
        results = self._pool.stream(
            "evaluate",
            [(choices[c], fidelity, batch_seed, None, split) for c in chunks],
            max_retries=self.max_retries,
            describe=lambda c: f"rows {chunks[c][0]}..{chunks[c][-1]} of a query of {n}",
        )
        return np.concatenate(
            [
                _checked_scores(scores, len(c), f"the evaluator actor of rows {c[0]}..{c[-1]}")
                for c, scores in zip(chunks, results, strict=True)
            ]
        )

    def _sharded(
        self, choices: np.ndarray, fidelity: int, batch_seed: int, split: str
    ) -> np.ndarray:
        """All rows on each of ``workers`` shards of the minibatch, means weighted by the
        shards' sequence counts (float64 sums)."""
        n, count = choices.shape[0], self.workers
        results = self._pool.stream(
            "evaluate",
            [(choices, fidelity, batch_seed, (k, count), split) for k in range(count)],
            max_retries=self.max_retries,
            describe=lambda k: f"shard {k} of {count} of a query of {n} rows",
        )
        total, rows = np.zeros(n, np.float64), 0
        for k, (scores, seqs) in enumerate(results):
            if seqs:
                scores = _checked_scores(scores, n, f"the evaluator actor of shard {k}")
                total += seqs * scores.astype(np.float64)
                rows += seqs
        return (total / rows).astype(np.float32)

    def run(self, fn: Callable[[T], R], item: T) -> R:
        """``fn(item)`` on one of the actors (in its process, next to its evaluator), e.g.
        a final held-out perplexity, so this process needs no model. ``fn`` and ``item``
        must be picklable; a death of the actor is survived as for scoring."""
        self._check_open()
        return self._pool.run_one(fn, item, max_retries=self.max_retries)


class RayLayerMap(_OnActors):
    """``map(fn, items)`` over ``workers`` pinned Ray actors: one call ``fn(item)`` per item.

    Made for :func:`~allocsearch.supernet.build.build_supernet`'s ``map_layers`` (one item
    = all levels of one layer), but general: ``fn`` and the items must be picklable and
    ``fn`` importable in the actors (a module-level function or a ``functools.partial`` of
    one). The actors are started once and serve every call; each keeps its JAX runtime and
    compiled programs between items.

    Args:
      workers, address, cpus_per_worker, gpus_per_worker, pin_cpus, start_timeout_s,
        replace_timeout_s: as for :class:`RayEvaluate` (the actors build nothing at
        start; a lost actor's items go to the others).
      max_retries: how many times one item may be re-dispatched after the actor running
        it died, per call, before :class:`WorkerFailedError` is raised.
      like_driver: CPU actors compute exactly what this process would: they start XLA's
        CPU client and LAPACK with this process's core count, environment thread counts
        and ``XLA_FLAGS`` (:func:`start_runtimes_on`), then pin themselves to their own
        cores as usual. XLA's and OpenBLAS's blocking depends on the thread-pool size, so
        without this a SparseGPT layer of the demo model pruned in a 1-thread actor
        differs from the one pruned here in the last bits, and a few masks differ with
        them. Costs: each actor's pools have more threads than it has cores (measure on
        many-core machines). ``False``: 1-thread pools as in :class:`RayEvaluate`; the
        results are then the same for any number of workers and any machine size, but
        not those of a serial build in a multi-core process.

    Calling it returns an iterator over ``fn(item)`` in item order, lazily: an item starts
    when an actor is idle and it is among the next ``2 * workers`` items not yet consumed,
    so this process holds at most ``2 * workers`` results. ``fn`` runs in other processes:
    side effects on the caller's objects are lost. :meth:`close` as for
    :class:`RayEvaluate`.
    """

    def __init__(
        self,
        *,
        workers: int | str = AUTO,
        address: str | None = None,
        cpus_per_worker: float = 1.0,
        gpus_per_worker: float | None = None,
        pin_cpus: bool = True,
        max_retries: int = 3,
        start_timeout_s: float = 600.0,
        like_driver: bool = True,
        replace_timeout_s: float = 60.0,
    ) -> None:
        settings = _pool_settings(locals())
        super().__init__(None, max_retries=max_retries, what="layer actor", **settings)

    def __call__(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        self._check_open()
        items = list(items)
        if not items:
            return iter(())
        fn_ref = self._pool._ray.put(fn)  # shipped once, not once per item
        return self._pool.stream(
            "run",
            [(fn_ref, item) for item in items],
            max_retries=self.max_retries,
            describe=lambda i: f"item {i} of {len(items)} ({fn!r})",
            window=2 * self.workers,
        )


def _checked_choices(choices: np.ndarray) -> np.ndarray:
    choices = np.asarray(choices)
    if choices.ndim != 2 or not np.issubdtype(choices.dtype, np.integer):
        raise ValueError(
            f"choices must be an int array [n, L] of level vectors, got {choices.dtype} "
            f"{choices.shape}"
        )
    return choices.astype(np.int32, copy=False)


def _checked_scores(scores: Any, n: int, source: str) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.shape != (n,) or not np.issubdtype(scores.dtype, np.floating):
        raise ValueError(f"{source} returned {scores.dtype} {scores.shape}; expected float[{n}]")
    return scores
