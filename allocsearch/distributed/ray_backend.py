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

import contextlib
import heapq
import inspect
import logging
import math
import os
import socket
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import numpy as np

from allocsearch.config import AUTO_WORKERS as AUTO
from allocsearch.search.base import Evaluate, split_kwargs

EvaluatorFactory = Callable[[], Evaluate]
"""A picklable zero-argument callable that builds an evaluator (run once per process)."""

# Environment variables that size the thread pools of numerical libraries.
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# Seconds to wait for busy cluster resources to become free before refusing to start.
_RESOURCE_WAIT_S = 20.0
# Longest single wait of the call loop: deadlines are checked at least this often.
_POLL_S = 1.0
# ray.init settings shared by every start or join.
_RAY_INIT: dict[str, Any] = dict(
    include_dashboard=False, log_to_driver=False, ignore_reinit_error=True
)

_log = logging.getLogger(__name__)
_log.addHandler(logging.NullHandler())  # warnings reach stderr; log lines where configured

T = TypeVar("T")
R = TypeVar("R")


class WorkerStartError(RuntimeError):
    """Evaluator actors could not be started (factory failed, or not enough resources)."""


class WorkerFailedError(RuntimeError):
    """A call kept failing because the actors running it died, or no actor is left."""


class HeadNodeLostError(WorkerFailedError):
    """The Ray node of this driver (the head node of a local instance, or the node the
    driver joined) is gone: the search cannot go on; its checkpoints are kept, and the
    message names ``--resume``."""


class WorkerLostWarning(RuntimeWarning):
    """An actor died and could not be replaced in time: the pool goes on without it."""


class InProcessEvaluate:
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
    _set_affinity_of_all_threads(cpus)
    return cpus


def _set_affinity_of_all_threads(cpus: Sequence[int]) -> None:
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:  # the thread ended meanwhile
            pass


def driver_like_env() -> dict[str, str]:
    """Environment variables for actors that must compute like this process: its XLA flags
    and thread-pool sizes (:data:`_THREAD_VARS`, default: :func:`local_cpu_count`)."""
    env = {name: os.environ.get(name, str(local_cpu_count())) for name in _THREAD_VARS}
    env["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
    return env


def start_runtimes_on(count: int) -> None:
    """Start JAX's CPU client and load LAPACK/BLAS while this process may run on ``count``
    of its CPUs, so that their thread pools get ``count`` threads (XLA sizes its pool from
    the affinity set, OpenBLAS from it or its variables); the affinity is restored after.

    An actor that starts its runtimes with the driver's core count and the driver's
    environment (:func:`driver_like_env`) computes what the driver computes bit for bit
    (XLA's and OpenBLAS's blocking depends on the pool size), even when pinned to one core
    afterwards. Nothing happens where there is no affinity support.
    """
    if not hasattr(os, "sched_setaffinity"):
        return
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, allowed[: max(1, count)])
    try:
        import jax
        import scipy.linalg  # noqa: F401  (jax's CPU LAPACK kernels come from scipy's)

        jax.local_devices(backend="cpu")
    finally:
        _set_affinity_of_all_threads(allowed)


@dataclass(frozen=True)
class WorkerPlan:
    """How many Ray actors to start and what each one reserves.

    Attributes:
      workers: number of actors, >= 1.
      cpus_per_worker: CPUs each actor reserves (its thread pools get this many threads).
      gpus_per_worker: GPUs each actor reserves (0: a CPU actor).
    """

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float


