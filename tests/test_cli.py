"""The command line end to end on a tiny byte-level Llama: build, search (resume), compare,
export, apply, eval; and user errors: one message, exit status 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from flax import nnx
from tiny_workspace import TINY_LLAMA, workspace_config
from typer.testing import CliRunner

from allocsearch import pipeline
from allocsearch.cli import app
from allocsearch.config import load_config
from allocsearch.distributed.progress import read_log
from allocsearch.models import load_model
from allocsearch.recipe.recipe import Recipe

CFG = dict(TINY_LLAMA)

runner = CliRunner()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    config = workspace_config(
        root,
        CFG,
        words_per_doc=600,
        calibration_seqs=16,
        heldout_seqs=4,
        supernet={
            "pruner": "magnitude",
            "center": 0.5,
            "steps_each_side": 2,
            "step_fraction": 0.1,
        },
        search={
            "target": 0.5,
            "strategy": "evopress",
            "settings": {
                "generations": 3,
                "offspring": 4,
                "survivors": [2, 1],
                "tokens": [64, 256],
            },
        },
        backend={"kind": "local"},  # Ray is the default; only the Ray tests start it
    )
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def supernet(workdir):
    r = run(
        "build", "--config", workdir / "config.yaml", "--out", workdir / "store", "--no-progress"
    )
    assert r.exit_code == 0, r.output
    return workdir / "store"


@pytest.mark.slow
def test_search_export_apply_eval(workdir, supernet):
    out = workdir / "run"
    on_store = ("--config", workdir / "config.yaml", "--supernet", supernet, "--no-progress")
    r = run("search", *on_store, "--out", out)
    assert r.exit_code == 0, r.output
    recipe = Recipe.load(out / "recipe.json")
    assert abs(recipe.budget.achieved - 0.5) < 0.01 and not recipe.partial
    assert (out / "profile.png").exists() and (out / "fitness.png").exists()
    lines = (out / "log.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["generation"] == 3

    # resume of a finished search continues from its last checkpoint and ends the same
    r = run("search", *on_store, "--out", out, "--resume")
    assert r.exit_code == 0, r.output
    resumed = Recipe.load(out / "recipe.json")
    assert resumed.layers == recipe.layers and resumed.budget == recipe.budget
    assert resumed.provenance.fitness == recipe.provenance.fitness

    r = run(
        "export", out / "recipe.json", "--format", "llm-compressor", "--out", workdir / "lc.yaml"
    )
    assert r.exit_code == 0, r.output
    lc = yaml.safe_load((workdir / "lc.yaml").read_text())
    assert "sparsity_stage" in lc

    # jaxpruner (issue 16.6): with the nnx convention the keys are allocsearch's own Flax
    # parameter paths, loaded without eval; the notes name the matrices left uncovered
    r = run(
        "export", out / "recipe.json", "--format", "jaxpruner", "--jaxpruner-paths", "nnx",
        "--model", workdir / "model", "--out", workdir / "jp.json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    body = json.loads((workdir / "jp.json").read_text())
    cmap = {tuple(e["path"]): e["sparsity"] for e in body["custom_sparsity_map"]}
    model = load_model(workdir / "model")
    paths = {p for p, _ in nnx.to_flat_state(nnx.state(model.adapter.module(model.params)))}
    assert set(cmap) <= paths and len(cmap) == len(recipe.layers)
    for entry in recipe.layers:
        key = tuple(int(p) if p.isdigit() else p for p in entry.name.split(".")) + ("weight",)
        assert cmap[key] == entry.sparsity
    assert any("lm_head" in n and "embed_tokens" in n for n in body["notes"])
    r = run(
        "export", out / "recipe.json", "--format", "jaxpruner", "--jaxpruner-paths", "torch",
        "--out", workdir / "jp2.json",
    )  # fmt: skip
    assert r.exit_code == 2 and "'torch' is not valid" in r.output
    assert not (workdir / "jp2.json").exists()

    r = run(
        "apply",
        out / "recipe.json",
        "--config",
        workdir / "config.yaml",
        "--model",
        workdir / "model",
        "--supernet",
        supernet,
        "--out",
        workdir / "pruned",
    )
    assert r.exit_code == 0, r.output
    assert "forward (cpu, " in r.output and "parameters " in r.output  # apply's timing
    pruned = load_model(workdir / "pruned")
    for entry in recipe.layers:
        w = np.asarray(pruned.params[f"{entry.name}.weight"])
        assert np.mean(w == 0) == pytest.approx(entry.sparsity, abs=1e-9)

    r = run("eval", "--config", workdir / "config.yaml", "--model", workdir / "pruned")
    assert r.exit_code == 0 and "held-out perplexity" in r.output


@pytest.mark.slow
def test_compare_writes_table_and_recipes(workdir, supernet):
    out = workdir / "compare"
    on_store = ("--config", workdir / "config.yaml", "--supernet", supernet, "--no-progress")
    r = run("compare", *on_store, "--out", out, "--strategies", "uniform,erk,dp")
    assert r.exit_code == 0, r.output
    table = (out / "compare.md").read_text()
    for name in ("uniform", "erk", "dp", "dense"):
        assert name in table
    assert (out / "compare.png").exists() and (out / "recipe-dp.json").exists()
    # issue 24: calibration and validation columns (16 validation rows of 32 tokens, the
    # data.n_validation_seqs default), and each recipe holds both scores, equal to the
    # evaluator's scores of its allocation on every calibration / validation row
    header = [c.strip() for c in table.split("\n\n")[2].splitlines()[0].split("|")]
    assert header[2:4] == ["calibration", "validation"]
    assert "512 validation tokens" in table
    ws = pipeline.load_workspace(load_config(workdir / "config.yaml"))
    store = pipeline.open_store(ws, supernet)
    evaluator = pipeline.make_evaluator(ws, store)
    for name in ("uniform", "dp"):
        recipe = Recipe.load(out / f"recipe-{name}.json")
        choice = np.array([recipe_levels(store, recipe)], np.int32)
        fitness = recipe.provenance.fitness
        assert (fitness.calibration_tokens, fitness.validation_tokens) == (512, 512)
        cal = evaluator(choice, fidelity=512, batch_seed=0)[0]
        val = evaluator(choice, fidelity=512, batch_seed=0, split="validation")[0]
        assert fitness.calibration == pytest.approx(float(cal), rel=1e-6)
        assert fitness.validation == pytest.approx(float(val), rel=1e-6)
        assert fitness.validation != pytest.approx(fitness.calibration, rel=1e-3)


def recipe_levels(store, recipe) -> list[int]:
    """Each unit's level in ``recipe``: the store level of the sparsity it records."""
    sparsity = {layer.name: layer.sparsity for layer in recipe.layers}
    spec = store.spec
    return [
        int(
            np.argmin(
                np.where(spec.valid[u], np.abs(spec.sparsity[u] - sparsity[unit.layers[0]]), 9)
            )
        )
        for u, unit in enumerate(spec.units)
    ]


