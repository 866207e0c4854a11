"""docs/errors.md, line by line (issue #10).

Every situation the catalogue lists is refused through the command line (on the tiny
byte-level Llama of test_cli.py) with exit status 2, one line ``error: <Type>: <message>``
that names the bad value, no traceback, and no output files. One case per table line,
with the line's situation as its id; a line the command line cannot reach is checked on
the library call that refuses it. The catalogue itself must list each situation once,
name only error classes that exist in the package (and that the command line reports as
one line), and name every error class the package defines.
"""

from __future__ import annotations

import builtins
import dataclasses
import importlib
import inspect
import json
import pkgutil
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from resume_worker import BUDGET, SEED, AdditiveFactory, evo_searcher, tiny_spec
from rich.console import Console
from test_cli import run, supernet, workdir  # noqa: F401 (fixtures)
from test_recipe import unstructured_recipe

import allocsearch
from allocsearch import cli, pipeline
from allocsearch.config import load_config
from allocsearch.distributed import ray_backend
from allocsearch.distributed.checkpoint import SearchCheckpointer, search_fingerprint
from allocsearch.distributed.local import run_search
from allocsearch.models import HFModel, adapter_for_config, save_model
from allocsearch.models.safetensors_io import read_safetensors, write_safetensors
from allocsearch.pruners import MagnitudePruner
from allocsearch.recipe.recipe import Recipe, RecipeBudget, fraction_removed
from allocsearch.supernet.store import MANIFEST_NAME, SupernetStore

ERRORS_MD = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
Q_PROJ = "model.layers.0.self_attn.q_proj"


# ----------------------------------------------------------------------------- catalogue


