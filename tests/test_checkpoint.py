"""Checkpoints (orbax), resume after kill -9, fingerprints, and the progress callbacks."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from resume_worker import (
    BUDGET,
    SEED,
    AdditiveFactory,
    evo_searcher,
    result_json,
    tiny_spec,
)

from allocsearch.distributed.checkpoint import (
    CheckpointMismatchError,
    SearchCheckpointer,
    complete_generations,
    latest_checkpoint,
    latest_state,
    search_fingerprint,
)
from allocsearch.distributed.local import run_search
from allocsearch.distributed.progress import make_callbacks, read_log
from allocsearch.search.dp import TableSearcher, dp_solve
from allocsearch.search.knapsack import mckp_milp

WORKER = Path(__file__).with_name("resume_worker.py")
GENERATIONS = 8
# One generation of evo_searcher(): 6 offspring on 64 tokens, then parent + 3 on 256.
EVALS_PER_GENERATION = 6 + 4
TOKENS_PER_GENERATION = 6 * 64 + 4 * 256


def _fingerprint(searcher=None, key=None, spec=None):
    return search_fingerprint(
        searcher=searcher or evo_searcher(GENERATIONS),
        spec=spec or tiny_spec(),
        budget=BUDGET,
        key=jax.random.key(SEED) if key is None else key,
    )


def _run(
    directory: Path | None,
    *,
    generations: int = GENERATIONS,
    max_to_keep: int = 3,
    log_path: Path | None = None,
    stop_after: int | None = None,
):
    """Run the tiny search in process, optionally checkpointing into ``directory``.

    ``stop_after``: interrupt the run (exception) once that generation is checkpointed.
    """
    searcher, spec, key = evo_searcher(generations), tiny_spec(), jax.random.key(SEED)
    evaluate = AdditiveFactory()()
    if directory is None:
        return run_search(searcher, evaluate, spec, BUDGET, key=key)
    fingerprint = search_fingerprint(searcher=searcher, spec=spec, budget=BUDGET, key=key)
    start = latest_state(directory, fingerprint=fingerprint)
    with (
        SearchCheckpointer(directory, fingerprint=fingerprint, max_to_keep=max_to_keep) as ckpt,
        make_callbacks(
            searcher, log_path=log_path, checkpointer=ckpt, progress=False, start_state=start
        ) as callbacks,
    ):

        def on_generation(state):
            callbacks(state)
            if state.generation == stop_after:
                raise _Interrupted

        try:
            return run_search(
                searcher, evaluate, spec, BUDGET, key=key, on_generation=on_generation, state=start
            )
        except _Interrupted:
            return None


class _Interrupted(Exception):
    """Stops a search in the middle, as a crash would."""


@pytest.fixture(scope="module")
def reference() -> dict:
    """The uninterrupted result of the tiny search, as exact JSON."""
    return result_json(_run(None))


def _worker(tmp: Path, out: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(WORKER), "--checkpoint-dir", str(tmp / "ckpt")]
    cmd += ["--log", str(tmp / "log.jsonl"), "--out", str(tmp / out), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> None:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]


# ---- checkpoint contents ---------------------------------------------------------------


def test_checkpoints_hold_state_key_summary_and_keep_the_last_few(tmp_path, reference):
    result = _run(tmp_path, generations=5, max_to_keep=2)
    assert complete_generations(tmp_path) == [4, 5]
    saved = latest_checkpoint(tmp_path, fingerprint=None)
    assert saved.generation == 5 == saved.state.generation
    assert saved.state.step == 10
    np.testing.assert_array_equal(saved.key_data, jax.random.key_data(jax.random.key(SEED)))
    np.testing.assert_array_equal(saved.state.parent, result.best_choice)
    s = saved.summary
    assert s["evaluations"] == 5 * EVALS_PER_GENERATION == result.evaluations
    assert s["tokens"] == 5 * TOKENS_PER_GENERATION == result.tokens
    assert s["best_fitness"] == result.best_fitness
    assert s["best_choice"] == result.best_choice.tolist()
    assert [h[0] for h in s["history"]] == [1, 2, 3, 4, 5]
    assert s["state_type"] == "allocsearch.search.evolutionary.EvolutionState"
    assert s["fingerprint"] == dict(_fingerprint(evo_searcher(5)).parts)
    # The first 5 generations of an 8-generation search are the same trajectory.
    assert [h[:3] for h in s["history"]] == [h[:3] for h in reference["history"][:5]]


def test_saving_an_old_generation_again_is_refused(tmp_path):
    _run(tmp_path, generations=3)
    fingerprint = _fingerprint(evo_searcher(3))
    state = latest_state(tmp_path, fingerprint=fingerprint)
    with SearchCheckpointer(tmp_path, fingerprint=fingerprint) as ckpt:
        with pytest.raises(ValueError, match="generation 3 is not after the last checkpoint"):
            ckpt.save(state, evo_searcher(3).result(state))


def test_a_fresh_start_over_existing_checkpoints_is_refused_before_any_work(tmp_path):
    _run(tmp_path, generations=3)
    fingerprint = _fingerprint(evo_searcher(3))
    with SearchCheckpointer(tmp_path, fingerprint=fingerprint) as ckpt:
        assert ckpt.last_generation == 3
        with pytest.raises(ValueError, match="holds a checkpoint of generation 3 but the search"):
            make_callbacks(evo_searcher(3), checkpointer=ckpt, progress=False, start_state=None)


def test_empty_or_missing_directory_has_no_state(tmp_path):
    assert latest_state(tmp_path / "nothing", fingerprint=_fingerprint()) is None
    (tmp_path / "empty").mkdir()
    assert latest_state(tmp_path / "empty", fingerprint=_fingerprint()) is None
    assert complete_generations(tmp_path / "empty") == []


# ---- interrupted saves -----------------------------------------------------------------


def test_half_written_steps_are_never_taken_and_resume_is_exact(tmp_path, reference):
    assert _run(tmp_path, stop_after=3) is None
    fingerprint = _fingerprint()
    # Simulate saves of generations 4 and 5 cut off by a crash: an orbax temporary
    # directory (how orbax writes before its atomic rename) with a truncated file, and a
    # step directory without the commit marker (a crash on a non-atomic file system).
    tmp_step = tmp_path / "4.orbax-checkpoint-tmp-1712345678"
    shutil.copytree(tmp_path / "3", tmp_step)
    (tmp_step / "commit_success.txt").unlink()
    blob = next((tmp_step / "state").rglob("manifest.ocdbt"))
    blob.write_bytes(blob.read_bytes()[:5])
    half = tmp_path / "5"
    shutil.copytree(tmp_path / "3" / "state", half / "state")
    (half / "state" / "commit_success.txt").unlink()

    assert complete_generations(tmp_path) == [1, 2, 3]
    saved = latest_checkpoint(tmp_path, fingerprint=fingerprint)
    assert saved.generation == 3
    # Resuming clears the leftovers and rewrites generations 4 and 5.
    result = _run(tmp_path)
    assert result_json(result) == reference
    assert not half.exists() and not tmp_step.exists()
    assert complete_generations(tmp_path) == [6, 7, 8]


# ---- fingerprints ----------------------------------------------------------------------


def test_a_checkpoint_of_another_search_is_refused(tmp_path):
    _run(tmp_path, generations=2)
    with pytest.raises(CheckpointMismatchError, match=r"searcher \(checkpoint") as info:
        latest_state(tmp_path, fingerprint=_fingerprint(evo_searcher(3)))
    assert "spec (" not in str(info.value) and "key (" not in str(info.value)
    with pytest.raises(CheckpointMismatchError, match=r"differ") as info:
        latest_state(
            tmp_path, fingerprint=_fingerprint(evo_searcher(2), key=jax.random.key(SEED + 1))
        )
    assert "key (checkpoint" in str(info.value) and "searcher (" not in str(info.value)
    with pytest.raises(CheckpointMismatchError, match=r"spec \(checkpoint"):
        SearchCheckpointer(tmp_path, fingerprint=_fingerprint(evo_searcher(2), spec=tiny_spec(7)))
    # The matching search resumes.
    assert latest_state(tmp_path, fingerprint=_fingerprint(evo_searcher(2))).generation == 2


def test_fingerprint_is_stable_and_sees_every_setting():
    key = jax.random.key(0)
    base = search_fingerprint(searcher=evo_searcher(), spec=tiny_spec(), budget=BUDGET, key=key)
    again = search_fingerprint(searcher=evo_searcher(), spec=tiny_spec(), budget=BUDGET, key=key)
    assert base.parts == again.parts
    assert set(base.parts) == {"spec", "budget", "searcher", "key", "extra"}
    np.testing.assert_array_equal(base.key_data, np.array([0, 0], dtype=np.uint32))

    def changed(**kw):
        args = dict(searcher=evo_searcher(), spec=tiny_spec(), budget=BUDGET, key=key)
        args.update(kw)
        new = search_fingerprint(**args)
        return sorted(n for n in base.parts if new.parts[n] != base.parts[n])

    spec = tiny_spec()
    sparsity = spec.sparsity.copy()
    sparsity[0, 4] = 0.75
    moved = type(spec)(spec.units, sparsity, spec.valid, spec.center)
    assert changed(spec=moved) == ["spec"]
    assert changed(budget=type(BUDGET)(kind="params", target=0.55)) == ["budget"]
    assert changed(searcher=evo_searcher(9)) == ["searcher"]
    assert changed(key=jax.random.key(1)) == ["key"]
    assert changed(extra={"metric": "kl"}) == ["extra"]
    # Raw uint32 keys and typed keys with the same data are the same search.
    assert changed(key=jax.random.key_data(key)) == []
    # Functions are identified by name, so table searchers with other solvers differ.
    dp = search_fingerprint(
        searcher=TableSearcher(solver=dp_solve), spec=spec, budget=BUDGET, key=key
    )
    milp = search_fingerprint(
        searcher=TableSearcher(solver=mckp_milp), spec=spec, budget=BUDGET, key=key
    )
    assert dp.parts["searcher"] != milp.parts["searcher"]
    with pytest.raises(TypeError, match=r"cannot fingerprint extra\['model'\] of type object"):
        search_fingerprint(
            searcher=evo_searcher(), spec=spec, budget=BUDGET, key=key, extra={"model": object()}
        )


# ---- kill -9 of the driver and resume --------------------------------------------------


@pytest.mark.slow
def test_kill9_mid_generation_then_resume_reproduces_uninterrupted_run(tmp_path, reference):
    # Call 11 is the first call of generation 6: generations 1-5 are checkpointed.
    proc = _worker(tmp_path, "killed.json", "--kill-at-call", "11")
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed.json").exists()
    assert complete_generations(tmp_path / "ckpt") == [4, 5]
    _finish(_worker(tmp_path, "resumed.json"))
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed.pop("resumed_from") == 5
    assert resumed == reference
    log = read_log(tmp_path / "log.jsonl")
    assert [r["generation"] for r in log] == list(range(1, GENERATIONS + 1))
    assert [r["evaluations"] for r in log] == [
        g * EVALS_PER_GENERATION for g in range(1, GENERATIONS + 1)
    ]
    assert [r["best_fitness"] for r in log] == [float.fromhex(h[3]) for h in reference["history"]]
    assert all(b["wall_s"] >= a["wall_s"] for a, b in zip(log, log[1:], strict=False))


@pytest.mark.slow
def test_kill9_from_outside_at_any_moment_then_resume(tmp_path, reference):
    """SIGKILL at whatever point the driver is at (maybe inside a save), then resume."""
    proc = _worker(tmp_path, "killed.json", "--sleep", "0.05")
    log = tmp_path / "log.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the worker finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done_before = complete_generations(tmp_path / "ckpt")
    assert done_before and done_before[-1] < GENERATIONS
    _finish(_worker(tmp_path, "resumed.json", "--sleep", "0.0"))
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed.pop("resumed_from") == done_before[-1]
    assert resumed == reference
    assert [r["generation"] for r in read_log(log)] == list(range(1, GENERATIONS + 1))


# ---- progress log and bar --------------------------------------------------------------


def test_progress_log_has_one_flushed_line_per_generation(tmp_path, reference):
    log = tmp_path / "progress.jsonl"
    searcher, spec, key = evo_searcher(3), tiny_spec(), jax.random.key(SEED)
    lines_seen = []

    with make_callbacks(searcher, log_path=log, progress=False) as callbacks:

        def on_generation(state):
            callbacks(state)
            lines_seen.append(len(log.read_text().splitlines()))  # flushed already

        run_search(
            searcher, AdditiveFactory()(), spec, BUDGET, key=key, on_generation=on_generation
        )
    assert lines_seen == [1, 2, 3]
    records = read_log(log)
    assert [r["generation"] for r in records] == [1, 2, 3]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert [r["tokens"] for r in records] == [TOKENS_PER_GENERATION * g for g in (1, 2, 3)]
    assert [r["best_fitness"] for r in records] == [
        float.fromhex(h[3]) for h in reference["history"][:3]
    ]
    assert all(r["generation_s"] >= 0 and r["wall_s"] >= r["generation_s"] for r in records)


def test_resume_cuts_the_log_back_and_continues_wall_time(tmp_path):
    log = tmp_path / "progress.jsonl"
    rows = [{"generation": g, "wall_s": 10.0 * g} for g in range(1, 6)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"generation": 6, "wa')
    _, evo_state = _state_after(2)
    with make_callbacks(evo_searcher(), log_path=log, progress=False, start_state=evo_state):
        pass
    assert read_log(log) == rows[:2]
    with make_callbacks(evo_searcher(), log_path=log, progress=False) as callbacks:
        _, state3 = _state_after(3)
        callbacks(state3)
    assert [r["generation"] for r in read_log(log)] == [3]  # a fresh search starts anew


def _state_after(generations: int):
    searcher = evo_searcher(generations)
    states = []
    run_search(
        searcher,
        AdditiveFactory()(),
        tiny_spec(),
        BUDGET,
        key=jax.random.key(SEED),
        on_generation=states.append,
    )
    return searcher, states[-1]


def test_progress_bar_shows_generations_and_best(tmp_path):
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=120)
    searcher = evo_searcher(3)
    with make_callbacks(searcher, progress=True, total_generations=3, console=console) as callbacks:
        result = run_search(
            searcher,
            AdditiveFactory()(),
            tiny_spec(),
            BUDGET,
            key=jax.random.key(SEED),
            on_generation=callbacks,
        )
    text = out.getvalue()
    assert "3/3" in text
    assert f"{result.best_fitness:.6g}" in text


def test_state_pickles_inside_the_checkpoint_exactly(tmp_path):
    searcher, state = _state_after(2)
    fingerprint = _fingerprint(searcher)
    with SearchCheckpointer(tmp_path, fingerprint=fingerprint) as ckpt:
        ckpt.save(state, searcher.result(state), wall_s=1.5)
    saved = latest_checkpoint(tmp_path, fingerprint=fingerprint)
    assert pickle.dumps(saved.state) == pickle.dumps(state)
    assert saved.summary["wall_s"] == 1.5
