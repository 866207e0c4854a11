"""What a pruning engineer meets in the first hour (issue 16): the EvoPress database export
read the way EvoPress's loader reads it, Týr's defaults, --model and the calibration options
on every command, fitness labelled with its token counts, and paths that are files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny_workspace import TINY_LLAMA, cli_config, workspace_config, write_model_and_corpus
from typer.testing import CliRunner

from allocsearch import pipeline
from allocsearch.cli import app
from allocsearch.config import load_config
from allocsearch.models import load_model
from allocsearch.recipe.evopress_db import EVOPRESS_LEVELS_FILE
from allocsearch.recipe.recipe import Recipe
from allocsearch.supernet.store import SupernetStore

CFG = dict(TINY_LLAMA)

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(output: str) -> str:
    return " ".join(output.split())


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny model, its corpus, a config, a magnitude supernet and a random recipe on it."""
    root = tmp_path_factory.mktemp("first_hour")
    config = workspace_config(
        root,
        CFG,
        heldout_seqs=4,
        supernet={"pruner": "magnitude", "center": 0.5, "steps_each_side": 2},
        search={"target": 0.5, "strategy": "random"},
        backend={"kind": "local"},
    )
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    r = run("build", "-c", root / "config.yaml", "--out", root / "store", "--no-progress")
    assert r.exit_code == 0, r.output
    # a recipe off the centre (no search: it would compile the evaluator): block 0's q_proj
    # one level sparser, its o_proj (same size, equal-weight steps) one level denser
    work = pipeline.load_workspace(load_config(root / "config.yaml"))
    store = SupernetStore.open(root / "store")
    names = [u.name for u in store.spec.units]
    choice = store.spec.center.astype(np.int32)
    choice[names.index("model.layers.0.self_attn.q_proj")] += 1
    choice[names.index("model.layers.0.self_attn.o_proj")] -= 1
    budget = pipeline.make_budget(work.config.search, store.spec)
    outcome = pipeline.Outcome("random", choice, None, 0, 0, 0.0, {})
    (root / "run").mkdir()
    pipeline.recipe_from_choice(work, store, budget, outcome).save(root / "run" / "recipe.json")
    return root


# ----------------------------------------------------------------------------- EvoPress database


def evopress_style_load(model, database: Path, level_file: str | None, default_level: int = 0):
    """What EvoPress's ``load_sparse_weights`` does with a database (its documented
    behaviour, restated): with a level file, each ``name: level`` line puts
    ``torch.load(<db>/<name>/<level>.pth)`` into ``model.get_submodule(name).weight``, cast
    to the weight's dtype; without one, every directory of the database gets
    ``default_level``."""
    import torch

    if level_file is not None:
        pairs = [line.split(":") for line in (database / level_file).read_text().splitlines()]
    else:
        pairs = [(d.name, default_level) for d in sorted(database.iterdir()) if d.is_dir()]
    for name, level in pairs:
        layer = model.get_submodule(name.strip(" "))
        loaded = torch.load(database / name / f"{int(level)}.pth")
        assert loaded.shape == layer.weight.shape, name  # EvoPress assigns without a check
        layer.weight.data = loaded.to(layer.weight.dtype)


