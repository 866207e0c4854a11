"""Ray faults on a real two-raylet cluster (``ray.cluster_utils.Cluster`` on this machine):
with spare capacity a dead actor is replaced; a worker raylet killed mid-search on a
full cluster ends with the identical result on fewer actors, never a hang; and a Týr
search submitted as a Ray job (the CLI as a subprocess with ``RAY_ADDRESS``) builds and
scores its rounds on actors and gives the in-process result.

One cluster serves the module: a head and a worker raylet of 1 CPU each, on which the job
runs first. The spare-capacity test then adds a raylet and kills one, which leaves the
cluster full (two 1-CPU actors) for the lost-node test. Raylets on one machine
share its cores, so the actors' CPU slots are counted per machine (0 and 1), not per
raylet (0 and 0).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
import resume_worker
import yaml
from resume_worker import BUDGET, SEED, AdditiveFactory, evo_searcher, result_json, tiny_spec
from rich.console import Console
from tiny_workspace import TINY_LLAMA, workspace_config

from allocsearch import pipeline
from allocsearch.config import config_from_dict
from allocsearch.distributed.local import run_search
from allocsearch.distributed.ray_backend import (
    InProcessEvaluate,
    RayEvaluate,
    WorkerLostWarning,
)
from allocsearch.search_run import HeldoutPerplexity, run_search_command

pytestmark = pytest.mark.slow

TINY = dict(TINY_LLAMA)
GENERATIONS = 6
SLEEP_S = 0.03  # per call: the raylet is killed while calls run
REPLACE_S = 3.0


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    ray.cloudpickle.register_pickle_by_value(resume_worker)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _node_of(cluster, node_id: str):
    return next(n for n in cluster.list_all_nodes() if n.node_id == node_id)


def _search_killing(evaluate, kill) -> tuple:
    """EvoPress on the additive evaluator; ``kill()`` runs 20 ms into generation 3's
    calls (from a thread, so the raylet dies while an actor is scoring)."""
    threads = []

    def on_generation(state):
        if state.generation == 2:
            threads.append(threading.Timer(0.02, kill))
            threads[-1].start()

    t0 = time.monotonic()
    got = run_search(
        evo_searcher(GENERATIONS),
        evaluate,
        tiny_spec(),
        BUDGET,
        key=jax.random.key(SEED),
        on_generation=on_generation,
    )
    for t in threads:
        t.join()
    return got, time.monotonic() - t0


@pytest.fixture(scope="module")
def expected():
    with InProcessEvaluate(AdditiveFactory()) as local:
        return result_json(
            run_search(
                evo_searcher(GENERATIONS), local, tiny_spec(), BUDGET, key=jax.random.key(SEED)
            )
        )


# --------------------------------------------------------------------------- a Ray job


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny byte-level Llama, a corpus, a config and a magnitude supernet."""
    root = tmp_path_factory.mktemp("job")
    config = workspace_config(
        root,
        TINY,
        docs=3,
        supernet={"pruner": "magnitude", "center": 0.5, "steps_each_side": 2},
        search={
            "target": 0.5,
            "strategy": "evopress",
            "settings": {
                "generations": 2,
                "offspring": 4,
                "survivors": [2, 1],
                "tokens": [64, 256],
            },
        },
        backend={"kind": "ray", "workers": 2},
    )
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    cfg = config_from_dict(config)
    ws = pipeline.load_workspace(cfg)
    pipeline.build(ws, root / "store", progress=False)
    return root, config


def _ppl(text: str) -> float:
    return float(re.search(r"held-out perplexity ([0-9.]+)", text).group(1))


def _local_run(root: Path, config: dict, out: Path, **search) -> str:
    local = {**config, "backend": {"kind": "local"}, "search": {**config["search"], **search}}
    console = Console(record=True, width=300)
    run_search_command(
        config_from_dict(local), root / "store", out, resume=False, progress=False, console=console
    )
    return console.export_text()


def _layers(path: Path) -> dict:
    return {x["name"]: x["sparsity"] for x in json.loads(path.read_text())["layers"]}


