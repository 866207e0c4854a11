"""Model families (Flax NNX) with Hugging Face checkpoints, and their prunable layers."""

from allocsearch.models.base import ModelAdapter
from allocsearch.models.bert import BertAdapter, mean_pool
from allocsearch.models.gpt2 import GPT2Adapter
from allocsearch.models.hf import (
    FAMILIES,
    HFModel,
    ModelLoadError,
    adapter_for_config,
    load_model,
    save_model,
)
from allocsearch.models.layers import LayerInfo
from allocsearch.models.llama import LlamaAdapter
from allocsearch.models.moe import MoEAdapter
from allocsearch.models.phi3 import Phi3Adapter
from allocsearch.models.rope import ROPE_TYPES, RopeSpec

__all__ = [
    "FAMILIES",
    "BertAdapter",
    "GPT2Adapter",
    "HFModel",
    "LayerInfo",
    "LlamaAdapter",
    "ModelAdapter",
    "ModelLoadError",
    "MoEAdapter",
    "Phi3Adapter",
    "ROPE_TYPES",
    "RopeSpec",
    "adapter_for_config",
    "load_model",
    "mean_pool",
    "save_model",
]