def catalogue() -> list[tuple[str, list[str]]]:
    """The table of docs/errors.md: (situation, error class names) per line, in order."""
    rows = []
    for line in ERRORS_MD.read_text().splitlines():
        if not line.startswith("| ") or line.startswith("| situation |"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 3, f"a catalogue line needs 3 cells: {line!r}"
        rows.append((cells[0], re.findall(r"`(\w+)`", cells[1])))
    return rows


def package_exceptions() -> dict[str, list[type]]:
    """Exception classes defined in allocsearch (every module imported), by name; warnings
    (e.g. ``WorkerLostWarning``: the run goes on) are not errors and not listed."""
    found: dict[str, list[type]] = {}
    for info in pkgutil.walk_packages(allocsearch.__path__, "allocsearch."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and not issubclass(obj, Warning)
                and obj.__module__ == info.name
                and not name.startswith("_")
            ):
                found.setdefault(name, []).append(obj)
    return found


def test_catalogue_lists_each_situation_once_and_only_real_errors():
    rows = catalogue()
    situations = [s for s, _ in rows]
    assert len(rows) >= 20
    assert len(set(situations)) == len(situations), "a situation is listed twice"
    defined = package_exceptions()
    named = set()
    for situation, errors in rows:
        assert errors, f"{situation!r} names no error class"
        for name in errors:
            named.add(name)
            if hasattr(builtins, name):
                cls = getattr(builtins, name)
            else:
                assert len(defined.get(name, [])) == 1, f"{name} is not one class of allocsearch"
                (cls,) = defined[name]
            assert issubclass(cls, Exception), name
            # the command line prints these as one line with exit status 2
            assert issubclass(cls, cli._user_errors()), f"the CLI would show a traceback: {name}"
    missing = sorted(set(defined) - named)
    assert not missing, f"error classes of allocsearch missing from docs/errors.md: {missing}"


def test_every_catalogue_line_has_a_case():
    assert [s for s, _ in catalogue()] == list(CASES)


# ----------------------------------------------------------------------------- helpers


@dataclass
class Env:
    """What a case works with: the CLI's tiny model, its config and supernet (test_cli),
    a valid recipe of that model, and a fresh directory for the case's own files."""

    workdir: Path
    supernet: Path
    recipe: Recipe
    tmp: Path
    monkeypatch: pytest.MonkeyPatch

    def config(self, name: str = "config.yaml", **sections) -> Path:
        """A copy of the CLI config with ``sections`` merged in (dicts update a section)."""
        data = yaml.safe_load((self.workdir / "config.yaml").read_text())
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        path = self.tmp / name
        path.write_text(yaml.safe_dump(data))
        return path

    def model(self, name: str, edit: Callable[[Path], None]) -> Path:
        """A copy of the CLI model directory changed by ``edit(directory)``."""
        path = self.tmp / name
        shutil.copytree(self.workdir / "model", path)
        edit(path)
        return path

    def recipe_file(self, name: str, recipe: Recipe | None = None) -> Path:
        path = self.tmp / name
        (recipe or self.recipe).save(path)
        return path

    def recipe_json(self, name: str, edit: Callable[[dict], None]) -> Path:
        """The valid recipe's JSON changed by ``edit(data)``."""
        data = json.loads(self.recipe.to_json())
        edit(data)
        path = self.tmp / name
        path.write_text(json.dumps(data))
        return path


def entries(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (relative) -> its bytes, or None for a directory."""
    return {
        p.relative_to(root).as_posix(): None if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
    }


def expect(
    env: Env,
    args: tuple,
    error: str,
    *values: str,
    leftovers: frozenset[str] = frozenset(),
    one_line: bool = True,
) -> str:
    """Run the CLI; check exit status 2, one line ``error: <error>: ...`` naming every
    value, no traceback, and nothing (file or directory) written or changed under
    ``env.tmp`` (issue 16.8: not even an empty run directory).

    ``leftovers``: names the command is known to leave behind (a bug, see the report of
    issue #10); checked exactly, so this fails once they are gone, or if others appear.
    ``one_line=False``: a message known to span lines (test_invalid_yaml_error_is_one_line);
    the values must then be on its first line.
    """
    before = entries(env.tmp)
    r = run(*args)
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 or (lines and not one_line), r.stderr
    assert lines[0].startswith(f"error: {error}: "), lines[0]
    for value in values:
        assert value in lines[0], (value, lines[0])
    assert "Traceback" not in r.output
    after = entries(env.tmp)
    changed = {k for k in before if after.get(k, b"gone") != before[k]}
    assert not changed, f"changed or removed: {sorted(changed)}"
    new = after.keys() - before.keys()  # a failed command removes the run directory it made
    assert {Path(k).name for k in new} == set(leftovers), f"written: {sorted(new)}"
    return lines[0]


def _with_layer(recipe: Recipe, index: int, **changes) -> Recipe:
    """``recipe`` with one layer entry changed and the achieved budget recomputed."""
    layers = list(recipe.layers)
    layers[index] = dataclasses.replace(layers[index], **changes)
    kind = recipe.budget.kind
    achieved = fraction_removed(layers, kind)
    budget = RecipeBudget(kind, recipe.budget.target, achieved)
    return dataclasses.replace(recipe, layers=tuple(layers), budget=budget)


def _edit_tensors(path: Path, edit: Callable[[dict], None]) -> None:
    f = path / "model.safetensors"
    tensors = {k: np.array(v) for k, v in read_safetensors(f).items()}
    edit(tensors)
    write_safetensors(f, tensors)


# A search that fails before its first generation removes the log.jsonl and checkpoints/
# it created, so the same command can run again without --overwrite.
SEARCH_LEFTOVERS: frozenset[str] = frozenset()


# ----------------------------------------------------------------------------- cases


def config_errors(env: Env) -> None:
    # out of range (search.target = 1.7) through `build`: test_cli.py
    # test_user_errors_exit_2_without_traceback
    out = env.tmp / "store"
    for sections, error_value in (
        ({"serach": {}}, "['serach']"),
        ({"data": {"seq_len": "long"}}, "data.seq_len = 'long' must be an integer"),
        ({"search": {"min_sparsity": 0.8, "max_sparsity": 0.5}}, "min_sparsity = 0.8"),
    ):
        cfg = env.config(**sections)
        expect(env, ("build", "--config", cfg, "--out", out), "ConfigError", error_value)
    missing = env.tmp / "nope.yaml"
    expect(env, ("build", "--config", missing, "--out", out), "ConfigError", str(missing))
    bad = env.tmp / "bad.yaml"
    bad.write_text("search: [unclosed\n")
    args = ("build", "--config", bad, "--out", out)
    expect(env, args, "ConfigError", str(bad), "not valid YAML")


def _eval(env: Env, model: Path, config: Path | None = None) -> tuple:
    return ("eval", "--config", config or env.workdir / "config.yaml", "--model", model)


def model_dir_errors(env: Env) -> None:
    nope = env.tmp / "nope"
    expect(env, _eval(env, nope), "ModelLoadError", str(nope), "does not exist")
    no_config = env.model("no-config", lambda p: (p / "config.json").unlink())
    expect(env, _eval(env, no_config), "ModelLoadError", str(no_config), "config.json")
    no_weights = env.model("no-weights", lambda p: (p / "model.safetensors").unlink())
    expect(env, _eval(env, no_weights), "ModelLoadError", str(no_weights), "no model.safetensors")


def unknown_model_type(env: Env) -> None:
    def falcon(path: Path) -> None:
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, "model_type": "falcon"}))

    expect(env, _eval(env, env.model("falcon", falcon)), "ModelLoadError", "'falcon'", "llama")


def tensor_errors(env: Env) -> None:
    up = "model.layers.1.mlp.up_proj.weight"
    missing = env.model("missing", lambda p: _edit_tensors(p, lambda t: t.pop(up)))
    expect(env, _eval(env, missing), "ModelLoadError", f"'{up}' is missing", "(64, 32)")

    def extra(t):
        t["model.extra.weight"] = np.zeros(3, np.float32)

    unexpected = env.model("unexpected", lambda p: _edit_tensors(p, extra))
    expect(env, _eval(env, unexpected), "ModelLoadError", "model.extra.weight")

    def reshape(t):
        t["model.norm.weight"] = np.ones(33, np.float32)

    shaped = env.model("shape", lambda p: _edit_tensors(p, reshape))
    expect(env, _eval(env, shaped), "ModelLoadError", "'model.norm.weight'", "(33,)", "(32,)")


def nan_weights(env: Env) -> None:
    k = "model.layers.0.self_attn.k_proj.weight"

    def poison(t):
        t[k][1, 2] = np.nan

    expect(
        env,
        _eval(env, env.model("nan", lambda p: _edit_tensors(p, poison))),
        "ModelLoadError",
        f"'{k}' contains NaN",
    )


def bad_safetensors(env: Env) -> None:
    def truncate(path: Path) -> None:
        f = path / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])

    model = env.model("truncated", truncate)
    file = str(model / "model.safetensors")
    expect(env, _eval(env, model), "SafetensorsError", file, "truncated")

    def garble(path: Path) -> None:
        f = path / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[8:12] = b"\xff\xfe{["  # inside the JSON header
        f.write_bytes(bytes(data))

    model = env.model("garbled", garble)
    file = str(model / "model.safetensors")
    expect(env, _eval(env, model), "SafetensorsError", file, "header is not valid JSON")


def short_corpus(env: Env) -> None:
    cfg = env.config(data={"n_calibration_seqs": 5000})
    expect(
        env,
        _eval(env, env.workdir / "model", cfg),
        "ValueError",
        "5000 calibration sequences",
        "160128",
    )
    empty = env.tmp / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    cfg = env.config(data={"calibration": str(empty)})
    expect(env, _eval(env, env.workdir / "model", cfg), "ValueError", "has 0 tokens")


def missing_data_files(env: Env) -> None:
    model = env.workdir / "model"
    nope = env.tmp / "nope.txt"
    cfg = env.config(data={"calibration": str(nope)})
    expect(env, _eval(env, model, cfg), "FileNotFoundError", str(nope))
    pattern = str(env.tmp / "*.nothing")
    cfg = env.config(data={"calibration": pattern})
    expect(env, _eval(env, model, cfg), "FileNotFoundError", pattern)
    tokenizer = env.tmp / "tokenizer.json"
    cfg = env.config(data={"tokenizer": str(tokenizer)})
    expect(env, _eval(env, model, cfg), "FileNotFoundError", str(tokenizer))


def no_tokenizer(env: Env) -> None:
    config = {**json.loads((env.workdir / "model" / "config.json").read_text()), "vocab_size": 50}
    adapter = adapter_for_config(config)
    params = {k: np.full(s, 0.01, np.float32) for k, s in adapter.param_shapes.items()}
    model = save_model(HFModel(adapter, params), env.tmp / "vocab50")
    expect(env, _eval(env, model), "ValueError", str(model), "vocabulary of 50")


def jsonl_without_text(env: Env) -> None:
    jsonl = env.tmp / "docs.jsonl"
    jsonl.write_text(json.dumps({"text": "alpha beta"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    cfg = env.config(data={"calibration": str(jsonl)})
    expect(env, _eval(env, env.workdir / "model", cfg), "ValueError", f"{jsonl}:2", "'text'")


def _search(env: Env, config: Path, out: str, *extra) -> tuple:
    return (
        "search",
        "--config",
        config,
        "--supernet",
        env.supernet,
        "--out",
        env.tmp / out,
        "--no-progress",
        *extra,
    )


def bad_fidelity(env: Env) -> None:
    # 16 calibration sequences x 32 tokens: multiples of 32 from 32 to 512 are valid
    settings = {"generations": 2, "offspring": 4, "survivors": [2, 1]}
    for tokens, bad in (([50, 256], "n_tokens=50"), ([1024, 2048], "n_tokens=1024")):
        cfg = env.config(search={"settings": {**settings, "tokens": tokens}})
        expect(
            env,
            _search(env, cfg, f"run-{tokens[1]}"),
            "ValueError",
            bad,
            "multiples of seq_len=32 from 32 to 512",
            leftovers=SEARCH_LEFTOVERS,
        )


def level_not_whole(env: Env) -> None:
    # Not reachable from the command line: `build` makes its levels with supernet.levels,
    # which are exact by construction; the pruner refuses an inexact level.
    weight = np.ones((16, 24), np.float32)  # 384 weights: 0.3 would remove 115.2
    with pytest.raises(ValueError, match=r"sparsity 0\.3 is not achievable exactly with 384"):
        MagnitudePruner().prune(weight, None, np.array([0.0, 0.3]))


def nm_not_dividing(env: Env) -> None:
    cfg = env.config(supernet={"structure": "nm", "nm_patterns": ["2:3"]})
    out = env.tmp / "store"
    expect(env, ("build", "--config", cfg, "--out", out), "ValueError", "M=3", "[32, 32,")


def infeasible_budget(env: Env) -> None:
    cfg = env.workdir / "config.yaml"
    expect(
        env,
        _search(env, cfg, "run-target", "--target", "0.95"),
        "InfeasibleBudgetError",
        "target 0.95",
        "between 0.",
        leftovers=SEARCH_LEFTOVERS,
    )
    cfg = env.config(search={"min_sparsity": 0.9})
    expect(
        env,
        _search(env, cfg, "run-limits"),
        "InfeasibleBudgetError",
        "no level within their min/max sparsity",
        Q_PROJ,
        leftovers=SEARCH_LEFTOVERS,
    )


def no_depth_levels(env: Env) -> None:
    cfg = env.workdir / "config.yaml"  # the CLI's supernet: unstructured, no dropped level
    expect(
        env,
        _search(env, cfg, "run", "--budget", "sublayers", "--target", "2"),
        "ValueError",
        "has no dropped level",
        "--depth drop",
    )
    expect(
        env,
        _search(env, cfg, "run2", "--tie-blocks", "--target", "0.5"),
        "ValueError",
        "--tie-blocks",
        "depth 'drop' supernet",
        "--depth drop",
    )


def bad_settings(env: Env) -> None:
    cfg = env.config(search={"settings": {"generationz": 3}})
    expect(env, _search(env, cfg, "run"), "ValueError", "'evopress'", "'generationz'")
    # issue 16.4: settings given to another strategy: one line, not a TypeError; since
    # issue 28.4 EvoPress's own keys are dropped there (a note), unknown ones still refused
    cfg = env.config(search={"settings": {"generations": 3, "offspring": 4, "bogus": 1}})
    expect(
        env,
        _search(env, cfg, "run2", "--strategy", "random"),
        "ValueError",
        "strategy 'random': it does not take ['bogus']",
        "valid settings: ['spread']",
    )


def bad_latency_table(env: Env) -> None:
    table = env.tmp / "latency.json"
    table.write_text(json.dumps({"model.nope": {"levels": [1.0, 0.9, 0.8, 0.7, 0.6]}}))
    cfg = env.config(search={"budget_kind": "latency", "latency_table": str(table)})
    expect(env, _search(env, cfg, "run"), "ValueError", str(table), "unknown ['model.nope']")
    # issue 16.1: a malformed value is one line naming the file and unit, not a TypeError
    table.write_text(json.dumps({Q_PROJ: {"levels": [1.0, [0.9], 0.8]}}))
    expect(env, _search(env, cfg, "run2"), "ValueError", str(table), f"unit '{Q_PROJ}' level 1")


def _evopress_export(env: Env, recipe: Path, store: Path) -> tuple:
    out = env.tmp / "levels.txt"
    return ("export", recipe, "--format", "evopress", "--supernet", store, "--out", out)


def store_of_another_model(env: Env) -> None:
    # other calibration data, through `search`: test_cli.py
    # test_wrong_store_for_the_data_is_refused
    other = unstructured_recipe()
    ours = json.loads((env.supernet / MANIFEST_NAME).read_text())["model_fingerprint"]
    expect(
        env,
        _evopress_export(env, env.recipe_file("other.json", other), env.supernet),
        "StoreError",
        repr(other.model.fingerprint),
        repr(ours),
    )


def damaged_store(env: Env) -> None:
    recipe = env.recipe_file("recipe.json")
    store = env.tmp / "store"
    shutil.copytree(env.supernet, store)
    name = f"{Q_PROJ}.weight.safetensors"
    f = store / name
    data = f.read_bytes()
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, other bytes
    # digests are checked when a file is first read: apply reads the variants
    apply_from_store = _apply(env, recipe, "--supernet", store)
    expect(env, apply_from_store, "StoreError", "checksum mismatch", name)
    f.write_bytes(data[:-8])
    expect(env, _evopress_export(env, recipe, store), "StoreError", "bytes, the manifest", name)
    f.unlink()
    expect(env, _evopress_export(env, recipe, store), "StoreError", "is missing", name)


def _owl_export(env: Env, recipe: Path) -> tuple:
    return ("export", recipe, "--format", "owl", "--out", env.tmp / "owl.json")


def bad_recipe(env: Env) -> None:
    def version(d):
        d["schema_version"] = 3

    def unknown(d):
        d["colour"] = "blue"

    def sparsity(d):
        d["layers"][0]["sparsity"] = 1.5

    def budget(d):
        d["budget"]["achieved"] = 0.9

    for name, edit, values in (
        ("version", version, ("schema_version 3",)),
        ("unknown", unknown, ("['colour']",)),
        ("sparsity", sparsity, ("1.5",)),
        ("budget", budget, ("budget.achieved = 0.9",)),
    ):
        path = env.recipe_json(f"{name}.json", edit)
        expect(env, _owl_export(env, path), "RecipeError", str(path), *values)


def _apply(env: Env, recipe: Path, *extra) -> tuple:
    model, cfg = env.workdir / "model", env.workdir / "config.yaml"
    out = env.tmp / "pruned"
    return ("apply", recipe, "--model", model, "--config", cfg, "--out", out, *extra)


def recipe_of_another_model(env: Env) -> None:
    other = unstructured_recipe()
    path = env.recipe_file("other.json", other)
    expect(env, _apply(env, path), "RecipeError", repr(other.model.fingerprint))
    renamed = _with_layer(env.recipe, 0, name=Q_PROJ.replace("q_proj", "qq_proj"))
    path = env.recipe_file("renamed.json", renamed)
    expect(env, _apply(env, path), "RecipeError", "'model.layers.0.self_attn.qq_proj'")
    # issue 16.3: export checks the recipe against the model or supernet it is given
    out = env.tmp / "owl.json"
    model = env.workdir / "model"
    name = "'model.layers.0.self_attn.qq_proj'"
    owl = ("export", path, "--format", "owl", "--out", out)
    expect(env, (*owl, "--model", model), "RecipeError", name, "is not a layer of the model")
    expect(env, (*owl, "--supernet", env.supernet), "RecipeError", name)
    reshaped = _with_layer(env.recipe, 0, shape=(32, 48))
    path = env.recipe_file("reshaped.json", reshaped)
    expect(env, _apply(env, path), "RecipeError", f"'{Q_PROJ}'", "[32, 48]", "[32, 32]")


def sparsity_not_a_level(env: Env) -> None:
    entry = env.recipe.layers[0]
    off = (round(entry.sparsity * entry.numel) + 1) / entry.numel  # exact, one weight more
    path = env.recipe_file("off-level.json", _with_layer(env.recipe, 0, sparsity=off))
    expect(
        env,
        _apply(env, path, "--supernet", env.supernet),
        "RecipeError",
        repr(off),
        "not a level of the store",
    )


def export_cannot_express(env: Env) -> None:
    recipe = env.recipe_file("recipe.json")
    out = env.tmp / "tp.json"
    expect(
        env,
        ("export", recipe, "--format", "torch-pruning", "--out", out),
        "ExportError",
        "Torch-Pruning",
        "'unstructured'",
    )


def bad_option(env: Env) -> None:
    # --format 'onnx': test_cli.py test_user_errors_exit_2_without_traceback
    recipe = env.recipe_file("recipe.json")
    out = env.tmp / "levels.txt"
    expect(
        env,
        ("export", recipe, "--format", "evopress", "--out", out),
        "UserError",
        "--format evopress needs --supernet",
    )


def bad_sweep_targets(env: Env) -> None:
    # more forms: test_sweep.py test_parse_targets
    out = env.tmp / "sweep"
    args = ("sweep", "--targets", "0.4:x:0.05", "--out", out)
    expect(env, args, "ValueError", "'x' is not a number", "start:stop:step")
    expect(env, ("sweep", "--targets", "0.5,1.5", "--out", out), "ValueError", "1.5")


def output_exists(env: Env) -> None:
    # `search --out` onto a non-empty directory: test_cli.py
    # test_user_errors_exit_2_without_traceback
    recipe = env.recipe_file("recipe.json")
    taken = env.tmp / "taken.json"
    taken.write_bytes(b"mine")
    args = ("export", recipe, "--format", "owl", "--out", taken)
    expect(env, args, "FileExistsError", str(taken), "--overwrite")
    cfg = env.workdir / "config.yaml"
    taken_dir = env.tmp / "taken"
    taken_dir.mkdir()
    (taken_dir / "keep.txt").write_bytes(b"mine")
    args = ("build", "--config", cfg, "--out", taken_dir)
    expect(env, args, "FileExistsError", str(taken_dir), "--overwrite")
    expect(env, _apply(env, recipe)[:-2] + ("--out", taken_dir), "FileExistsError", str(taken_dir))


def resume_errors(env: Env) -> None:
    cfg = env.workdir / "config.yaml"
    gone = env.tmp / "gone"
    expect(env, _search(env, cfg, "gone", "--resume"), "FileNotFoundError", str(gone))
    (env.tmp / "empty").mkdir()
    checkpoints = env.tmp / "empty" / "checkpoints"
    args = _search(env, cfg, "empty", "--resume")
    expect(env, args, "FileNotFoundError", f"no complete checkpoint in {checkpoints}")

    # a checkpoint of another search (the tiny one of resume_worker.py) in the run directory
    searcher, spec, key = evo_searcher(1), tiny_spec(), jax.random.key(SEED)
    fingerprint = search_fingerprint(searcher=searcher, spec=spec, budget=BUDGET, key=key)
    checkpoints = env.tmp / "other" / "checkpoints"
    with SearchCheckpointer(checkpoints, fingerprint=fingerprint) as checkpointer:

        def save(state):
            checkpointer.save(state, searcher.result(state))

        run_search(searcher, AdditiveFactory()(), spec, BUDGET, key=key, on_generation=save)
    args = _search(env, cfg, "other", "--resume")
    expect(env, args, "CheckpointMismatchError", str(checkpoints), "different search", "spec")


def no_ray_actor(env: Env) -> None:
    # Starting real actors: test_ray_backend.py test_a_failing_factory_names_the_cause and
    # test_more_workers_than_cpus_is_refused_without_hanging (WorkerStartError),
    # test_actors_that_keep_dying_give_a_clear_error (WorkerFailedError). Here: what the
    # command line makes of such an error, without starting Ray.
    error = ray_backend.WorkerStartError(
        "no evaluator actor could be started: the factory raised RuntimeError('CUDA out of memory')"
    )
    expect(env, _search_on_failing_ray(env, error), "WorkerStartError", "CUDA out of memory")


def head_node_lost(env: Env) -> None:
    # The real loss on a two-raylet cluster: test_ray_cluster.py
    # test_head_node_loss_exits_2_naming_resume_then_resume_gives_the_recipe. Here: what
    # the command line makes of it, without starting Ray.
    error = ray_backend.HeadNodeLostError(
        "the Ray node of this driver (node 0123456789ab, the head node) was lost with "
        "its evaluator actors; the search stops here with its checkpoints kept: start "
        "Ray again and rerun the same command with --resume to continue"
    )
    expect(env, _search_on_failing_ray(env, error), "HeadNodeLostError", "--resume")


def _search_on_failing_ray(env: Env, error: Exception) -> tuple:
    """The arguments of a search on Ray whose evaluator actors raise ``error`` at start
    (``RayEvaluate`` replaced: no Ray is started)."""

    def failing(*args, **kwargs):
        raise error

    env.monkeypatch.setattr(ray_backend, "RayEvaluate", failing)
    return _search(env, env.config(backend={"kind": "ray", "workers": 1}), "run")


def does_not_fit(env: Env) -> None:
    # allocsearch.plan.check_run, before the model loads; sizes as if this were a machine
    # with 1 MB of memory
    env.monkeypatch.setenv("ALLOCSEARCH_DEVICE_MEMORY", "1MB")
    env.monkeypatch.setenv("ALLOCSEARCH_HOST_MEMORY", "1MB")
    args = _eval(env, env.workdir / "model")
    expect(env, args, "MemoryPlanError", "does not fit for `eval`", "0.9 MiB available")


def file_where_a_directory_is_needed(env: Env) -> None:
    """Issue 16: a path that exists as a file is said to be a file, not "does not exist"."""
    f = env.tmp / "a-file"
    f.write_text("mine")
    cfg = env.workdir / "config.yaml"
    expect(env, _eval(env, f), "ModelLoadError", str(f), "is a file, expected a directory")
    search = ("search", "--config", cfg, "--no-progress")
    expect(env, (*search, "--supernet", f, "--out", env.tmp / "run"), "StoreError", str(f),
           "is a file, expected a supernet store directory")  # fmt: skip
    expect(env, (*search, "--supernet", env.supernet, "--out", f), "NotADirectoryError",
           str(f), "is a file, expected a directory")  # fmt: skip
    recipe = env.recipe_file("recipe.json")
    args = ("export", recipe, "--format", "owl", "--out", f / "owl.json")
    expect(env, args, "NotADirectoryError", repr(str(f)), "is a file, expected a directory")


CASES: dict[str, Callable[[Env], None]] = {
    "config file missing or not YAML; config key unknown, wrong type, out of range, min above "
    "max": config_errors,
    "model directory missing, no config.json, no safetensors": model_dir_errors,
    "unknown `model_type`": unknown_model_type,
    "tensor missing / unexpected / wrong shape (named, with expected shape)": tensor_errors,
    "weights with NaN or Inf (tensor named)": nan_weights,
    "truncated or corrupt safetensors file": bad_safetensors,
    "corpus empty or too short (tokens found and needed)": short_corpus,
    "calibration / held-out source or tokenizer file missing, or no file matches the pattern "
    "(path named)": missing_data_files,
    "model without a tokenizer (no `tokenizer.json`, vocabulary not bytes)": no_tokenizer,
    "JSONL line without the text field (line named)": jsonl_without_text,
    "fidelity not a multiple of the sequence length / above the calibration set": bad_fidelity,
    "level sparsity that is not a whole number of weights": level_not_whole,
    "N:M group size that does not divide a layer's width": nm_not_dividing,
    "budget target outside what the supernet can reach, or a unit with no level inside "
    "`min_sparsity`..`max_sparsity`": infeasible_budget,
    "depth search on a supernet without it: `--budget sublayers` where no unit has a dropped "
    "level, `--tie-blocks` on a supernet that is not depth `drop`": no_depth_levels,
    "`sweep --targets` neither `start:stop:step` nor a comma list of fractions in (0, 1) (bad "
    "value named)": bad_sweep_targets,
    "`search.settings` a strategy does not take (key named)": bad_settings,
    "latency table that does not match the supernet (unit names missing / unknown, level "
    "counts) or cannot be parsed": bad_latency_table,
    "supernet store of another model or other calibration data (both fingerprints shown, "
    "and the path of the model it was built from)": store_of_another_model,
    "store file missing, truncated or with a bad checksum (file named)": damaged_store,
    "recipe with wrong schema version, unknown fields, bad sparsities, budget not reproduced": (
        bad_recipe
    ),
    "recipe for another model (fingerprint / layer names / shapes)": recipe_of_another_model,
    "recipe sparsity not a level of the given supernet": sparsity_not_a_level,
    "export format that cannot express the recipe (e.g. Torch-Pruning for unstructured)": (
        export_cannot_express
    ),
    "command-line option value not valid (`--format`, `--format evopress` without "
    "`--supernet`)": bad_option,
    "output path exists": output_exists,
    "path that is a file where a directory is needed (model, supernet store, output "
    "directory, or a directory above an output)": file_where_a_directory_is_needed,
    "`--resume` without a complete checkpoint, or of a different search": resume_errors,
    "run that does not fit this machine's memory (bytes needed and available in GiB, what "
    "would fit)": does_not_fit,
    "no Ray actor could start (factory error quoted) / actors keep dying": no_ray_actor,
    "the head node (the driver's own Ray node) was lost mid-search": head_node_lost,
}


# ----------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def cli_recipe(workdir, supernet) -> Recipe:  # noqa: F811 (fixtures from test_cli)
    """A valid recipe of the CLI's model: every unit at the supernet's centre level."""
    ws = pipeline.load_workspace(load_config(workdir / "config.yaml"))
    store = SupernetStore.open(supernet)
    budget = pipeline.make_budget(ws.config.search, store.spec)
    outcome = pipeline.Outcome("uniform", store.spec.center, None, 0, 0, 0.0, {})
    return pipeline.recipe_from_choice(ws, store, budget, outcome)


@pytest.fixture
def wide_console(monkeypatch):
    """The CLI's error console without line wrapping: rich wraps at 80 columns when stderr
    is not a terminal, which splits long messages (see test_long_error_stays_one_line)."""
    monkeypatch.setattr(cli.common, "console", Console(stderr=True, width=100_000))


@pytest.mark.parametrize("situation", list(CASES), ids=list(CASES))
def test_catalogue_line(
    situation,
    workdir,  # noqa: F811
    supernet,  # noqa: F811
    cli_recipe,
    wide_console,
    tmp_path,
    monkeypatch,
):
    CASES[situation](Env(workdir, supernet, cli_recipe, tmp_path, monkeypatch))


def test_long_error_stays_one_line(tmp_path):
    """docs/errors.md: an error prints one line, also when stderr is not a terminal."""
    deep = tmp_path / ("d" * 70) / ("e" * 70)
    recipe = deep / "recipe.json"
    r = run("export", recipe, "--format", "owl", "--out", tmp_path / "owl.json")
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and str(recipe) in r.stderr, r.stderr


def test_invalid_yaml_error_is_one_line(tmp_path, wide_console):
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: [unclosed\n")
    r = run("build", "--config", bad, "--out", tmp_path / "store")
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and "not valid YAML" in r.stderr, r.stderr


def test_error_message_is_printed_verbatim(workdir, tmp_path, wide_console):  # noqa: F811
    pattern = str(tmp_path / "[ab]*.txt")  # a glob character class, not a rich style
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["data"]["calibration"] = pattern
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    r = run("eval", "--config", cfg, "--model", workdir / "model")
    assert r.exit_code == 2
    assert f"no file matches the glob pattern {pattern!r}" in r.stderr, r.stderr
