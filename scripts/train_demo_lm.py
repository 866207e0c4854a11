"""Train the bundled demo language model: a small Llama-architecture byte-level causal LM on
Python standard-library source (allocsearch.data.demo_corpus), with optax.

    python scripts/train_demo_lm.py --out allocsearch/assets/demo --minutes 25

Prints held-out bits per byte of the model and of a bigram baseline on the same split,
and writes config.json + model.safetensors (bfloat16 storage) + training.json. The output
loads with transformers' LlamaForCausalLM. The weights are committed once; retrain only
when the architecture or corpus changes.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from allocsearch.data.demo_corpus import HELDOUT_MODULES, TRAIN_MODULES, demo_documents
from allocsearch.data.tokenizers import ByteTokenizer
from allocsearch.data.tokenset import encode_documents
from allocsearch.models import HFModel, adapter_for_config, load_model, save_model

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": None,
    "eos_token_id": None,
    "initializer_range": 0.02,
}


def bigram_bits_per_byte(train: np.ndarray, heldout: np.ndarray, alpha: float = 0.1) -> float:
    """Held-out bits per byte of an add-alpha smoothed bigram model fitted on ``train``."""
    counts = np.zeros((256, 256), np.float64)
    np.add.at(counts, (train[:-1], train[1:]), 1.0)
    probs = (counts + alpha) / (counts + alpha).sum(axis=1, keepdims=True)
    return float(-np.mean(np.log2(probs[heldout[:-1], heldout[1:]])))


def heldout_bits_per_byte(adapter, params, stream: np.ndarray, seq_len: int, batch: int = 16):
    """Mean next-byte NLL in bits over consecutive non-overlapping windows of ``stream``."""
    n = (len(stream) - 1) // seq_len
    x = stream[: n * seq_len].reshape(n, seq_len)
    y = stream[1 : n * seq_len + 1].reshape(n, seq_len)

    @jax.jit
    def nll(p, xb, yb):
        logits = adapter.forward(p, xb).astype(jnp.float32)
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[..., None], -1))

    total = 0.0
    for i in range(0, n, batch):
        total += float(nll(params, jnp.asarray(x[i : i + batch]), jnp.asarray(y[i : i + batch])))
    return total / (n * seq_len) / math.log(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output model directory")
    ap.add_argument("--minutes", type=float, default=25.0, help="training wall-time budget")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()

    tok = ByteTokenizer()
    train = encode_documents(demo_documents("train"), tok)
    heldout = encode_documents(demo_documents("heldout"), tok)
    print(
        f"train {len(train):,} bytes ({len(TRAIN_MODULES)} modules), "
        f"held-out {len(heldout):,} bytes ({len(HELDOUT_MODULES)} modules)"
    )
    bigram = bigram_bits_per_byte(train, heldout)
    print(f"bigram baseline: {bigram:.4f} bits/byte on held-out")

    adapter = adapter_for_config(CONFIG)
    key = jax.random.key(args.seed)
    params = adapter.init_params(key)
    n_params = sum(int(np.prod(v.shape)) for v in params.values())
    print(f"model: {n_params:,} parameters")

    # Time a few steps first, then size the cosine schedule to the wall-time budget.
    def make_opt(total_steps):
        sched = optax.warmup_cosine_decay_schedule(
            0.0, args.lr, min(200, total_steps // 10), total_steps, args.lr * 0.05
        )
        return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.05))

    def loss_fn(p, xb, yb):
        logits = adapter.forward(p, xb).astype(jnp.float32)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[..., None], -1))

    def make_step(opt):
        @jax.jit
        def step(p, s, xb, yb):
            loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
            updates, s = opt.update(g, s, p)
            return optax.apply_updates(p, updates), s, loss

        return step

    rng = np.random.default_rng(args.seed)

    def batch():
        starts = rng.integers(0, len(train) - args.seq_len - 1, size=args.batch)
        idx = starts[:, None] + np.arange(args.seq_len + 1)[None]
        w = train[idx]
        return jnp.asarray(w[:, :-1]), jnp.asarray(w[:, 1:])

    probe_opt = make_opt(1000)
    probe = make_step(probe_opt)
    s = probe_opt.init(params)
    xb, yb = batch()
    probe(params, s, xb, yb)[2].block_until_ready()  # compile
    t0 = time.perf_counter()
    for _ in range(5):
        _, _, loss = probe(params, s, xb, yb)
    loss.block_until_ready()
    per_step = (time.perf_counter() - t0) / 5
    total = max(100, min(args.max_steps, int(args.minutes * 60 / per_step)))
    print(f"{per_step * 1000:.0f} ms/step -> {total} steps of {args.batch}x{args.seq_len} bytes")

    opt = make_opt(total)
    step = make_step(opt)
    state = opt.init(params)
    t0 = time.perf_counter()
    for i in range(total):
        xb, yb = batch()
        params, state, loss = step(params, state, xb, yb)
        if i % 200 == 0 or i == total - 1:
            print(
                f"step {i:6d}  loss {float(loss) / math.log(2):.4f} bits/byte  "
                f"{time.perf_counter() - t0:7.1f}s",
                flush=True,
            )
    train_time = time.perf_counter() - t0

    model = HFModel(adapter, params)
    out = save_model(model, args.out, dtype="bfloat16", overwrite=args.overwrite)
    # Score what was actually stored (bfloat16 weights, computed in float32).
    stored = load_model(out)
    bpb = heldout_bits_per_byte(stored.adapter, stored.params, heldout, args.seq_len)
    print(f"held-out: model {bpb:.4f} bits/byte, bigram {bigram:.4f} bits/byte")
    info = {
        "python": platform.python_version(),
        "parameters": n_params,
        "steps": total,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "seed": args.seed,
        "train_seconds": round(train_time, 1),
        "heldout_bits_per_byte": round(bpb, 4),
        "bigram_heldout_bits_per_byte": round(bigram, 4),
        "train_bytes": int(len(train)),
        "heldout_bytes": int(len(heldout)),
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
