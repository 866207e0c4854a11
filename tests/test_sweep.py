"""`allocsearch sweep` on a tiny byte-level Llama: one error table for every target, DP
recipes identical to `search --strategy dp`, resume without re-measuring the table, and
the one-line errors for bad targets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from tiny_workspace import TINY_LLAMA, workspace_config
from typer.testing import CliRunner

from allocsearch import pipeline
from allocsearch.cli import app
from allocsearch.config import SupernetConfig
from allocsearch.recipe.recipe import Recipe
from allocsearch.supernet.store import SupernetStore
from allocsearch.sweep import parse_targets, spanning_config

CFG = dict(TINY_LLAMA)
TARGETS = (0.3, 0.35, 0.4, 0.45, 0.5)

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


class _Evaluators:
    """Stands in for ``pipeline.make_evaluator``: one evaluator per store, made once and
    shared by every command of this module (one compilation), that records the
    candidates of every query in ``calls`` and raises KeyboardInterrupt (a Ctrl-C) on
    query ``stop_at`` (1-based) when set."""

    def __init__(self, make):
        self.make, self.made = make, {}
        self.calls: list[int] = []
        self.stop_at: int | None = None

    def __call__(self, ws, store, *args):
        key = str(store.path)
        if key not in self.made:
            self.made[key] = self.make(ws, store, *args)
        return _Counting(self.made[key], self)


class _Counting:
    def __init__(self, inner, owner):
        self.inner, self.owner = inner, owner

    def __call__(self, choices, **kwargs):
        calls = self.owner.calls
        calls.append(int(np.asarray(choices).shape[0]))
        if self.owner.stop_at is not None and len(calls) == self.owner.stop_at:
            raise KeyboardInterrupt
        return self.inner(choices, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def evaluators():
    mp = pytest.MonkeyPatch()
    shared = _Evaluators(pipeline.make_evaluator)
    mp.setattr(pipeline, "make_evaluator", shared)
    yield shared
    mp.undo()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    config = workspace_config(
        root,
        CFG,
        supernet={"pruner": "magnitude", "steps_each_side": 2, "step_fraction": 0.1},
        backend={"kind": "local"},  # Ray is the default; only the Ray tests start it
    )
    # `search --strategy dp` runs with a config's search.settings whatever strategy they
    # were for, so the DP searches compared with the sweep get a config without them
    (root / "config-dp.yaml").write_text(yaml.safe_dump(config))
    config["search"] = {
        "strategy": "evopress",
        # one stage at the table's fidelity: no evaluator program beyond the table's
        "settings": {"generations": 2, "offspring": 4, "survivors": [1], "tokens": [256]},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


@pytest.fixture(scope="module")
def swept(workdir, evaluators):
    """One CLI sweep over 5 targets with EvoPress (2 generations), its evaluator calls
    counted: (output directory, candidates of each query)."""
    out = workdir / "sweep"
    evaluators.calls = []
    r = run(
        "sweep",
        "--config",
        workdir / "config.yaml",
        "--targets",
        "0.3:0.5:0.05",
        "--evopress-generations",
        "2",
        "--out",
        out,
        "--no-progress",
    )
    assert r.exit_code == 0, r.output
    return out, evaluators.calls


def _rows(out):
    return [r for t in TARGETS for r in json.loads((out / f"target-{t:.4f}/rows.json").read_text())]


def test_parse_targets():
    assert parse_targets("0.4:0.8:0.05") == (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8)
    assert parse_targets("0.4:0.5:0.03") == (0.4, 0.43, 0.46, 0.49)
    assert parse_targets("0.7, 0.5,0.5") == (0.5, 0.7)
    for bad, part in [("0.4:x:0.1", "'x'"), ("1.2", "1.2"), ("0.4:0.8", "0.4:0.8"), ("", "''")]:
        with pytest.raises(ValueError, match="start:stop:step") as e:
            parse_targets(bad)
        assert part in str(e.value)


def test_spanning_grid_covers_the_targets_with_room():
    cfg = spanning_config(SupernetConfig(step_fraction=0.05, steps_each_side=4), (0.4, 0.8))
    # half range 0.2 + half the configured spread 0.1 = 6 steps of 0.05 each side
    assert cfg.center == pytest.approx(0.6) and cfg.steps_each_side == 6


@pytest.mark.slow
def test_one_table_for_all_targets(swept):
    out, calls = swept
    spec = SupernetStore.open(out / "supernet", verify="none").spec
    table = 1 + int(spec.valid[:, 1:].sum())  # baseline + every unit at every other level
    rows = _rows(out)
    # dp+evopress rows count DP's table and solution with EvoPress's own candidates
    seeded = {r["target"] for r in rows if r["strategy"] == "dp+evopress"}
    evopress = sum(r["evaluations"] for r in rows if r["strategy"] == "dp+evopress") - sum(
        r["evaluations"] for r in rows if r["strategy"] == "dp" and r["target"] in seeded
    )
    assert seeded == set(TARGETS) and evopress > 0
    scorings = _distinct_allocations(out)
    # the table query once, one scoring per distinct allocation per target, EvoPress's own
    assert calls.count(table) == 1
    assert sum(calls) == table + scorings + evopress
    # five separate DP searches would score five tables
    assert sum(calls) - evopress < 2 * table
    md = (out / "sweep.md").read_text()
    assert f"the per-unit error table once ({table:,} candidates" in md
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _distinct_allocations(out) -> int:
    """Allocations of all targets and strategies, each counted once (scored once)."""
    seen = set()
    for t in TARGETS:
        for name in ("uniform", "owl", "dp", "dp+evopress"):
            r = Recipe.load(out / f"target-{t:.4f}/recipe-{name}.json")
            seen.add(tuple(layer.sparsity for layer in r.layers))
    return len(seen)


@pytest.mark.slow
def test_dp_recipes_equal_search_strategy_dp(swept, workdir):
    out, _ = swept
    for t in TARGETS:
        run_dir = workdir / f"search-dp-{t}"
        r = run(
            "search",
            "--config",
            workdir / "config-dp.yaml",
            "--supernet",
            out / "supernet",
            "--strategy",
            "dp",
            "--target",
            t,
            "--out",
            run_dir,
            "--no-progress",
        )
        assert r.exit_code == 0, r.output
        alone = Recipe.load(run_dir / "recipe.json")
        swept_dp = Recipe.load(out / f"target-{t:.4f}/recipe-dp.json")
        assert swept_dp.layers == alone.layers  # same levels, byte-equal sparsities
        assert swept_dp.budget == alone.budget
        # sweep's recipes carry the search fitness, not yet the calibration / validation
        # split scores `search` adds (issue 24 item 3)
        f, g = swept_dp.provenance.fitness, alone.provenance.fitness
        assert (f.metric, f.value) == (g.metric, g.value)
        assert swept_dp.provenance.settings == alone.provenance.settings
        assert swept_dp.provenance.evaluations == alone.provenance.evaluations


@pytest.mark.slow
def test_resume_does_not_remeasure_the_table(swept, workdir, evaluators):
    whole, _ = swept
    args = (
        "sweep",
        "--config",
        workdir / "config.yaml",
        "--supernet",
        whole / "supernet",
        "--targets",
        "0.3:0.5:0.05",
    )
    out = workdir / "interrupted"
    # query 1: the table; then 3 scorings per target (uniform, owl, dp's solution) at
    # most: stop inside the third target
    evaluators.calls, evaluators.stop_at = [], 8
    try:
        r = run(*args, "--out", out, "--no-progress")
    finally:
        evaluators.stop_at = None
    assert r.exit_code == 130, r.output
    finished = sorted(p.parent.name for p in out.glob("target-*/rows.json"))
    assert 1 <= len(finished) < len(TARGETS)
    table = evaluators.calls[0]

    evaluators.calls = []
    r = run(*args, "--out", out, "--resume", "--no-progress")
    assert r.exit_code == 0, r.output
    assert table not in evaluators.calls and all(n == 1 for n in evaluators.calls)
    assert len(evaluators.calls) <= 3 * (len(TARGETS) - len(finished))
    # the same rows as the uninterrupted sweep (EvoPress rows aside)
    assert _rows(out) == [r for r in _rows(whole) if r["strategy"] != "dp+evopress"]
    # a resume of a different sweep is refused
    r = run(*args[:-1], "0.3,0.5", "--out", out, "--resume", "--no-progress")
    assert r.exit_code == 2 and "holds a different sweep (targets" in r.output


@pytest.mark.slow
def test_user_errors(workdir, swept, tmp_path):
    out, _ = swept
    cfg = workdir / "config.yaml"
    r = run("sweep", "--config", cfg, "--targets", "0.4:0.8:zero", "--out", tmp_path / "a")
    assert r.exit_code == 2 and "'zero' is not a number" in r.output
    assert "start:stop:step" in r.output and not (tmp_path / "a").exists()
    r = run(
        "sweep",
        "--config",
        cfg,
        "--supernet",
        out / "supernet",
        "--targets",
        "0.3,0.95",
        "--out",
        tmp_path / "b",
    )
    assert r.exit_code == 2 and "targets ['0.95'] are outside" in r.output
    r = run("sweep", "--config", cfg, "--targets", "0.3", "--out", out)
    assert r.exit_code == 2 and "pass --overwrite" in r.output


def test_quality_plot(tmp_path):
    from allocsearch.report.plots import plot_quality_vs_sparsity

    series = {"uniform": [(0.6, 6.0), (0.4, 5.6)], "dp": [(0.4, 5.55), (0.6, float("inf"))]}
    a = plot_quality_vs_sparsity(series, tmp_path / "a.png", dense_ppl=5.5)
    b = plot_quality_vs_sparsity(series, tmp_path / "b.png", dense_ppl=5.5)
    assert a.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and a.read_bytes() == b.read_bytes()
    with pytest.raises(ValueError, match="below 1 or NaN"):
        plot_quality_vs_sparsity({"dp": [(0.5, 0.9)]}, tmp_path / "c.png")
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        plot_quality_vs_sparsity({"dp": [(50.0, 6.0)]}, tmp_path / "c.png")
    with pytest.raises(FileExistsError):
        plot_quality_vs_sparsity(series, tmp_path / "a.png")
    assert not (tmp_path / "c.png").exists()
