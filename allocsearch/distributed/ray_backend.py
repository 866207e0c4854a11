"""Execution backends for an :class:`~allocsearch.search.base.Evaluate`: in process and on Ray.

Both take an *evaluator factory*: a small picklable zero-argument callable (paths and
settings, or object-store references) that builds the evaluator, i.e. loads the model,
token sets and supernet. :class:`InProcessEvaluate` calls it once in this process;
:class:`RayEvaluate` calls it once in each of ``workers`` Ray actors and splits every
query's rows over them. Both are ``Evaluate`` callables, so
:func:`~allocsearch.distributed.local.run_search` runs unchanged on either, and for an
evaluator whose score of a row depends only on that row, ``fidelity`` and ``batch_seed``
(the ``Evaluate`` contract), both return identical scores.

This is the only module that imports ``ray``, and only inside functions, so
``import allocsearch`` never needs it (STYLE.md habit 8).

Threads: each CPU actor runs its own JAX runtime. Environment variables in the actor's
``runtime_env`` size its OpenMP, MKL and OpenBLAS pools, but XLA's CPU runtime sizes its
thread pool from the CPUs the process may run on, not from any variable, so a CPU actor
also pins itself (Linux CPU affinity) to its own ``floor(cpus_per_worker)`` cores of its
node before it builds its evaluator: actors on one node get disjoint cores while there
are enough. Measured on a 2-core machine: without pinning one "1-CPU" actor used 1.8
cores and two actors ran only 1.2x one (scripts/bench_ray.py). A GPU actor gets
``gpus_per_worker`` GPUs from Ray (Ray sets ``CUDA_VISIBLE_DEVICES``, JAX uses them) and
is not pinned.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any

import numpy as np

from allocsearch.search.base import Evaluate

EvaluatorFactory = Callable[[], Evaluate]
"""A picklable zero-argument callable that builds an evaluator (run once per process)."""

# Environment variables that size the thread pools of numerical libraries.
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# Seconds to wait for busy cluster resources to become free before refusing to start.
_RESOURCE_WAIT_S = 20.0


class WorkerStartError(RuntimeError):
    """Evaluator actors could not be started (factory failed, or not enough resources)."""


class WorkerFailedError(RuntimeError):
    """A chunk of a query kept failing because the actors scoring it died."""


class InProcessEvaluate:
    """The in-process backend: ``factory()`` built once here, called directly.

    Same constructor argument and context-manager interface as :class:`RayEvaluate`, so
    a driver can switch backends with one argument. ``__call__`` has the ``Evaluate``
    signature: ``choices`` int32[n, L] -> float[n] (the evaluator's scores, lower is better).
    """

    def __init__(self, factory: EvaluatorFactory) -> None:
        self._evaluate = factory()

    def __call__(self, choices: np.ndarray, *, fidelity: int, batch_seed: int) -> np.ndarray:
        choices = _checked_choices(choices)
        return _checked_scores(
            self._evaluate(choices, fidelity=fidelity, batch_seed=batch_seed),
            choices.shape[0],
            "the in-process evaluator",
        )

    def close(self) -> None:
        """Nothing to release; present for symmetry with :class:`RayEvaluate`."""

    def __enter__(self) -> InProcessEvaluate:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def worker_env(cpus_per_worker: float, gpus_per_worker: float) -> dict[str, str]:
    """Environment variables for one evaluator actor (set before it imports ``jax``).

    CPU actors: every thread pool gets ``max(1, floor(cpus_per_worker))`` threads; with one
    CPU, XLA's multi-threaded Eigen kernels are switched off so XLA runs matrix products
    on the calling thread. Actors that share a GPU (``gpus_per_worker < 1``) allocate
    GPU memory on demand instead of pre-allocating most of it.
    """
    threads = max(1, math.floor(cpus_per_worker))
    env = {name: str(threads) for name in _THREAD_VARS}
    if gpus_per_worker == 0 and threads == 1:
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false"
    if 0 < gpus_per_worker < 1:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return env


def pin_to_cpus(slot: int, count: int) -> list[int] | None:
    """Restrict every thread of this process to ``count`` of the CPUs it may use.

    Slot ``k`` gets the ``k``-th group of ``count`` CPUs of the process's current affinity
    set (wrapping around when there are more slots than groups), so processes of one node
    that take slots 0, 1, ... run on disjoint cores. Threads started later inherit the
    set. Returns the CPUs, or ``None`` where nothing was pinned: no affinity support
    (not Linux), or ``count`` covers every allowed CPU anyway.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if count >= len(allowed):
        return None
    cpus = sorted({allowed[(slot * count + j) % len(allowed)] for j in range(count)})
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:  # the thread ended meanwhile
            pass
    return cpus


class _EvaluatorActor:
    """Body of one Ray actor: pins itself, builds the evaluator once, scores chunks.

    Construction does nothing, so that the driver can see where the actor landed
    (:meth:`ready`) and give it a node-local CPU slot before :meth:`start` builds the
    evaluator (and with it the JAX runtime, whose thread pool follows the affinity).
    """

    def __init__(self) -> None:
        self._evaluate: Evaluate | None = None

    def ready(self) -> dict[str, Any]:
        """Where the actor runs: ``pid`` and ``node`` (Ray node id)."""
        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def start(self, factory: EvaluatorFactory, slot: int, pin: int) -> list[int] | None:
        """Pin to ``pin`` CPUs of ``slot`` (``pin`` 0: no pinning), build the evaluator."""
        cpus = pin_to_cpus(slot, pin) if pin else None
        self._evaluate = factory()
        return cpus

    def evaluate(self, choices: np.ndarray, fidelity: int, batch_seed: int) -> np.ndarray:
        if self._evaluate is None:
            raise RuntimeError("the evaluator of this actor was not built (start failed)")
        scores = self._evaluate(choices, fidelity=fidelity, batch_seed=batch_seed)
        return np.asarray(scores)


class RayEvaluate:
    """Scores queries on ``workers`` Ray actors, each holding one evaluator.

    Args:
      factory: builds the evaluator; called once in every actor (and again in an actor
        that replaces a dead one). It is put in the object store once and shipped to the
        actors; keep it small (paths and settings) or hold ``ray.put`` references to big
        objects and ``ray.get`` them inside the factory.
      workers: number of actors, >= 1.
      address: Ray cluster to join (``"host:port"`` or ``"ray://host:port"``). Default:
        the ``RAY_ADDRESS`` environment variable, else a new local Ray instance with
        ``ceil(workers * cpus_per_worker)`` CPUs. If this process is already connected to
        Ray (``ray.init`` was called), that connection is used and left open.
      cpus_per_worker: CPUs reserved per actor; its thread pools are limited to this many.
      pin_cpus: pin each CPU actor to ``floor(cpus_per_worker)`` cores of its node,
        disjoint from the other actors of this object on that node (see the module
        docstring). Turn off when other jobs pin their processes on the same nodes.
      gpus_per_worker: GPUs per actor (0 for CPU actors; 0.5 lets two actors share one).
      max_retries: how many times one chunk may be re-dispatched after the actor scoring
        it died, per call, before :class:`WorkerFailedError` is raised.
      start_timeout_s: seconds to wait for all actors to be placed and to build their
        evaluators (model loading included) before :class:`WorkerStartError`.

    Calling it with ``choices`` int32[n, L] splits the rows into ``min(n, workers)``
    contiguous chunks, one per actor, and returns the actors' scores float[n] in row order
    (lower is better). A chunk whose actor dies is given to an idle actor, or to a fresh
    actor started in the dead one's place, so the call returns what a fault-free call
    would. :meth:`close` (or leaving the ``with`` block) kills the actors and shuts down
    the Ray instance if this object started it, never an external cluster.

    Raises:
      WorkerStartError: no actor could be started: the factory raised (its error is in
        the message), or the cluster lacks the CPUs/GPUs asked for.
    """

    def __init__(
        self,
        factory: EvaluatorFactory,
        *,
        workers: int,
        address: str | None = None,
        cpus_per_worker: float = 1.0,
        gpus_per_worker: float = 0.0,
        pin_cpus: bool = True,
        max_retries: int = 3,
        start_timeout_s: float = 600.0,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {cpus_per_worker}")
        if gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {gpus_per_worker}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if not start_timeout_s > 0:
            raise ValueError(f"start_timeout_s must be > 0, got {start_timeout_s}")
        import ray

        self._ray = ray
        self._factory_repr = repr(factory)
        self.workers = workers
        self.max_retries = max_retries
        self._owns_ray = False
        self._actors: list[Any] = []
        self._slots: list[int] = []
        self._pin = max(1, math.floor(cpus_per_worker)) if pin_cpus and not gpus_per_worker else 0
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS") or None
            common = dict(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
            if address is None:
                gpus = math.ceil(workers * gpus_per_worker)
                ray.init(
                    address="local",
                    num_cpus=math.ceil(workers * cpus_per_worker),
                    num_gpus=gpus if gpus else None,
                    **common,
                )
            else:
                ray.init(address=address, **common)
            self._owns_ray = True
        try:
            self._check_resources(cpus_per_worker, gpus_per_worker)
            self._actor_class = ray.remote(_EvaluatorActor).options(
                num_cpus=cpus_per_worker,
                num_gpus=gpus_per_worker,
                runtime_env={"env_vars": worker_env(cpus_per_worker, gpus_per_worker)},
            )
            self._factory_ref = ray.put(factory)
            self._actors = [self._actor_class.remote() for _ in range(workers)]
            self.placement = self._wait_ready(start_timeout_s)
        except BaseException:
            self.close()
            raise

    def _check_resources(self, cpus_per_worker: float, gpus_per_worker: float) -> None:
        """Fail fast instead of waiting for actors that cannot be placed.

        Resources of actors killed just before (e.g. by another RayEvaluate's close) are
        released asynchronously, so free resources are polled for a few seconds.
        """
        need = {"CPU": self.workers * cpus_per_worker, "GPU": self.workers * gpus_per_worker}
        deadline = time.monotonic() + _RESOURCE_WAIT_S
        while True:
            total = self._ray.cluster_resources()
            free = self._ray.available_resources()
            short = [
                (name, have.get(name, 0.0), what)
                for have, what in ((total, "has"), (free, "has free"))
                for name in need
                if need[name] > have.get(name, 0.0) + 1e-9
            ]
            if not short:
                return
            name, have, what = short[0]
            if what == "has free" and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            raise WorkerStartError(
                f"{self.workers} evaluator actors need {need[name]:g} {name} in all "
                f"({cpus_per_worker:g} CPU, {gpus_per_worker:g} GPU each) but the Ray cluster "
                f"{what} {have:g}; use fewer workers, close other RayEvaluate objects, or "
                "use a larger cluster"
            )

    def _wait_ready(self, timeout_s: float) -> list[dict[str, Any]]:
        """Place the actors, give each a CPU slot on its node, build every evaluator.

        Returns, per actor in order, ``pid``, ``node`` and ``cpus`` (the cores it is
        pinned to, or ``None``).
        """
        deadline = time.monotonic() + timeout_s
        placement = self._gather([a.ready.remote() for a in self._actors], deadline, timeout_s)
        per_node: dict[str, int] = {}
        for where in placement:
            self._slots.append(per_node.get(where["node"], 0))
            per_node[where["node"]] = self._slots[-1] + 1
        refs = [
            actor.start.remote(self._factory_ref, slot, self._pin)
            for actor, slot in zip(self._actors, self._slots, strict=True)
        ]
        for where, cpus in zip(placement, self._gather(refs, deadline, timeout_s), strict=True):
            where["cpus"] = cpus
        return placement

    def _gather(self, refs: list[Any], deadline: float, timeout_s: float) -> list[Any]:
        ray = self._ray
        left = max(0.0, deadline - time.monotonic())
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=left)
        values = []
        for i, ref in enumerate(refs):
            if ref in pending:
                raise WorkerStartError(
                    f"evaluator actor {i} of {self.workers} did not start within "
                    f"{timeout_s:g} s (not enough free resources in the cluster, or the "
                    f"factory {self._factory_repr} is slow); raise start_timeout_s or check "
                    "`ray status`"
                )
            try:
                values.append(ray.get(ref))
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
                raise WorkerStartError(
                    f"evaluator actor {i} of {self.workers} could not be started: the "
                    f"factory {self._factory_repr} failed in the actor:\n{err}"
                ) from err
        return values

    def _restart(self, slot: int) -> None:
        """Replace the (dead) actor in ``slot`` by a fresh one that rebuilds the evaluator.

        The replacement takes the dead actor's CPU slot; its build runs before any chunk
        sent to it (an actor runs one caller's calls in order).
        """
        self._ray.kill(self._actors[slot], no_restart=True)
        actor = self._actor_class.remote()
        actor.start.remote(self._factory_ref, self._slots[slot], self._pin)
        self._actors[slot] = actor

    def __call__(self, choices: np.ndarray, *, fidelity: int, batch_seed: int) -> np.ndarray:
        if not self._actors:
            raise RuntimeError("this RayEvaluate was closed; create a new one")
        ray = self._ray
        choices = _checked_choices(choices)
        n = choices.shape[0]
        if n == 0:
            return np.zeros((0,), dtype=np.float32)
        chunks = np.array_split(np.arange(n), min(n, self.workers))
        results: list[np.ndarray | None] = [None] * len(chunks)
        failures = [0] * len(chunks)
        queue = deque(range(len(chunks)))
        idle = deque(range(self.workers))
        running: dict[Any, tuple[int, int]] = {}
        while queue or running:
            while queue and idle:
                c, slot = queue.popleft(), idle.popleft()
                ref = self._actors[slot].evaluate.remote(choices[chunks[c]], fidelity, batch_seed)
                running[ref] = (c, slot)
            [ref], _ = ray.wait(list(running), num_returns=1)
            c, slot = running.pop(ref)
            try:
                scores = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                failures[c] += 1
                if failures[c] > self.max_retries:
                    raise WorkerFailedError(
                        f"rows {chunks[c][0]}..{chunks[c][-1]} of a query of {n} failed "
                        f"{failures[c]} times (max_retries={self.max_retries}) because the "
                        f"evaluator actor died; last error:\n{err}"
                    ) from err
                self._restart(slot)
                queue.append(c)
                idle.append(slot)
                continue
            results[c] = _checked_scores(scores, len(chunks[c]), f"evaluator actor {slot}")
            idle.append(slot)
        return np.concatenate(results)

    def close(self) -> None:
        """Kill the actors; shut Ray down if this object started or joined it."""
        for actor in self._actors:
            self._ray.kill(actor, no_restart=True)
        self._actors = []
        if self._owns_ray:
            self._ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> RayEvaluate:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


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