def local_cpu_count() -> int:
    """CPU cores this process may run on: its affinity set on Linux, else ``os.cpu_count()``."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def auto_worker_plan(
    resources: Mapping[str, float],
    *,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float | None = None,
) -> WorkerPlan:
    """What ``workers="auto"`` means on a Ray instance with ``resources``.

    Args:
      resources: the instance's total resources by Ray name (``"CPU"``, ``"GPU"``): for a
        cluster ``ray.cluster_resources()``; for a local instance about to be started
        ``{"CPU": local_cpu_count()}``.
      cpus_per_worker: CPUs per actor, > 0.
      gpus_per_worker: GPUs per actor; ``None``: 1 when ``resources`` has at least one GPU,
        else 0.

    Returns:
      GPU actors (``gpus_per_worker > 0``): as many as the GPUs hold and the CPUs can feed,
      ``min(floor(GPU / gpus_per_worker), floor(CPU / cpus_per_worker))``. CPU actors:
      ``floor(CPU / cpus_per_worker)``, one per core with the default 1 CPU. Totals are
      used: on a cluster whose nodes cannot each hold a whole number of actors, fewer may
      be placeable (pass an explicit ``workers`` then).

    Raises:
      WorkerStartError: not even one actor fits (the message lists ``resources``).
    """
    if not cpus_per_worker > 0:
        raise ValueError(f"cpus_per_worker must be > 0, got {cpus_per_worker}")
    if gpus_per_worker is not None and gpus_per_worker < 0:
        raise ValueError(f"gpus_per_worker must be >= 0 or None, got {gpus_per_worker}")
    cpus = float(resources.get("CPU", 0.0))
    gpus = float(resources.get("GPU", 0.0))
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus >= 1.0 else 0.0
    # 1e-9: shares such as 0.1 do not divide totals exactly in binary
    workers = math.floor(cpus / cpus_per_worker + 1e-9)
    if gpus_per_worker > 0:
        workers = min(workers, math.floor(gpus / gpus_per_worker + 1e-9))
    if workers < 1:
        raise WorkerStartError(
            f"workers='auto': no room for one actor of {cpus_per_worker:g} CPU and "
            f"{gpus_per_worker:g} GPU on a Ray instance with {dict(resources)}; give the "
            "instance more resources or ask for smaller actors"
        )
    return WorkerPlan(workers, float(cpus_per_worker), float(gpus_per_worker))


def _check_workers(workers: int | str) -> None:
    if workers == AUTO:
        return
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1 or {AUTO!r}, got {workers!r}")


CONNECT_TIMEOUT_ENV = "ALLOCSEARCH_RAY_CONNECT_TIMEOUT_S"
"""Seconds to wait for a Ray cluster's address to accept a connection (default 10)."""


def check_reachable(address: str, timeout_s: float | None = None) -> None:
    """Refuse an address where nothing listens, before ``ray.init`` (which retries an
    unreachable cluster for minutes, printing warnings): a TCP connection to ``host:port``
    (``ray://`` addresses too) must open within ``timeout_s`` (default: the environment's
    ``ALLOCSEARCH_RAY_CONNECT_TIMEOUT_S``, else 10 s). ``auto`` and ``local`` are Ray's
    own and not checked.

    Raises:
      WorkerStartError: naming the address, the timeout and the system's reason.
    """
    import socket

    target = address.removeprefix("ray://")
    if target in ("auto", "local") or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        port_number = int(port)
    except ValueError:
        raise WorkerStartError(
            f"Ray address {address!r} is not host:port (e.g. 10.0.0.1:6379 or ray://head:10001)"
        ) from None
    if timeout_s is None:
        timeout_s = float(os.environ.get(CONNECT_TIMEOUT_ENV, "10"))
    fix = (
        f"check --address / RAY_ADDRESS (or {CONNECT_TIMEOUT_ENV}), or leave it out to start "
        f"a local Ray instance"
    )
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host.strip("[]"), port_number), timeout=timeout_s) as s:
            answered = _answers_http2(s, deadline)
    except OSError as e:
        raise WorkerStartError(
            f"no Ray cluster answers at {address!r}: cannot connect to {host}:{port_number} "
            f"within {timeout_s:g} s ({e}); {fix}"
        ) from None
    if not answered:
        raise WorkerStartError(
            f"no Ray cluster answers at {address!r}: {host}:{port_number} accepts a connection "
            f"but sends nothing within {timeout_s:g} s (a Ray head answers at once; a "
            f"firewall dropping its packets, or another program, does not); {fix}"
        )


# HTTP/2's client connection preface and an empty SETTINGS frame (RFC 9113, 3.4 and 6.5).
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _answers_http2(sock: Any, deadline: float) -> bool:
    """Whether the peer of ``sock`` sends a byte (or closes) before ``deadline``
    (``time.monotonic``). A Ray head's GCS and Ray client server are gRPC servers, which
    send their HTTP/2 SETTINGS frame as soon as a connection opens; the client preface
    sent first is what a gRPC client sends, so no server takes it for another protocol.
    Without this, ``ray.init`` retries a silent address for minutes, printing Ray's
    ``gcs_client.cc`` warnings straight to the terminal."""
    try:
        sock.sendall(_HTTP2_PREFACE)
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.recv(1)
    except TimeoutError:
        return False
    except OSError:  # reset or closed by the peer: something there answered
        return True
    return True


