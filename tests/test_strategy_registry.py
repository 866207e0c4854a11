"""The strategy registry: names, kinds and settings every command reads; a config's
settings for one strategy do not break another (issue 28.4); `dp+evopress` from the CLI
(issue 24.2): DP's table, then EvoPress from DP's allocation, counted together, resumable."""

from __future__ import annotations

import pytest
import yaml
from tiny_workspace import TINY_LLAMA, workspace_config
from typer.testing import CliRunner

from allocsearch import config as config_module
from allocsearch.cli import app
from allocsearch.distributed.progress import read_log
from allocsearch.recipe.recipe import Recipe
from allocsearch.search import registry
from allocsearch.supernet.store import SupernetStore

CFG = dict(TINY_LLAMA)
EVO = {"generations": 3, "offspring": 4, "survivors": [2, 1], "tokens": [64, 256]}

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


# ----------------------------------------------------------------------------- registry


def test_every_command_reads_one_list_of_strategies():
    assert config_module.STRATEGIES == registry.STRATEGY_NAMES
    assert set(registry.STRATEGY_NAMES) == {
        "evopress", "tyr", "dp", "knapsack", "knapsack_lagrange", "dp+evopress",
        "uniform", "owl", "lamp", "erk", "global_magnitude", "random",
    }  # fmt: skip
    assert all(s.kind in registry.KINDS for s in registry.STRATEGIES.values())
    assert registry.SCORED_STRATEGIES == ("evopress", "dp", "knapsack", "knapsack_lagrange",
                                          "dp+evopress")  # fmt: skip
    assert all(registry.get(n).allocate is not None for n in registry.ALLOCATORS)
    with pytest.raises(ValueError, match=r"unknown strategy 'bogus'; valid: \['evopress'"):
        registry.get("bogus")
    # --help lists every strategy
    r = run("search", "--help")
    assert "dp+evopress" in r.output and "global_magnitude" in r.output


def test_settings_of_another_strategy_are_dropped_not_refused():
    demo = registry.DEMO_EVOPRESS
    # EvoPress's settings run dp and uniform without them (dp's `tokens` means another thing)
    dp = registry.resolve_settings("dp", demo, owner="evopress")
    assert dp.settings == {} and dp.dropped == ("generations", "offspring", "survivors", "tokens")
    assert dp.note("dp", "evopress") == (
        "note: search.settings ['generations', 'offspring', 'survivors', 'tokens'] are "
        "settings of evopress, not of dp; dp runs without them"
    )
    assert registry.resolve_settings("uniform", demo, owner="evopress").settings == {}
    # ... and configure the strategies that run EvoPress
    for name in ("evopress", "tyr", "dp+evopress"):
        assert registry.resolve_settings(name, demo, owner="evopress") == (
            registry.ResolvedSettings(dict(demo))
        )
    # a table's tokens do not configure EvoPress: it runs with its defaults
    evo = registry.resolve_settings("evopress", {"tokens": 512}, owner="dp")
    assert evo.settings == demo and evo.dropped == ("tokens",)
    # keys no strategy takes stay, for check_settings to refuse
    kept = registry.resolve_settings("dp", {"bogus": 1, "generations": 3}, owner="evopress")
    assert kept.settings == {"bogus": 1} and kept.dropped == ("generations",)
    with pytest.raises(ValueError, match=r"bad settings for strategy 'dp': it does not take "):
        registry.check_settings("dp", kept.settings)
    # per-strategy sub-maps apply to their strategy only
    both = {"generations": 5, "dp": {"tokens": 128}, "evopress": {"offspring": 8}}
    assert registry.resolve_settings("dp", both, owner="evopress").settings == {"tokens": 128}
    assert registry.resolve_settings("evopress", both, owner="evopress").settings == {
        "generations": 5,
        "offspring": 8,
    }
    with pytest.raises(ValueError, match="search.settings.dp = 3 must be a mapping"):
        registry.resolve_settings("dp", {"dp": 3}, owner="evopress")