@pytest.mark.slow
def test_evopress_database_is_what_evopress_loads(ws):
    """Issue 16.7: the database has one directory per module with one .pth per level
    (relative to the centre), each the supernet's variant in the HF weight's shape; the
    level file, read as EvoPress reads it, gives every layer the recipe's sparsity."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    db = ws / "evopress_db"
    args = ("export", ws / "run" / "recipe.json", "--format", "evopress-db", "--out", db)
    r = run(*args, "--supernet", ws / "store")
    assert r.exit_code == 2 and "needs --supernet" in one_line(r.output) and not db.exists()
    r = run(*args, "--supernet", ws / "store", "--model", ws / "model")
    assert r.exit_code == 0, r.output
    assert f"load_sparse_weights(model, '{db}', '{EVOPRESS_LEVELS_FILE}')" in one_line(r.output)

    recipe = Recipe.load(ws / "run" / "recipe.json")
    store = SupernetStore.open(ws / "store")
    model = load_model(ws / "model")
    spec = store.spec
    assert sorted(p.name for p in db.iterdir()) == sorted(
        [EVOPRESS_LEVELS_FILE, *(u.name for u in spec.units)]
    )
    for u, unit in enumerate(spec.units):
        (param,) = store.unit_params[u]
        c, k_levels = int(spec.center[u]), int(spec.num_levels[u])
        files = sorted(p.name for p in (db / unit.name).iterdir())
        assert files == sorted(f"{k - c}.pth" for k in range(k_levels))
        dense = np.asarray(model.params[param])
        for k in range(k_levels):
            w = torch.load(db / unit.name / f"{k - c}.pth", weights_only=True)
            assert w.dtype == torch.float32 and tuple(w.shape) == dense.shape
            want = store.read_levels(param, [k], dense)[0]
            np.testing.assert_array_equal(w.numpy(), want)
            assert float(np.mean(want == 0)) == pytest.approx(spec.sparsity[u, k], abs=1e-12)
    lines = (db / EVOPRESS_LEVELS_FILE).read_text().splitlines()
    assert [line.split(": ")[0] for line in lines] == [x.name for x in recipe.layers]
    assert sorted(int(line.split(": ")[1]) for line in lines)[::13] == [-1, 1]

    hf = transformers.AutoModelForCausalLM.from_pretrained(ws / "model", dtype=torch.float32)
    evopress_style_load(hf, db, EVOPRESS_LEVELS_FILE)
    for x in recipe.layers:
        w = hf.get_submodule(x.name).weight.detach().numpy()
        assert float(np.mean(w == 0)) == pytest.approx(x.sparsity, abs=1e-12), x.name
    evopress_style_load(hf, db, None)  # no level file: level 0 everywhere, the uniform one
    for u, unit in enumerate(spec.units):
        w = hf.get_submodule(unit.name).weight.detach().numpy()
        assert float(np.mean(w == 0)) == pytest.approx(spec.sparsity[u, spec.center[u]])

    before = sorted(p.name for p in ws.iterdir())
    r = run(*args, "--supernet", ws / "store", "--model", ws / "model")
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = run(*args, "--supernet", ws / "store", "--model", ws / "model", "--overwrite")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in ws.iterdir()) == before  # no temporary directory left


# ----------------------------------------------------------------------------- Týr defaults


def demo_adapter():
    import json

    from allocsearch.assets_paths import demo_model_dir
    from allocsearch.models.hf import adapter_for_config

    return adapter_for_config(json.loads((demo_model_dir() / "config.json").read_text()))


def test_tyr_defaults_are_four_rounds_and_32_neuron_steps(monkeypatch, tmp_path):
    """Issue 16.9: the pipeline's Týr runs the paper's 4 rounds (12.5% -> 1.5625% of a
    sublayer) and its grids never step by fewer than 32 neurons: round 4 on the demo
    model's 704-neuron MLPs would step by round(0.015625 * 704) = 11 neurons."""
    from types import SimpleNamespace

    from allocsearch.config import config_from_dict
    from allocsearch.models.hf import HFModel
    from allocsearch.search.coarse_to_fine import step_schedule
    from allocsearch.supernet.build import supernet_units

    adapter = demo_adapter()
    units = supernet_units(adapter, "heads_neurons")
    seen: dict = {}

    class Built(Exception):
        pass

    def fake_build(model, calibration, *, grid, **kw):
        seen["grid"] = grid
        raise Built

    def fake_coarse_to_fine(*, rebuild, rounds, initial_step, min_step, **kw):
        seen["steps"] = step_schedule(initial_step=initial_step, min_step=min_step, rounds=rounds)
        rebuild(np.full(len(units), 0.25), seen["steps"][-1])  # the last round's grid

    monkeypatch.setattr(pipeline, "build_supernet", fake_build)
    monkeypatch.setattr(pipeline, "coarse_to_fine", fake_coarse_to_fine)
    cfg = config_from_dict({"supernet": {"structure": "heads_neurons"}})
    work = SimpleNamespace(config=cfg, model=HFModel(adapter, {}), calibration=None)
    dense_only = dict(valid=np.ones((len(units), 1), bool), sparsity=np.zeros((len(units), 1)))
    spec = SimpleNamespace(units=units, structure="heads_neurons", **dense_only)
    store = SimpleNamespace(spec=spec)
    with pytest.raises(Built):
        pipeline._run_tyr(work, store, None, seed=0, settings={}, work_dir=tmp_path, progress=False)
    assert seen["steps"] == (0.125, 0.0625, 0.03125, 0.015625)
    grid = seen["grid"]
    for u, unit in enumerate(units):
        levels = grid.sparsity[u][grid.valid[u]]
        if unit.role == "mlp":  # centre 176 of 704 neurons, steps of 32: 48 .. 304
            np.testing.assert_allclose(levels, (176 + 32 * np.arange(-4, 5)) / 704)
        else:  # 2 kv groups: centre round(0.5) = 1 group removed, steps of one group
            np.testing.assert_allclose(levels, [0.0, 0.5, 1.0])

    # the first supernet (`build`) keeps the same floor
    fine = config_from_dict({"supernet": {"structure": "heads_neurons", "center": 0.25,
                                          "step_fraction": 0.015625}})  # fmt: skip
    grid = pipeline.make_grid(fine.supernet, HFModel(adapter, {}), target=0.25)
    mlp = [u for u, unit in enumerate(units) if unit.role == "mlp"]
    np.testing.assert_allclose(np.diff(grid.sparsity[mlp][:, :2], axis=1), 32 / 704)


