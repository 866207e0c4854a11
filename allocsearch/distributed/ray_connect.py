"""Connecting to Ray: reachability of a cluster address, ``ray.init`` (join or start a
local instance), a quiet start of Ray's processes, and :class:`ray_session`."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Iterator
from typing import Any

from allocsearch.config import AUTO_WORKERS as AUTO
from allocsearch.distributed.ray_errors import (
    WorkerStartError,
)
from allocsearch.distributed.ray_workers import _check_workers, local_cpu_count

# ray.init settings shared by every start or join.
_RAY_INIT: dict[str, Any] = dict(
    include_dashboard=False, log_to_driver=False, ignore_reinit_error=True
)


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