def _init_ray(
    workers: int | str, address: str | None, cpus_per_worker: float, gpus_per_worker: float | None
) -> bool:
    """Join the cluster at ``address`` (default: ``RAY_ADDRESS``) or start a local instance
    sized for ``workers`` actors, unless this process is connected already. Returns
    whether it connected (then the caller shuts Ray down when done)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        check_reachable(address)
        with _ray_starts_processes():
            ray.init(address=address, **_RAY_INIT)
        return True
    if workers != AUTO:
        cpus = math.ceil(int(workers) * cpus_per_worker)
        gpus = math.ceil(int(workers) * (gpus_per_worker or 0)) or None
    else:
        # "auto" on a local instance: the cores this process may use; GPUs only when
        # asked for (None lets Ray detect them)
        cpus, gpus = local_cpu_count(), None if gpus_per_worker else 0
    with _ray_starts_processes():
        ray.init(address="local", num_cpus=cpus, num_gpus=gpus, **_RAY_INIT)
    return True


# Ray's logger of token-authentication setup, and the notice it logs at every start of a
# local instance when RAY_AUTH_MODE is unset: that it enabled token authentication (its
# default, kept) and how to opt out.
_RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_RAY_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"


class _DropMessage(logging.Filter):
    """Drops the records whose message starts with ``prefix``; others pass."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def _ray_starts_processes() -> Iterator[None]:
    """Around ``ray.init``: no JAX fork warning and no token-authentication notice.

    JAX warns "os.fork() was called ... will likely lead to a deadlock" at every fork once
    its backend is up. ``ray.init`` starts Ray's own executables (GCS server, raylet, log
    monitor) with ``subprocess.Popen`` and a ``preexec_fn`` (parent-death signal), so each
    child runs that one function and then ``exec``s: it never touches JAX's threads or
    locks and cannot deadlock on them. Only that warning, only inside ``ray.init``, is
    ignored; forks elsewhere still warn. Ray's notice that it enabled token
    authentication (its default for a local instance) is dropped the same way; the
    authentication itself is Ray's choice, or the user's ``RAY_AUTH_MODE``."""
    notice = _DropMessage(_RAY_AUTH_NOTICE)
    auth_logger = logging.getLogger(_RAY_AUTH_LOGGER)
    auth_logger.addFilter(notice)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning
            )
            yield
    finally:
        auth_logger.removeFilter(notice)


class ray_session:  # noqa: N801  (a context manager used like a function)
    """Connect this process to Ray for a ``with`` block: join the cluster at ``address``
    (default: ``RAY_ADDRESS``) or start a local instance sized for ``workers`` actors of
    ``cpus_per_worker`` CPUs; at exit, disconnect (and stop the local instance) if this
    object connected. Backends created inside share the connection instead of each
    starting and stopping their own, e.g. Týr's per-round layer maps and evaluators.
    Nothing happens when this process is connected already."""

    def __init__(
        self,
        *,
        workers: int | str,
        address: str | None = None,
        cpus_per_worker: float = 1.0,
        gpus_per_worker: float | None = None,
    ) -> None:
        _check_workers(workers)
        self._args = (workers, address, cpus_per_worker, gpus_per_worker)
        self._owns = False

    def __enter__(self) -> ray_session:
        self._owns = _init_ray(*self._args)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._owns:
            import ray

            ray.shutdown()
            self._owns = False


