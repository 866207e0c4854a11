"""Rotary position embeddings: inverse frequencies of every rope type Hugging Face
configs use, computed on the host (they depend only on the config and, for ``dynamic``
and ``longrope``, on the static sequence length), and the cos/sin tables of a forward.

Rope types follow ``transformers.modeling_rope_utils``:
- ``default``: ``1 / theta^(2i/d)``.
- ``linear``: default divided by ``factor`` (position interpolation).
- ``dynamic``: NTK-aware; past ``max_position_embeddings`` the base grows with the
  sequence length (so the tables depend on T, which is static under ``jit``).
- ``yarn``: per-frequency blend of interpolation and extrapolation with a linear ramp
  between ``beta_fast`` and ``beta_slow`` rotations, and cos/sin scaled by an attention
  factor (``0.1 ln(factor) + 1`` unless given).
- ``longrope``: per-frequency ``short_factor`` or, for sequences longer than
  ``original_max_position_embeddings``, ``long_factor``; cos/sin scaled by
  ``sqrt(1 + ln(factor) / ln(original_max_position_embeddings))`` unless given.
- ``llama3``: Llama 3.1's wavelength-dependent division by ``factor``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
# Rope types whose parameters name the pretraining context length.
_NEEDS_ORIGINAL_CONTEXT = ("llama3", "yarn", "longrope")


def _freeze(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class RopeSpec:
    """One rotary embedding as a config describes it (hashable, so adapters stay static).

    Attributes:
      rope_type: one of :data:`ROPE_TYPES`.
      theta: the base wavelength.
      head_dim: rotated dimensions per head (the whole head; partial rotary is refused).
      max_position_embeddings: the config's context length.
      params: the remaining rope parameters (``factor``, ``beta_fast``...), sorted.
    """

    rope_type: str
    theta: float
    head_dim: int
    max_position_embeddings: int
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_config(
        cls,
        rope: Mapping[str, Any] | None,
        *,
        theta: float,
        head_dim: int,
        max_position_embeddings: int,
        original_max_position_embeddings: int | None = None,
        where: str = "model",
    ) -> RopeSpec:
        """Parse one rope parameter dict (``rope_parameters`` or legacy ``rope_scaling``).

        Args:
          rope: the dict, or None for default rope.
          theta: the base used when the dict has no ``rope_theta``.
          original_max_position_embeddings: a top-level config value, which (as in
            transformers) takes priority over the dict's for scaled rope types.
          where: names the model in errors.
        Raises:
          ValueError: an unknown rope type, partial rotary, or a missing parameter.
        """
        rope = dict(rope or {})
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype not in ROPE_TYPES:
            raise ValueError(f"{where}: rope type {rtype!r} is not supported; valid: {ROPE_TYPES}")
        partial = float(rope.get("partial_rotary_factor", 1.0) or 1.0)
        if partial != 1.0:
            raise ValueError(
                f"{where}: partial_rotary_factor={partial} is not supported; valid: 1.0"
            )
        theta = float(rope.get("rope_theta") or theta)
        params = {
            k: _freeze(v)
            for k, v in rope.items()
            if k not in ("rope_type", "type", "rope_theta", "partial_rotary_factor")
        }
        if rtype in _NEEDS_ORIGINAL_CONTEXT:
            params["original_max_position_embeddings"] = int(
                original_max_position_embeddings
                or params.get("original_max_position_embeddings")
                or max_position_embeddings
            )
        required = {
            "linear": ("factor",),
            "dynamic": ("factor",),
            "yarn": ("factor",),
            "longrope": ("short_factor", "long_factor"),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
        }.get(rtype, ())
        missing = [k for k in required if params.get(k) is None]
        if missing:
            raise ValueError(f"{where}: rope type {rtype!r} needs {missing} in its parameters")
        return cls(
            rtype, theta, int(head_dim), int(max_position_embeddings), tuple(sorted(params.items()))
        )

    def inv_freq(self, seq_len: int) -> tuple[np.ndarray, float]:
        """(float32[head_dim/2] inverse frequencies, attention scaling of cos/sin) for
        sequences of ``seq_len`` positions."""
        p = dict(self.params)
        dim = self.head_dim
        exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float64) / dim
        base = self.theta
        scaling = 1.0
        rtype = self.rope_type
        if rtype == "dynamic" and seq_len > self.max_position_embeddings:
            factor = float(p["factor"])
            ratio = factor * seq_len / self.max_position_embeddings - (factor - 1)
            base = base * ratio ** (dim / (dim - 2))
        inv = 1.0 / base**exponents
        if rtype == "linear":
            inv = inv / float(p["factor"])
        elif rtype == "llama3":
            # Leave high frequencies, divide low ones by `factor`, blend in between
            # (wavelengths measured against the original context).
            inv = inv.astype(np.float32).astype(np.float64)
            factor = float(p["factor"])
            low, high = float(p["low_freq_factor"]), float(p["high_freq_factor"])
            old_ctx = float(p["original_max_position_embeddings"])
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > old_ctx / low, inv / factor, inv)
            smooth = (old_ctx / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
            inv = np.where(medium, smoothed, scaled)
        elif rtype == "yarn":
            inv, scaling = self._yarn(p, exponents)
        elif rtype == "longrope":
            old_ctx = int(p["original_max_position_embeddings"])
            factor = p.get("factor")
            if factor is None:
                factor = self.max_position_embeddings / old_ctx
            scaling = p.get("attention_factor")
            if scaling is None:
                scaling = (
                    1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_ctx))
                )
            ext = np.asarray(p["long_factor" if seq_len > old_ctx else "short_factor"], np.float64)
            if ext.shape != inv.shape:
                raise ValueError(
                    f"longrope factors have {ext.size} entries; head_dim {dim} needs {inv.size}"
                )
            inv = 1.0 / (ext * base**exponents)
        return inv.astype(np.float32), float(scaling)

    def _yarn(self, p: dict[str, Any], exponents: np.ndarray) -> tuple[np.ndarray, float]:
        dim, base = self.head_dim, self.theta
        factor = p.get("factor")
        old_ctx = int(p["original_max_position_embeddings"])
        if factor is None:
            factor = self.max_position_embeddings / old_ctx
        factor = float(factor)

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        scaling = p.get("attention_factor")
        if scaling is None:
            if p.get("mscale") and p.get("mscale_all_dim"):
                scaling = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
            else:
                scaling = mscale(factor)
        beta_fast = p.get("beta_fast") or 32
        beta_slow = p.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return (dim * math.log(old_ctx / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # no zero-width ramp
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrapolate = 1 - ramp  # weight of the unscaled frequency
        pos_freqs = base**exponents
        inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
        return inv, float(scaling)

    def tables(self, seq_len: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
        """(cos, sin) float[1, T, head_dim] for positions 0..T-1 (halves repeated, as in
        Hugging Face's rotate-half convention), scaled by the attention scaling."""
        inv, scaling = self.inv_freq(seq_len)
        freqs = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * jnp.asarray(inv)[None, :]
        angles = jnp.concatenate([freqs, freqs], axis=-1)[None]
        return (
            (jnp.cos(angles) * scaling).astype(dtype),
            (jnp.sin(angles) * scaling).astype(dtype),
        )


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Apply rotary embedding (half-split convention of Hugging Face) to float[B,T,H,D]
    with cos, sin float[B or 1, T, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
