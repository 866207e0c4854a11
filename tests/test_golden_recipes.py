"""Golden recipes of the demo: every strategy `compare` runs, on the demo supernet
(configs/demo.yaml), seed 0, in process, gives exactly the per-unit levels and per-layer
sparsities checked in under tests/golden/. Refactors keep them; a deliberate change of a
search lands as its own commit that regenerates them and says why:

    ALLOCSEARCH_UPDATE_GOLDEN=1 python -m pytest -n 0 tests/test_golden_recipes.py

The scored strategies run at reduced cost to keep the module near a minute of CPU: the
table strategies score their error table on 512 tokens (compare's default: all
calibration tokens up to 4,096) and EvoPress runs 4 of the demo's 30 generations
(otherwise the demo's settings), dp+evopress both. Týr is left out: it builds a supernet per round.

Floating point differs between machines and package builds (another CPU's XLA code, another
BLAS under the pruners): the same seed then gives variants and scores that differ in the
fourth digit, and a search that compares near-equal candidates can take another path.
tests/golden/demo-numerics.json records the numerics the golden files were written with
(the supernet's variant digests and one fixed candidate's KL on every calibration token).
Where they match, every strategy must give exactly the golden levels; where they do not,
the strategies that score nothing (the allocators) must still match exactly and the
scored ones must meet the budget with fitness within 2% of golden, and the test says which
numerics differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
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
# strategies whose levels depend on scores (the others allocate from weights and statistics)
SCORED = {"dp", "knapsack", "knapsack_lagrange", "evopress", "dp+evopress"}
NUMERICS = GOLDEN / "demo-numerics.json"
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
    numerics_match: bool = True


def numerics(run: DemoRun) -> dict:
    """What the golden files' numbers depend on: a digest of the supernet's variant file
    digests, and the KL of every unit at its middle level on all calibration tokens."""
    files = run.store.manifest["variants"]
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(files):
        digest.update(f"{name}={files[name]['blake2b']};".encode())
    middle = (np.asarray(run.store.spec.num_levels) // 2).astype(np.int32)[None]
    kl = float(run.evaluator(middle, fidelity=run.ws.calibration.n_tokens, batch_seed=0)[0])
    return {"variants_blake2b": digest.hexdigest(), "middle_level_kl": kl}


def numerics_match(got: dict) -> bool:
    """Whether ``got`` equals the recorded numerics (written when updating)."""
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        NUMERICS.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        return True
    want = json.loads(NUMERICS.read_text())
    same_kl = (
        abs(got["middle_level_kl"] - want["middle_level_kl"]) <= 1e-6 * want["middle_level_kl"]
    )
    if got["variants_blake2b"] == want["variants_blake2b"] and same_kl:
        return True
    warnings.warn(
        f"this machine's numerics differ from the golden files' ({NUMERICS.name}: variants "
        f"{'equal' if got['variants_blake2b'] == want['variants_blake2b'] else 'differ'}, "
        f"middle-level KL {got['middle_level_kl']!r} vs {want['middle_level_kl']!r}): scored "
        "strategies are checked by budget and fitness (2%), not by levels",
        stacklevel=2,
    )
    return False


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
    run = DemoRun(ws, store, budget, pipeline.make_evaluator(ws, store))
    run.numerics_match = numerics_match(numerics(run))
    return run


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


def check_golden(name: str, got: dict, *, exact: bool = True) -> None:
    """Compare ``got`` with tests/golden/demo-<name>.json (or write it when updating);
    ``exact=False`` (a scored strategy on other numerics): the budget is met and the
    fitness is within 2% of golden instead of equal levels."""
    path = GOLDEN / f"demo-{name}.json"
    got = json.loads(json.dumps(got))  # the JSON round trip the file went through
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        return
    assert path.exists(), f"no golden file {path}; write it with ALLOCSEARCH_UPDATE_GOLDEN=1"
    want = json.loads(path.read_text())
    if not exact:
        assert got["settings"] == want["settings"]
        assert (got["evaluations"], got["tokens"]) == (want["evaluations"], want["tokens"])
        np.testing.assert_allclose(got["fitness"], want["fitness"], rtol=0.02)
        np.testing.assert_allclose(got["achieved"], want["achieved"], rtol=0.01)
        return
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
    exact = demo_run.numerics_match or strategy not in SCORED
    check_golden(strategy, recipe_summary(demo_run, outcome), exact=exact)


def test_golden_files_cover_the_strategies() -> None:
    """Every golden file belongs to a strategy this module runs (none is left stale)."""
    names = {p.name.removeprefix("demo-").removesuffix(".json") for p in GOLDEN.glob("demo-*")}
    names.discard("numerics")
    assert names <= set(GOLDEN_SETTINGS), sorted(names - set(GOLDEN_SETTINGS))