def test_compare_without_a_target_runs_at_the_supernets_own(workdir, supernet, tmp_path):
    """Issue 16: no --target and a config without search.target compares at the target the
    supernet was built around (its centre levels), not at a silent default of 0.6."""
    cfg = yaml.safe_load((workdir / "config.yaml").read_text())
    del cfg["search"]["target"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = run(
        "compare", "--config", tmp_path / "c.yaml", "--supernet", supernet,
        "--out", tmp_path / "cmp", "--strategies", "uniform", "--no-progress",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "target 0.5: the supernet's centre" in r.output
    recipe = Recipe.load(tmp_path / "cmp" / "recipe-uniform.json")
    assert recipe.budget.target == 0.5


def test_user_errors_exit_2_without_traceback(workdir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: {target: 1.7}\n")
    r = run("build", "--config", bad, "--out", tmp_path / "s")
    assert r.exit_code == 2
    assert "search.target = 1.7 is outside [0.0, 1.0]" in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "s").exists()

    r = run("export", tmp_path / "missing.json", "--format", "owl", "--out", tmp_path / "o")
    assert r.exit_code == 2 and not (tmp_path / "o").exists()

    r = run("export", tmp_path / "missing.json", "--format", "onnx", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--format 'onnx' is not valid" in r.output

    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("mine")
    r = run("search", "--supernet", tmp_path / "nope", "--out", tmp_path / "exists")
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert (tmp_path / "exists" / "keep.txt").read_text() == "mine"


def test_bad_backend_options_exit_2_before_anything_starts(workdir, tmp_path):
    for command in ("build", "search", "compare"):
        for args, message in (
            (("--workers", "0"), "backend.workers = 0 is not valid; use an integer >= 1 or 'auto'"),
            (("--workers", "many"), "backend.workers = 'many' is not valid"),
            (("--backend", "slurm"), "backend.kind = 'slurm' is not valid"),
        ):
            where = ("--supernet", tmp_path / "nope") if command != "build" else ()
            r = run(
                command, "--config", workdir / "config.yaml", *where, "--out", tmp_path / "o", *args
            )
            assert r.exit_code == 2, (command, args, r.output)
            assert message in " ".join(r.output.split()), (command, args, r.output)
            assert "Traceback" not in r.output and not (tmp_path / "o").exists()


def test_ray_address_where_nothing_listens_is_one_line_not_a_hang(workdir, tmp_path):
    """Issue 16.2: --address 127.0.0.1:1 used to retry for minutes; the address is probed
    first (ALLOCSEARCH_RAY_CONNECT_TIMEOUT_S, default 10 s) and refused in one line."""
    import time

    cfg = yaml.safe_load((workdir / "config.yaml").read_text())
    cfg["backend"] = {"kind": "ray", "workers": 1}
    (tmp_path / "ray.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.monotonic()
    r = run(
        "build", "--config", tmp_path / "ray.yaml", "--workers", "1",
        "--address", "127.0.0.1:1", "--out", tmp_path / "s", "--no-progress",
    )  # fmt: skip
    assert r.exit_code == 2, r.output
    line = " ".join(r.output.split())
    assert "WorkerStartError: no Ray cluster answers at '127.0.0.1:1'" in line, r.output
    assert "Traceback" not in r.output and not (tmp_path / "s").exists()
    assert time.monotonic() - t0 < 60


def test_errors_found_before_any_work_do_not_start_ray(workdir, supernet, tmp_path):
    """Ray starts at the first query or the first block's pruning, so a bad budget or
    grid is reported at once (a local Ray instance takes seconds to start)."""
    ray_opts = ("--backend", "ray", "--workers", "1", "--no-progress")
    args = ("--config", workdir / "config.yaml", "--supernet", supernet, *ray_opts)
    r = run("search", *args, "--out", tmp_path / "run", "--target", "0.95")
    assert r.exit_code == 2 and "InfeasibleBudgetError" in r.output, r.output
    assert "scoring on" not in r.output
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["supernet"].update(structure="nm", nm_patterns=["2:3"])
    nm = tmp_path / "nm.yaml"
    nm.write_text(yaml.safe_dump(config))
    r = run("build", "--config", nm, "--out", tmp_path / "store", *ray_opts)
    assert r.exit_code == 2 and "M=3" in r.output, r.output
    assert "pruning layers on" not in r.output


def same_store(a: Path, b: Path) -> bool:
    """Every variant and norm file of two stores byte for byte."""
    files = sorted(p.name for p in a.iterdir() if p.name != "manifest.json")
    return files == sorted(p.name for p in b.iterdir() if p.name != "manifest.json") and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files
    )


@pytest.mark.slow
def test_ray_is_the_default_backend_and_writes_what_local_writes(workdir, supernet, tmp_path):
    """With no backend in the config, build and search run on Ray actors (2 workers) and
    write the in-process backend's store and recipe. (One Ray instance, started here, serves
    both commands: they join a running instance and leave it open; that each command
    starts and stops its own otherwise is tested in test_ray_backend.py.)"""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        _ray_commands(workdir, supernet, tmp_path)
    finally:
        ray.shutdown()


def _ray_commands(workdir, supernet, tmp_path):
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    del config["backend"]
    default = tmp_path / "default.yaml"
    default.write_text(yaml.safe_dump(config))
    store = tmp_path / "store"
    r = run("build", "--config", default, "--out", store, "--workers", "2", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "pruning layers on 2 x 1 CPU on a local Ray instance" in " ".join(r.output.split())
    assert same_store(store, supernet)

    args = ("search", "--config", default, "--supernet", store, "--no-progress")
    r = run(*args, "--out", tmp_path / "ray", "--workers", "2")
    assert r.exit_code == 0, r.output
    assert "scoring on 2 x 1 CPU on a local Ray instance" in " ".join(r.output.split())
    r = run(*args, "--out", tmp_path / "local", "--backend", "local")
    assert r.exit_code == 0, r.output
    assert "scoring on" not in r.output
    on_ray, local = (Recipe.load(tmp_path / d / "recipe.json") for d in ("ray", "local"))
    assert on_ray.layers == local.layers and on_ray.budget == local.budget
    assert on_ray.provenance.fitness == local.provenance.fitness
    logs = [
        [{k: v for k, v in line.items() if not k.endswith("_s")} for line in read_log(path)]
        for path in (tmp_path / "ray" / "log.jsonl", tmp_path / "local" / "log.jsonl")
    ]
    assert logs[0] == logs[1] and len(logs[0]) == 3  # best fitness of every generation

    # compare scores every outcome on the actors (no evaluator in this process) and
    # writes the in-process numbers
    args = ("compare", "--config", default, "--supernet", store, "--no-progress")
    args = (*args, "--strategies", "uniform")
    r = run(*args, "--out", tmp_path / "cmp-ray", "--workers", "2")
    assert r.exit_code == 0, r.output
    r = run(*args, "--out", tmp_path / "cmp-local", "--backend", "local")
    assert r.exit_code == 0, r.output
    tables = [_numbers(tmp_path / d / "compare.md") for d in ("cmp-ray", "cmp-local")]
    assert len(tables[0]) == len(tables[1]) >= 3
    np.testing.assert_allclose(tables[0], tables[1], rtol=1e-4)  # as printed


def _numbers(path: Path) -> list[float]:
    """The numbers of a compare table's strategy rows, wall times left out."""
    rows = [line.split("|")[1:-1] for line in path.read_text().splitlines()]
    rows = [r for r in rows if r and r[0].strip() == "uniform"]
    header = next(
        line.split("|")[1:-1] for line in path.read_text().splitlines() if "strategy" in line
    )
    keep = [i for i, h in enumerate(header) if "time" not in h and i > 0]
    return [float(r[i].strip(" *%").replace(",", "")) for r in rows for i in keep]


def test_wrong_store_for_the_data_is_refused(workdir, supernet, tmp_path):
    """A supernet built on other calibration data must not be searched silently."""
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["data"]["seed"] = 7  # other calibration windows -> other token fingerprint
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(config))
    r = run("search", "--config", other, "--supernet", supernet, "--out", tmp_path / "run")
    assert r.exit_code == 2
    assert "different calibration token set" in r.output


class _InterruptAfter:
    """Wraps an evaluator; raises KeyboardInterrupt (a Ctrl-C) on its n-th query."""

    def __init__(self, inner, n):
        self.inner, self.n, self.calls = inner, n, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.slow
def test_ctrl_c_writes_partial_recipe_and_resume_finishes_the_same(workdir, supernet, monkeypatch):
    from allocsearch import pipeline

    args = ("search", "--config", workdir / "config.yaml", "--supernet", supernet, "--no-progress")
    r = run(*args, "--out", workdir / "whole")
    assert r.exit_code == 0, r.output
    whole = Recipe.load(workdir / "whole" / "recipe.json")

    make = pipeline.make_evaluator
    # 2 queries per generation (two stages): interrupt inside generation 3
    monkeypatch.setattr(pipeline, "make_evaluator", lambda ws, s: _InterruptAfter(make(ws, s), 6))
    out = workdir / "interrupted"
    r = run(*args, "--out", out)
    assert r.exit_code == 130
    partial = Recipe.load(out / "recipe.partial.json")
    assert partial.partial and not (out / "recipe.json").exists()
    assert abs(partial.budget.achieved - 0.5) < 0.01
    assert len((out / "log.jsonl").read_text().splitlines()) == 2

    monkeypatch.setattr(pipeline, "make_evaluator", make)
    r = run(*args, "--out", out, "--resume")
    assert r.exit_code == 0, r.output
    resumed = Recipe.load(out / "recipe.json")
    assert resumed.layers == whole.layers and not resumed.partial
    assert not (out / "recipe.partial.json").exists()  # issue 16.8: no stale partial recipe
    assert resumed.provenance.fitness == whole.provenance.fitness