# ----------------------------------------------------------------------------- options


def test_model_and_calibration_options_are_validated_before_loading(ws, tmp_path, monkeypatch):
    """Issue 16: search/compare/eval take --model (overriding the config's), the calibration
    source, sequence length and count and EvoPress generations; bad values are one line
    naming the option, and a missing source or an unreachable target is reported before
    the model loads."""
    import jax

    from allocsearch.models import HFModel, adapter_for_config, save_model

    cfg = ws / "config.yaml"
    search = ("search", "-c", cfg, "--supernet", ws / "store", "--no-progress")
    cases = [
        (("eval", "-c", cfg, "--seq-len", "0"), "--seq-len: data.seq_len = 0 must be >= 1"),
        (("build", "-c", cfg, "--out", tmp_path / "s", "--calibration-seqs", "0"),
         "--calibration-seqs: data.n_calibration_seqs = 0 must be >= 1"),
        ((*search, "--out", tmp_path / "r", "--generations", "0"),
         "--generations must be an integer >= 1, got 0"),
        ((*search, "--out", tmp_path / "r", "--strategy", "dp", "--generations", "5"),
         "strategy 'dp' does not run; use it with evopress, tyr or dp+evopress"),
        (("compare", "-c", cfg, "--supernet", ws / "store", "--out", tmp_path / "r",
          "--strategies", "uniform,dp", "--generations", "5"), "none of ['uniform', 'dp'] runs"),
        ((*search, "--out", tmp_path / "r", "--calibration", tmp_path / "nowhere.txt"),
         f"text source '{tmp_path / 'nowhere.txt'}' does not exist"),
        ((*search, "--out", tmp_path / "r", "--target", "0.95"),
         "InfeasibleBudgetError: target 0.95 (params removed) is not achievable"),
        (("compare", "-c", cfg, "--supernet", ws / "store", "--out", tmp_path / "r",
          "--strategies", "uniform", "--target", "0.95"), "target 0.95 (params removed)"),
    ]  # fmt: skip

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    with monkeypatch.context() as m:
        m.setattr(pipeline, "load_model", no_model)
        for args, message in cases:
            r = run(*args)
            assert r.exit_code == 2, (args, r.output)
            assert message in one_line(r.output), (args, r.output)
            assert "Traceback" not in r.output and not (tmp_path / "r").exists()

    # a supernet searched with another model says which model it was built from
    adapter = adapter_for_config(CFG)
    save_model(HFModel(adapter, adapter.init_params(jax.random.key(1))), tmp_path / "other")
    r = run(*search, "--out", tmp_path / "r", "--model", tmp_path / "other")
    assert r.exit_code == 2, r.output
    assert (
        f"was built from the model '{ws / 'model'}', not from the model this run loads "
        f"('{tmp_path / 'other'}'" in one_line(r.output)
    )
    assert f"pass --model {ws / 'model'}" in one_line(r.output)

    # eval uses the config's model (not the demo) and the options' sequence length
    r = run("eval", "-c", cfg, "--seq-len", "16")
    assert r.exit_code == 0, r.output
    assert one_line(r.output).startswith(f"{ws / 'model'}: held-out perplexity")
    assert "on 64 tokens" in one_line(r.output)  # 4 held-out sequences x 16

    # --help states the new options' defaults (what the config gives, else the demo's)
    import typer

    new = {"model", "calibration", "seq_len", "calibration_seqs", "generations"}
    for command in ("search", "compare", "eval", "build"):
        params = typer.main.get_command(app).commands[command].params
        helps = {p.name: p.help for p in params if p.name in new}
        assert len(helps) >= 3 and all("(default: the config's " in h for h in helps.values())


