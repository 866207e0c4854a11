"""The Ray actor pool behind RayEvaluate and RayLayerMap: pinned actors, the call loop,
and failure handling (a dead actor replaced in its slot, a lost one given up, deadlines).
"""

from __future__ import annotations

import heapq
import inspect
import logging
import math
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from allocsearch.config import AUTO_WORKERS as AUTO
from allocsearch.distributed.ray_connect import _init_ray
from allocsearch.distributed.ray_errors import (
    HeadNodeLostError,
    WorkerFailedError,
    WorkerLostWarning,
    WorkerStartError,
)
from allocsearch.distributed.ray_workers import (
    WorkerPlan,
    _check_workers,
    _free_cpu_slot,
    auto_worker_plan,
    driver_like_env,
    host_key,
    local_cpu_count,
    pin_to_cpus,
    start_runtimes_on,
    worker_env,
)
from allocsearch.search.base import split_kwargs

# Seconds to wait for busy cluster resources to become free before refusing to start.
_RESOURCE_WAIT_S = 20.0
# Longest single wait of the call loop: deadlines are checked at least this often.
_POLL_S = 1.0

# Log lines under the backend's name (where users configure it).
_log = logging.getLogger("allocsearch.distributed.ray_backend")
_log.addHandler(logging.NullHandler())  # warnings reach stderr; log lines where configured


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