def test_seeded_strategies_split_into_a_table_and_evopress():
    assert registry.split_seeded("dp+evopress", {**EVO, "table_tokens": 512}) == (
        "dp",
        {"tokens": 512},
        EVO,
    )
    assert registry.split_seeded("evopress", {**EVO, "seed_from": "knapsack"}) == (
        "knapsack",
        {},
        EVO,
    )
    assert registry.split_seeded("evopress", EVO) == (None, {}, EVO)
    # a seeded search ends with the final pick (FINAL_TOKENS unless run settings say less)
    assert registry.fitness_tokens("dp+evopress", {**EVO, "table_tokens": 512}) == 8192
    final = {"final_parents": 4, "final_tokens": 512}
    assert registry.fitness_tokens("dp+evopress", {**EVO, **final}) == 512
    assert registry.fitness_tokens("evopress", {**EVO, "final_parents": 0}) == 256
    assert registry.make_searcher("dp+evopress", {**EVO, "table_tokens": 9}).generations == 3


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    supernet = {"pruner": "magnitude", "center": 0.5, "steps_each_side": 2, "step_fraction": 0.1}
    config = workspace_config(
        root,
        CFG,
        words_per_doc=600,
        calibration_seqs=16,
        heldout_seqs=4,
        supernet=supernet,
        search={"target": 0.5, "strategy": "evopress", "settings": EVO},
        backend={"kind": "local"},
    )
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    config["search"]["settings"] = {**EVO, "bogus": 1}
    (root / "bogus.yaml").write_text(yaml.safe_dump(config))
    r = run("build", "--config", root / "config.yaml", "--out", root / "store", "--no-progress")
    assert r.exit_code == 0, r.output
    return root


def search(workdir, out, *args):
    return run(
        "search", "--config", workdir / "config.yaml", "--supernet", workdir / "store",
        "--out", workdir / out, "--no-progress", *args,
    )  # fmt: skip


@pytest.mark.slow
def test_a_config_for_evopress_runs_dp_and_uniform(workdir):
    for name in ("dp", "uniform"):
        r = search(workdir, name, "--strategy", name)
        assert r.exit_code == 0, r.output
        assert f"are settings of evopress, not of {name}; {name} runs without them" in r.output
        recipe = Recipe.load(workdir / name / "recipe.json")
        assert recipe.provenance.strategy == name
        assert "generations" not in recipe.provenance.settings  # not recorded as used
    assert Recipe.load(workdir / "dp" / "recipe.json").provenance.settings == {"tokens": 512}
    # a key no strategy takes is still refused: exit 2, one line, nothing written
    out = workdir / "bad"
    r = run(
        "search", "--config", workdir / "bogus.yaml", "--supernet", workdir / "store",
        "--out", out, "--strategy", "dp", "--no-progress",
    )  # fmt: skip
    assert r.exit_code == 2
    assert "bad settings for strategy 'dp': it does not take ['bogus']" in r.output
    assert not (out / "recipe.json").exists()