# ----------------------------------------------------------------------------- fitness labels


def test_fitness_is_labelled_with_its_token_count(tmp_path, monkeypatch):
    """Issue 16: a search's best fitness is measured on its last stage's tokens (2,048 in
    the demo settings), the demo table's on the whole set; progress lines and fitness.png
    say which."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from allocsearch.distributed.progress import make_callbacks
    from allocsearch.report import plots
    from allocsearch.search import registry
    from allocsearch.search.base import HistoryEntry

    assert registry.fitness_tokens("evopress", registry.DEMO_EVOPRESS) == 2048
    assert registry.fitness_tokens("evopress", {"tokens": [64, 256], "survivors": [2, 1]}) == 256
    assert registry.fitness_tokens("tyr", {"rounds": 2}) == 2048  # its inner search's
    assert registry.fitness_tokens("dp", {"tokens": 512}) == 512
    assert registry.fitness_tokens("uniform", {}) is None

    # plain progress lines (stdout not a terminal) carry the label after the fitness
    out = io.StringIO()
    result = SimpleNamespace(best_fitness=0.25, evaluations=12, tokens=99, history=())
    searcher = SimpleNamespace(result=lambda state: result)
    with make_callbacks(
        searcher, progress=True, total_generations=2, fitness_label="kl on 2,048 tokens",
        console=Console(file=out, width=200),
    ) as callbacks:  # fmt: skip
        callbacks(SimpleNamespace(generation=1, step=2))
    assert "best 0.25 (kl on 2,048 tokens)" in out.getvalue(), out.getvalue()

    # fitness.png: the token count on the axis (one count) or in the legend (several)
    figures = []
    monkeypatch.setattr(plots, "_png_bytes", lambda fig: figures.append(fig) or b"png")
    history = (HistoryEntry(1, 12, 99, 0.5), HistoryEntry(2, 24, 198, 0.4))
    plots.plot_fitness_curves(
        {"evopress": history}, tmp_path / "a.png", metric_name="kl", tokens={"evopress": 2048}
    )
    ax = figures[-1].axes[0]
    assert ax.get_ylabel() == "parent's kl on 2,048 tokens (lower is better)"
    assert ax.get_title().startswith("the parent's fitness on each generation's minibatch")
    plots.plot_fitness_curves(
        {"evopress": history, "dp": history}, tmp_path / "b.png", metric_name="kl",
        tokens={"evopress": 2048, "dp": 512},
    )  # fmt: skip
    ax = figures[-1].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "evopress (2,048 tokens)", "dp (512 tokens)"
    ]  # fmt: skip
    assert ax.get_ylabel() == "parent's kl (lower is better)"


# ----------------------------------------------------------------------------- Ray start noise


def test_ray_start_drops_only_the_fork_warning_and_the_auth_notice():
    """Issue 16: ``ray.init`` (inside ``_ray_starts_processes``) printed JAX's os.fork()
    warning and Ray's token-authentication notice on every run; exactly those two are
    dropped there, and nothing else is."""
    import logging
    import warnings

    from allocsearch.distributed import ray_backend

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    auth = logging.getLogger(ray_backend._RAY_AUTH_LOGGER)
    auth.addHandler(handler)
    fork = "os.fork() was called. os.fork() is incompatible with multithreaded code"
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with ray_backend._ray_starts_processes():
                warnings.warn(fork, RuntimeWarning, stacklevel=1)
                warnings.warn("another warning", RuntimeWarning, stacklevel=1)
                auth.warning("Token authentication is enabled for this Ray cluster. Set ...")
                auth.warning("Token authentication is disabled for this Ray cluster. ...")
            warnings.warn(fork, RuntimeWarning, stacklevel=1)  # outside ray.init: kept
            auth.warning("Token authentication is enabled for this Ray cluster (later)")
    finally:
        auth.removeHandler(handler)
    assert [str(w.message)[:40] for w in seen] == ["another warning", fork[:40]]
    assert [r.getMessage()[:40] for r in records] == [
        "Token authentication is disabled for thi", "Token authentication is enabled for this"
    ]  # fmt: skip


# ----------------------------------------------------------------------------- round 3 (issue 28)


class Loaded(Exception):
    """Raised by a stubbed ``load_model``: the command got past its checks."""


def no_model_loads(*args, **kwargs):
    raise Loaded


@pytest.fixture(scope="module")
def drop_ws(ws):
    """A depth "drop" supernet (4 sublayers: 2 blocks x attention, MLP) of ``ws``'s model."""
    config = yaml.safe_load((ws / "config.yaml").read_text())
    config["supernet"] = {"structure": "heads_neurons", "depth": "drop"}
    (ws / "drop.yaml").write_text(yaml.safe_dump(config))
    r = run("build", "-c", ws / "drop.yaml", "--out", ws / "drop_store", "--no-progress")
    assert r.exit_code == 0, r.output
    return ws


