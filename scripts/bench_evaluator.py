"""Time the evaluator on the demo model against a plain jitted dense forward.

    python scripts/bench_evaluator.py [--model allocsearch/assets/demo] [--repeat 3]

Uses the demo model (a random model of scripts/train_demo_lm.py's CONFIG if the trained
one is absent), a supernet of all 42 linear layers at 5 levels (30..70% sparsity) built
with magnitude pruning, stored either as nested ranks ("nested": masks rebuilt inside the
program) or as weight stacks ("stacked": SparseGPT-style [K, out, in] gathers), and KL
fitness on demo calibration sequences of 256 tokens. Prints, per fidelity, in one run:

* candidates per second for 1, 2, 4 and 8 candidates per call, and the ratio of the time
  per candidate to one dense forward over the same tokens (assembly + metric overhead);
* the fraction of this machine's float32 matmul throughput (a 2048^3 matmul measured in
  the same run) that the evaluator reaches, counting the dense model's FLOPs;
* the cost of EvoPress-like offspring (2 to 6 layers changed from a parent, as its
  mutation switches min(U{1..3}, U{1..3}) level pairs) with reference reuse, relative to
  one dense forward, with and without the reference's own forward.

Ratios only, no verdicts; the targets are in docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from allocsearch.data.demo_corpus import demo_tokensets
from allocsearch.evaluate import Evaluator, KLDivergence
from allocsearch.models import HFModel, adapter_for_config, load_model
from allocsearch.pruners import DenseVariants, MagnitudePruner
from allocsearch.supernet.levels import explicit_grid
from allocsearch.supernet.spec import SupernetSpec, Unit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo_lm import CONFIG  # noqa: E402

SPARSITIES = [0.3, 0.4, 0.5, 0.6, 0.7]
CENTER = 0.5
SEQ_LEN = 256
MICRO_BATCH_TOKENS = 8192  # the evaluator's default micro_batch_tokens


def matmul_flops_per_s(repeat: int) -> float:
    """float32 FLOP/s of a jitted 2048 x 2048 x 2048 matmul (best of repeats)."""
    n = 2048
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    t = interleaved({"mm": lambda: f(a, a).block_until_ready()}, repeat + 2)["mm"][0]
    return 2 * n**3 / t


def model_flops_per_token(cfg: dict, seq_len: int) -> float:
    """Dense forward FLOPs per token (2 per multiply-accumulate): linears, attention
    scores and values over the full sequence (the mask is applied, not skipped), head."""
    d, f, nb = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd, h, kv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    linears = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f
    attention = 2 * seq_len * h * hd
    return 2.0 * (nb * (linears + attention) + d * cfg["vocab_size"])


def build_supernet(model: HFModel, stacked: bool):
    layers = model.adapter.layers()
    grid = explicit_grid(SPARSITIES, numel=[lay.numel for lay in layers], center=CENTER)
    units, variants, unit_params = [], {}, []
    for i, lay in enumerate(layers):
        s = grid.sparsity[i][grid.valid[i]]
        v = MagnitudePruner().prune(model.params[lay.weight_name], None, s)
        if stacked:
            w = model.params[lay.weight_name]
            v = DenseVariants(
                weights=jnp.stack([v.weights(w, k) for k in range(len(s))]), sparsity=s
            )
        variants[lay.weight_name] = v
        unit_params.append((lay.weight_name,))
        units.append(Unit(lay.name, lay.role, lay.block, (lay.name,), lay.numel, lay.numel))
    spec = SupernetSpec(tuple(units), grid.sparsity, grid.valid, grid.center)
    return spec, variants, unit_params


def offspring(parent: np.ndarray, levels: np.ndarray, n: int, rng: np.random.Generator):
    """EvoPress-like mutations: k = min(U{1..3}, U{1..3}) switches, each lowering one
    random unit by a level and raising another (so 2 to 6 units change)."""
    out = []
    while len(out) < n:
        child = parent.copy()
        k = min(rng.integers(1, 4), rng.integers(1, 4))
        for _ in range(k):
            down = rng.choice(np.flatnonzero(child > 0))
            up = rng.choice(np.flatnonzero(child < levels - 1))
            if down != up:
                child[down] -= 1
                child[up] += 1
        if np.any(child != parent):
            out.append(child)
    return np.stack(out).astype(np.int32)


def dense_forwards(forward, params, tokens, times: int, micro: int | None = None) -> None:
    """``times`` dense forwards (as much work as scoring that many candidates, so both
    sides of a ratio are timed over equally long windows of a shared machine's load),
    in one call or in micro-batches of ``micro`` sequences."""
    micro = micro or len(tokens)
    for _ in range(times):
        outs = [forward(params, tokens[i : i + micro]) for i in range(0, len(tokens), micro)]
        jax.block_until_ready(outs)


def score_fresh(ev: Evaluator, parent, kids, fidelity: int, seeds) -> None:
    """Score offspring on a new minibatch (so the reference's states are computed)."""
    ev.set_reference(parent)
    ev(kids, fidelity=fidelity, batch_seed=next(seeds))


def interleaved(fns: dict, repeat: int) -> dict[str, tuple[float, float]]:
    """Best (wall, process CPU) seconds of each zero-argument blocking callable, measured
    in turns so that load from other processes affects all of them alike. Process CPU
    time (all of JAX's threads) hardly depends on other processes' load, so ratios of it
    are the steadier measure on a shared machine."""
    wall = dict.fromkeys(fns, float("inf"))
    cpu = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name] = min(wall[name], time.perf_counter() - w0)
            cpu[name] = min(cpu[name], time.process_time() - c0)
    return {name: (wall[name], cpu[name]) for name in fns}


def ratio(a: tuple[float, float], b: tuple[float, float]) -> str:
    return f"{a[0] / b[0]:.3f} (wall) {a[1] / b[1]:.3f} (CPU)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("allocsearch/assets/demo"))
    ap.add_argument(
        "--blocks",
        type=int,
        default=None,
        help="random model of CONFIG with this many blocks instead of the demo",
    )
    ap.add_argument("--fidelities", type=int, nargs="+", default=[2048, 16384])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--layouts", nargs="+", default=["nested", "stacked"])
    ap.add_argument(
        "--offspring",
        type=int,
        default=64,
        help="offspring at 2048 tokens (scaled down in proportion at higher fidelities, "
        "at least 8)",
    )
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if args.blocks is None and (args.model / "config.json").exists():
        model, origin = load_model(args.model), str(args.model)
    else:
        config = dict(CONFIG, num_hidden_layers=args.blocks or CONFIG["num_hidden_layers"])
        adapter = adapter_for_config(config)
        model = HFModel(adapter, adapter.init_params(jax.random.key(args.seed)))
        origin = "random weights, CONFIG of scripts/train_demo_lm.py"
        if args.blocks is not None:
            origin += f" with {args.blocks} blocks"
    cfg = model.adapter.hf_config
    nb = model.adapter.num_blocks
    n_seq = max(args.fidelities) // SEQ_LEN
    calibration, _ = demo_tokensets(SEQ_LEN, n_seq, args.seed, n_heldout_seqs=1)
    print(f"model: {origin}; {nb} blocks, {len(model.adapter.layers())} units")
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}"
    )
    peak = matmul_flops_per_s(args.repeat)
    print(f"float32 matmul 2048^3: {peak / 1e9:.1f} GFLOP/s (wall)")
    flops_tok = model_flops_per_token(cfg, SEQ_LEN)
    forward = jax.jit(model.adapter.forward)
    rng = np.random.default_rng(args.seed)

    for layout in args.layouts:
        spec, variants, unit_params = build_supernet(model, layout == "stacked")
        levels = spec.num_levels
        parent = spec.center.astype(np.int32)
        print(f"\n== layout {layout}")
        for fidelity in args.fidelities:
            flops = flops_tok * fidelity
            tokens = jnp.asarray(calibration.tokens[: fidelity // SEQ_LEN])
            cands = rng.integers(0, levels, size=(8, spec.num_units)).astype(np.int32)
            n = len(cands)
            # Fewer offspring at higher fidelity, as in staged selection.
            kids = offspring(parent, levels, max(8, args.offspring * 2048 // fidelity), rng)
            evs = {}
            for g in args.batch_sizes:
                evs[g] = Evaluator(
                    model,
                    spec,
                    variants,
                    unit_params,
                    calibration,
                    metric=KLDivergence(),
                    candidates_per_call=g,
                    auto_reference=False,  # the plain path; reuse is measured below
                )
                evs[g](cands[:g], fidelity=fidelity, batch_seed=1)  # compile
            micro = MICRO_BATCH_TOKENS // SEQ_LEN
            forward(model.params, tokens).block_until_ready()
            forward(model.params, tokens[:micro]).block_until_ready()
            fns = {"dense": partial(dense_forwards, forward, model.params, tokens, n)}
            if fidelity > MICRO_BATCH_TOKENS:
                fns["micro"] = partial(dense_forwards, forward, model.params, tokens, n, micro)
            for g, ev in evs.items():
                fns[g] = partial(ev, cands, fidelity=fidelity, batch_seed=1)
            times = {k: (w / n, c / n) for k, (w, c) in interleaved(fns, args.repeat).items()}
            dense = times.pop("dense")
            in_micro = times.pop("micro", None)
            print(
                f"-- fidelity {fidelity} tokens: dense forward {dense[0] * 1e3:.1f} ms wall, "
                f"{dense[1] * 1e3:.1f} ms CPU ({flops / dense[0] / peak:.0%} of matmul peak)"
            )
            if fidelity > MICRO_BATCH_TOKENS:
                print(
                    f"   dense forward in the evaluator's micro-batches of {micro} sequences: "
                    f"{ratio(in_micro, dense)} x dense forward"
                )
            for g, t in times.items():
                vs_micro = f", {ratio(t, in_micro)} x in micro-batches" if in_micro else ""
                print(
                    f"   {g} per call: {1 / t[0]:6.2f} candidates/s, {ratio(t, dense)} x dense "
                    f"forward{vs_micro}, {flops / t[0] / peak:.0%} of matmul peak"
                )
            # Reuse starts a group at its earliest member's block, so one per call wastes
            # nothing; batching pays only where a call of several costs less than several.
            g = 1 if 1 in evs else min(times, key=lambda k: times[k][1])
            ev = evs[g]
            ev.set_reference(parent)
            ev(kids, fidelity=fidelity, batch_seed=99)  # compile the states + reuse programs
            m = len(kids)
            fns = {
                "dense": partial(dense_forwards, forward, model.params, tokens, m, micro),
                # A fresh minibatch each time: the call computes the reference's states.
                "with": partial(score_fresh, ev, parent, kids, fidelity, itertools.count(1000)),
                "reuse": partial(ev, kids, fidelity=fidelity, batch_seed=99),
            }
            times = {k: (w / m, c / m) for k, (w, c) in interleaved(fns, args.repeat).items()}
            stats = ev.last_stats
            many = offspring(parent, levels, 10_000, np.random.default_rng(args.seed + 1))
            expected = nb - ev.first_differing_block(many).mean()
            print(
                f"   {m} offspring with reuse ({g} per call, blocks run {stats.blocks_run:.2f} "
                f"of {nb}; {expected / nb:.3f} of the blocks expected for such offspring): "
                f"{ratio(times['reuse'], times['dense'])} x dense forward each, "
                f"{ratio(times['with'], times['dense'])} with the reference's forward amortised"
            )
            ev.set_reference(None)


if __name__ == "__main__":
    main()
