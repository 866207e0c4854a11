"""Plot held-out perplexity against average bits per weight from a `sweep --budget bits` run.

Reads ``<sweep>/target-*/rows.json`` (one row per strategy and target; ``achieved`` is the
fraction of the 16-bit cost removed, so bits per weight = 16 (1 - achieved)) and, with
``--demo``, the uniform-bitwidth rows of a ``demo --quantizer`` run's ``quant.md``; writes
one PNG (x: bits per weight, scales counted; y: held-out perplexity, log scale).

    python scripts/plot_bits_sweep.py runs/qsweep docs/bits_sweep.png --demo runs/qdemo
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402


def sweep_series(sweep: Path) -> dict[str, list[tuple[float, float]]]:
    """strategy -> [(bits per weight, held-out perplexity)] sorted by bits."""
    series: dict[str, list[tuple[float, float]]] = {}
    for rows in sorted(sweep.glob("target-*/rows.json")):
        for r in json.loads(rows.read_text()):
            bits = 16.0 * (1.0 - float(r["achieved"]))
            series.setdefault(r["strategy"], []).append((bits, float(r["heldout_ppl"])))
    if not series:
        raise SystemExit(f"{sweep}: no target-*/rows.json (run `allocsearch sweep` first)")
    return {k: sorted(v) for k, v in series.items()}


def uniform_points(demo: Path) -> list[tuple[str, float, float]]:
    """(label, bits per weight, perplexity) of the ``| uniform N-bit |`` rows of quant.md."""
    out = []
    for line in (demo / "quant.md").read_text().splitlines():
        m = re.match(r"\| uniform (\d+)-bit \| ([\d.]+) \| [\d.]+ \| ([\d.]+) \|", line)
        if m:
            out.append((f"{m[1]}-bit", float(m[2]), float(m[3])))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", type=Path)
    p.add_argument("png", type=Path)
    p.add_argument("--demo", type=Path, help="a `demo --quantizer` output directory")
    args = p.parse_args()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for i, (name, pts) in enumerate(sweep_series(args.sweep).items()):
        x, y = zip(*pts, strict=True)
        ax.plot(x, y, marker="osD^v"[i % 5], color=f"C{i}", linewidth=1.5, label=name)
    if args.demo:
        for label, x, y in uniform_points(args.demo):
            ax.plot([x], [y], "k*", markersize=9)
            ax.annotate(f"uniform {label}", (x, y), textcoords="offset points", xytext=(4, 4))
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("average bits per weight (scales counted)")
    ax.set_ylabel("held-out perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    tmp = args.png.with_suffix(".tmp.png")
    fig.savefig(tmp)
    tmp.replace(args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
