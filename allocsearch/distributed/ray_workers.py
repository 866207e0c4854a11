"""Ray workers' sizes: how many actors, their thread pools, CPU pinning, machine identity.

No ``ray`` import here: these are plain functions of the process and its machine (the
actors call them, :mod:`allocsearch.distributed.ray_pool` plans with them).
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from allocsearch.config import AUTO_WORKERS as AUTO
from allocsearch.distributed.ray_errors import (
    WorkerStartError,
)

# Environment variables that size the thread pools of numerical libraries.
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


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


def _free_cpu_slot(placement: Sequence[Mapping[str, Any]], host: str) -> int:
    """The lowest CPU slot of ``host`` that no actor of ``placement`` (those with a
    ``slot`` already) holds: actors of one machine get disjoint cores, whichever raylet
    they run under."""
    taken = {w["slot"] for w in placement if w.get("host") == host and "slot" in w}
    return next(k for k in range(len(taken) + 1) if k not in taken)
