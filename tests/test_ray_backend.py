"""Ray backend: same scores as in process, actor deaths survived, clear start-up errors,
what ``workers="auto"`` means, and the layer map of the supernet build.

One local Ray instance (4 logical CPUs) is shared by most of the module; tests that need
Ray are marked slow (Ray and actor start-up take seconds) and still run in CI.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import jax
import numpy as np
import pytest
import resume_worker
import test_evaluator_shard
from resume_worker import (
    BUDGET,
    SEED,
    AdditiveFactory,
    FailingFactory,
    evo_searcher,
    result_json,
    tiny_spec,
)

from allocsearch.distributed import ray_backend, ray_pool
from allocsearch.distributed.local import run_search
from allocsearch.distributed.ray_backend import (
    InProcessEvaluate,
    RayEvaluate,
    RayLayerMap,
    WorkerFailedError,
    WorkerLostWarning,
    WorkerPlan,
    WorkerStartError,
    auto_worker_plan,
    local_cpu_count,
    worker_env,
)
from allocsearch.search.dp import TableSearcher

# Logical CPUs of the test instance (Ray schedules by them; the machine may have fewer
# cores): the shared 2-worker evaluator plus one more 2-worker evaluator fit.
CPUS = 4


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance for the module; test helpers are shipped to it by value."""
    import ray  # a dependency of allocsearch: a missing ray fails here, it is not skipped

    # The helper modules live in tests/, which Ray's worker processes cannot import.
    ray.cloudpickle.register_pickle_by_value(resume_worker)
    ray.cloudpickle.register_pickle_by_value(test_evaluator_shard)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_evaluate(ray_cluster):
    with RayEvaluate(AdditiveFactory(sleep_s=0.005), workers=2) as evaluate:
        yield evaluate


def _search(searcher, evaluate):
    return run_search(searcher, evaluate, tiny_spec(), BUDGET, key=jax.random.key(SEED))


