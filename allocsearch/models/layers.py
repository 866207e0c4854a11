"""Descriptions of a model's prunable layers, shared by every other subpackage.

A *layer* here is one linear weight matrix that a local pruner may sparsify. Layers
are named by their Hugging Face module path (``model.layers.3.mlp.down_proj``) so that
recipes can be consumed by other tools without translation; the tensor in a checkpoint
is ``f"{name}.weight"``.
"""

from __future__ import annotations

from dataclasses import dataclass

# Roles a layer can have. Decoder LLMs (Llama family): q k v o gate up down.
# GPT-2: qkv (fused c_attn) o fc_in fc_out. BERT: q k v o fc_in fc_out.
# Mixture-of-experts routers (opt-in units): router.
ROLES = (
    "q",
    "k",
    "v",
    "qkv",
    "o",
    "gate",
    "up",
    "down",
    "fc_in",
    "fc_out",
    "embed",
    "lm_head",
    "router",
)


@dataclass(frozen=True)
class LayerInfo:
    """One prunable linear weight.

    Attributes:
      name: Hugging Face module path, e.g. ``model.layers.3.self_attn.q_proj``.
      role: one of :data:`ROLES`.
      block: index of the transformer block it belongs to (-1 for embeddings / head).
      shape: ``(out_features, in_features)``, the layout every pruner sees, whatever the
        checkpoint stores (GPT-2's Conv1D weights are transposed on load).
      flops_per_token: multiply-accumulates per token of the dense layer (out * in).
      input_group: layers with the same ``input_group`` read the same activations
        (q/k/v share one, gate/up share one), so one Hessian serves them all.
    """

    name: str
    role: str
    block: int
    shape: tuple[int, int]
    flops_per_token: int
    input_group: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown layer role {self.role!r}; valid roles: {ROLES}")
        if len(self.shape) != 2 or min(self.shape) <= 0:
            raise ValueError(f"layer {self.name}: shape must be (out, in) > 0, got {self.shape}")

    @property
    def numel(self) -> int:
        """Number of weights in the dense matrix."""
        return int(self.shape[0]) * int(self.shape[1])

    @property
    def weight_name(self) -> str:
        """Name of the weight tensor in the checkpoint / parameter dict."""
        return f"{self.name}.weight"

    @property
    def out_features(self) -> int:
        return int(self.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.shape[1])