def test_sublayer_target_range_is_what_runs(drop_ws, tmp_path, monkeypatch):
    """Issue 28.1: dropping all 4 sublayers leaves one allocation (EvoPress then failed
    after loading with "no budget-preserving level switch"): --target 4 is refused in one
    line before the model loads, with the range that is accepted (1 to 3; 1 to 2 with
    --tie-blocks, whose blocks hold 2 sublayers), and 3 passes the check."""
    monkeypatch.setattr(pipeline, "load_model", no_model_loads)
    args = ("search", "-c", drop_ws / "drop.yaml", "--supernet", drop_ws / "drop_store",
            "--out", tmp_path / "r", "--budget", "sublayers", "--no-progress")  # fmt: skip
    r = run(*args, "--target", "4")
    assert r.exit_code == 2, r.output
    assert "a whole number from 1 to 3 (this supernet has 4 sublayers;" in one_line(r.output)
    assert "Traceback" not in r.output and not (tmp_path / "r").exists()
    r = run(*args, "--target", "4", "--tie-blocks")
    assert r.exit_code == 2 and "a whole number from 1 to 2 " in one_line(r.output), r.output
    r = run(*args, "--target", "3")
    assert "target: drop 3 of 4 sublayers" in r.output and isinstance(r.exception, Loaded)