class _WorkerActor:
    """Body of one Ray actor: pins itself, builds its object once, runs calls.

    Construction does nothing, so that the driver can see where the actor landed
    (:meth:`ready`) and give it a CPU slot of its host before :meth:`start` builds the
    object (an evaluator, or nothing) and with it the JAX runtime, whose thread pool
    follows the affinity.
    """

    def __init__(self) -> None:
        self._built: Any = None

    def ready(self) -> dict[str, Any]:
        """Where the actor runs: ``pid``, ``node`` (Ray node id), ``ip`` (the node's
        address) and ``host`` (:func:`host_key`: equal for every raylet of one machine)."""
        import ray

        return {
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "host": host_key(),
        }

    def start(
        self, factory: Callable[[], Any] | None, slot: int, pin: int, init_cpus: int = 0
    ) -> dict[str, Any]:
        """Start the runtimes on ``init_cpus`` CPUs (0: skip, they start on first use,
        after pinning), pin to ``pin`` CPUs of ``slot`` (0: no pinning), build
        ``factory()``. Returns the pinned ``cpus`` (or ``None``) and whether the built
        evaluator scores shards of a minibatch (``shards``, see :func:`supports_shards`)."""
        if init_cpus:
            start_runtimes_on(init_cpus)
        cpus = pin_to_cpus(slot, pin) if pin else None
        self._built = factory() if factory is not None else None
        return {"cpus": cpus, "shards": supports_shards(self._built)}

    def evaluate(
        self,
        choices: np.ndarray,
        fidelity: int,
        batch_seed: int,
        shard: tuple[int, int] | None = None,
        split: str = "calibration",
    ) -> Any:
        """Score ``choices`` with the evaluator :meth:`start` built: float[n]; with
        ``shard``, ``(scores float[n], sequences)`` of that shard of the minibatch
        (``(None, 0)`` for an empty shard, which is not scored); ``split``: the
        calibration or the validation rows (``Query.split``)."""
        if self._built is None:
            raise RuntimeError("the evaluator of this actor was not built (start failed)")
        kw = split_kwargs(split)
        if shard is None:
            return np.asarray(self._built(choices, fidelity=fidelity, batch_seed=batch_seed, **kw))
        from allocsearch.evaluate.evaluator import shard_rows

        rows = len(shard_rows(self._built.minibatch_rows(fidelity, batch_seed, **kw), *shard))
        if rows == 0:
            return None, 0
        scores = self._built(choices, fidelity=fidelity, batch_seed=batch_seed, shard=shard, **kw)
        return np.asarray(scores), rows

    def run(self, fn: Callable[[Any], Any], item: Any) -> Any:
        """``fn(item)`` in this actor."""
        return fn(item)


def host_key() -> str:
    """What identifies this process's machine for core pinning: the kernel's boot id
    (shared by every raylet and container of one machine), else the host name.

    Raylets are not machines: two raylets on one host (``ray start`` twice, or
    ``ray.cluster_utils.Cluster``) lend the same cores, so CPU slots are counted per
    machine, never per Ray node.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return "boot:" + f.read().strip()
    except OSError:
        return "host:" + socket.gethostname()


def supports_shards(evaluate: Any) -> bool:
    """Whether ``evaluate`` can score a shard of a minibatch: it is called with a ``shard``
    keyword (see :meth:`~allocsearch.evaluate.evaluator.Evaluator.__call__`) and tells
    its minibatch's sequences with ``minibatch_rows(fidelity, batch_seed)``."""
    if evaluate is None or not callable(getattr(evaluate, "minibatch_rows", None)):
        return False
    try:
        return "shard" in inspect.signature(evaluate).parameters
    except (TypeError, ValueError):  # no signature (a builtin)
        return False


