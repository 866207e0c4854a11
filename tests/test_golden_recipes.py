"""Golden recipes of the demo: every strategy `compare` runs, on the demo supernet
(configs/demo.yaml), seed 0, in process, gives exactly the per-unit levels and per-layer
sparsities checked in under tests/golden/. Refactors keep them; a deliberate change of a
search lands as its own commit that regenerates them and says why:

    ALLOCSEARCH_UPDATE_GOLDEN=1 python -m pytest -n 0 tests/test_golden_recipes.py

The scored strategies run at reduced cost to keep the module near a minute of CPU: the
table strategies score their error table on 512 tokens (compare's default: all
calibration tokens up to 4,096) and EvoPress runs 4 of the demo's 30 generations
(otherwise the demo's settings), dp+evopress both. Týr is left out: it builds a supernet per round.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from allocsearch import pipeline
from allocsearch.config import load_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("ALLOCSEARCH_UPDATE_GOLDEN") == "1"

TABLE = {"tokens": 512}
EVOPRESS = {"generations": 4, "offspring": 12, "survivors": [3, 1], "tokens": [512, 2048]}
# strategy -> settings it runs with here (see the module docstring)
GOLDEN_SETTINGS: dict[str, dict] = {
    "uniform": {},
    "owl": {},
    "lamp": {},
    "erk": {},
    "global_magnitude": {},
    "random": {},
    "dp": TABLE,
    "knapsack": TABLE,
    "knapsack_lagrange": TABLE,
    "evopress": EVOPRESS,
    "dp+evopress": {**EVOPRESS, "table_tokens": 512},
}


@dataclasses.dataclass
class DemoRun:
    ws: pipeline.Workspace
    store: object
    budget: object
    evaluator: object


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> DemoRun:
    """The demo model and its supernet built as `allocsearch build --config
    configs/demo.yaml` builds it, with the in-process evaluator `compare --backend local`
    scores with."""
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    cfg = dataclasses.replace(cfg, backend=dataclasses.replace(cfg.backend, kind="local"))
    ws = pipeline.load_workspace(cfg)
    store = pipeline.build(ws, tmp_path_factory.mktemp("golden") / "supernet", progress=False)
    budget = pipeline.make_budget(cfg.search, store.spec)
    return DemoRun(ws, store, budget, pipeline.make_evaluator(ws, store))


def recipe_summary(run: DemoRun, outcome: pipeline.Outcome) -> dict:
    """What a golden file holds of an outcome: its levels per unit, the recipe's
    sparsity per layer, and (for reading, compared loosely) fitness and counts."""
    recipe = pipeline.recipe_from_choice(run.ws, run.store, run.budget, outcome)
    units = [u.name for u in run.store.spec.units]
    return {
        "strategy": outcome.strategy,
        "settings": outcome.settings,
        "seed": 0,
        "evaluations": outcome.evaluations,
        "tokens": outcome.tokens,
        "fitness": outcome.fitness,
        "achieved": recipe.budget.achieved,
        "levels": dict(zip(units, (int(c) for c in outcome.choice), strict=True)),
        "sparsity": {entry.name: entry.sparsity for entry in recipe.layers},
    }


def check_golden(name: str, got: dict) -> None:
    """Compare ``got`` with tests/golden/demo-<name>.json (or write it when updating)."""
    path = GOLDEN / f"demo-{name}.json"
    got = json.loads(json.dumps(got))  # the JSON round trip the file went through
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        return
    assert path.exists(), f"no golden file {path}; write it with ALLOCSEARCH_UPDATE_GOLDEN=1"
    want = json.loads(path.read_text())
    changed = {u: (want["levels"].get(u), lv) for u, lv in got["levels"].items()}
    changed = {u: v for u, v in changed.items() if v[0] != v[1]}
    assert not changed, f"{name}: levels changed (golden, now): {changed}"
    assert got["levels"] == want["levels"]
    assert got["sparsity"] == want["sparsity"]
    assert got["settings"] == want["settings"]
    assert (got["evaluations"], got["tokens"]) == (want["evaluations"], want["tokens"])
    if want["fitness"] is None:
        assert got["fitness"] is None
    else:
        np.testing.assert_allclose(got["fitness"], want["fitness"], rtol=1e-4)
    np.testing.assert_allclose(got["achieved"], want["achieved"], rtol=1e-9)


@pytest.mark.parametrize("strategy", list(GOLDEN_SETTINGS))
def test_golden_recipe(demo_run: DemoRun, strategy: str) -> None:
    outcome = pipeline.run_strategy(
        strategy,
        demo_run.ws,
        demo_run.store,
        demo_run.budget,
        evaluate=demo_run.evaluator,
        seed=0,
        settings=GOLDEN_SETTINGS[strategy],
        progress=False,
    )
    check_golden(strategy, recipe_summary(demo_run, outcome))


def test_golden_files_cover_the_strategies() -> None:
    """Every golden file belongs to a strategy this module runs (none is left stale)."""
    names = {p.name.removeprefix("demo-").removesuffix(".json") for p in GOLDEN.glob("demo-*")}
    assert names <= set(GOLDEN_SETTINGS), sorted(names - set(GOLDEN_SETTINGS))