TYR = {
    "strategy": "tyr",
    "settings": {
        "rounds": 2,
        "generations": 2,
        "offspring": 4,
        "survivors": [2, 1],
        "tokens": [64, 256],
    },
}


def test_tyr_search_submitted_as_a_ray_job(cluster, workspace, tmp_path):
    """What ``ray job submit -- allocsearch search ...`` runs: the CLI in a new process
    with ``RAY_ADDRESS`` set, joining the cluster. Týr's rounds are pruned by layer
    actors and scored by evaluator actors (one set each per round), the held-out
    perplexity is computed on an actor, and the result is the in-process one."""
    root, config = workspace
    job_config = tmp_path / "tyr.yaml"
    job_config.write_text(yaml.safe_dump({**config, "search": {**config["search"], **TYR}}))
    cmd = [
        sys.executable,
        "-c",
        "from allocsearch.cli import app; app()",
        "search",
        "--config",
        str(job_config),
        "--supernet",
        str(root / "store"),
        "--out",
        str(tmp_path / "job"),
        "--no-progress",
    ]
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout + job.stderr
    assert job.stdout.count("pruning layers on 2 x 1 CPU on the Ray cluster") == 2, job.stdout
    assert job.stdout.count("scoring on 2 x 1 CPU on the Ray cluster") == 2, job.stdout
    local = _local_run(root, config, tmp_path / "local", **TYR)
    assert _layers(tmp_path / "job" / "recipe.json") == _layers(tmp_path / "local" / "recipe.json")
    assert _ppl(job.stdout) == pytest.approx(_ppl(local), rel=1e-4)


# --------------------------------------------------------------------------- lost nodes


def test_lost_node_with_spare_capacity_is_replaced(cluster, expected):
    cluster.add_node(num_cpus=1)  # head + 2 workers: one raylet to spare
    cluster.wait_for_nodes()
    with RayEvaluate(
        AdditiveFactory(sleep_s=SLEEP_S), workers=2, replace_timeout_s=30.0
    ) as evaluate:
        head = cluster.head_node.node_id
        victim = next(p["node"] for p in evaluate.placement if p["node"] != head)
        node = _node_of(cluster, victim)
        with warnings.catch_warnings():
            warnings.simplefilter("error", WorkerLostWarning)
            got, wall = _search_killing(
                evaluate, lambda: cluster.remove_node(node, allow_graceful=False)
            )
            deadline = time.monotonic() + 30
            while not any("replaced" in e for e in evaluate.events):  # it may still start
                assert time.monotonic() < deadline, evaluate.events
                evaluate(np.zeros((2, 6), np.int32), fidelity=64, batch_seed=0)
                time.sleep(0.2)
        assert evaluate.live_workers == 2
        assert victim not in {p["node"] for p in evaluate.placement}
        assert sorted(p["slot"] for p in evaluate.placement) == [0, 1]
    assert result_json(got) == expected
    assert wall < 120  # bounded by the timeouts, with room for a loaded CI machine
    assert len(cluster.worker_nodes) == 1  # full again for the next test


def test_lost_node_on_a_full_cluster_goes_on_with_fewer_actors(cluster, expected):
    [worker] = cluster.worker_nodes  # head + 1 worker: full with two 1-CPU actors
    with RayEvaluate(
        AdditiveFactory(sleep_s=SLEEP_S), workers=2, replace_timeout_s=REPLACE_S
    ) as evaluate:
        placement = evaluate.placement
        assert {p["node"] for p in placement} == {cluster.head_node.node_id, worker.node_id}
        # two raylets, one machine: CPU slots 0 and 1, so the actors pin different cores
        assert sorted(p["slot"] for p in placement) == [0, 1]
        assert len({p["host"] for p in placement}) == 1
        with pytest.warns(WorkerLostWarning, match=r"evaluator actor \d lost: .*going on with 1"):
            got, wall = _search_killing(
                evaluate, lambda: cluster.remove_node(worker, allow_graceful=False)
            )
            # On a fast machine the search can end before Ray reports the death or before
            # the replacement's deadline: later calls find the dead actor and give it up.
            deadline = time.monotonic() + 60
            while evaluate.live_workers > 1 and time.monotonic() < deadline:
                time.sleep(0.5)
                evaluate(np.zeros((2, 6), np.int32), fidelity=64, batch_seed=0)
        assert evaluate.live_workers == 1
        [lost] = [p for p in evaluate.placement if p.get("lost")]
        assert lost["node"] == worker.node_id
        events = "\n".join(evaluate.events)
        assert f"node {worker.node_id[:12]}" in events and "died" in events
    assert result_json(got) == expected
    assert wall < 120  # bounded by the timeouts, with room for a loaded CI machine