class _ActorPool:
    """``workers`` pinned Ray actors on a local Ray instance or a cluster, and the loop that
    runs calls on them, surviving actor deaths and lost nodes.

    Shared by :class:`RayEvaluate` and :class:`RayLayerMap`; see :class:`RayEvaluate` for
    the arguments. ``what`` names the actors in messages (``"evaluator actor"``);
    ``like_driver`` gives CPU actors this process's thread-pool sizes and XLA flags
    (:func:`driver_like_env`, :func:`start_runtimes_on`) instead of :func:`worker_env`'s.

    Every actor has a fixed index (its *slot* in :attr:`actors`); a dead actor is replaced
    in its slot, and a slot whose replacement could not be started within
    ``replace_timeout_s`` is *lost*: its actor is ``None`` from then on, and the pool
    goes on with the others (:attr:`live`).
    """

    def __init__(
        self,
        factory: Callable[[], Any] | None,
        *,
        workers: int | str,
        address: str | None,
        cpus_per_worker: float,
        gpus_per_worker: float | None,
        pin_cpus: bool,
        start_timeout_s: float,
        what: str,
        like_driver: bool = False,
        replace_timeout_s: float = 60.0,
        call_timeout_s: float | None = None,
    ) -> None:
        _check_workers(workers)
        if not cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {cpus_per_worker}")
        if gpus_per_worker is not None and gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {gpus_per_worker}")
        for name, value in (
            ("start_timeout_s", start_timeout_s),
            ("replace_timeout_s", replace_timeout_s),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if call_timeout_s is not None and not call_timeout_s > 0:
            raise ValueError(f"call_timeout_s must be > 0 or None, got {call_timeout_s}")
        import ray

        self._ray = ray
        self.what = what
        self.replace_timeout_s = float(replace_timeout_s)
        self.call_timeout_s = call_timeout_s
        self._factory_repr = repr(factory)
        self._owns_ray = False
        self.actors: list[Any] = []
        self.placement: list[dict[str, Any]] = []
        self.events: list[str] = []
        self.shards = False
        self._closed = False
        # slot -> its replacement on the way; kept between calls of stream()
        self._replacing: dict[int, _Replacement] = {}
        try:
            self.plan = self._connect(workers, address, cpus_per_worker, gpus_per_worker)
            plan = self.plan
            self._pin = (
                max(1, math.floor(plan.cpus_per_worker))
                if pin_cpus and not plan.gpus_per_worker
                else 0
            )
            # like_driver: CPU actors start their runtimes with this process's core count
            self._init_cpus = local_cpu_count() if like_driver and not plan.gpus_per_worker else 0
            self._check_resources()
            self._actor_class = ray.remote(_WorkerActor).options(
                num_cpus=plan.cpus_per_worker,
                num_gpus=plan.gpus_per_worker,
                runtime_env={
                    "env_vars": driver_like_env()
                    if self._init_cpus
                    else worker_env(plan.cpus_per_worker, plan.gpus_per_worker)
                },
            )
            self._factory_ref = ray.put(factory)
            self._driver_node = ray.get_runtime_context().get_node_id()
            self.actors = [self._actor_class.remote() for _ in range(plan.workers)]
            self.placement = self._wait_ready(start_timeout_s)
        except BaseException:
            self.close()
            raise

    @property
    def workers(self) -> int:
        """Actors started (the plan's count; see :attr:`live` for those left)."""
        return self.plan.workers

    @property
    def live(self) -> list[int]:
        """Slots that still have an actor (running, or being replaced)."""
        return [slot for slot, actor in enumerate(self.actors) if actor is not None]

    def _connect(
        self,
        workers: int | str,
        address: str | None,
        cpus_per_worker: float,
        gpus_per_worker: float | None,
    ) -> WorkerPlan:
        """Join or start Ray and resolve ``workers`` into a plan."""
        ray = self._ray
        self._owns_ray = _init_ray(workers, address, cpus_per_worker, gpus_per_worker)
        if workers != AUTO:
            return WorkerPlan(int(workers), float(cpus_per_worker), float(gpus_per_worker or 0))
        return auto_worker_plan(
            ray.cluster_resources(),
            cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus_per_worker,
        )

    def _check_resources(self) -> None:
        """Fail fast instead of waiting for actors that cannot be placed.

        Resources of actors killed just before (e.g. by another pool's close) are
        released asynchronously, so free resources are polled for a few seconds.
        """
        plan = self.plan
        need = {
            "CPU": plan.workers * plan.cpus_per_worker,
            "GPU": plan.workers * plan.gpus_per_worker,
        }
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
                f"{plan.workers} {self.what}s need {need[name]:g} {name} in all "
                f"({plan.cpus_per_worker:g} CPU, {plan.gpus_per_worker:g} GPU each) but the "
                f"Ray cluster {what} {have:g}; use fewer workers, close other Ray backends, "
                "or use a larger cluster"
            )

    def _wait_ready(self, timeout_s: float) -> list[dict[str, Any]]:
        """Place the actors, give each a CPU slot on its host, start every actor.

        Returns, per actor in order, ``pid``, ``node``, ``ip``, ``host``, ``slot`` (its
        CPU slot on the host) and ``cpus`` (the cores it is pinned to, or ``None``).
        """
        deadline = time.monotonic() + timeout_s
        placement = self._gather([a.ready.remote() for a in self.actors], deadline, timeout_s)
        for where in placement:
            where["slot"] = _free_cpu_slot(placement, where["host"])
        refs = [
            actor.start.remote(self._factory_ref, where["slot"], self._pin, self._init_cpus)
            for actor, where in zip(self.actors, placement, strict=True)
        ]
        started = self._gather(refs, deadline, timeout_s)
        for where, info in zip(placement, started, strict=True):
            where["cpus"] = info["cpus"]
        self.shards = all(info["shards"] for info in started)
        return placement

    def _gather(self, refs: list[Any], deadline: float, timeout_s: float) -> list[Any]:
        ray = self._ray
        left = max(0.0, deadline - time.monotonic())
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=left)
        values = []
        for i, ref in enumerate(refs):
            if ref in pending:
                raise WorkerStartError(
                    f"{self.what} {i} of {self.workers} did not start within "
                    f"{timeout_s:g} s (not enough free resources in the cluster, or the "
                    f"factory {self._factory_repr} is slow); raise start_timeout_s or check "
                    "`ray status`"
                )
            try:
                values.append(ray.get(ref))
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
                raise WorkerStartError(
                    f"{self.what} {i} of {self.workers} could not be started: the "
                    f"factory {self._factory_repr} failed in the actor:\n{err}"
                ) from err
        return values

    def _note(self, message: str, *, lost: bool = False) -> None:
        """Record a fault event: :attr:`events`, the module's logger, and a
        :class:`WorkerLostWarning` (stderr) when an actor is lost for good."""
        self.events.append(message)
        _log.warning(message)
        if lost:
            warnings.warn(message, WorkerLostWarning, stacklevel=4)

    def driver_node_alive(self) -> bool:
        """Whether this driver's own Ray node is alive in the cluster's node table (False
        when the table cannot be read: the head's control plane went with it)."""
        try:
            nodes = self._ray.nodes()
        except Exception:  # noqa: BLE001  (any failure to reach the GCS means it is gone)
            return False
        return any(n.get("NodeID") == self._driver_node and n.get("Alive") for n in nodes)

    def _check_driver_node(self) -> None:
        """After an actor's death: raise :class:`HeadNodeLostError` (one line naming
        ``--resume``) when the driver's own node died, rather than waiting
        ``replace_timeout_s`` for replacements that the lost head cannot place."""
        if self.driver_node_alive():
            return
        raise HeadNodeLostError(
            f"the Ray node of this driver (node {self._driver_node[:12]}, the head node) was "
            f"lost with its {self.what}s; the search stops here with its checkpoints kept: "
            "start Ray again and rerun the same command with --resume to continue"
        )

    def _describe(self, slot: int) -> str:
        where = self.placement[slot]
        return (
            f"{self.what} {slot} (pid {where['pid']}, node {where['node'][:12]} at {where['ip']})"
        )

    def _replace(self, slot: int, replacing: dict[int, _Replacement], cause: str) -> None:
        """Kill the actor of ``slot`` and start placing a fresh one in its place.

        The replacement must be placed and started (its object built) within
        ``replace_timeout_s`` of the death; :meth:`_advance` moves it on.
        """
        self._ray.kill(self.actors[slot], no_restart=True)
        actor = self._actor_class.remote()
        self.actors[slot] = actor
        deadline = time.monotonic() + self.replace_timeout_s
        replacing[slot] = _Replacement(actor, actor.ready.remote(), "ready", deadline)
        self._note(
            f"{self._describe(slot)} died ({cause}); starting a replacement "
            f"(up to {self.replace_timeout_s:g} s to place and start it)"
        )

    def _advance(self, slot: int, replacing: dict[int, _Replacement], idle: deque[int]) -> None:
        """The replacement of ``slot`` answered its ``ready`` or ``start`` call: give it a
        CPU slot and start it, or put it to work; a replacement that died is replaced
        again while time is left."""
        ray = self._ray
        rep = replacing.pop(slot)
        try:
            value = ray.get(rep.ref)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
            self._check_driver_node()
            first_line = str(err).strip().splitlines()[-1] if str(err).strip() else type(err)
            if time.monotonic() < rep.deadline:
                self._note(f"the replacement of {self.what} {slot} failed: {first_line}")
                self._ray.kill(rep.actor, no_restart=True)
                actor = self._actor_class.remote()
                self.actors[slot] = actor
                replacing[slot] = _Replacement(actor, actor.ready.remote(), "ready", rep.deadline)
            else:
                self._lose(slot, f"its replacement failed: {first_line}")
            return
        if rep.stage == "ready":
            others = [
                w for s, w in enumerate(self.placement) if s != slot and self.actors[s] is not None
            ]
            value["slot"] = _free_cpu_slot(others, value["host"])
            value["cpus"] = None
            self.placement[slot] = value
            ref = rep.actor.start.remote(
                self._factory_ref, value["slot"], self._pin, self._init_cpus
            )
            replacing[slot] = _Replacement(rep.actor, ref, "start", rep.deadline)
            return
        self.placement[slot]["cpus"] = value["cpus"]
        idle.append(slot)
        self._note(f"{self._describe(slot)} replaced the dead one and is running")

    def _lose(self, slot: int, cause: str) -> None:
        self._ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = None
        self.placement[slot]["lost"] = True
        left = len(self.live)
        self._note(
            f"{self.what} {slot} lost: {cause}; its work goes to the other actors; "
            f"going on with {left} of {self.workers} {self.what}s",
            lost=True,
        )

    def stream(
        self,
        method: str,
        calls: Sequence[tuple[Any, ...]],
        *,
        max_retries: int,
        describe: Callable[[int], str],
        window: int | None = None,
    ) -> Iterator[Any]:
        """Run ``actor.method(*calls[i])`` for every ``i`` and yield the results in order.

        Each call goes to an idle actor, lowest index first. A call whose actor died goes
        to an idle actor again, up to ``max_retries`` times, then
        :class:`WorkerFailedError` names it with ``describe(i)``. The dead actor is
        replaced in its slot; a replacement that cannot be placed and started within
        ``replace_timeout_s`` (a lost node on a full cluster) is given up: the slot is
        lost (:class:`WorkerLostWarning`) and the other actors take its calls.
        :class:`WorkerFailedError` is raised when no actor is left. A call running longer
        than ``call_timeout_s`` counts as its actor's death. An exception the call
        itself raised is raised here as it is. With ``window``, a call starts only when
        fewer than ``window`` calls before it are still unyielded, which bounds the
        results held here to ``window``.

        No wait is unbounded: the loop wakes at least every :data:`_POLL_S` seconds to
        check the replacements' and calls' deadlines.
        """
        if self._closed:
            raise RuntimeError(f"this Ray backend ({self.what}s) was closed; create a new one")
        ray = self._ray
        n = len(calls)
        window = n if window is None else max(1, window)
        pending = list(range(n))  # a heap: the lowest index is started first
        failures = [0] * n
        done: dict[int, Any] = {}
        replacing = self._replacing
        idle = deque(slot for slot in self.live if slot not in replacing)
        running: dict[Any, tuple[int, int, float]] = {}  # ref -> (call, slot, deadline)
        next_out = 0
        while next_out < n:
            self._expire(replacing, running, pending, failures, max_retries, describe)
            while pending and idle and pending[0] < next_out + window:
                i, slot = heapq.heappop(pending), idle.popleft()
                ref = getattr(self.actors[slot], method).remote(*calls[i])
                limit = self.call_timeout_s
                running[ref] = (i, slot, math.inf if limit is None else time.monotonic() + limit)
            if not running and not replacing:
                self._check_driver_node()
                raise WorkerFailedError(
                    f"all {self.workers} {self.what}s were lost and none could be replaced "
                    f"within replace_timeout_s={self.replace_timeout_s:g} s; "
                    f"{describe(pending[0]) if pending else 'the call'} cannot run. Events:\n"
                    + "\n".join(self.events)
                )
            deadlines = [r.deadline for r in replacing.values()]
            deadlines += [d for (_, _, d) in running.values()]
            wait_s = min([_POLL_S, *(d - time.monotonic() for d in deadlines)])
            by_ref = {r.ref: slot for slot, r in replacing.items()}
            ready, _ = ray.wait(
                [*running, *by_ref], num_returns=1, timeout=max(0.0, wait_s), fetch_local=False
            )
            if not ready:
                continue
            [ref] = ready
            if ref in by_ref:
                self._advance(by_ref[ref], replacing, idle)
                continue
            i, slot, _ = running.pop(ref)
            try:
                value = ray.get(ref)
            except ray.exceptions.RayTaskError as err:
                # The called code raised (the actor lives): raise that exception as this
                # process would have, so callers and the CLI see e.g. the ValueError
                # itself; the remote traceback is chained.
                if isinstance(err.cause, Exception):
                    raise err.cause from err
                raise
            except ray.exceptions.RayActorError as err:
                self._check_driver_node()
                failures[i] += 1
                heapq.heappush(pending, i)
                self._check_failures(failures[i], max_retries, describe(i), err)
                self._replace(slot, replacing, f"while running {describe(i)}: {type(err).__name__}")
                continue
            idle.append(slot)
            done[i] = value
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1
        # Replacements still on their way when the results are complete stay in
        # self._replacing: the next call goes on waiting for them (or gives them up).

    def _expire(
        self,
        replacing: dict[int, _Replacement],
        running: dict[Any, tuple[int, int, float]],
        pending: list[int],
        failures: list[int],
        max_retries: int,
        describe: Callable[[int], str],
    ) -> None:
        """Give up replacements past their deadline (the slot is lost) and treat calls
        past ``call_timeout_s`` as their actor's death."""
        now = time.monotonic()
        for slot, rep in list(replacing.items()):
            if now >= rep.deadline:
                self._check_driver_node()
                del replacing[slot]
                self._lose(
                    slot,
                    f"no replacement could be placed and started within "
                    f"replace_timeout_s={self.replace_timeout_s:g} s (no free resources for "
                    "it in the cluster, or its factory failed or is slow)",
                )
        for ref, (i, slot, deadline) in list(running.items()):
            if now >= deadline:
                del running[ref]
                failures[i] += 1
                heapq.heappush(pending, i)
                self._check_failures(failures[i], max_retries, describe(i), None)
                self._replace(slot, replacing, f"{describe(i)} ran over {self.call_timeout_s:g} s")

    def _check_failures(
        self, failures: int, max_retries: int, what: str, err: BaseException | None
    ) -> None:
        if failures > max_retries:
            raise WorkerFailedError(
                f"{what} failed {failures} times (max_retries={max_retries}) because the "
                f"{self.what} running it died; last error:\n{err}"
            ) from err

    def run_one(self, fn: Callable[[Any], Any], item: Any, *, max_retries: int) -> Any:
        """``fn(item)`` on one actor (the first idle one), surviving its death like
        :meth:`stream`."""
        [value] = self.stream("run", [(fn, item)], max_retries=max_retries, describe=_one_call)
        return value

    def close(self) -> None:
        """Kill the actors; shut Ray down if this pool started or joined it."""
        for actor in self.actors:
            if actor is not None:
                self._ray.kill(actor, no_restart=True)
        self.actors = []
        self._closed = True
        if self._owns_ray:
            self._ray.shutdown()
            self._owns_ray = False


