"""Týr coarse-to-fine driver: step schedule, centred grids (hand-computed), convergence to
the analytic optimum of a separable objective, brute-force optimality of every round,
feasible re-centred starts, resume at a round boundary, and one real tiny-Llama run."""

from __future__ import annotations

import functools
import itertools
import pickle

import jax
import numpy as np
import pytest
from tiny_workspace import TINY_LLAMA, quiet_build

from allocsearch.search.budget import Budget, CostModel, snap_to_levels
from allocsearch.search.coarse_to_fine import (
    TYR_INITIAL_STEP,
    TYR_MIN_STEP,
    TYR_ROUNDS,
    CoarseToFineState,
    centred_grid,
    coarse_to_fine,
    step_schedule,
)
from allocsearch.search.evolutionary import EvolutionarySearcher
from allocsearch.supernet.levels import round_count
from allocsearch.supernet.spec import SupernetSpec, Unit

# ------------------------------------------------------------------ synthetic problem
# Two roles of four units each; units of one role have equal sizes, so level steps of one
# role cost the same and same-role swaps keep each role's removed weights exactly.
ROLES = ("attn",) * 4 + ("mlp",) * 4
NUMEL = np.array([1200] * 4 + [3200] * 4)
# Objective f(s) = sum_l a_l s_l^2 (lower is better) with a_l = 1 / W_l.
W = np.array([0.47, 0.86, 1.21, 1.46, 0.58, 0.93, 1.07, 1.42])  # mean 1 within each role
A = 1.0 / W
TARGET = 0.5  # TARGET * numel is a whole number of weights for every unit
UNITS = tuple(
    Unit(f"model.layers.{i}.{r}", r, i, (f"model.layers.{i}.{r}",), int(n), int(n))
    for i, (r, n) in enumerate(zip(ROLES, NUMEL, strict=True))
)
BUDGET = Budget(kind="params", target=TARGET)


def role_optimum() -> np.ndarray:
    """float64[L]: argmin sum a_l s_l^2 s.t. sum_{l in role} n_l s_l = TARGET * n_role.

    Same-role swaps keep each role's total fixed at the uniform start's, so this is the
    optimum the driver can reach. Lagrange, with equal n_l within a role:
    2 a_l s_l = lambda_role  =>  s_l = TARGET * W_l / mean_role(W) = TARGET * W_l.
    """
    s = np.empty(len(W))
    for role in set(ROLES):
        m = np.array(ROLES) == role
        s[m] = TARGET * W[m] / W[m].mean()
    return s


def objective(s: np.ndarray) -> np.ndarray:
    return (A * np.asarray(s) ** 2).sum(axis=-1)


def synthetic_rebuild(calls: list | None = None, *, shift_weights: int = 0):
    """A rebuild whose supernet is :func:`centred_grid` around the centres and whose
    evaluate is the objective of the spec's sparsities. ``shift_weights`` moves every
    centre from round 2 on that many weights denser (a rebuild that rounds badly)."""

    def rebuild(centers: np.ndarray, step: float):
        if calls is not None:
            calls.append((centers.copy(), step))
        if shift_weights and len(calls or ()) > 1:
            centers = centers - shift_weights / NUMEL
        grid = centred_grid(UNITS, centers, step)
        spec = SupernetSpec(UNITS, grid.sparsity, grid.valid, grid.center)

        def evaluate(choices: np.ndarray, *, fidelity: int, batch_seed: int) -> np.ndarray:
            return objective(spec.sparsities_of(choices))

        return spec, evaluate

    return rebuild


def searcher(generations: int = 20) -> EvolutionarySearcher:
    # Fidelity is irrelevant for a noise-free objective.
    return EvolutionarySearcher(
        generations=generations, offspring=16, survivors=(4, 2, 1), tokens=(1, 1, 1)
    )


@functools.cache
def synthetic_run(seed: int = 0, rounds: int = TYR_ROUNDS):
    calls: list = []
    states: list[bytes] = []
    result = coarse_to_fine(
        rebuild=synthetic_rebuild(calls),
        inner=searcher(),
        units=UNITS,
        budget=BUDGET,
        key=jax.random.key(seed),
        rounds=rounds,
        on_round=lambda st: states.append(pickle.dumps(st)),
    )
    return result, calls, states


def spec_of(rec) -> SupernetSpec:
    grid = centred_grid(UNITS, rec.centers, rec.step)
    return SupernetSpec(UNITS, grid.sparsity, grid.valid, grid.center)