def test_final_perplexity_on_an_actor_is_the_evaluators(workspace):
    root, config = workspace
    cfg = config_from_dict({**config, "backend": {"kind": "local"}})
    ws = pipeline.load_workspace(cfg)
    store = pipeline.open_store(ws, root / "store")
    choice = np.asarray(store.spec.center, np.int32)
    choice[0] = 0
    want = pipeline.make_evaluator(ws, store).perplexity(choice, ws.heldout)
    assert HeldoutPerplexity(cfg, str(root / "store"))(choice) == pytest.approx(want, rel=1e-5)


def test_head_node_loss_exits_2_naming_resume_then_resume_gives_the_recipe(
    cluster, workspace, tmp_path, monkeypatch
):
    """Losing the driver's own (head) node mid-search: exit 2 and one line naming
    ``--resume``; ``--resume`` then ends with the uninterrupted run's recipe.

    Killing the head raylet of a local cluster kills this test's own driver and the
    cluster's control plane, so the loss is simulated at the layer that detects it: at
    the 5th query the evaluator actor on the head node is killed (a real actor death)
    and the pool's check of the driver's node (``_ActorPool.driver_node_alive``, which
    reads Ray's node table) reports it dead. ``--replace-timeout`` (the setting of the
    replacement wait) reaches the pool."""
    import ray
    from typer.testing import CliRunner

    from allocsearch.cli import app
    from allocsearch.distributed import ray_backend

    if not cluster.worker_nodes:  # the full-cluster test above removed its worker
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
    root, config = workspace
    run = {**config, "search": {**config["search"], "settings": {
        **config["search"]["settings"], "generations": 4}}}  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    out = tmp_path / "run"
    args = ["search", "--config", str(path), "--supernet", str(root / "store"), "--out", str(out)]
    args += ["--no-progress", "--workers", "2", "--replace-timeout", "7"]
    original = ray_backend._ActorPool.stream
    seen = {"calls": 0, "lost": False, "timeouts": set()}

    def stream(self, method, calls, **kw):
        seen["calls"] += 1
        seen["timeouts"].add(self.replace_timeout_s)
        if method == "evaluate" and seen["calls"] >= 5 and not seen["lost"]:
            head = cluster.head_node.node_id
            [slot] = [s for s, p in enumerate(self.placement) if p["node"] == head]
            ray.kill(self.actors[slot], no_restart=True)
            seen["lost"] = True
        return original(self, method, calls, **kw)

    with monkeypatch.context() as m:
        m.setattr(ray_backend._ActorPool, "stream", stream)
        m.setattr(ray_backend._ActorPool, "driver_node_alive", lambda self: not seen["lost"])
        lost = CliRunner().invoke(app, args)
    assert lost.exit_code == 2, (seen, lost.output)
    assert seen["lost"] and seen["timeouts"] == {7.0}, (seen, lost.output)
    [line] = [x for x in lost.stderr.splitlines() if x.strip()]
    assert line.startswith("error: HeadNodeLostError: the Ray node of this driver"), line
    assert "rerun the same command with --resume" in line, line
    assert not (out / "recipe.json").exists()
    resumed = CliRunner().invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    _local_run(root, run, tmp_path / "local")  # uninterrupted, in process
    assert _layers(out / "recipe.json") == _layers(tmp_path / "local" / "recipe.json")
    fitness = [json.loads(p.read_text())["provenance"]["fitness"]["value"]
               for p in (out / "recipe.json", tmp_path / "local" / "recipe.json")]  # fmt: skip
    assert fitness[0] == pytest.approx(fitness[1], rel=1e-6)
