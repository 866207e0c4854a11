"""Test-run setup: one persistent JAX compilation cache shared by every test process of
the run (xdist workers, CLI subprocesses and Ray actors inherit its directory through
the environment), so a program that many tests compile, e.g. the tiny models' evaluator
and build programs, is compiled once per run; removed at the end of the run."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # set before any test module imports jax; the directory belongs to this process
    _cache = tempfile.mkdtemp(prefix="allocsearch-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