MOE = {
    "model_type": "qwen3_moe",
    "vocab_size": 256,
    "hidden_size": 16,
    "intermediate_size": 32,
    "moe_intermediate_size": 8,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "max_position_embeddings": 64,
}


def test_evopress_export_refuses_expert_units(tmp_path):
    """Issue 28.2: an expert-removal supernet's units are whole experts (gate, up and down
    sharing one level, the last one "removed"), which EvoPress's one-level-per-module
    format cannot express: export --format evopress (and evopress-db) say so in one line,
    exit 2 and write nothing; it said "supernet units do not match the recipe's"."""
    _, corpus = write_model_and_corpus(tmp_path, MOE, docs=2, words_per_doc=300)
    config = cli_config(tmp_path / "model", corpus, seq_len=16, calibration_seqs=4,
                        heldout_seqs=2, supernet={"pruner": "magnitude", "center": 0.5,
                        "steps_each_side": 1}, search={"target": 0.5},
                        backend={"kind": "local"})  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    store_dir = tmp_path / "store"
    r = run("build", "-c", tmp_path / "config.yaml", "--out", store_dir, "--expert-removal",
            "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output
    work = pipeline.load_workspace(load_config(tmp_path / "config.yaml"))
    store = SupernetStore.open(store_dir)
    spec = store.spec
    assert sum(u.role == "expert" for u in spec.units) == 8  # 2 blocks x 4 experts
    choice = spec.center.astype(np.int32)
    u = next(u for u in range(spec.num_units) if spec.units[u].role == "expert"
             and spec.sparsity[u, spec.num_levels[u] - 1] == 1.0)  # fmt: skip
    choice[u] = spec.num_levels[u] - 1  # one expert removed
    budget = pipeline.make_budget(work.config.search, spec)
    outcome = pipeline.Outcome("random", choice, None, 0, 0, 0.0, {})
    pipeline.recipe_from_choice(work, store, budget, outcome).save(tmp_path / "recipe.json")
    for fmt in ("evopress", "evopress-db"):
        out = tmp_path / f"out-{fmt}"
        r = run("export", tmp_path / "recipe.json", "--format", fmt, "--out", out,
                "--supernet", store_dir, "--model", tmp_path / "model")  # fmt: skip
        assert r.exit_code == 2, r.output
        first = next(x for x in spec.units if x.role == "expert")
        assert (
            f"cannot express expert units: this supernet's unit '{first.name}' is a whole "
            f"expert (3 modules sharing one level) and 8 units are such groups"
        ) in one_line(r.output), r.output
        assert len(r.output.strip().splitlines()) <= 3 and not out.exists()


def test_plan_refuses_a_foreign_store(ws, tmp_path):
    """Issue 28.3: plan --supernet with another model's store was accepted (and counted
    the store's units over the model's blocks); it is refused as search refuses it, naming
    both fingerprints (other weights) or, for a config.json alone, the architectures."""
    import jax

    from allocsearch.models import HFModel, adapter_for_config, save_model

    store = SupernetStore.open(ws / "store", verify="none")
    built = store.model_fingerprint
    r = run("plan", "--model", ws / "model", "--supernet", ws / "store")
    assert r.exit_code == 0, r.output

    adapter = adapter_for_config(CFG)
    other = HFModel(adapter, adapter.init_params(jax.random.key(1)))
    other_dir = save_model(other, tmp_path / "other")
    r = run("plan", "--model", other_dir, "--supernet", ws / "store")
    assert r.exit_code == 2, r.output
    theirs = load_model(other_dir).fingerprint
    assert theirs != built
    assert (
        f"the supernet '{ws / 'store'}' was built from the model '{ws / 'model'}' (fingerprint "
        f"'{built}'), not from the model '{other_dir}' (fingerprint '{theirs}': other weights)"
    ) in one_line(r.output)

    big = Path(__file__).parents[1] / "configs" / "models" / "llama-3-8b"
    r = run("plan", "--model", big, "--supernet", ws / "store")
    assert r.exit_code == 2, r.output
    assert (
        f"(fingerprint '{built}'), not from the model '{big}' (llama, 32 blocks; config.json "
        f"alone, no weights to fingerprint; the store's model: llama, 2 blocks;"
    ) in one_line(r.output)
    assert "units" not in r.output

    (tmp_path / "same").mkdir()  # config.json alone of the store's architecture: accepted
    (tmp_path / "same" / "config.json").write_text((ws / "model" / "config.json").read_text())
    r = run("plan", "--model", tmp_path / "same", "--supernet", ws / "store")
    assert r.exit_code == 0, r.output


def test_ray_address_that_never_answers_is_one_line(ws, tmp_path, monkeypatch):
    """Issue 28.5: an address that accepts no packets used to hand over to ``ray.init``,
    which printed about 20 of Ray's ``gcs_client.cc`` warnings over minutes. Simulated by
    a listening socket that never answers (the kernel completes the handshake, nothing
    replies; an iptables DROP rule needs root and iptables, neither of which this machine
    has): the probe waits ALLOCSEARCH_RAY_CONNECT_TIMEOUT_S for the gRPC server's first
    bytes and refuses in one line, never calling ``ray.init``."""
    import socket
    import time

    ray = pytest.importorskip("ray")

    def no_init(*args, **kwargs):
        raise AssertionError("ray.init was called")

    monkeypatch.setattr(ray, "init", no_init)
    monkeypatch.setenv("ALLOCSEARCH_RAY_CONNECT_TIMEOUT_S", "1")
    config = yaml.safe_load((ws / "config.yaml").read_text())
    config["backend"] = {"kind": "ray", "workers": 1}
    (tmp_path / "ray.yaml").write_text(yaml.safe_dump(config))
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.monotonic()
        r = run("build", "-c", tmp_path / "ray.yaml", "--address", address,
                "--out", tmp_path / "s", "--no-progress")  # fmt: skip
    assert r.exit_code == 2, r.output
    assert r.output.strip().startswith("error: WorkerStartError: no Ray cluster answers at")
    assert (
        f"no Ray cluster answers at '{address}': {address} accepts a connection but sends "
        f"nothing within 1 s"
    ) in one_line(r.output)
    assert len(r.output.strip().splitlines()) <= 3 and not (tmp_path / "s").exists()
    assert time.monotonic() - t0 < 30


def test_a_config_for_evopress_does_not_break_another_strategy(ws, tmp_path):
    """Issue 28.4: `search --config <EvoPress settings> --strategy uniform` failed with
    "bad settings for strategy 'uniform': it does not take ['generations', ...]". The other
    strategy's keys are dropped with one note; a key no strategy takes is still refused."""
    cfg = yaml.safe_load((ws / "config.yaml").read_text())
    cfg["search"] = {"target": 0.5, "strategy": "evopress",
                     "settings": {"generations": 2, "offspring": 4, "survivors": [2, 1],
                                  "tokens": [64, 128]}}  # fmt: skip
    (tmp_path / "evo.yaml").write_text(yaml.safe_dump(cfg))
    r = run("search", "-c", tmp_path / "evo.yaml", "--supernet", ws / "store", "--out",
            tmp_path / "u", "--strategy", "uniform", "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "settings of evopress, not of uniform" in one_line(r.output)
    assert Recipe.load(tmp_path / "u" / "recipe.json").provenance.settings == {}
    cfg["search"]["settings"]["bogus"] = 1
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    r = run("search", "-c", tmp_path / "bad.yaml", "--supernet", ws / "store", "--out",
            tmp_path / "b", "--strategy", "uniform", "--no-progress")  # fmt: skip
    assert r.exit_code == 2 and "['bogus']" in r.output
    assert not (tmp_path / "b" / "recipe.json").exists()


@pytest.mark.slow  # a DP search and a compare (about 40 s on 2 cores)
def test_dp_fitness_is_labelled_with_the_tokens_it_ran_on(ws, tmp_path, monkeypatch):
    """Issue 28.6, 28.7: DP's error table is scored on the whole calibration set up to
    4,096 tokens (here 8 x 32 = 256), not on its searcher's default 2,048, which the
    search's line and compare's fitness.png said; and a stage without steps of its own
    prints a heartbeat line when stderr is not a terminal (here every 0.01 s)."""
    from allocsearch import console_progress, demo

    monkeypatch.setattr(console_progress, "HEARTBEAT_S", 0.01)
    cfg = ws / "config.yaml"
    r = run("search", "-c", cfg, "--supernet", ws / "store", "--out", tmp_path / "s",
            "--strategy", "dp")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "dp: fitness" in r.output and "(kl on 256 tokens)" in one_line(r.output), r.output
    assert "2,048" not in r.output
    assert "dp: searching ... elapsed" in r.output and "dp: scoring the result ..." in r.output
    assert Recipe.load(tmp_path / "s" / "recipe.json").provenance.settings["tokens"] == 256

    seen = {}
    monkeypatch.setattr(demo, "plot_fitness_curves", lambda h, p, **kw: seen.update(kw))
    r = run("compare", "-c", cfg, "--supernet", ws / "store", "--out", tmp_path / "c",
            "--strategies", "uniform,dp")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert seen["tokens"] == {"dp": 256}
    assert "dp: searching ... elapsed" in r.output
    assert "scoring the allocations ... elapsed" in r.output


def test_round_3_small_things(ws, tmp_path, monkeypatch):
    """Issue 28.10: apply and eval take --progress/--no-progress; a failed write names the
    path the user gave, not the hidden temporary file; the supernet's centre as default
    target prints as 0.7 (not 0.700001, which the centre does not even reach); plan
    --workers 0 is refused as search refuses it; docs/errors.md lists every model type."""
    import tempfile
    from types import SimpleNamespace

    import typer

    from allocsearch import cli
    from allocsearch.models.hf import FAMILIES

    commands = typer.main.get_command(app).commands
    for command in ("apply", "eval"):
        assert "--no-progress" in [o for p in commands[command].params for o in p.secondary_opts]
    r = run("eval", "-c", ws / "config.yaml", "--no-progress")
    assert r.exit_code == 0 and "held-out perplexity" in r.output, r.output

    def read_only(*args, prefix="", suffix="", dir=None, **kwargs):
        name = Path(dir) / f"{prefix}ab12cd34{suffix}"
        raise PermissionError(13, "Permission denied", str(name))

    out = tmp_path / "exports" / "owl.json"
    out.parent.mkdir()
    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", read_only)
        r = run("export", ws / "run" / "recipe.json", "--format", "owl", "--out", out)
    assert r.exit_code == 2, r.output
    assert f"PermissionError: [Errno 13] Permission denied: '{out}'" in one_line(r.output)
    assert ".tmp" not in r.output

    # a centre that removes 0.700000851653343 (the demo supernet's) is the target 0.7
    numel = np.array([1_000_000, 999_999])
    sparsity = np.array([[0.7], [0.7 + 1.703306686e-6]])
    spec = SimpleNamespace(num_units=2, center=np.zeros(2, int), sparsity=sparsity, numel=numel)
    monkeypatch.setattr(SupernetStore, "open", lambda *a, **k: SimpleNamespace(spec=spec))
    assert cli._default_target(None, None, tmp_path) == 0.7

    r = run("plan", "--model", ws / "model", "--workers", "0")
    assert r.exit_code == 2, r.output
    assert "backend.workers = 0 is not valid; use an integer >= 1 or 'auto'" in one_line(r.output)

    errors = (Path(__file__).parents[1] / "docs" / "errors.md").read_text()
    assert f"supported: {', '.join(sorted(FAMILIES))} |" in errors and len(FAMILIES) == 16
