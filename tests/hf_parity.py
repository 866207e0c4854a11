"""What the transformers-parity tests share: tiny configs, random weights, saved models.

Import it after ``pytest.importorskip("torch")`` (it imports torch).
"""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_config(**kw) -> dict:
    """A 2-block Llama-like config of 32 channels (``kw`` overrides or adds keys)."""
    base = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return base


def randomize(model):
    """Random weights everywhere, N(0, 0.2^2), seed 0 (transformers initialises biases and
    norms to constants, which would hide mistakes in how they are read); eval mode."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def hf_logits(model, ids, mask=None):
    """The transformers model's logits of ``ids`` (numpy), with an optional attention mask."""
    with torch.no_grad():
        m = None if mask is None else torch.tensor(mask)
        return model(torch.tensor(ids), attention_mask=m).logits.numpy()


def saved_random(make, path: Path):
    """``randomize(make())`` (torch seed 0 first) saved as safetensors at ``path``:
    (the transformers model, ``path``)."""
    torch.manual_seed(0)
    model = randomize(make())
    model.save_pretrained(path, safe_serialization=True)
    return model, path