def brute_force_round_optimum(spec: SupernetSpec, start: np.ndarray) -> float:
    """Least objective over the round's grid among allocations that keep each role's
    removed weights equal to the start's (what same-role swaps can reach): exhaustive
    over 9^4 level vectors per role (the objective and constraint separate by role)."""
    removed = spec.sparsity * NUMEL[:, None]
    total = 0.0
    for role in sorted(set(ROLES)):
        idx = np.flatnonzero(np.array(ROLES) == role)
        ks = [np.flatnonzero(spec.valid[l]) for l in idx]
        combos = np.array(list(itertools.product(*ks)))  # [n, 4]
        rem = removed[idx[None, :], combos].sum(axis=1)
        want = removed[idx, start[idx]].sum()
        ok = np.isclose(rem, want, rtol=0, atol=1e-6)
        vals = (A[idx] * spec.sparsity[idx[None, :], combos] ** 2).sum(axis=1)
        total += float(vals[ok].min())
    return total


# ------------------------------------------------------------------ schedule and grid


def test_step_schedule_halves_and_stops_at_min_step() -> None:
    assert step_schedule(
        initial_step=TYR_INITIAL_STEP, min_step=TYR_MIN_STEP, rounds=TYR_ROUNDS
    ) == (0.125, 0.0625, 0.03125, 0.015625)
    assert step_schedule(initial_step=0.125, min_step=0.05, rounds=5) == (
        0.125,
        0.0625,
        0.05,
        0.05,
        0.05,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"initial_step": 0.1, "min_step": 0.01, "rounds": 0}, "rounds"),
        ({"initial_step": 0.0, "min_step": 0.01, "rounds": 2}, "initial_step"),
        ({"initial_step": 1.5, "min_step": 0.01, "rounds": 2}, "initial_step"),
        ({"initial_step": 0.1, "min_step": 0.2, "rounds": 2}, "min_step"),
        ({"initial_step": 0.1, "min_step": 0.0, "rounds": 2}, "min_step"),
    ],
)
def test_step_schedule_validates(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        step_schedule(**kwargs)


def _unit(name: str, role: str, numel: int) -> Unit:
    return Unit(name, role, 0, (name,), numel, numel)


def test_centred_grid_in_weights_hand_computed() -> None:
    units = (_unit("a", "q", 100), _unit("b", "k", 40))
    # Steps: round(0.1 * 100) = 10 and round(0.1 * 40) = 4 weights; centres 50 and 10.
    g = centred_grid(units, [0.5, 0.25], 0.1, steps_each_side=2)
    np.testing.assert_array_equal(g.sparsity[0], np.array([30, 40, 50, 60, 70]) / 100)
    np.testing.assert_array_equal(g.sparsity[1], np.array([2, 6, 10, 14, 18]) / 40)
    np.testing.assert_array_equal(g.center, [2, 2])
    assert g.valid.all() and g.labels is None
    # A bound drops levels; a floor on the step widens it; the centre stays a level.
    g = centred_grid(
        units, [0.5, 0.25], 0.1, steps_each_side=2, max_sparsity=0.65, min_items=[1, 12]
    )
    np.testing.assert_array_equal(g.sparsity[0, :4], np.array([30, 40, 50, 60]) / 100)
    # Unit b: 10 +- 12 j weights; -2 is below 0 and 34 / 40 = 0.85 above the bound.
    np.testing.assert_array_equal(g.sparsity[1, :2], np.array([10, 22]) / 40)
    np.testing.assert_array_equal(g.valid.sum(axis=1), [4, 2])
    np.testing.assert_array_equal(g.center, [2, 0])
    # A centre between whole weights rounds half up: 0.4875 * 40 = 19.5 -> 20.
    assert centred_grid(units, [0.5, 0.4875], 0.1).sparsity[1, 4] == 20 / 40


def test_centred_grid_in_groups_hand_computed() -> None:
    units = (
        _unit("model.layers.0.self_attn", "attn", 640),
        _unit("model.layers.0.mlp", "mlp", 6144),
    )
    # 8 kv groups: step round(0.125 * 8) = 1 group, levels 0..8 around 4. 64 neurons:
    # step round(0.125 * 64) = 8, raised to the 32-neuron floor: 0, 32, 64 around 32.
    g = centred_grid(
        units, [0.5, 0.5], 0.125, groups=[8, 64], min_items=[1, 32], group_name="units"
    )
    np.testing.assert_array_equal(g.sparsity[0], np.arange(9) / 8)
    np.testing.assert_array_equal(g.sparsity[1, :3], [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(g.valid.sum(axis=1), [9, 3])
    np.testing.assert_array_equal(g.center, [4, 1])
    assert g.labels is not None and g.labels[1] == ("64 units", "32 units", "0 units")


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (([0.5], 0.1), {}, "centers"),
        (([0.5, 1.5], 0.1), {}, "centers"),
        (([0.5, 0.5], 0.0), {}, "step"),
        (([0.5, 0.5], 0.1), {"groups": [8]}, "groups"),
        (([0.5, 0.5], 0.1), {"min_items": 0}, "min_items"),
        (([0.5, 0.5], 0.1), {"min_sparsity": 0.6}, "center level"),
    ],
)
def test_centred_grid_validates(args: tuple, kwargs: dict, match: str) -> None:
    units = (_unit("a", "q", 100), _unit("b", "k", 40))
    with pytest.raises(ValueError, match=match):
        centred_grid(units, *args, **kwargs)


# ------------------------------------------------------------------ synthetic driver


def test_converges_to_the_analytic_optimum() -> None:
    """Error bound. On round r's grid (per-role step h in sparsity, equal for the units of
    a role), a best allocation that no same-role swap improves satisfies, for units l, m
    of a role, a_l (2 s_l + h) >= a_m (2 s_m - h); so some mu has
    |s_l - mu W_l / 2| <= h / 2 for all l. Both s and the optimum s* = lambda W / 2 sum to
    the role's budget, which bounds |mu - lambda| / 2 by h / (2 mean_role W), hence
        |s_l - s*_l| <= h / 2 * (1 + W_l / mean_role(W)).
    (The +-4 step window holds that point: the previous round's error bound, at twice
    the step, keeps s* within 4 steps of every centre.)"""
    result, _, _ = synthetic_run()
    s_star = role_optimum()
    errors = []
    for rec in result.rounds:
        h = round_count(rec.step, NUMEL) / NUMEL
        err = np.abs(rec.best_sparsity - s_star)
        assert np.all(err <= h / 2 * (1 + W) + 1e-12), (rec.round, err, h)
        errors.append(err.max())
    assert errors[-1] < errors[0] / 4, errors
    assert errors[-1] < 0.01
    # The objective gap to the continuous optimum shrinks with the step too: with the
    # role budgets exact, f(s) - f(s*) = sum a_l (s_l - s*_l)^2.
    gaps = [objective(rec.best_sparsity) - objective(s_star) for rec in result.rounds]
    assert all(g >= -1e-12 for g in gaps) and gaps[-1] < gaps[0] / 10, gaps
    last = result.rounds[-1].best_sparsity - s_star
    assert np.isclose(gaps[-1], float((A * last**2).sum()), rtol=1e-9)


def test_every_round_finds_its_grid_optimum_by_brute_force() -> None:
    result, _, _ = synthetic_run()
    for rec in result.rounds:
        spec = spec_of(rec)
        assert rec.best_fitness == pytest.approx(
            brute_force_round_optimum(spec, rec.start), rel=1e-12
        )
    fitness = [rec.best_fitness for rec in result.rounds]
    assert all(b <= a + 1e-15 for a, b in zip(fitness, fitness[1:], strict=False)), fitness


def test_rounds_recentre_halve_the_step_and_start_feasible() -> None:
    result, calls, _ = synthetic_run()
    assert [step for _, step in calls] == [0.125, 0.0625, 0.03125, 0.015625]
    assert [rec.step for rec in result.rounds] == [0.125, 0.0625, 0.03125, 0.015625]
    np.testing.assert_array_equal(calls[0][0], np.full(len(UNITS), TARGET))
    prev = None
    for rec, (centers, _) in zip(result.rounds, calls, strict=True):
        spec = spec_of(rec)
        cm = CostModel.from_spec(spec, BUDGET)
        assert bool(cm.is_feasible(rec.start)) and bool(cm.is_feasible(rec.best_choice))
        assert not rec.start_snapped
        np.testing.assert_array_equal(rec.start, spec.center)
        np.testing.assert_array_equal(rec.centers, centers)
        if prev is not None:
            # Re-centred on the previous best, at exactly its cost (both use the budget).
            np.testing.assert_array_equal(rec.centers, prev.best_sparsity)
            kept = float(cm.total_cost(rec.start))
            prev_kept = float(((1 - prev.best_sparsity) * NUMEL).sum())
            assert kept == pytest.approx(prev_kept, rel=1e-12)
        assert rec.achieved == pytest.approx(TARGET, abs=1e-12)
        prev = rec
    assert result.evaluations == sum(rec.evaluations for rec in result.rounds) > 0
    assert result.tokens == sum(rec.tokens for rec in result.rounds)
    np.testing.assert_array_equal(result.best_sparsity, result.rounds[-1].best_sparsity)
    np.testing.assert_array_equal(
        result.best_sparsity, spec_of(result.rounds[-1]).sparsities_of(result.best_choice)
    )


def test_same_seed_same_result() -> None:
    first, _, _ = synthetic_run()
    again = coarse_to_fine(
        rebuild=synthetic_rebuild(),
        inner=searcher(),
        units=UNITS,
        budget=BUDGET,
        key=jax.random.key(0),
    )
    np.testing.assert_array_equal(first.best_choice, again.best_choice)
    assert first.best_fitness == again.best_fitness
    assert first.evaluations == again.evaluations
    for a, b in zip(first.rounds, again.rounds, strict=True):
        np.testing.assert_array_equal(a.best_choice, b.best_choice)


def test_resume_at_a_round_boundary_matches_the_uninterrupted_run() -> None:
    full, _, states = synthetic_run()
    assert len(states) == TYR_ROUNDS
    saved = pickle.loads(states[1])
    assert isinstance(saved, CoarseToFineState) and saved.rounds_done == 2
    calls: list = []
    resumed = coarse_to_fine(
        rebuild=synthetic_rebuild(calls),
        inner=searcher(),
        units=UNITS,
        budget=BUDGET,
        key=jax.random.key(0),
        state=saved,
    )
    assert [step for _, step in calls] == [0.03125, 0.015625]
    np.testing.assert_array_equal(calls[0][0], full.rounds[1].best_sparsity)
    np.testing.assert_array_equal(resumed.best_choice, full.best_choice)
    assert resumed.best_fitness == full.best_fitness
    assert (resumed.evaluations, resumed.tokens) == (full.evaluations, full.tokens)
    # A finished state gives its result without rebuilding.
    done = coarse_to_fine(
        rebuild=lambda c, s: pytest.fail("no rebuild expected"),
        inner=searcher(),
        units=UNITS,
        budget=BUDGET,
        key=jax.random.key(0),
        state=pickle.loads(states[-1]),
    )
    np.testing.assert_array_equal(done.best_choice, full.best_choice)


def test_infeasible_centre_vector_is_snapped_and_recorded() -> None:
    """A rebuild that centres every unit one weight denser than asked makes the centre
    vector cost 8 weights over the capacity; the driver starts from snap_to_levels."""
    calls: list = []
    result = coarse_to_fine(
        rebuild=synthetic_rebuild(calls, shift_weights=1),
        inner=searcher(5),
        units=UNITS,
        budget=BUDGET,
        key=jax.random.key(1),
        rounds=2,
    )
    first, second = result.rounds
    assert not first.start_snapped and second.start_snapped
    spec = spec_of(second)
    cm = CostModel.from_spec(spec, BUDGET)
    assert not bool(cm.is_feasible(spec.center))
    assert bool(cm.is_feasible(second.start)) and bool(cm.is_feasible(second.best_choice))
    np.testing.assert_array_equal(second.start, snap_to_levels(spec, BUDGET, calls[1][0]))


def test_same_role_is_applied_to_the_inner_searcher() -> None:
    """With same_role=False the two roles trade weights, which they never do with True."""
    # All units 1200 weights, so steps of the two roles cost the same and may be swapped.
    mixed_units = tuple(Unit(u.name, u.role, u.block, u.layers, 1200, 1200) for u in UNITS)

    def rebuild(centers, step):
        g = centred_grid(mixed_units, centers, step)
        spec = SupernetSpec(mixed_units, g.sparsity, g.valid, g.center)
        return spec, lambda ch, **_: objective(spec.sparsities_of(ch) * [1, 1, 1, 1, 3, 3, 3, 3])

    attn = np.array(ROLES) == "attn"
    for same_role in (True, False):
        res = coarse_to_fine(
            rebuild=rebuild,
            inner=searcher(10),
            units=mixed_units,
            budget=BUDGET,
            key=jax.random.key(2),
            rounds=1,
            same_role=same_role,
        )
        role_mean = res.best_sparsity[attn].mean()
        if same_role:
            assert role_mean == pytest.approx(TARGET, abs=1e-12)
        else:  # mlp sparsity costs 9x more: attn takes more of the budget
            assert role_mean > TARGET + 0.1


def test_bad_rebuild_and_state_are_refused() -> None:
    def wrong_units(centers, step):
        units = UNITS[:-1]
        g = centred_grid(units, centers[:-1], step)
        return SupernetSpec(units, g.sparsity, g.valid, g.center), None

    with pytest.raises(ValueError, match="expected the 8 units"):
        coarse_to_fine(
            rebuild=wrong_units,
            inner=searcher(),
            units=UNITS,
            budget=BUDGET,
            key=jax.random.key(0),
        )
    with pytest.raises(ValueError, match="inner must be a Searcher"):
        coarse_to_fine(
            rebuild=synthetic_rebuild(),
            inner=object(),  # type: ignore[arg-type]
            units=UNITS,
            budget=BUDGET,
            key=jax.random.key(0),
        )
    bad = CoarseToFineState(rounds_done=1, centers=np.full(len(UNITS), 0.5), records=())
    with pytest.raises(ValueError, match="rounds done"):
        coarse_to_fine(
            rebuild=synthetic_rebuild(),
            inner=searcher(),
            units=UNITS,
            budget=BUDGET,
            key=jax.random.key(0),
            state=bad,
        )


# ------------------------------------------------------------------ real tiny model

LLAMA = {**TINY_LLAMA, "vocab_size": 50, "hidden_size": 16}


@pytest.mark.slow
@pytest.mark.parametrize("structure", ["unstructured", "heads_neurons"])
def test_real_tiny_llama_two_rounds(structure: str, tmp_path) -> None:
    evaluate_mod = pytest.importorskip(
        "allocsearch.evaluate.evaluator", reason="the JAX Evaluator is not importable yet"
    )
    from allocsearch.data.tokenset import TokenSet
    from allocsearch.evaluate.metrics import KLDivergence
    from allocsearch.models import HFModel, adapter_for_config
    from allocsearch.models.hf import fingerprint_tensors
    from allocsearch.pruners import MagnitudePruner, StructuredPruner
    from allocsearch.pruners.structured import MIN_HEAD_STEP
    from allocsearch.supernet.build import supernet_units, unit_group_counts

    adapter = adapter_for_config(LLAMA)
    params = adapter.init_params(jax.random.key(0))
    fp = fingerprint_tensors(LLAMA, {k: np.asarray(v) for k, v in params.items()})
    model = HFModel(adapter, params, fingerprint=fp)
    tokens = np.random.default_rng(1).integers(0, 50, size=(8, 16)).astype(np.int32)
    calib = TokenSet(tokens=tokens, source="random ids", tokenizer_identity="test-ids", seed=1)
    units = supernet_units(adapter, structure)
    if structure == "unstructured":
        pruner, groups, min_items = MagnitudePruner(), None, 1
    else:  # 2 kv groups and 64 neurons per block; 8-neuron floor for this tiny MLP
        pruner = functools.partial(StructuredPruner, round_size=8)
        groups = unit_group_counts(adapter, structure)
        min_items = np.array([MIN_HEAD_STEP if u.role == "attn" else 8 for u in units])
    budget = Budget(kind="params", target=0.5)
    built: list = []

    def rebuild(centers: np.ndarray, step: float):
        grid = centred_grid(units, centers, step, groups=groups, min_items=min_items)
        store = quiet_build(
            model,
            calib,
            tmp_path / f"round{len(built) + 1}",
            pruner=pruner,
            grid=grid,
            structure=structure,
            input_mode="expected",
        )
        built.append(store.spec)
        evaluator = evaluate_mod.Evaluator(
            model,
            store.spec,
            store.all_variants(),
            store.unit_params,
            calib,
            metric=KLDivergence(),
        )
        return store.spec, evaluator

    inner = EvolutionarySearcher(generations=3, offspring=4, survivors=(2, 1), tokens=(32, 64))
    result = coarse_to_fine(
        rebuild=rebuild,
        inner=inner,
        units=units,
        budget=budget,
        key=jax.random.key(3),
        rounds=2,
    )
    assert len(built) == 2 and [r.step for r in result.rounds] == [0.125, 0.0625]
    first, second = result.rounds
    np.testing.assert_array_equal(second.centers, first.best_sparsity)
    np.testing.assert_array_equal(built[1].sparsities_of(built[1].center), first.best_sparsity)
    for spec, rec in zip(built, result.rounds, strict=True):
        cm = CostModel.from_spec(spec, budget)
        assert bool(cm.is_feasible(rec.start)) and bool(cm.is_feasible(rec.best_choice))
        assert rec.achieved >= 0.5 - 1e-9 and np.isfinite(rec.best_fitness)
    assert not second.start_snapped
    assert result.evaluations == first.evaluations + second.evaluations > 0
    assert np.isfinite(result.best_fitness) and result.best_fitness >= 0.0