@pytest.mark.slow
def test_dp_evopress_counts_the_table_and_resumes(workdir):
    r = search(workdir, "dp-ref", "--strategy", "dp")
    assert r.exit_code == 0, r.output
    dp = Recipe.load(workdir / "dp-ref" / "recipe.json").provenance
    r = search(workdir, "seeded", "--strategy", "dp+evopress")
    assert r.exit_code == 0, r.output
    assert "dp+evopress: dp first, then EvoPress from its allocation" in r.output
    recipe = Recipe.load(workdir / "seeded" / "recipe.json")
    prov = recipe.provenance
    assert prov.strategy == "dp+evopress"
    # the final pick scores every validation token (16 rows of 32, data.n_validation_seqs)
    final_pick = {"final_parents": 4, "final_tokens": 512, "final_split": "validation"}
    assert prov.settings == {**EVO, "table_tokens": 512, **final_pick}
    assert (prov.fitness.calibration_tokens, prov.fitness.validation_tokens) == (512, 512)
    # DP's table and solution (as `search --strategy dp` counts them), then EvoPress's own
    # generations, then the final pick among the start and the last parents (1 to 5)
    log = read_log(workdir / "seeded" / "log.jsonl")
    assert [line["generation"] for line in log] == [1, 2, 3]
    spec = SupernetStore.open(workdir / "store", verify="none").spec
    assert dp.evaluations == 1 + int(spec.valid[:, 1:].sum()) + 1  # baseline, probes, solution
    assert 1 <= prov.evaluations - dp.evaluations - log[-1]["evaluations"] <= 5
    # resuming its last checkpoint runs DP again (deterministic: the same EvoPress start,
    # so the checkpoint's fingerprint matches) and ends the same
    r = search(workdir, "seeded", "--strategy", "dp+evopress", "--resume")
    assert r.exit_code == 0, r.output
    assert "resuming at generation 3" in r.output
    resumed = Recipe.load(workdir / "seeded" / "recipe.json")
    assert resumed.layers == recipe.layers
    assert resumed.provenance.fitness == prov.fitness
    assert resumed.provenance.evaluations == prov.evaluations
    # the config's seed_from: dp runs the same search under the name evopress
    cfg = yaml.safe_load((workdir / "config.yaml").read_text())
    cfg["search"]["settings"] = {**EVO, "seed_from": "dp"}
    (workdir / "seed_from.yaml").write_text(yaml.safe_dump(cfg))
    r = run(
        "search", "--config", workdir / "seed_from.yaml", "--supernet", workdir / "store",
        "--out", workdir / "seed_from", "--no-progress",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    seed_from = Recipe.load(workdir / "seed_from" / "recipe.json")
    assert seed_from.layers == recipe.layers
    assert seed_from.provenance.strategy == "evopress"
    assert seed_from.provenance.settings == {**EVO, "seed_from": "dp", **final_pick}
    assert seed_from.provenance.evaluations == prov.evaluations


def test_demo_refuses_unknown_strategies_before_writing(tmp_path):
    out = tmp_path / "demo"
    r = run("demo", "--strategies", "uniform,bogus", "--out", out, "--no-progress")
    assert r.exit_code == 2 and "unknown ['bogus']; valid: evopress, tyr" in r.output
    assert not out.exists()


@pytest.mark.slow
def test_dp_evopress_interrupted_resumes_to_the_same_recipe(workdir, monkeypatch):
    from test_cli import _InterruptAfter  # a Ctrl-C on the evaluator's n-th query

    from allocsearch import pipeline

    r = search(workdir, "seeded-whole", "--strategy", "dp+evopress")
    assert r.exit_code == 0, r.output
    whole = Recipe.load(workdir / "seeded-whole" / "recipe.json")
    make = pipeline.make_evaluator
    # DP's 2 queries, then 2 per EvoPress generation: the 7th is in generation 3
    monkeypatch.setattr(pipeline, "make_evaluator", lambda ws, s: _InterruptAfter(make(ws, s), 7))
    r = search(workdir, "seeded-cut", "--strategy", "dp+evopress")
    assert r.exit_code == 130
    partial = Recipe.load(workdir / "seeded-cut" / "recipe.partial.json")
    assert partial.partial and partial.provenance.strategy == "dp+evopress"
    assert len(read_log(workdir / "seeded-cut" / "log.jsonl")) == 2
    monkeypatch.setattr(pipeline, "make_evaluator", make)
    r = search(workdir, "seeded-cut", "--strategy", "dp+evopress", "--resume")
    assert r.exit_code == 0, r.output
    assert "resuming at generation 2" in r.output
    resumed = Recipe.load(workdir / "seeded-cut" / "recipe.json")
    assert resumed.layers == whole.layers
    assert resumed.provenance.fitness == whole.provenance.fitness
    assert resumed.provenance.evaluations == whole.provenance.evaluations
