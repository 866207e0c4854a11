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

__all__ = [
    "FAMILIES",
    "BertAdapter",
    "GPT2Adapter",
    "HFModel",
    "LayerInfo",
    "LlamaAdapter",
    "ModelAdapter",
    "ModelLoadError",
    "adapter_for_config",
    "load_model",
    "mean_pool",
    "save_model",
]
