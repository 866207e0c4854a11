"""scripts/gpu_check.py at toy sizes (``--tiny``) on whatever device is here: every ratio
it prints for a GPU run is printed, finite, and the peak fractions are fractions."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = (
    "peak_tflops",
    "dense_peak_fraction",
    "resident_vs_dense",
    "resident_peak_fraction",
    "streaming_vs_dense",
    "prefetch_speedup",
    "overlap",
    "evopress_s_per_generation",
)


def test_gpu_check_runs_tiny(tmp_path):
    script = ROOT / "scripts" / "gpu_check.py"
    run = subprocess.run(
        [sys.executable, str(script), "--tiny", "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    printed = dict(line.split(": ", 1) for line in run.stdout.splitlines() if ": " in line)
    saved = json.loads((tmp_path / "tiny" / "gpu_check.json").read_text())
    for key in KEYS:
        assert key in printed and math.isfinite(saved[key]), key
    assert saved["peak_tflops"] > 0 and saved["evopress_s_per_generation"] > 0
    for key in ("dense_peak_fraction", "resident_peak_fraction"):
        assert 0 < saved[key] < 1.5, (key, saved[key])  # a rate over the measured peak
    assert saved["resident_vs_dense"] > 0 and saved["streaming_vs_dense"] > 0