def _one_call(_: int) -> str:
    return "the call"


@dataclass
class _Replacement:
    """A replacement actor on its way: the ``ref`` of its ``ready`` or ``start`` call
    (``stage``), and the monotonic time by which it must be running."""

    actor: Any
    ref: Any
    stage: str
    deadline: float


def _free_cpu_slot(placement: Sequence[Mapping[str, Any]], host: str) -> int:
    """The lowest CPU slot of ``host`` that no actor of ``placement`` (those with a
    ``slot`` already) holds: actors of one machine get disjoint cores, whichever raylet
    they run under."""
    taken = {w["slot"] for w in placement if w.get("host") == host and "slot" in w}
    return next(k for k in range(len(taken) + 1) if k not in taken)


class RayEvaluate:
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
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.max_retries = max_retries
        self._pool = _ActorPool(
            factory,
            workers=workers,
            address=address,
            cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus_per_worker,
            pin_cpus=pin_cpus,
            start_timeout_s=start_timeout_s,
            what="evaluator actor",
            replace_timeout_s=replace_timeout_s,
            call_timeout_s=call_timeout_s,
        )
        self.workers = self._pool.plan.workers
        self.cpus_per_worker = self._pool.plan.cpus_per_worker
        self.gpus_per_worker = self._pool.plan.gpus_per_worker
        self.placement = self._pool.placement
        self.events = self._pool.events

    @property
    def live_workers(self) -> int:
        """Actors left (running, or being replaced): ``workers`` less the lost ones."""
        return len(self._pool.live)

    def __call__(
        self, choices: np.ndarray, *, fidelity: int, batch_seed: int, split: str = "calibration"
    ) -> np.ndarray:
        choices = _checked_choices(choices)
        n = choices.shape[0]
        if self._pool._closed:
            raise RuntimeError("this RayEvaluate was closed; create a new one")
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
        if self._pool._closed:
            raise RuntimeError("this RayEvaluate was closed; create a new one")
        return self._pool.run_one(fn, item, max_retries=self.max_retries)

    def close(self) -> None:
        """Kill the actors; shut Ray down if this object started or joined it."""
        self._pool.close()

    def __enter__(self) -> RayEvaluate:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class RayLayerMap:
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
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.max_retries = max_retries
        self._pool = _ActorPool(
            None,
            like_driver=like_driver,
            workers=workers,
            address=address,
            cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus_per_worker,
            pin_cpus=pin_cpus,
            start_timeout_s=start_timeout_s,
            what="layer actor",
            replace_timeout_s=replace_timeout_s,
        )
        self.workers = self._pool.plan.workers
        self.cpus_per_worker = self._pool.plan.cpus_per_worker
        self.gpus_per_worker = self._pool.plan.gpus_per_worker
        self.placement = self._pool.placement
        self.events = self._pool.events

    @property
    def live_workers(self) -> int:
        """Actors left (running, or being replaced): ``workers`` less the lost ones."""
        return len(self._pool.live)

    def __call__(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        if self._pool._closed:
            raise RuntimeError("this RayLayerMap was closed; create a new one")
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

    def close(self) -> None:
        """Kill the actors; shut Ray down if this object started or joined it."""
        self._pool.close()

    def __enter__(self) -> RayLayerMap:
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