def test_worker_env_limits_threads_before_jax_starts():
    one = worker_env(1, 0)
    assert one["OMP_NUM_THREADS"] == one["MKL_NUM_THREADS"] == one["OPENBLAS_NUM_THREADS"] == "1"
    assert "--xla_cpu_multi_thread_eigen=false" in one["XLA_FLAGS"]
    four = worker_env(4, 0)
    assert four["OMP_NUM_THREADS"] == "4" and "XLA_FLAGS" not in four
    assert worker_env(0.5, 0)["OMP_NUM_THREADS"] == "1"
    shared_gpu = worker_env(1, 0.5)
    assert shared_gpu["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in worker_env(1, 1)


def test_in_process_backend_is_the_evaluator_itself():
    rows = np.array([[0, 1, 2, 3, 4, 0], [2, 2, 2, 2, 2, 2]], dtype=np.int32)
    with InProcessEvaluate(AdditiveFactory()) as evaluate:
        got = evaluate(rows, fidelity=64, batch_seed=5)
    np.testing.assert_array_equal(got, AdditiveFactory()()(rows, fidelity=64, batch_seed=5))
    with pytest.raises(ValueError, match=r"choices must be an int array \[n, L\]"):
        InProcessEvaluate(AdditiveFactory())(rows[0], fidelity=64, batch_seed=5)


def test_invalid_settings_are_refused_before_starting_anything():
    with pytest.raises(ValueError, match="workers must be an integer >= 1 or 'auto', got 0"):
        RayEvaluate(AdditiveFactory(), workers=0)
    with pytest.raises(ValueError, match="workers must be an integer >= 1 or 'auto', got 'all'"):
        RayEvaluate(AdditiveFactory(), workers="all")
    with pytest.raises(ValueError, match="max_retries must be >= 0, got -1"):
        RayEvaluate(AdditiveFactory(), workers=1, max_retries=-1)
    with pytest.raises(ValueError, match="workers must be an integer >= 1 or 'auto', got 1.5"):
        RayLayerMap(workers=1.5)


@pytest.mark.parametrize(
    "resources, kwargs, plan",
    [
        # a local instance: one 1-CPU actor per core this process may use
        ({"CPU": 2.0}, {}, WorkerPlan(2, 1.0, 0.0)),
        # a cluster without GPUs: one per CPU (totals over the nodes), fractional CPUs cut
        ({"CPU": 48.0, "memory": 1e11, "object_store_memory": 1e10}, {}, WorkerPlan(48, 1.0, 0.0)),
        ({"CPU": 7.5}, {"cpus_per_worker": 2.0}, WorkerPlan(3, 2.0, 0.0)),
        ({"CPU": 0.3}, {"cpus_per_worker": 0.1}, WorkerPlan(3, 0.1, 0.0)),  # 0.3/0.1 < 3
        # a cluster with GPUs: one actor per GPU, 1 GPU and 1 CPU each
        ({"CPU": 64.0, "GPU": 8.0}, {}, WorkerPlan(8, 1.0, 1.0)),
        ({"CPU": 64.0, "GPU": 8.0}, {"cpus_per_worker": 4.0}, WorkerPlan(8, 4.0, 1.0)),
        ({"CPU": 64.0, "GPU": 8.0}, {"gpus_per_worker": 0.5}, WorkerPlan(16, 1.0, 0.5)),
        ({"CPU": 3.0, "GPU": 8.0}, {}, WorkerPlan(3, 1.0, 1.0)),  # as many as CPUs can feed
        ({"CPU": 64.0, "GPU": 8.0}, {"gpus_per_worker": 0.0}, WorkerPlan(64, 1.0, 0.0)),
        ({"CPU": 4.0, "GPU": 0.5}, {}, WorkerPlan(4, 1.0, 0.0)),  # no whole GPU: CPU actors
    ],
)
def test_auto_workers_from_the_resources(resources, kwargs, plan):
    assert auto_worker_plan(resources, **kwargs) == plan


def test_auto_workers_that_do_not_fit_are_refused():
    with pytest.raises(WorkerStartError, match=r"no room for one actor of 1 CPU and 0 GPU .*0\.5"):
        auto_worker_plan({"CPU": 0.5})
    with pytest.raises(WorkerStartError, match=r"no room for one actor of 1 CPU and 1 GPU"):
        auto_worker_plan({"CPU": 8.0}, gpus_per_worker=1.0)


def test_driver_like_env_copies_this_process_thread_settings(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    env = ray_backend.driver_like_env()
    n = str(local_cpu_count())
    assert env == {
        "OMP_NUM_THREADS": "3",
        "MKL_NUM_THREADS": n,
        "OPENBLAS_NUM_THREADS": n,
        "XLA_FLAGS": "",  # not the 1-CPU actors' --xla_cpu_multi_thread_eigen=false
    }
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert ray_backend.driver_like_env()["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"


def test_local_cpu_count_is_the_affinity_set():
    want = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert local_cpu_count() == want >= 1


@pytest.mark.slow
def test_ray_scores_equal_in_process_scores_for_any_split(ray_evaluate):
    local = AdditiveFactory()()
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7):  # fewer rows than workers, even and uneven splits
        rows = rng.integers(0, 5, size=(n, 6)).astype(np.int32)
        got = ray_evaluate(rows, fidelity=256, batch_seed=11)
        np.testing.assert_array_equal(got, local(rows, fidelity=256, batch_seed=11))
    assert ray_evaluate(np.zeros((0, 6), np.int32), fidelity=1, batch_seed=0).shape == (0,)
    assert len({p["pid"] for p in ray_evaluate.placement}) == 2


@pytest.mark.slow
def test_ray_and_in_process_searches_agree_exactly(ray_evaluate):
    for searcher in (evo_searcher(5), TableSearcher(tokens=128)):
        with InProcessEvaluate(AdditiveFactory()) as local:
            expected = _search(searcher, local)
        got = _search(searcher, ray_evaluate)
        assert result_json(got) == result_json(expected)
        assert {k: float(v).hex() for k, v in got.info.items()} == {
            k: float(v).hex() for k, v in expected.info.items()
        }  # hex: nan equals nan


@pytest.mark.slow
def test_search_survives_an_actor_dying_mid_call(ray_cluster, tmp_path):
    marker = tmp_path / "died"
    # Each actor counts its own calls; the first to reach call 4 (generation 2) dies
    # (os._exit) and leaves the marker, so its replacement and the other actor live on.
    factory = AdditiveFactory(sleep_s=0.005, die_on_call=4, marker=str(marker))
    with RayEvaluate(factory, workers=2, max_retries=2) as evaluate:
        first_pids = {p["pid"] for p in evaluate.placement}
        got = _search(evo_searcher(5), evaluate)
    assert marker.exists() and int(marker.read_text()) in first_pids
    with InProcessEvaluate(AdditiveFactory()) as local:
        expected = _search(evo_searcher(5), local)
    assert result_json(got) == result_json(expected)


@pytest.mark.slow
def test_actors_that_keep_dying_give_a_clear_error(ray_cluster):
    factory = AdditiveFactory(kill_on_call=1)  # every actor SIGKILLs itself when called
    with RayEvaluate(factory, workers=1, max_retries=1) as evaluate:
        with pytest.raises(WorkerFailedError, match=r"failed 2 times \(max_retries=1\)"):
            evaluate(np.zeros((4, 6), np.int32), fidelity=64, batch_seed=0)


class _DiesOnce:
    """Wraps an evaluator: the first process (of all) to reach call ``die_on_call`` exits
    abruptly; the marker file is created exclusively, so exactly one process dies."""

    def __init__(self, inner, marker: str, die_on_call: int) -> None:
        self.inner, self.marker, self.die_on_call, self.calls = inner, marker, die_on_call, 0

    def __call__(self, choices, *, fidelity, batch_seed):
        self.calls += 1
        if self.calls == self.die_on_call:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os._exit(3)
        return self.inner(choices, fidelity=fidelity, batch_seed=batch_seed)


@dataclass(frozen=True)
class _DiesAndCannotBeReplaced:
    """An additive evaluator whose first actor to reach call ``die_on_call`` dies, after
    which no actor can be started (the factory raises, as on a node that lost its model
    files): the dead actor cannot be replaced."""

    marker: str
    die_on_call: int = 2

    def __call__(self):
        if os.path.exists(self.marker):
            raise FileNotFoundError("the model files are gone")
        return _DiesOnce(AdditiveFactory(sleep_s=0.005)(), self.marker, self.die_on_call)


@pytest.mark.slow
def test_an_actor_that_cannot_be_replaced_is_lost_and_the_search_goes_on(ray_cluster, tmp_path):
    marker = tmp_path / "died"
    with RayEvaluate(
        _DiesAndCannotBeReplaced(str(marker)), workers=2, replace_timeout_s=2.0
    ) as evaluate:
        first_pids = {p["pid"] for p in evaluate.placement}
        rows = np.arange(18).reshape(3, 6) % 5
        with pytest.warns(WorkerLostWarning, match=r"evaluator actor [01] lost: .*going on with 1"):
            got = _search(evo_searcher(5), evaluate)
            time.sleep(2.0)  # the search may end before the replacement's deadline
            # later queries run on the actor that is left, with the same split of rows
            np.testing.assert_array_equal(
                evaluate(rows, fidelity=64, batch_seed=1),
                AdditiveFactory()()(rows, fidelity=64, batch_seed=1),
            )
        assert evaluate.live_workers == 1 and evaluate.workers == 2
        assert int(marker.read_text()) in first_pids
        assert any("died" in e for e in evaluate.events)
    with InProcessEvaluate(AdditiveFactory()) as local:
        expected = _search(evo_searcher(5), local)
    assert result_json(got) == result_json(expected)


@pytest.mark.slow
def test_no_actor_left_is_a_clear_error_not_a_hang(ray_cluster, tmp_path):
    factory = _DiesAndCannotBeReplaced(str(tmp_path / "died"), die_on_call=1)
    t0 = time.monotonic()
    with RayEvaluate(factory, workers=1, replace_timeout_s=1.0) as evaluate:
        with pytest.warns(WorkerLostWarning):
            with pytest.raises(WorkerFailedError, match="all 1 evaluator actors were lost"):
                evaluate(np.zeros((4, 6), np.int32), fidelity=64, batch_seed=0)
    assert time.monotonic() - t0 < 30


@pytest.mark.slow
def test_fewer_candidates_than_actors_split_the_tokens(ray_cluster):
    """Two actors each score both candidates on half of the minibatch's sequences; the
    shard means weighted by sequence counts are the in-process (unsharded) scores."""
    factory = test_evaluator_shard.TinyEvaluatorFactory()
    local = factory()
    choices = test_evaluator_shard.offspring(local.spec, 1, seed=3)
    choices = np.concatenate([choices, test_evaluator_shard.offspring(local.spec, 1, seed=4)])
    fidelity = 7 * test_evaluator_shard.SEQ_LEN  # 7 sequences: shards of 4 and 3
    with RayEvaluate(factory, workers=2) as evaluate:
        assert evaluate._pool.shards
        for rows in (choices[:1], choices):
            got = evaluate(rows, fidelity=fidelity, batch_seed=5)
            want = local(rows, fidelity=fidelity, batch_seed=5)
            np.testing.assert_allclose(got, want, rtol=1e-6)
        # the final held-out perplexity runs on an actor through run(fn, item)
        assert evaluate.run(_Square(), 7) == 49


@pytest.mark.slow
def test_ray_validation_scores_equal_in_process_and_direct_scores(ray_cluster):
    """A validation query on Ray (rows split over actors, and one row split by tokens)
    gives the in-process evaluator's validation scores, which are the scores of an
    evaluator whose calibration set is the validation rows."""
    factory = test_evaluator_shard.TinyEvaluatorFactory(validation_seqs=5)
    local = factory()
    direct = test_evaluator_shard.TinyEvaluatorFactory(
        validation_seqs=5, validation_as_calibration=True
    )()
    choices = test_evaluator_shard.offspring(local.spec, 3, seed=6)
    fidelity = 5 * test_evaluator_shard.SEQ_LEN  # every validation row
    want = direct(choices, fidelity=fidelity, batch_seed=0)
    np.testing.assert_allclose(
        local(choices, fidelity=fidelity, batch_seed=0, split="validation"), want, rtol=1e-6
    )
    with RayEvaluate(factory, workers=2) as evaluate:
        for rows in (choices, choices[:1]):  # rows over actors; one row over token shards
            got = evaluate(rows, fidelity=fidelity, batch_seed=0, split="validation")
            np.testing.assert_allclose(got, want[: len(rows)], rtol=1e-6)
        calibration = evaluate(choices, fidelity=fidelity, batch_seed=0)
    assert np.abs(calibration - want).max() > 1e-4  # the split changed the rows scored


@dataclass(frozen=True)
class _Square:
    def __call__(self, x: int) -> int:
        return x * x


@pytest.mark.slow
def test_a_failing_factory_names_the_cause(ray_cluster):
    with pytest.raises(WorkerStartError, match="could not be started") as info:
        RayEvaluate(FailingFactory("/models/missing"), workers=1)
    assert "FileNotFoundError: no model directory at /models/missing" in str(info.value)


@pytest.mark.slow
def test_more_workers_than_cpus_is_refused_without_hanging(ray_evaluate, monkeypatch):
    monkeypatch.setattr(ray_pool, "_RESOURCE_WAIT_S", 1.0)  # how long busy CPUs are awaited
    with pytest.raises(WorkerStartError, match=r"need 5 CPU in all .* cluster has 4"):
        RayEvaluate(AdditiveFactory(), workers=5)
    # ray_evaluate holds 2 of the 4 CPUs.
    with pytest.raises(WorkerStartError, match=r"need 3 CPU in all .* cluster has free 2"):
        RayEvaluate(AdditiveFactory(), workers=3)
    with pytest.raises(WorkerStartError, match=r"need 1 GPU in all"):
        RayEvaluate(AdditiveFactory(), workers=1, gpus_per_worker=1)


@dataclass(frozen=True)
class _EnvProbe:
    """Factory of an evaluator that reports its process's thread settings as scores."""

    def __call__(self):
        def evaluate(choices, *, fidelity, batch_seed):
            flags = os.environ.get("XLA_FLAGS", "")
            probe = [
                float(os.environ.get("OMP_NUM_THREADS", "nan")),
                float("--xla_cpu_multi_thread_eigen=false" in flags),
                float(len(os.sched_getaffinity(0))),
            ]
            return np.array(probe * len(choices))[: len(choices)]

        return evaluate


@pytest.mark.slow
def test_actor_processes_get_the_thread_limits(ray_cluster):
    with RayEvaluate(_EnvProbe(), workers=2) as evaluate:
        got = evaluate(np.zeros((6, 3), np.int32), fidelity=1, batch_seed=0)
        cpus = [p["cpus"] for p in evaluate.placement]
    np.testing.assert_array_equal(got, [1.0, 1.0, 1.0] * 2)  # 1 thread, flag set, 1 core
    if len(os.sched_getaffinity(0)) >= 2:
        # XLA sizes its thread pool by the CPUs a process may use: one core each, disjoint.
        assert len(cpus[0]) == len(cpus[1]) == 1 and cpus[0] != cpus[1]
    else:  # a one-core machine: nothing to pin
        assert cpus == [None, None]
    assert [p["slot"] for p in evaluate.placement] == [0, 1]  # one host: slots 0 and 1


_PIN_PROBE = """
import os, threading, json
from allocsearch.distributed.ray_backend import pin_to_cpus
allowed = sorted(os.sched_getaffinity(0))
t = threading.Thread(target=threading.Event().wait, args=(5,), daemon=True)
t.start()  # a thread that exists before pinning is pinned too
got = pin_to_cpus(1, 1)
tasks = {tid: sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")}
print(json.dumps({"allowed": allowed, "got": got, "tasks": tasks,
                  "all": pin_to_cpus(0, len(allowed))}))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")
def test_pinning_moves_every_thread_to_the_slots_cores():
    import json
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", _PIN_PROBE], capture_output=True, text=True, check=True
    ).stdout
    probe = json.loads(out)
    allowed = probe["allowed"]
    if len(allowed) == 1:
        assert probe["got"] is None
        return
    assert probe["got"] == [allowed[1]]  # slot 1 of one core each = the second allowed core
    assert len(probe["tasks"]) >= 2
    assert all(cpus == [allowed[1]] for cpus in probe["tasks"].values())
    assert probe["all"] is None  # asking for every allowed core pins nothing
    with pytest.raises(ValueError, match="count must be >= 1, got 0"):
        ray_backend.pin_to_cpus(0, 0)


# --------------------------------------------------------------------------- layer map


def _slow_square(x: int) -> int:
    """x * x after a pause that is longest for the first items (so later ones finish first)."""
    time.sleep(0.02 * (4 - x % 5))
    return x * x


def _check_positive(x: int) -> int:
    if x < 0:
        raise ValueError(f"x = {x} must be >= 0")
    return x


@dataclass(frozen=True)
class _DieOnce:
    """fn(x) = x + 1, except that the first call anywhere kills its process (os._exit) and
    leaves ``marker`` with the process id."""

    marker: str

    def __call__(self, x: int) -> int:
        if not os.path.exists(self.marker):
            with open(self.marker, "w") as f:
                f.write(str(os.getpid()))
            os._exit(1)
        return x + 1


@pytest.mark.slow
def test_layer_map_returns_results_in_item_order_and_survives_a_death(ray_cluster, tmp_path):
    marker = tmp_path / "died"
    with RayLayerMap(workers=2, max_retries=1) as layer_map:
        pids = {p["pid"] for p in layer_map.placement}
        assert len(pids) == 2
        got = layer_map(_slow_square, range(11))
        assert not isinstance(got, list)  # lazy: consumed as results arrive
        assert list(got) == [x * x for x in range(11)]
        assert list(layer_map(_slow_square, [])) == []
        # the first call kills its actor; the item goes to a live or a fresh actor
        assert list(layer_map(_DieOnce(str(marker)), range(6))) == [1, 2, 3, 4, 5, 6]
        assert int(marker.read_text()) in pids
        # an exception of the called function reaches the caller as itself
        with pytest.raises(ValueError, match=r"^x = -1 must be >= 0$") as info:
            list(layer_map(_check_positive, [1, -1, 2]))
        assert type(info.value) is ValueError
    with pytest.raises(RuntimeError, match="this RayLayerMap was closed"):
        layer_map(_slow_square, range(3))


_AUTO_PROBE = """
import functools, json, operator, ray
from allocsearch.distributed.ray_backend import RayLayerMap, local_cpu_count
with RayLayerMap(workers="auto") as m:  # starts a local instance
    probe = {"workers": m.workers, "share": [m.cpus_per_worker, m.gpus_per_worker],
             "cpus": [p["cpus"] for p in m.placement], "local": local_cpu_count(),
             "out": list(m(functools.partial(operator.mul, 3), range(5)))}
probe["still_up"] = ray.is_initialized()  # False: it started the instance, so it stopped it
print(json.dumps(probe))
"""


@pytest.mark.slow
def test_auto_on_a_new_local_instance_is_one_actor_per_core():
    """In a fresh process (this one holds the module's instance): the backend starts a
    local instance with one 1-CPU actor per core of the process's affinity set, pinned
    apart, and stops it at the end. (On a running instance or a cluster, auto is
    :func:`auto_worker_plan` of its resources, tested above.)"""
    import json
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", _AUTO_PROBE], capture_output=True, text=True, check=True
    ).stdout
    probe = json.loads(out.strip().splitlines()[-1])
    assert probe["workers"] == probe["local"] and probe["share"] == [1.0, 0.0]
    assert probe["out"] == [0, 3, 6, 9, 12] and not probe["still_up"]
    if probe["local"] > 1:
        assert sorted(c for cpus in probe["cpus"] for c in cpus) == sorted(os.sched_getaffinity(0))
