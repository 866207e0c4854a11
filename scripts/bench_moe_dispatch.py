"""Time MoE expert dispatch against the all-experts path through the evaluator.

    python scripts/bench_moe_dispatch.py [--repeat 3] [--fidelity 2048] [--candidates 4]

For each random Qwen3-MoE-like model (2 blocks, hidden 256-512, 16-64 experts, top-2 or
top-8; small vocabulary so the experts dominate), one magnitude supernet (nested masks,
5 levels 30..70% on every linear) is scored by two resident evaluators that differ only in
the MoE blocks' dispatch: ``sorted`` (allocsearch.models.moe_dispatch: routed tokens only,
in static-shape tiles) and ``dense`` (every expert on every token). Same candidates, same
minibatch, KL fitness. Prints per model, in one run: the time ratio (all experts over
dispatch, best of ``--repeat`` interleaved, wall and process CPU), the expert-FLOPs ratio
(``E`` rows per token over dispatch's static padded rows per token), the whole model's
FLOPs ratio (attention and head included) and the largest relative score difference.
Also times ``jax.lax.ragged_dot`` dispatch for the smallest model. Ratios only, no
verdicts.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from functools import partial

import jax
import numpy as np

from allocsearch.data.tokenset import TokenSet
from allocsearch.evaluate import Evaluator, KLDivergence
from allocsearch.models import HFModel
from allocsearch.models.moe import MoEAdapter
from allocsearch.models.moe_dispatch import dispatch_method, dispatch_rows, dispatch_tile
from allocsearch.pruners import MagnitudePruner
from allocsearch.supernet.levels import explicit_grid
from allocsearch.supernet.spec import SupernetSpec, Unit

SPARSITIES = [0.3, 0.4, 0.5, 0.6, 0.7]
SEQ_LEN = 128
# (hidden, expert width, experts, top-k)
SHAPES = [(256, 128, 16, 2), (256, 128, 64, 8), (512, 256, 64, 2), (512, 256, 32, 4)]


def config(hidden: int, ffn: int, experts: int, top_k: int) -> dict:
    return dict(
        model_type="qwen3_moe",
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        moe_intermediate_size=ffn,
        num_hidden_layers=2,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        head_dim=64,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=False,
    )


def supernet(model: HFModel):
    layers = model.adapter.layers()
    grid = explicit_grid(SPARSITIES, numel=[lay.numel for lay in layers], center=0.5)
    units, variants, unit_params = [], {}, []
    for i, lay in enumerate(layers):
        s = grid.sparsity[i][grid.valid[i]]
        variants[lay.weight_name] = MagnitudePruner().prune(model.params[lay.weight_name], None, s)
        unit_params.append((lay.weight_name,))
        units.append(Unit(lay.name, lay.role, lay.block, (lay.name,), lay.numel, lay.numel))
    return SupernetSpec(tuple(units), grid.sparsity, grid.valid, grid.center), variants, unit_params


def flops_per_token(cfg: dict, expert_rows: float) -> float:
    """Forward FLOPs per token (2 per multiply-accumulate) with ``expert_rows`` expert
    evaluations per token: attention linears and scores, router, experts, head."""
    d, f, nb = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_hidden_layers"]
    h, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    attn = 2 * d * h * hd + 2 * d * kv * hd + 2 * SEQ_LEN * h * hd
    per_block = attn + d * cfg["num_experts"] + expert_rows * 3 * d * f
    return 2.0 * (nb * per_block + d * cfg["vocab_size"])


def interleaved(fns: dict, repeat: int) -> dict[str, tuple[float, float]]:
    """Best (wall, process CPU) seconds of each blocking callable, measured in turns."""
    wall = dict.fromkeys(fns, float("inf"))
    cpu = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name] = min(wall[name], time.perf_counter() - w0)
            cpu[name] = min(cpu[name], time.process_time() - c0)
    return {name: (wall[name], cpu[name]) for name in fns}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--fidelity", type=int, default=2048, help="tokens scored per candidate")
    ap.add_argument("--candidates", type=int, default=4, help="candidates scored per timing")
    ap.add_argument("--per-call", type=int, default=1, help="candidates_per_call (vmap)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}"
    )
    n_seq = args.fidelity // SEQ_LEN
    rng = np.random.default_rng(args.seed)
    print(
        f"fidelity {args.fidelity} tokens ({n_seq} x {SEQ_LEN}), {args.candidates} candidates, "
        f"{args.per_call} per call, KL, nested magnitude supernet of {len(SPARSITIES)} levels"
    )
    print(
        "| D | F | E | k | tile | rows/token (all/dispatch) | expert FLOPs ratio | model FLOPs "
        "ratio | time ratio wall | time ratio CPU | max rel score diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for i, shape in enumerate(SHAPES):
        cfg = config(*shape)
        d, f, e, k = shape
        calib = TokenSet(
            rng.integers(0, cfg["vocab_size"], size=(n_seq, SEQ_LEN)).astype(np.int32),
            "random ids",
            "ids",
            args.seed,
        )
        methods = ["dense", "sorted"] + (["ragged"] if i == 0 else [])
        base = MoEAdapter(cfg, dispatch="dense")
        params = base.init_params(jax.random.key(args.seed))
        models = {m: HFModel(MoEAdapter(cfg, dispatch=m), params) for m in methods}
        spec, variants, unit_params = supernet(models["dense"])
        cands = rng.integers(0, spec.num_levels, size=(args.candidates, spec.num_units))
        cands = cands.astype(np.int32)
        evs, scores = {}, {}
        for m, model in models.items():
            evs[m] = Evaluator(
                model,
                spec,
                variants,
                unit_params,
                calib,
                metric=KLDivergence(),
                candidates_per_call=args.per_call,
                auto_reference=False,
            )
            scores[m] = evs[m](cands, fidelity=args.fidelity, batch_seed=1)  # compiles
        fns = {m: partial(ev, cands, fidelity=args.fidelity, batch_seed=1) for m, ev in evs.items()}
        t = interleaved(fns, args.repeat)
        tokens = min(n_seq, 8192 // SEQ_LEN) * SEQ_LEN  # per micro-batch (evaluator default)
        tile = dispatch_tile(tokens, k, e)
        rows = dispatch_rows(tokens, k, e, tile) / tokens
        assert dispatch_method("auto", num_tokens=tokens, top_k=k, num_experts=e) == "sorted"
        diff = np.max(np.abs(scores["sorted"] - scores["dense"]) / np.abs(scores["dense"]))
        print(
            f"| {d} | {f} | {e} | {k} | {tile} | {e} / {rows:.2f} | {e / rows:.2f} | "
            f"{flops_per_token(cfg, e) / flops_per_token(cfg, rows):.2f} | "
            f"{t['dense'][0] / t['sorted'][0]:.2f} | {t['dense'][1] / t['sorted'][1]:.2f} | "
            f"{diff:.1e} |",
            flush=True,
        )
        if "ragged" in t:
            print(
                f"  (ragged_dot dispatch on this model: all experts / ragged = "
                f"{t['dense'][0] / t['ragged'][0]:.2f} wall, "
                f"{t['dense'][1] / t['ragged'][1]:.2f} CPU)",
                flush=True,
            )


if __name__ == "__main__":
    main()
